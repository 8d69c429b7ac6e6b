"""Prepare public Hugging Face image datasets as a captioned image folder (``<stem>.png`` + ``<stem>.txt``).

Two steps that are kept apart so the conversion can be tested without any download:

* :func:`convert_records` turns any iterable of row dicts (a ``datasets.Dataset``, a list of dicts, ...) into the
  folder format that ``data.CaptionedImages.from_folder`` reads;
* :func:`load_hf_dataset` downloads a dataset through the optional ``datasets`` library
  (``pip install .[datasets]``) and fails at once, with one clear line, when it is missing or the hub is offline.

Known datasets (:data:`KNOWN`) get their columns and caption recipe automatically:

* ``lambdalabs/pokemon-blip-captions``: image column ``image``, caption column ``text`` (BLIP captions);
* ``huggan/smithsonian_butterflies_subset``: image column ``image``; the caption is built from metadata by
  :func:`butterfly_caption`: ``"a photo of a <name> butterfly"`` (``name`` is the common name, else
  ``scientific_name``), plus ``", family <family>"`` when the ``taxonomy`` column names a family (``...idae``).

Any other dataset id works with ``image_column`` / ``caption_column`` given (defaults ``image`` / ``text``).
"""

from __future__ import annotations

import io
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import numpy as np

from .atomic import save_png, write_text
from .bounds import check as check_bound
from .paths import check_output_dir
from .progress import CancelFlag, ProgressCallback, ProgressEvent, check_cancel, report

HUB_HOST = "huggingface.co"
PROBE_TIMEOUT_S = 3.0
INSTALL_HINT = "pip install 'comfyui-redifine[datasets]' (or: pip install -e '.[datasets]')"


class DatasetUnavailable(RuntimeError):
    """The dataset cannot be fetched: the ``datasets`` extra is missing, the hub is offline, or the id is wrong."""


def butterfly_caption(row: Mapping[str, Any]) -> str:
    """Caption of a Smithsonian butterflies row: ``"a photo of a <name> butterfly[, family <family>]"``."""
    name = _clean(row.get("name")) or _clean(row.get("scientific_name"))
    caption = f"a photo of a {name} butterfly" if name else "a photo of a butterfly"
    family = next((t.strip() for t in str(row.get("taxonomy") or "").split(",") if t.strip().endswith("idae")), "")
    return f"{caption}, family {family}" if family else caption


def _clean(value: Any) -> str:
    return " ".join(str(value).split()) if value not in (None, "") else ""


@dataclass(frozen=True)
class DatasetRecipe:
    """How to read one dataset: its image column and either a caption column or a caption function."""

    image_column: str = "image"
    caption_column: Optional[str] = "text"
    caption_fn: Optional[Callable[[Mapping[str, Any]], str]] = None
    split: str = "train"


KNOWN: dict[str, DatasetRecipe] = {
    "lambdalabs/pokemon-blip-captions": DatasetRecipe("image", "text"),
    "huggan/smithsonian_butterflies_subset": DatasetRecipe("image", None, butterfly_caption),
}


def _to_pil(value: Any, index: int, column: str):
    from PIL import Image

    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, Mapping) and (value.get("bytes") or value.get("path")):
        img = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    elif isinstance(value, (bytes, bytearray)):
        img = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        img = Image.open(value)
    elif isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        arr = np.asarray(value)
        if arr.dtype != np.uint8:
            arr = np.clip(np.rint(arr.astype(np.float64) * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
    else:
        raise ValueError(f"row {index}: column {column!r} holds {type(value).__name__}, not an image")
    return img.convert("RGB")


def convert_records(
    records: Iterable[Mapping[str, Any]],
    out_dir: Union[str, os.PathLike],
    image_column: str = "image",
    caption_column: Optional[str] = "text",
    caption_fn: Optional[Callable[[Mapping[str, Any]], str]] = None,
    limit: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFlag] = None,
) -> int:
    """Write rows as ``<out_dir>/<index:06d>.png`` + ``.txt``; return how many were written.

    The caption is ``caption_fn(row)`` when given, else ``row[caption_column]``. Rows with an empty caption are
    written with an empty .txt. Raises ValueError naming the missing column (listing the row's columns).
    """
    if limit is not None:
        check_bound("download_limit", limit, "limit")
    if caption_fn is None and not caption_column:
        raise ValueError("caption_column=None needs a caption_fn")
    out = Path(out_dir)
    try:
        length: Optional[int] = len(records)  # type: ignore[arg-type]
    except TypeError:  # a streaming iterable
        length = None
    total = min(x for x in (limit, length) if x is not None) if (limit or length) else 0
    n = 0
    for index, row in enumerate(records):
        if limit is not None and n >= limit:
            break
        check_cancel(cancel)
        if image_column not in row:
            raise ValueError(f"image_column={image_column!r} is not a column; columns: {sorted(row)}")
        if caption_fn is None and caption_column not in row:
            raise ValueError(f"caption_column={caption_column!r} is not a column; columns: {sorted(row)}")
        caption = caption_fn(row) if caption_fn is not None else _clean(row[caption_column])
        stem = f"{index:06d}"
        save_png(out / f"{stem}.png", _to_pil(row[image_column], index, image_column))
        write_text(out / f"{stem}.txt", caption + "\n")
        n += 1
        report(progress, ProgressEvent(phase="dataset", step=n, total=total, message=f"{stem}: {caption[:60]}"))
    return n


def check_hub_reachable(host: str = HUB_HOST, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise DatasetUnavailable at once when offline mode is on or ``host`` cannot be reached."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            raise DatasetUnavailable(f"{var} is set: cannot download a dataset offline (unset it, or use a local folder)")
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            pass
    except OSError as e:
        raise DatasetUnavailable(f"cannot reach {host} ({e}); downloading a dataset needs network access") from None


def load_hf_dataset(name: str, split: str = "train"):
    """``datasets.load_dataset(name, split=split)``, with one-line errors for a missing extra, offline hub or bad id."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DatasetUnavailable(f"the 'datasets' library is not installed; install the extra: {INSTALL_HINT}") from None
    check_hub_reachable()
    from datasets import load_dataset

    try:
        return load_dataset(name, split=split)
    except (ConnectionError, TimeoutError, OSError) as e:
        raise DatasetUnavailable(f"could not download {name!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    except Exception as e:  # datasets raises its own types (DatasetNotFoundError, ValueError for a bad split, ...)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetUnavailable(f"could not load {name!r} (split {split!r}): {first}") from None


def prepare_dataset(
    name: str,
    out_dir: Union[str, os.PathLike],
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    split: Optional[str] = None,
    limit: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFlag] = None,
    loader: Callable[[str, str], Iterable[Mapping[str, Any]]] = load_hf_dataset,
) -> int:
    """Download dataset ``name`` and write it to ``out_dir`` as a captioned folder; return the number of images.

    Columns default to the :data:`KNOWN` recipe of ``name`` (else ``image``/``text``); an explicit
    ``caption_column`` replaces a recipe's caption function. ``out_dir`` must be empty or absent.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name={name!r} must be a dataset id such as 'lambdalabs/pokemon-blip-captions'")
    if limit is not None:
        check_bound("download_limit", limit, "limit")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir={str(out)!r} exists and is not an empty folder; choose a new folder")
    check_output_dir(out, "out_dir")  # writable (or creatable) before anything is downloaded
    recipe = KNOWN.get(name, DatasetRecipe())
    img_col = image_column or recipe.image_column
    cap_col = caption_column or recipe.caption_column
    cap_fn = None if caption_column else recipe.caption_fn
    records = loader(name, split or recipe.split)
    return convert_records(records, out, img_col, cap_col, cap_fn, limit=limit, progress=progress, cancel=cancel)
