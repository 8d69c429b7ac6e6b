"""The per-iteration verdict (stable / drifting to blur / drifting to over-guidance) and its thresholds.

Thresholds are relative to the same method+seed's iteration 0; their meaning and the checks behind them are in
docs/metrics.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

VERDICTS = ("stable", "drifting to blur", "drifting to over-guidance")

# --- verdict thresholds (relative to the same method+seed's iteration 0) -----------------------------------------
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
"""A drift label needs at least this many independent signs; one moving metric alone stays "stable"."""


@dataclass(frozen=True)
class Verdict:
    """A per-iteration reading for an artist: ``label`` in VERDICTS and the metric changes that triggered it."""

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


def _rel(cur: float, base: float) -> float:
    return (cur - base) / max(abs(base), 1e-12)


def verdict(current: Mapping[str, Any], baseline: Mapping[str, Any]) -> Verdict:
    """Compare an iteration's metrics with iteration 0's of the same method+seed (thresholds: module constants).

    Blur signs: sharpness (hf_share and/or laplacian_var) down > BLUR_DROP (relative), spectral_slope down >
    SLOPE_STEEPER. Over-guidance signs: sharpness up > SHARP_RISE (relative), spectral_slope up > SLOPE_FLATTER,
    saturation up > SATURATION_RISE, colourfulness up > COLOURFULNESS_RISE (relative), clipped_fraction up >
    CLIPPED_RISE (absolute). hf_share and laplacian_var together are one sign (they measure the same thing).
    A label needs MIN_SIGNS signs; when both modes have enough, the one with more signs wins (ties: the larger summed
    change in threshold units). Metrics missing from either dict are skipped.
    """

    def get(name: str) -> Optional[tuple[float, float]]:
        if name in current and name in baseline:
            try:
                c, b = float(current[name]), float(baseline[name])
            except (TypeError, ValueError):
                return None
            if math.isfinite(c) and math.isfinite(b):
                return c, b
        return None

    # each entry: (reasons, strength in threshold units); hf_share and laplacian_var both measure sharpness and
    # move together, so the two of them count as ONE sign (listed separately in the reasons)
    blur: list[tuple[list[str], float]] = []
    over: list[tuple[list[str], float]] = []
    sharp_down: list[tuple[str, float]] = []
    sharp_up: list[tuple[str, float]] = []
    for name in ("hf_share", "laplacian_var"):
        v = get(name)
        if v is None:
            continue
        r = _rel(*v)
        if r <= -BLUR_DROP:
            sharp_down.append((f"{name} {r:+.0%} vs iteration 0 ({v[1]:.4g} -> {v[0]:.4g})", -r / BLUR_DROP))
        elif r >= SHARP_RISE:
            sharp_up.append((f"{name} {r:+.0%} vs iteration 0 ({v[1]:.4g} -> {v[0]:.4g})", r / SHARP_RISE))
    if sharp_down:
        blur.append(([t for t, _ in sharp_down], max(x for _, x in sharp_down)))
    if sharp_up:
        over.append(([t for t, _ in sharp_up], max(x for _, x in sharp_up)))
    v = get("spectral_slope")
    if v is not None:
        d = v[0] - v[1]
        if d <= -SLOPE_STEEPER:
            text = f"spectral_slope {d:+.2f}, steeper, vs iteration 0 ({v[1]:.2f} -> {v[0]:.2f})"
            blur.append(([text], -d / SLOPE_STEEPER))
        elif d >= SLOPE_FLATTER:
            text = f"spectral_slope {d:+.2f}, flatter, vs iteration 0 ({v[1]:.2f} -> {v[0]:.2f})"
            over.append(([text], d / SLOPE_FLATTER))
    for name, thr in (("saturation", SATURATION_RISE), ("colourfulness", COLOURFULNESS_RISE)):
        v = get(name)
        if v is not None:
            r = _rel(*v)
            if r >= thr:
                over.append(([f"{name} {r:+.0%} vs iteration 0 ({v[1]:.3g} -> {v[0]:.3g})"], r / thr))
    v = get("clipped_fraction")
    if v is not None and v[0] - v[1] >= CLIPPED_RISE:
        d = v[0] - v[1]
        text = f"clipped_fraction {d * 100:+.1f} points vs iteration 0 ({v[1]:.1%} -> {v[0]:.1%})"
        over.append(([text], d / CLIPPED_RISE))

    nb, no = len(blur), len(over)
    flat = lambda signs: [t for texts, _ in signs for t in texts]  # noqa: E731
    if nb >= MIN_SIGNS or no >= MIN_SIGNS:
        sb, so = sum(x for _, x in blur), sum(x for _, x in over)
        if (nb, sb) >= (no, so):
            return Verdict("drifting to blur", flat(blur) + [f"(also: {t})" for t in flat(over)])
        return Verdict("drifting to over-guidance", flat(over) + [f"(also: {t})" for t in flat(blur)])
    lone = flat(blur + over)
    if lone:
        return Verdict("stable", [f"only one sign, {MIN_SIGNS} needed: {t}" for t in lone])
    return Verdict("stable", ["all metrics within thresholds of iteration 0"])
