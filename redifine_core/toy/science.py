"""Summarise a toy chain run: collapse metrics and prompt fidelity per method and iteration, averaged over seeds.

``python -m redifine_core.toy.science RUN_DIR [--plot FILE] [--json FILE]`` reads a run folder written by
:func:`redifine_core.chain.run_chain` (e.g. by ``redifine demo``), scores every generated set with the attribute
checker, and prints a table of mean +- std over replicate seeds, plus each method's distance from its own
iteration 0 (the question "does it stay closer to where it started?").
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..chain.run_folder import RunFolder
from .checker import check

KEYS: tuple[str, ...] = ("fidelity", "hf_share", "laplacian_var", "saturation", "clipped_fraction", "colourfulness",
                         "diversity", "fid_ref")
#: Metrics whose relative change from iteration 0 makes up the drift score.
DRIFT_KEYS: tuple[str, ...] = ("hf_share", "laplacian_var", "saturation", "colourfulness", "diversity")


def _open_rgb(paths) -> list[Image.Image]:
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
        images = _open_rgb(folder.iteration_images(r.method, r.seed, r.iteration))
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
    fid = check(_open_rgb(RunFolder(run_dir).reference_images()), data.captions)
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
        for method, iters in summary.items():
            xs = [i for i in iters if k in iters[i]]
            ax.errorbar(xs, [iters[i][k][0] for i in xs], yerr=[iters[i][k][1] for i in xs], marker="o",
                        capsize=3, label=method)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m redifine_core.toy.science", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
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
    if args.plot:
        print(f"plot: {plot(summary, ref, args.plot)}")
    if args.json:
        from ..atomic import write_json

        write_json(args.json, {"reference": ref, "summary": summary, "records": records})
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
