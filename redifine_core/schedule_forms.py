"""The CFG-schedule objects: one immutable dataclass per form of the grammar in ``guidance.py``.

``guidance.parse_schedule`` turns text into these; every object knows its canonical ``spec``, its per-step scales
and, for the chain-axis forms, which per-step schedule a chain iteration uses. Build them through
``parse_schedule``: it applies the value rules (finite numbers, scales in [0, bounds.MAX_CFG], progress in [0, 1],
rates >= 0) that the constructors here assume.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from .bounds import check as check_bound

__all__ = ["Schedule", "Constant", "Linear", "Cosine", "Exp", "Interval", "Keys", "Cycle", "ByIter", "ChainDecay"]


def _fmt(x: float) -> str:
    """Shortest text that parses back to exactly ``x``: 7.5, 1, 0.001, 1e-07."""
    x = float(x) + 0.0  # -0.0 -> 0.0
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


def _check_progress(progress: float) -> float:
    p = float(progress)
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"progress must be in [0, 1] (0 = first denoising step), got {progress!r}")
    return p


def _check_iteration(iteration: int) -> int:
    if isinstance(iteration, bool) or not isinstance(iteration, numbers.Integral) or iteration < 0:
        raise ValueError(f"iteration must be an integer >= 0 (0 = first chain iteration), got {iteration!r}")
    return int(iteration)


class Schedule:
    """A guidance scale w(progress) over denoising steps, optionally chosen per chain iteration.

    Build one with :func:`parse_schedule`. Subclasses are frozen dataclasses, one per form of the grammar.
    """

    __slots__ = ()
    is_chain_axis: bool = False

    @property
    def spec(self) -> str:
        """Canonical text form; ``parse_schedule(s.spec) == s``."""
        raise NotImplementedError

    def _w(self, p: float) -> float:  # per-step forms: w at progress p (already validated)
        raise NotImplementedError

    def at_iteration(self, iteration: int) -> "Schedule":
        """The per-step schedule used at chain iteration ``iteration`` (a per-step schedule returns itself)."""
        _check_iteration(iteration)
        return self

    def scale(self, progress: float, iteration: int = 0) -> float:
        """Guidance scale at denoising progress ``progress`` in [0, 1] (0 = first step), chain iteration ``iteration``."""
        p = _check_progress(progress)
        return float(self.at_iteration(iteration)._w(p))

    def values(self, steps: int, iteration: int = 0) -> list[float]:
        """Per-step scales for ``steps`` denoising steps: step i is at progress i/(steps-1); one step is at 0."""
        check_bound("steps", steps)
        per_step = self.at_iteration(iteration)
        return [float(per_step._w(i / (steps - 1) if steps > 1 else 0.0)) for i in range(steps)]

    def describe(self) -> str:
        """One-line human description."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.spec

    def __repr__(self) -> str:
        return f"parse_schedule({self.spec!r})"


@dataclass(frozen=True, repr=False)
class Constant(Schedule):
    w: float

    @property
    def spec(self) -> str:
        return _fmt(self.w)

    def _w(self, p: float) -> float:
        return self.w

    def describe(self) -> str:
        return f"constant w = {_fmt(self.w)}" + (" (no guidance)" if self.w == 1 else "")


@dataclass(frozen=True, repr=False)
class Linear(Schedule):
    a: float
    b: float
    note: str = field(default="", compare=False)  # describe()'s prefix when a preset made it

    @property
    def spec(self) -> str:
        return f"linear({_fmt(self.a)}, {_fmt(self.b)})"

    def _w(self, p: float) -> float:
        return self.a + (self.b - self.a) * p

    def describe(self) -> str:
        return (self.note
                + f"linear from w = {_fmt(self.a)} at the first step to w = {_fmt(self.b)} at the last")


@dataclass(frozen=True, repr=False)
class Cosine(Schedule):
    a: float
    b: float

    @property
    def spec(self) -> str:
        return f"cosine({_fmt(self.a)}, {_fmt(self.b)})"

    def _w(self, p: float) -> float:
        return self.b + (self.a - self.b) * (1.0 + math.cos(math.pi * p)) / 2.0

    def describe(self) -> str:
        return f"half cosine from w = {_fmt(self.a)} at the first step to w = {_fmt(self.b)} at the last"


@dataclass(frozen=True, repr=False)
class Exp(Schedule):
    a: float
    b: float
    rate: float
    note: str = field(default="", compare=False)  # describe()'s prefix when a preset made it

    @property
    def spec(self) -> str:
        return f"exp({_fmt(self.a)}, {_fmt(self.b)}, {_fmt(self.rate)})"

    def _w(self, p: float) -> float:
        return self.b + (self.a - self.b) * math.exp(-self.rate * p)

    def describe(self) -> str:
        return self.note + (
            f"exponential approach from w = {_fmt(self.a)} towards {_fmt(self.b)} at rate {_fmt(self.rate)} "
            f"(w = {self._w(1.0):.3g} at the last step)"
        )


@dataclass(frozen=True, repr=False)
class Interval(Schedule):
    w: float
    p0: float
    p1: float

    @property
    def spec(self) -> str:
        return f"interval({_fmt(self.w)}, {_fmt(self.p0)}, {_fmt(self.p1)})"

    def _w(self, p: float) -> float:
        return self.w if self.p0 <= p <= self.p1 else 1.0

    def describe(self) -> str:
        return f"w = {_fmt(self.w)} for progress in [{_fmt(self.p0)}, {_fmt(self.p1)}], 1 (no guidance) outside"


@dataclass(frozen=True, repr=False)
class Keys(Schedule):
    points: tuple[tuple[float, float], ...]  # (progress, w), progress strictly ascending

    @property
    def spec(self) -> str:
        return "keys(" + ", ".join(f"{_fmt(p)}:{_fmt(w)}" for p, w in self.points) + ")"

    def _w(self, p: float) -> float:
        pts = self.points
        if p <= pts[0][0]:
            return pts[0][1]
        for (p0, w0), (p1, w1) in zip(pts, pts[1:]):
            if p <= p1:
                return w0 + (w1 - w0) * (p - p0) / (p1 - p0)
        return pts[-1][1]

    def describe(self) -> str:
        pts = ", ".join(f"w = {_fmt(w)} at p = {_fmt(p)}" for p, w in self.points)
        return f"piecewise linear through {len(self.points)} keyframe(s): {pts}"


@dataclass(frozen=True, repr=False)
class Cycle(Schedule):
    items: tuple[Schedule, ...]
    note: str = field(default="", compare=False)  # describe()'s prefix when a preset made it
    is_chain_axis = True

    @property
    def spec(self) -> str:
        return "cycle(" + ", ".join(s.spec for s in self.items) + ")"

    def at_iteration(self, iteration: int) -> Schedule:
        return self.items[_check_iteration(iteration) % len(self.items)]

    def describe(self) -> str:
        return (self.note + f"per chain iteration, cycling through {len(self.items)}: "
                + "; ".join(s.spec for s in self.items))


@dataclass(frozen=True, repr=False)
class ByIter(Schedule):
    items: tuple[Schedule, ...]
    is_chain_axis = True

    @property
    def spec(self) -> str:
        return "by_iter(" + ", ".join(s.spec for s in self.items) + ")"

    def at_iteration(self, iteration: int) -> Schedule:
        return self.items[min(_check_iteration(iteration), len(self.items) - 1)]

    def describe(self) -> str:
        parts = [f"iteration {i}: {s.spec}" for i, s in enumerate(self.items)]
        parts[-1] = f"iteration {len(self.items) - 1} on: {self.items[-1].spec}"
        return "per chain iteration, " + "; ".join(parts)


@dataclass(frozen=True, repr=False)
class ChainDecay(Schedule):
    w_start: float
    w_end: float
    rate: float
    note: str = field(default="", compare=False)  # describe()'s prefix when a preset made it
    is_chain_axis = True

    @property
    def spec(self) -> str:
        return f"chain_decay({_fmt(self.w_start)}, {_fmt(self.w_end)}, {_fmt(self.rate)})"

    def at_iteration(self, iteration: int) -> Schedule:
        i = _check_iteration(iteration)
        return Constant(self.w_end + (self.w_start - self.w_end) * math.exp(-self.rate * i))

    def describe(self) -> str:
        w1 = self.at_iteration(1).scale(0.0)
        return self.note + (
            f"constant per chain iteration, decaying from w = {_fmt(self.w_start)} towards {_fmt(self.w_end)} "
            f"at rate {_fmt(self.rate)} (iteration 1 uses w = {w1:.3g})"
        )
