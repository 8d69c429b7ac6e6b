"""The per-iteration verdict: stable, drifting to blur, to over-guidance or from the data, or inconclusive.

Each iteration is compared with iteration 0 of the same method and seed. A change past its threshold counts as a
sign only when its interval (``intervals.change_intervals``, recorded with the metrics) excludes 0; when counting the
changes inside the noise would give another label, the label is "inconclusive" and says which change is in doubt.
The thresholds are module constants; the synthetic sets they were calibrated on, and the label rates they give there,
are in ``calibration.py`` and its data file ``verdict_calibration.json``; docs/metrics.md explains them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .intervals import FID_KEY, MEAN_DISTANCE_KEY, read_interval

STABLE = "stable"
BLUR = "drifting to blur"
OVER = "drifting to over-guidance"
DRIFT = "drifting from the data"
INCONCLUSIVE = "inconclusive"
VERDICTS = (STABLE, BLUR, OVER, DRIFT, INCONCLUSIVE)
"""Every label. BLUR and OVER name a collapse mode; DRIFT is movement away from D0 with no clear mode."""

# --- thresholds (relative to the same method+seed's iteration 0) ------------------------------------------------
BLUR_DROP = 0.25
"""hf_share or laplacian_var falling by more than 25 % is a blur sign."""
SLOPE_STEEPER = 0.3
"""spectral_slope falling (steeper) by more than 0.3 (absolute, log-log units) is a blur sign."""
SLOPE_FLATTER = 0.3
"""spectral_slope rising (flatter: more high-frequency energy) by more than 0.3 is an over-guidance sign."""
SHARP_RISE = 0.25
"""hf_share or laplacian_var rising by more than 25 % is an over-guidance sign."""
SATURATION_RISE = 0.15
"""mean saturation rising by more than 15 % (relative) is an over-guidance sign."""
COLOURFULNESS_RISE = 0.20
"""colourfulness rising by more than 20 % (relative) is an over-guidance sign."""
CLIPPED_RISE = 0.02
"""clipped_fraction rising by more than 0.02 (absolute: 2 % of channel values) is an over-guidance sign."""
MIN_SIGNS = 2
"""A blur or over-guidance label needs at least this many signs of that mode; one sign alone stays "stable"."""
STRONG = 3.0
"""Two metrics that measure one thing (hf_share and laplacian_var: sharpness; saturation and colourfulness: colour)
count as one sign, or as two when both moved past their threshold the same way and one of them by at least STRONG
times it (e.g. laplacian_var +75 % with hf_share +25 %): a strong move of one family can carry a label."""
FID_RISE = 0.3
"""fid_ref (FID against D0) rising by more than 30 % (relative) with no clear mode is "drifting from the data"."""
MIN_IMAGES = 16
"""Below this many images per set any label is "inconclusive": draws of one unchanged distribution move too much."""
MODE_THRESHOLDS = {
    BLUR: {"hf_share": -BLUR_DROP, "laplacian_var": -BLUR_DROP, "spectral_slope": -SLOPE_STEEPER},
    OVER: {"hf_share": SHARP_RISE, "laplacian_var": SHARP_RISE, "spectral_slope": SLOPE_FLATTER,
           "saturation": SATURATION_RISE, "colourfulness": COLOURFULNESS_RISE, "clipped_fraction": CLIPPED_RISE},
    DRIFT: {"fid_ref": FID_RISE},
}
"""The metrics that can carry each drift label and their signed thresholds (a fall is negative)."""
ABSOLUTE_CHANGE = ("spectral_slope", "clipped_fraction")
"""Metrics whose change is read as a difference; every other one relative to iteration 0."""


@dataclass(frozen=True)
class Verdict:
    """A per-iteration reading for an artist: ``label`` in VERDICTS and the metric changes that led to it."""

    label: str
    reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.label not in VERDICTS:
            raise ValueError(f"label: {self.label!r} is not a verdict; allowed: {', '.join(VERDICTS)}")
        if not all(isinstance(r, str) for r in self.reasons):
            raise ValueError(f"reasons: must be a list of strings, got {self.reasons!r}")

    def to_dict(self) -> dict:
        return {"label": self.label, "reasons": list(self.reasons)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Verdict":
        if not isinstance(d, Mapping) or "label" not in d:
            raise ValueError(f"verdict: expected a mapping with 'label' and 'reasons', got {d!r}")
        return cls(label=d["label"], reasons=list(d.get("reasons", [])))


@dataclass(frozen=True)
class _Move:
    """One statistic past its threshold: which mode it points to, its family, its text, its strength in threshold
    units, and whether its interval (when the metrics carry one) excludes 0."""

    mode: str  # "blur", "over" or "fid"
    family: str
    text: str
    strength: float
    solid: bool
    noise: str  # the reason given when it is not solid


FAMILY_SIZE = {"sharpness": 2, "colour": 2}
"""Families of two metrics that measure one thing; every other sign is a family of one."""


def _rel(cur: float, base: float) -> float:
    return (cur - base) / max(abs(base), 1e-12)


def _pair(current: Mapping[str, Any], baseline: Mapping[str, Any], name: str) -> Optional[tuple[float, float]]:
    if name in current and name in baseline:
        try:
            c, b = float(current[name]), float(baseline[name])
        except (TypeError, ValueError):
            return None
        if math.isfinite(c) and math.isfinite(b):
            return c, b
    return None


def _move(mode: str, family: str, name: str, change: float, threshold: float, interval: Optional[tuple[float, float]],
          fmt: str, unit: str, text: str) -> _Move:
    """A move past ``threshold`` (signed: negative for a fall). ``fmt`` formats a change ('{:+.0%}' or '{:+.2f}'),
    ``unit`` follows it; ``text`` has a {change} slot for the change and its interval. With no interval (metrics
    from before intervals were recorded) the move counts on its size alone."""
    ci = "" if interval is None else f" [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"
    solid = interval is None or (interval[0] > 0 if threshold > 0 else interval[1] < 0)
    noise = (f"{name} {fmt.format(change)}{ci}{unit} passes the {fmt.format(threshold)}{unit} threshold but its "
             "interval includes 0")
    return _Move(mode, family, text.format(change=fmt.format(change) + ci + unit), change / threshold, solid, noise)


def _family(current: Mapping[str, Any], baseline: Mapping[str, Any], family: str,
            members: tuple[tuple[str, Optional[float], float], ...]) -> list[_Move]:
    """The moves of two metrics that measure one thing; ``members``: (metric, signed drop threshold or None, rise)."""
    out = []
    for name, drop, rise in members:
        v = _pair(current, baseline, name)
        if v is None:
            continue
        r = _rel(*v)
        threshold = drop if drop is not None and r <= drop else rise if r >= rise else None
        if threshold is not None:
            out.append(_move("blur" if threshold < 0 else "over", family, name, r, threshold,
                             read_interval(current, name), "{:+.0%}", "",
                             f"{name} {{change}} vs iteration 0 ({v[1]:.4g} -> {v[0]:.4g})"))
    return out


def _moves(current: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[_Move]:
    """Every statistic past its threshold, with its interval read from ``current`` (intervals.read_interval)."""
    out = _family(current, baseline, "sharpness", (("hf_share", -BLUR_DROP, SHARP_RISE),
                                                   ("laplacian_var", -BLUR_DROP, SHARP_RISE)))
    v = _pair(current, baseline, "spectral_slope")
    if v is not None:
        d = v[0] - v[1]
        if d <= -SLOPE_STEEPER or d >= SLOPE_FLATTER:
            steeper = d < 0
            out.append(_move("blur" if steeper else "over", "slope", "spectral_slope", d,
                             -SLOPE_STEEPER if steeper else SLOPE_FLATTER, read_interval(current, "spectral_slope"),
                             "{:+.2f}", "", f"spectral_slope {{change}}, {'steeper' if steeper else 'flatter'}, vs "
                                            f"iteration 0 ({v[1]:.2f} -> {v[0]:.2f})"))
    out += _family(current, baseline, "colour", (("saturation", None, SATURATION_RISE),
                                                 ("colourfulness", None, COLOURFULNESS_RISE)))
    v = _pair(current, baseline, "clipped_fraction")
    if v is not None and v[0] - v[1] >= CLIPPED_RISE:
        ci = read_interval(current, "clipped_fraction")
        out.append(_move("over", "clipping", "clipped_fraction", (v[0] - v[1]) * 100, CLIPPED_RISE * 100,
                         None if ci is None else (ci[0] * 100, ci[1] * 100), "{:+.1f}", " points",
                         f"clipped_fraction {{change}} vs iteration 0 ({v[1]:.1%} -> {v[0]:.1%})"))
    v = _pair(current, baseline, "fid_ref")
    if v is not None and v[1] > 0 and _rel(*v) >= FID_RISE:
        ci, what = read_interval(current, FID_KEY), ""
        if ci is None and read_interval(current, MEAN_DISTANCE_KEY) is not None:
            ci, what = read_interval(current, MEAN_DISTANCE_KEY), " (interval of the feature-mean distance)"
        out.append(_move("fid", "fid", "fid_ref", _rel(*v), FID_RISE, ci, "{:+.0%}", what,
                         f"fid_ref {{change}} vs iteration 0 ({v[1]:.3g} -> {v[0]:.3g}): further from your images"))
    return out


def _signs(moves: list[_Move], mode: str) -> tuple[list[str], int]:
    """(reason texts, sign count) of one mode: a family of two is one sign, or two when both of its metrics moved
    and one by STRONG times its threshold."""
    texts, count = [], 0
    for family in dict.fromkeys(m.family for m in moves if m.mode == mode):
        moved = [m for m in moves if m.mode == mode and m.family == family]
        texts += [m.text for m in moved]
        strong = max(m.strength for m in moved) >= STRONG
        count += 2 if len(moved) == FAMILY_SIZE.get(family, 0) and strong else 1
    return texts, count


def verdict(current: Mapping[str, Any], baseline: Mapping[str, Any], n_images: Optional[int] = None) -> Verdict:
    """Compare an iteration's metrics with iteration 0's of the same method+seed (thresholds: module constants).

    Blur signs: sharpness (hf_share and/or laplacian_var) down > BLUR_DROP, spectral_slope down > SLOPE_STEEPER.
    Over-guidance signs: sharpness up > SHARP_RISE, spectral_slope up > SLOPE_FLATTER, saturation up >
    SATURATION_RISE, colourfulness up > COLOURFULNESS_RISE (relative), clipped_fraction up > CLIPPED_RISE
    (absolute). Sharpness is one sign, or two when hf_share and laplacian_var both moved the same way and one of them
    by STRONG times its threshold. A mode needs MIN_SIGNS signs; when both modes have that many the signs disagree
    and the label is "inconclusive", otherwise the mode with more signs wins and the other's are listed as "(also:
    ...)". With no mode, fid_ref up > FID_RISE (relative) is "drifting from the data". A change with an interval in
    ``current`` (keys ``<metric>_change_lo/hi``) counts only when the interval excludes 0; if counting the ones that
    do not would change the label, the label is "inconclusive", else they are noted "(within noise: ...)". A change
    without an interval counts on its size. ``n_images`` (or the metrics' own "n_images") below MIN_IMAGES makes any
    label "inconclusive", naming what it would have read. Metrics missing from either dict are skipped.
    """
    if n_images is None and "n_images" in current:
        try:
            n_images = int(float(current["n_images"]))
        except (TypeError, ValueError):
            n_images = None
    v = _reading(_moves(current, baseline))
    if n_images is not None and n_images < MIN_IMAGES:
        return Verdict(INCONCLUSIVE, [
            f"only {n_images} images per set: below {MIN_IMAGES}, sets drawn from one unchanged distribution already "
            "differ this much (docs/metrics.md)", f"would read: {v.label}"] + v.reasons)
    return v


def _reading(moves: list[_Move]) -> Verdict:
    """The label from the moves whose interval excludes 0; "inconclusive" when counting the others would change it."""
    solid = _label([m for m in moves if m.solid])
    noisy = [m for m in moves if not m.solid]
    if not noisy:
        return solid
    loose = _label(moves)
    if loose.label != solid.label:
        return Verdict(INCONCLUSIVE, [m.noise for m in noisy]
                       + [f"would read: {loose.label} if {'this move is' if len(noisy) == 1 else 'these moves are'} "
                          f"real, {solid.label} if not"] + [f"(also: {m.text})" for m in moves if m.solid])
    return Verdict(solid.label, solid.reasons + [f"(within noise: {m.noise})" for m in noisy])


def _label(moves: list[_Move]) -> Verdict:
    blur, nb = _signs(moves, "blur")
    over, no = _signs(moves, "over")
    fid = [m.text for m in moves if m.mode == "fid"]
    also = lambda items: [f"(also: {t})" for t in items]  # noqa: E731
    if nb >= MIN_SIGNS and no >= MIN_SIGNS:
        return Verdict(INCONCLUSIVE, [f"signs disagree: {nb} of blur and {no} of over-guidance"]
                       + [f"blur: {t}" for t in blur] + [f"over-guidance: {t}" for t in over] + also(fid))
    if nb >= MIN_SIGNS:
        return Verdict(BLUR, blur + also(over + fid))
    if no >= MIN_SIGNS:
        return Verdict(OVER, over + also(blur + fid))
    lone = blur + over
    if fid:
        return Verdict(DRIFT, fid + [f"no collapse mode: neither blur nor over-guidance has {MIN_SIGNS} signs"]
                       + also(lone))
    if lone:
        return Verdict(STABLE, [f"only one sign, {MIN_SIGNS} needed: {t}" for t in lone])
    return Verdict(STABLE, ["all metrics within thresholds of iteration 0"])
