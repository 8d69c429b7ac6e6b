"""The ``redifine chain`` TOML file: parse and validate it, and check everything it names before a model loads.

``parse_chain_toml`` validates every key and value (ValueError naming the key); ``check_job`` then checks what
needs the filesystem or torch (the model and dataset paths, the device and dtype) without loading anything;
``load_job_dataset`` / ``load_job_pipeline`` do the loading. Bounds come from :mod:`redifine_core.bounds`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from . import bounds
from .paths import check_input_dir, check_input_file

__all__ = ["ChainJob", "parse_chain_toml", "check_job", "resolve_device", "load_job_dataset", "load_job_pipeline"]


@dataclass(frozen=True)
class ChainJob:
    """A ``redifine chain`` TOML file, parsed and validated (nothing loaded yet)."""

    pipeline_source: str
    tokenizer_dir: Optional[str]
    device: Optional[str]
    dtype: Optional[str]
    dataset_source: str
    default_caption: Optional[str]
    dataset_limit: Optional[int]
    config: Any  # chain.ChainConfig


_TOP_KEYS = ("pipeline", "dataset", "chain", "train", "methods")
_PIPELINE_KEYS = {"source": str, "tokenizer_dir": str, "device": str, "dtype": str}
_DATASET_KEYS = {"source": str, "default_caption": str, "limit": int}
_DTYPES = ("float32", "float16", "bfloat16")


def _table(d: dict, name: str, spec: dict[str, type], required: Sequence[str]) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"[{name}] must be a table")
    for k, v in d.items():
        if k not in spec:
            raise ValueError(f"unknown key '{name}.{k}' (allowed: {', '.join(spec)})")
        if not isinstance(v, spec[k]) or isinstance(v, bool):
            raise ValueError(f"{name}.{k}: expected {spec[k].__name__}, got {v!r}")
    for k in required:
        if k not in d:
            raise ValueError(f"missing key '{name}.{k}'")
    return d


def _resolve(path: str, base: Path) -> str:
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else (base / p))


def toy_count(source: str, key: str = "dataset.source") -> int:
    """N of a ``"toy:N"`` dataset source, within the documented image bound and >= 2 (a chain compares sets)."""
    n = source[4:]
    if not n.isdigit() or int(n) < 2:
        raise ValueError(f"{key}={source!r}: the toy set is 'toy:N' with N >= 2")
    bounds.check("images", int(n), f"{key}={source!r}: N")
    return int(n)


def parse_chain_toml(path: str | os.PathLike) -> ChainJob:
    """Read and validate a chain TOML (see example_configs/chain.toml); ValueError names the offending key.

    A path that is missing, a folder or unreadable raises FileNotFoundError / ValueError / PermissionError naming it.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    from .chain import ChainConfig

    path = check_input_file(path, "config file", "a TOML file")
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path.name} is not UTF-8 text (byte {e.start} cannot be decoded); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path.name} is not valid TOML: {e}") from None
    for k in data:
        if k not in _TOP_KEYS:
            raise ValueError(f"unknown key '{k}' (allowed top-level tables: {', '.join(_TOP_KEYS)})")
    base = path.resolve().parent
    pipe = _table(data.get("pipeline", {}), "pipeline", _PIPELINE_KEYS, ["source"])
    ds = _table(data.get("dataset", {}), "dataset", _DATASET_KEYS, ["source"])
    if "dtype" in pipe and pipe["dtype"] not in _DTYPES:
        raise ValueError(f"pipeline.dtype={pipe['dtype']!r} is not allowed; use one of {_DTYPES}")
    if "limit" in ds:
        bounds.check("dataset_limit", ds["limit"], "dataset.limit")
    chain = data.get("chain", {})
    if not isinstance(chain, dict):
        raise ValueError("[chain] must be a table")
    methods = data.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ValueError("missing key 'methods': add at least one [[methods]] table")
    overlap = [k for k in ("methods", "train") if k in chain]
    if overlap:
        raise ValueError(f"unknown key 'chain.{overlap[0]}' (use the top-level [{overlap[0]}] table)")
    cfg_dict = dict(chain, methods=methods)
    if "train" in data:
        cfg_dict["train"] = data["train"]
    config = ChainConfig.from_dict(cfg_dict)
    src = pipe["source"]
    if src != "toy":
        src = _resolve(src, base)
    dsrc = ds["source"]
    if dsrc.startswith("toy:"):
        toy_count(dsrc)
    else:
        dsrc = _resolve(dsrc, base)
    return ChainJob(
        pipeline_source=src,
        tokenizer_dir=_resolve(pipe["tokenizer_dir"], base) if "tokenizer_dir" in pipe else None,
        device=pipe.get("device"),
        dtype=pipe.get("dtype"),
        dataset_source=dsrc,
        default_caption=ds.get("default_caption"),
        dataset_limit=ds.get("limit"),
        config=config,
    )


def resolve_device(device: Optional[str]):
    """The torch device of ``pipeline.device`` (None for "auto"), or one-line ValueError if this machine lacks it."""
    from .models import resolve_device as core_resolve

    if device in (None, "auto"):
        return None
    try:
        return core_resolve(device)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        raise ValueError(msg if "pipeline.device" in msg else f"pipeline.device: {msg}") from None


def check_job(job: ChainJob) -> None:
    """Everything the job names that can be checked without loading: paths, device, dtype (one-line errors)."""
    if job.pipeline_source != "toy":
        src = Path(job.pipeline_source)
        if not src.exists():
            raise FileNotFoundError(f"pipeline.source {str(src)!r} does not exist; expected 'toy', a diffusers "
                                    "folder or a single-file .safetensors checkpoint")
        if src.is_dir():
            if not (src / "model_index.json").is_file():
                raise FileNotFoundError(f"pipeline.source {str(src)!r} is a folder without model_index.json; expected "
                                        "a diffusers model folder or a single-file .safetensors checkpoint")
        elif src.suffix.lower() != ".safetensors":
            raise ValueError(f"pipeline.source {str(src)!r} is not a .safetensors checkpoint (only safetensors "
                             "files are read, never pickles) nor a diffusers folder")
        else:
            check_input_file(src, "pipeline.source", "a .safetensors checkpoint")
    if job.tokenizer_dir is not None:
        check_input_dir(job.tokenizer_dir, "pipeline.tokenizer_dir", "a CLIP tokenizer folder")
    if not job.dataset_source.startswith("toy:"):
        check_input_dir(job.dataset_source, "dataset.source", "a folder of images with .txt captions")
    device = resolve_device(job.device)
    if job.dtype is not None:
        from .models import resolve_dtype

        try:
            resolve_dtype(job.dtype, device)
        except ValueError as e:
            msg = str(e).splitlines()[0]
            raise ValueError(msg if "pipeline.dtype" in msg else f"pipeline.dtype: {msg}") from None


def load_job_dataset(job: ChainJob):
    """D_0 of a job: the toy set ("toy:N") or a folder of images + .txt captions.

    Checked before any model loads: at least 2 images (a chain compares sets), and each generated set (images x
    ``images_per_caption``) within the documented image bound.
    """
    from .data import CaptionedImages

    if job.dataset_source.startswith("toy:"):
        from .toy.dataset import make_toy_dataset

        ds = make_toy_dataset(toy_count(job.dataset_source))
    else:
        folder = check_input_dir(job.dataset_source, "dataset.source", "a folder of images with .txt captions")
        ds = CaptionedImages.from_folder(folder, default_caption=job.default_caption, limit=job.dataset_limit)
    if len(ds) < 2:
        raise ValueError(f"dataset.source {job.dataset_source!r} holds {len(ds)} image; a chain needs at least 2")
    per_set = len(ds) * int(getattr(job.config, "images_per_caption", 1))
    if not bounds.in_bounds("images", per_set):
        raise ValueError(f"{len(ds)} dataset images x chain.images_per_caption="
                         f"{job.config.images_per_caption} = {per_set} images per generated set; it must be "
                         f"{bounds.BOUNDS['images'].allowed} (lower dataset.limit or images_per_caption)")
    return ds


def load_job_pipeline(job: ChainJob):
    """Load the job's model on its device, in its dtype."""
    import torch

    from .models import load_pipeline

    device = resolve_device(job.device)
    dtype = getattr(torch, job.dtype) if job.dtype else None
    return load_pipeline(job.pipeline_source, device=device, dtype=dtype, tokenizer_dir=job.tokenizer_dir)
