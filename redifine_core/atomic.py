"""Atomic file writes: write to a temp file in the same folder, fsync, then rename into place.

An interrupt (Ctrl-C, SIGKILL, ComfyUI's Cancel) leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

PathLike = Union[str, os.PathLike]

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it onto ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors(path: PathLike, tensors: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Save torch tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=dict(metadata) if metadata else None)


def save_png(path: PathLike, image: Any) -> None:
    """Save a PIL image as PNG, atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def clean_stale_temps(folder: PathLike) -> int:
    """Delete temp files left by a killed writer in ``folder`` (recursively); return how many."""
    n = 0
    for p in Path(folder).rglob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n
