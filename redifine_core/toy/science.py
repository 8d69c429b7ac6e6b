"""The toy study as a command: its chain config, its run, and the summary that answers the paper's questions.

``python -m redifine_core.toy.science RUN_DIR --run [--seeds 5]`` runs (or, when RUN_DIR holds a run, resumes) the
``science`` preset: constant CFG 1.5, 2, 3, 5 and 7.5 without condition drop; ReDiFine; its two halves alone
(condition drop with constant CFG 7.5; the ``redifine`` schedule without condition drop); and every other reading of
the schedule (presets.py) with condition drop. Every method uses the same seeds, captions and per-image seeds (a
paired comparison), on the toy data at the ``SCIENCE`` settings of toy.demo, for 5 iterations.

``python -m redifine_core.toy.science RUN_DIR [--plot FILE] [--json FILE]`` reads any toy run folder (a study or a
``redifine demo``), scores every generated set with the attribute checker, prints a table of mean +- std over seeds
and, for a study, the answers: does low CFG drift to blur, high CFG to over-guidance, is ReDiFine's final drift
within the best constant CFG's 95 % interval, and which half of ReDiFine does the work.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..chain.run_folder import RunFolder
from ..progress import CancelFlag, ProgressCallback
from .checker import check

KEYS: tuple[str, ...] = ("fidelity", "hf_share", "laplacian_var", "saturation", "clipped_fraction", "colourfulness",
                         "diversity", "fid_ref")
#: Metrics whose relative change from iteration 0 makes up the drift score.
DRIFT_KEYS: tuple[str, ...] = ("hf_share", "laplacian_var", "saturation", "colourfulness", "diversity")

# ---- the science preset -------------------------------------------------------------------------------------------
CONSTANT_CFGS: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0, 7.5)
"""The constant CFG scales of the study (no condition drop)."""
LOW_CFGS, HIGH_CFGS = (1.5, 2.0), (7.5,)
"""The scales the questions "does low CFG blur?" and "does high CFG over-guide?" are asked of."""
HALF_CFG = 7.5
"""The constant CFG of "condition drop alone": the scale ReDiFine replaces (its schedule starts there)."""
STUDY_SEEDS = 5
"""Replicate seeds of the study (at least 5: the issue's bar for a 95 % interval worth reading)."""
REDIFINE, DROP_ONLY, SCHEDULE_ONLY = "redifine", f"drop-cfg-{HALF_CFG:g}", "schedule-no-drop"


def cfg_name(w: float) -> str:
    """The method name of constant CFG ``w``: ``cfg-7.5``."""
    return f"cfg-{w:g}"


def reading_name(preset: str) -> str:
    """The method name of a schedule reading with condition drop: ``redifine_rising-drop``."""
    return REDIFINE if preset == "redifine" else f"{preset}-drop"


def science_methods(cond_drop: Optional[float] = None) -> tuple:
    """Every method of the study (MethodConfig), in report order; ``cond_drop`` defaults to ReDiFine's."""
    from ..chain import REDIFINE_COND_DROP, REDIFINE_SCHEDULE, MethodConfig
    from ..presets import READINGS, REDIFINE_READING

    drop = REDIFINE_COND_DROP if cond_drop is None else cond_drop
    methods = [MethodConfig(name=cfg_name(w), kind="baseline", cfg=w) for w in CONSTANT_CFGS]
    methods.append(MethodConfig(name=REDIFINE, kind="redifine", schedule=REDIFINE_SCHEDULE, cond_drop=drop))
    methods.append(MethodConfig(name=DROP_ONLY, kind="custom", cfg=HALF_CFG, cond_drop=drop))
    methods.append(MethodConfig(name=SCHEDULE_ONLY, kind="custom", schedule=REDIFINE_SCHEDULE, cond_drop=0.0))
    for p in READINGS:
        if p.name != REDIFINE_READING:  # the reading behind `redifine` runs once, as ReDiFine itself
            methods.append(MethodConfig(name=reading_name(p.name), kind="custom", schedule=p.name, cond_drop=drop))
    return tuple(methods)


def science_config(seeds: Union[int, Sequence[int]] = STUDY_SEEDS, settings: Any = None):
    """The study's ChainConfig: ``science_methods()`` x ``seeds`` (a count, giving seeds 0..n-1, or the seeds) at the
    toy demo's ``SCIENCE`` settings (or ``settings``). Raises ValueError for a bad seed count before any work."""
    from ..chain import ChainConfig
    from .demo import SCIENCE, seed_tuple, train_config

    settings = settings or SCIENCE
    seeds = seed_tuple(seeds, STUDY_SEEDS)
    return ChainConfig(iterations=settings.iterations, methods=science_methods(settings.redifine_cond_drop),
                       train=train_config(settings), steps=settings.sample_steps, sampler="ddim",
                       seeds=tuple(seeds), batch_size=64)


def run_science(out_dir: Union[str, Path], seeds: Union[int, Sequence[int]] = STUDY_SEEDS,
                progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None, *,
                model: Union[str, Path] = "toy", settings: Any = None, resume: bool = False) -> Path:
    """Run (or with ``resume``, continue) the study into ``out_dir``; returns report.html's path. See run_demo."""
    from .demo import SCIENCE, run_toy_chain

    settings = settings or SCIENCE
    config = science_config(seeds, settings)  # validates before any work
    return run_toy_chain(out_dir, config, settings, progress, cancel, model=model, resume=resume)


def open_rgb(paths) -> list[Image.Image]:
    """The images at ``paths`` as RGB PIL images, each file closed once read."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def iteration_records(run_dir: str | Path) -> dict[str, dict[int, dict[int, dict[str, float]]]]:
    """``{method: {seed: {iteration: metrics + "fidelity" + checker accuracies}}}`` for every finished iteration."""
    folder = RunFolder(run_dir)
    out: dict[str, dict[int, dict[int, dict[str, float]]]] = {}
    for r in folder.read().records:
        if not r.done:
            continue
        images = open_rgb(folder.iteration_images(r.method, r.seed, r.iteration))
        fid = check(images, folder.read_captions(r.method, r.seed, r.iteration))
        rec: dict = dict(r.metrics)
        rec.update({"fidelity": fid["full"], "fid_shape": fid["shape"], "fid_color": fid["color"],
                    "fid_background": fid["background"]})
        rec["verdict"] = (r.verdict or {}).get("label", "")
        out.setdefault(r.method, {}).setdefault(r.seed, {})[r.iteration] = rec
    return out


def reference_record(run_dir: str | Path) -> dict[str, float]:
    """Metrics and fidelity of D0 (the run's reference images)."""
    data = RunFolder(run_dir).read()
    fid = check(open_rgb(RunFolder(run_dir).reference_images()), data.captions)
    rec = dict(data.reference_metrics)
    rec["fidelity"] = fid["full"]
    return rec


def drift(rec: dict[str, float], base: dict[str, float], keys: Sequence[str] = DRIFT_KEYS) -> float:
    """Mean absolute relative change of ``keys`` from ``base`` (iteration 0): 0 = unchanged."""
    vals = [abs(rec[k] - base[k]) / max(abs(base[k]), 1e-12) for k in keys if k in rec and k in base]
    return float(np.mean(vals)) if vals else float("nan")


def summarise(records) -> dict[str, dict[int, dict[str, tuple[float, float, int]]]]:
    """``{method: {iteration: {key: (mean, std, n_seeds)}}}`` including ``drift`` from the seed's own iteration 0."""
    out: dict = {}
    for method, seeds in records.items():
        iters = sorted({i for s in seeds.values() for i in s})
        for i in iters:
            rows = [s[i] for s in seeds.values() if i in s]
            stats = {}
            for k in KEYS + ("drift",):
                if k == "drift":
                    vals = [drift(s[i], s[0]) for s in seeds.values() if i in s and 0 in s]
                else:
                    vals = [r[k] for r in rows if k in r]
                if vals:
                    stats[k] = (float(np.mean(vals)), float(np.std(vals)), len(vals))
            out.setdefault(method, {})[i] = stats
    return out


def format_table(summary, keys: Sequence[str] = KEYS + ("drift",)) -> str:
    head = "method          iter  " + "  ".join(f"{k:>17}" for k in keys)
    lines = [head, "-" * len(head)]
    for method, iters in summary.items():
        for i, st in iters.items():
            cells = []
            for k in keys:
                if k in st:
                    m, s, _ = st[k]
                    cells.append(f"{m:9.4g}±{s:<7.2g}")
                else:
                    cells.append(" " * 17)
            n = max((v[2] for v in st.values()), default=0)
            lines.append(f"{method:<15} {i:>4}  " + "  ".join(cells) + f"  (n={n})")
    return "\n".join(lines)


# ---- the study's answers: 95 % intervals over seeds ----------------------------------------------------------------
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 30: 2.042}
#: (metric, "rel" or "abs" change, the sign it takes under blur); the over-guidance sign is the opposite.
CHANGE_KEYS: tuple[tuple[str, str, int], ...] = (
    ("hf_share", "rel", -1), ("laplacian_var", "rel", -1), ("spectral_slope", "abs", -1),
    ("saturation", "rel", 0), ("clipped_fraction", "abs", 0), ("colourfulness", "rel", 0))
BLUR_KEYS = ("hf_share", "laplacian_var", "spectral_slope")
OVER_KEYS = ("hf_share", "laplacian_var", "spectral_slope", "saturation", "clipped_fraction", "colourfulness")


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % Student-t interval of the mean over seeds (low = high = mean for one value)."""
    vals = [float(v) for v in values if math.isfinite(float(v))]
    if not vals:
        return (float("nan"),) * 3
    m = float(np.mean(vals))
    if len(vals) < 2:
        return m, m, m
    df = len(vals) - 1
    t = _T975[max(k for k in _T975 if k <= df)]  # the next smaller table entry: a slightly wider interval
    half = t * float(np.std(vals, ddof=1)) / math.sqrt(len(vals))
    return m, m - half, m + half


def _final_iteration(seeds: dict) -> Optional[int]:
    """The last iteration every seed of a method has finished (with its iteration 0)."""
    common = set.intersection(*(set(s) for s in seeds.values())) if seeds else set()
    return max(common) if common and 0 in common else None


def study(records) -> dict:
    """Per method: final drift and fidelity (95 % intervals), per-iteration intervals, signed metric changes."""
    out: dict = {"methods": {}}
    for method, seeds in records.items():
        last = _final_iteration(seeds)
        if last is None:
            continue
        per_iter = {}
        for i in range(last + 1):
            per_iter[i] = {"drift": interval([drift(s[i], s[0]) for s in seeds.values()]),
                           "fidelity": interval([s[i]["fidelity"] for s in seeds.values()])}
        changes = {}
        for key, kind, _ in CHANGE_KEYS:
            vals = [(s[last][key] - s[0][key]) / (max(abs(s[0][key]), 1e-12) if kind == "rel" else 1.0)
                    for s in seeds.values() if key in s[last] and key in s[0]]
            if vals:
                changes[key] = interval(vals)
        out["methods"][method] = {"final_iteration": last, "seeds": len(seeds), "iterations": per_iter,
                                  "changes": changes, "drift": per_iter[last]["drift"],
                                  "fidelity": per_iter[last]["fidelity"]}
    consts = {m: v for m, v in out["methods"].items() if m in {cfg_name(w) for w in CONSTANT_CFGS}}
    out["best_constant"] = min(consts, key=lambda m: consts[m]["drift"][0]) if consts else None
    return out


def _mode_thresholds() -> dict[int, dict[str, float]]:
    """The smallest change of each metric the verdict counts as a sign of blur (-1) or over-guidance (+1), signed, in
    the units of CHANGE_KEYS (relative or absolute): the verdict module's own thresholds."""
    from ..metrics.verdict import (BLUR_DROP, CLIPPED_RISE, COLOURFULNESS_RISE, SATURATION_RISE, SHARP_RISE,
                                   SLOPE_FLATTER, SLOPE_STEEPER)

    return {-1: {"hf_share": -BLUR_DROP, "laplacian_var": -BLUR_DROP, "spectral_slope": -SLOPE_STEEPER},
            +1: {"hf_share": SHARP_RISE, "laplacian_var": SHARP_RISE, "spectral_slope": SLOPE_FLATTER,
                 "saturation": SATURATION_RISE, "clipped_fraction": CLIPPED_RISE, "colourfulness": COLOURFULNESS_RISE}}


def _direction(changes: dict, keys: Sequence[str], sign: int) -> tuple[str, list[str]]:
    """yes, partly, no or unclear for one collapse mode, and the evidence.

    yes: at least 2 metrics' intervals lie entirely on the mode's side of 0; partly: exactly 1. no: none does, and every
    interval also rules out a change as large as the verdict's threshold for that mode (so "no" means the study can
    exclude a change a verdict would flag, not only that it did not see one). unclear: otherwise, and always with a
    single seed (no interval).
    """
    limits = _mode_thresholds()[sign]
    clear, text, spread, excluded = 0, [], False, True
    for k in keys:
        if k not in changes:
            continue
        m, lo, hi = changes[k]
        kind = dict((c[0], c[1]) for c in CHANGE_KEYS)[k]
        fmt = (lambda x: f"{x:+.0%}") if kind == "rel" else (lambda x: f"{x:+.3g}")
        text.append(f"{k} {fmt(m)} [{fmt(lo)}, {fmt(hi)}]")
        spread |= hi > lo
        clear += (hi < 0) if sign < 0 else (lo > 0)
        excluded &= (lo > limits[k]) if sign < 0 else (hi < limits[k])
    if not spread:
        return "unclear", text
    if clear:
        return ("yes" if clear >= 2 else "partly"), text
    return ("no" if excluded else "unclear"), text


def _ival(x: tuple[float, float, float]) -> str:
    return f"{x[0]:.3f} [{x[1]:.3f}, {x[2]:.3f}]"


def format_study(result: dict) -> str:
    """Drift from iteration 0 and prompt fidelity per method and iteration: mean [95 % interval] over seeds."""
    lines = [f"{'method':<24} iter  {'drift from iteration 0':>28}  {'prompt fidelity':>28}"]
    for method, m in result["methods"].items():
        for i, st in m["iterations"].items():
            lines.append(f"{method:<24} {i:>4}  {_ival(st['drift']):>28}  {_ival(st['fidelity']):>28}")
    return "\n".join(lines)


def answers(result: dict) -> list[str]:
    """The study's questions answered in plain lines from ``study()``'s numbers, "no" and "unclear" included."""
    ms, lines = result["methods"], []
    for w in LOW_CFGS:
        m = ms.get(cfg_name(w))
        if m:
            verdict, ev = _direction(m["changes"], BLUR_KEYS, -1)
            lines.append(f"Does low CFG {w:g} drift towards blur? {verdict}: " + "; ".join(ev) + ".")
    for w in HIGH_CFGS:
        m = ms.get(cfg_name(w))
        if m:
            verdict, ev = _direction(m["changes"], OVER_KEYS, +1)
            lines.append(f"Does high CFG {w:g} drift towards over-guidance? {verdict}: " + "; ".join(ev) + ".")
    best = result.get("best_constant")
    if best:
        lines.append(f"Best constant CFG by final drift: {best}, drift {_ival(ms[best]['drift'])}.")
        _, lo, hi = ms[best]["drift"]
        for name in [REDIFINE] + [n for n in ms if n.endswith("-drop") and n != SCHEDULE_ONLY]:
            if name in ms:
                d = ms[name]["drift"]
                where = ("within" if lo <= d[0] <= hi else "below (less drift than)" if d[0] < lo
                         else "above (more drift than)")
                lines.append(f"{name}: final drift {_ival(d)}, {where} {best}'s interval (untuned: the preset "
                             "defaults, not fitted to this data).")
    if REDIFINE in ms and DROP_ONLY in ms and SCHEDULE_ONLY in ms:
        r = ms[REDIFINE]["drift"][0]
        halves = {h: ms[h]["drift"] for h in (DROP_ONLY, SCHEDULE_ONLY)}
        closer = min(halves, key=lambda h: abs(halves[h][0] - r))
        what = {DROP_ONLY: "condition drop", SCHEDULE_ONLY: "the CFG schedule"}
        lines.append(f"Which half of ReDiFine does the work? {what[closer]} ({closer}: drift {_ival(halves[closer])}"
                     f"; the other, {[h for h in halves if h != closer][0]}: "
                     f"{_ival(halves[[h for h in halves if h != closer][0]])}; ReDiFine {_ival(ms[REDIFINE]['drift'])}"
                     ").")
    n = min((m["seeds"] for m in ms.values()), default=0)
    if n < STUDY_SEEDS:
        lines.append(f"Only {n} seed(s): below the study's {STUDY_SEEDS}, these intervals are too wide to settle much.")
    return lines


# ---- findings: what the study says about each method, for checking verdicts against it ------------------------------
FINDINGS_FILE = Path(__file__).with_name("science_findings.json")
"""The committed findings of the last study run (``--findings``), read by the verdict-consistency test."""
DEMO_METHODS = {"baseline-low": cfg_name(2.0), "baseline-high": cfg_name(7.5), "redifine": REDIFINE}
"""Each demo method and the study method with the same settings."""
_OPPOSITE = {"drifting to blur": "blur", "drifting to over-guidance": "over-guidance"}


def findings(result: dict) -> dict[str, dict[str, str]]:
    """``{method: {"blur": ..., "over-guidance": ...}}`` (yes, no, partly or unclear) from ``study()``, by the answers'
    rule."""
    return {m: {"blur": _direction(v["changes"], BLUR_KEYS, -1)[0],
                "over-guidance": _direction(v["changes"], OVER_KEYS, +1)[0]} for m, v in result["methods"].items()}


def contradictions(labels: dict[str, dict[int, list[str]]], found: dict[str, dict[str, str]],
                   methods: Optional[dict[str, str]] = None) -> list[str]:
    """Verdict cells that name a direction the study found absent ("no") for that method: one line each.

    ``labels``: ``{method: {seed: [label per iteration]}}`` (ChainResult.verdicts); ``methods`` maps a run's method
    names to the study's (default: DEMO_METHODS, then the name itself).
    """
    methods = {**DEMO_METHODS, **(methods or {})}
    out = []
    for method, seeds in labels.items():
        study_method = methods.get(method, method)
        for seed, per_iter in seeds.items():
            for i, label in enumerate(per_iter):
                mode = _OPPOSITE.get(label)
                if mode and found.get(study_method, {}).get(mode) == "no":
                    out.append(f"{method} seed {seed} iteration {i}: '{label}', but the study found no {mode} for "
                               f"{study_method}")
    return out


def plot(summary, reference: dict[str, float] | None, path: str | Path,
         keys: Sequence[str] = ("fidelity", "hf_share", "laplacian_var", "saturation", "diversity", "drift")) -> Path:
    """Curves of ``keys`` over iterations, one line per method with seed std as error bars; D0 as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), dpi=80)
    for ax, k in zip(np.ravel(axes), keys):
        for n, (method, iters) in enumerate(summary.items()):
            xs = [i for i in iters if k in iters[i]]
            style = dict(marker="os^Dv"[n // 10 % 5], color=f"C{n % 10}", ls="-" if n < 10 else "--")  # > 10 lines
            ax.errorbar(xs, [iters[i][k][0] for i in xs], yerr=[iters[i][k][1] for i in xs], capsize=3, label=method,
                        **style)
        if reference and k in reference:
            ax.axhline(reference[k], color="gray", ls="--", lw=1, label="D0")
        ax.set_title(k)
        ax.set_xlabel("iteration")
    np.ravel(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    from ..atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def grid(run_dir: str | Path, path: str | Path, seed: int = 0, n: int = 12, scale: int = 2) -> Path:
    """A PNG of image rows (``image_grid``): D0's first ``n`` images, then each method's iteration 0 and last
    finished iteration for ``seed`` (the same captions in every column), each row labelled on the left; pixels are
    enlarged ``scale`` times, nearest-neighbour."""
    from ..atomic import save_png
    from ..report_images import image_grid

    folder = RunFolder(run_dir)
    data = folder.read()
    rows: list[tuple[str, list[Path]]] = [("D0", folder.reference_images()[:n])]
    last: dict[str, int] = {}
    for r in data.records:
        if r.done and r.seed == seed:
            last[r.method] = max(last.get(r.method, 0), r.iteration)
    for method in sorted(last, key=lambda m: data.methods.index(m) if m in data.methods else len(data.methods)):
        for i in sorted({0, last[method]}):
            rows.append((f"{method} {i}", folder.iteration_images(method, seed, i)[:n]))
    images: list[Optional[Image.Image]] = []
    for _, paths in rows:
        opened = open_rgb(paths)
        images += opened + [None] * (n - len(opened))  # a short row keeps its columns aligned
    tile = images[0].width * scale if images and images[0] is not None else 64
    path = Path(path)
    save_png(path, image_grid(images, rows=len(rows), row_labels=[label for label, _ in rows], tile=tile))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m redifine_core.toy.science", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--run", action="store_true",
                    help="run the science study into RUN_DIR first (resumed when RUN_DIR already holds a run)")
    ap.add_argument("--seeds", type=int, default=STUDY_SEEDS, help=f"replicate seeds for --run (default {STUDY_SEEDS})")
    ap.add_argument("--model", default="toy", help="the toy model folder for --run (default: the shipped one)")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--grid", type=Path, default=None,
                    help="write a PNG of D0 and every method's iteration 0 and last iteration (seed 0, 12 captions)")
    ap.add_argument("--findings", action="store_true",
                    help=f"write the study's findings per method to {FINDINGS_FILE.name} (committed with the study)")
    args = ap.parse_args(argv)
    if args.run:
        try:
            config = science_config(args.seeds)
            resume = (args.run_dir / "run.json").is_file()
            print(f"{'resuming' if resume else 'running'} the study: {len(config.methods)} methods x "
                  f"{len(config.seeds)} seeds x {config.iterations} iterations into {args.run_dir}")
            from ..cli_progress import TqdmProgress

            progress = TqdmProgress()
            try:
                report = run_science(args.run_dir, args.seeds, progress, model=args.model, resume=resume)
            finally:
                progress.close()
            print(f"report: {report}")
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            ap.error(str(e).splitlines()[0])
    try:
        records = iteration_records(args.run_dir)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e).splitlines()[0])
    if not records:
        ap.error(f"{args.run_dir} holds no finished iteration (no */seed_*/iter_*/DONE)")
    summary = summarise(records)
    ref = reference_record(args.run_dir)
    print("D0: " + "  ".join(f"{k}={ref[k]:.4g}" for k in KEYS if k in ref))
    print(format_table(summary))
    result = study(records)
    print(format_study(result))
    for line in answers(result):
        print(line)
    if args.plot:
        print(f"plot: {plot(summary, ref, args.plot)}")
    if args.grid:
        print(f"grid: {grid(args.run_dir, args.grid)}")
    if args.json:
        from ..atomic import write_json

        write_json(args.json, {"reference": ref, "summary": summary, "records": records, "study": result,
                               "answers": answers(result)})
    if args.findings:
        from ..atomic import write_json

        write_json(FINDINGS_FILE, {"run": str(args.run_dir), "findings": findings(result)})
        print(f"findings: {FINDINGS_FILE}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
