"""One progress callback type for every long operation, plus cooperative cancellation.

The core reports through a ``ProgressCallback``; the ComfyUI nodes map it to ``comfy.utils.ProgressBar``
(whose update is also ComfyUI's interrupt point) and the CLI maps it to tqdm.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol


@dataclass
class ProgressEvent:
    """One step of a long operation: ``phase`` names it ("train", "sample", "chain", ...)."""

    phase: str
    step: int
    total: int
    loss: Optional[float] = None
    eta_s: Optional[float] = None
    message: str = ""
    preview: Any = None  # optional image tensor [H, W, 3] in [0, 1] for UI previews
    extra: dict = field(default_factory=dict)


ProgressCallback = Callable[[ProgressEvent], None]


class CancelFlag(Protocol):
    """Anything with ``is_set()``: a ``threading.Event`` or :class:`CancelToken`."""

    def is_set(self) -> bool: ...


class CancelToken(threading.Event):
    """A settable cancel flag (a ``threading.Event``)."""


class Cancelled(Exception):
    """Raised inside the core when the caller's cancel flag is set; nothing partial is left on disk."""


def check_cancel(cancel: Optional[CancelFlag]) -> None:
    """Raise :class:`Cancelled` if ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled by the caller")


def report(progress: Optional[ProgressCallback], event: ProgressEvent) -> None:
    """Send ``event`` to ``progress`` if there is one."""
    if progress is not None:
        progress(event)
