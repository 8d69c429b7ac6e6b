"""The bridges between a REDIFINE_PIPELINE and ComfyUI's own MODEL, CLIP and VAE, both ways.

ReDiFinePipelineFromNative builds the pipeline over the stock loader's weight memory (the conversion is
``redifine_core.share_weights``; what ComfyUI holds is read in ``_comfy.native_sd1_tensors``).

ReDiFinePipelineToNative: a pipeline (e.g. the toy model) as ComfyUI's own MODEL, CLIP and VAE.

ComfyUI's checkpoint loaders recognise only the standard architectures, so the toy model (a small SD1.x-layout
diffusers model with its own word tokenizer) cannot go through CheckpointLoaderSimple or DiffusersLoader. This node
builds the native objects from the pipeline's weights instead: the UNet as an SD1.x ``BaseModel`` whose ldm config
is read from the diffusers config, the text encoder as an ``SDClipModel`` with the pipeline's own tokenizer, and the
VAE through ComfyUI's public ``comfy.sd.VAE(sd=...)`` where its layout allows, wrapped otherwise. This module
decides what is converted and how; the ComfyUI objects are built in ``_comfy`` (every ``comfy.*`` use lives there).
Stock nodes (LoraLoader, CLIPTextEncode, KSampler, VAEDecode, ...) then work on it.
For a real SD1.x/SDXL checkpoint use CheckpointLoaderSimple instead.
"""

from __future__ import annotations

import copy
from typing import Any

from . import _comfy
from .common import CATEGORY


def ldm_unet_config(cfg: Any) -> dict:
    """ComfyUI's (ldm) UNet config for a diffusers SD1.x-layout ``UNet2DConditionModel`` config."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    down = list(get("down_block_types"))
    up = list(get("up_block_types"))
    chans = list(get("block_out_channels"))
    lpb = get("layers_per_block", 2)
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * len(down)
    tl = get("transformer_layers_per_block", 1)
    tl = list(tl) if isinstance(tl, (list, tuple)) else [tl] * len(down)
    heads = get("attention_head_dim", 8)
    if isinstance(heads, (list, tuple)):
        if len(set(heads)) != 1:
            raise ValueError(f"attention_head_dim={heads!r}: per-block head counts are not supported here")
        heads = heads[0]
    if get("use_linear_projection", False) or get("addition_embed_type") is not None:
        raise ValueError("only SD1.x-layout UNets (no linear projection, no added embeddings) are supported; "
                         "load SD2/SDXL checkpoints with ComfyUI's CheckpointLoaderSimple")
    depth = []
    for i, t in enumerate(down):
        depth += [tl[i] if t.startswith("CrossAttn") else 0] * lpb[i]
    depth_out = []
    for i, t in enumerate(up):
        level = len(down) - 1 - i
        depth_out += [tl[level] if t.startswith("CrossAttn") else 0] * (lpb[level] + 1)
    depth_out.reverse()  # ComfyUI pops from the end, deepest output block first
    mid = get("mid_block_type", "UNetMidBlock2DCrossAttn")
    return {
        "use_checkpoint": False, "image_size": 32, "in_channels": get("in_channels", 4),
        "out_channels": get("out_channels", 4), "model_channels": chans[0], "num_res_blocks": lpb,
        "transformer_depth": depth, "transformer_depth_output": depth_out,
        "channel_mult": [c // chans[0] for c in chans],
        "transformer_depth_middle": tl[-1] if mid == "UNetMidBlock2DCrossAttn" else -1,
        "use_linear_in_transformer": False, "context_dim": get("cross_attention_dim"), "num_heads": heads,
        "num_head_channels": -1, "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


class _PipelineTokenizer:
    """A ``tokenizer_class`` for ComfyUI's SDTokenizer that hands over a copy of the pipeline's own tokenizer.

    SDTokenizer calls ``tokenizer_class.from_pretrained(tokenizer_path)``; answering with the tokenizer object
    itself means no tokenizer folder is ever written (a temp folder would outlive a server stopped with SIGTERM).
    """

    tokenizer: Any = None

    @classmethod
    def bound_to(cls, tokenizer: Any) -> type:
        return type("PipelineTokenizer", (cls,), {"tokenizer": tokenizer})

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        return copy.deepcopy(cls.tokenizer)


# The one VAE layout ComfyUI's public constructor builds from a state dict without a config (comfy.sd.VAE: 128 base
# channels, ch_mult 1,2,4,4, two resnets per level, and GroupNorm with 32 groups hard-wired in its Normalize()).
STANDARD_SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
                   "latent_channels": 4, "in_channels": 3, "out_channels": 3}


def public_vae_possible(config: Any) -> bool:
    """Whether ``comfy.sd.VAE(sd=...)`` (ComfyUI's public construction) builds this diffusers VAE exactly."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    return (all(list(get(k)) == v if isinstance(v, list) else get(k) == v for k, v in STANDARD_SD_VAE.items())
            and get("use_quant_conv", True) and get("use_post_quant_conv", True)
            and get("mid_block_add_attention", True))


def check_convertible(pipeline: Any) -> None:
    """ValueError (one line, naming the stock route) for what this bridge does not convert: SDXL, v-prediction and
    non-scaled_linear noise schedules. Those models are released as checkpoints that ComfyUI's own loader reads, so
    the route for them is CheckpointLoaderSimple (plus ReDiFine Pipeline from MODEL/CLIP/VAE for ReDiFine's nodes)."""
    if getattr(pipeline, "text_encoder_2", None) is not None:
        raise ValueError("SDXL pipelines are not supported by this node; load the checkpoint with "
                         "CheckpointLoaderSimple instead")
    sched = getattr(getattr(pipeline, "scheduler", None), "config", {}) or {}
    if sched.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"prediction_type={sched.get('prediction_type')!r}: only epsilon-prediction models are "
                         "supported by this node; load the checkpoint with CheckpointLoaderSimple instead")
    if sched.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError(f"beta_schedule={sched.get('beta_schedule')!r}: only scaled_linear is supported by this node; "
                         "load the checkpoint with CheckpointLoaderSimple instead")


class ReDiFinePipelineToNative:
    DESCRIPTION = ("Turns a ReDiFine pipeline into ComfyUI's own MODEL, CLIP and VAE, so stock nodes (LoraLoader, "
                   "CLIPTextEncode, KSampler, VAEDecode) work with the bundled toy model. SD1.x-layout models only; "
                   "for real checkpoints simply use CheckpointLoaderSimple.")
    CATEGORY = CATEGORY
    FUNCTION = "convert"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = ("The UNet as a native ComfyUI MODEL.", "The text encoder and tokenizer as a native CLIP.",
                       "The autoencoder as a native VAE.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipeline": ("REDIFINE_PIPELINE", {"tooltip": "The pipeline to convert (from ReDiFine Load Pipeline)."}),
        }}

    def convert(self, pipeline):
        import torch

        check_convertible(pipeline)
        with torch.inference_mode(False):
            return (_comfy.native_model(pipeline, ldm_unet_config(pipeline.unet.config)),
                    _comfy.native_clip(pipeline, _PipelineTokenizer.bound_to(pipeline.tokenizer)),
                    _comfy.native_vae(pipeline, public_vae_possible(pipeline.vae.config)))


NO_FALLBACK = "none (refuse)"


class ReDiFinePipelineFromNative:
    DESCRIPTION = ("Builds a ReDiFine pipeline from the stock Load Checkpoint's MODEL, CLIP and VAE without loading "
                   "the file again: the pipeline uses the very same weight memory (SD1.x models). Connect the "
                   "loader's own outputs, before any LoRA. Where sharing is unsafe (a LoRA-patched MODEL, a "
                   "partially loaded or fp8 model, SD2/SDXL) it refuses with the reason, or loads the 'fallback' "
                   "checkpoint instead.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("REDIFINE_PIPELINE", "STRING")
    RETURN_NAMES = ("pipeline", "how")
    OUTPUT_TOOLTIPS = ("The model for ReDiFine's training, generation and chain nodes.",
                       "'shared ...' when it uses the loader's weight memory, or why it loaded the fallback file.")

    @classmethod
    def INPUT_TYPES(cls):
        from .pipeline import model_choices

        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL output of Load Checkpoint (CheckpointLoaderSimple)."}),
            "clip": ("CLIP", {"tooltip": "The CLIP output of the same Load Checkpoint."}),
            "vae": ("VAE", {"tooltip": "The VAE output of the same Load Checkpoint."}),
            "fallback": ([NO_FALLBACK] + model_choices(), {"default": NO_FALLBACK, "tooltip":
                         "What to load when the weights cannot be shared: usually the same checkpoint the loader "
                         "reads. 'none (refuse)' stops with the reason instead."}),
        }}

    def __init__(self):
        from .pipeline import ReDiFineLoadPipeline

        self._loader = ReDiFineLoadPipeline()  # the fallback's cache, released like Load Pipeline's

    def build(self, model, clip, vae, fallback=NO_FALLBACK):
        import torch

        from redifine_core.share_weights import pipeline_from_original

        from . import _comfy
        from .gpu import mark_shared

        try:
            tensors, prediction = _comfy.native_sd1_tensors(model, clip, vae)
            device = _comfy.torch_device()
            if getattr(device, "type", None) == "cpu" and any(t.dtype == torch.float16 for t in tensors.values()):
                raise ValueError("some weights are float16, which a CPU runs about 3000x slower than bf16 (ComfyUI "
                                 "stores the text encoder in fp16 on a CPU: start it with --fp32-text-enc or "
                                 "--bf16-text-enc to share)")
            with torch.inference_mode(False):
                pipe = pipeline_from_original(tensors, tokenizer_dir=_comfy.sd1_tokenizer_dir(),
                                              prediction_type=prediction, source="ComfyUI MODEL/CLIP/VAE")
        except ValueError as e:
            reason = str(e).splitlines()[0]
            if fallback == NO_FALLBACK:
                raise ValueError(f"cannot share the loader's weights: {reason}. Set 'fallback' to the checkpoint to "
                                 "load it from the file instead") from None
            self._loader.release()
            pipe = self._loader.load(fallback, "auto")[0]
            return (pipe, f"loaded {fallback} from the file (not shared: {reason})")
        self._loader.release()
        mark_shared(pipe, _comfy.native_modules(model, clip, vae))
        mib = sum(t.numel() * t.element_size() for t in tensors.values()) / 2 ** 20
        return (pipe, f"shared: {len(tensors)} tensors ({mib:.0f} MiB) of the loader's weights, no copy")
