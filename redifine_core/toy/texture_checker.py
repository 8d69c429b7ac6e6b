"""Attribute checkers of the texture and patterned-shape sets: read pattern, period and colours back from pixels.

- pattern and scale: the image (or the shape's interior) is projected on its main colour axis, windowed and Fourier
  transformed; the power near the fundamental of each period (4 px fine, 12 px coarse) along four directions (the two
  axes, the two diagonals) says which pattern it is: one axis -> horizontal or vertical stripes, one diagonal ->
  diagonal stripes, both diagonals -> checks, both axes -> dots; no contrast -> plain (``"none"`` for a texture);
- texture colours: two-means clustering of the pixels, each centre snapped to the palette (an unordered pair, since
  stripes and checks cover half the image each);
- patterned shapes: the shape's mask, colour and outline as in :mod:`.checker`, on a 4 px box-blurred copy so the
  fill pattern does not break the mask; the colour is that of the interior's brighter pixels.

No weights, so a checker cannot share a model's blind spots. ``check_textures`` and ``check_patterned_shapes``
return per-attribute and full-caption accuracy: the prompt fidelity of a set of images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from .checker import _as_uint8_array, _template, nearest_color
from .dataset import SHAPES
from .textures import SCALES, parse_patterned_caption, parse_texture_caption

NONE = "none"
MIN_CONTRAST = 8.0
"""Standard deviation (0-255 RGB units) along the main colour axis below which a region counts as plain."""
STRONG = 0.3
"""A direction counts when its power is at least this fraction of the strongest direction's."""
_DIRECTIONS = {"y": (1, 0), "x": (0, 1), "d1": (1, 1), "d2": (1, -1)}


def _project(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """Pixels [..., 3] -> their coordinate on the main colour axis (mean removed) and its standard deviation."""
    flat = pixels.reshape(-1, 3).astype(np.float64)
    centred = flat - flat.mean(0)
    if len(flat) < 2 or centred.std() < 1e-9:
        return np.zeros(pixels.shape[:-1]), 0.0
    _, _, vt = np.linalg.svd(centred[:: max(1, len(flat) // 2048)], full_matrices=False)
    proj = (centred @ vt[0]).reshape(pixels.shape[:-1])
    return proj, float(proj.std())


def direction_power(signal: np.ndarray, period: float) -> dict[str, float]:
    """Power of ``signal`` [H, W] (zero-mean) within 1.6 bins of the fundamental of ``period`` along each direction,
    as a fraction of its total non-DC power."""
    h, w = signal.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    p = np.abs(np.fft.fft2(signal * win)) ** 2
    fy, fx = np.fft.fftfreq(h)[:, None] * h, np.fft.fftfreq(w)[None, :] * w  # in bins
    total = p.sum() - p[0, 0]
    out = {}
    for name, (dy, dx) in _DIRECTIONS.items():
        ky, kx = dy * h / period, dx * w / period
        near = np.zeros_like(p, dtype=bool)
        for sy, sx in ((ky, kx), (-ky, -kx)):
            # distances on the periodic frequency grid
            ddy = (fy - sy + h / 2) % h - h / 2
            ddx = (fx - sx + w / 2) % w - w / 2
            near |= ddy**2 + ddx**2 <= 1.6**2
        out[name] = float(p[near].sum() / total) if total > 1e-12 else 0.0
    return out


def read_pattern(signal: np.ndarray, contrast: float, scales: Sequence[str] = tuple(SCALES)) -> tuple[str, str, str]:
    """``(scale, pattern, orientation)`` of a zero-mean texture signal; ``("none", "none", "")`` without contrast."""
    if contrast < MIN_CONTRAST:
        return NONE, NONE, ""
    powers = {s: direction_power(signal, SCALES[s]) for s in scales}
    scale = max(powers, key=lambda s: max(powers[s].values()))
    pw = powers[scale]
    top = max(pw.values())
    strong = {d for d, v in pw.items() if v >= STRONG * top}
    if strong == {"y"}:
        return scale, "stripes", "horizontal"
    if strong == {"x"}:
        return scale, "stripes", "vertical"
    if strong == {"d1"}:
        return scale, "stripes", "diagonal"
    if strong == {"d1", "d2"}:
        return scale, "checks", ""
    if {"x", "y"} <= strong:
        return scale, "dots", ""
    return scale, NONE, ""


def two_colors(pixels: np.ndarray, iterations: int = 6) -> tuple[str, str]:
    """The palette colours nearest to the two-means centres (medians) of ``pixels`` [..., 3], sorted by name."""
    flat = pixels.reshape(-1, 3).astype(np.float64)
    proj, _ = _project(flat[None])
    proj = proj.ravel()
    lo, hi = np.percentile(proj, [2, 98])
    label = proj > (lo + hi) / 2
    for _ in range(iterations):
        if label.all() or not label.any():
            break
        c0, c1 = flat[~label].mean(0), flat[label].mean(0)
        label = ((flat - c1) ** 2).sum(1) < ((flat - c0) ** 2).sum(1)
    if label.all() or not label.any():
        c = nearest_color(np.median(flat, 0))
        return c, c
    a, b = nearest_color(np.median(flat[~label], 0)), nearest_color(np.median(flat[label], 0))
    return tuple(sorted((a, b)))  # type: ignore[return-value]


def classify_texture(image) -> dict[str, str]:
    """``{"scale", "pattern", "orientation", "colors"}`` of one texture image (colours as ``"a+b"``, sorted)."""
    arr = _as_uint8_array(image)
    signal, contrast = _project(arr)
    scale, pattern, orientation = read_pattern(signal, contrast)
    return {"scale": scale, "pattern": pattern, "orientation": orientation, "colors": "+".join(two_colors(arr))}


def classify_patterned_shape(image, threshold: float = 40.0) -> dict[str, str]:
    """``{"fill", "shape", "color", "background"}`` of one patterned-shape image; ``"none"`` where no shape stands out."""
    arr = _as_uint8_array(image)
    h, w, _ = arr.shape
    soft = ndimage.uniform_filter(arr, size=(4, 4, 1), mode="nearest")
    b = max(1, min(h, w) // 32)
    border = np.concatenate([arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3),
                             arr[:, :b].reshape(-1, 3), arr[:, -b:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = nearest_color(bg_rgb)
    nothing = {"fill": NONE, "shape": NONE, "color": NONE, "background": background}
    labels, n = ndimage.label(np.sqrt(((soft - bg_rgb) ** 2).sum(-1)) > threshold)
    if n == 0:
        return nothing
    sizes = ndimage.sum(np.ones(labels.shape), labels, index=range(1, n + 1))
    mask = ndimage.binary_fill_holes(labels == (1 + int(np.argmax(sizes))))
    if mask.sum() < max(16, h * w // 64):
        return nothing
    interior = ndimage.binary_erosion(mask, iterations=3)
    if interior.sum() < 16:
        interior = mask
    pixels = arr[interior]
    lum = pixels @ np.array([0.2126, 0.7152, 0.0722])
    lo, hi = np.percentile(lum, [2, 98])
    color = nearest_color(np.median(pixels[lum >= (lo + hi) / 2], axis=0))
    signal, contrast = _project(pixels[None])
    full = np.zeros((h, w))
    full[interior] = signal.ravel()
    _, pattern, _ = read_pattern(full, contrast, scales=("fine",))
    fill = {NONE: "plain", "stripes": "striped", "dots": "dotted", "checks": "checked"}[pattern]
    if pattern == NONE and contrast >= MIN_CONTRAST:
        fill = NONE  # contrast without a recognisable pattern
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[y0:y1, x0:x1]
    ious = {s: float((_template(s, x1 - x0, y1 - y0) & crop).sum())
            / max(1.0, float((_template(s, x1 - x0, y1 - y0) | crop).sum())) for s in SHAPES}
    return {"fill": fill, "shape": max(ious, key=ious.get), "color": color, "background": background}


def _score(got: list[dict[str, str]], wanted: list[dict[str, str]], attributes: Sequence[str]) -> dict[str, float]:
    hits = {a: np.array([g[a] == w[a] for g, w in zip(got, wanted)]) for a in attributes}
    out = {a: float(hits[a].mean()) for a in attributes}
    out["full"] = float(np.logical_and.reduce([hits[a] for a in attributes]).mean())
    out["n"] = float(len(got))
    return out


def _pair(images, captions) -> list[str]:
    if isinstance(captions, str):
        captions = [captions] * len(images)
    captions = list(captions)
    if len(captions) != len(images):
        raise ValueError(f"captions has {len(captions)} entries but images has {len(images)}; they must match")
    if not captions:
        raise ValueError("images is empty; need at least one image")
    return captions


TEXTURE_ATTRIBUTES = ("scale", "pattern", "colors")
PATTERNED_ATTRIBUTES = ("fill", "shape", "color", "background")


def check_textures(images, captions: Sequence[str] | str) -> dict[str, float]:
    """Prompt fidelity of texture images: ``{"scale", "pattern", "colors", "full", "n"}``.

    ``pattern`` counts a hit when the pattern and, for stripes, the orientation match; ``colors`` when the unordered
    pair of colours does. Raises ValueError if a caption is not a texture caption or the counts differ."""
    captions = _pair(images, captions)
    wanted = []
    for c in captions:
        p = parse_texture_caption(c)
        wanted.append({"scale": p["scale"], "pattern": f"{p['pattern']}:{p['orientation']}",
                       "colors": "+".join(sorted((p["color"], p["background"])))})
    got = []
    for im in images:
        r = classify_texture(im)
        got.append({"scale": r["scale"], "pattern": f"{r['pattern']}:{r['orientation']}", "colors": r["colors"]})
    return _score(got, wanted, TEXTURE_ATTRIBUTES)


def check_patterned_shapes(images, captions: Sequence[str] | str) -> dict[str, float]:
    """Prompt fidelity of patterned-shape images: ``{"fill", "shape", "color", "background", "full", "n"}``."""
    captions = _pair(images, captions)
    wanted = [parse_patterned_caption(c) for c in captions]
    got = [classify_patterned_shape(im) for im in images]
    return _score(got, wanted, PATTERNED_ATTRIBUTES)
