"""The per-iteration verdict: stable, drifting to blur, to over-guidance or from the data, or inconclusive.

Each iteration is compared with iteration 0 of the same method and seed. The thresholds are module constants; the
synthetic sets they were calibrated on, and the label rates they give there, are in ``calibration.py`` and its data
file ``verdict_calibration.json``; docs/metrics.md explains them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

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


Sign = tuple[list[str], float, int]  # (reason texts, strength in threshold units, how many signs it counts as)


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


def _family(current: Mapping[str, Any], baseline: Mapping[str, Any],
            members: tuple[tuple[str, Optional[float], float], ...]) -> tuple[list[Sign], list[Sign]]:
    """Metrics that measure one thing (hf_share and laplacian_var; saturation and colourfulness) make one sign per
    direction, or two when every one of them moved past its threshold that way and one by STRONG times it.
    ``members``: (metric, relative drop threshold or None, relative rise threshold)."""
    down: list[tuple[str, float]] = []
    up: list[tuple[str, float]] = []
    for name, drop, rise in members:
        v = _pair(current, baseline, name)
        if v is None:
            continue
        r = _rel(*v)
        text = f"{name} {r:+.0%} vs iteration 0 ({v[1]:.4g} -> {v[0]:.4g})"
        if drop is not None and r <= -drop:
            down.append((text, -r / drop))
        elif r >= rise:
            up.append((text, r / rise))

    def sign(moved: list[tuple[str, float]]) -> list[Sign]:
        if not moved:
            return []
        strength = max(x for _, x in moved)
        count = 2 if len(moved) == len(members) and strength >= STRONG else 1
        return [([t for t, _ in moved], strength, count)]

    return sign(down), sign(up)


def _signs(current: Mapping[str, Any], baseline: Mapping[str, Any]) -> tuple[list[Sign], list[Sign]]:
    blur, over = _family(current, baseline, (("hf_share", BLUR_DROP, SHARP_RISE),
                                                   ("laplacian_var", BLUR_DROP, SHARP_RISE)))
    v = _pair(current, baseline, "spectral_slope")
    if v is not None:
        d = v[0] - v[1]
        if d <= -SLOPE_STEEPER:
            blur.append(([f"spectral_slope {d:+.2f}, steeper, vs iteration 0 ({v[1]:.2f} -> {v[0]:.2f})"],
                         -d / SLOPE_STEEPER, 1))
        elif d >= SLOPE_FLATTER:
            over.append(([f"spectral_slope {d:+.2f}, flatter, vs iteration 0 ({v[1]:.2f} -> {v[0]:.2f})"],
                         d / SLOPE_FLATTER, 1))
    over += _family(current, baseline, (("saturation", None, SATURATION_RISE),
                                          ("colourfulness", None, COLOURFULNESS_RISE)))[1]
    v = _pair(current, baseline, "clipped_fraction")
    if v is not None and v[0] - v[1] >= CLIPPED_RISE:
        d = v[0] - v[1]
        over.append(([f"clipped_fraction {d * 100:+.1f} points vs iteration 0 ({v[1]:.1%} -> {v[0]:.1%})"],
                      d / CLIPPED_RISE, 1))
    return blur, over


def _texts(signs: list[Sign]) -> list[str]:
    return [t for texts, _, _ in signs for t in texts]


def _count(signs: list[Sign]) -> int:
    return sum(n for _, _, n in signs)


def verdict(current: Mapping[str, Any], baseline: Mapping[str, Any], n_images: Optional[int] = None) -> Verdict:
    """Compare an iteration's metrics with iteration 0's of the same method+seed (thresholds: module constants).

    Blur signs: sharpness (hf_share and/or laplacian_var) down > BLUR_DROP, spectral_slope down > SLOPE_STEEPER.
    Over-guidance signs: sharpness up > SHARP_RISE, spectral_slope up > SLOPE_FLATTER, saturation up >
    SATURATION_RISE, colourfulness up > COLOURFULNESS_RISE (relative), clipped_fraction up > CLIPPED_RISE
    (absolute). Sharpness is one sign, or two when hf_share and laplacian_var both moved the same way and one of them
    by STRONG times its threshold. A mode needs MIN_SIGNS signs; when both modes have that many the signs disagree
    and the label is "inconclusive", otherwise the mode with more signs wins and the other's are listed as "(also:
    ...)". With no mode, fid_ref up > FID_RISE (relative) is "drifting from the data". ``n_images`` (or the
    metrics' own "n_images") below MIN_IMAGES makes any label "inconclusive", naming what it would have read.
    Metrics missing from either dict are skipped.
    """
    if n_images is None and "n_images" in current:
        try:
            n_images = int(float(current["n_images"]))
        except (TypeError, ValueError):
            n_images = None
    v = _label(current, baseline)
    if n_images is not None and n_images < MIN_IMAGES:
        return Verdict(INCONCLUSIVE, [
            f"only {n_images} images per set: below {MIN_IMAGES}, sets drawn from one unchanged distribution already "
            "differ this much (docs/metrics.md)", f"would read: {v.label}"] + v.reasons)
    return v


def _label(current: Mapping[str, Any], baseline: Mapping[str, Any]) -> Verdict:
    blur, over = _signs(current, baseline)
    nb, no = _count(blur), _count(over)
    fid: Optional[str] = None
    v = _pair(current, baseline, "fid_ref")
    if v is not None and v[1] > 0 and _rel(*v) >= FID_RISE:
        fid = f"fid_ref {_rel(*v):+.0%} vs iteration 0 ({v[1]:.3g} -> {v[0]:.3g}): further from your images"
    also = lambda items: [f"(also: {t})" for t in items]  # noqa: E731
    if nb >= MIN_SIGNS and no >= MIN_SIGNS:
        return Verdict(INCONCLUSIVE, [f"signs disagree: {nb} of blur and {no} of over-guidance"]
                       + [f"blur: {t}" for t in _texts(blur)] + [f"over-guidance: {t}" for t in _texts(over)]
                       + also([fid] if fid else []))
    if nb >= MIN_SIGNS:
        return Verdict(BLUR, _texts(blur) + also(_texts(over) + ([fid] if fid else [])))
    if no >= MIN_SIGNS:
        return Verdict(OVER, _texts(over) + also(_texts(blur) + ([fid] if fid else [])))
    lone = _texts(blur + over)
    if fid:
        return Verdict(DRIFT, [fid, "no collapse mode: neither blur nor over-guidance has "
                                    f"{MIN_SIGNS} signs"] + also(lone))
    if lone:
        return Verdict(STABLE, [f"only one sign, {MIN_SIGNS} needed: {t}" for t in lone])
    return Verdict(STABLE, ["all metrics within thresholds of iteration 0"])
