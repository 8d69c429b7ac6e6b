"""Test helper: convert a diffusers SD1.x / SDXL pipeline to the original single-file (LDM / "ckpt") key layout.

diffusers ships only the original -> diffusers converters; this is the inverse, written for tests so that single-file
loading can be exercised on tiny models. It is verified by round-tripping through diffusers' own converters.
"""

from __future__ import annotations

from typing import Dict

import torch

StateDict = Dict[str, torch.Tensor]

_RESNET = [  # (diffusers, original) inside a UNet resnet block
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _rename_resnet(suffix: str) -> str:
    for new, old in _RESNET:
        if suffix.startswith(new + "."):
            return old + suffix[len(new):]
    raise KeyError(f"unexpected resnet key {suffix!r}")


def unet_to_original(unet) -> StateDict:
    """UNet2DConditionModel state dict -> ``model.diffusion_model.*`` keys."""
    sd = unet.state_dict()
    layers = unet.config.layers_per_block
    has_up_attn = [hasattr(b, "attentions") for b in unet.up_blocks]
    out: StateDict = {}

    def put(key: str, value: torch.Tensor) -> None:
        out["model.diffusion_model." + key] = value

    for key, value in sd.items():
        parts = key.split(".")
        module = ".".join(parts[:-1])
        if module in _UNET_TOP:
            put(f"{_UNET_TOP[module]}.{parts[-1]}", value)
        elif parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.*
                put(f"input_blocks.{(layers + 1) * (i + 1)}.0.op.{'.'.join(parts[5:])}", value)
                continue
            j = int(parts[3])
            block = (layers + 1) * i + j + 1
            if kind == "resnets":
                put(f"input_blocks.{block}.0.{_rename_resnet(rest)}", value)
            else:
                put(f"input_blocks.{block}.1.{rest}", value)
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                put(f"middle_block.{2 * j}.{_rename_resnet(rest)}", value)
            else:
                put(f"middle_block.1.{rest}", value)
        elif parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "upsamplers":  # up_blocks.i.upsamplers.0.conv.*
                block = (layers + 1) * i + layers
                put(f"output_blocks.{block}.{2 if has_up_attn[i] else 1}.{rest}", value)
                continue
            j = int(parts[3])
            block = (layers + 1) * i + j
            if kind == "resnets":
                put(f"output_blocks.{block}.0.{_rename_resnet(rest)}", value)
            else:
                put(f"output_blocks.{block}.1.{rest}", value)
        else:
            raise KeyError(f"unexpected UNet key {key!r}")
    return out


_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def vae_to_original(vae) -> StateDict:
    """AutoencoderKL state dict -> ``first_stage_model.*`` keys (attention projections as 1x1 convs)."""
    n_up = len(vae.config.up_block_types)
    out: StateDict = {}
    for key, value in vae.state_dict().items():
        new = key
        for d, o in (("conv_norm_out", "norm_out"), ("conv_shortcut", "nin_shortcut")):
            new = new.replace(d, o)
        parts = new.split(".")
        if parts[0] in ("encoder", "decoder") and parts[1] == "down_blocks":
            i = parts[2]
            if parts[3] == "resnets":
                new = f"{parts[0]}.down.{i}.block.{'.'.join(parts[4:])}"
            else:  # downsamplers.0.conv.*
                new = f"{parts[0]}.down.{i}.downsample.{'.'.join(parts[5:])}"
        elif parts[0] in ("encoder", "decoder") and parts[1] == "up_blocks":
            i = n_up - 1 - int(parts[2])
            if parts[3] == "resnets":
                new = f"{parts[0]}.up.{i}.block.{'.'.join(parts[4:])}"
            else:
                new = f"{parts[0]}.up.{i}.upsample.{'.'.join(parts[5:])}"
        elif parts[0] in ("encoder", "decoder") and parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
            else:  # attentions.0.*
                rest = ".".join(parts[4:])
                for d, o in _VAE_ATTN:
                    if rest.startswith(d):
                        rest = o + rest[len(d):]
                        break
                new = f"{parts[0]}.mid.attn_1.{rest}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_to_original(text_encoder, prefix: str) -> StateDict:
    """CLIPTextModel (HF layout) -> ``<prefix>text_model.*`` keys, e.g. prefix ``cond_stage_model.transformer.``."""
    out: StateDict = {}
    for key, value in text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + key] = value
    return out


_OPEN_CLIP_LAYER = [
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
]


def open_clip_to_original(text_encoder, prefix: str) -> StateDict:
    """CLIPTextModel(WithProjection) (HF layout) -> OpenCLIP keys under ``prefix`` (e.g. ``cond_stage_model.model.``)."""
    sd = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in text_encoder.state_dict().items()}
    out: StateDict = {}
    for key, value in sd.items():
        if key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.split(".")[-1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            parts = key.split(".")
            i, rest = parts[2], ".".join(parts[3:])
            base = f"{prefix}transformer.resblocks.{i}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                kind = rest.split(".")[-1]  # weight | bias
                if rest.startswith("self_attn.q_proj"):
                    pre = f"encoder.layers.{i}.self_attn."
                    out[base + f"attn.in_proj_{kind}"] = torch.cat(
                        [sd[pre + f"{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0
                    )
                continue
            for d, o in _OPEN_CLIP_LAYER:
                if rest.startswith(d):
                    rest = o + rest[len(d):]
                    break
            else:
                raise KeyError(f"unexpected text-encoder key {key!r}")
            out[base + rest] = value
        elif key == "embeddings.position_ids":
            continue
        else:
            raise KeyError(f"unexpected text-encoder key {key!r}")
    return out


def sd1_to_original(pipe) -> StateDict:
    """A StableDiffusionPipeline as one original-layout state dict (SD1.x: CLIP text encoder)."""
    return {
        **unet_to_original(pipe.unet),
        **vae_to_original(pipe.vae),
        **clip_to_original(pipe.text_encoder, "cond_stage_model.transformer."),
    }


def sdxl_to_original(pipe) -> StateDict:
    """A StableDiffusionXLPipeline as one original-layout state dict (two text encoders under ``conditioner``)."""
    return {
        **unet_to_original(pipe.unet),
        **vae_to_original(pipe.vae),
        **clip_to_original(pipe.text_encoder, "conditioner.embedders.0.transformer."),
        **open_clip_to_original(pipe.text_encoder_2, "conditioner.embedders.1.model."),
    }
