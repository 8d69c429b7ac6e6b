"""A ``Pipeline`` whose modules use the very memory of an original-layout ("ckpt") state dict: no weight is copied.

The caller (in ComfyUI: ``nodes/native.py``) hands over the tensors another program already holds, keyed as in an
original SD1.x single file (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.text_model.*``). Each module is built on the meta device, diffusers' own
original->diffusers converters rename the keys (the VAE's 1x1-conv attention weights become linear weights by
indexing, a view), and ``load_state_dict(assign=True)`` adopts the tensors. :func:`check_shared` then proves that every
parameter lies inside the memory of an input tensor.

Why a storage view (:func:`storage_view`) rather than the tensor itself: ComfyUI builds its models inside
``torch.inference_mode()``, so their weights are *inference tensors*, which autograd refuses to save for backward
("Inference tensors cannot be saved for backward"): a LoRA trained on top of them fails at the first step. A normal
tensor set on the same storage is exactly the same memory and trains fine; ``tests/test_share_weights.py`` fails if
torch ever lets inference tensors into autograd (then the view can go).

Only what shares safely is shared: SD1.x (the converters copy the fused q/k/v of OpenCLIP encoders, used by SD2.x and
SDXL), each module's weights in one float dtype of ``SHAREABLE_DTYPES``, all on one device, every expected weight
present. Each module keeps the dtype it came in (ComfyUI stores the text encoder in fp16 and the UNet in fp32 on a
CPU, for example); ``Pipeline.dtype`` is the UNet's. ``Pipeline.to(dtype=...)`` would cast, i.e. copy: move a shared
pipeline by device only (``nodes/gpu.py`` does). Anything else is one ``ValueError`` line that says why, so the caller
can load the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .clip_tokenizer import load_clip_tokenizer
from .single_file import (CONFIG_ROOT, _assign_weights, _load_scheduler, detect_architecture,
                          read_json)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
SHAREABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def storage_view(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference, no-grad) tensor over exactly the memory of ``t``: same storage, offset and strides."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(),
                                                               t.stride())


def _storage_ranges(tensors: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
    ranges = []
    for t in tensors.values():
        s = t.untyped_storage()
        ranges.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
    return ranges


def copied_parameters(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of ``module``'s parameters whose memory is *not* inside one of ``tensors``' storages."""
    ranges = _storage_ranges(tensors)
    out = []
    for name, p in module.named_parameters():
        start = p.data_ptr()
        end = start + p.numel() * p.element_size()
        if not any(lo <= start and end <= hi for lo, hi in ranges):
            out.append(name)
    return out


def check_shared(pipeline: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming the first weights that were copied instead of shared (none may be)."""
    for name in ("unet", "vae", "text_encoder"):
        bad = copied_parameters(getattr(pipeline, name), tensors)
        if bad:
            raise ValueError(f"{name}: {len(bad)} weights were copied instead of shared (e.g. {bad[:3]})")


def _part(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # the projection some checkpoints carry for the text encoder is not part of SD1's CLIPTextModel
    return {k: storage_view(v) for k, v in tensors.items() if k.startswith(prefix) and "text_projection" not in k}


def _dtype_of(tensors: Mapping[str, torch.Tensor], prefix: str, what: str) -> torch.dtype:
    dtypes = {v.dtype for k, v in tensors.items() if k.startswith(prefix) and v.is_floating_point()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in SHAREABLE_DTYPES:
        raise ValueError(f"the {what} weights are in {sorted(str(d) for d in dtypes)}; sharing needs one dtype of "
                         f"{[str(d) for d in SHAREABLE_DTYPES]}")
    return next(iter(dtypes))


def pipeline_from_original(
    tensors: Mapping[str, torch.Tensor],
    tokenizer_dir: Optional[str | Path] = None,
    prediction_type: Optional[str] = None,
    config_dir: Optional[str | Path] = None,
    source: str = "shared weights",
) -> Any:
    """A ``models.Pipeline`` (SD1.x) whose UNet, VAE and text encoder use ``tensors``' memory (see the docstring).

    ``tensors``: an original-layout state dict (keys as in an SD1.x single file; values may be inference tensors or
    Parameters). ``tokenizer_dir``: a folder with the CLIP BPE files (ComfyUI's ``comfy/sd1_tokenizer``).
    ``prediction_type``: "epsilon" or "v_prediction" (the weights cannot tell). Raises one-line ValueErrors for what
    cannot be shared (see the module docstring), before any module is built.
    """
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    from .models import PREDICTION_TYPES, Pipeline

    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
    kind = detect_architecture(tensors)
    if kind != "sd1":
        raise ValueError(f"the model is {kind}: sharing weights supports SD1.x only (the {kind} text-encoder "
                         "converter copies its fused attention weights); load the file instead")
    for prefix, what in ((VAE_PREFIX, "VAE"), (CLIP_PREFIX, "text encoder")):
        if not any(k.startswith(prefix) for k in tensors):
            raise ValueError(f"no {what} weights ({prefix}*) were given")
    unet_dtype = _dtype_of(tensors, UNET_PREFIX, "UNet")
    for prefix, what in ((CLIP_PREFIX, "text encoder"), (VAE_PREFIX, "VAE")):
        _dtype_of(tensors, prefix, what)  # each module keeps its own dtype (ComfyUI's may differ per module)
    cfg_dir = Path(config_dir).expanduser() if config_dir is not None else CONFIG_ROOT / kind
    vae_config = read_json(cfg_dir / "vae" / "config.json")
    devices = {str(v.device) for v in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"the weights are spread over devices {sorted(devices)}; sharing needs them on one device")
    device = torch.device(devices.pop())
    unet_config = read_json(cfg_dir / "unet" / "config.json")
    index = read_json(cfg_dir / "model_index.json")
    te_config = transformers.CLIPTextConfig.from_pretrained(str(cfg_dir / "text_encoder"), local_files_only=True)
    tokenizer = load_clip_tokenizer("tokenizer", te_config, cfg_dir, tokenizer_dir, Path(source))
    scheduler = _load_scheduler(cfg_dir, index, prediction_type)

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        te = transformers.CLIPTextModel(te_config)
    unet = _assign_weights(unet, convert_ldm_unet_checkpoint(_part(tensors, UNET_PREFIX), unet_config), "UNet",
                           Path(source))
    vae = _assign_weights(vae, convert_ldm_vae_checkpoint(_part(tensors, VAE_PREFIX), vae_config), "VAE",
                          Path(source))
    state = convert_ldm_clip_checkpoint(_part(tensors, CLIP_PREFIX), CLIP_PREFIX)
    if not hasattr(te, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    te = _assign_weights(te, state, "text encoder", Path(source))
    for m in (unet, vae, te):
        m.requires_grad_(False)
        for name, buf in list(m.named_buffers()):  # non-persistent buffers (position_ids) were built on the CPU
            if buf.device != device:
                owner = m.get_submodule(name.rpartition(".")[0]) if "." in name else m
                owner.register_buffer(name.rpartition(".")[2], buf.to(device), persistent=False)
    pipe = Pipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tokenizer, scheduler=scheduler, kind=kind,
                    source=source, device=device, dtype=unet_dtype)
    check_shared(pipe, tensors)
    return pipe
