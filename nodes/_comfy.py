"""The only place the node pack touches ComfyUI modules; every import is lazy so the nodes import without ComfyUI.

Outside ComfyUI (unit tests, plain Python) each helper degrades to a harmless fallback: no progress bar, never
interrupted, empty model lists.
"""

from __future__ import annotations

import os
from typing import Any, Optional


def folder_paths():
    """ComfyUI's ``folder_paths`` module, or None outside ComfyUI."""
    try:
        import folder_paths as fp
    except Exception:
        return None
    return fp


def filename_list(folder: str) -> list[str]:
    fp = folder_paths()
    if fp is None:
        return []
    try:
        return list(fp.get_filename_list(folder))
    except Exception:  # an unknown folder name
        return []


def folder_dirs(folder: str) -> list[str]:
    fp = folder_paths()
    if fp is None:
        return []
    try:
        return list(fp.get_folder_paths(folder))
    except Exception:
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
    try:
        import comfy
    except Exception:
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
    try:
        import comfy.model_management as mm

        return mm.InterruptProcessingException
    except Exception:
        return _StandaloneInterrupt


class _StandaloneInterrupt(Exception):
    """Raised for a cancelled run when ComfyUI is absent."""


def processing_interrupted() -> bool:
    try:
        import comfy.model_management as mm
    except Exception:
        return False
    return bool(mm.processing_interrupted())


def raise_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException (resetting its flag the way ComfyUI does)."""
    try:
        import comfy.model_management as mm
    except Exception:
        raise _StandaloneInterrupt("processing interrupted")
    mm.throw_exception_if_processing_interrupted()  # raises and clears the flag when it is set
    raise mm.InterruptProcessingException()


def progress_bar(total: int, node_id: Any = None):
    """A ``comfy.utils.ProgressBar`` or None outside ComfyUI."""
    try:
        import comfy.utils
    except Exception:
        return None
    return comfy.utils.ProgressBar(max(1, int(total)), node_id=node_id)


def patcher_extension():
    import comfy.patcher_extension

    return comfy.patcher_extension


def torch_device():
    """ComfyUI's compute device (respects --cpu), or None outside ComfyUI (the core then picks)."""
    try:
        import comfy.model_management as mm
    except Exception:
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
    try:
        import comfy.model_management as mm
    except Exception:
        return None
    return mm.unet_offload_device()


def free_memory(required_bytes: int, device: Any, evict: tuple = ()) -> None:
    """Ask ComfyUI to unload its own models until ``required_bytes`` are free on ``device`` (no-op outside ComfyUI).

    ``evict``: torch modules whose ComfyUI models must be unloaded whatever the free memory (the native models a
    shared-weights pipeline borrows its tensors from, so ComfyUI's bookkeeping never says "on the GPU" for weights we
    move). ``current_loaded_models`` is read only to build ``free_memory``'s own ``keep_loaded`` argument.
    """
    try:
        import comfy.model_management as mm
    except Exception:
        return
    if evict:
        roots = [id(m) for m in evict]
        keep = [lm for lm in list(mm.current_loaded_models) if id(getattr(lm.model, "model", None)) not in roots]
        mm.free_memory(1e30, device, keep_loaded=keep)
    mm.free_memory(int(required_bytes), device)


def empty_cache() -> None:
    """``soft_empty_cache()``: give cached accelerator memory back (no-op on CPU and outside ComfyUI)."""
    try:
        import comfy.model_management as mm
    except Exception:
        return
    mm.soft_empty_cache()


def minimum_inference_memory() -> int:
    """ComfyUI's reserve for activations (bytes), or 1 GiB outside ComfyUI."""
    try:
        import comfy.model_management as mm
    except Exception:
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
