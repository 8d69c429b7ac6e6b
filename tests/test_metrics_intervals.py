"""Every sign the verdict counts carries a bootstrap interval from the images of the two sets compared."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from redifine_core.metrics import SetSummary, change_intervals, fid_from_features, set_metrics, verdict
from redifine_core.metrics.calibration import changed, gaussian_blur, shapes
from redifine_core.metrics.intervals import _fid_fast, interval_keys, read_interval
from redifine_core.metrics.verdict import BLUR, DRIFT, INCONCLUSIVE, STABLE


def mixture(n_sharp: int, n_soft: int, seed: int, size: int = 32) -> np.ndarray:
    """Uniform noise images, the last ``n_soft`` blurred: the set's sharpness depends on how many are blurred, so a
    small set's mean sharpness is mostly the luck of that count."""
    rng = np.random.default_rng(seed)
    out = [rng.uniform(0.2, 0.8, (size, size, 3)) for _ in range(n_sharp + n_soft)]
    out = [gaussian_filter(x, (1.5, 1.5, 0)) if k >= n_sharp else x for k, x in enumerate(out)]
    return np.stack(out).astype(np.float32)


def summary(images: np.ndarray) -> SetSummary:
    return SetSummary.from_images(images, features="handcrafted")


def metrics_pair(current: SetSummary, baseline: SetSummary, reference: SetSummary) -> tuple[dict, dict]:
    """(iteration i's metrics with their change intervals, iteration 0's metrics), as the chain records them."""
    cur = set_metrics(current, reference, features="handcrafted")
    cur.update(change_intervals(current, baseline, reference))
    return cur, set_metrics(baseline, reference, features="handcrafted")


@pytest.mark.parametrize("scale", [1, 10])
def test_a_change_past_the_threshold_inside_the_noise_is_inconclusive_and_with_many_images_it_is_the_label(scale):
    """Iteration 0 has 10 of 16 sharp images, iteration i 6 of 16: hf_share and laplacian_var fall ~40 % and the
    spectrum steepens, enough for "drifting to blur" by the thresholds, but 16 images cannot tell that from the luck
    of the draw. The same proportions at 160 images can."""
    base, cur = summary(mixture(10 * scale, 6 * scale, 1)), summary(mixture(6 * scale, 10 * scale, 2))
    m, m0 = metrics_pair(cur, base, base)
    plain = {k: v for k, v in m.items() if not k.endswith(("_change_lo", "_change_hi"))}
    assert verdict(plain, m0).label == BLUR  # by the thresholds alone
    change = (m["hf_share"] - m0["hf_share"]) / m0["hf_share"]
    lo, hi = read_interval(m, "hf_share")
    assert change < -0.25 and lo < change < hi
    v = verdict(m, m0)
    if scale == 1:
        assert lo < 0 < hi
        assert v.label == INCONCLUSIVE, v
        assert v.reasons[0] == (f"hf_share {change:+.0%} [{lo:+.0%}, {hi:+.0%}] passes the -25% threshold but its "
                                "interval includes 0"), v.reasons
        assert "would read: drifting to blur if these moves are real, stable if not" in v.reasons
    else:
        assert hi < 0
        assert v.label == BLUR, v
        assert v.reasons[0] == f"hf_share {change:+.0%} [{lo:+.0%}, {hi:+.0%}] vs iteration 0 " \
                               f"({m0['hf_share']:.4g} -> {m['hf_share']:.4g})"


def test_a_real_blur_reads_blur_with_intervals_that_exclude_zero():
    d0, base = summary(shapes(16, 1)), summary(shapes(16, 2))
    cur = summary(gaussian_blur(shapes(16, 3), 1.5))
    m, m0 = metrics_pair(cur, base, d0)
    v = verdict(m, m0)
    assert v.label == BLUR, v
    for name in ("hf_share", "laplacian_var", "spectral_slope"):
        lo, hi = read_interval(m, name)
        assert lo <= hi < 0, (name, lo, hi)
    assert all("[" in r for r in v.reasons if not r.startswith("(")), v.reasons  # each counted sign quotes its interval


def test_a_palette_drift_raises_fid_with_an_interval_above_zero_and_a_fresh_draw_does_not():
    d0, base = summary(shapes(48, 1)), summary(shapes(48, 2))
    drift, m0 = metrics_pair(summary(changed("palette drift", 48, 3)), base, d0)
    lo, hi = read_interval(drift, "fid_ref")
    rise = drift["fid_ref"] / m0["fid_ref"] - 1
    assert 0.3 < lo < rise < hi
    assert verdict(drift, m0).label in (DRIFT, "drifting to over-guidance")
    fresh, _ = metrics_pair(summary(shapes(48, 4)), base, d0)
    lo, hi = read_interval(fresh, "fid_ref")
    assert lo < 0 < hi


def test_the_bootstrap_is_deterministic_under_its_seed_and_moves_with_it():
    d0, base, cur = summary(shapes(16, 1)), summary(shapes(16, 2)), summary(shapes(16, 3))
    a = change_intervals(cur, base, d0, seed=7)
    assert a == change_intervals(cur, base, d0, seed=7)
    b = change_intervals(cur, base, d0, seed=8)
    assert a.keys() == b.keys() and a != b
    assert set(a) == {k for name in ("hf_share", "laplacian_var", "saturation", "colourfulness", "spectral_slope",
                                     "clipped_fraction", "fid_ref") for k in interval_keys(name)}
    assert all(a[lo] <= a[hi] for lo, hi in (interval_keys(n) for n in ("hf_share", "fid_ref")))


def test_the_fast_fid_of_the_bootstrap_is_the_fid():
    rng = np.random.default_rng(0)
    for n, d in ((16, 135), (40, 300), (200, 135)):
        a, b = rng.normal(size=(n, d)), rng.normal(0.1, 1.2, size=(n + 3, d))
        assert _fid_fast(a, b) == pytest.approx(fid_from_features(a, b), rel=1e-6)


def test_a_lone_sign_inside_the_noise_keeps_stable_and_says_so():
    """One noisy sign cannot change the label (one sign alone reads stable): the label stays, with a note."""
    base = {"hf_share": 0.2, "laplacian_var": 0.1}
    cur = {"hf_share": 0.15, "laplacian_var": 0.1, "hf_share_change_lo": -0.6, "hf_share_change_hi": 0.1}
    v = verdict(cur, base)
    assert v.label == STABLE
    assert v.reasons[-1] == "(within noise: hf_share -25% [-60%, +10%] passes the -25% threshold but its interval " \
                            "includes 0)"
    # without an interval (metrics recorded before intervals existed) the move counts on its size, as it did
    assert verdict({"hf_share": 0.15, "laplacian_var": 0.1}, base).reasons == [
        "only one sign, 2 needed: hf_share -25% vs iteration 0 (0.2 -> 0.15)"]


def test_an_fid_rise_inside_the_noise_is_inconclusive_not_a_drift():
    base = {"fid_ref": 1.0}
    noisy = {"fid_ref": 1.35, "fid_ref_change_lo": -0.05, "fid_ref_change_hi": 0.7}
    v = verdict(noisy, base)
    assert v.label == INCONCLUSIVE
    assert v.reasons[:2] == ["fid_ref +35% [-5%, +70%] passes the +30% threshold but its interval includes 0",
                             "would read: drifting from the data if this move is real, stable if not"]
    solid = dict(noisy, fid_ref_change_lo=0.1)
    assert verdict(solid, base).label == DRIFT
    assert verdict(solid, base).reasons[0].startswith("fid_ref +35% [+10%, +70%] vs iteration 0")
    mean_only = {"fid_ref": 1.35, "fid_ref_mean_change_lo": -0.05, "fid_ref_mean_change_hi": 0.7}
    assert verdict(mean_only, base).reasons[0].startswith(
        "fid_ref +35% [-5%, +70%] (interval of the feature-mean distance) passes")


def test_too_costly_fid_falls_back_to_the_feature_mean_distance(monkeypatch):
    import redifine_core.metrics.intervals as I

    monkeypatch.setattr(I, "FID_BOOTSTRAP_BUDGET", 10)
    d0, base, cur = summary(shapes(16, 1)), summary(shapes(16, 2)), summary(changed("palette drift", 16, 3))
    out = change_intervals(cur, base, d0)
    assert read_interval(out, "fid_ref") is None
    lo, hi = read_interval(out, "fid_ref_mean")
    assert 0 < lo < hi
