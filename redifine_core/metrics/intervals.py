"""95 % intervals of the changes the verdict reads, bootstrapped over the images of the two sets compared.

    change_intervals(current, baseline, reference=None) -> {"hf_share_change_lo": .., "hf_share_change_hi": .., ...}

``current`` and ``baseline`` are SetSummary objects (in the chain: iteration i's set and iteration 0's set of the
same method and seed). Each bootstrap resample draws the images of each set with replacement, independently and with
a fixed seed, and one resample of a set serves every statistic and FID. That shared resample, the pooled ratio of
``clipped_fraction`` and FID's three sets are why this is written here rather than with ``scipy.stats.bootstrap``,
which resamples each statistic on its own. The changes are in the verdict's own units: relative for hf_share,
laplacian_var, saturation and colourfulness (and fid_ref), absolute for spectral_slope and clipped_fraction.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from .features import fid_from_features

INTERVAL_LEVEL = 0.95
RESAMPLES = 400
INTERVAL_SEED = 0
RELATIVE_STATS = ("hf_share", "laplacian_var", "saturation", "colourfulness")
"""Statistics whose change the verdict reads relative to iteration 0."""
ABSOLUTE_STATS = ("spectral_slope", "clipped_fraction")
"""Statistics whose change the verdict reads as a difference."""
FID_BOOTSTRAP_BUDGET = 2e7
"""FID is bootstrapped when one FID costs at most this many multiply-adds (largest set x feature size x
min(largest set, feature size)); above it the interval of the squared feature-mean distance stands in for FID's."""
FID_KEY = "fid_ref"
MEAN_DISTANCE_KEY = "fid_ref_mean"
"""Stands in for fid_ref's interval when FID is too costly to bootstrap: the change of ||mean - mean of D0||^2."""


def interval_keys(name: str) -> tuple[str, str]:
    """The metrics keys holding the lower and upper end of ``name``'s change interval."""
    return f"{name}_change_lo", f"{name}_change_hi"


def read_interval(metrics: Mapping[str, Any], name: str) -> Optional[tuple[float, float]]:
    """(lo, hi) of ``name``'s change interval from a metrics dict, or None when it holds none (or a non-finite one)."""
    lo_key, hi_key = interval_keys(name)
    try:
        lo, hi = float(metrics[lo_key]), float(metrics[hi_key])
    except (KeyError, TypeError, ValueError):
        return None
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def _fid_fast(a: np.ndarray, b: np.ndarray) -> float:
    """fid_from_features, computed in the smaller of the row and feature spaces: tr sqrt(S_a S_b) equals the sum of
    the singular values of A B^T / sqrt((n_a - 1)(n_b - 1)) for the centred rows A, B."""
    d = a.shape[1]
    if max(a.shape[0], b.shape[0]) > d:
        return fid_from_features(a, b)
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = a.shape[0] - 1, b.shape[0] - 1
    diff = a.mean(0) - b.mean(0)
    tr_sqrt = float(np.linalg.svd(ca @ cb.T, compute_uv=False).sum()) / math.sqrt(na * nb)
    return max(float(diff @ diff + (ca * ca).sum() / na + (cb * cb).sum() / nb - 2.0 * tr_sqrt), 0.0)


def fid_bootstrap_affordable(n_max: int, dims: int) -> bool:
    """Whether one FID of sets of up to ``n_max`` rows of ``dims`` features fits FID_BOOTSTRAP_BUDGET."""
    return n_max * dims * min(n_max, dims) <= FID_BOOTSTRAP_BUDGET


def _ends(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def change_intervals(current: Any, baseline: Any, reference: Any = None, *, resamples: int = RESAMPLES,
                     seed: int = INTERVAL_SEED, level: float = INTERVAL_LEVEL) -> dict[str, float]:
    """Bootstrap intervals of each change from ``baseline`` to ``current`` (SetSummary objects), as metrics keys.

    For every statistic in RELATIVE_STATS and ABSOLUTE_STATS: ``<name>_change_lo`` and ``<name>_change_hi``, the
    ``level`` percentile interval of the change over ``resamples`` resamples. With ``reference`` (D0, a SetSummary
    with the same feature set), also fid_ref's relative change: FID of the resampled sets against a resampled D0.
    Resampling repeats images, which raises FID, so its interval is the observed change plus the spread of the
    resampled changes around their median, divided by the observed fid_ref of ``baseline``. When FID is too costly
    (FID_BOOTSTRAP_BUDGET) the keys ``fid_ref_mean_change_lo/hi`` hold the interval of the squared feature-mean
    distance's relative change instead. Sets of fewer than 2 images get no intervals (an empty dict).
    """
    if resamples < 10 or not 0.5 <= level < 1.0:
        raise ValueError(f"resamples={resamples!r} must be >= 10 and level={level!r} in [0.5, 1)")
    if len(current) < 2 or len(baseline) < 2:
        return {}
    rng = np.random.default_rng(seed)
    idx_c = rng.integers(0, len(current), (resamples, len(current)))
    idx_b = rng.integers(0, len(baseline), (resamples, len(baseline)))
    pc, pb = current.per_image(), baseline.per_image()
    out: dict[str, float] = {}
    for name in RELATIVE_STATS + ("spectral_slope",):
        vc, vb = pc[name][idx_c].mean(axis=1), pb[name][idx_b].mean(axis=1)
        change = (vc - vb) / np.maximum(np.abs(vb), 1e-12) if name in RELATIVE_STATS else vc - vb
        out.update(zip(interval_keys(name), _ends(change, level)))
    frac_c = pc["clipped"][idx_c].sum(axis=1) / pc["values"][idx_c].sum(axis=1)
    frac_b = pb["clipped"][idx_b].sum(axis=1) / pb["values"][idx_b].sum(axis=1)
    out.update(zip(interval_keys("clipped_fraction"), _ends(frac_c - frac_b, level)))
    if reference is not None and reference is not baseline and len(reference) >= 2:
        out.update(_fid_interval(current.feature_rows, baseline.feature_rows, reference.feature_rows,
                                 idx_c, idx_b, rng, level))
    return out


def _fid_interval(fc: np.ndarray, fb: np.ndarray, fr: np.ndarray, idx_c: np.ndarray, idx_b: np.ndarray,
                  rng: np.random.Generator, level: float) -> dict[str, float]:
    resamples = idx_c.shape[0]
    idx_r = rng.integers(0, fr.shape[0], (resamples, fr.shape[0]))
    if fid_bootstrap_affordable(max(fc.shape[0], fb.shape[0], fr.shape[0]), fr.shape[1]):
        base = fid_from_features(fb, fr)
        if base <= 0:
            return {}
        observed = fid_from_features(fc, fr) - base
        deltas = np.array([_fid_fast(fc[ic], fr[ir]) - _fid_fast(fb[ib], fr[ir])
                           for ic, ib, ir in zip(idx_c, idx_b, idx_r)])
        lo, hi = _ends(deltas - np.median(deltas), level)
        return dict(zip(interval_keys(FID_KEY), ((observed + lo) / base, (observed + hi) / base)))
    mr = np.stack([fr[ir].mean(axis=0) for ir in idx_r])
    dist_c = ((np.stack([fc[ic].mean(axis=0) for ic in idx_c]) - mr) ** 2).sum(axis=1)
    dist_b = ((np.stack([fb[ib].mean(axis=0) for ib in idx_b]) - mr) ** 2).sum(axis=1)
    return dict(zip(interval_keys(MEAN_DISTANCE_KEY),
                    _ends((dist_c - dist_b) / np.maximum(dist_b, 1e-12), level)))
