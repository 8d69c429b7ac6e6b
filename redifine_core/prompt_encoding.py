"""The one prompt encoder: the UNet's text conditioning, as training and sampling both compute it.

    check_clip_skip(clip_skip, sdxl, text_encoder)                 ValueError unless the setting applies to the model
    text_conditioning(pipeline, prompts, sdxl, clip_skip, device)  -> (prompt_embeds, pooled_or_None)

CLIP skip counts layers as kohya's sd-scripts and A1111 do: None or 1 = the last layer, 2 = the penultimate, and a
skipped layer's output goes through the encoder's final layer norm. SDXL is always conditioned on both encoders'
penultimate layers (no final norm) and text_encoder_2's pooled projection; sd-scripts ignores clip skip for SDXL, so
only None or 2 (which is what SDXL uses) are accepted there.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def check_clip_skip(clip_skip: Optional[int], sdxl: bool, text_encoder: Any = None) -> None:
    """One-line ValueError unless ``clip_skip`` applies to this model (``text_encoder``: its layer count bounds it)."""
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1):
        raise ValueError(f"clip_skip={clip_skip!r} must be None or an integer >= 1 (1 = last layer, 2 = penultimate)")
    if sdxl and clip_skip not in (None, 2):
        raise ValueError(f"clip_skip={clip_skip} does not apply to SDXL, which is always conditioned on the "
                         "penultimate layer (sd-scripts ignores clip skip for SDXL): use None or 2")
    layers = getattr(getattr(text_encoder, "config", None), "num_hidden_layers", None)
    if not sdxl and clip_skip is not None and layers is not None and clip_skip > int(layers):
        raise ValueError(f"clip_skip={clip_skip} is more than the text encoder's {int(layers)} layers")


def _hidden_states(text_encoder: Any, tokenizer: Any, prompts: list[str], device: Optional[torch.device],
                   layer: int, final_norm: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One CLIP encoder's token embeddings from hidden layer ``layer`` (-1 = last; the final layer norm applied when
    ``final_norm``) and its projected pooled output if it has one."""
    if device is None:
        first = next(text_encoder.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    out = text_encoder(tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
    pooled = out[0] if out[0].ndim == 2 else None
    if layer == -1 and pooled is None:
        return out[0], None  # last_hidden_state: the final layer norm is already applied
    hidden = out.hidden_states[layer]
    if final_norm:
        hidden = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)
    return hidden, pooled


def text_conditioning(pipeline: Any, prompts: list[str], sdxl: bool, clip_skip: Optional[int] = None,
                      device: Optional[torch.device] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(prompt_embeds, pooled_or_None)`` of ``prompts`` in the text encoders' dtype, with autograd as the caller
    has it. SD: [N, L, D] and None. SDXL: [N, 77, D1 + D2] and [N, P]. Token ids go to ``device`` (default: each
    encoder's own device)."""
    check_clip_skip(clip_skip, sdxl, pipeline.text_encoder)
    if sdxl:
        first, _ = _hidden_states(pipeline.text_encoder, pipeline.tokenizer, prompts, device, -2, False)
        second, pooled = _hidden_states(pipeline.text_encoder_2, pipeline.tokenizer_2, prompts, device, -2, False)
        return torch.cat([first, second], dim=-1), pooled
    skip = clip_skip or 1
    return _hidden_states(pipeline.text_encoder, pipeline.tokenizer, prompts, device, -skip, skip > 1)[0], None
