"""The only place the node pack touches ComfyUI modules; every import is lazy so the nodes import without ComfyUI.

Outside ComfyUI (unit tests, plain Python) each helper degrades to a harmless fallback: no progress bar, never
interrupted, empty model lists.
"""

from __future__ import annotations

import copy
import importlib
import os
from typing import Any, Optional


def _optional(module: str):
    """The ComfyUI module ``module``, or None when it is absent (outside ComfyUI). Only its absence is caught: an
    error raised while ComfyUI's module imports shows as itself."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            return None
        raise


def folder_paths():
    """ComfyUI's ``folder_paths`` module, or None outside ComfyUI."""
    return _optional("folder_paths")


def filename_list(folder: str) -> list[str]:
    fp = folder_paths()
    if fp is None:
        return []
    try:
        return list(fp.get_filename_list(folder))
    except KeyError:  # a folder name this ComfyUI does not know
        return []


def folder_dirs(folder: str) -> list[str]:
    fp = folder_paths()
    if fp is None:
        return []
    try:
        return list(fp.get_folder_paths(folder))
    except KeyError:  # a folder name this ComfyUI does not know
        return []


def full_path(folder: str, name: str) -> Optional[str]:
    fp = folder_paths()
    return None if fp is None else fp.get_full_path(folder, name)


def output_directory() -> str:
    fp = folder_paths()
    return os.path.abspath("output") if fp is None else fp.get_output_directory()


def input_directory() -> str:
    fp = folder_paths()
    return os.path.abspath("input") if fp is None else fp.get_input_directory()


def temp_directory() -> str:
    fp = folder_paths()
    return os.path.abspath("temp") if fp is None else fp.get_temp_directory()


def sd1_tokenizer_dir() -> Optional[str]:
    """ComfyUI's bundled CLIP BPE tokenizer files (``comfy/sd1_tokenizer``), used for single-file checkpoints."""
    comfy = _optional("comfy")
    if comfy is None:
        return None
    # ``comfy`` has no __init__.py in ComfyUI 0.3.x: a namespace package, whose __file__ is None. Its __path__ lists
    # the folder(s) it lives in, for regular and namespace packages alike.
    roots = list(getattr(comfy, "__path__", None) or [])
    if not roots and getattr(comfy, "__file__", None):
        roots = [os.path.dirname(comfy.__file__)]
    for root in roots:
        path = os.path.join(os.path.realpath(root), "sd1_tokenizer")
        if os.path.isdir(path):
            return path
    return None


def interrupt_exception_type() -> type:
    """``comfy.model_management.InterruptProcessingException`` (or a stand-in outside ComfyUI)."""
    mm = _optional("comfy.model_management")
    return _StandaloneInterrupt if mm is None else mm.InterruptProcessingException


class _StandaloneInterrupt(Exception):
    """Raised for a cancelled run when ComfyUI is absent."""


def processing_interrupted() -> bool:
    mm = _optional("comfy.model_management")
    if mm is None:
        return False
    return bool(mm.processing_interrupted())


def raise_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException (resetting its flag the way ComfyUI does)."""
    mm = _optional("comfy.model_management")
    if mm is None:
        raise _StandaloneInterrupt("processing interrupted")
    mm.throw_exception_if_processing_interrupted()  # raises and clears the flag when it is set
    raise mm.InterruptProcessingException()


def progress_bar(total: int, node_id: Any = None):
    """A ``comfy.utils.ProgressBar`` or None outside ComfyUI."""
    utils = _optional("comfy.utils")
    if utils is None:
        return None
    return utils.ProgressBar(max(1, int(total)), node_id=node_id)


def patcher_extension():
    import comfy.patcher_extension

    return comfy.patcher_extension


def torch_device():
    """ComfyUI's compute device (respects --cpu), or None outside ComfyUI (the core then picks)."""
    mm = _optional("comfy.model_management")
    if mm is None:
        return None
    return mm.get_torch_device()


def loras_directory() -> str:
    """The first of ComfyUI's ``loras`` folders (where trained LoRAs are saved so LoraLoader lists them)."""
    dirs = folder_dirs("loras")
    if not dirs:
        raise RuntimeError("ComfyUI's folder_paths has no 'loras' folder; is this running inside ComfyUI?")
    return dirs[0]


# --- memory: ComfyUI's model management (public functions of comfy.model_management only) ---


def offload_device():
    """Where ComfyUI parks models between uses (``unet_offload_device()``), or None outside ComfyUI."""
    mm = _optional("comfy.model_management")
    if mm is None:
        return None
    return mm.unet_offload_device()


def free_memory(required_bytes: int, device: Any, evict: tuple = ()) -> None:
    """Ask ComfyUI to unload its own models until ``required_bytes`` are free on ``device`` (no-op outside ComfyUI).

    ``evict``: torch modules whose ComfyUI models must be unloaded whatever the free memory (the native models a
    shared-weights pipeline borrows its tensors from, so ComfyUI's bookkeeping never says "on the GPU" for weights we
    move). ``current_loaded_models`` is read only to build ``free_memory``'s own ``keep_loaded`` argument.
    """
    mm = _optional("comfy.model_management")
    if mm is None:
        return
    if evict:
        roots = [id(m) for m in evict]
        keep = [lm for lm in list(mm.current_loaded_models) if id(getattr(lm.model, "model", None)) not in roots]
        mm.free_memory(1e30, device, keep_loaded=keep)
    mm.free_memory(int(required_bytes), device)


def empty_cache() -> None:
    """``soft_empty_cache()``: give cached accelerator memory back (no-op on CPU and outside ComfyUI)."""
    mm = _optional("comfy.model_management")
    if mm is None:
        return
    mm.soft_empty_cache()


def minimum_inference_memory() -> int:
    """ComfyUI's reserve for activations (bytes), or 1 GiB outside ComfyUI."""
    mm = _optional("comfy.model_management")
    if mm is None:
        return 1 << 30
    return int(mm.minimum_inference_memory())


# --- native MODEL / CLIP / VAE objects (attributes of ComfyUI 0.3.x's ModelPatcher, CLIP and VAE) ---


def native_modules(model: Any, clip: Any, vae: Any) -> tuple:
    """The torch modules behind a MODEL, CLIP and VAE (what ComfyUI's model management loads and unloads)."""
    return (model.model, clip.patcher.model, vae.patcher.model)


def native_sd1_tensors(model: Any, clip: Any, vae: Any) -> tuple[dict, str]:
    """The weights of a stock loader's SD1.x MODEL, CLIP and VAE as one original-layout state dict (the tensors
    themselves, not copies) and the prediction type; ValueError (one line) where sharing them is unsafe:

    - weight patches on the MODEL or CLIP (LoraLoader and friends): a loaded patched model has its weights replaced;
    - a MODEL loaded partially (lowvram): some weights live elsewhere or are cast on the fly;
    - (in ``share_weights``) weights in a dtype torch modules cannot compute in (fp8); ComfyUI's manual cast
      (weights stored in bf16, computed in fp32) is fine: the stored tensors are what we share;
    - a model type other than epsilon or v prediction, or a CLIP that is not SD1.x's single clip_l.

    ComfyUI is first asked to unload these models (they go to their offload device, unpatched).
    """
    for what, patcher in (("MODEL", model), ("CLIP", getattr(clip, "patcher", None))):
        if getattr(patcher, "patches", None):
            raise ValueError(f"the {what} has weight patches (e.g. from LoraLoader); connect the loader's own "
                             f"{what} (before any LoRA) to share its weights")
    base = model.model
    device = torch_device()
    if device is not None:
        free_memory(0, device, evict=native_modules(model, clip, vae))
    if getattr(base, "model_lowvram", False):
        raise ValueError("the MODEL is partially loaded (lowvram); its weights cannot be shared")
    model_type = getattr(getattr(base, "model_type", None), "name", None)
    prediction = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}.get(model_type)
    if prediction is None:
        raise ValueError(f"the MODEL's type is {model_type}; sharing supports epsilon and v-prediction models")
    clip_sd = clip.cond_stage_model.state_dict()
    others = sorted({k.split(".", 1)[0] for k in clip_sd if not k.startswith("clip_l.")})
    if others:
        raise ValueError(f"the CLIP holds {others} besides clip_l: not an SD1.x model; sharing supports SD1.x only")
    tensors = {"model.diffusion_model." + k: v for k, v in base.diffusion_model.state_dict().items()}
    tensors.update({"cond_stage_model." + k[len("clip_l."):]: v for k, v in clip_sd.items()
                    if k.startswith("clip_l.transformer.")})
    tensors.update({"first_stage_model." + k: v for k, v in vae.first_stage_model.state_dict().items()})
    return tensors, prediction


# --- the Pipeline -> MODEL / CLIP / VAE bridge (nodes/native.py decides what is converted; this builds it) ---


def native_model(pipe: Any, unet_config: dict) -> Any:
    """The pipeline's UNet as an SD1.x ``ModelPatcher`` (ldm ``unet_config`` from ``nodes.native.ldm_unet_config``)."""
    import torch

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

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


def native_clip(pipe: Any, tokenizer_class: type) -> Any:
    """The pipeline's text encoder as a ``comfy.sd.CLIP`` whose tokenizer is ``tokenizer_class`` (see nodes.native)."""
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


def native_vae(pipe: Any, public: bool) -> Any:
    """A ``comfy.sd.VAE``. Standard SD VAEs go through the public constructor (``comfy.sd.VAE(sd=...)``, which
    converts diffusers keys itself). Any other layout (the toy's 16/32 channels with 8 norm groups) cannot be built by
    it (its GroupNorm has 32 groups hard-wired), so it is wrapped: a ``comfy.sd.VAE`` subclass that sets the attributes
    the stock constructor sets, around the diffusers module."""
    import torch

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    if public:
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
