"""Shared adapter pieces: safe names, progress and cancel bridging, image conversion, the wildcard socket type."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Iterator, Optional, Sequence

from . import _comfy

CATEGORY = "ReDiFine"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,99}$")


class AnyType(str):
    """A socket type that matches every input (ComfyUI compares types with ``!=``); used for names fed to combos."""

    def __ne__(self, other: object) -> bool:  # noqa: D401 - ComfyUI's validator relies on this
        return False

    __hash__ = str.__hash__


ANY = AnyType("*")


def name_error(name: Any, field: str = "name") -> Optional[str]:
    """Why ``name`` is not a safe file or folder name (None when it is fine)."""
    if not isinstance(name, str) or not name.strip():
        return f"{field} must be a non-empty name, got {name!r}"
    if "/" in name or "\\" in name or os.sep in name:
        return f"{field}={name!r} must not contain path separators; use a plain name like 'my_lora'"
    if ".." in name:
        return f"{field}={name!r} must not contain '..'"
    if not _NAME_RE.match(name.strip()):
        return (f"{field}={name!r} may only use letters, digits, space, '_', '-' and '.', start with a letter or digit, "
                f"and be at most 100 characters")
    return None


def safe_name(name: str, field: str = "name") -> str:
    """``name`` stripped, or ValueError when it is unsafe (see :func:`name_error`)."""
    err = name_error(name, field)
    if err:
        raise ValueError(err)
    return name.strip()


def path_inside(root: str, *parts: str) -> str:
    """``root/parts`` resolved, or ValueError if the result is not inside ``root`` (symlinks resolved too)."""
    root_real = os.path.realpath(root)
    target = os.path.realpath(os.path.join(root_real, *parts))
    if os.path.commonpath([root_real, target]) != root_real or target == root_real:
        raise ValueError(f"refusing to write {os.path.join(*parts)!r}: it resolves outside {root_real}")
    return target


class ComfyCancel:
    """The core's cancel flag, set while ComfyUI's Cancel (``/interrupt``) is pending."""

    def is_set(self) -> bool:
        return _comfy.processing_interrupted()


class ProgressAdapter:
    """Maps the core's ProgressEvent to a ComfyUI ProgressBar (also ComfyUI's interrupt point), with previews."""

    def __init__(self, node_id: Any = None, phases: Optional[Sequence[str]] = None):
        self.node_id = node_id
        self.phases = tuple(phases) if phases else None
        self._bar = None
        self._total = None
        self.events = 0

    def __call__(self, event: Any) -> None:
        self.events += 1
        if _comfy.processing_interrupted():
            # Raise the core's own Cancelled (not ComfyUI's exception from inside ProgressBar), so the core marks a
            # chain "cancelled" (resumable); comfy_cancellation() turns it into InterruptProcessingException.
            from redifine_core.progress import Cancelled

            raise Cancelled("interrupted in ComfyUI")
        if self.phases is not None and getattr(event, "phase", None) not in self.phases:
            return
        total = max(1, int(getattr(event, "total", 1) or 1))
        if self._bar is None or self._total != total:
            self._bar = _comfy.progress_bar(total, self.node_id)
            self._total = total
        if self._bar is None:
            return
        preview = None
        pic = getattr(event, "preview", None)
        if pic is not None:
            try:
                preview = ("JPEG", tensor_to_pil(pic), 256)
            except Exception:
                preview = None
        self._bar.update_absolute(min(int(event.step), total), total, preview)


@contextlib.contextmanager
def comfy_cancellation() -> Iterator[None]:
    """Turn the core's ``Cancelled`` into ComfyUI's ``InterruptProcessingException`` (never swallowed)."""
    from redifine_core.progress import Cancelled

    try:
        yield
    except Cancelled:
        _comfy.raise_interrupted()


def tensor_to_pil(image: Any):
    """One image [H, W, 3] (or [1, H, W, 3]) in [0, 1] as a PIL image."""
    import numpy as np
    from PIL import Image

    t = image
    if hasattr(t, "detach"):
        t = t.detach().float().cpu().numpy()
    arr = np.asarray(t, dtype=np.float32)
    if arr.ndim == 4:
        arr = arr[0]
    return Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)).convert("RGB")


def pils_to_tensor(images: Sequence[Any], size: Optional[tuple[int, int]] = None):
    """PIL images as one IMAGE batch [N, H, W, 3] float32 in [0, 1]; resized to ``size`` (or the first's size)."""
    import numpy as np
    import torch

    if not images:
        raise ValueError("no images to convert")
    w, h = size or images[0].size
    arrs = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (w, h):
            im = im.resize((w, h))
        arrs.append(np.asarray(im, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrs))


def lines(text: str) -> list[str]:
    """Non-empty stripped lines of a multiline widget."""
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip()]


def schedule_error(spec: Any, field: str = "schedule") -> Optional[str]:
    """Why ``spec`` is not a valid CFG schedule (None when it parses)."""
    from redifine_core.guidance import parse_schedule

    try:
        parse_schedule(spec)
    except ValueError as e:  # the first line names the spec, the argument and the character
        return f"{field}={spec!r}: {str(e).splitlines()[0]}"
    return None


def bound_error(key: str, value: Any, name: str, zero_means_default: bool = False) -> Optional[str]:
    """Why ``value`` is outside the documented bound ``key`` of ``redifine_core.bounds`` (None when it is fine).

    ``None`` (a widget fed by a link) passes here and is checked when the node runs. ``zero_means_default``: 0 is
    the widget's "use the model's own" value (width, height, resolution).
    """
    from redifine_core import bounds

    if value is None or (zero_means_default and value == 0 and not isinstance(value, bool)):
        return None
    if not bounds.in_bounds(key, value):
        allowed = bounds.BOUNDS[key].allowed + (" (or 0 for the model's own)" if zero_means_default else "")
        return f"{name}={value!r} must be {allowed}"
    return None


def widget(key: str, default: Any, tooltip: str, zero_means_default: bool = False, **extra: Any) -> dict:
    """Widget options whose min/max are the documented bounds (ComfyUI skips its own min/max check for an input
    that VALIDATE_INPUTS takes, so VALIDATE_INPUTS checks :func:`bound_error` with the same table)."""
    from redifine_core import bounds

    b = bounds.BOUNDS[key]
    opts = {"default": default, "min": 0 if zero_means_default else b.lo, "max": b.hi, "tooltip": tooltip}
    if b.integer and b.multiple > 1:
        opts["step"] = b.multiple
    opts.update(extra)
    return opts


def first_error(*errors: Optional[str]) -> Any:
    """The first error message, or True (VALIDATE_INPUTS' "valid")."""
    return next((e for e in errors if e), True)


def run_checks(result: Any) -> None:
    """At run time, raise the VALIDATE_INPUTS message for values that arrived through links (one line)."""
    if result is not True:
        raise ValueError(str(result))
