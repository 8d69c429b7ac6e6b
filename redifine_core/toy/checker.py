"""The toy attribute checker: reads shape, shape colour and background colour back from pixels, analytically.

- background: the median colour of the image border, snapped to the nearest palette colour;
- shape mask: pixels farther than ``threshold`` (RGB, 0-255) from that border colour; its largest connected part;
- shape colour: the median colour of the mask's interior, snapped to the nearest palette colour;
- shape: the template (circle, square, triangle drawn into the mask's bounding box) with the highest IoU.

No weights, so it cannot share a model's blind spots. ``check`` compares the readings with the captions and returns
per-attribute and full-caption accuracy: the prompt fidelity of a set of toy images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .dataset import COLORS, PALETTE, SHAPES, parse_caption

_PAL = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)
ATTRIBUTES = ("shape", "color", "background")
NONE = "none"


def _as_uint8_array(image) -> np.ndarray:
    """PIL image, [H, W, 3] float in [0, 1] (numpy or torch) or uint8 array -> float32 [H, W, 3] in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image shape {arr.shape} is not allowed; expected [H, W, 3]")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(arr, 0.0, 1.0) * 255.0


def nearest_color(rgb: np.ndarray) -> str:
    """The palette colour nearest to ``rgb`` (0..255)."""
    return COLORS[int(np.argmin(((_PAL - np.asarray(rgb, dtype=np.float32)) ** 2).sum(-1)))]


def _template(shape: str, w: int, h: int) -> np.ndarray:
    img = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse((0, 0, w - 1, h - 1), fill=1)
    elif shape == "square":
        d.rectangle((0, 0, w - 1, h - 1), fill=1)
    else:
        d.polygon([((w - 1) / 2, 0), (w - 1, h - 1), (0, h - 1)], fill=1)
    return np.asarray(img, dtype=bool)


def classify(image, threshold: float = 40.0) -> dict[str, str]:
    """Read one image's ``{"shape", "color", "background"}``; ``"none"`` where no shape stands out."""
    arr = _as_uint8_array(image)
    h, w, _ = arr.shape
    b = max(1, min(h, w) // 32)
    border = np.concatenate([arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3),
                             arr[:, :b].reshape(-1, 3), arr[:, -b:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = nearest_color(bg_rgb)
    dist = np.sqrt(((arr - bg_rgb) ** 2).sum(-1))
    labels, n = ndimage.label(dist > threshold)
    if n == 0:
        return {"shape": NONE, "color": NONE, "background": background}
    sizes = ndimage.sum(np.ones_like(dist), labels, index=range(1, n + 1))
    mask = labels == (1 + int(np.argmax(sizes)))
    if mask.sum() < max(4, h * w // 256):
        return {"shape": NONE, "color": NONE, "background": background}
    mask = ndimage.binary_fill_holes(mask)
    interior = ndimage.binary_erosion(mask)
    pixels = arr[interior] if interior.sum() >= 4 else arr[mask]
    color = nearest_color(np.median(pixels, axis=0))
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[y0:y1, x0:x1]
    best, best_iou = NONE, -1.0
    for shape in SHAPES:
        t = _template(shape, x1 - x0, y1 - y0)
        iou = float((t & crop).sum()) / max(1.0, float((t | crop).sum()))
        if iou > best_iou:
            best, best_iou = shape, iou
    return {"shape": best, "color": color, "background": background}


def classify_batch(images, threshold: float = 40.0) -> list[dict[str, str]]:
    """:func:`classify` for a batch: [N, H, W, 3] array/tensor in [0, 1] or a sequence of images."""
    return [classify(im, threshold) for im in images]


def check(images, captions: Sequence[str] | str, threshold: float = 40.0) -> dict[str, float]:
    """Prompt fidelity of toy images against their captions.

    Returns ``{"shape", "color", "background", "full", "n"}``: the fraction of images whose shape / shape colour /
    background colour matches the caption, the fraction where all three do, and the number of images.
    Raises ValueError if a caption is not a toy caption or the counts differ.
    """
    if isinstance(captions, str):
        captions = [captions] * len(images)
    captions = list(captions)
    if len(captions) != len(images):
        raise ValueError(f"captions has {len(captions)} entries but images has {len(images)}; they must match")
    if len(captions) == 0:
        raise ValueError("images is empty; need at least one image")
    wanted = [parse_caption(c) for c in captions]
    got = classify_batch(images, threshold)
    hits = {a: np.array([g[a] == w[a] for g, w in zip(got, wanted)]) for a in ATTRIBUTES}
    full = hits["shape"] & hits["color"] & hits["background"]
    out = {a: float(hits[a].mean()) for a in ATTRIBUTES}
    out["full"] = float(full.mean())
    out["n"] = float(len(captions))
    return out
