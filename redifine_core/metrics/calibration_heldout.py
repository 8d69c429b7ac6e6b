"""The verdict's held-out calibration: null rates, detection curves near each threshold, false alarms per report.

Roles. The thresholds were chosen on the synthetic 48 px sets of ``calibration.py`` (the choosing sets). Every set
here is a toy dataset (``toy.registry.TOY_DATASETS``) drawn from seeds at or above SEED_BASE, which neither choose
nor tune anything: they only report rates. Each comparison is a verdict with the interval rule, as a chain reads it:
a current set against an "iteration 0" set, with FID against a third, D0.

- Detection curves: for every dataset, set size N and draw k, three fresh draws (D0, iteration 0, current); each
  family of PERTURBATIONS is applied to the current set at each strength (strength 0: the data-level null).
- Reports: a default report compares 3 methods x 5 iterations with their iteration 0, 15 comparisons. Each simulated
  report draws D0, 3 baselines and 15 currents of one unchanged dataset; it is a false alarm when any label is a drift.
- Model null: images the toy model generates at one constant CFG with different seeds, against one another.

``heldout_data(config)`` runs it and ``detection_table`` / ``report_rate`` read the stored result
(``verdict_calibration_heldout.json``); ``plot_curves`` draws the figure in docs/. docs/metrics.md has the numbers.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from .features import fid_from_features
from .intervals import INTERVAL_LEVEL, RESAMPLES, change_intervals
from .summary import SetSummary
from .verdict import ABSOLUTE_CHANGE, BLUR, DRIFT, INCONCLUSIVE, MODE_THRESHOLDS, OVER, STABLE, verdict

DATA_FILE = Path(__file__).with_name("verdict_calibration_heldout.json")
SEED_BASE = 9_000_000
"""Every held-out set's seed is at least this: apart from the toy models' training draws and the choosing sets."""
CODES = {STABLE: "s", BLUR: "b", OVER: "o", DRIFT: "d", INCONCLUSIVE: "i"}
"""One letter per label, so each draw's label is stored in a string."""
LABELS = {v: k for k, v in CODES.items()}
ALARMS = (BLUR, OVER, DRIFT)
"""The labels that are false alarms on a null set."""
FAMILY_WISE_LEVEL = 1 - 0.05 / 15
"""An alternative interval rule checked on the reports: a 95 % level shared by a default report's 15 comparisons
(Bonferroni), with FAMILY_WISE_RESAMPLES so that its 0.17 % tails rest on a few resamples each."""
FAMILY_WISE_RESAMPLES = 2000

PERTURBATIONS: dict[str, dict[str, Any]] = {
    "blur": {"label": BLUR, "effect": "hf_share", "unit": "Gaussian blur sigma (px)",
             "strengths": (0.3, 0.45, 0.6, 0.8)},
    "unsharp": {"label": OVER, "effect": "laplacian_var", "unit": "unsharp mask amount (radius 1 px)",
                "strengths": (0.25, 0.5, 1.0, 2.0)},
    "saturation": {"label": OVER, "effect": "saturation", "unit": "PIL ImageEnhance.Color factor",
                   "strengths": (1.1, 1.2, 1.35, 1.6)},
    "hue": {"label": DRIFT, "effect": "fid_ref", "unit": "hue rotation (degrees)", "strengths": (10, 20, 40, 80)},
}
"""family -> the label that detects it, the statistic whose change measures its effect, its strength unit and steps."""


@dataclass(frozen=True)
class HeldOutConfig:
    """What ``heldout_data`` builds: datasets, set sizes, draws per curve point, reports per size, model sets."""

    datasets: tuple[str, ...] = ("shapes", "textures", "patterned_shapes")
    set_sizes: tuple[int, ...] = (16, 32, 64)
    draws: int = 20
    report_sizes: tuple[int, ...] = (16, 32)
    reports: int = 20
    """Simulated reports per dataset and set size."""
    model_sets: int = 4
    """Toy-model sets of 64 images (different seeds, one CFG): the first is iteration 0, the others are compared."""
    model_cfg: float = 2.0
    model_steps: int = 10
    level: float = INTERVAL_LEVEL
    resamples: int = RESAMPLES
    """The interval rule: change_intervals' level and bootstrap resamples (the chain's by default)."""
    family_wise_reports: int = 10
    """Simulated reports per dataset and set size under FAMILY_WISE_LEVEL (0: none)."""
    family_wise_sizes: tuple[int, ...] = (32,)
    family_wise_draws: int = 10
    """Draws per dataset and curve point under FAMILY_WISE_LEVEL, at family_wise_sizes."""
    families: Mapping[str, tuple[float, ...]] = field(
        default_factory=lambda: {k: v["strengths"] for k, v in PERTURBATIONS.items()})


# ---- perturbations (uint8 [N, H, W, 3] in, float [0, 1] out) ---------------------------------------------------

def perturb(images: np.ndarray, family: str, strength: float) -> np.ndarray:
    """``images`` (uint8) with ``family`` applied at ``strength`` (0: unchanged), as float32 in [0, 1]."""
    from PIL import Image, ImageEnhance, ImageFilter
    from scipy.ndimage import gaussian_filter

    if family not in PERTURBATIONS:
        raise ValueError(f"family: {family!r} is not a perturbation; expected one of {', '.join(PERTURBATIONS)}")
    x = images.astype(np.float32) / 255.0
    if strength == 0:
        return x
    if family == "blur":
        return np.clip(gaussian_filter(x, sigma=(0, strength, strength, 0), mode="reflect"), 0, 1)
    out = np.empty_like(images)
    for i, img in enumerate(images):
        im = Image.fromarray(img)
        if family == "unsharp":
            im = im.filter(ImageFilter.UnsharpMask(radius=1, percent=int(round(100 * strength)), threshold=0))
        elif family == "saturation":
            im = ImageEnhance.Color(im).enhance(strength)
        else:
            hsv = np.asarray(im.convert("HSV")).copy()
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(round(strength * 256 / 360))) % 256
            im = Image.fromarray(hsv, "HSV").convert("RGB")
        out[i] = np.asarray(im)
    return out.astype(np.float32) / 255.0


# ---- one comparison ----------------------------------------------------------------------------------------------

def set_metrics(summary: SetSummary, d0: SetSummary) -> dict[str, float]:
    """The statistics the verdict reads, and fid_ref against ``d0``."""
    m = summary.statistics()
    m["fid_ref"] = fid_from_features(summary.feature_rows, d0.feature_rows)
    return m


def _passes(current: Mapping[str, float], baseline: Mapping[str, float]) -> set[str]:
    """The metrics whose change passes a threshold of MODE_THRESHOLDS (by size alone)."""
    out = set()
    for thresholds in MODE_THRESHOLDS.values():
        for name, t in thresholds.items():
            c, b = current[name], baseline[name]
            d = c - b if name in ABSOLUTE_CHANGE else (c - b) / max(abs(b), 1e-12)
            if (t < 0 and d <= t) or (t > 0 and d >= t):
                out.add(name)
    return out


def compare(cur: SetSummary, base: SetSummary, d0: SetSummary, base_metrics: Optional[Mapping[str, float]] = None,
            level: float = INTERVAL_LEVEL, resamples: int = RESAMPLES) -> tuple[str, dict[str, float]]:
    """The verdict's label for ``cur`` against ``base`` (D0 ``d0``) with the interval rule, and both sets' metrics.

    Intervals only decide whether a change past its threshold counts, so they are computed only when some change
    passes one (and FID's only when fid_ref's does): the label is the one the chain would give.
    """
    mb = dict(base_metrics) if base_metrics is not None else set_metrics(base, d0)
    mc = set_metrics(cur, d0)
    passed = _passes(mc, mb)
    if passed:
        mc.update(change_intervals(cur, base, d0 if "fid_ref" in passed else None, level=level, resamples=resamples))
    return verdict(mc, mb, n_images=len(cur)).label, mc


def effect(mc: Mapping[str, float], mb: Mapping[str, float], name: str) -> float:
    """The change of ``name`` in the verdict's units (relative, or absolute for ABSOLUTE_CHANGE)."""
    return mc[name] - mb[name] if name in ABSOLUTE_CHANGE else (mc[name] - mb[name]) / max(abs(mb[name]), 1e-12)


# ---- the runs ----------------------------------------------------------------------------------------------------

def _seed(dataset: int, n: int, k: int, role: int, block: int = 0) -> int:
    return SEED_BASE + 500_000 * block + 100_000 * dataset + 1_000 * n + 10 * k + role


def _summary(images: np.ndarray) -> SetSummary:
    return SetSummary.from_images(images, features="handcrafted")


def detection_curves(config: HeldOutConfig) -> dict[str, Any]:
    """``{dataset: {N: {family: {strength: {"labels": "sso...", "effects": [...]}}}}}``; strength "0" is the null."""
    from ..toy.registry import TOY_DATASETS

    out: dict[str, Any] = {}
    for j, name in enumerate(config.datasets):
        ds = TOY_DATASETS[name]
        for n in config.set_sizes:
            cell: dict[str, dict[str, dict[str, Any]]] = {f: {} for f in config.families}
            for k in range(config.draws):
                d0 = _summary(ds.images(n, _seed(j, n, k, 0))[0])
                base = _summary(ds.images(n, _seed(j, n, k, 1))[0])
                mb = set_metrics(base, d0)
                raw = ds.images(n, _seed(j, n, k, 2))[0]
                rule = (config.level, config.resamples)
                null_label, null_m = compare(_summary(perturb(raw, "blur", 0)), base, d0, mb, *rule)
                for family, strengths in config.families.items():
                    key = PERTURBATIONS[family]["effect"]
                    for s in (0,) + tuple(strengths):
                        label, mc = (null_label, null_m) if s == 0 else compare(
                            _summary(perturb(raw, family, s)), base, d0, mb, *rule)
                        point = cell[family].setdefault(f"{s:g}", {"labels": "", "effects": []})
                        point["labels"] += CODES[label]
                        point["effects"].append(float(f"{effect(mc, mb, key):.4g}"))
            out.setdefault(name, {})[str(n)] = cell
    return out


def simulated_reports(config: HeldOutConfig, methods: int = 3, iterations: int = 5) -> dict[str, Any]:
    """``{dataset: {N: ["sss...", ...]}}``: per report, the labels of its methods x iterations null comparisons
    (each method: one iteration-0 draw, ``iterations`` fresh draws; one D0 per report)."""
    from ..toy.registry import TOY_DATASETS

    out: dict[str, Any] = {}
    for j, name in enumerate(config.datasets):
        ds = TOY_DATASETS[name]
        for n in config.report_sizes:
            reports = []
            for r in range(config.reports):
                d0 = _summary(ds.images(n, _seed(j, n, r, 0, block=1))[0])
                labels = ""
                for m in range(methods):
                    base = _summary(ds.images(n, _seed(j, n, r, 1 + m, block=1))[0])
                    mb = set_metrics(base, d0)
                    for i in range(iterations):
                        cur = _summary(ds.images(n, _seed(j, n, r, 1 + methods + m * iterations + i, block=1))[0])
                        labels += CODES[compare(cur, base, d0, mb, config.level, config.resamples)[0]]
                reports.append(labels)
            out.setdefault(name, {})[str(n)] = reports
    return out


def model_null(config: HeldOutConfig, size: int = 64) -> dict[str, Any]:
    """The toy model's sets at one constant CFG, seeds apart: set 0 is iteration 0, each other set is compared with
    it at every N of config.set_sizes (its first N images), with real shapes as D0."""
    import torch

    from ..models import load_pipeline
    from ..sampling import generate
    from ..toy.registry import TOY_DATASETS

    ds = TOY_DATASETS["shapes"]
    pipe = load_pipeline("toy", device="cpu", dtype="float32")
    captions = ds.balanced_captions(size, SEED_BASE)
    torch.set_num_threads(1)
    sets = [generate(pipe, captions, config.model_cfg, config.model_steps, seeds=SEED_BASE + 1_000 * s,
                     batch_size=16).numpy() for s in range(config.model_sets)]
    d0_images = ds.images(size, SEED_BASE + 1)[0]
    out: dict[str, Any] = {"model": "toy", "dataset": "shapes", "cfg": config.model_cfg, "steps": config.model_steps,
                           "sampler": "ddim", "labels": {}}
    for n in config.set_sizes:
        if n > size:
            continue
        d0, base = _summary(d0_images[:n]), _summary(sets[0][:n])
        mb = set_metrics(base, d0)
        out["labels"][str(n)] = "".join(CODES[compare(_summary(s[:n]), base, d0, mb, config.level, config.resamples)[0]]
                                        for s in sets[1:])
    return out


def heldout_data(config: HeldOutConfig = HeldOutConfig(), with_model: bool = True) -> dict[str, Any]:
    """Every held-out result of ``config`` (deterministic: every set comes from a fixed seed)."""
    from ..toy.registry import TOY_DATASETS

    t = time.perf_counter()
    out: dict[str, Any] = {"config": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(config).items()},
                           "image_sizes": {d: TOY_DATASETS[d].size for d in config.datasets},
                           "curves": detection_curves(config), "reports": simulated_reports(config)}
    if config.family_wise_reports:
        alt = replace(config, level=FAMILY_WISE_LEVEL, resamples=FAMILY_WISE_RESAMPLES,
                      reports=config.family_wise_reports, report_sizes=config.family_wise_sizes)
        out["family_wise"] = {"level": alt.level, "resamples": alt.resamples, "reports": simulated_reports(alt),
                              "curves": detection_curves(replace(alt, set_sizes=config.family_wise_sizes,
                                                                 draws=config.family_wise_draws))}
    out["model_null"] = model_null(config) if with_model else None
    out["seconds"] = round(time.perf_counter() - t)
    return out


# ---- reading the stored result -------------------------------------------------------------------------------------

def load_heldout(path: Optional[Path] = None) -> dict[str, Any]:
    """The stored held-out result (``verdict_calibration_heldout.json``)."""
    return json.loads(Path(path or DATA_FILE).read_text(encoding="utf-8"))


def detection_table(data: Mapping[str, Any]) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """``{family: {strength: {N: {"hits", "alarms", "n", "effect"}}}}`` pooled over datasets: hits = the family's
    label (for strength 0: a false alarm, any drift label), alarms = any drift label, effect = the median change of
    the family's statistic."""
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for per_n in data["curves"].values():
        for n_text, cell in per_n.items():
            for family, points in cell.items():
                target = PERTURBATIONS[family]["label"]
                for s, point in points.items():
                    labels = [LABELS[c] for c in point["labels"]]
                    row = out.setdefault(family, {}).setdefault(s, {}).setdefault(
                        int(n_text), {"hits": 0, "alarms": 0, "n": 0, "effects": []})
                    row["hits"] += sum(lab in ALARMS if s == "0" else lab == target for lab in labels)
                    row["alarms"] += sum(lab in ALARMS for lab in labels)
                    row["n"] += len(labels)
                    row["effects"] += point["effects"]
    for family in out.values():
        for per_n in family.values():
            for row in per_n.values():
                row["effect"] = float(np.median(row.pop("effects")))
    return out


def null_counts(data: Mapping[str, Any]) -> dict[int, dict[str, int]]:
    """``{N: {label: count}}`` of the data-level null comparisons (strength 0, counted once per draw)."""
    out: dict[int, dict[str, int]] = {}
    for per_n in data["curves"].values():
        for n_text, cell in per_n.items():
            labels = next(iter(cell.values()))["0"]["labels"]
            counts = out.setdefault(int(n_text), {})
            for c in labels:
                counts[LABELS[c]] = counts.get(LABELS[c], 0) + 1
    return out


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a rate k / n."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def report_rate(data: Mapping[str, Any], n: Optional[int] = None) -> dict[str, Any]:
    """Reports with at least one false alarm (a drift label on a null comparison), over every dataset (at set size
    ``n``, or every size): ``{"alarmed", "reports", "comparisons", "alarms", "rate", "ci"}``."""
    reports = [r for per_n in data["reports"].values() for size, rs in per_n.items()
               if n is None or int(size) == n for r in rs]
    alarmed = sum(any(LABELS[c] in ALARMS for c in r) for r in reports)
    alarms = sum(LABELS[c] in ALARMS for r in reports for c in r)
    return {"alarmed": alarmed, "reports": len(reports), "comparisons": sum(len(r) for r in reports),
            "alarms": alarms, "rate": alarmed / len(reports), "ci": clopper_pearson(alarmed, len(reports))}


def plot_curves(data: Mapping[str, Any], path: Path) -> None:
    """Detection rate against strength, one panel per family and one line per set size, with 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = detection_table(data)
    fig, axes = plt.subplots(1, len(table), figsize=(3.2 * len(table), 2.9), sharey=True)
    for ax, (family, points) in zip(np.atleast_1d(axes), table.items()):
        spec = PERTURBATIONS[family]
        strengths = sorted(points, key=float)
        for n in sorted(points[strengths[0]]):
            xs = [float(s) for s in strengths if s != "0"]
            rows = [points[s][n] for s in strengths if s != "0"]
            rate = [r["hits"] / r["n"] for r in rows]
            cis = [clopper_pearson(r["hits"], r["n"]) for r in rows]
            ax.errorbar(xs, rate, yerr=[[p - c[0] for p, c in zip(rate, cis)], [c[1] - p for p, c in zip(rate, cis)]],
                        marker="o", ms=3, capsize=2, label=f"N = {n}")
        ax.set_title(f"{family} -> {spec['label'].replace('drifting ', '')}", fontsize=9)
        ax.set_xlabel(spec["unit"], fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[0].set_ylabel("detection rate", fontsize=8)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _pct(x: float) -> str:
    return f"{x * 100:+.0f} %".replace("-", "−")


def detection_markdown(data: Mapping[str, Any]) -> list[str]:
    """The rows of docs/metrics.md's detection table: family, strength, then per N "hits (any drift label) / n
    (median effect)"; the null rows count false alarms."""
    table = detection_table(data)
    sizes = sorted({n for points in table.values() for per_n in points.values() for n in per_n})
    rows = ["| family (statistic) | strength | " + " | ".join(f"N = {n}" for n in sizes) + " |",
            "|---|---|" + "---|" * len(sizes)]
    for family, points in table.items():
        for s in sorted(points, key=float):
            cells = []
            for r in (points[s][n] for n in sizes):
                any_label = "" if s == "0" else f" ({r['alarms']})"
                cells.append(f"{r['hits']}{any_label} / {r['n']} ({_pct(r['effect'])})")
            name = f"{family} ({PERTURBATIONS[family]['effect']})" if s == "0" else ""
            rows.append(f"| {name} | {'null' if s == '0' else s} | " + " | ".join(cells) + " |")
    return rows


def report_markdown(data: Mapping[str, Any]) -> list[str]:
    """The rows of docs/metrics.md's false-alarm table: per interval rule, set size and dataset (then all three),
    the reports with at least one alarm."""
    rows = ["| interval rule | images per set | dataset | reports with ≥ 1 false alarm | rate [95 % CI] | drift "
            "labels in all comparisons |", "|---|---|---|---|---|---|"]
    rules = [(f"{INTERVAL_LEVEL:.0%}, {RESAMPLES} resamples (the chain's)", data)]
    if data.get("family_wise"):
        fw = data["family_wise"]
        rules.append((f"{fw['level']:.2%}, {fw['resamples']} resamples (family-wise)", fw))
    for rule, d in rules:
        for n in sorted({int(s) for per_n in d["reports"].values() for s in per_n}):
            for name, part in [(k, {"reports": {k: v}}) for k, v in d["reports"].items()] + [("**all**", d)]:
                r = report_rate(part, n)
                rows.append(f"| {rule} | {n} | {name} | {r['alarmed']} of {r['reports']} | {r['rate']:.0%} "
                            f"[{r['ci'][0]:.0%}, {r['ci'][1]:.0%}] | {r['alarms']} of {r['comparisons']} |")
    return rows


def main() -> int:  # pragma: no cover - python -m redifine_core.metrics.calibration_heldout [--no-model]
    import sys

    from ..atomic import write_text

    data = heldout_data(with_model="--no-model" not in sys.argv)
    write_text(DATA_FILE, json.dumps(data, separators=(",", ":")) + "\n")
    plot_curves(data, Path(__file__).resolve().parents[2] / "docs" / "verdict-calibration.png")
    print("\n".join(detection_markdown(data) + [""] + report_markdown(data)))
    print("null", null_counts(data), "model", data["model_null"], "seconds", data["seconds"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
