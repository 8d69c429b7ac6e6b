"""ReDiFineLoadPipeline: the bundled toy model, a ComfyUI checkpoint or a diffusers folder as a REDIFINE_PIPELINE."""

from __future__ import annotations

import os
from typing import Any

from . import _comfy
from .common import CATEGORY
from .gpu import park

TOY = "toy (bundled)"
CKPT_PREFIX = "checkpoints/"
DIFFUSERS_PREFIX = "diffusers/"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def diffusers_folders() -> list[str]:
    """Sub-folders of ComfyUI's ``diffusers`` model folders that hold a ``model_index.json``."""
    found = []
    for base in _comfy.folder_dirs("diffusers"):
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            if "model_index.json" in files:
                found.append(os.path.relpath(root, base).replace(os.sep, "/"))
                dirs[:] = []
    return sorted(set(found))


def model_choices() -> list[str]:
    return ([TOY] + [CKPT_PREFIX + n for n in _comfy.filename_list("checkpoints")]
            + [DIFFUSERS_PREFIX + n for n in diffusers_folders()])


def resolve_source(choice: str) -> tuple[str, Any]:
    """The ``load_pipeline`` source and tokenizer_dir for a combo choice; ValueError for unknown ones."""
    if choice == TOY:
        return "toy", None
    if choice.startswith(CKPT_PREFIX):
        path = _comfy.full_path("checkpoints", choice[len(CKPT_PREFIX):])
        if path is None:
            raise ValueError(f"model={choice!r}: no such file in ComfyUI's checkpoints folders")
        return path, _comfy.sd1_tokenizer_dir()
    if choice.startswith(DIFFUSERS_PREFIX):
        rel = choice[len(DIFFUSERS_PREFIX):]
        for base in _comfy.folder_dirs("diffusers"):
            cand = os.path.realpath(os.path.join(base, rel))
            if os.path.commonpath([os.path.realpath(base), cand]) == os.path.realpath(base) and \
                    os.path.isfile(os.path.join(cand, "model_index.json")):
                return cand, None
        raise ValueError(f"model={choice!r}: no such diffusers folder (needs model_index.json) in ComfyUI's diffusers folders")
    raise ValueError(f"model={choice!r} is not one of: {TOY!r}, 'checkpoints/<file>', 'diffusers/<folder>'")


def precision_error(precision: str):
    """Why ``precision`` cannot run on ComfyUI's device (fp16 on a CPU, bf16 on an old GPU), or None."""
    try:
        from redifine_core.models import resolve_dtype
    except ImportError:
        return None
    device = _comfy.torch_device()
    if device is not None and getattr(device, "type", None) not in ("cpu", "cuda", "mps"):
        return None  # e.g. DirectML: the loader decides
    try:
        resolve_dtype(precision, device)
    except ValueError as e:
        return f"precision: {str(e).splitlines()[0]}"
    return None


def _dtype(precision: str):
    import torch

    return {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class ReDiFineLoadPipeline:
    DESCRIPTION = ("Loads a text-to-image model for ReDiFine's training, generation and chain nodes: the bundled toy "
                   "model (tiny, runs on CPU), a single-file SD1.x/SD2.x/SDXL checkpoint from ComfyUI's checkpoints "
                   "folder, or a diffusers folder from ComfyUI's diffusers folder. Offline; loaded once and cached.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("REDIFINE_PIPELINE",)
    RETURN_NAMES = ("pipeline",)
    OUTPUT_TOOLTIPS = ("The loaded model (UNet, VAE, text encoder(s), tokenizer, noise scheduler) for ReDiFine nodes.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (model_choices(), {"default": TOY, "tooltip":
                      "Which model: 'toy (bundled)', a checkpoints/<file> (single-file SD1.x/SD2.x/SDXL) or a "
                      "diffusers/<folder> (a diffusers model folder with model_index.json)."}),
            "precision": (list(PRECISIONS), {"default": "auto", "tooltip":
                          "Weight dtype of the loaded model; auto lets the loader pick for the device (fp32 on CPU)."}),
        }, "optional": {
            "keep_loaded": ("BOOLEAN", {"default": False, "tooltip":
                            "Keep the loaded model on the GPU. Off: it is loaded on the GPU, then parked on ComfyUI's "
                            "offload device (normally system RAM) until a ReDiFine node needs it."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model, precision):
        if precision not in PRECISIONS:
            return f"precision={precision!r} must be one of {PRECISIONS}"
        if not isinstance(model, str) or not (model == TOY or model.startswith(CKPT_PREFIX) or model.startswith(DIFFUSERS_PREFIX)):
            return f"model={model!r} is not one of: {TOY!r}, 'checkpoints/<file>', 'diffusers/<folder>'"
        if model != TOY and model not in model_choices():
            return f"model={model!r} was not found; put the file in ComfyUI's models/checkpoints or models/diffusers"
        return precision_error(precision) or True

    def __init__(self):
        # (source, precision, mtime) -> pipeline: only the pipeline this node was last asked for; a changed choice
        # releases the old one (parked first, so its GPU memory is free before the new one loads)
        self._cache: tuple[Any, Any] | None = None

    def release(self) -> None:
        """Forget the cached pipeline, moving it off the GPU first (ComfyUI may still hold it until its cache
        moves on, so it is parked, not destroyed)."""
        if self._cache is not None:
            old, self._cache = self._cache[1], None
            park(old)

    def load(self, model, precision, keep_loaded=False):
        import torch

        from redifine_core.models import load_pipeline

        err = precision_error(precision)
        if err:
            raise ValueError(err)
        source, tok = resolve_source(model)
        mtime = os.path.getmtime(source) if os.path.exists(source) else None
        key = (source, precision, mtime)
        if self._cache is not None and self._cache[0] == key:
            pipe = self._cache[1]
            if not keep_loaded:
                park(pipe)
            return (pipe,)
        self.release()
        device = _comfy.torch_device()
        if device is not None:
            size = os.path.getsize(source) if os.path.isfile(source) else 0  # about the weights it brings in
            _comfy.free_memory(size + _comfy.minimum_inference_memory(), device)
        with torch.inference_mode(False):  # weights made here must be usable by autograd in the training node
            pipe = load_pipeline(source, device=device, dtype=_dtype(precision), tokenizer_dir=tok)
        if not keep_loaded:
            park(pipe)
        self._cache = (key, pipe)
        return (pipe,)
