"""Feature vectors for FID, KID and diversity: the weight-free handcrafted-v1 set, the features-spec grammar, FID/KID.

A *features spec* names the feature set: "auto" (the Inception-v3 file named by $REDIFINE_INCEPTION_WEIGHTS when it
is set, else handcrafted-v1), "handcrafted" / "handcrafted-v1", "inception:<file.safetensors>", a path to a local
Inception-v3 .safetensors file, or a FeatureExtractor instance. ``check_features`` validates a spec from the file's
safetensors header alone, so a config can be rejected before any model loads; ``inception.get_feature_extractor``
builds it.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..progress import CancelFlag, check_cancel
from .statistics import ImagesLike, _radius, as_image_array, luminance, power_spectrum, saturation_map

FEATURES_HANDCRAFTED = "handcrafted-v1"
COLOUR_BINS = 16
SATURATION_BINS = 8
ORIENTATION_BINS = 8
THUMBNAIL = 8
OCTAVE_EDGES = (0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, math.inf)
"""Radial band edges (cycles/pixel) of the luminance band-energy features: one band per octave, plus the corners."""
INCEPTION_ENV = "REDIFINE_INCEPTION_WEIGHTS"
"""With features="auto", a local Inception-v3 safetensors file named by this variable is used; else handcrafted-v1."""
INCEPTION_KEYS = ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight")
"""Tensors every Inception-v3 state dict has (torchvision's and the FID Inception's); checked in the header."""

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 0

PAIRWISE_BLOCK = 1024
"""mean_pairwise_distance works on blocks of this many rows, so its memory stays O(block x N), not O(N^2)."""

FeatureSpec = Union[str, os.PathLike, "FeatureExtractor"]


class FeaturesFileNotFoundError(FileNotFoundError, ValueError):
    """A features spec names a file that does not exist.

    Both a FileNotFoundError (what config validation and the CLI catch for a missing path) and a ValueError (what
    callers of get_feature_extractor have always caught for a bad spec).
    """


class FeaturesDependencyError(ImportError, ValueError):
    """Inception features were asked for but torchvision is missing (an ImportError and a ValueError, as above)."""


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
    """Mean Euclidean distance over all unordered pairs of rows (0 for fewer than two rows).

    Up to PAIRWISE_BLOCK rows this is one Gram matrix; above, rows are taken a block at a time so memory stays
    O(PAIRWISE_BLOCK x N) (the one-matrix path is kept for small sets because it is the reference numbers' path).
    """
    n = feats.shape[0]
    if n < 2:
        return 0.0
    sq = (feats * feats).sum(axis=1)
    if n <= PAIRWISE_BLOCK:
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * feats @ feats.T, 0.0)
        iu = np.triu_indices(n, k=1)
        return float(np.sqrt(d2[iu]).mean())
    total = 0.0
    for a in range(0, n - 1, PAIRWISE_BLOCK):
        b = min(a + PAIRWISE_BLOCK, n - 1)
        d2 = np.maximum(sq[a:b, None] + sq[None, a + 1 :] - 2.0 * feats[a:b] @ feats[a + 1 :].T, 0.0)
        upper = np.arange(a + 1, n)[None, :] > np.arange(a, b)[:, None]  # column j > row i
        total += float(np.sqrt(d2[upper]).sum())
    return total / (n * (n - 1) / 2)


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
# feature extractors and the features-spec grammar
# =================================================================================================================


class FeatureExtractor:
    """Maps an image set to feature rows; ``name`` is the string reported as ``features``.

    This base class is handcrafted-v1. A subclass must give each image the same row whatever batch it comes in,
    because SetSummary feeds images batch by batch.
    """

    name: str = FEATURES_HANDCRAFTED

    def __call__(self, images: ImagesLike, cancel: Optional[CancelFlag] = None) -> np.ndarray:
        return handcrafted_features(images, cancel=cancel)


def _spec_label(spec: object) -> str:
    return f"features={str(spec) if isinstance(spec, os.PathLike) else spec!r}"


def _weights_path(spec: FeatureSpec) -> tuple[Optional[Path], str]:
    """(the Inception weights file a spec names or None for handcrafted-v1, a label naming the spec for messages)."""
    if isinstance(spec, os.PathLike):
        return Path(spec), _spec_label(spec)
    if not isinstance(spec, str):
        raise ValueError(f"features: expected a string, path or FeatureExtractor, got {type(spec).__name__}")
    label = _spec_label(spec)
    if spec == "auto":
        env = os.environ.get(INCEPTION_ENV, "").strip()
        return (Path(env), f"features='auto' (${INCEPTION_ENV}={env!r})") if env else (None, label)
    if spec in ("handcrafted", FEATURES_HANDCRAFTED):
        return None, label
    if spec.startswith("inception:"):
        rest = spec[len("inception:") :].strip()
        if not rest:
            raise ValueError(f"{label}: 'inception:' must be followed by the path of a local Inception-v3 "
                             ".safetensors file")
        return Path(rest), label
    if spec.endswith(".safetensors"):
        return Path(spec), label
    raise ValueError(
        f"{label} not understood; use 'auto', 'handcrafted', 'inception:<file.safetensors>' "
        "or a path to a local Inception-v3 .safetensors file"
    )


def _torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _check_weights(path: Path, label: str) -> int:
    """Check an Inception weights file from its safetensors header (no tensor is read); return its class count."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise ValueError(f"{label}: Inception weights must be a .safetensors file, got {str(path)!r}")
    if not path.exists():
        raise FeaturesFileNotFoundError(
            f"{label}: Inception weights file {str(path)!r} does not exist (expected a local Inception-v3 "
            ".safetensors file)")
    if not path.is_file():
        raise ValueError(f"{label}: {str(path)!r} is not a file (expected a local Inception-v3 .safetensors file)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = set(f.keys())
            fc_shape = f.get_slice("fc.weight").get_shape() if "fc.weight" in keys else None
    except Exception as e:  # SafetensorError (corrupt header) or OSError (unreadable): one line naming the file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{label}: cannot read {str(path)!r} as a safetensors file ({reason})") from None
    if not _torchvision_available():
        raise FeaturesDependencyError(
            f"{label}: Inception features need torchvision (pip install torchvision matching your torch); "
            "or use features='handcrafted' for the weight-free feature set")
    missing = [k for k in INCEPTION_KEYS if k not in keys]
    if missing:
        raise ValueError(f"{label}: {str(path)!r} is not an Inception-v3 state dict (no {missing[0]!r})")
    return int(fc_shape[0]) if fc_shape else 1000


def check_features(spec: FeatureSpec) -> None:
    """Validate a features spec without loading any weights; one-line error naming the spec and what was expected.

    Unknown spec or bad file -> ValueError; missing file -> FileNotFoundError (also a ValueError); torchvision
    missing for Inception -> ImportError (also a ValueError). "auto" checks the file $REDIFINE_INCEPTION_WEIGHTS
    names, when it is set.
    """
    if isinstance(spec, FeatureExtractor):
        return
    path, label = _weights_path(spec)
    if path is not None:
        _check_weights(path, label)


def feature_set_name(spec: FeatureSpec) -> str:
    """The ``features`` name the extractor for ``spec`` reports, found from the header alone (no weights loaded)."""
    if isinstance(spec, FeatureExtractor):
        return spec.name
    path, label = _weights_path(spec)
    if path is None:
        return FEATURES_HANDCRAFTED
    return _inception_name(path, _check_weights(path, label) == 1008)


def _inception_name(path: Path, fid_layout: bool) -> str:
    return f"inception-v3{'-fid' if fid_layout else ''}:{path.name}"


def describe_feature_set(name: str) -> str:
    """What the feature set ``name`` (a result's "features" field) is, where it came from, and, in one sentence, what
    it cannot see; for the report and the answer."""
    if name == FEATURES_HANDCRAFTED:
        return ("handcrafted-v1, the weight-free feature set (colour and saturation histograms, luminance octave-band "
                "energies, gradient orientations, an 8x8 luminance thumbnail): it cannot see meaning or identity, so "
                "a cat turning into a dog, or one face into another, with the same colours and layout leaves it "
                "unchanged.")
    if name.startswith("inception-v3"):
        layout, _, file = name.partition(":")
        kind = "the FID Inception (2015 TF weights)" if layout.endswith("-fid") else "a torchvision Inception-v3"
        return (f"{name}, 2048-d pool3 features of {kind} from the local weights file {file or '?'}, configured for "
                "this run: it sees the ImageNet object categories its weights learnt, not identity or style, so one "
                "person's face turning into another's, or one artist's style into a near one, moves it little (with "
                "untrained weights it sees nothing meaningful).")
    return f"{name}: a feature set this version does not describe."
