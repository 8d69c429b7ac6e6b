"""The report of a run: metrics.csv and a self-contained report.html.

    render_report(run_dir) -> Path      # writes metrics.csv, curves.png, grid_<method>.png, report.html
                                        # (it opens with report_answer.plain_answer, then the verdict table)
    read_run(run_dir) -> RunData

The pictures (curves, grids, schedule and loss plots) are drawn by ``report_images`` and re-exported here. The run
folder is read through ``chain.RunFolder`` (the one reader of its layout): a run.json that is not a run is refused
with one line naming it, unreadable iteration files are listed as problems in the report. Every file is written
atomically.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Iterable, Optional, Union

from . import atomic
from .chain.run_folder import IterationRecord, RunData, RunFolder
from .metrics import describe_feature_set
from .report_answer import (VERDICT_COLOURS, plain_answer, verdict_table_html,  # noqa: F401 (VERDICT_COLOURS: public)
                            with_lane_readings)
from .report_images import (  # noqa: F401 (re-exported: the report's pictures are part of its API)
    CURVES, GRID_ROWS, HEADER, PAD, ROW_LABEL_W, TILE, grid_seed, image_grid, method_grid, plot_curves, plot_losses,
    plot_schedule)

PathLike = Union[str, Path]

METRIC_ORDER = (
    "fid_ref", "kid_ref", "fid_prev", "kid_prev", "clip_score",
    "hf_share", "spectral_slope", "laplacian_var", "saturation", "colourfulness", "clipped_fraction", "contrast",
    "diversity", "mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "std_rgb",
)
"""Column order of metrics.csv (other metric names follow, sorted)."""

# =================================================================================================================
# reading a run folder
# =================================================================================================================


def read_run(run_dir: PathLike) -> RunData:
    """Read run.json, D0's metrics and every iteration's metrics.json of a run folder (``RunFolder.read``)."""
    return RunFolder(run_dir).read()


# =================================================================================================================
# metrics.csv and report.html
# =================================================================================================================


def _metric_columns(records: Iterable[IterationRecord]) -> list[str]:
    names = set()
    for r in records:
        names.update(r.metrics)
    return [m for m in METRIC_ORDER if m in names] + sorted(names - set(METRIC_ORDER))


def metrics_csv_text(data: RunData) -> str:
    """metrics.csv: one row per record; ``verdict`` and ``reasons`` are the lane's reading (report_answer)."""
    data = with_lane_readings(data)
    cols = _metric_columns(data.records)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "seed", "iteration", "done", "verdict", "reasons", "features"] + cols)
    for r in _sorted_records(data):
        v = r.verdict or {}
        w.writerow(
            [r.method, r.seed, r.iteration, int(r.done), v.get("label", ""),
             "; ".join(map(str, v.get("reasons", []))), r.features]
            + [repr(r.metrics[c]) if c in r.metrics else "" for c in cols]
        )
    return buf.getvalue()


def _sorted_records(data: RunData) -> list[IterationRecord]:
    order = {m: i for i, m in enumerate(data.methods)}
    return sorted(data.records, key=lambda r: (order.get(r.method, 1 << 30), r.method, r.seed, r.iteration))


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _partial_note(data: RunData) -> Optional[str]:
    expected = None
    if data.iterations is not None and data.methods and data.seeds:
        expected = data.iterations * len(data.methods) * len(data.seeds)
    finished = sum(1 for r in data.records if r.done)
    if data.status == "complete" and (expected is None or finished >= expected):
        return None
    parts = [f"This run is partial (status: {data.status})."]
    if expected is not None:
        parts.append(f"{finished} of {expected} iterations finished.")
    else:
        parts.append(f"{finished} iterations finished.")
    missing = []
    if data.iterations is not None:
        for m in data.methods:
            for s in data.seeds:
                n = sum(1 for r in data.records if r.method == m and r.seed == s and r.done)
                if n < data.iterations:
                    missing.append(f"{m} seed {s}: {n}/{data.iterations}")
    if missing:
        parts.append("Unfinished: " + ", ".join(missing) + ".")
    return " ".join(parts)


def _features_note(features: set[str], clip: bool) -> str:
    if not features:
        return "No FID/KID features recorded yet."
    notes = [describe_feature_set(f) for f in sorted(features)]
    notes.append("FID/KID on these features track drift within this run; they are not comparable to published "
                 "Inception FIDs (50 000 images).")
    notes.append("CLIP score: from a local CLIP model." if clip else
                 "CLIP score: not computed in this run (no local CLIP model; see docs/metrics.md).")
    return " ".join(notes)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#222;
max-width:1700px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5}
.v{display:inline-block;padding:2px 8px;border-radius:10px;color:#fff;font-weight:600;white-space:nowrap}
.v-pending{background:#bdbdbd;color:#333}
.note{background:#fff8e1;border:1px solid #ffcc80;padding:8px 12px;border-radius:6px}
.problem{background:#ffebee;border:1px solid #ef9a9a;padding:8px 12px;border-radius:6px}
img{max-width:100%;height:auto;border:1px solid #eee}pre{background:#f7f7f7;padding:10px;overflow:auto;font-size:12px}
.reasons{font-size:12px;color:#444;margin:2px 0 0 0;padding-left:16px}
.answer{font-size:15px;background:#f1f8e9;border:1px solid #c5e1a5;padding:4px 14px;border-radius:6px;max-width:1100px}
"""


def render_report(run_dir: PathLike) -> Path:
    """Write metrics.csv, curves.png, grid_<method>.png and a self-contained report.html; return report.html's path.

    Works on partial runs (missing iterations, status "running"/"cancelled"/"failed") and says so in the report.
    """
    folder = RunFolder(run_dir)
    data = folder.read()
    root = data.root
    atomic.write_text(folder.metrics_csv, metrics_csv_text(data))
    plot_curves(data, folder.curves_png)
    grids: list[tuple[str, Path]] = []
    for m in data.methods:
        p = folder.grid_png(m)
        if method_grid(data, m, p) is not None:
            grids.append((m, p))

    title = f"Chain of Diffusion report: {root.name}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             '<div class="answer">' + "".join(f"<p>{html.escape(line)}</p>" for line in
                                              plain_answer(data).splitlines()) + "</div>"]
    meta = []
    for key in ("created", "updated"):
        if data.run.get(key):
            meta.append(f"{key} {html.escape(str(data.run[key]))}")
    meta_text = " · " + " · ".join(meta) if meta else ""
    parts.append(f"<p>status: <b>{html.escape(data.status)}</b>{meta_text}</p>")
    note = _partial_note(data)
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    for prob in data.problems:
        parts.append(f'<p class="problem">{html.escape(prob)}</p>')
    parts.append("<h2>Verdicts</h2>")
    parts.append(verdict_table_html(data) if data.methods else "<p>No methods in this run yet.</p>")
    parts.append("<h2>Metrics per iteration</h2>")
    parts.append(f'<img alt="metric curves" src="{_data_uri(folder.curves_png)}">')
    parts.append("<p>Dashed line: the value on your images (D0). All values are in <code>metrics.csv</code>.</p>")
    parts.append("<h2>Images</h2>")
    if grids:
        parts.append("<p>Columns: your image (D0), then the image generated from the same caption at each iteration "
                     "(first image per caption, one seed). Nearest-neighbour upscaling keeps small images "
                     "unblurred.</p>")
        for m, p in grids:
            seed = grid_seed(data, m)
            parts.append(f"<h3>{html.escape(m)}{'' if seed is None else f' (seed {seed})'}</h3>")
            parts.append(f'<img alt="images of {html.escape(m, quote=True)}" src="{_data_uri(p)}">')
    else:
        parts.append("<p>No reference images found.</p>")
    feats = {r.features for r in data.records if r.features}
    if not feats and data.run.get("features"):
        feats = {str(data.run["features"])}
    parts.append("<h2>Feature set for FID/KID</h2>")
    feats_text = html.escape(", ".join(sorted(feats)) or "none yet")
    clip = any("clip_score" in r.metrics for r in data.records)
    parts.append(f"<p><code>{feats_text}</code>: {html.escape(_features_note(feats, clip))}</p>")
    if data.reference_metrics:
        parts.append("<h3>Your images (D0)</h3><table><tr>" + "".join(
            f"<th>{html.escape(k)}</th>" for k in data.reference_metrics) + "</tr><tr>" + "".join(
            f"<td>{v:.4g}</td>" for v in data.reference_metrics.values()) + "</tr></table>")
    parts.append("<h2>Configuration</h2>")
    parts.append(f"<pre>{html.escape(json.dumps(data.config, indent=2, sort_keys=True, default=str))}</pre>")
    extra = {k: data.run[k] for k in ("pipeline", "seeds") if k in data.run}
    if isinstance(data.run.get("dataset"), dict):
        extra["dataset"] = {"n": data.run["dataset"].get("n")}
    if extra:
        parts.append(f"<pre>{html.escape(json.dumps(extra, indent=2, sort_keys=True, default=str))}</pre>")
    versions = data.run.get("versions") if isinstance(data.run.get("versions"), dict) else {}
    parts.append("<h2>Versions</h2>")
    parts.append("<table>" + "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in sorted(versions.items())
    ) + "</table>" if versions else "<p>not recorded</p>")
    parts.append("</body></html>\n")
    atomic.write_text(folder.report_html, "".join(parts))
    return folder.report_html
