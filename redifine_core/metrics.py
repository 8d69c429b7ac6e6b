"""Collapse metrics: weight-free image statistics, FID/KID on a documented feature set, verdicts.

CONTRACT (filled in by issue 3):

    VERDICTS = ("stable", "drifting to blur", "drifting to over-guidance")
    def image_statistics(images: torch.Tensor) -> dict[str, float]
        # images [N, H, W, 3] in [0, 1]; keys include hf_share, spectral_slope, laplacian_var, saturation,
        # colourfulness, clipped_fraction, mean_r/g/b, std_rgb, diversity
    def set_metrics(generated, reference, previous=None, features="auto") -> dict[str, float | str]
        # image_statistics(generated) + fid/kid vs reference (and vs previous) + "features" (which features were used)
    @dataclass class Verdict: label: str; reasons: list[str]
    def verdict(current: dict, baseline: dict) -> Verdict    # baseline = iteration 0's metrics

Every definition, its direction under each collapse mode and the thresholds are documented in docs/metrics.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .progress import CancelFlag, ProgressCallback, ProgressEvent, check_cancel, report

VERDICTS = ("stable", "drifting to blur", "drifting to over-guidance")

# --- image statistics -------------------------------------------------------------------------------------------
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

# --- the weight-free feature set --------------------------------------------------------------------------------
FEATURES_HANDCRAFTED = "handcrafted-v1"
COLOUR_BINS = 16
SATURATION_BINS = 8
ORIENTATION_BINS = 8
THUMBNAIL = 8
OCTAVE_EDGES = (0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, math.inf)
"""Radial band edges (cycles/pixel) of the luminance band-energy features: one band per octave, plus the corners."""
INCEPTION_ENV = "REDIFINE_INCEPTION_WEIGHTS"
"""With features="auto", a local Inception-v3 safetensors file named by this variable is used; else handcrafted-v1."""

# --- KID ----------------------------------------------------------------------------------------------------------
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 0

# --- verdict thresholds (relative to the same method+seed's iteration 0) -----------------------------------------
BLUR_DROP = 0.25
"""hf_share or laplacian_var falling by more than 25 % is a blur sign."""
SLOPE_STEEPER = 0.3
"""spectral_slope falling (steeper) by more than 0.3 (absolute, log-log units) is a blur sign."""
SLOPE_FLATTER = 0.3
"""spectral_slope rising (flatter: more high-frequency energy) by more than 0.3 is an over-guidance sign."""
SHARP_RISE = 0.25
"""hf_share or laplacian_var rising by more than 25 % is an over-guidance sign."""
SATURATION_RISE = 0.15
"""mean saturation rising by more than 15 % (relative) is an over-guidance sign."""
COLOURFULNESS_RISE = 0.20
"""colourfulness rising by more than 20 % (relative) is an over-guidance sign."""
CLIPPED_RISE = 0.02
"""clipped_fraction rising by more than 0.02 (absolute: 2 % of channel values) is an over-guidance sign."""
MIN_SIGNS = 2
"""A drift label needs at least this many independent signs; one moving metric alone stays "stable"."""

ImagesLike = Any  # torch.Tensor | np.ndarray, [N, H, W, 3] in [0, 1]


# =================================================================================================================
# input handling
# =================================================================================================================


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


# =================================================================================================================
# the weight-free feature set (handcrafted-v1)
# =================================================================================================================


def _area_resize(x: np.ndarray, out: int) -> np.ndarray:
    """Area-average a 2-D array to [out, out] (adaptive average pooling, like torch's)."""
    h, w = x.shape
    ys = [(math.floor(i * h / out), math.ceil((i + 1) * h / out)) for i in range(out)]
    xs = [(math.floor(j * w / out), math.ceil((j + 1) * w / out)) for j in range(out)]
    return np.array([[x[a:b, c:d].mean() for (c, d) in xs] for (a, b) in ys])


def handcrafted_features_one(
    image: np.ndarray,
    lum: Optional[np.ndarray] = None,
    p: Optional[np.ndarray] = None,
    sat: Optional[np.ndarray] = None,
) -> np.ndarray:
    """The handcrafted-v1 feature vector of one image [H, W, 3] in [0, 1] (135 dims, deterministic, no weights).

    Blocks (each a probability vector mapped to its square root, so each block has unit L2 norm and the Euclidean
    distance between two blocks is sqrt(2) x their Hellinger distance):
      1. colour histograms: 16 bins per RGB channel (48 dims, scaled by 1/sqrt(3));
      2. saturation histogram: 8 bins of HSV S (8 dims);
      3. spectral band energies: share of luminance power per octave band OCTAVE_EDGES (7 dims);
      4. gradient orientation histogram: 8 unsigned orientation bins weighted by gradient magnitude (8 dims);
    plus 5. downsampled luminance: 8x8 area-averaged luminance thumbnail scaled by 1/8 (64 dims, L2 norm <= 1).
    ``lum``, ``p`` and ``sat`` may be passed in when already computed (luminance, power spectrum, saturation map).
    """
    img = np.asarray(image, dtype=np.float64)
    blocks: list[np.ndarray] = []
    # 1. colour histograms
    hists = []
    for c in range(3):
        hcount, _ = np.histogram(img[..., c], bins=COLOUR_BINS, range=(0.0, 1.0))
        hists.append(np.sqrt(hcount / max(hcount.sum(), 1)))
    blocks.append(np.concatenate(hists) / math.sqrt(3.0))
    # 2. saturation histogram
    scount, _ = np.histogram(saturation_map(img) if sat is None else sat, bins=SATURATION_BINS, range=(0.0, 1.0))
    blocks.append(np.sqrt(scount / max(scount.sum(), 1)))
    # 3. spectral band energies
    lum = luminance(img) if lum is None else lum
    p = power_spectrum(lum) if p is None else p
    r = _radius(*lum.shape)
    nz = r > 0
    total = p[nz].sum()
    bands = np.array([p[nz & (r >= lo) & (r < hi)].sum() for lo, hi in zip(OCTAVE_EDGES[:-1], OCTAVE_EDGES[1:])])
    blocks.append(np.sqrt(bands / total) if total > 1e-20 else np.zeros(len(bands)))
    # 4. gradient orientation histogram
    gy, gx = np.gradient(lum)
    mag = np.hypot(gx, gy)
    ang = np.mod(np.arctan2(gy, gx), np.pi)
    ocount, _ = np.histogram(ang, bins=ORIENTATION_BINS, range=(0.0, np.pi), weights=mag)
    osum = ocount.sum()
    blocks.append(np.sqrt(ocount / osum) if osum > 1e-20 else np.zeros(ORIENTATION_BINS))
    # 5. downsampled luminance
    blocks.append(_area_resize(lum, THUMBNAIL).ravel() / THUMBNAIL)
    return np.concatenate(blocks)


def handcrafted_features(images: ImagesLike, cancel: Optional[CancelFlag] = None) -> np.ndarray:
    """handcrafted-v1 features of a set: [N, 135] float64."""
    arr = as_image_array(images)
    out = []
    for img in arr:
        check_cancel(cancel)
        out.append(handcrafted_features_one(img))
    return np.stack(out)


def mean_pairwise_distance(feats: np.ndarray) -> float:
    """Mean Euclidean distance over all unordered pairs of rows (0 for fewer than two rows)."""
    n = feats.shape[0]
    if n < 2:
        return 0.0
    sq = (feats * feats).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * feats @ feats.T, 0.0)
    iu = np.triu_indices(n, k=1)
    return float(np.sqrt(d2[iu]).mean())


# =================================================================================================================
# set statistics
# =================================================================================================================


def image_statistics(images: ImagesLike, cancel: Optional[CancelFlag] = None) -> dict[str, float]:
    """Weight-free statistics of one image set [N, H, W, 3] in [0, 1] (torch or numpy). See docs/metrics.md.

    Per-image values (hf_share, spectral_slope, laplacian_var, saturation, colourfulness, contrast) are averaged
    over the set; clipped_fraction and the colour means/stds pool every pixel of the set; diversity is the mean
    pairwise distance between the images' handcrafted-v1 feature vectors.
    """
    return _statistics_and_features(as_image_array(images), cancel)[0]


def _statistics_and_features(arr: np.ndarray, cancel: Optional[CancelFlag]) -> tuple[dict[str, float], np.ndarray]:
    """image_statistics of a validated batch, plus its handcrafted-v1 features (computed once, shared)."""
    names = ("hf_share", "spectral_slope", "laplacian_var", "saturation", "colourfulness", "contrast")
    per: dict[str, list[float]] = {k: [] for k in names}
    feats = []
    clipped = 0
    csum = np.zeros(3)
    csq = np.zeros(3)
    for img in arr:
        check_cancel(cancel)
        img64 = img.astype(np.float64)
        lum = luminance(img64)
        p = power_spectrum(lum)
        sat = saturation_map(img64)
        per["hf_share"].append(hf_share_one(lum, p=p))
        per["spectral_slope"].append(spectral_slope_one(lum, p=p))
        per["laplacian_var"].append(laplacian_var_one(lum))
        per["saturation"].append(float(sat.mean()))
        per["colourfulness"].append(colourfulness_one(img64))
        per["contrast"].append(float(lum.std()))
        clipped += int(np.count_nonzero((img <= CLIP_LOW) | (img >= CLIP_HIGH)))
        flat = img64.reshape(-1, 3)
        csum += flat.sum(axis=0)
        csq += np.einsum("ij,ij->j", flat, flat)
        feats.append(handcrafted_features_one(img64, lum=lum, p=p, sat=sat))
    n_pix = arr.shape[0] * arr.shape[1] * arr.shape[2]
    mean = csum / n_pix
    std = np.sqrt(np.maximum(csq / n_pix - mean * mean, 0.0))
    out = {k: float(np.mean(v)) for k, v in per.items()}
    out["clipped_fraction"] = clipped / (n_pix * 3)
    for i, c in enumerate("rgb"):
        out[f"mean_{c}"] = float(mean[i])
    for i, c in enumerate("rgb"):
        out[f"std_{c}"] = float(std[i])
    out["std_rgb"] = float(std.mean())
    feats_arr = np.stack(feats)
    out["diversity"] = mean_pairwise_distance(feats_arr)
    return out, feats_arr


# =================================================================================================================
# distribution distances
# =================================================================================================================


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _feature_pair(a, b, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Two feature sets as float64 [N, D] arrays with >= 2 rows and the same D, or a ValueError naming ``what``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"{what} needs at least 2 feature rows per set; set {name} has shape {tuple(x.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    return a, b


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature rows of ``a`` and ``b`` (each needs >= 2 rows).

    tr sqrt(S_a S_b) is computed as sum sqrt(eig(sqrt(S_a) S_b sqrt(S_a))) with symmetric eigendecompositions and
    negative eigenvalues clipped, which stays finite and real for the singular covariances of small sets (N < dims).
    """
    a, b = _feature_pair(a, b, "FID")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1])
    s_b = np.cov(b, rowvar=False).reshape(b.shape[1], b.shape[1])
    ra = _sqrt_psd(s_a)
    m = ra @ s_b @ ra
    ev = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    diff = mu_a - mu_b
    fid = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_sqrt)
    return max(fid, 0.0)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = x.shape[0], y.shape[0]
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid_from_features(
    a: np.ndarray, b: np.ndarray, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED
) -> float:
    """Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel (x.y/d + 1)^3, averaged over subsets.

    The subset size is min(subset_size, N_a, N_b); when that covers both sets whole, one exact value is returned.
    Unbiased means it can be slightly negative for near-identical sets. Each set needs >= 2 rows.
    """
    a, b = _feature_pair(a, b, "KID")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"KID: subsets must be >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    size = min(subset_size, a.shape[0], b.shape[0])
    if size == a.shape[0] and size == b.shape[0]:
        return _mmd2_unbiased(a, b)
    rng = np.random.default_rng(seed)
    vals = [
        _mmd2_unbiased(a[rng.choice(a.shape[0], size, replace=False)], b[rng.choice(b.shape[0], size, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(vals))


# =================================================================================================================
# feature extractors
# =================================================================================================================


class FeatureExtractor:
    """Maps an image set to feature rows; ``name`` is the string reported as ``features``."""

    name: str = FEATURES_HANDCRAFTED

    def __call__(self, images: ImagesLike, cancel: Optional[CancelFlag] = None) -> np.ndarray:
        return handcrafted_features(images, cancel=cancel)


class InceptionFeatures(FeatureExtractor):
    """2048-d pool3 features of Inception-v3 from a local safetensors state dict (needs torchvision).

    Accepts a torchvision ``inception_v3`` state dict (1000 classes; inputs ImageNet-normalised) or the FID Inception
    of pytorch-fid / torchmetrics (``pt_inception-2015-12-05``, 1008 classes; FID-specific pooling blocks; inputs
    scaled to [-1, 1]), converted to safetensors. Images are resized to 299x299 bilinearly.
    """

    def __init__(self, weights: Union[str, os.PathLike], batch_size: int = 16, device: Optional[str] = None):
        path = Path(weights)
        if path.suffix != ".safetensors":
            raise ValueError(f"features: Inception weights must be a .safetensors file, got {str(path)!r}")
        if not path.is_file():
            raise ValueError(f"features: Inception weights file {str(path)!r} does not exist")
        try:
            import torchvision  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "Inception features need torchvision (pip install torchvision matching your torch); "
                "or use features='handcrafted' for the weight-free feature set"
            ) from e
        import torch
        from safetensors.torch import load_file

        sd = load_file(str(path))
        num_classes = int(sd["fc.weight"].shape[0]) if "fc.weight" in sd else 1000
        self.fid_layout = num_classes == 1008
        self.model = _build_inception(num_classes, self.fid_layout)
        sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(
                f"features: {path.name} is not an Inception-v3 state dict "
                f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {list(unexpected)[:5]})"
            )
        self.model.fc = torch.nn.Identity()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.eval().to(self.device)
        self.batch_size = batch_size
        self.name = f"inception-v3{'-fid' if self.fid_layout else ''}:{path.name}"

    def __call__(self, images: ImagesLike, cancel: Optional[CancelFlag] = None) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        arr = as_image_array(images)
        out = []
        with torch.no_grad():
            for i in range(0, arr.shape[0], self.batch_size):
                check_cancel(cancel)
                x = torch.from_numpy(arr[i : i + self.batch_size]).permute(0, 3, 1, 2).to(self.device)
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
                if self.fid_layout:
                    x = 2.0 * x - 1.0
                else:
                    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
                    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
                    x = (x - mean) / std
                out.append(self.model(x).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64)


def _build_inception(num_classes: int, fid_layout: bool):  # pragma: no cover - needs torchvision
    """torchvision inception_v3 (no aux head); with ``fid_layout`` the pooling blocks of the 2015 TF FID Inception."""
    import torch
    import torch.nn.functional as F
    from torchvision.models import inception as tvi

    model = tvi.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=num_classes, transform_input=False
    )
    if not fid_layout:
        return model

    class FIDInceptionA(tvi.InceptionA):
        def forward(self, x):
            b1 = self.branch1x1(x)
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
            return torch.cat([b1, b5, b3, bp], 1)

    class FIDInceptionC(tvi.InceptionC):
        def forward(self, x):
            b1 = self.branch1x1(x)
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                          self.branch7x7dbl_5):
                bd = layer(bd)
            bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
            return torch.cat([b1, b7, bd, bp], 1)

    class FIDInceptionE(tvi.InceptionE):
        def __init__(self, in_channels: int, max_pool: bool):
            super().__init__(in_channels)
            self.max_pool = max_pool

        def forward(self, x):
            b1 = self.branch1x1(x)
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            if self.max_pool:
                bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            else:
                bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            bp = self.branch_pool(bp)
            return torch.cat([b1, b3, bd, bp], 1)

    model.Mixed_5b = FIDInceptionA(192, pool_features=32)
    model.Mixed_5c = FIDInceptionA(256, pool_features=64)
    model.Mixed_5d = FIDInceptionA(288, pool_features=64)
    model.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    model.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    model.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    model.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    model.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    model.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    return model


def get_feature_extractor(features: Union[str, os.PathLike, FeatureExtractor] = "auto") -> FeatureExtractor:
    """Resolve ``features``: "auto", "handcrafted", "inception:<path>", a path to a .safetensors file, or an extractor.

    "auto" uses the Inception weights named by $REDIFINE_INCEPTION_WEIGHTS when it is set, else handcrafted-v1.
    """
    if isinstance(features, FeatureExtractor):
        return features
    if isinstance(features, os.PathLike):
        return InceptionFeatures(features)
    if not isinstance(features, str):
        raise ValueError(f"features: expected a string, path or FeatureExtractor, got {type(features).__name__}")
    if features == "auto":
        env = os.environ.get(INCEPTION_ENV, "").strip()
        return InceptionFeatures(env) if env else FeatureExtractor()
    if features in ("handcrafted", FEATURES_HANDCRAFTED):
        return FeatureExtractor()
    if features.startswith("inception:"):
        return InceptionFeatures(features[len("inception:") :])
    if features.endswith(".safetensors"):
        return InceptionFeatures(features)
    raise ValueError(
        f"features: {features!r} not understood; use 'auto', 'handcrafted', 'inception:<file.safetensors>' "
        "or a path to a local Inception-v3 .safetensors file"
    )


# =================================================================================================================
# CLIP score
# =================================================================================================================

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_score(
    images: ImagesLike, captions: Sequence[str], model_dir: Union[str, os.PathLike], batch_size: int = 16,
    cancel: Optional[CancelFlag] = None,
) -> float:
    """Mean CLIPScore, 100 * max(cos(image, caption), 0), with a local CLIP model folder (never downloads).

    Images are resized (shorter side, bicubic, antialiased) and centre-cropped to the model's image size and
    normalised with the OpenAI CLIP mean/std, as CLIPImageProcessor does by default.
    """
    import torch
    import torch.nn.functional as F

    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"clip_model: {str(folder)!r} is not a folder (a local CLIP model saved with save_pretrained)")
    arr = as_image_array(images)
    captions = list(captions)
    if len(captions) != arr.shape[0]:
        raise ValueError(
            f"captions: {len(captions)} captions for {arr.shape[0]} images; they must be aligned one to one"
        )
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    size = int(model.config.vision_config.image_size)
    max_len = min(
        int(getattr(tok, "model_max_length", 77) or 77), int(model.config.text_config.max_position_embeddings)
    )
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def _emb(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    scores = []
    with torch.no_grad():
        for i in range(0, arr.shape[0], batch_size):
            check_cancel(cancel)
            x = torch.from_numpy(arr[i : i + batch_size]).permute(0, 3, 1, 2)
            h, w = x.shape[-2:]
            s = size / min(h, w)
            nh, nw = max(size, round(h * s)), max(size, round(w * s))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            top, left = (nh - size) // 2, (nw - size) // 2
            x = (x[..., top : top + size, left : left + size] - mean) / std
            t = tok(
                captions[i : i + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt"
            )
            ie = _emb(model.get_image_features(pixel_values=x))
            te = _emb(model.get_text_features(input_ids=t["input_ids"], attention_mask=t.get("attention_mask")))
            cos = F.cosine_similarity(ie.float(), te.float(), dim=-1)
            scores.append((100.0 * cos.clamp(min=0)).numpy())
    return float(np.concatenate(scores).mean())


# =================================================================================================================
# one iteration's metrics
# =================================================================================================================


def set_metrics(
    generated: ImagesLike,
    reference: ImagesLike,
    previous: Optional[ImagesLike] = None,
    features: Union[str, os.PathLike, FeatureExtractor] = "auto",
    captions: Optional[Sequence[str]] = None,
    clip_model: Optional[Union[str, os.PathLike]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFlag] = None,
) -> dict[str, Union[float, str]]:
    """image_statistics(generated) + fid_ref/kid_ref (vs ``reference`` = D0) + fid_prev/kid_prev (vs ``previous``).

    fid_prev/kid_prev are present only when ``previous`` is given; clip_score only when ``clip_model`` (a local CLIP
    folder) and ``captions`` (aligned with ``generated``) are given. "features" names the feature set used.
    FID/KID need at least 2 images in every set compared (ValueError otherwise).
    """
    extractor = get_feature_extractor(features)
    gen = as_image_array(generated, "generated")
    ref = as_image_array(reference, "reference")
    prev = as_image_array(previous, "previous") if previous is not None else None
    for name, x in (("generated", gen), ("reference", ref), ("previous", prev)):
        if x is not None and x.shape[0] < 2:
            raise ValueError(f"{name}: FID/KID need at least 2 images per set, got {x.shape[0]}")
    if clip_model is not None and captions is None:
        raise ValueError("captions: a CLIP score needs the captions aligned with the generated images")
    total = 4 + (prev is not None) + (clip_model is not None)
    step = 0

    def tick(msg: str) -> None:
        nonlocal step
        step += 1
        report(progress, ProgressEvent(phase="metrics", step=step, total=total, message=msg))

    stats, gen_handcrafted = _statistics_and_features(gen, cancel)
    out: dict[str, Union[float, str]] = dict(stats)
    tick("image statistics")
    fg = gen_handcrafted if type(extractor) is FeatureExtractor else extractor(gen, cancel=cancel)
    tick("features of the generated set")
    fr = extractor(ref, cancel=cancel)
    tick("features of the reference set")
    out["fid_ref"] = fid_from_features(fg, fr)
    out["kid_ref"] = kid_from_features(fg, fr)
    tick("FID/KID vs reference")
    if prev is not None:
        fp = extractor(prev, cancel=cancel)
        out["fid_prev"] = fid_from_features(fg, fp)
        out["kid_prev"] = kid_from_features(fg, fp)
        tick("FID/KID vs previous")
    if clip_model is not None:
        out["clip_score"] = clip_score(gen, captions or [], clip_model, cancel=cancel)
        tick("CLIP score")
    out["features"] = extractor.name
    return out


# =================================================================================================================
# verdict
# =================================================================================================================


@dataclass(frozen=True)
class Verdict:
    """A per-iteration reading for an artist: ``label`` in VERDICTS and the metric changes that triggered it."""

    label: str
    reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.label not in VERDICTS:
            raise ValueError(f"label: {self.label!r} is not a verdict; allowed: {', '.join(VERDICTS)}")
        if not all(isinstance(r, str) for r in self.reasons):
            raise ValueError(f"reasons: must be a list of strings, got {self.reasons!r}")

    def to_dict(self) -> dict:
        return {"label": self.label, "reasons": list(self.reasons)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Verdict":
        if not isinstance(d, Mapping) or "label" not in d:
            raise ValueError(f"verdict: expected a mapping with 'label' and 'reasons', got {d!r}")
        return cls(label=d["label"], reasons=list(d.get("reasons", [])))


def _rel(cur: float, base: float) -> float:
    return (cur - base) / max(abs(base), 1e-12)


def verdict(current: Mapping[str, Any], baseline: Mapping[str, Any]) -> Verdict:
    """Compare an iteration's metrics with iteration 0's of the same method+seed (thresholds: module constants).

    Blur signs: sharpness (hf_share and/or laplacian_var) down > BLUR_DROP (relative), spectral_slope down >
    SLOPE_STEEPER. Over-guidance signs: sharpness up > SHARP_RISE (relative), spectral_slope up > SLOPE_FLATTER,
    saturation up > SATURATION_RISE, colourfulness up > COLOURFULNESS_RISE (relative), clipped_fraction up >
    CLIPPED_RISE (absolute). hf_share and laplacian_var together are one sign (they measure the same thing).
    A label needs MIN_SIGNS signs; when both modes have enough, the one with more signs wins (ties: the larger summed
    change in threshold units). Metrics missing from either dict are skipped.
    """

    def get(name: str) -> Optional[tuple[float, float]]:
        if name in current and name in baseline:
            try:
                c, b = float(current[name]), float(baseline[name])
            except (TypeError, ValueError):
                return None
            if math.isfinite(c) and math.isfinite(b):
                return c, b
        return None

    # each entry: (reasons, strength in threshold units); hf_share and laplacian_var both measure sharpness and
    # move together, so the two of them count as ONE sign (listed separately in the reasons)
    blur: list[tuple[list[str], float]] = []
    over: list[tuple[list[str], float]] = []
    sharp_down: list[tuple[str, float]] = []
    sharp_up: list[tuple[str, float]] = []
    for name in ("hf_share", "laplacian_var"):
        v = get(name)
        if v is None:
            continue
        r = _rel(*v)
        if r <= -BLUR_DROP:
            sharp_down.append((f"{name} {r:+.0%} vs iteration 0 ({v[1]:.4g} -> {v[0]:.4g})", -r / BLUR_DROP))
        elif r >= SHARP_RISE:
            sharp_up.append((f"{name} {r:+.0%} vs iteration 0 ({v[1]:.4g} -> {v[0]:.4g})", r / SHARP_RISE))
    if sharp_down:
        blur.append(([t for t, _ in sharp_down], max(x for _, x in sharp_down)))
    if sharp_up:
        over.append(([t for t, _ in sharp_up], max(x for _, x in sharp_up)))
    v = get("spectral_slope")
    if v is not None:
        d = v[0] - v[1]
        if d <= -SLOPE_STEEPER:
            text = f"spectral_slope {d:+.2f}, steeper, vs iteration 0 ({v[1]:.2f} -> {v[0]:.2f})"
            blur.append(([text], -d / SLOPE_STEEPER))
        elif d >= SLOPE_FLATTER:
            text = f"spectral_slope {d:+.2f}, flatter, vs iteration 0 ({v[1]:.2f} -> {v[0]:.2f})"
            over.append(([text], d / SLOPE_FLATTER))
    for name, thr in (("saturation", SATURATION_RISE), ("colourfulness", COLOURFULNESS_RISE)):
        v = get(name)
        if v is not None:
            r = _rel(*v)
            if r >= thr:
                over.append(([f"{name} {r:+.0%} vs iteration 0 ({v[1]:.3g} -> {v[0]:.3g})"], r / thr))
    v = get("clipped_fraction")
    if v is not None and v[0] - v[1] >= CLIPPED_RISE:
        d = v[0] - v[1]
        text = f"clipped_fraction {d * 100:+.1f} points vs iteration 0 ({v[1]:.1%} -> {v[0]:.1%})"
        over.append(([text], d / CLIPPED_RISE))

    nb, no = len(blur), len(over)
    flat = lambda signs: [t for texts, _ in signs for t in texts]  # noqa: E731
    if nb >= MIN_SIGNS or no >= MIN_SIGNS:
        sb, so = sum(x for _, x in blur), sum(x for _, x in over)
        if (nb, sb) >= (no, so):
            return Verdict("drifting to blur", flat(blur) + [f"(also: {t})" for t in flat(over)])
        return Verdict("drifting to over-guidance", flat(over) + [f"(also: {t})" for t in flat(blur)])
    lone = flat(blur + over)
    if lone:
        return Verdict("stable", [f"only one sign, {MIN_SIGNS} needed: {t}" for t in lone])
    return Verdict("stable", ["all metrics within thresholds of iteration 0"])
