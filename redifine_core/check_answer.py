"""The answer of a check (check.py) on one screen: the direction, from which round and how large, whether ReDiFine
holds it, and a grid of the artist's captions across the rounds with both arms side by side.

    check_answer(out) -> str                      # out: a check folder (or its chain/ run folder)
    check_grid(out, path=None) -> PIL image | None
    write_answer(out) -> (answer, grid path)      # answer.txt, check_grid.png, check.html in out

Every number comes from the run's own metrics and lane readings (metrics/verdict.py, metrics/lanes.py); the sentences
with their intervals are report_answer's.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Optional

from .atomic import PathLike, write_text
from .chain.run_folder import RunData, RunFolder
from .metrics.lanes import DRIFTS, method_reading
from .metrics.verdict import BLUR, DRIFT, INCONCLUSIVE, OVER, STABLE
from .report_answer import _method_sentence, _method_specs, with_lane_readings
from .report_images import _grid_rows, _open_image, image_grid

DIRECTIONS = {OVER: "over-guidance", BLUR: "blur", DRIFT: "drift from your images", STABLE: "stable",
              INCONCLUSIVE: "inconclusive"}
YOURS, REDIFINE = "your-cfg", "redifine"
GRID_NAME, ANSWER_NAME, HTML_NAME = "check_grid.png", "answer.txt", "check.html"


def chain_folder(out: PathLike) -> RunFolder:
    """The chain run of a check folder (``out/chain``), or ``out`` itself when it is the run folder."""
    inner = RunFolder(Path(out) / "chain")
    return inner if inner.exists() else RunFolder(out)


def _reading(data: RunData, method: str) -> tuple[str, int, int]:
    """(label at the last finished round, that round, the first round its lane read that label)."""
    done = [r for r in data.records if r.method == method and r.done]
    if not done:
        return "", -1, -1
    last = max(r.iteration for r in done)
    label, _, _ = method_reading([str((r.verdict or {}).get("label", "")) for r in done if r.iteration == last])
    first = min((r.iteration for r in done if (r.verdict or {}).get("label") == label), default=last)
    return label, last, first


def _holds(yours: str, ours: str) -> str:
    if yours in DRIFTS:
        if ours == STABLE:
            return f"Yes: with ReDiFine the images stay stable where yours drift to {DIRECTIONS[yours]}."
        if ours == yours:
            return f"No: with ReDiFine the images drift to {DIRECTIONS[yours]} too."
        if ours in DRIFTS:
            return f"No: with ReDiFine the images drift to {DIRECTIONS[ours]} instead."
        return "Unclear: the ReDiFine arm gives no clear reading."
    if yours == STABLE:
        return ("Nothing to hold: your setting stays stable over these rounds"
                + ("." if ours == STABLE else f"; the ReDiFine arm reads {DIRECTIONS.get(ours, ours or 'nothing')}."))
    return "Unclear: your arm gives no clear reading, so there is nothing to compare."


def check_answer(out: PathLike) -> str:
    """The answer on one screen, in plain words with the evidence (each change with its 95 % interval)."""
    folder = chain_folder(out)
    if not folder.exists():
        return f"No check in {str(out)!r} yet."
    data = with_lane_readings(folder.read())
    specs = _method_specs(data)
    yours, last, first = _reading(data, YOURS)
    ours, _, _ = _reading(data, REDIFINE)
    if last < 1:
        return "No round after round 0 has finished yet: the answer appears once round 1 of both arms is done."
    cfg = specs.get(YOURS, {}).get("cfg")
    ds = data.run.get("dataset") if isinstance(data.run.get("dataset"), dict) else {}
    head = f"Your LoRA at CFG {cfg:g}" if isinstance(cfg, (int, float)) else "Your LoRA"
    direction = DIRECTIONS.get(yours, yours or "no verdict")
    when = f", from round {first}" if yours in DRIFTS else ""
    lines = [f"{head}, trained on its own images for {last} round{'s' if last != 1 else ''} after round 0 "
             f"(round 0 = your LoRA as it is; {ds.get('n', '?')} of your captions, one seed):",
             f"  Direction: {direction}{when}.",
             f"  How large: {_method_sentence(data, YOURS, specs.get(YOURS, {}))[0]}",
             f"  Does ReDiFine hold it? {_holds(yours, ours)}",
             f"  ReDiFine arm: {_method_sentence(data, REDIFINE, specs.get(REDIFINE, {}))[0]}",
             "  [intervals] are 95 % bootstrap intervals over the images; a change whose interval includes 0 is "
             "not evidence."]
    expected = (data.iterations or 0) * len(data.methods) * len(data.seeds)
    done = sum(1 for r in data.records if r.done)
    if data.status != "complete" or done < expected:
        lines.append(f"  The check is not finished ({done} of {expected} rounds done): resume it; this may change.")
    return "\n".join(lines)


def check_grid(out: PathLike, path: Optional[PathLike] = None) -> Optional[Any]:
    """Rows: a few of the artist's captions; columns: their image, then each round of your CFG, then each round of
    ReDiFine (the same seed in every cell of a row)."""
    folder = chain_folder(out)
    if not folder.exists():
        return None
    data = folder.read()
    rows = _grid_rows(data)
    n_it = data.max_iteration()
    if not rows or n_it < 1:
        return None
    seed = data.seeds[0] if data.seeds else 0
    images, row_labels = [], []
    for c in rows:
        caps = data.captions
        row_labels.append(f"#{c}: {caps[c]}" if c < len(caps) else f"#{c}")
        images.append(_open_image(folder.caption_image(None, 0, 0, c)))
        for method in (YOURS, REDIFINE):
            images += [_open_image(folder.caption_image(method, seed, i, c)) for i in range(n_it)]
    labels = ["yours"] + [f"CFG r{i}" for i in range(n_it)] + [f"ReDiFine r{i}" for i in range(n_it)]
    grid = image_grid(images, rows=len(rows), labels=labels, row_labels=row_labels)
    if path is not None:
        from .atomic import save_png

        save_png(path, grid)
    return grid


def write_answer(out: PathLike) -> tuple[str, Optional[Path]]:
    """answer.txt, check_grid.png and a small check.html in ``out``; returns the answer and the grid's path."""
    out = Path(out)
    answer = check_answer(out)
    write_text(out / ANSWER_NAME, answer + "\n")
    grid_path: Optional[Path] = out / GRID_NAME
    if check_grid(out, grid_path) is None:
        grid_path = None
    img = f'<p><img src="{GRID_NAME}" alt="captions across the rounds"></p>' if grid_path else ""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>ReDiFine check</title></head><body>"
            f"<h1>Will this LoRA degrade?</h1><pre>{html.escape(answer)}</pre>{img}"
            "<p>The full run (images, LoRAs, metrics) is in <code>chain/</code>; "
            "<code>redifine report chain</code> renders its report.</p></body></html>")
    write_text(out / HTML_NAME, page)
    return answer, grid_path
