"""Atomic file writes: write to a temp file in the same folder, fsync, then rename into place.

An interrupt (Ctrl-C, SIGKILL, ComfyUI's Cancel) leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

PathLike = Union[str, os.PathLike]


def _new_temp(path: Path) -> Path:
    """Create an empty temp file beside ``path`` with the mode a plain ``open()`` gives (0666 minus the umask).

    Not ``tempfile.mkstemp``: it makes 0600 files, and a LoRA another user (a ComfyUI in Docker on a shared volume)
    cannot read is a broken LoRA. ``O_EXCL`` keeps the name ours, as mkstemp does.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temp file beside {str(path)!r}")  # pragma: no cover


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it onto ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_temp(path)
    mode = os.stat(tmp_path).st_mode & 0o777
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)  # some writers (safetensors' save_file) replace the file with a 0600 one
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
