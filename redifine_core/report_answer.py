"""The answer first: a few plain sentences about a run, built from its own numbers, and the verdict table.

    plain_answer(run) -> str          # run: a run folder path or a RunData; one sentence per line
    verdict_table_html(data) -> str   # method x seed x iteration, each label with its reasons written out

The sentences say, for each method, where its images went over the rounds (towards blur, towards over-guidance, away
from the user's images, or nowhere) with the run's own numbers: the change of the image statistics from round 0 (means
over seeds), the round the verdict first flagged it, and FID against the user's images, each change with its 95 %
interval (across seeds when the run has several, else the bootstrap over the images stored with the metrics). Nothing
is templated beyond the wording: change a metric in a run and the sentence changes. The report opens with it; the
Chain node outputs it.
"""

from __future__ import annotations

import dataclasses
import html
import math
import statistics
from pathlib import Path
from typing import Optional, Sequence, Union

from .chain.run_folder import IterationRecord, RunData, RunFolder
from .guidance import parse_schedule
from .metrics.features import describe_feature_set
from .metrics.intervals import INTERVAL_LEVEL, read_interval
from .metrics.lanes import lane_readings, method_reading
from .metrics.verdict import (BLUR, CLIPPED_RISE, COLOURFULNESS_RISE, DRIFT, INCONCLUSIVE, OVER, SATURATION_RISE,
                              SHARP_RISE, SLOPE_STEEPER, STABLE, VERDICTS)

VERDICT_COLOURS = {STABLE: "#2e7d32", BLUR: "#1565c0", OVER: "#d84315", DRIFT: "#6a1b9a", INCONCLUSIVE: "#757575"}
SHOWN_REASONS = 4
"""How many reasons a table cell writes out; the rest are counted ("+2 more") and all are in metrics.csv."""

NOTICEABLE = 0.05
"""A statistic is quoted as part of a drift only when it moved the drift's way by more than 5 % (relative), or, for
the statistics whose verdict threshold is absolute (clipped fraction, spectral slope), by more than 5 % of that
threshold: a clipped fraction going from 0 to 1e-5 is no evidence and would read "0.00% -> 0.00%"."""
STAT_NAMES = {"hf_share": "high-frequency share", "laplacian_var": "Laplacian variance (edge sharpness)",
              "saturation": "saturation", "colourfulness": "colourfulness", "clipped_fraction": "clipped pixels",
              "spectral_slope": "spectral slope"}
"""Plain names of the statistics the sentences quote."""
_MODE_STATS = {
    OVER: ("laplacian_var", "hf_share", "saturation", "colourfulness", "clipped_fraction"),
    BLUR: ("hf_share", "laplacian_var", "spectral_slope"),
}
_RELATIVE = {"hf_share": SHARP_RISE, "laplacian_var": SHARP_RISE, "saturation": SATURATION_RISE,
             "colourfulness": COLOURFULNESS_RISE}
_ABSOLUTE = {"clipped_fraction": CLIPPED_RISE, "spectral_slope": SLOPE_STEEPER}
_DRIFT_STATS = ("hf_share", "laplacian_var", "saturation", "colourfulness")
_WHAT = {
    OVER: "drifted towards over-guidance (harsher edges, stripes or burnt colours)",
    BLUR: "drifted towards blur (softer images, fine detail lost)",
    DRIFT: "drifted away from your images without blurring or over-guiding",
}


def _describe_method(spec: dict) -> str:
    cfg, sched, drop = spec.get("cfg"), spec.get("schedule"), spec.get("cond_drop") or 0.0
    if isinstance(cfg, (int, float)):
        guidance = f"CFG {cfg:g}"
    else:
        try:
            expanded = parse_schedule(sched).spec
        except (TypeError, ValueError):
            expanded = str(sched)
        guidance = f"CFG schedule {sched}" + (f" = {expanded}" if expanded != str(sched) else "")
    if spec.get("kind") == "redifine":
        return f"ReDiFine: condition drop {drop:g} and {guidance}"
    return guidance + (f" with condition drop {drop:g}" if drop else "")


def _method_specs(data: RunData) -> dict[str, dict]:
    out = {}
    for m in data.config.get("methods", []) or []:
        if isinstance(m, dict) and isinstance(m.get("name"), str):
            out[m["name"]] = m
    return out


def _mean(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _change(name: str, a: float, b: float, ci: Optional[tuple[float, float]] = None) -> str:
    """A statistic's change from round 0 (``a``) to the last round (``b``), with its interval ``ci`` when known (in
    the change's own units: relative, or absolute for the spectral slope and the clipped fraction)."""
    if name == "spectral_slope":
        interval = "" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"
        return f"{STAT_NAMES[name]} {b - a:+.2f}{interval} ({'steeper' if b < a else 'flatter'})"
    if name == "clipped_fraction":
        interval = "" if ci is None else f" ({(b - a) * 100:+.1f} [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}] points)"
        return f"{STAT_NAMES[name]} {a:.2%} -> {b:.2%}{interval}"
    return f"{STAT_NAMES[name]} {(b - a) / max(abs(a), 1e-12):+.0%}{_pct_interval(ci)}"


def _pct_interval(ci: Optional[tuple[float, float]]) -> str:
    return "" if ci is None else f" [{ci[0]:+.0%}, {ci[1]:+.0%}]"


def _interval(name: str, first: dict[int, IterationRecord], last: dict[int, IterationRecord],
              seeds: Sequence[int]) -> Optional[tuple[float, float]]:
    """The interval of ``name``'s change from round 0 to the last round: with several seeds a t interval across the
    seeds' own changes, with one the bootstrap interval recorded with its metrics (intervals.change_intervals)."""
    if len(seeds) == 1:
        return read_interval(last[seeds[0]].metrics, name)
    changes = []
    for s in seeds:
        a, b = first[s].metrics.get(name), last[s].metrics.get(name)
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (a, b)):
            return None
        changes.append(b - a if name in _ABSOLUTE else (b - a) / max(abs(a), 1e-12))
    if len(changes) < 2:
        return None
    from scipy import stats

    mean = sum(changes) / len(changes)
    half = float(stats.t.ppf(0.5 + INTERVAL_LEVEL / 2, len(changes) - 1)) * statistics.stdev(changes) / math.sqrt(
        len(changes))
    return mean - half, mean + half


def _units(name: str, a: float, b: float) -> float:
    """How far a statistic moved in units of the verdict's threshold for it (the order the sentence quotes them)."""
    if name in _ABSOLUTE:
        return abs(b - a) / _ABSOLUTE[name]
    return abs(b - a) / max(abs(a), 1e-12) / _RELATIVE[name]


def _rel(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else (b - a) / max(abs(a), 1e-12)


def _method_sentence(data: RunData, method: str, spec: dict) -> tuple[str, Optional[float], Optional[float]]:
    """One sentence for ``method``; also its mean FID against D0 at its last round and its largest statistic change."""
    done = [r for r in data.records if r.method == method and r.done]
    name = f"{method} ({_describe_method(spec)})" if spec else method
    if not done:
        return f"{name}: no round has finished yet.", None, None
    last = max(r.iteration for r in done)
    at = {i: [r for r in done if r.iteration == i] for i in (0, last)}
    seeds = sorted({r.seed for r in at[last]} & {r.seed for r in at[0]})
    mean = {i: {k: _mean([r.metrics.get(k) for r in at[i] if r.seed in seeds]) for k in STAT_NAMES}
            for i in (0, last)}
    first_rec = {r.seed: r for r in at[0] if r.seed in seeds}
    last_rec = {r.seed: r for r in at[last] if r.seed in seeds}
    ci = lambda k: _interval(k, first_rec, last_rec, seeds) if seeds and last > 0 else None  # noqa: E731
    fid0 = _mean([r.metrics.get("fid_ref") for r in at[0] if r.seed in seeds])
    fid = _mean([r.metrics.get("fid_ref") for r in at[last] if r.seed in seeds])
    label, note, split = method_reading([str((r.verdict or {}).get("label", "")) for r in at[last]])
    seeds_note = f" {note}" if note and not split else ""
    moves = {k: _rel(mean[0][k], mean[last][k]) for k in _DRIFT_STATS}
    top = max((k for k in moves if moves[k] is not None), key=lambda k: abs(moves[k]), default=None)
    biggest = None if top is None else abs(moves[top])
    fid_text = "" if fid is None or fid0 is None else (
        f"FID against your images {fid0:.3g} -> {fid:.3g} ({_rel(fid0, fid):+.0%}{_pct_interval(ci('fid_ref'))})")
    if last == 0:
        return f"{name}: only round 0 has finished{'; ' + fid_text if fid_text else ''}.", fid, biggest
    first = min((r.iteration for r in done if (r.verdict or {}).get("label") == label), default=last)
    if label in (OVER, BLUR):
        stats = [k for k in _MODE_STATS[label] if mean[0][k] is not None and mean[last][k] is not None]
        sign = 1.0 if label == OVER else -1.0  # the metrics that moved the mode's way, the largest move first
        stats = sorted((k for k in stats if sign * (mean[last][k] - mean[0][k])
                        > NOTICEABLE * (_ABSOLUTE[k] if k in _ABSOLUTE else abs(mean[0][k]))),
                       key=lambda k: -_units(k, mean[0][k], mean[last][k]))
        details = ", ".join(_change(k, mean[0][k], mean[last][k], ci(k)) for k in stats[:3])
        text = (f"{name} {_WHAT[label]}{seeds_note} by round {last}: {details}; first flagged in round {first}"
                + (f"; {fid_text}" if fid_text else "") + ".")
    elif label == DRIFT:
        moved = "" if top is None else (f" (largest change in its image statistics: {STAT_NAMES[top]} "
                                        f"{moves[top]:+.0%}{_pct_interval(ci(top))})")
        text = (f"{name} {_WHAT[label]}{seeds_note}: {fid_text or 'FID against your images rose'} by round "
                f"{last}, first flagged in round {first}{moved}.")
    elif label == INCONCLUSIVE:
        reasons = [str(x) for r in at[last] for x in (r.verdict or {}).get("reasons", [])[:1]]
        why = f"its seeds split ({note})" if split else reasons[0] if reasons else "no reason recorded"
        text = f"{name} gave no clear reading at round {last}{seeds_note}: {why}."
    elif label == STABLE:
        largest = (f" (largest change: {STAT_NAMES[top]} {moves[top]:+.0%}{_pct_interval(ci(top))})"
                   if top is not None else "")
        text = (f"{name} showed no clear drift by round {last}{seeds_note}{largest}"
                + (f"; {fid_text}" if fid_text else "") + ".")
    else:
        text = f"{name}: round {last} has no verdict yet."
    return text, fid, biggest


def with_lane_readings(data: RunData) -> RunData:
    """``data`` with each record's verdict replaced by its lane's reading (metrics.lanes.lane_readings: an established
    drift holds until its metrics' intervals show a recovery). Applying it twice gives the same data."""
    records = []
    for r in data.records:
        lane = sorted((x for x in data.records if (x.method, x.seed) == (r.method, r.seed) and x.verdict),
                      key=lambda x: x.iteration)
        if not r.verdict or not lane or lane[0].iteration != 0:
            records.append(r)
            continue
        readings = lane_readings([(x.iteration, x.metrics, x.verdict) for x in lane], lane[0].metrics)
        records.append(dataclasses.replace(r, verdict=readings[[x.iteration for x in lane].index(r.iteration)]))
    return dataclasses.replace(data, records=records)


def plain_answer(run: Union[str, Path, RunData]) -> str:
    """A few plain sentences answering "what happened to each method?", from the run's own numbers, one per line."""
    data = with_lane_readings(run if isinstance(run, RunData) else RunFolder(run).read())
    specs = _method_specs(data)
    done = [r for r in data.records if r.done]
    if not data.methods or not done:
        return "No round has finished yet: the answer appears here once the first round of every method is done."
    rounds = max(r.iteration for r in done) + 1
    ds = data.run.get("dataset") if isinstance(data.run.get("dataset"), dict) else {}
    per_caption = data.config.get("images_per_caption", 1)
    n = ds.get("n") * per_caption if isinstance(ds.get("n"), int) and isinstance(per_caption, int) else None
    bits = [f"{n} images a round"] if n else []
    if len(data.seeds) > 1:
        bits.append(f"{len(data.seeds)} seeds, numbers are means over seeds, [intervals] {INTERVAL_LEVEL:.0%} "
                    "across seeds")
    else:
        bits.append(f"[intervals] {INTERVAL_LEVEL:.0%}, bootstrap over the images")
    lines = [f"Over {rounds} round{'s' if rounds != 1 else ''} of training on its own images"
             + (f" ({'; '.join(bits)})" if bits else "")
             + ", round 0 being the model finetuned on your images:"]
    fids: dict[str, float] = {}
    for m in data.methods:
        text, fid, _ = _method_sentence(data, m, specs.get(m, {}))
        lines.append(text)
        if fid is not None:
            fids[m] = fid
    if len(fids) > 1:
        best, worst = min(fids, key=fids.get), max(fids, key=fids.get)
        lines.append(f"Closest to your images at the end: {best} (FID {fids[best]:.3g}); furthest: {worst} "
                     f"(FID {fids[worst]:.3g}).")
    for f in sorted({r.features for r in done if r.features}):
        lines.append(f"FID is computed on {describe_feature_set(f)}")
    expected = (data.iterations or 0) * len(data.methods) * len(data.seeds)
    if data.status != "complete" or len(done) < expected:
        lines.append(f"The run is not finished ({len(done)} of {expected or '?'} rounds done): this may change.")
    return "\n".join(lines)


# =================================================================================================================
# the verdict table of report.html
# =================================================================================================================


def verdict_span(label: str, reasons: Sequence[str]) -> str:
    """A coloured label; its reasons also in the hover text."""
    colour = VERDICT_COLOURS.get(label)
    title = html.escape("\n".join(reasons), quote=True)
    if colour is None:
        return f'<span class="v v-pending" title="{title}">{html.escape(label)}</span>'
    return f'<span class="v" style="background:{colour}" title="{title}">{html.escape(label)}</span>'


def verdict_table_html(data: RunData) -> str:
    """The verdict table: one row per method and seed, one cell per iteration with its label and reasons written out."""
    data = with_lane_readings(data)
    n_it = data.max_iteration()
    head = "<tr><th>method</th><th>seed</th>" + "".join(f"<th>iter {i}</th>" for i in range(n_it)) + "</tr>"
    rows = []
    seeds = data.seeds or [None]
    for m in data.methods:
        for s in seeds:
            cells = []
            for i in range(n_it):
                r = data.record(m, s, i) if s is not None else None
                if r is None or not r.verdict:
                    cells.append(f"<td>{verdict_span('pending', ['not finished yet'])}</td>")
                    continue
                label = str(r.verdict.get("label", "?"))
                reasons = [str(x) for x in r.verdict.get("reasons", [])]
                extra = "" if r.done else " <small>(not marked DONE)</small>"
                lst = "".join(f"<li>{html.escape(x)}</li>" for x in reasons[:SHOWN_REASONS])
                if len(reasons) > SHOWN_REASONS:
                    lst += f"<li>+{len(reasons) - SHOWN_REASONS} more (metrics.csv)</li>"
                ul = f'<ul class="reasons">{lst}</ul>' if lst else ""
                cells.append(f"<td>{verdict_span(label, reasons)}{extra}{ul}</td>")
            rows.append(f"<tr><td><b>{html.escape(m)}</b></td><td>{'' if s is None else s}</td>{''.join(cells)}</tr>")
    legend = " ".join(verdict_span(v, []) for v in VERDICTS) + " " + verdict_span("pending", [])
    return (
        f"<table>{head}{''.join(rows)}</table>"
        f"<p>{legend}</p><p>Each iteration is compared with iteration 0 of the same method and seed (its own starting "
        "point); the reasons under each label are the metric changes that decided it. Thresholds and how they were "
        "calibrated: docs/metrics.md.</p>"
    )
