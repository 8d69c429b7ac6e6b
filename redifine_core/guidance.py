"""CFG schedules: one small grammar for w(progress) over denoising steps and w(iteration) along the chain.

This module owns the grammar (tokenizer, parser, value rules) and the presets; the schedule objects it builds are
in ``schedule_forms.py`` and re-exported here. The API:

    class Schedule:                         # immutable; parse once, evaluate many times
        spec: str                           # canonical text form (parse(s.spec) == s)
        def scale(self, progress: float, iteration: int = 0) -> float     # progress in [0, 1], 0 = first step
        def values(self, steps: int, iteration: int = 0) -> list[float]  # per-step scales, step i at progress i/(steps-1)
        def at_iteration(self, iteration: int) -> "Schedule"             # the per-step schedule used at chain iteration i
        is_chain_axis: bool

    def parse_schedule(spec: str | float | Schedule) -> Schedule       # raises ScheduleSyntaxError (a ValueError)
    class ScheduleSyntaxError(ValueError)
    PRESETS: dict[str, str]                 # "redifine" -> its expansion
    def legacy_expansion(spec: str) -> str  # what spec expanded to before the presets took W

THE GRAMMAR (the same text in the CLI, the ComfyUI nodes and config files; names are case-insensitive,
whitespace is ignored, numbers may be ints, floats, negative or scientific)::

    schedule := NUMBER                      a constant scale, e.g. 7.5
              | NAME                        a preset with its default parameters, e.g. redifine
              | NAME "(" [arg ("," arg)*] ")"
    arg      := schedule | NUMBER ":" NUMBER   (keyframes, only inside keys(...))

Per-step forms give w as a function of the denoising progress p in [0, 1] (p = 0 at the first step; step i of
N is at p = i/(N-1); a single step is at p = 0):

    7.5                      constant
    linear(a, b)             w = a + (b - a)·p
    cosine(a, b)             half cosine from a to b: w = b + (a - b)·(1 + cos(pi·p))/2
    exp(a, b, rate)          exponential approach from a towards b: w = b + (a - b)·exp(-rate·p)
    interval(w, p0, p1)      w for p0 <= p <= p1, 1.0 (no guidance) outside (Kynkäänniemi et al. 2024)
    keys(p0:w0, p1:w1, ...)  piecewise linear through keyframes (p strictly ascending in [0, 1]), flat outside them

Chain-axis forms choose the per-step schedule by chain iteration i (0 = the first generated set):

    cycle(s0, s1, ...)                  iteration i uses s_(i mod n)
    by_iter(s0, s1, ...)                iteration i uses s_i; iterations past the list keep using the last one
    chain_decay(w_start, w_end, rate)   iteration i uses the constant w_end + (w_start - w_end)·exp(-rate·i)

The items of cycle/by_iter are per-step schedules (numbers or any per-step form); chain-axis forms do not nest.

Value rules (our choice): every number must be finite; guidance scales lie in [0, 100] (bounds.MAX_CFG; 0 is the
unconditional prediction, values in (0, 1) interpolate towards it, 1 is the conditional prediction alone; negative
guidance is refused); progress arguments lie in [0, 1]; rates are >= 0.

PRESETS: every reading of ReDiFine's schedule (the paper's formula is unknown) is a named preset set by the user's
usual CFG W (``redifine_decay``, ``redifine_rising``, ``redifine_alternate``, ``redifine_chain``, and the alias
``redifine``); ``presets.py`` owns the table with each reading's source, docs/schedules.md the scale rule and values.

Schedules are immutable and hashable; equality is structural (two schedules are equal when their canonical
``spec`` is equal), so ``exp(7.5, 1, 3)`` equals the expanded ``redifine`` preset. ``parse_schedule(s.spec) == s``.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence, Union

from .bounds import MAX_CFG
from .presets import LEGACY_PRESET_DEFS as _LEGACY_DEFS
from .presets import PRESET_DEFS as _PRESET_DEFS
from .presets import Preset
from .schedule_forms import (ByIter, ChainDecay, Constant, Cosine, Cycle, Exp, Interval, Keys, Linear, Schedule,
                             _fmt)

__all__ = [
    "Schedule",
    "Constant",
    "Linear",
    "Cosine",
    "Exp",
    "Interval",
    "Keys",
    "Cycle",
    "ByIter",
    "ChainDecay",
    "ScheduleSyntaxError",
    "parse_schedule",
    "legacy_expansion",
    "PRESETS",
    "FORMS",
]

# One line per form: used in error messages, the docs and ``redifine schedule --help``.
FORMS: dict[str, str] = {
    "<number>": "constant scale, e.g. 7.5",
    "linear(a, b)": "linear from a at the first step to b at the last",
    "cosine(a, b)": "half cosine from a to b",
    "exp(a, b, rate)": "exponential approach from a towards b: b + (a-b)*exp(-rate*p)",
    "interval(w, p0, p1)": "w for progress p in [p0, p1], 1 (no guidance) outside",
    "keys(p0:w0, p1:w1, ...)": "piecewise linear through keyframes, p ascending in [0, 1]",
    "cycle(s0, s1, ...)": "chain axis: iteration i uses s[i mod n]",
    "by_iter(s0, s1, ...)": "chain axis: iteration i uses s[i], the last one after the list ends",
    "chain_decay(w_start, w_end, rate)": "chain axis: constant w_end + (w_start-w_end)*exp(-rate*i) at iteration i",
}
FORMS.update({f"{p.name} | {p.signature}": f"preset, {p.shape}: {p.rule}, default {p.expansion}"
              for p in _PRESET_DEFS.values()})

_AVAILABLE = "available forms: " + "; ".join(FORMS)


class ScheduleSyntaxError(ValueError):
    """A schedule spec that does not parse or breaks a value rule; the message shows where, with a caret."""

    def __init__(self, spec: str, position: int, reason: str):
        self.spec = spec
        self.position = position
        self.reason = reason
        shown = re.sub(r"\s", " ", spec)  # keep the caret aligned under tabs and newlines
        super().__init__(
            f"invalid CFG schedule {spec!r}: {reason} (at character {position + 1})\n"
            f"    {shown}\n"
            f"    {' ' * position}^\n"
            f"{_AVAILABLE}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and recursive-descent parser

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class _Tok:
    kind: str  # "num", "name", one of "(),:", "end"
    text: str
    pos: int


def _tokenize(spec: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(spec)
    while i < n:
        c = spec[i]
        if c.isspace():
            i += 1
            continue
        if c in "(),:":
            toks.append(_Tok(c, c, i))
            i += 1
            continue
        m = _NUMBER.match(spec, i)
        if m:
            toks.append(_Tok("num", m.group(), i))
            i = m.end()
            continue
        m = _NAME.match(spec, i)
        if m:
            toks.append(_Tok("name", m.group().lower(), i))
            i = m.end()
            continue
        raise ScheduleSyntaxError(
            spec, i, f"unexpected character {c!r}: expected a number, a form name, '(', ',', ')' or ':'")
    toks.append(_Tok("end", "", n))
    return toks


# Syntax tree nodes (private): a number, a keyframe pair, or a call/preset name with arguments.
@dataclass(frozen=True)
class _Num:
    value: float
    pos: int


@dataclass(frozen=True)
class _Pair:
    p: _Num
    w: _Num
    pos: int


@dataclass(frozen=True)
class _Call:
    name: str
    pos: int
    args: tuple  # of _Num | _Pair | _Call
    has_parens: bool
    close_pos: int  # position of ")" (or the end of the name), for "missing argument" carets


_Node = Union[_Num, _Pair, _Call]


class _Parser:
    def __init__(self, spec: str, presets: dict[str, Preset]):
        self.spec = spec
        self.presets = presets
        self.toks = _tokenize(spec)
        self.i = 0

    def error(self, pos: int, reason: str) -> ScheduleSyntaxError:
        return ScheduleSyntaxError(self.spec, pos, reason)

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def _found(self) -> str:
        return "the end of the spec" if self.tok.kind == "end" else repr(self.tok.text)

    def parse(self) -> _Node:
        if self.tok.kind == "end":
            raise self.error(0, "the spec is empty: expected a number or a schedule form")
        node = self.term(allow_pair=False)
        if self.tok.kind != "end":
            raise self.error(self.tok.pos,
                             f"unexpected {self._found()} after the end of the schedule: expected nothing more")
        return node

    def number(self) -> _Num:
        t = self.tok
        self.i += 1
        return _Num(float(t.text) + 0.0, t.pos)  # + 0.0 turns -0 into 0

    def term(self, allow_pair: bool) -> _Node:
        t = self.tok
        if t.kind == "num":
            num = self.number()
            if self.tok.kind == ":":
                if not allow_pair:
                    raise self.error(self.tok.pos, "unexpected ':': keyframes p:w are only allowed inside keys(...)")
                self.i += 1
                if self.tok.kind != "num":
                    raise self.error(self.tok.pos,
                                     f"expected the keyframe's scale w (a number) after ':', found {self._found()}")
                return _Pair(num, self.number(), t.pos)
            return num
        if t.kind == "name":
            self.i += 1
            if t.text not in _BUILDERS and t.text not in self.presets:
                close = difflib.get_close_matches(t.text, list(_BUILDERS) + list(self.presets), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.error(t.pos, f"unknown schedule form {t.text!r}{hint}")
            if self.tok.kind != "(":
                if t.text in self.presets:
                    return _Call(t.text, t.pos, (), False, t.pos)
                raise self.error(self.tok.pos, f"expected '(' after {t.text!r}, found {self._found()}")
            self.i += 1
            args: list[_Node] = []
            if self.tok.kind != ")":
                while True:
                    args.append(self.term(allow_pair=(t.text == "keys")))
                    if self.tok.kind == ",":
                        self.i += 1
                        continue
                    if self.tok.kind == ")":
                        break
                    raise self.error(self.tok.pos, f"expected ',' or ')' in {t.text}(...), found {self._found()}")
            close_pos = self.tok.pos
            self.i += 1
            return _Call(t.text, t.pos, tuple(args), True, close_pos)
        raise self.error(t.pos, f"expected a number or a schedule form, found {self._found()}")


# ---------------------------------------------------------------------------------------------------------------
# Building schedules from the tree, with value rules


class _Builder:
    def __init__(self, parser: _Parser):
        self.p = parser
        self.presets = parser.presets

    def error(self, pos: int, reason: str) -> ScheduleSyntaxError:
        return self.p.error(pos, reason)

    def build(self, node: _Node) -> Schedule:
        if isinstance(node, _Num):
            return Constant(self.scale_value(node, "constant", "w"))
        if isinstance(node, _Pair):  # pragma: no cover - the parser only makes pairs inside keys(...)
            raise self.error(node.pos, "keyframes p:w are only allowed inside keys(...)")
        if node.name in self.presets:
            return self.preset(node)
        return _BUILDERS[node.name](self, node)

    # value checks --------------------------------------------------------------------------------------------
    def finite(self, node: _Node, form: str, arg: str) -> float:
        if not isinstance(node, _Num):
            what = "a keyframe" if isinstance(node, _Pair) else "a schedule"
            raise self.error(node.pos, f"{form} argument {arg!r} must be a number, found {what}")
        if not math.isfinite(node.value):
            raise self.error(node.pos, f"{form} argument {arg!r} must be finite, got {node.value}")
        return node.value

    def scale_value(self, node: _Node, form: str, arg: str) -> float:
        v = self.finite(node, form, arg)
        if not 0 <= v <= MAX_CFG:  # negative guidance is not supported; the cap is bounds.MAX_CFG
            raise self.error(node.pos, f"{form} argument {arg!r} = {_fmt(v)} is a guidance scale and must be in "
                                       f"[0, {_fmt(MAX_CFG)}]")
        return v

    def progress_value(self, node: _Node, form: str, arg: str) -> float:
        v = self.finite(node, form, arg)
        if not 0.0 <= v <= 1.0:
            raise self.error(node.pos, f"{form} argument {arg!r} = {_fmt(v)} is a progress and must be in [0, 1]")
        return v

    def rate_value(self, node: _Node, form: str, arg: str) -> float:
        v = self.finite(node, form, arg)
        if v < 0:
            raise self.error(node.pos, f"{form} argument {arg!r} = {_fmt(v)} must be >= 0")
        return v

    def arity(self, node: _Call, names: Sequence[str]) -> None:
        sig = f"{node.name}({', '.join(names)})"
        if len(node.args) > len(names):
            raise self.error(node.args[len(names)].pos,
                             f"{node.name} takes {len(names)} argument(s), {sig}; got {len(node.args)}")
        if len(node.args) < len(names):
            raise self.error(node.close_pos, f"{node.name} takes {len(names)} argument(s), {sig}; got "
                                             f"{len(node.args)}: missing {names[len(node.args)]!r}")

    # forms -----------------------------------------------------------------------------------------------------
    def two_scales(self, node: _Call, cls):
        names = ("a", "b")
        self.arity(node, names)
        return cls(*(self.scale_value(x, node.name, n) for x, n in zip(node.args, names)))

    def two_scales_and_rate(self, node: _Call, cls, names: tuple[str, str, str]):  # exp and chain_decay
        self.arity(node, names)
        a, b, r = node.args
        return cls(self.scale_value(a, node.name, names[0]), self.scale_value(b, node.name, names[1]),
                   self.rate_value(r, node.name, names[2]))

    def interval(self, node: _Call) -> Interval:
        self.arity(node, ("w", "p0", "p1"))
        w = self.scale_value(node.args[0], "interval", "w")
        p0 = self.progress_value(node.args[1], "interval", "p0")
        p1 = self.progress_value(node.args[2], "interval", "p1")
        if p1 < p0:
            raise self.error(node.args[2].pos, f"interval argument 'p1' = {_fmt(p1)} must be >= p0 = {_fmt(p0)}")
        return Interval(w, p0, p1)

    def keys(self, node: _Call) -> Keys:
        if not node.args:
            raise self.error(node.close_pos, "keys takes at least one keyframe p:w, e.g. keys(0:7.5, 1:1)")
        points: list[tuple[float, float]] = []
        for k, arg in enumerate(node.args):
            if not isinstance(arg, _Pair):
                raise self.error(arg.pos, f"keys argument {k + 1} must be a keyframe p:w (progress:scale), e.g. 0.5:3")
            p = self.progress_value(arg.p, "keys", f"p of keyframe {k + 1}")
            w = self.scale_value(arg.w, "keys", f"w of keyframe {k + 1}")
            if points and p <= points[-1][0]:
                raise self.error(arg.pos, f"keys: keyframe {k + 1} has p = {_fmt(p)}, not greater than the previous "
                                          f"p = {_fmt(points[-1][0])}: keyframes must be in strictly ascending p")
            points.append((p, w))
        return Keys(tuple(points))

    def items(self, node: _Call, cls):
        if not node.args:
            raise self.error(node.close_pos,
                             f"{node.name} takes at least one per-step schedule, e.g. {node.name}(7.5, 3)")
        out = []
        for k, arg in enumerate(node.args):
            s = self.build(arg)
            if s.is_chain_axis:
                raise self.error(arg.pos, f"{node.name} item {k + 1} is itself a chain-axis schedule: "
                                          "the items must be per-step schedules")
            out.append(s)
        return cls(tuple(out))

    def preset(self, node: _Call) -> Schedule:
        p = self.presets[node.name]
        if len(node.args) > p.max_args:
            raise self.error(node.args[p.max_args].pos, self.too_many(node, p))
        values = [self.rate_value(x, node.name, n) if n == "rate" else self.scale_value(x, node.name, n)
                  for x, n in zip(node.args, p.params)]
        a, note = p.form_args(values), (p.note if self.presets is _PRESET_DEFS else "")
        if p.form == "cycle":
            return Cycle(tuple(Constant(v) for v in a), note=note)
        return {"exp": Exp, "linear": Linear, "chain_decay": ChainDecay}[p.form](*a, note=note)

    def too_many(self, node: _Call, p: Preset) -> str:
        """Too many arguments; a call the preset read otherwise before it took W is told the plain form it meant."""
        reason = (f"preset {node.name} takes at most {p.max_args} argument(s), {p.signature} = {p.rule}; "
                  f"got {len(node.args)}")
        old = _LEGACY_DEFS.get(node.name) if self.presets is _PRESET_DEFS else None
        if old and len(node.args) <= len(old.params) and all(
                isinstance(x, _Num) and math.isfinite(x.value) for x in node.args):
            meant = old.expand([x.value for x in node.args])
            call = f"{node.name}({', '.join(_fmt(x.value) for x in node.args)})"
            reason += f": before the presets took your usual CFG W, {call} meant {meant}; write {meant}"
        return reason


_BUILDERS: dict[str, Callable[[_Builder, _Call], Schedule]] = {
    "linear": lambda b, n: b.two_scales(n, Linear),
    "cosine": lambda b, n: b.two_scales(n, Cosine),
    "exp": lambda b, n: b.two_scales_and_rate(n, Exp, ("a", "b", "rate")),
    "interval": _Builder.interval,
    "keys": _Builder.keys,
    "cycle": lambda b, n: b.items(n, Cycle),
    "by_iter": lambda b, n: b.items(n, ByIter),
    "chain_decay": lambda b, n: b.two_scales_and_rate(n, ChainDecay, ("w_start", "w_end", "rate")),
}


@lru_cache(maxsize=512)
def _parse_text(spec: str, legacy: bool = False) -> Schedule:
    parser = _Parser(spec, _LEGACY_DEFS if legacy else _PRESET_DEFS)
    return _Builder(parser).build(parser.parse())


def parse_schedule(spec: Union[str, float, Schedule]) -> Schedule:
    """Parse a schedule spec (text), a constant scale (a number) or return a :class:`Schedule` as is.

    Raises :class:`ScheduleSyntaxError` (a ``ValueError``) with a caret under the offending character.
    """
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, bool):
        raise TypeError(f"a CFG schedule must be a str, a number or a Schedule, got the bool {spec!r}")
    if isinstance(spec, numbers.Real):
        value = float(spec) + 0.0
        text = _fmt(value) if math.isfinite(value) else repr(value)
        if not math.isfinite(value):
            raise ScheduleSyntaxError(text, 0, f"constant argument 'w' must be finite, got {value}")
        if not 0 <= value <= MAX_CFG:
            raise ScheduleSyntaxError(text, 0, f"constant argument 'w' = {text} is a guidance scale and must be in "
                                               f"[0, {_fmt(MAX_CFG)}]")
        return Constant(value)
    if isinstance(spec, str):
        return _parse_text(spec)
    raise TypeError(f"a CFG schedule must be a str, a number or a Schedule, got {type(spec).__name__}: {spec!r}")


def legacy_expansion(spec: Union[str, float]) -> str:
    """The canonical expansion ``spec`` had before the presets took the user's usual CFG (``presets.py``'s
    ``LEGACY_PRESET_TABLE``), e.g. ``redifine_rising`` -> ``linear(2, 7.5)``: how a run folder whose run.json
    recorded no resolved schedule resumes. Text without a preset name expands as it does today."""
    if isinstance(spec, str):
        return _parse_text(spec, legacy=True).spec
    return parse_schedule(spec).spec


# name -> canonical expansion, e.g. "redifine" -> "exp(7.5, 1, 3)"
PRESETS: dict[str, str] = {name: _parse_text(name).spec for name in _PRESET_DEFS}
