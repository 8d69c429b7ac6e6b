"""Sharing the accelerator with ComfyUI: before a node's heavy work ComfyUI frees what we need, afterwards our modules
go to ComfyUI's offload device (unless the user ticks ``keep_loaded``).

A ``REDIFINE_PIPELINE`` is plain torch modules that ``comfy.model_management`` does not track, so the nodes follow
ComfyUI's "simple" pattern for such models (as its upscale-model node does): ``free_memory(bytes, device)`` evicts
ComfyUI's own models until the weights plus a working reserve fit, the modules move to the device, the work runs, and
the modules go back to ``unet_offload_device()`` followed by ``soft_empty_cache()``. A pipeline built from ComfyUI's
own MODEL/CLIP/VAE (shared weight tensors, see ``nodes/native.py``) additionally has those native models unloaded
first: they hold the very same Parameter objects, so ComfyUI must not believe them loaded while we move them.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

from . import _comfy

KEEP_LOADED_TOOLTIP = ("Keep the model on the GPU after this node (faster when the next ReDiFine node uses it at "
                       "once). Off: it goes to ComfyUI's offload device (normally system RAM) and the GPU cache is "
                       "emptied, so ComfyUI's own models get the memory back.")

# id(pipeline) -> (the ComfyUI torch modules it shares weight memory with, [(our parameter, its shared host tensor)])
_SHARED: dict[int, tuple[tuple, list]] = {}


def mark_shared(pipeline: Any, native_modules: tuple) -> None:
    """Record that ``pipeline``'s parameters use the memory of ``native_modules`` (forgotten with the pipeline).

    The shared host tensors are remembered so that :func:`park` points the parameters back at them instead of
    copying the weights to the offload device (``Module.to`` would allocate new host memory: a second copy).
    """
    key = id(pipeline)
    host = [(p, p.data) for m in pipeline.modules() for p in m.parameters()]
    _SHARED[key] = (tuple(native_modules), host)
    weakref.finalize(pipeline, _SHARED.pop, key, None)


def shared_with(pipeline: Any) -> tuple:
    """The ComfyUI modules ``pipeline`` shares weights with (empty for a pipeline loaded from a file)."""
    return _SHARED.get(id(pipeline), ((), []))[0]


def weight_bytes(pipeline: Any) -> int:
    """Bytes of every parameter and buffer of the pipeline's modules (each tensor counted once)."""
    seen, total = set(), 0
    for module in pipeline.modules():
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def park(pipeline: Any) -> None:
    """Move the pipeline to ComfyUI's offload device and empty the accelerator cache (no-op outside ComfyUI)."""
    off = _comfy.offload_device()
    host = _SHARED.get(id(pipeline), ((), []))[1]
    if off is not None and host:
        for param, tensor in host:  # frozen base weights: the shared host memory still holds their values
            if param.data.data_ptr() != tensor.data_ptr():
                param.data = tensor
        for module in pipeline.modules():  # buffers only: the parameters are in place already
            module.to(off)
        pipeline.device = off
    elif off is not None:
        pipeline.to(off)
    _comfy.empty_cache()


def _to_device(pipeline: Any, device: Any) -> None:
    """``Pipeline.to(device)``; a shared pipeline moves by device only (its modules keep their own dtypes: a cast
    would copy the shared weights)."""
    if id(pipeline) in _SHARED:
        for module in pipeline.modules():
            module.to(device)
        pipeline.device = device
    else:
        pipeline.to(device)


@contextlib.contextmanager
def on_device(pipeline: Any, keep_loaded: bool = False, reserve_bytes: int | None = None) -> Iterator[Any]:
    """Run a block of heavy work with ``pipeline`` on ComfyUI's compute device (see the module docstring).

    ``reserve_bytes``: working memory on top of the weights (default: ComfyUI's minimum inference reserve). The
    pipeline is parked again even when the block raises (an out-of-memory error, a Cancel), unless ``keep_loaded``.
    Outside ComfyUI nothing moves: the core keeps the pipeline where it is.
    """
    device = _comfy.torch_device()
    if device is None:
        yield pipeline
        return
    reserve = _comfy.minimum_inference_memory() if reserve_bytes is None else int(reserve_bytes)
    _comfy.free_memory(weight_bytes(pipeline) + reserve, device, evict=shared_with(pipeline))
    try:
        _to_device(pipeline, device)
        yield pipeline
    finally:
        if not keep_loaded:
            park(pipeline)
