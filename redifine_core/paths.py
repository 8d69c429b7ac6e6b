"""Checks of user-given paths, made before any work starts (shared by the CLI and the ComfyUI nodes).

Each check raises one line naming the setting and the path and saying what to do: ``ValueError`` for a path of the
wrong kind (a folder where a file was expected, a ``.txt`` plot), ``FileNotFoundError`` for a missing input or a
missing parent folder, ``PermissionError`` for a folder the user cannot write, ``FileExistsError`` for an output
folder that must be new or empty. Nothing here creates a folder: a missing parent of an output *file* is an error
(``--plot /nonexistent/dir/x.png`` must not create ``/nonexistent/dir``); an output *folder* may be created by the
caller later, when its nearest existing ancestor is a writable folder.

Writability is probed by creating and deleting a temp file, because ``os.access`` answers "yes" for root even on
a read-only mount or a kernel filesystem.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

__all__ = ["check_output_file", "check_output_dir", "check_input_file", "check_input_dir", "is_writable_dir"]


def _p(path: PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(path)))


def is_writable_dir(folder: PathLike) -> bool:
    """True when a file can be created in ``folder`` (probed: a temp file is made and deleted at once)."""
    folder = _p(folder)
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, tmp = tempfile.mkstemp(prefix=".redifine-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:
        pass
    return True


def check_output_file(path: PathLike, name: str, suffixes: Sequence[str] = (".png",)) -> Path:
    """An output file: the right suffix, not a folder, in an existing folder the user can write. Returns the path."""
    p = _p(path)
    want = " or ".join(suffixes)
    if suffixes and p.suffix.lower() not in tuple(s.lower() for s in suffixes):
        raise ValueError(f"{name} {str(path)!r}: expected a file name ending in {want}")
    if p.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a folder; give a file name ending in {want}")
    parent = p.parent
    if not parent.exists():
        raise FileNotFoundError(f"{name} {str(path)!r}: folder {str(parent)!r} does not exist; create it first or "
                                "choose another path")
    if not parent.is_dir():
        raise ValueError(f"{name} {str(path)!r}: {str(parent)!r} is not a folder")
    if p.exists() and not p.is_file():
        raise ValueError(f"{name} {str(path)!r} exists and is not a regular file; choose another path")
    if not is_writable_dir(parent):
        raise PermissionError(f"{name} {str(path)!r}: cannot write in folder {str(parent)!r}; choose a folder you "
                              "can write to")
    return p


def check_output_dir(path: PathLike, name: str, empty: bool = False, hint: Optional[str] = None) -> Path:
    """An output folder: an existing writable folder (empty when ``empty``), or a new one that can be created.

    ``hint`` ends the "exists and is not empty" message (default: "choose another folder").
    """
    p = _p(path)
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{name} {str(path)!r} is a file, not a folder; choose a folder")
        if empty and any(p.iterdir()):
            raise FileExistsError(f"{name} {str(path)!r} exists and is not empty; {hint or 'choose another folder'}")
        if not is_writable_dir(p):
            raise PermissionError(f"{name} {str(path)!r}: cannot write in this folder; choose a folder you can "
                                  "write to")
        return p
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{name} {str(path)!r}: {str(ancestor)!r} is a file, not a folder")
    if not is_writable_dir(ancestor):
        raise PermissionError(f"{name} {str(path)!r}: cannot create it, folder {str(ancestor)!r} is not writable; "
                              "choose a folder you can write to")
    return p


def check_input_file(path: PathLike, name: str, what: str = "a file") -> Path:
    """An existing, readable file (not a folder). ``what`` says what was expected, e.g. "a TOML file"."""
    p = _p(path)
    if not p.exists():
        raise FileNotFoundError(f"{name} {str(path)!r} does not exist; expected {what}")
    if p.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a folder; expected {what}")
    if not os.access(p, os.R_OK):
        raise PermissionError(f"{name} {str(path)!r} cannot be read; check its permissions")
    return p


def check_input_dir(path: PathLike, name: str, what: str = "a folder") -> Path:
    """An existing, readable folder."""
    p = _p(path)
    if not p.exists():
        raise FileNotFoundError(f"{name} {str(path)!r} does not exist; expected {what}")
    if not p.is_dir():
        raise ValueError(f"{name} {str(path)!r} is not a folder; expected {what}")
    if not os.access(p, os.R_OK | os.X_OK):
        raise PermissionError(f"{name} {str(path)!r} cannot be read; check its permissions")
    return p
