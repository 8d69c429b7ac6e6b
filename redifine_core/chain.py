"""The Chain of Diffusion: finetune, generate from the same captions, repeat; one resumable run folder.

CONTRACT (filled in by issue 3):

    @dataclass(frozen=True)
    class MethodConfig:
        name: str                      # unique label in the run, e.g. "baseline-w2", "redifine"
        kind: str = "baseline"         # "baseline" | "redifine" | "custom"
        cfg: float | None = None       # baseline: the constant w
        schedule: str | None = None    # custom: any schedule spec (chain-axis allowed); redifine: default "redifine"
        cond_drop: float | None = None # custom/redifine: the drop probability (redifine default documented)

    @dataclass(frozen=True)
    class ChainConfig:
        iterations: int; methods: tuple[MethodConfig, ...]; train: TrainConfig
        images_per_caption: int = 1; steps: int = 20; sampler: str = "ddim"; seeds: tuple[int, ...] = (0,)  # replicates
        protocol: str = "restart" | "continue"; width: int | None = None; height: int | None = None
        negative_prompt: str = ""
        @classmethod from_dict(cls, d: dict) -> "ChainConfig"; def to_dict(self) -> dict

    def run_chain(pipeline, dataset, config: ChainConfig, run_dir, progress=None, cancel=None,
                  resume: bool = False) -> "ChainResult"
    def load_run(run_dir) -> dict      # run.json + per-iteration metrics, for reports

RUN FOLDER SCHEMA (shared contract between chain.py, metrics.py and report.py; schema_version 1):
  <run>/run.json            {"schema_version": 1, "status": "running"|"complete"|"cancelled"|"failed", "config": ChainConfig.to_dict(),
                             "seeds": [replicate seeds], "versions": {"redifine": .., "torch": .., "diffusers": .., "peft": ..},
                             "created": iso8601, "updated": iso8601, "dataset": {"n": N, "captions": [...]},
                             "pipeline": {"source": .., "kind": ..}, "features": "<feature set used for FID/KID>"}
  <run>/reference/images/<c:04d>.png   the user's D0 images (as used for training, resized), one per caption index c
  <run>/reference/metrics.json         {"metrics": image_statistics(D0)}
  <run>/<method>/seed_<S>/iter_<i:03d>/images/<c:04d>_<k:02d>.png   generated D_{i+1}: caption index c, image k of images_per_caption
  <run>/<method>/seed_<S>/iter_<i:03d>/captions.json   list of captions aligned with sorted image file names
  <run>/<method>/seed_<S>/iter_<i:03d>/lora.safetensors   LoRA_i (kohya layout), trained on D_i (D_0 = user images)
  <run>/<method>/seed_<S>/iter_<i:03d>/train.json      {"losses": [...], "seconds": ..}
  <run>/<method>/seed_<S>/iter_<i:03d>/metrics.json    {"method": name, "seed": S, "iteration": i, "metrics": {name: float},
                                                       "verdict": {"label": one of VERDICTS, "reasons": [str]}, "features": str}
                                                       metrics = image_statistics(D_{i+1}) plus "fid_ref","kid_ref" (vs D0) and
                                                       "fid_prev","kid_prev" (vs D_i; for i=0 D_i is D0); verdict compares
                                                       iteration i's metrics against iteration 0's of the same method+seed
                                                       (so a high-CFG method's own starting point is its baseline).
  <run>/<method>/seed_<S>/iter_<i:03d>/DONE            written last (atomically): an iteration without it is redone on resume
  <run>/metrics.csv, <run>/curves.png, <run>/grid_<method>.png, <run>/report.html   written by report.render_report(run)
Method folder names are the MethodConfig.name (validated: [A-Za-z0-9_.-]+). Multiple replicate seeds give error bars in curves.

IMPLEMENTATION NOTES (our choices, documented):
  * Seeds. Image k of caption c in replicate S is generated with ``image_seed(S, c, k)``, a pure function (SHA-256 of
    the triple) that does NOT depend on the iteration or the method: every iteration and every method draws the same
    initial noise for the same image, as "fixed seeds per image" in the design says. Differences between iterations
    (and methods) are then the model's, not the noise's: a paired comparison. Training in replicate S, iteration i
    uses ``train_seed(train.seed, S, i)``: the same for every method, different per iteration.
  * Data. D_{i+1} is the 8-bit PNG set written at iteration i; training and metrics always use those 8-bit images
    (read back from disk), so an interrupted and resumed run gives exactly the same results as an uninterrupted one.
    D_0 is the user's images centre-cropped and resized to the generation size (``reference/images``).
  * LoRAs. Each LoRA is saved (kohya layout) and read back before it is used for sampling or as ``init_lora``.
  * Methods. ``baseline``: constant CFG ``cfg`` and no condition drop. ``redifine``: condition drop
    ``REDIFINE_COND_DROP`` (0.2, our choice: the paper's value is unknown) and the ``"redifine"`` schedule preset of
    guidance.py, both overridable. ``custom``: any ``schedule`` (or constant ``cfg``) and any ``cond_drop``; chain-axis
    schedules get ``iteration=i``. Defaults are filled in by ``__post_init__`` so run.json records what was used.
  * Order. Units of work are (iteration, method, seed), iteration-major, so a partial run has every method at the
    same depth. Each unit is a pure function of its inputs on disk; units could be spread over processes later.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
import time
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from . import __version__
from .atomic import clean_stale_temps, save_png, write_json, write_text
from .progress import CancelFlag, Cancelled, ProgressCallback, ProgressEvent, check_cancel, report

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
METHOD_KINDS: tuple[str, ...] = ("baseline", "redifine", "custom")
PROTOCOLS: tuple[str, ...] = ("restart", "continue")
RUN_STATUSES: tuple[str, ...] = ("running", "complete", "cancelled", "failed")
REDIFINE_COND_DROP = 0.2
REDIFINE_SCHEDULE = "redifine"
MAX_CFG = 100.0
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_RESERVED_NAMES = ("reference", ".", "..")


# --------------------------------------------------------------------------------------------------------- seeds
def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big")


def image_seed(replicate: int, caption_index: int, k: int) -> int:
    """The sampling seed of image ``k`` of caption ``caption_index`` in replicate ``replicate`` (0 <= seed < 2**32).

    Independent of the iteration and the method: the same image position gets the same initial noise all along.
    """
    return _hash_int(f"redifine-image:{int(replicate)}:{int(caption_index)}:{int(k)}")


def train_seed(base: int, replicate: int, iteration: int) -> int:
    """The training seed at ``iteration`` of replicate ``replicate`` (shared by all methods: a paired comparison)."""
    return _hash_int(f"redifine-train:{int(base)}:{int(replicate)}:{int(iteration)}")


# -------------------------------------------------------------------------------------------------------- config
def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _check_schedule(field_name: str, spec: str) -> None:
    try:
        from .guidance import parse_schedule
    except ImportError:  # guidance not available yet: validated when sampling
        return
    try:
        parse_schedule(spec)
    except ValueError as e:
        raise ValueError(f"{field_name}={spec!r} is not a valid CFG schedule: {e}") from None


@dataclass(frozen=True)
class MethodConfig:
    """One named method of a chain run: CFG (constant or schedule) and the condition-drop probability."""

    name: str
    kind: str = "baseline"
    cfg: Optional[float] = None
    schedule: Optional[str] = None
    cond_drop: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name) or self.name in _RESERVED_NAMES:
            raise ValueError(
                f"name={self.name!r} is not allowed: use letters, digits, '_', '.', '-' (not {_RESERVED_NAMES})"
            )
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"kind={self.kind!r} (method {self.name!r}) is not allowed; use one of {METHOD_KINDS}")
        if self.cfg is not None:
            if not _is_number(self.cfg) or not math.isfinite(float(self.cfg)) or not 0.0 <= float(self.cfg) <= MAX_CFG:
                raise ValueError(f"cfg={self.cfg!r} (method {self.name!r}) must be a number in [0, {MAX_CFG}]")
            object.__setattr__(self, "cfg", float(self.cfg))
        if self.cond_drop is not None:
            if not _is_number(self.cond_drop) or not 0.0 <= float(self.cond_drop) < 1.0:
                raise ValueError(f"cond_drop={self.cond_drop!r} (method {self.name!r}) must be a number in [0, 1)")
            object.__setattr__(self, "cond_drop", float(self.cond_drop))
        if self.schedule is not None and (not isinstance(self.schedule, str) or not self.schedule.strip()):
            raise ValueError(f"schedule={self.schedule!r} (method {self.name!r}) must be a non-empty schedule spec")
        if self.kind == "baseline":
            if self.cfg is None:
                raise ValueError(f"cfg=None (method {self.name!r}): a baseline method needs a constant CFG scale cfg")
            if self.schedule is not None:
                raise ValueError(
                    f"schedule={self.schedule!r} (method {self.name!r}): a baseline uses a constant cfg; "
                    "use kind='custom' for a schedule"
                )
            if self.cond_drop not in (None, 0.0):
                raise ValueError(
                    f"cond_drop={self.cond_drop!r} (method {self.name!r}): a baseline has no condition drop; "
                    "use kind='custom'"
                )
            object.__setattr__(self, "cond_drop", 0.0)
        elif self.kind == "redifine":
            if self.cfg is not None:
                raise ValueError(
                    f"cfg={self.cfg!r} (method {self.name!r}): a redifine method uses a schedule, not a constant cfg"
                )
            if self.schedule is None:
                object.__setattr__(self, "schedule", REDIFINE_SCHEDULE)
            if self.cond_drop is None:
                object.__setattr__(self, "cond_drop", REDIFINE_COND_DROP)
        else:  # custom
            if (self.cfg is None) == (self.schedule is None):
                raise ValueError(
                    f"cfg={self.cfg!r}, schedule={self.schedule!r} (method {self.name!r}): "
                    "a custom method needs exactly one of cfg (constant) or schedule"
                )
            if self.cond_drop is None:
                object.__setattr__(self, "cond_drop", 0.0)
        if self.schedule is not None:
            _check_schedule(f"schedule (method {self.name!r})", self.schedule)

    @property
    def guidance(self) -> Union[float, str]:
        """What to pass to ``generate`` as its schedule: the constant cfg or the schedule spec."""
        return self.schedule if self.schedule is not None else float(self.cfg)  # type: ignore[arg-type]


def _default_train_config():
    from .training import TrainConfig

    return TrainConfig()


@dataclass(frozen=True)
class ChainConfig:
    """Settings of a Chain of Diffusion run; ``methods`` and ``seeds`` run side by side over the same data."""

    iterations: int
    methods: tuple[MethodConfig, ...]
    train: Any = field(default_factory=_default_train_config)  # training.TrainConfig (cond_drop/seed set per unit)
    images_per_caption: int = 1
    steps: int = 20
    sampler: str = "ddim"
    seeds: tuple[int, ...] = (0,)
    protocol: str = "restart"
    width: Optional[int] = None
    height: Optional[int] = None
    negative_prompt: str = ""
    batch_size: int = 8
    lora_scale: float = 1.0
    features: str = "auto"

    def __post_init__(self) -> None:
        if not _is_int(self.iterations) or not 1 <= self.iterations <= 1000:
            raise ValueError(f"iterations={self.iterations!r} must be an integer in [1, 1000]")
        methods = self.methods
        if isinstance(methods, MethodConfig):
            methods = (methods,)
        if not isinstance(methods, (tuple, list)) or not methods:
            raise ValueError(f"methods={self.methods!r} must be a non-empty sequence of MethodConfig")
        for m in methods:
            if not isinstance(m, MethodConfig):
                raise ValueError(f"methods: {m!r} is not a MethodConfig")
        names = [m.name for m in methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"methods: names must be unique, {dup} appear more than once")
        object.__setattr__(self, "methods", tuple(methods))
        try:
            from .training import TrainConfig
        except ImportError:  # pragma: no cover - training not available
            TrainConfig = None  # type: ignore[assignment]
        if TrainConfig is not None and not isinstance(self.train, TrainConfig):
            raise ValueError(f"train={self.train!r} must be a training.TrainConfig")
        if getattr(self.train, "cond_drop", 0.0) not in (0, 0.0):
            raise ValueError(
                f"train.cond_drop={self.train.cond_drop!r} is not used by a chain: set cond_drop per method "
                "(allowed here: 0.0)"
            )
        for name in ("images_per_caption", "steps", "batch_size"):
            v = getattr(self, name)
            if not _is_int(v) or not 1 <= v <= 10000:
                raise ValueError(f"{name}={v!r} must be an integer in [1, 10000]")
        try:
            from .sampling import SAMPLERS
        except ImportError:  # pragma: no cover
            SAMPLERS = None  # type: ignore[assignment]
        if not isinstance(self.sampler, str) or (SAMPLERS is not None and self.sampler not in SAMPLERS):
            raise ValueError(f"sampler={self.sampler!r} is not allowed; use one of {SAMPLERS}")
        seeds = self.seeds
        if _is_int(seeds):
            seeds = (int(seeds),)
        if not isinstance(seeds, (tuple, list)) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
            raise ValueError(f"seeds={self.seeds!r} must be a non-empty list of non-negative integers")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds={self.seeds!r} must not repeat a seed")
        object.__setattr__(self, "seeds", tuple(int(s) for s in seeds))
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol={self.protocol!r} is not allowed; use one of {PROTOCOLS}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 8 or v % 8 or v > 4096):
                raise ValueError(f"{name}={v!r} must be None or a multiple of 8 in [8, 4096]")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt={self.negative_prompt!r} must be a string")
        if not _is_number(self.lora_scale) or not 0.0 <= float(self.lora_scale) <= 10.0:
            raise ValueError(f"lora_scale={self.lora_scale!r} must be a number in [0, 10]")
        object.__setattr__(self, "lora_scale", float(self.lora_scale))
        if not isinstance(self.features, str) or not (
            self.features in ("auto", "handcrafted", "handcrafted-v1")
            or self.features.startswith("inception:") or self.features.endswith(".safetensors")
        ):
            raise ValueError(f"features={self.features!r} is not allowed; use 'auto', 'handcrafted', "
                             "'inception:<file.safetensors>' or a path to a local Inception .safetensors file")

    # ---- dict round trip (used by run.json and the TOML loader)
    def to_dict(self) -> dict:
        """A JSON-ready dict; ``ChainConfig.from_dict(c.to_dict()) == c``."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "ChainConfig":
        """Build from a plain dict; unknown keys and wrong types raise ValueError naming the (dotted) key."""
        return _from_dict(cls, d, "")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "none"
    if dataclasses.is_dataclass(tp):
        return "table"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ValueError:
                continue
        raise ValueError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError(f"{path}: {value!r} is not one of {typing.get_args(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if _is_int(value):
            return int(value)
    elif tp is float:
        if _is_number(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, (list, tuple)):
            args = typing.get_args(tp)
            if not args:
                return tuple(value)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
            if len(args) == len(value):
                return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return _from_dict(tp, value, path)
    else:  # unknown annotation: accept as is
        return value
    raise ValueError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _from_dict(cls: type, d: Any, path: str) -> Any:
    """Build dataclass ``cls`` from dict ``d``: unknown keys and wrong types raise ValueError naming ``path.key``."""
    where = path or "config"
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a table/dict, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    if cls is ChainConfig:
        hints["train"] = _train_config_class()
    unknown = [k for k in d if k not in names]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ValueError(f"unknown key {key!r} (allowed in {where}: {', '.join(names)})")
    kwargs = {}
    for k, v in d.items():
        key = f"{path}.{k}" if path else k
        kwargs[k] = _coerce(v, hints.get(k, Any), key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required field
        raise ValueError(f"{where}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if path else str(e)) from None


def _train_config_class():
    from .training import TrainConfig

    return TrainConfig


def config_diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ (``methods[1].cfg``, ``train.steps``, ...)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.append(p)
            else:
                out.extend(config_diff(a[k], b[k], p))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [path or "<root>"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(config_diff(x, y, f"{path}[{i}]"))
        return out
    return [] if a == b else [path or "<root>"]


# ---------------------------------------------------------------------------------------------------- backend
@dataclass
class ChainBackend:
    """The operations the chain calls (a seam for tests); ``default_backend()`` binds the real modules."""

    finetune: Callable[..., Any]  # (pipeline, dataset, train_config, progress, cancel, init_lora) -> TrainResult
    generate: Callable[..., Any]  # sampling.generate
    save_lora: Callable[..., Any]
    load_lora: Callable[..., Any]
    set_metrics: Callable[..., dict]
    verdict: Callable[..., Any]
    make_dataset: Callable[..., Any]  # (list of PIL images, list of captions) -> CaptionedImages
    image_statistics: Callable[..., dict]


def default_backend() -> ChainBackend:
    from .data import CaptionedImages
    from .lora import load_lora, save_lora
    from .metrics import image_statistics, set_metrics, verdict
    from .sampling import generate
    from .training import finetune_lora

    def finetune(pipeline, dataset, config, progress=None, cancel=None, init_lora=None):
        return finetune_lora(pipeline, dataset, config, progress=progress, cancel=cancel, init_lora=init_lora)

    return ChainBackend(
        finetune=finetune,
        generate=generate,
        save_lora=save_lora,
        load_lora=load_lora,
        set_metrics=set_metrics,
        verdict=verdict,
        make_dataset=lambda images, captions: CaptionedImages.from_images(list(images), list(captions)),
        image_statistics=image_statistics,
    )


# ------------------------------------------------------------------------------------------------------ results
@dataclass
class ChainResult:
    """What a run produced: its folder, final status, and verdict labels[method][seed] = [label per iteration]."""

    run_dir: Path
    status: str
    verdicts: dict[str, dict[int, list[str]]] = field(default_factory=dict)
    report: Optional[Path] = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"redifine": __version__}
    for pkg in ("torch", "diffusers", "peft", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def iteration_dir(run_dir: Path, method: str, seed: int, iteration: int) -> Path:
    return Path(run_dir) / method / f"seed_{int(seed)}" / f"iter_{int(iteration):03d}"


def _to_uint8(images: Any) -> np.ndarray:
    """[N, H, W, 3] float in [0, 1] (torch or numpy) -> uint8, rounding to nearest."""
    arr = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images, dtype=np.float32)
    return np.clip(np.rint(np.clip(arr, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


def _as_tensor(images_u8: Sequence[np.ndarray] | np.ndarray):
    import torch

    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images_u8]) if not isinstance(images_u8, np.ndarray) else images_u8
    return torch.from_numpy(arr.astype(np.float32) / 255.0)


def _fit(image, width: int, height: int):
    """Centre-crop to the aspect ratio and resize to (width, height), RGB 8-bit (unchanged when already that size)."""
    from PIL import Image, ImageOps

    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def _read_pngs(folder: Path) -> tuple[list[str], list[np.ndarray]]:
    from PIL import Image

    names = sorted(p.name for p in folder.glob("*.png"))
    arrays = []
    for n in names:
        with Image.open(folder / n) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
    return names, arrays


def _read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _generation_size(pipeline: Any, config: ChainConfig) -> tuple[int, int]:
    res = getattr(config.train, "resolution", None) or int(getattr(pipeline, "default_size", 512))
    return int(config.width or res), int(config.height or res)


def _render_report(run_dir: Path) -> Optional[Path]:
    """Render the report; a failure is logged and never loses the run."""
    try:
        from .report import render_report
    except ImportError:
        log.info("report.render_report is not available; no report written")
        return None
    try:
        return Path(render_report(run_dir))
    except Exception as e:  # noqa: BLE001 - a report failure must not lose the run
        log.warning("could not render the report of %s: %s: %s", run_dir, type(e).__name__, e)
        return None


# --------------------------------------------------------------------------------------------------------- run
def run_chain(
    pipeline: Any,
    dataset: Any,
    config: ChainConfig,
    run_dir: Union[str, Path],
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFlag] = None,
    resume: bool = False,
    *,
    backend: Optional[ChainBackend] = None,
    render: bool = True,
) -> ChainResult:
    """Run (or resume) the Chain of Diffusion of every method and replicate seed in ``config`` into ``run_dir``.

    ``dataset`` is D_0 (a ``data.CaptionedImages``). Raises FileExistsError for a non-empty ``run_dir`` without
    ``resume``, ValueError when resuming with a different config or dataset (naming every differing field),
    and re-raises Cancelled / KeyboardInterrupt after marking the run "cancelled" (it stays resumable).
    """
    if not isinstance(config, ChainConfig):
        raise ValueError(f"config={config!r} must be a ChainConfig")
    captions = [str(c) for c in getattr(dataset, "captions", ())]
    images_in = list(getattr(dataset, "images", ()))
    if not captions or len(captions) != len(images_in):
        raise ValueError(f"dataset must hold images with one caption each (got {len(images_in)} images, "
                         f"{len(captions)} captions)")
    if len(captions) < 2:
        raise ValueError(f"dataset has {len(captions)} image(s); a chain needs at least 2 (FID/KID compare sets)")
    run_dir = Path(run_dir)
    width, height = _generation_size(pipeline, config)
    reference = [np.asarray(_fit(im, width, height), dtype=np.uint8) for im in images_in]
    cfg_dict = config.to_dict()
    dataset_info = {"n": len(captions), "captions": captions}
    run_json_path = run_dir / "run.json"

    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir={str(run_dir)!r} is a file, not a folder")
    pipeline_info = {"source": str(getattr(pipeline, "source", "")), "kind": str(getattr(pipeline, "kind", ""))}
    if run_dir.exists() and any(run_dir.iterdir()):
        if not resume:
            raise FileExistsError(
                f"run folder {str(run_dir)!r} exists and is not empty; pass resume=True (CLI: --resume) to continue it "
                "or choose another folder"
            )
        if not run_json_path.exists():
            raise ValueError(f"cannot resume {str(run_dir)!r}: it has no run.json (not a chain run folder)")
        manifest = _read_json(run_json_path)
        _check_resumable(manifest, cfg_dict, dataset_info, pipeline_info, run_dir, reference)
        removed = clean_stale_temps(run_dir)
        if removed:
            log.info("removed %d stale temp file(s) from %s", removed, run_dir)
        manifest.pop("error", None)
        manifest.update(status="running", updated=_now())
        manifest.setdefault("resumed", []).append(_now())
    else:
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "status": "running",
            "config": cfg_dict,
            "seeds": list(config.seeds),
            "versions": _versions(),
            "created": _now(),
            "updated": _now(),
            "dataset": dataset_info,
            "pipeline": pipeline_info,
            "features": config.features,
            "size": [width, height],
        }
    backend = backend or default_backend()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_json_path, manifest)

    def set_status(status: str, **extra: Any) -> None:
        manifest.update(status=status, updated=_now(), **extra)
        write_json(run_json_path, manifest)

    result = ChainResult(run_dir=run_dir, status="running")
    try:
        _write_reference(run_dir, reference, captions, backend, config)
        _run_units(pipeline, config, run_dir, captions, reference, backend, manifest, run_json_path,
                   progress, cancel, result)
    except (Cancelled, KeyboardInterrupt):
        set_status("cancelled")
        result.status = "cancelled"
        if render:
            result.report = _render_report(run_dir)
        raise
    except BaseException as e:
        set_status("failed", error=f"{type(e).__name__}: {e}")
        raise
    set_status("complete")
    result.status = "complete"
    report(progress, ProgressEvent(phase="chain", step=_n_units(config), total=_n_units(config), message="complete"))
    if render:
        result.report = _render_report(run_dir)
    return result


def _n_units(config: ChainConfig) -> int:
    return config.iterations * len(config.methods) * len(config.seeds)


def _check_resumable(manifest: dict, cfg_dict: dict, dataset_info: dict, pipeline_info: dict, run_dir: Path,
                     reference: list[np.ndarray]) -> None:
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"cannot resume {str(run_dir)!r}: schema_version {manifest.get('schema_version')!r}, "
                         f"this version writes {SCHEMA_VERSION}")
    stored_pipe = manifest.get("pipeline") or {}
    stored = {"config": manifest.get("config"), "dataset": manifest.get("dataset"),
              "pipeline": {"kind": stored_pipe.get("kind")}}
    given = {"config": json.loads(json.dumps(cfg_dict)), "dataset": dataset_info,
             "pipeline": {"kind": pipeline_info["kind"]}}
    if stored_pipe.get("source") != pipeline_info["source"]:
        log.warning("resuming %s with pipeline source %r (the run started with %r): make sure it is the same model",
                    run_dir, pipeline_info["source"], stored_pipe.get("source"))
    versions = _versions()
    changed = sorted(k for k, v in (manifest.get("versions") or {}).items() if versions.get(k) != v)
    if changed:
        log.warning("resuming %s with other versions of %s: later iterations may not be bit-identical",
                    run_dir, ", ".join(changed))
    diff = config_diff(stored, given)
    if diff:
        raise ValueError(
            f"cannot resume {str(run_dir)!r}: the given config/dataset differ from the run's in {', '.join(diff)}; "
            "resume with the same settings or start a new run folder"
        )
    ref_dir = run_dir / "reference" / "images"
    for c, arr in enumerate(reference):
        p = ref_dir / f"{c:04d}.png"
        if p.exists():
            from PIL import Image

            try:
                with Image.open(p) as im:
                    stored_arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except Exception:  # unreadable: rewritten below
                continue
            if stored_arr.shape != arr.shape or not np.array_equal(stored_arr, arr):
                raise ValueError(f"cannot resume {str(run_dir)!r}: dataset image {c} differs from the run's "
                                 f"reference/images/{c:04d}.png")


def _write_reference(run_dir: Path, reference: list[np.ndarray], captions: list[str], backend: ChainBackend,
                     config: ChainConfig) -> None:
    from PIL import Image

    ref_dir = run_dir / "reference" / "images"
    for c, arr in enumerate(reference):
        p = ref_dir / f"{c:04d}.png"
        if not p.exists():
            save_png(p, Image.fromarray(arr))
    cap_path = run_dir / "reference" / "captions.json"
    if not cap_path.exists():
        write_json(cap_path, captions)
    mpath = run_dir / "reference" / "metrics.json"
    if not mpath.exists():
        write_json(mpath, {"metrics": _floats(backend.image_statistics(_as_tensor(reference)))})


def _floats(d: dict) -> dict[str, float]:
    """The numeric entries of a metrics dict, as plain floats (strings such as "features" dropped)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (str, bool)) or v is None:
            continue
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def _run_units(pipeline, config: ChainConfig, run_dir: Path, captions: list[str], reference: list[np.ndarray],
               backend: ChainBackend, manifest: dict, run_json_path: Path, progress, cancel,
               result: ChainResult) -> None:
    from PIL import Image

    total = _n_units(config)
    n = len(captions)
    ipc = config.images_per_caption
    width, height = _generation_size(pipeline, config)
    gen_captions = [captions[c] for c in range(n) for _ in range(ipc)]
    names = [f"{c:04d}_{k:02d}.png" for c in range(n) for k in range(ipc)]  # sorted order == generation order
    ref_tensor = _as_tensor(reference)
    unit = -1
    for i in range(config.iterations):
        for method in config.methods:
            for S in config.seeds:
                unit += 1
                label = f"{method.name} seed {S} iter {i}"
                check_cancel(cancel)
                idir = iteration_dir(run_dir, method.name, S, i)
                if (idir / "DONE").exists():
                    report(progress, ProgressEvent(phase="chain", step=unit, total=total, message=f"{label}: done"))
                    _record_verdict(result, method.name, S, _read_json(idir / "metrics.json"))
                    continue
                if idir.exists():
                    shutil.rmtree(idir)  # partial iteration from an interrupted run: redo it from scratch
                ctx = {"unit": unit, "method": method.name, "seed": S, "iteration": i}

                def nested(ev: ProgressEvent, _ctx=ctx) -> None:
                    ev.extra = {**(ev.extra or {}), **_ctx}
                    report(progress, ev)

                # ---- D_i
                if i == 0:
                    train_images, train_caps, prev_tensor = reference, list(captions), ref_tensor
                else:
                    pdir = iteration_dir(run_dir, method.name, S, i - 1)
                    _, train_images = _read_pngs(pdir / "images")
                    train_caps = _read_json(pdir / "captions.json")
                    prev_tensor = _as_tensor(train_images)
                d_i = backend.make_dataset([Image.fromarray(a) for a in train_images], train_caps)

                # ---- LoRA_i
                report(progress, ProgressEvent(phase="chain", step=unit, total=total, message=f"{label}: training",
                                               extra=dict(ctx)))
                init = None
                if config.protocol == "continue" and i > 0:
                    init = backend.load_lora(iteration_dir(run_dir, method.name, S, i - 1) / "lora.safetensors")
                tcfg = dataclasses.replace(config.train, cond_drop=float(method.cond_drop or 0.0),
                                           seed=train_seed(getattr(config.train, "seed", 0), S, i))
                t0 = time.perf_counter()
                tres = backend.finetune(pipeline, d_i, tcfg, progress=nested, cancel=cancel, init_lora=init)
                lora_path = idir / "lora.safetensors"
                backend.save_lora(tres.lora, lora_path)
                write_json(idir / "train.json", {
                    "losses": [float(x) for x in tres.losses],
                    "seconds": float(getattr(tres, "seconds", time.perf_counter() - t0)),
                    "seed": tcfg.seed, "cond_drop": tcfg.cond_drop, "protocol": config.protocol,
                    "dataset_size": len(train_caps),
                })
                lora = backend.load_lora(lora_path)  # sample with exactly what a resumed run would read back
                check_cancel(cancel)

                # ---- D_{i+1}
                report(progress, ProgressEvent(phase="chain", step=unit, total=total, message=f"{label}: sampling",
                                               extra=dict(ctx)))
                seeds = [image_seed(S, c, k) for c in range(n) for k in range(ipc)]
                images = backend.generate(
                    pipeline, gen_captions, method.guidance, steps=config.steps, seeds=seeds,
                    negative_prompt=config.negative_prompt, sampler=config.sampler, width=width, height=height,
                    batch_size=config.batch_size, lora=lora, lora_scale=config.lora_scale, iteration=i,
                    progress=nested, cancel=cancel,
                )
                u8 = _to_uint8(images)
                if u8.shape[0] != len(names):
                    raise RuntimeError(f"generate returned {u8.shape[0]} images, expected {len(names)}")
                for name, arr in zip(names, u8):
                    save_png(idir / "images" / name, Image.fromarray(arr))
                write_json(idir / "captions.json", gen_captions)
                check_cancel(cancel)

                # ---- metrics
                report(progress, ProgressEvent(phase="chain", step=unit, total=total, message=f"{label}: metrics",
                                               extra=dict(ctx)))
                raw = backend.set_metrics(_as_tensor(u8), ref_tensor, prev_tensor, features=config.features,
                                          progress=nested, cancel=cancel)
                features = str(raw.get("features", config.features))
                metrics = _floats(raw)
                if i == 0:
                    base = metrics
                else:
                    base = _read_json(iteration_dir(run_dir, method.name, S, 0) / "metrics.json")["metrics"]
                v = backend.verdict(metrics, base)
                record = {
                    "method": method.name, "seed": S, "iteration": i, "metrics": metrics,
                    "verdict": {"label": str(v.label), "reasons": [str(r) for r in v.reasons]},
                    "features": features,
                }
                write_json(idir / "metrics.json", record)
                if manifest.get("features") != features:
                    manifest.update(features=features, updated=_now())
                    write_json(run_json_path, manifest)
                write_text(idir / "DONE", _now() + "\n")
                _record_verdict(result, method.name, S, record)
                report(progress, ProgressEvent(phase="chain", step=unit + 1, total=total,
                                               message=f"{label}: {record['verdict']['label']}", extra=dict(ctx)))


def _record_verdict(result: ChainResult, method: str, seed: int, record: dict) -> None:
    labels = result.verdicts.setdefault(method, {}).setdefault(int(seed), [])
    labels.append(str(record.get("verdict", {}).get("label", "")))


# -------------------------------------------------------------------------------------------------------- load
def load_run(run_dir: Union[str, Path]) -> dict:
    """run.json plus ``reference`` (its metrics.json) and ``records``: every finished iteration's metrics.json
    (with ``dir``), in config order of method, then seed, then iteration. Works on partial runs."""
    run_dir = Path(run_dir)
    p = run_dir / "run.json"
    if not p.exists():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a chain run folder: no run.json")
    run = _read_json(p)
    ref = run_dir / "reference" / "metrics.json"
    run["reference"] = _read_json(ref) if ref.exists() else None
    run["run_dir"] = str(run_dir)
    cfg = run.get("config") or {}
    methods = [m.get("name") for m in cfg.get("methods", [])]
    seeds = run.get("seeds") or cfg.get("seeds") or []
    records = []
    for m in methods:
        for S in seeds:
            for i in range(int(cfg.get("iterations", 0))):
                idir = iteration_dir(run_dir, m, S, i)
                if (idir / "DONE").exists() and (idir / "metrics.json").exists():
                    rec = _read_json(idir / "metrics.json")
                    rec["dir"] = str(idir)
                    records.append(rec)
    run["records"] = records
    return run
