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
