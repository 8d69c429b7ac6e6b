"""The pictures of a run: metric curves, schedule and loss plots, and image grids (one row per caption).

    plot_curves(data, path=None) -> PIL.Image.Image          # curves.png: each key metric vs iteration, per method
    plot_schedule(schedules, steps, path=None, iteration=0)  # a schedule's per-step scales
    plot_losses(losses, path=None)                            # the training-loss curve of the ComfyUI train node
    image_grid(images, rows, labels=None, row_labels=None)    # tiles with column and row labels
    method_grid(data, method, path=None)                      # grid_<method>.png: D0 then each iteration

Figures are drawn with matplotlib's Agg canvas (no pyplot, no GUI); every file is written atomically. ``report.py``
puts them into report.html and re-exports them.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import atomic
from .chain.run_folder import RunData, RunFolder

PathLike = Union[str, Path]

CURVES = (
    # (metric, title, draw the D0 value as a dashed line, log y axis)
    ("fid_ref", "FID vs D0 (lower = closer to your images)", False, False),
    ("kid_ref", "KID vs D0", False, False),
    ("fid_prev", "FID vs previous set (change per step)", False, False),
    ("clip_score", "CLIP score (text match)", False, False),
    ("hf_share", "high-frequency share (blur ↓, artefacts ↑)", True, True),
    ("spectral_slope", "spectral slope (blur ↓ steeper)", True, False),
    ("laplacian_var", "Laplacian variance (sharpness)", True, True),
    ("saturation", "mean saturation (over-guidance ↑)", True, False),
    ("colourfulness", "colourfulness (over-guidance ↑)", True, False),
    ("clipped_fraction", "clipped channel values (over-guidance ↑)", True, False),
    ("diversity", "diversity (mode collapse ↓)", True, False),
)
"""The key metrics plotted in curves.png, in order; a metric no iteration has is left out."""

GRID_ROWS = 4
"""How many caption indices (rows) a grid_<method>.png shows at most, spread evenly over the dataset."""
TILE = 128
"""Grid tile size in pixels: larger images are downscaled (Lanczos), smaller ones upscaled by whole factors."""
PAD = 4
HEADER = 24
ROW_LABEL_W = 150


# =================================================================================================================
# figures
# =================================================================================================================


def _figure(width_in: float, height_in: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _fig_to_image(fig) -> Image.Image:
    fig.canvas.draw()
    buf = np.asarray(fig.canvas.buffer_rgba())
    return Image.fromarray(np.ascontiguousarray(buf[..., :3]))


def _save(img: Image.Image, path: Optional[PathLike]) -> Image.Image:
    if path is not None:
        atomic.save_png(Path(path), img)
    return img


def _method_colour(i: int) -> str:
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def plot_curves(data: RunData, path: Optional[PathLike] = None) -> Image.Image:
    """A grid of small plots: each key metric vs iteration, one line per method (mean ± std over seeds)."""
    present = [c for c in CURVES if any(c[0] in r.metrics for r in data.records)]
    if not present:
        fig = _figure(6, 2.5)
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no finished iterations yet", ha="center", va="center", fontsize=14)
        return _save(_fig_to_image(fig), path)
    ncols = min(4, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig = _figure(4.0 * ncols, 3.0 * nrows + 0.6)
    handles = {}
    for k, (metric, title, ref_line, logy) in enumerate(present):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        values_all = []
        for mi, method in enumerate(data.methods):
            by_iter: dict[int, list[float]] = {}
            for r in data.records:
                if r.method == method and metric in r.metrics and math.isfinite(r.metrics[metric]):
                    by_iter.setdefault(r.iteration, []).append(r.metrics[metric])
            if not by_iter:
                continue
            its = sorted(by_iter)
            mean = np.array([np.mean(by_iter[i]) for i in its])
            std = np.array([np.std(by_iter[i], ddof=1) if len(by_iter[i]) > 1 else 0.0 for i in its])
            values_all += list(mean - std) + list(mean + std)
            colour = _method_colour(mi)
            if any(len(by_iter[i]) > 1 for i in its):
                h = ax.errorbar(its, mean, yerr=std, color=colour, marker="o", ms=4, capsize=3, lw=1.6, label=method)
            else:
                (h,) = ax.plot(its, mean, color=colour, marker="o", ms=4, lw=1.6, label=method)
            handles.setdefault(method, h)
        if ref_line and metric in data.reference_metrics:
            rv = data.reference_metrics[metric]
            ax.axhline(rv, color="0.35", ls="--", lw=1.2)
            values_all.append(rv)
            handles.setdefault("D0 (your images)", ax.lines[-1])
        if logy and values_all and min(values_all) > 0:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    seeds_note = f" (mean ± std over {len(data.seeds)} seeds)" if len(data.seeds) > 1 else ""
    fig.legend(list(handles.values()), list(handles.keys()), loc="upper center", ncol=min(6, len(handles)),
               fontsize=9, frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(f"metrics per iteration{seeds_note}", y=0.005, va="bottom", fontsize=9, color="0.3")
    # a fixed layout: tight_layout costs seconds per render on a busy CPU and gains little on this regular grid
    fh, fw = fig.get_figheight(), fig.get_figwidth()
    fig.subplots_adjust(left=0.75 / fw, right=1 - 0.2 / fw, bottom=0.75 / fh, top=1 - 0.75 / fh,
                        wspace=0.3, hspace=0.55)
    return _save(_fig_to_image(fig), path)


def plot_schedule(
    schedules: Sequence[str], steps: int, path: Optional[PathLike] = None, iteration: int = 0
) -> Image.Image:
    """Per-step guidance scale w of one or more schedule specs over ``steps`` denoising steps (chain ``iteration``)."""
    from .guidance import parse_schedule

    if isinstance(schedules, (str, int, float)):
        schedules = [schedules]
    schedules = list(schedules)
    if not schedules:
        raise ValueError("schedules: give at least one schedule spec")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: {steps!r} must be an integer >= 1")
    parsed = [parse_schedule(s) for s in schedules]  # raises ScheduleSyntaxError (a ValueError) on bad specs
    legend_rows = math.ceil((len(parsed) + 1) / 2)
    legend_h = 0.22 * legend_rows + 0.2
    fig = _figure(6.4, 3.4 + legend_h)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(steps)
    for i, (raw, s) in enumerate(zip(schedules, parsed)):
        ys = s.values(steps, iteration)
        label = s.spec
        if isinstance(raw, str) and raw.strip() and raw.strip().lower() != s.spec.lower():
            label = f"{raw.strip()} = {s.spec}"
        if s.is_chain_axis:
            label += f" @ iteration {iteration}"
        # one value per step: drawn as steps, so a switch between two steps is not shown as a ramp
        ax.plot(x, ys, drawstyle="steps-mid", lw=1.8, color=_method_colour(i), label=label)
        if steps <= 40:
            ax.plot(x, ys, ls="none", marker="o", ms=3, color=_method_colour(i))
    ax.axhline(1.0, color="0.5", ls=":", lw=1, label="w = 1 (no guidance)")
    ax.set_xlabel("denoising step (0 = first, most noisy)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("guidance scale w")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"CFG schedule over {steps} steps", fontsize=10)
    fh = fig.get_figheight()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=(legend_h + 0.5) / fh, top=1 - 0.35 / fh)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    return _save(_fig_to_image(fig), path)


def plot_losses(losses: Sequence[float], path: Optional[PathLike] = None, title: str = "training loss") -> Image.Image:
    """The training-loss curve: raw per-step loss plus a moving average once there are enough steps."""
    y = np.asarray([float(v) for v in losses], dtype=np.float64)
    if y.size == 0:
        raise ValueError("losses: empty; nothing to plot")
    fig = _figure(6.4, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(1, y.size + 1)
    ax.plot(x, y, color="#90a4ae", lw=1, label="loss per step")
    if y.size >= 10:
        win = max(2, y.size // 20)
        finite = np.where(np.isfinite(y), y, np.nan)
        kernel = np.ones(win)
        num = np.convolve(np.nan_to_num(finite), kernel, mode="valid")
        den = np.convolve(np.isfinite(finite).astype(float), kernel, mode="valid")
        avg = np.where(den > 0, num / np.maximum(den, 1), np.nan)
        ax.plot(x[win - 1 :], avg, color="#c62828", lw=2, label=f"moving average ({win} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    finite_y = y[np.isfinite(y)]
    last = f"{finite_y[-1]:.4g}" if finite_y.size else "n/a"
    ax.set_title(f"{title} ({y.size} steps, last {last})", fontsize=10)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.16, top=0.9)
    return _save(_fig_to_image(fig), path)


# =================================================================================================================
# image grids
# =================================================================================================================


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _to_pil(img: Any) -> Optional[Image.Image]:
    if img is None:
        return None
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if hasattr(img, "detach"):
        img = img.detach().cpu().float().numpy()
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images: each image must be [H, W, 3] (or a PIL image), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0, 1) * 255 + 0.5).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]))


def _fit_tile(img: Image.Image, tile: int) -> Image.Image:
    w, h = img.size
    if max(w, h) <= tile:
        f = max(1, tile // max(w, h))  # whole-factor nearest upscaling keeps pixels honest (no added blur)
        return img.resize((w * f, h * f), Image.NEAREST) if f > 1 else img
    s = tile / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)


def image_grid(
    images: Sequence[Any],
    rows: int,
    labels: Optional[Sequence[str]] = None,
    row_labels: Optional[Sequence[str]] = None,
    tile: int = TILE,
) -> Image.Image:
    """Lay ``images`` out row-major in ``rows`` rows; ``labels`` head the columns, ``row_labels`` sit left of rows.

    Images are PIL images or arrays/tensors [H, W, 3] (float in [0, 1] or uint8), or a batch [N, H, W, 3]; a None
    entry becomes a grey "missing" tile. Each cell is ``tile`` x ``tile`` pixels plus PAD; the header row is HEADER
    pixels high when ``labels`` is given and the label column ROW_LABEL_W wide when ``row_labels`` is given.
    """
    if hasattr(images, "shape") and len(getattr(images, "shape")) == 4:
        images = [images[i] for i in range(images.shape[0])]
    images = list(images)
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows: {rows!r} must be an integer >= 1")
    if not images:
        raise ValueError("images: empty; nothing to lay out")
    if tile < 8:
        raise ValueError(f"tile: {tile!r} must be >= 8 pixels")
    cols = math.ceil(len(images) / rows)
    if labels is not None and len(labels) != cols:
        raise ValueError(f"labels: {len(labels)} column labels for {cols} columns")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"row_labels: {len(row_labels)} row labels for {rows} rows")
    top = HEADER if labels is not None else 0
    left = ROW_LABEL_W if row_labels is not None else 0
    width = left + cols * (tile + PAD) + PAD
    height = top + rows * (tile + PAD) + PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    small = _font(11)
    for j in range(cols):
        if labels is not None:
            x0 = left + PAD + j * (tile + PAD)
            draw.text((x0 + tile / 2, top / 2), str(labels[j]), fill=(20, 20, 20), font=font, anchor="mm")
    for i in range(rows):
        y0 = top + PAD + i * (tile + PAD)
        if row_labels is not None:
            lines = textwrap.wrap(str(row_labels[i]), width=22)[:6]
            draw.multiline_text((PAD, y0 + 2), "\n".join(lines), fill=(40, 40, 40), font=small, spacing=2)
        for j in range(cols):
            k = i * cols + j
            if k >= len(images):
                continue
            x0 = left + PAD + j * (tile + PAD)
            pil = _to_pil(images[k])
            if pil is None:
                draw.rectangle((x0, y0, x0 + tile - 1, y0 + tile - 1), fill=(225, 225, 225))
                draw.text((x0 + tile / 2, y0 + tile / 2), "missing", fill=(120, 120, 120), font=small, anchor="mm")
                continue
            t = _fit_tile(pil, tile)
            canvas.paste(t, (x0 + (tile - t.size[0]) // 2, y0 + (tile - t.size[1]) // 2))
    return canvas


def _grid_rows(data: RunData) -> list[int]:
    ds = data.run.get("dataset") if isinstance(data.run.get("dataset"), dict) else {}
    n = ds["n"] if isinstance(ds.get("n"), int) else len(RunFolder(data.root).reference_images())
    if n <= 0:
        return []
    k = min(GRID_ROWS, n)
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def _open_image(path: Optional[Path]) -> Optional[Image.Image]:
    if path is None:
        return None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError:
        return None


def grid_seed(data: RunData, method: str) -> Optional[int]:
    """The seed whose images grid_<method>.png shows: the one with the most iterations (the lowest on a tie)."""
    counts = {}
    for r in data.records:
        if r.method == method:
            counts[r.seed] = counts.get(r.seed, 0) + 1
    if counts:
        return sorted(counts, key=lambda s: (-counts[s], s))[0]
    return data.seeds[0] if data.seeds else None


def method_grid(data: RunData, method: str, path: Optional[PathLike] = None) -> Optional[Image.Image]:
    """grid_<method>.png: rows = a few caption indices, columns = D0 then each iteration (first image, one seed)."""
    rows = _grid_rows(data)
    if not rows:
        return None
    folder = RunFolder(data.root)
    seed = grid_seed(data, method)
    n_it = data.max_iteration()
    captions = []
    caps = data.captions
    images: list[Optional[Image.Image]] = []
    for c in rows:
        captions.append(f"#{c}: {caps[c]}" if c < len(caps) else f"#{c}")
        images.append(_open_image(folder.caption_image(None, 0, 0, c)))
        for it in range(n_it):
            images.append(None if seed is None else _open_image(folder.caption_image(method, seed, it, c)))
    labels = ["D0 (input)"] + [f"iter {i}" for i in range(n_it)]
    grid = image_grid(images, rows=len(rows), labels=labels, row_labels=captions)
    return _save(grid, path)
