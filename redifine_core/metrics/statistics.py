"""Weight-free image statistics that move under blur and over-guidance: spectrum, Laplacian, saturation, colour.

Everything here works on one image (or a pixel batch) at a time; the set-level aggregation lives in ``summary``.
Definitions, directions under each collapse mode and caveats: docs/metrics.md.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Optional

import numpy as np

HF_CUTOFF = 0.25
"""Radial frequency (cycles/pixel; Nyquist = 0.5) above which spectral energy counts as high-frequency."""
SLOPE_MIN_BIN = 2
"""First radial bin (units of 1/min(H, W) cycles/pixel) used by the spectral-slope fit; bin 1 has window leakage."""
CLIP_LOW = 1.0 / 255.0
CLIP_HIGH = 254.0 / 255.0
"""A channel value <= CLIP_LOW or >= CLIP_HIGH counts as clipped."""
LUMA = (0.2126, 0.7152, 0.0722)
"""Rec. 709 luma weights used for every luminance-based statistic."""
MIN_SIDE = 8
"""Smallest image side the spectral statistics accept."""

PER_IMAGE = ("hf_share", "spectral_slope", "laplacian_var", "saturation", "colourfulness", "contrast")
"""The statistics computed per image and averaged over a set (in this order in image_statistics' dict)."""

ImagesLike = Any  # torch.Tensor | np.ndarray, [N, H, W, 3] in [0, 1]


def as_image_array(images: ImagesLike, name: str = "images") -> np.ndarray:
    """Validate and convert a batch [N, H, W, 3] (torch or numpy; float in [0, 1] or uint8) to float32 numpy."""
    if hasattr(images, "detach"):  # torch tensor
        images = images.detach().cpu()
        if images.dtype.is_floating_point:
            images = images.float()
        images = images.numpy()
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{name}: expected shape [N, H, W, 3], got {tuple(arr.shape)}")
    if arr.shape[0] < 1:
        raise ValueError(f"{name}: empty set (N = 0); at least one image is needed")
    if arr.shape[1] < MIN_SIDE or arr.shape[2] < MIN_SIDE:
        raise ValueError(
            f"{name}: images of {arr.shape[1]}x{arr.shape[2]} px are too small; both sides must be >= {MIN_SIDE}"
        )
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name}: dtype {arr.dtype} not supported; use float in [0, 1] or uint8")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"{name}: values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return np.clip(arr, 0.0, 1.0)


def luminance(image: np.ndarray) -> np.ndarray:
    """Rec. 709 luma of one image [H, W, 3] (or a batch [..., 3]), float64."""
    return np.tensordot(np.asarray(image, dtype=np.float64), np.asarray(LUMA), axes=([-1], [0]))


# =================================================================================================================
# per-image statistics
# =================================================================================================================


@lru_cache(maxsize=8)
def _hann2d(h: int, w: int) -> np.ndarray:
    out = np.outer(np.hanning(h), np.hanning(w))
    out.setflags(write=False)
    return out


@lru_cache(maxsize=8)
def _radius(h: int, w: int) -> np.ndarray:
    """Radial frequency (cycles/pixel) of each FFT bin (cached per shape, read-only)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    out = np.sqrt(fx * fx + fy * fy)
    out.setflags(write=False)
    return out


def power_spectrum(lum: np.ndarray) -> np.ndarray:
    """2-D power spectrum of one luminance image: mean removed, Hann-windowed, |FFT|^2 (DC at [0, 0])."""
    h, w = lum.shape
    x = (lum - lum.mean()) * _hann2d(h, w)
    f = np.fft.fft2(x)
    return (f.real * f.real + f.imag * f.imag)


def hf_share_one(lum: np.ndarray, cutoff: float = HF_CUTOFF, p: Optional[np.ndarray] = None) -> float:
    """Share of non-DC power above ``cutoff`` cycles/pixel (0 for a flat image); ``p``: a precomputed spectrum."""
    p = power_spectrum(lum) if p is None else p
    r = _radius(*lum.shape)
    total = p[r > 0].sum()
    if total <= 1e-20:
        return 0.0
    return float(p[r > cutoff].sum() / total)


def spectral_slope_one(lum: np.ndarray, p: Optional[np.ndarray] = None) -> float:
    """Slope of log10(radially averaged power) vs log10(frequency), bins SLOPE_MIN_BIN..Nyquist (0 for a flat image)."""
    h, w = lum.shape
    p = power_spectrum(lum) if p is None else p
    r = _radius(h, w)
    side = min(h, w)
    k = np.rint(r * side).astype(np.int64)  # bin index in units of 1/side cycles/pixel
    kmax = side // 2
    sums = np.bincount(k.ravel(), weights=p.ravel(), minlength=kmax + 1)[: kmax + 1]
    counts = np.bincount(k.ravel(), minlength=kmax + 1)[: kmax + 1]
    bins = np.arange(SLOPE_MIN_BIN, kmax + 1)
    mean_p = sums[bins] / np.maximum(counts[bins], 1)
    if mean_p.max() <= 1e-20:
        return 0.0
    floor = mean_p.max() * 1e-16  # keep log finite where a band is exactly empty
    x = np.log10(bins / side)
    y = np.log10(np.maximum(mean_p, floor))
    slope, _ = np.polyfit(x, y, 1)
    return float(slope)


def laplacian_var_one(lum: np.ndarray) -> float:
    """Variance of the 5-point Laplacian of luminance (valid region, no padding)."""
    lap = lum[:-2, 1:-1] + lum[2:, 1:-1] + lum[1:-1, :-2] + lum[1:-1, 2:] - 4.0 * lum[1:-1, 1:-1]
    return float(lap.var())


def saturation_map(image: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max per pixel; 0 where max == 0."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-12), 0.0)


def colourfulness_one(image: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness on the 0..255 scale: sigma_rgyb + 0.3 * mu_rgyb."""
    x = np.asarray(image, dtype=np.float64) * 255.0
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    sigma = math.sqrt(rg.var() + yb.var())
    mu = math.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return float(sigma + 0.3 * mu)



def per_image_statistics(img64: np.ndarray, lum: np.ndarray, p: np.ndarray, sat: np.ndarray) -> dict[str, float]:
    """The PER_IMAGE statistics of one float64 image [H, W, 3], given its luminance, power spectrum and saturation."""
    return {
        "hf_share": hf_share_one(lum, p=p),
        "spectral_slope": spectral_slope_one(lum, p=p),
        "laplacian_var": laplacian_var_one(lum),
        "saturation": float(sat.mean()),
        "colourfulness": colourfulness_one(img64),
        "contrast": float(lum.std()),
    }
