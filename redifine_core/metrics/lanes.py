"""A lane's reading (one method and seed over its rounds), and a method's reading over its seeds.

Each round's verdict compares that round alone with round 0. Read along the lane, an established drift (a drift label
at some round) holds: a later round that alone reads "stable" keeps the drift's label unless the intervals of the
metrics that carried it now lie inside their thresholds, a real recovery. ``method_reading`` turns the seeds' lane
readings at one round into the method's: seeds split between "stable" and a drift label read "inconclusive".
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping, Optional, Sequence

from .intervals import read_interval
from .verdict import ABSOLUTE_CHANGE, BLUR, DRIFT, INCONCLUSIVE, MODE_THRESHOLDS, OVER, STABLE

DRIFTS = (BLUR, OVER, DRIFT)
ROUND_LABEL = "round_label"
"""Key of a held reading's verdict dict that keeps the round's own label (``round_reasons``: its own reasons)."""


def _change(name: str, metrics: Mapping[str, Any], baseline: Mapping[str, Any]) -> Optional[float]:
    try:
        c, b = float(metrics[name]), float(baseline[name])
    except (KeyError, TypeError, ValueError):
        return None
    if not (math.isfinite(c) and math.isfinite(b)):
        return None
    return c - b if name in ABSOLUTE_CHANGE else (c - b) / max(abs(b), 1e-12)


def _fmt(name: str, x: float) -> str:
    return f"{x:+.2f}" if name == "spectral_slope" else f"{x * 100:+.1f} points" if name == "clipped_fraction" \
        else f"{x:+.0%}"


def _carriers(label: str, metrics: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[str]:
    """The metrics past their threshold (the drift's way) at the round that established ``label``."""
    thresholds = MODE_THRESHOLDS[label]
    passed = []
    for name, t in thresholds.items():
        c = _change(name, metrics, baseline)
        if c is not None and (c >= t if t > 0 else c <= t):
            passed.append(name)
    return passed or list(thresholds)


def _doubt(name: str, label: str, metrics: Mapping[str, Any], baseline: Mapping[str, Any]) -> Optional[str]:
    """Why ``name`` does not show a recovery from ``label`` (None when it does: its interval's far end, or its
    change when no interval is recorded, lies inside the threshold)."""
    t = MODE_THRESHOLDS[label][name]
    c = _change(name, metrics, baseline)
    if c is None:
        return None
    ci = read_interval(metrics, name)
    far = c if ci is None else (ci[1] if t > 0 else ci[0])
    if (far < t) if t > 0 else (far > t):
        return None
    shown = "" if ci is None else f" [{_fmt(name, ci[0])}, {_fmt(name, ci[1])}]"
    return f"{name} {_fmt(name, c)}{shown} does not rule out the {_fmt(name, t)} threshold"


def lane_readings(rounds: Sequence[tuple[int, Mapping[str, Any], Mapping[str, Any]]],
                  baseline: Mapping[str, Any]) -> list[dict]:
    """The lane's reading of each round: ``rounds`` are (iteration, metrics, verdict dict) in order, ``baseline`` is
    round 0's metrics. A round that alone reads stable after a drift label keeps that label ("held from round k")
    unless every metric that carried the drift shows a recovery. Where a reading's reasons differ from the round's
    own, those are kept under ROUND_LABEL and "round_reasons". Applying this to its readings gives the same."""
    out: list[dict] = []
    held: Optional[tuple[str, int, list[str]]] = None
    for it, metrics, v in rounds:
        own = str(v.get(ROUND_LABEL, v.get("label", "")))
        reasons = [str(r) for r in v.get("round_reasons", v.get("reasons", []))]
        if own in DRIFTS:
            held = (own, it, _carriers(own, metrics, baseline))
        if own != STABLE or held is None:
            out.append({"label": own, "reasons": reasons})
            continue
        label, first, names = held
        doubts = [d for d in (_doubt(n, label, metrics, baseline) for n in names) if d]
        if doubts:
            out.append({"label": label, "reasons": [f"held from round {first}: this round alone reads stable, but "
                                                    + "; ".join(doubts)] + [f"(this round: {r})" for r in reasons],
                        ROUND_LABEL: own, "round_reasons": reasons})
        else:
            out.append({"label": STABLE, "reasons": [f"recovered from {label} (round {first}): every metric that "
                                                     "carried it is back inside its threshold"] + reasons,
                        ROUND_LABEL: own, "round_reasons": reasons})
            held = None
    return out


def method_reading(labels: Sequence[str]) -> tuple[str, str, bool]:
    """(label, note, split) of one method at one round from its seeds' labels. Seeds split between "stable" and a
    drift label read "inconclusive" (``split`` True, ``note`` the split); otherwise the majority, ``note`` naming
    the other seeds' labels ("in 2 of 3 seeds (1 seed: stable)") or empty when they agree."""
    counts = Counter(labels)
    if not counts:
        return "", "", False
    if STABLE in counts and any(x in counts for x in DRIFTS):
        return INCONCLUSIVE, "; ".join(f"{n} seed{'s' if n > 1 else ''}: {x}" for x, n in counts.most_common()), True
    label, votes = counts.most_common(1)[0]
    others = "; ".join(f"{n} seed{'s' if n > 1 else ''}: {x or 'no verdict'}" for x, n in counts.most_common()
                       if x != label)
    return label, (f"in {votes} of {len(labels)} seeds ({others})" if others else ""), False
