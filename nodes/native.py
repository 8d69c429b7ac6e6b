"""ReDiFinePipelineToNative: a REDIFINE_PIPELINE (e.g. the toy model) as ComfyUI's own MODEL, CLIP and VAE.

ComfyUI's checkpoint loaders recognise only the standard architectures, so the toy model (a small SD1.x-layout
diffusers model with its own word tokenizer) cannot go through CheckpointLoaderSimple or DiffusersLoader. This node
builds the native objects from the pipeline's weights instead: the UNet as an SD1.x ``BaseModel`` whose ldm config
is read from the diffusers config, the text encoder as an ``SDClipModel`` with the pipeline's own tokenizer, and the
VAE wrapped as a ``comfy.sd.VAE``. Stock nodes (LoraLoader, CLIPTextEncode, KSampler, VAEDecode, ...) then work on it.
For a real SD1.x/SDXL checkpoint use CheckpointLoaderSimple instead.
"""

from __future__ import annotations

import copy
from typing import Any

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


def _native_model(pipe):
    import torch

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    unet_config = ldm_unet_config(pipe.unet.config)
    model_config = comfy.supported_models.SD15(unet_config)
    model_config.unet_config.update({"num_heads": unet_config["num_heads"], "num_head_channels": -1})
    sched = getattr(pipe.scheduler, "config", {})
    model_config.sampling_settings = dict(model_config.sampling_settings, beta_schedule="linear",
                                          linear_start=float(sched.get("beta_start", 0.00085)),
                                          linear_end=float(sched.get("beta_end", 0.012)),
                                          timesteps=int(sched.get("num_train_timesteps", 1000)))
    model_config.latent_format.scale_factor = float(getattr(pipe.vae.config, "scaling_factor", 0.18215))
    model_config.set_inference_dtype(torch.float32, None)
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    src = {k: v.detach().to("cpu", torch.float32).clone() for k, v in pipe.unet.state_dict().items()}
    left_over = sorted(set(src) - set(mapping))  # the map lists every possible key; each real weight must be mapped
    if left_over:
        raise ValueError(f"the UNet does not match its SD1.x-layout config; unmapped weights {left_over[:3]}")
    sd = {mapping[k]: src[k] for k in mapping if k in src}
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


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


def _native_clip(pipe):
    import torch

    import comfy.sd
    import comfy.sd1_clip as sd1
    import comfy.supported_models_base

    te = pipe.text_encoder
    c = te.config
    tok = pipe.tokenizer
    config = {"num_hidden_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
              "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
              "hidden_act": c.hidden_act, "max_position_embeddings": c.max_position_embeddings,
              "vocab_size": c.vocab_size, "projection_dim": getattr(c, "projection_dim", c.hidden_size),
              "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    max_len = int(min(tok.model_max_length, c.max_position_embeddings))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    special = {"start": tok.bos_token_id, "end": tok.eos_token_id, "pad": pad}
    tokenizer_class = _PipelineTokenizer.bound_to(tok)
    width = c.hidden_size

    class TextModel(sd1.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
            super().__init__(device=device, dtype=dtype, max_length=max_len, layer="last",
                             textmodel_json_config=dict(config), special_tokens=dict(special),
                             return_projected_pooled=False, model_options=model_options)
            # ComfyUI's CLIPEmbeddings assumes the 49408-token CLIP vocabulary; size it for this tokenizer
            emb = self.transformer.text_model.embeddings
            emb.token_embedding = self.operations.Embedding(config["vocab_size"], width, dtype=dtype, device=device)

    class ClipModel(sd1.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=TextModel)

    class WordTokenizer(sd1.SDTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(tokenizer_path="redifine-pipeline-tokenizer", tokenizer_class=tokenizer_class,
                             max_length=max_len, pad_with_end=False,
                             embedding_directory=embedding_directory, embedding_size=width, embedding_key="clip_l",
                             tokenizer_data=tokenizer_data, pad_token=pad)

    class Tokenizer(sd1.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                             tokenizer=WordTokenizer)

    target = comfy.supported_models_base.ClipTarget(Tokenizer, ClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    sd = {}
    for k, v in te.state_dict().items():  # transformers 5 drops the "text_model." prefix ComfyUI's CLIP uses
        if not k.startswith(("text_model.", "text_projection")):
            k = "text_model." + k
        sd[k] = v.detach().to("cpu", torch.float32).clone()
    missing, _ = clip.load_sd(sd)
    bad = [k for k in missing if "text_projection" not in k and "position_ids" not in k]
    if bad:
        raise ValueError(f"text encoder weights do not fit ComfyUI's CLIP model; missing {bad[:3]}")
    return clip



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


def _native_vae(pipe):
    """A ``comfy.sd.VAE``. Standard SD VAEs go through the public constructor (``comfy.sd.VAE(sd=...)``, which
    converts diffusers keys itself). Any other layout (the toy's 16/32 channels with 8 norm groups) cannot be built by
    it (its GroupNorm has 32 groups hard-wired), so it is wrapped: a ``comfy.sd.VAE`` subclass that sets the attributes
    the stock constructor sets, around the diffusers module."""
    import torch

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    if public_vae_possible(pipe.vae.config):
        return comfy.sd.VAE(sd={k: v.detach().to("cpu", torch.float32) for k, v in pipe.vae.state_dict().items()})

    class DiffusersVAEModule(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def encode(self, x):
            return self.vae.encode(x).latent_dist.mode()

        def decode(self, z, **kw):
            return self.vae.decode(z).sample

    class DiffusersVAE(comfy.sd.VAE):
        """A ``comfy.sd.VAE`` around a diffusers AutoencoderKL (same attributes the stock constructor sets)."""

        def __init__(self, vae):
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            self.memory_used_encode = lambda shape, dtype: (1767 * shape[2] * shape[3]) * mm.dtype_size(dtype)
            self.memory_used_decode = lambda shape, dtype: (2178 * shape[2] * shape[3] * factor * factor) * mm.dtype_size(dtype)
            self.downscale_ratio = factor
            self.upscale_ratio = factor
            self.latent_channels = vae.config.latent_channels
            self.latent_dim = 2
            self.output_channels = 3
            self.process_input = lambda image: image * 2.0 - 1.0
            self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
            self.working_dtypes = [torch.float32]
            self.disable_offload = False
            self.not_video = True
            self.downscale_index_formula = None
            self.upscale_index_formula = None
            self.extra_1d_channel = None
            self.crop_input = True
            self.first_stage_model = DiffusersVAEModule(vae).eval()
            self.device = mm.vae_device()
            self.vae_dtype = torch.float32
            self.first_stage_model.to(self.vae_dtype)
            self.output_device = mm.intermediate_device()
            self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device,
                                                            offload_device=mm.vae_offload_device())

    vae = copy.deepcopy(pipe.vae).to("cpu", torch.float32)
    for p in vae.parameters():
        p.requires_grad_(False)
    return DiffusersVAE(vae)


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
            return (_native_model(pipeline), _native_clip(pipeline), _native_vae(pipeline))


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
