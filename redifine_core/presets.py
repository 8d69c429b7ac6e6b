"""The named CFG-schedule presets: each reading of ReDiFine's schedule, the rule that sets its scales, its source.

The paper's schedule formula is unknown (reference/paper.md §5 and §12) and our sources disagree on its shape, so
every reading is a preset of the schedule grammar (``guidance.parse_schedule``). One number sets every reading: the
user's usual CFG ``W``; the low scale is ``low_scale(W)`` (the scale rule of docs/schedules.md), and the decays take
a rate too. Parameters are positional and missing ones keep the defaults. ``redifine`` is an alias of the reading
named by ``REDIFINE_READING``. ``LEGACY_PRESET_TABLE`` keeps what the preset names meant before they took ``W``, for
run folders whose run.json recorded no resolved schedule. The tables are plain data: ``guidance`` builds the
schedules from them, and docs/schedules.md gives the sources, the rule and the values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from .schedule_forms import _fmt

USUAL_CFG = 7.5
"""The default of ``W``, the user's usual CFG: the common Stable Diffusion 1.5/SDXL default."""
LOW_FRACTION = 0.25
"""The scale rule's fraction of the guidance excess ``W - 1`` that the low scale keeps (our choice)."""

LOW_RULE = f"L = 1 + {_fmt(LOW_FRACTION)}*(W - 1)"
"""The scale rule as the error messages and ``redifine schedule --help`` write it."""

REDIFINE_READING = "redifine_decay"
REDIFINE_STATUS = "not yet chosen by evidence: the study in docs/toy-lab.md chooses it"
"""The reading ``redifine`` stands for, and how it was chosen. The pre-registered study (docs/study-protocol.md)
sets both; nothing else names the alias's target."""


def low_scale(w: float) -> float:
    """The scale rule: the low scale keeps ``LOW_FRACTION`` of the guidance excess ``w - 1`` above no guidance."""
    return 1.0 + (float(w) - 1.0) * LOW_FRACTION


@dataclass(frozen=True)
class Preset:
    """One named schedule: ``form(*args)`` of the grammar, with ``args`` worked out from the call's parameters."""

    name: str
    form: str  # the grammar form it expands to: exp, chain_decay, linear or cycle
    params: tuple[str, ...]  # what a call gives, in order; "rate" is a rate, every other one a guidance scale
    defaults: tuple[float, ...]
    args: tuple[Union[str, float], ...]  # the form's arguments: a parameter's name, "L" (low_scale(W)) or a number
    axis: str = "steps"  # "steps" (over the denoising steps) or "chain" (along the chain's iterations)
    source: str = ""  # who describes this shape (reference/paper.md)
    shape: str = ""  # the shape in a few words
    max_args: Optional[int] = None  # how many leading parameters a call may give (None: all of them)
    alias_of: str = ""  # the reading this name stands for

    def __post_init__(self) -> None:
        if len(self.params) != len(self.defaults):
            raise ValueError(f"preset {self.name!r}: {len(self.params)} parameter names for {len(self.defaults)} "
                             "defaults; they must match one to one")
        if self.axis not in ("steps", "chain"):
            raise ValueError(f"preset {self.name!r}: axis={self.axis!r}; expected 'steps' or 'chain'")
        known = set(self.params) | ({"L"} if "W" in self.params else set())
        unknown = [a for a in self.args if isinstance(a, str) and a not in known]
        if unknown:
            raise ValueError(f"preset {self.name!r}: arguments {unknown} are neither parameters nor L (with W)")
        if self.max_args is None:
            object.__setattr__(self, "max_args", len(self.params))
        elif not 0 <= self.max_args <= len(self.params):
            raise ValueError(f"preset {self.name!r}: max_args={self.max_args!r} must be in [0, {len(self.params)}]")

    @property
    def call_params(self) -> tuple[str, ...]:
        """The parameters a call may give."""
        return self.params[: self.max_args]

    @property
    def signature(self) -> str:
        """How to call it, e.g. ``redifine_rising(W)``."""
        return f"{self.name}({', '.join(self.call_params)})"

    @property
    def rule(self) -> str:
        """The form it expands to in terms of its parameters, e.g. ``linear(L, W) with L = ...``."""
        fixed = dict(zip(self.params[self.max_args:], self.defaults[self.max_args:]))  # what a call cannot set
        shown = [_fmt(fixed[a]) if a in fixed else a if isinstance(a, str) else _fmt(a) for a in self.args]
        return f"{self.form}({', '.join(shown)})" + (f" with {LOW_RULE}" if "L" in self.args else "")

    def form_args(self, values: Sequence[float] = ()) -> tuple[float, ...]:
        """The form's arguments for a call giving ``values`` (the first parameters; the rest keep the defaults)."""
        given = dict(zip(self.params, [float(v) for v in values] + list(self.defaults[len(values):])))
        if "W" in given:
            given["L"] = low_scale(given["W"])
        return tuple(given[a] if isinstance(a, str) else float(a) for a in self.args)

    def expand(self, values: Sequence[float] = ()) -> str:
        """The canonical text a call giving ``values`` expands to, e.g. ``linear(2.625, 7.5)``."""
        return f"{self.form}({', '.join(_fmt(v) for v in self.form_args(values))})"

    @property
    def expansion(self) -> str:
        """The canonical text it expands to with its defaults, e.g. ``exp(7.5, 1, 3)``."""
        return self.expand()

    @property
    def note(self) -> str:
        """The prefix ``describe()`` puts before the expanded schedule's own description."""
        if self.alias_of:
            return (f"preset {self.name!r} = {self.alias_of}, {REDIFINE_STATUS} ({self.source}; a reading, not the "
                    "paper's formula): ")
        return f"preset {self.name!r} ({self.source}; a reading, not the paper's formula): "


READINGS: tuple[Preset, ...] = (
    Preset("redifine_decay", "exp", ("W", "rate"), (USUAL_CFG, 3.0), ("W", 1.0, "rate"), "steps",
           "the paper's reviewers: 'decayed CFG scaling during sampling', scales 5 to 10",
           "decaying over the denoising steps"),
    Preset("redifine_rising", "linear", ("W",), (USUAL_CFG,), ("L", "W"), "steps",
           "the paper's summary: 'first capture low-frequency features with low CFG and then refine high-frequency "
           "details with high CFG'", "rising over the denoising steps"),
    Preset("redifine_alternate", "cycle", ("W",), (USUAL_CFG,), ("L", "W"), "chain",
           "the paper's summary: 'alternates between low and high CFG scales'",
           "low and high alternating along the chain, iteration 0 low"),
    Preset("redifine_chain", "chain_decay", ("W", "rate"), (USUAL_CFG, 0.5), ("W", "L", "rate"), "chain",
           "the paper's reviewers: 'adjusting the CFG scale along the chain'",
           "decaying along the chain, constant within a generation"),
)
"""Every reading, in the order the docs list them."""


def _alias(target: Preset) -> Preset:
    """``redifine``: the target's expansion, called with ``W`` only (the one parameter every reading shares)."""
    return Preset("redifine", target.form, target.params, target.defaults, target.args, target.axis, target.source,
                  target.shape, max_args=1, alias_of=target.name)


PRESET_TABLE: tuple[Preset, ...] = (_alias(next(p for p in READINGS if p.name == REDIFINE_READING)), *READINGS)
"""Every preset name: the alias ``redifine`` first, then the readings."""

PRESET_DEFS: dict[str, Preset] = {p.name: p for p in PRESET_TABLE}


def _legacy(name: str, form: str, params: tuple[str, ...], defaults: tuple[float, ...]) -> Preset:
    return Preset(name, form, params, defaults, params, source="the meaning before the presets took W")


LEGACY_PRESET_TABLE: tuple[Preset, ...] = (
    _legacy("redifine", "exp", ("w_start", "w_end", "rate"), (7.5, 1.0, 3.0)),
    _legacy("redifine_chain", "chain_decay", ("w_start", "w_end", "rate"), (7.5, 5.0, 0.5)),
    _legacy("redifine_rising", "linear", ("w_low", "w_high"), (2.0, 7.5)),
    _legacy("redifine_alternate", "cycle", ("w_low", "w_high"), (2.0, 7.5)),
)
"""What each preset name meant before the presets took the user's usual CFG (positional parameters, defaults filled
in): how a run.json that recorded no resolved schedule resumes, and what a refused old call is told to write."""

LEGACY_PRESET_DEFS: dict[str, Preset] = {p.name: p for p in LEGACY_PRESET_TABLE}
