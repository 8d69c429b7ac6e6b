"""The data the verdict thresholds were calibrated on: synthetic image sets whose right label is known.

Each set is N images of random coloured shapes on a coloured background plus mild pixel noise (``shapes``). For every
set size N in SET_SIZES there is one D0 draw, BASELINE_DRAWS "iteration 0" draws, and for each entry of CHANGES
CHANGE_DRAWS further draws with that change applied (NULL_DRAWS for "none": fresh draws of the same distribution).
Every changed draw is compared with every baseline draw, as a chain's iteration i is compared with its iteration 0,
and the label ``verdict`` gives is counted against the right one (CHANGES). Independent draws are a harder test than
a real chain, whose consecutive sets share their captions and per-image seeds.

``calibration_data()`` rebuilds every set and its metrics (about a minute on one core); the stored result is
``verdict_calibration.json`` next to this file (``load_calibration``), so ``label_counts`` recomputes the label rates
from the numbers the thresholds were tuned on in well under a second. docs/metrics.md shows the rates.

These are the choosing sets: thresholds are set on them. The rates that check the thresholds come from the toy
datasets in ``calibration_heldout.py``, which choose nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from .features import fid_from_features
from .summary import SetSummary
from .verdict import BLUR, DRIFT, INCONCLUSIVE, OVER, STABLE, verdict

DATA_FILE = Path(__file__).with_name("verdict_calibration.json")
SIZE = 48
"""Image side in pixels."""
NOISE = 0.03
"""Standard deviation of the per-pixel noise added to every image."""
SET_SIZES = (4, 8, 16, 48)
BASELINE_DRAWS = 3
NULL_DRAWS = 60
CHANGE_DRAWS = 20
KEYS = ("hf_share", "laplacian_var", "spectral_slope", "saturation", "colourfulness", "clipped_fraction", "fid_ref")
"""The metrics the verdict reads (stored per set, rounded to 6 significant digits)."""

CHANGES: dict[str, tuple[str, str]] = {
    "none": (STABLE, "a fresh draw of the same distribution"),
    "blur 1": (BLUR, "Gaussian blur, sigma 1 px"),
    "blur 1.5": (BLUR, "Gaussian blur, sigma 1.5 px"),
    "sharpen": (OVER, "unsharp mask, amount 0.5 (sharpness only: the stripes of high CFG)"),
    "over-guidance": (OVER, "colours pushed 1.6x from grey, then unsharp mask 0.8"),
    "palette drift": (DRIFT, "darker background and shape colours (bg 0.15-0.6, shapes 0-0.6 instead of 0.25-0.75 "
                             "and 0.1-0.9): away from D0, neither blurred nor over-guided"),
}
"""change -> (the right label, what was done)."""


# ---- the synthetic sets ---------------------------------------------------------------------------------------

def shapes(n: int, seed: int, size: int = SIZE, noise: float = NOISE, bg: tuple[float, float] = (0.25, 0.75),
           colours: tuple[float, float] = (0.1, 0.9)) -> np.ndarray:
    """``n`` images [n, size, size, 3] in [0, 1]: six random discs or rectangles on a flat background, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        img = np.empty((size, size, 3), np.float32)
        img[:] = rng.uniform(*bg, 3)
        for _ in range(6):
            col = rng.uniform(*colours, 3)
            cy, cx = rng.uniform(0, size, 2)
            rad = rng.uniform(size / 10, size / 4)
            disc = rng.random() < 0.5
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < rad**2) if disc else (
                (abs(yy - cy) < rad) & (abs(xx - cx) < rad * 0.7))
            img[mask] = col
        img += rng.normal(0, noise, img.shape).astype(np.float32)
        out[i] = np.clip(img, 0, 1)
    return out


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (radius 3 sigma, reflect padding) of [N, H, W, 3] images."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.pad(images.astype(np.float64), ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    h, w = images.shape[1:3]
    x = sum(k[j] * x[:, :, j : j + w] for j in range(2 * r + 1))
    x = sum(k[j] * x[:, j : j + h] for j in range(2 * r + 1))
    return np.clip(x, 0, 1).astype(np.float32)


def saturate(images: np.ndarray, factor: float) -> np.ndarray:
    """Push every colour away from its grey value (the pixel's channel mean) by ``factor``."""
    grey = images.mean(axis=-1, keepdims=True)
    return np.clip(grey + factor * (images - grey), 0, 1).astype(np.float32)


def sharpen(images: np.ndarray, amount: float) -> np.ndarray:
    """Unsharp mask: add ``amount`` x (image - image blurred with sigma 1 px)."""
    return np.clip(images + amount * (images - gaussian_blur(images, 1.0)), 0, 1).astype(np.float32)


def changed(change: str, n: int, seed: int) -> np.ndarray:
    """A draw of ``n`` images with ``change`` (a key of CHANGES) applied."""
    if change == "palette drift":
        return shapes(n, seed, bg=(0.15, 0.6), colours=(0.0, 0.6))
    x = shapes(n, seed)
    if change == "none":
        return x
    if change.startswith("blur "):
        return gaussian_blur(x, float(change.split()[1]))
    if change == "sharpen":
        return sharpen(x, 0.5)
    if change == "over-guidance":
        return sharpen(saturate(x, 1.6), 0.8)
    raise ValueError(f"change: {change!r} is not a calibration change; expected one of {', '.join(CHANGES)}")


def _seed(n: int, role: int, k: int) -> int:
    return 100_000 * role + 1_000 * n + k


def calibration_data(set_sizes: tuple[int, ...] = SET_SIZES) -> dict[str, Any]:
    """Build every calibration set and its metrics: ``{"sets": {N: {"baselines": [...], change: [...]}}}``."""
    out: dict[str, Any] = {"size": SIZE, "noise": NOISE, "keys": list(KEYS), "changes": {k: v[1] for k, v in
                                                                                          CHANGES.items()}, "sets": {}}
    for n in set_sizes:
        d0 = SetSummary.from_images(shapes(n, _seed(n, 1, 0)), features="handcrafted")

        def metrics(images: np.ndarray) -> dict[str, float]:
            s = SetSummary.from_images(images, features="handcrafted")
            m = s.statistics()
            m["fid_ref"] = fid_from_features(s.feature_rows, d0.feature_rows)
            return {k: float(f"{m[k]:.6g}") for k in KEYS}

        sets: dict[str, list[dict[str, float]]] = {
            "baselines": [metrics(shapes(n, _seed(n, 2, k))) for k in range(BASELINE_DRAWS)]}
        for c, change in enumerate(CHANGES):
            draws = NULL_DRAWS if change == "none" else CHANGE_DRAWS
            sets[change] = [metrics(changed(change, n, _seed(n, 3 + c, k))) for k in range(draws)]
        out["sets"][str(n)] = sets
    return out


def load_calibration(path: Optional[Path] = None) -> dict[str, Any]:
    """The stored calibration data (``verdict_calibration.json``)."""
    return json.loads(Path(path or DATA_FILE).read_text(encoding="utf-8"))


def label_counts(data: Mapping[str, Any], verdict_fn: Callable[..., Any] = verdict) -> dict[int, dict[str, dict]]:
    """``{N: {change: {label: count}}}``: every changed draw against every baseline draw, labelled by verdict_fn."""
    out: dict[int, dict[str, dict]] = {}
    for n_text, sets in data["sets"].items():
        n = int(n_text)
        for change in CHANGES:
            counts: dict[str, int] = {}
            for cur in sets[change]:
                for base in sets["baselines"]:
                    label = verdict_fn(cur, base, n_images=n).label
                    counts[label] = counts.get(label, 0) + 1
            out.setdefault(n, {})[change] = counts
    return out


def rates(counts: Mapping[str, int], change: str) -> dict[str, float]:
    """right / wrong / inconclusive / missed shares of one change's comparisons.

    wrong: a label naming another direction than the right one (for "none", any label but stable and inconclusive:
    a false alarm); missed: "stable" for a real change.
    """
    right = CHANGES[change][0]
    total = sum(counts.values())
    r = counts.get(right, 0)
    inc = counts.get(INCONCLUSIVE, 0) if right != INCONCLUSIVE else 0
    missed = counts.get(STABLE, 0) if right != STABLE else 0
    return {"n": total, "right": r / total, "inconclusive": inc / total, "missed": missed / total,
            "wrong": (total - r - inc - missed) / total}


def main() -> int:  # pragma: no cover - regenerates the data file: python -m redifine_core.metrics.calibration
    from ..atomic import write_text

    data = calibration_data()
    write_text(DATA_FILE, json.dumps(data, separators=(",", ":")) + "\n")
    for n, per in label_counts(data).items():
        for change, counts in per.items():
            r = rates(counts, change)
            print(f"N={n:3d} {change:14s} right {r['right']:.0%} wrong {r['wrong']:.0%} inconclusive "
                  f"{r['inconclusive']:.0%} missed {r['missed']:.0%}  {counts}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
