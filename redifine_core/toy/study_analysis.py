"""The schedule study's analysis: positive controls, paired equivalence tests and the rule that sets ``redifine``.

Input is the study's per-seed table (one row per dataset, method, seed and iteration, with every statistic; one
``D0`` row per dataset holds the reference set's statistics), so the analysis reruns from the committed CSV without
the runs. Every rule here is the one fixed in docs/study-protocol.md: endpoints averaged over the last cycle, the best
constant per dataset, TOST and the "at least as good" side of it against a fixed margin, Holm across datasets x
measures, and the selection of the default reading.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

from scipy import stats

from .. import atomic

REFERENCE = "D0"
"""The method name of a dataset's reference row (the user's images) in the per-seed table."""
FID, FIDELITY = "fid_ref", "fidelity"
MEASURES: tuple[str, ...] = (FID, FIDELITY)
"""The primary measures; for fidelity higher is better, so its differences are sign-flipped (positive = worse)."""
HIGHER_IS_BETTER = {FIDELITY}


@dataclass(frozen=True)
class StudyPlan:
    """The study's fixed choices (docs/study-protocol.md)."""

    constants: tuple[str, ...] = ("cfg-1", "cfg-1.5", "cfg-2.5", "cfg-4", "cfg-7.5")
    readings: tuple[str, ...] = ("redifine_decay", "redifine_rising", "redifine_alternate", "redifine_chain")
    lowest: str = "cfg-1"
    highest: str = "cfg-7.5"
    endpoint_iterations: tuple[int, ...] = (4, 5)
    fid_margin: float = 0.15  # relative to the best constant's mean FID endpoint
    fidelity_margin: float = 0.05  # absolute
    collapse_change: float = 0.25  # control 2: both statistics move by at least this fraction against D0
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if not self.constants or not self.readings:
            raise ValueError("a study plan needs at least one constant and one reading")
        if self.lowest not in self.constants or self.highest not in self.constants:
            raise ValueError(f"lowest={self.lowest!r} and highest={self.highest!r} must be among the constants")
        if not 0 < self.alpha < 1 or self.fid_margin <= 0 or self.fidelity_margin <= 0:
            raise ValueError("alpha must be in (0, 1) and both margins > 0")


PLAN = StudyPlan()

Row = dict[str, object]


# ---- the table ------------------------------------------------------------------------------------------------------
def read_table(path: Union[str, Path]) -> list[Row]:
    """The per-seed table as rows; ``seed`` and ``iteration`` as ints, every other numeric column as floats."""
    with open(path, newline="", encoding="utf-8") as f:
        return [_typed(r) for r in csv.DictReader(f)]


def write_table(rows: Sequence[Mapping[str, object]], path: Union[str, Path]) -> Path:
    """Write rows as CSV atomically; columns: dataset, method, seed, iteration, then the union of the rest, sorted."""
    first = ["dataset", "method", "seed", "iteration"]
    rest = sorted({k for r in rows for k in r} - set(first))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=first + rest, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r.get(k, "")) for k in first + rest})
    atomic.write_text(path, buf.getvalue())
    return Path(path)


def _cell(v: object) -> object:
    return repr(float(v)) if isinstance(v, float) else v


def _typed(r: Mapping[str, str]) -> Row:
    out: Row = {}
    for k, v in r.items():
        if k in ("dataset", "method"):
            out[k] = v
        elif k in ("seed", "iteration"):
            out[k] = int(v)
        elif v != "":
            out[k] = float(v)
    return out


def endpoints(rows: Iterable[Row], measure: str, plan: StudyPlan = PLAN) -> dict[str, dict[str, dict[int, float]]]:
    """``{dataset: {method: {seed: mean of measure over the plan's endpoint iterations}}}`` for complete lanes."""
    acc: dict[tuple[str, str, int], dict[int, float]] = {}
    for r in rows:
        if r["method"] != REFERENCE and r["iteration"] in plan.endpoint_iterations and measure in r:
            acc.setdefault((r["dataset"], r["method"], r["seed"]), {})[r["iteration"]] = float(r[measure])
    out: dict[str, dict[str, dict[int, float]]] = {}
    for (ds, m, s), per_iter in sorted(acc.items()):
        if len(per_iter) == len(plan.endpoint_iterations):
            out.setdefault(ds, {}).setdefault(m, {})[s] = sum(per_iter.values()) / len(per_iter)
    return out


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# ---- positive controls ----------------------------------------------------------------------------------------------
def controls(rows: Sequence[Row], plan: StudyPlan = PLAN) -> dict[str, dict[str, object]]:
    """Per dataset: control 1 (at iteration 0 the lowest CFG is softer than the highest on both sharpness
    statistics) and control 2's two halves (by the last iteration the lowest CFG blurs and the highest over-guides,
    both statistics by at least ``collapse_change`` against D0), with the mean values they rest on."""
    last = max(r["iteration"] for r in rows if r["method"] != REFERENCE)
    out: dict[str, dict[str, object]] = {}
    for ds in sorted({r["dataset"] for r in rows}):
        def mean_of(method: str, iteration: int, key: str) -> float:
            vals = [float(r[key]) for r in rows if r["dataset"] == ds and r["method"] == method
                    and r["iteration"] == iteration]
            return _mean(vals) if vals else math.nan

        ref = [r for r in rows if r["dataset"] == ds and r["method"] == REFERENCE]
        rec: dict[str, object] = {}
        soft = True
        for key in ("hf_share", "laplacian_var"):
            lo, hi = mean_of(plan.lowest, 0, key), mean_of(plan.highest, 0, key)
            rec[f"iter0_{key}"] = {plan.lowest: lo, plan.highest: hi}
            soft = soft and lo < hi
        rec["cfg_acts_as_sd"] = soft
        blur = over = bool(ref)
        for key in ("hf_share", "laplacian_var"):
            d0 = float(ref[0][key]) if ref else math.nan
            lo = mean_of(plan.lowest, last, key) / d0 - 1
            hi = mean_of(plan.highest, last, key) / d0 - 1
            rec[f"last_{key}_change"] = {plan.lowest: lo, plan.highest: hi}
            blur = blur and lo <= -plan.collapse_change
            over = over and hi >= plan.collapse_change
        rec["blur_shows"], rec["over_guidance_shows"] = blur, over
        out[ds] = rec
    return out


# ---- tests ------------------------------------------------------------------------------------------------------------
def tost(diffs: Sequence[float], margin: float) -> dict[str, float]:
    """Paired TOST of mean(diffs) against (-margin, +margin) with Student t; ``p_upper`` is the one-sided test that
    the mean is below +margin ("not worse by the margin"), ``p_tost`` the larger of the two one-sided p-values."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"TOST needs at least 2 paired differences, got {n}")
    m = _mean(diffs)
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    df = n - 1
    if se == 0:
        p_lower = 0.0 if m > -margin else 1.0
        p_upper = 0.0 if m < margin else 1.0
        half = 0.0
    else:
        p_lower = float(stats.t.sf((m + margin) / se, df))
        p_upper = float(stats.t.cdf((m - margin) / se, df))
        half = float(stats.t.ppf(0.95, df)) * se
    return {"mean": m, "ci90_low": m - half, "ci90_high": m + half, "margin": margin, "n": n,
            "p_lower": p_lower, "p_upper": p_upper, "p_tost": max(p_lower, p_upper)}


def paired_t(diffs: Sequence[float]) -> dict[str, float]:
    """Two-sided paired t-test of mean(diffs) = 0, with its 95 % interval."""
    n = len(diffs)
    m = _mean(diffs)
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    se = sd / math.sqrt(n)
    if se == 0:
        return {"mean": m, "ci95_low": m, "ci95_high": m, "p": 1.0 if m == 0 else 0.0, "n": n}
    half = float(stats.t.ppf(0.975, n - 1)) * se
    return {"mean": m, "ci95_low": m - half, "ci95_high": m + half,
            "p": float(2 * stats.t.sf(abs(m) / se, n - 1)), "n": n}


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (monotone, capped at 1) for a family keyed by name."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    k_total, running, out = len(order), 0.0, {}
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (k_total - rank) * pvalues[key]))
        out[key] = running
    return out


def _diffs(a: Mapping[int, float], b: Mapping[int, float], measure: str) -> list[float]:
    sign = -1.0 if measure in HIGHER_IS_BETTER else 1.0
    return [sign * (a[s] - b[s]) for s in sorted(set(a) & set(b))]


# ---- the analysis -----------------------------------------------------------------------------------------------------
def analyse(rows: Sequence[Row], plan: StudyPlan = PLAN) -> dict:
    """Controls, best constants, every reading against the best constant and against the highest constant, the
    qualifying datasets per reading and the selected reading. JSON-able."""
    ends = {m: endpoints(rows, m, plan) for m in MEASURES}
    ctl = controls(rows, plan)
    eligible = [ds for ds in sorted(ends[FID]) if ctl.get(ds, {}).get("cfg_acts_as_sd")]
    best = {ds: min((c for c in plan.constants if c in ends[FID][ds]),
                    key=lambda c: _mean(ends[FID][ds][c].values())) for ds in sorted(ends[FID])}
    readings: dict[str, dict] = {}
    for reading in plan.readings:
        vs_best: dict[str, dict[str, dict]] = {}
        vs_high: dict[str, dict[str, dict]] = {}
        for ds in sorted(ends[FID]):
            if reading not in ends[FID][ds]:
                continue
            b, fid_b = best[ds], _mean(ends[FID][ds][best[ds]].values())
            for measure in MEASURES:
                margin = plan.fid_margin * fid_b if measure == FID else plan.fidelity_margin
                e = ends[measure][ds]
                vs_best.setdefault(ds, {})[measure] = tost(_diffs(e[reading], e[b], measure), margin)
                if plan.highest in e:
                    vs_high.setdefault(ds, {})[measure] = paired_t(_diffs(e[reading], e[plan.highest], measure))
        _holm_into(vs_best, ("p_tost", "p_upper"))
        _holm_into(vs_high, ("p",))
        qualifies = [ds for ds in eligible if ds in vs_best
                     and all(vs_best[ds][m]["p_upper_holm"] < plan.alpha for m in MEASURES)]
        equivalent = [ds for ds in eligible if ds in vs_best
                      and all(vs_best[ds][m]["p_tost_holm"] < plan.alpha for m in MEASURES)]
        ratio = [_mean(ends[FID][ds][reading].values()) / _mean(ends[FID][ds][best[ds]].values())
                 for ds in eligible if ds in vs_best]
        readings[reading] = {"vs_best": vs_best, "vs_highest": vs_high, "qualifies": qualifies,
                             "equivalent": equivalent, "fid_ratio_to_best": _mean(ratio) if ratio else math.inf}
    return {"controls": ctl, "eligible": eligible, "best_constant": best, "readings": readings,
            "selected": select(readings), "claim_supported": _claim(readings, eligible)}


def _holm_into(family: dict[str, dict[str, dict]], keys: Sequence[str]) -> None:
    for key in keys:
        adjusted = holm({f"{ds}/{m}": t[key] for ds, per in family.items() for m, t in per.items()})
        for ds, per in family.items():
            for m, t in per.items():
                t[f"{key}_holm"] = adjusted[f"{ds}/{m}"]


def select(readings: Mapping[str, Mapping]) -> str:
    """The reading that qualifies on the most eligible datasets; ties by the lower mean FID ratio to the best constant."""
    return min(readings, key=lambda r: (-len(readings[r]["qualifies"]), readings[r]["fid_ratio_to_best"], r))


def _claim(readings: Mapping[str, Mapping], eligible: Sequence[str]) -> bool:
    return bool(eligible) and any(set(eligible) <= set(r["qualifies"]) for r in readings.values())
