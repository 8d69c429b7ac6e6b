"""Chain settings: MethodConfig (one named method), ChainConfig (a whole run), and the one-line method syntax.

Every value a user can type is checked in ``__post_init__`` against the documented bounds of ``bounds.py``, and
everything that can be checked without the model is checked here (schedules parse, the FID/KID feature spec names a
readable weights file), so a bad config fails before any model loads. ``ChainConfig.to_dict``/``from_dict`` is the
round trip run.json and the TOML loader use; ``parse_methods`` reads the method lines of the ComfyUI Chain node
(``baseline 7.5``, ``rd: redifine cond_drop=0.2``, ``custom schedule=<spec> cond_drop=<p>``).

``init_lora`` (a LoRA file) makes iteration 0 generate with that LoRA as it is (no training on D0); each later
iteration trains from the previous LoRA (``protocol="continue"``) or from ``init_lora`` again (``"restart"``).

Methods: ``baseline`` is a constant CFG ``cfg`` and no condition drop. ``redifine`` is condition drop
``REDIFINE_COND_DROP`` (0.2, our choice: the paper's value is unknown) with the ``"redifine"`` schedule preset of
guidance.py, both overridable. ``custom`` is any ``schedule`` (or constant ``cfg``) and any ``cond_drop``. Defaults
are filled in by ``__post_init__`` so run.json records what was used.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .. import bounds
from .coerce import from_dict, is_int, is_number, jsonable

METHOD_KINDS: tuple[str, ...] = ("baseline", "redifine", "custom")
PROTOCOLS: tuple[str, ...] = ("restart", "continue")
PARALLEL_MODES: tuple[str, ...] = ("units", "data")  # how several processes share a run (docs/scale.md)
REDIFINE_COND_DROP = 0.2
REDIFINE_SCHEDULE = "redifine"
MAX_CFG = bounds.MAX_CFG
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_RESERVED_NAMES = ("reference", "claims", ".", "..")


def _check_schedule(field_name: str, spec: str) -> None:
    from ..guidance import parse_schedule

    try:
        parse_schedule(spec)
    except ValueError as e:
        raise ValueError(f"{field_name}={spec!r} is not a valid CFG schedule: {e}") from None


def _check_features(spec: Any) -> None:
    """The FID/KID feature spec names something usable, checked without loading any weights."""
    from ..metrics import check_features

    try:
        check_features(spec)
    except (ValueError, OSError) as e:  # FileNotFoundError too: a config error is a ValueError here
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(msg if "features" in msg else f"features={spec!r}: {msg}") from None


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
        where = f"(method {self.name!r})"
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"kind={self.kind!r} {where} is not allowed; use one of {METHOD_KINDS}")
        if self.cfg is not None:
            if not bounds.in_bounds("cfg", self.cfg):
                raise ValueError(f"cfg={self.cfg!r} {where} must be {bounds.BOUNDS['cfg'].allowed}")
            object.__setattr__(self, "cfg", float(self.cfg))
        if self.cond_drop is not None:
            if not is_number(self.cond_drop) or not 0.0 <= float(self.cond_drop) < 1.0:
                raise ValueError(f"cond_drop={self.cond_drop!r} {where} must be a number between 0 and 1, "
                                 "1 excluded (a drop probability in [0, 1))")
            object.__setattr__(self, "cond_drop", float(self.cond_drop))
        if self.schedule is not None and (not isinstance(self.schedule, str) or not self.schedule.strip()):
            raise ValueError(f"schedule={self.schedule!r} {where} must be a non-empty schedule spec")
        if self.kind == "baseline":
            if self.cfg is None:
                raise ValueError(f"cfg=None {where}: a baseline method needs a constant CFG scale cfg")
            if self.schedule is not None:
                raise ValueError(f"schedule={self.schedule!r} {where}: a baseline uses a constant cfg; "
                                 "use kind='custom' for a schedule")
            if self.cond_drop not in (None, 0.0):
                raise ValueError(f"cond_drop={self.cond_drop!r} {where}: a baseline has no condition drop; "
                                 "use kind='custom'")
            object.__setattr__(self, "cond_drop", 0.0)
        elif self.kind == "redifine":
            if self.cfg is not None:
                raise ValueError(f"cfg={self.cfg!r} {where}: a redifine method uses a schedule, not a constant cfg")
            if self.schedule is None:
                object.__setattr__(self, "schedule", REDIFINE_SCHEDULE)
            if self.cond_drop is None:
                object.__setattr__(self, "cond_drop", REDIFINE_COND_DROP)
        else:  # custom
            if (self.cfg is None) == (self.schedule is None):
                raise ValueError(f"cfg={self.cfg!r}, schedule={self.schedule!r} {where}: "
                                 "a custom method needs exactly one of cfg (constant) or schedule")
            if self.cond_drop is None:
                object.__setattr__(self, "cond_drop", 0.0)
        if self.schedule is not None:
            _check_schedule(f"schedule {where}", self.schedule)

    @property
    def guidance(self) -> Union[float, str]:
        """What to pass to ``generate`` as its schedule: the constant cfg or the schedule spec."""
        return self.schedule if self.schedule is not None else float(self.cfg)  # type: ignore[arg-type]


def _train_config_class() -> type:
    from ..training import TrainConfig

    return TrainConfig


def _default_train_config() -> Any:
    return _train_config_class()()


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
    parallel: str = "units"  # several processes: "units" (each runs whole lanes) or "data" (all train each LoRA)
    init_lora: Optional[str] = None  # a LoRA file: iteration 0 generates with it untrained, later ones start from it

    def __post_init__(self) -> None:
        bounds.check("iterations", self.iterations)
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
        if not isinstance(self.train, _train_config_class()):
            raise ValueError(f"train={self.train!r} must be a training.TrainConfig")
        if getattr(self.train, "cond_drop", 0.0) not in (0, 0.0):
            raise ValueError(f"train.cond_drop={self.train.cond_drop!r} is not used by a chain: set cond_drop per "
                             "method (allowed here: 0.0)")
        for name in ("images_per_caption", "steps", "batch_size"):
            bounds.check(name, getattr(self, name))
        from ..sampling import SAMPLERS

        if not isinstance(self.sampler, str) or self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} is not allowed; use one of {SAMPLERS}")
        seeds = (int(self.seeds),) if is_int(self.seeds) else self.seeds
        if not isinstance(seeds, (tuple, list)) or not seeds or not all(bounds.in_bounds("seed", s) for s in seeds):
            raise ValueError(f"seeds={self.seeds!r} must be a non-empty list of integers in "
                             f"[0, {bounds.MAX_SEED}]")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds={self.seeds!r} must not repeat a seed")
        object.__setattr__(self, "seeds", tuple(int(s) for s in seeds))
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol={self.protocol!r} is not allowed; use one of {PROTOCOLS}")
        for name in ("width", "height"):
            if getattr(self, name) is not None:
                bounds.check(name, getattr(self, name))
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt={self.negative_prompt!r} must be a string")
        object.__setattr__(self, "lora_scale", bounds.check("lora_scale", self.lora_scale))
        _check_features(self.features)
        if self.init_lora is not None and (not isinstance(self.init_lora, str) or not self.init_lora.strip()):
            raise ValueError(f"init_lora={self.init_lora!r} must be the path of a LoRA file (or None)")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel={self.parallel!r} is not allowed; use one of {PARALLEL_MODES} ('units': the "
                             "processes share out the methods and seeds; 'data': they train each LoRA together)")

    def n_units(self) -> int:
        """How many (iteration, method, seed) steps the run has."""
        return self.iterations * len(self.methods) * len(self.seeds)

    # ---- dict round trip (used by run.json and the TOML loader)
    def to_dict(self) -> dict:
        """A JSON-ready dict; ``ChainConfig.from_dict(c.to_dict()) == c``."""
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "ChainConfig":
        """Build from a plain dict; unknown keys and wrong types raise ValueError naming the (dotted) key."""
        return from_dict(cls, d, "", _hints)


def _hints(cls: type) -> dict:
    import typing

    hints = typing.get_type_hints(cls)
    if cls is ChainConfig:
        hints["train"] = _train_config_class()
    return hints


# ---------------------------------------------------------------------------------------------- method lines
_LINE_RE = re.compile(r"^(?:(?P<name>[A-Za-z0-9_.\-]+)\s*:\s*)?(?P<kind>[A-Za-z]+)\b\s*(?P<rest>.*)$")
_KEY_RE = re.compile(r"(?:^|\s)(cfg|schedule|cond_drop)\s*=", re.IGNORECASE)


def parse_method_line(line: str, index: int = 0) -> dict:
    """One method line -> the MethodConfig keyword arguments it gives, validated by building the MethodConfig.

    Forms: ``baseline 7.5`` (or ``baseline cfg=7.5``), ``redifine`` (optionally ``cond_drop=0.2``,
    ``schedule=<spec>``), ``custom schedule=<spec> cond_drop=<p>``; an optional ``name:`` prefix sets the label
    (default ``baseline-w<cfg>``, ``redifine``, ``custom<line number>``). ValueError names the line.
    """
    where = f"method line {index + 1} {line!r}"
    m = _LINE_RE.match(str(line).strip())
    if not m or m.group("kind").lower() not in METHOD_KINDS:
        raise ValueError(f"{where}: start with one of {METHOD_KINDS} (optionally 'name: ' before it), "
                         "e.g. 'baseline 7.5' or 'redifine cond_drop=0.2'")
    kind = m.group("kind").lower()
    rest = m.group("rest").strip()
    kw: dict = {"kind": kind}
    keys = list(_KEY_RE.finditer(rest))
    head = rest[: keys[0].start()].strip() if keys else rest
    if head:
        if kind != "baseline":
            raise ValueError(f"{where}: unexpected {head!r}; use key=value (cfg=, schedule=, cond_drop=)")
        kw["cfg"] = head
    for i, k in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(rest)
        key = k.group(1).lower()
        if key in kw:
            raise ValueError(f"{where}: {key} is given twice")
        kw[key] = rest[k.end():end].strip()
    for key in ("cfg", "cond_drop"):
        if key in kw:
            try:
                kw[key] = float(kw[key])
            except ValueError:
                raise ValueError(f"{where}: {key}={kw[key]!r} is not a number") from None
    if kind == "baseline" and "cfg" not in kw:
        raise ValueError(f"{where}: a baseline needs its CFG, e.g. 'baseline 7.5'")
    if kind == "baseline" and ("schedule" in kw or "cond_drop" in kw):
        raise ValueError(f"{where}: a baseline is constant CFG without condition drop; "
                         "use 'custom schedule=... cond_drop=...' for other mixes")
    if kind == "custom" and "schedule" not in kw:
        raise ValueError(f"{where}: a custom method needs schedule=<spec>")
    name = m.group("name")
    if not name:
        name = {"baseline": f"baseline-w{kw.get('cfg', 0):g}", "redifine": "redifine"}.get(kind, f"custom{index + 1}")
    kw["name"] = name
    try:
        MethodConfig(**kw)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return kw


def parse_methods(text: str) -> tuple[MethodConfig, ...]:
    """Every non-empty line of ``text`` as a MethodConfig (at least one; names unique); ValueError names the line."""
    rows = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    kws = [parse_method_line(ln, i) for i, ln in enumerate(rows)]
    if not kws:
        raise ValueError("methods is empty: write one method per line, e.g. 'baseline 7.5' and 'redifine'")
    names = [kw["name"] for kw in kws]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"methods: the names {dup} appear twice; prefix lines with distinct names like 'a: ...'")
    return tuple(MethodConfig(**kw) for kw in kws)
