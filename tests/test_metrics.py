"""Collapse metrics on synthetic images whose answer is known before running the code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from redifine_core import metrics as M
from redifine_core.metrics.verdict import MIN_IMAGES
from redifine_core.progress import Cancelled, CancelToken


# --------------------------------------------------------------------------------------------------------------
# synthetic images
# --------------------------------------------------------------------------------------------------------------


def shapes(n: int, size: int = 48, seed: int = 0, noise: float = 0.03) -> np.ndarray:
    """Random coloured rectangles and discs on a coloured background, plus mild pixel noise: [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        img = np.empty((size, size, 3), np.float32)
        img[:] = rng.uniform(0.25, 0.75, 3)
        for _ in range(6):
            col = rng.uniform(0.1, 0.9, 3)
            cy, cx = rng.uniform(0, size, 2)
            rad = rng.uniform(size / 10, size / 4)
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < rad**2) if rng.random() < 0.5 else (
                (abs(yy - cy) < rad) & (abs(xx - cx) < rad * 0.7)
            )
            img[mask] = col
        img += rng.normal(0, noise, img.shape).astype(np.float32)
        out[i] = np.clip(img, 0, 1)
    return out


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur with reflect padding, written as a small depthwise conv."""
    r = int(math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    x = F.conv2d(x, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    return x.permute(0, 2, 3, 1).clamp(0, 1).numpy()


def saturate(images: np.ndarray, factor: float) -> np.ndarray:
    """Push every colour away from its grey value (per-pixel channel mean) by ``factor``."""
    grey = images.mean(axis=-1, keepdims=True)
    return np.clip(grey + factor * (images - grey), 0, 1).astype(np.float32)


def sharpen(images: np.ndarray, amount: float) -> np.ndarray:
    """Unsharp mask: add ``amount`` x (image - blurred image)."""
    return np.clip(images + amount * (images - gaussian_blur(images, 1.0)), 0, 1).astype(np.float32)


def power_law_noise(n: int, alpha: float, size: int = 64, seed: int = 0) -> np.ndarray:
    """Grey images whose power spectrum falls as 1/f^alpha (so the spectral slope is -alpha by construction)."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(size)
    r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    r[0, 0] = 1.0
    out = []
    for _ in range(n):
        z = np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) * r ** (-alpha / 2)).real
        z = 0.5 + 0.12 * (z - z.mean()) / z.std()
        out.append(np.repeat(np.clip(z, 0, 1)[..., None], 3, axis=-1))
    return np.stack(out).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# image statistics
# --------------------------------------------------------------------------------------------------------------


def test_blur_lowers_hf_share_laplacian_and_slope():
    x = shapes(6, seed=1)
    s0 = M.image_statistics(x)
    s1 = M.image_statistics(gaussian_blur(x, 1.0))
    s2 = M.image_statistics(gaussian_blur(x, 2.0))
    for key in ("hf_share", "laplacian_var", "spectral_slope"):
        assert s2[key] < s1[key] < s0[key], key


def test_hf_share_of_pure_frequencies():
    size = 64
    yy, xx = np.mgrid[0:size, 0:size]
    low = 0.5 + 0.4 * np.sin(2 * np.pi * xx / 32)  # 1/32 cycles/px, far below the cutoff
    checker = 0.5 + 0.4 * ((xx + yy) % 2 * 2 - 1)  # Nyquist in both axes, far above it
    lum_low, lum_hi = low.astype(np.float64), checker.astype(np.float64)
    assert M.hf_share_one(lum_low) < 0.01
    assert M.hf_share_one(lum_hi) > 0.99


@pytest.mark.parametrize("alpha", [2.0, 3.0])
def test_spectral_slope_recovers_power_law(alpha):
    stats = M.image_statistics(power_law_noise(4, alpha, seed=int(alpha)))
    assert stats["spectral_slope"] == pytest.approx(-alpha, abs=0.35)


def test_saturation_raises_saturation_colourfulness_and_clipping():
    x = shapes(6, seed=2)
    s0 = M.image_statistics(x)
    s1 = M.image_statistics(saturate(x, 2.5))
    assert s1["saturation"] > s0["saturation"] * 1.3
    assert s1["colourfulness"] > s0["colourfulness"] * 1.3
    assert s1["clipped_fraction"] > s0["clipped_fraction"] + 0.05


def test_grey_images_have_zero_saturation_and_colourfulness():
    rng = np.random.default_rng(3)
    grey = np.repeat(rng.uniform(0.1, 0.9, (3, 32, 32, 1)), 3, axis=-1).astype(np.float32)
    s = M.image_statistics(grey)
    assert s["saturation"] == pytest.approx(0.0, abs=1e-7)
    assert s["colourfulness"] == pytest.approx(0.0, abs=1e-4)
    assert s["laplacian_var"] > 0


def test_colourfulness_of_pure_red_by_hand():
    red = np.zeros((2, 16, 16, 3), np.float32)
    red[..., 0] = 1.0
    # rg = 255, yb = 127.5, no spread: C = 0.3 * sqrt(255^2 + 127.5^2)
    assert M.image_statistics(red)["colourfulness"] == pytest.approx(0.3 * math.hypot(255, 127.5), rel=1e-5)
    assert M.image_statistics(red)["saturation"] == pytest.approx(1.0)


def test_clipped_fraction_and_colour_moments():
    img = np.full((2, 16, 16, 3), 0.5, np.float32)
    img[:, :8] = 0.0  # top half black: half of all channel values clipped
    s = M.image_statistics(img)
    assert s["clipped_fraction"] == pytest.approx(0.5)
    const = np.empty((3, 16, 16, 3), np.float32)
    const[:] = (0.2, 0.4, 0.6)
    s = M.image_statistics(const)
    assert (s["mean_r"], s["mean_g"], s["mean_b"]) == pytest.approx((0.2, 0.4, 0.6), abs=1e-6)
    assert s["std_rgb"] == pytest.approx(0.0, abs=1e-6)
    assert s["clipped_fraction"] == 0.0
    # two flat images, one black one white: std of each channel is 0.5
    bw = np.stack([np.zeros((16, 16, 3)), np.ones((16, 16, 3))]).astype(np.float32)
    assert M.image_statistics(bw)["std_r"] == pytest.approx(0.5)


def test_diversity_of_copies_is_zero_and_of_distinct_images_positive():
    x = shapes(5, seed=4)
    copies = np.repeat(x[:1], 5, axis=0)
    assert M.image_statistics(copies)["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert M.image_statistics(x)["diversity"] > 0.05


def test_torch_numpy_and_uint8_inputs_agree():
    x = shapes(3, seed=5)
    a = M.image_statistics(x)
    b = M.image_statistics(torch.from_numpy(x))
    assert a == pytest.approx(b)
    q = np.round(x * 255).astype(np.uint8)
    c = M.image_statistics(q)
    d = M.image_statistics(q.astype(np.float32) / 255)
    assert c == pytest.approx(d)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 16, 16)), r"\[N, H, W, 3\]"),
        (np.zeros((2, 16, 16, 4)), r"\[N, H, W, 3\]"),
        (np.zeros((0, 16, 16, 3)), "empty"),
        (np.zeros((2, 4, 16, 3)), "too small"),
        (np.full((2, 16, 16, 3), 2.0), r"\[0, 1\]"),
        (np.full((2, 16, 16, 3), np.nan), "NaN"),
    ],
)
def test_bad_images_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        M.image_statistics(bad)


# --------------------------------------------------------------------------------------------------------------
# FID / KID
# --------------------------------------------------------------------------------------------------------------


def test_fid_kid_identical_near_zero_and_grow_with_shift():
    x = shapes(12, seed=6)
    f0 = M.handcrafted_features(x)
    f1 = M.handcrafted_features(np.clip(x + 0.1, 0, 1))
    f3 = M.handcrafted_features(np.clip(x + 0.3, 0, 1))
    assert M.fid_from_features(f0, f0) == pytest.approx(0.0, abs=1e-8)
    fid1, fid3 = M.fid_from_features(f0, f1), M.fid_from_features(f0, f3)
    assert 0 < fid1 < fid3
    kid0, kid3 = M.kid_from_features(f0, f0), M.kid_from_features(f0, f3)
    assert kid3 > 0
    # the unbiased estimator of a set against itself is (2/m)(mean off-diagonal - mean diagonal kernel): O(1/m), <= 0
    assert -0.2 * kid3 < kid0 <= 0


def test_fid_matches_scipy_sqrtm_reference():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(7)
    a = rng.normal(size=(60, 5))
    b = rng.normal(size=(50, 5)) @ rng.normal(size=(5, 5)) + 0.5
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(s_a @ s_b).real
    d = a.mean(0) - b.mean(0)
    expected = d @ d + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean)
    assert M.fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)


def test_kid_matches_unbiased_mmd_by_hand_and_subsets_agree():
    rng = np.random.default_rng(8)
    a = rng.normal(size=(6, 3))
    b = rng.normal(size=(5, 3)) + 1.0

    def k(x, y):
        return (x @ y / 3 + 1) ** 3

    xx = sum(k(a[i], a[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(a[i], b[j]) for i in range(6) for j in range(5)) / 30
    full = M.kid_from_features(a, b, subset_size=1000)  # subset size becomes 5 < 6: subsets are drawn
    assert M._mmd2_unbiased(a, b) == pytest.approx(xx + yy - 2 * xy)
    assert full == pytest.approx(xx + yy - 2 * xy, rel=0.5)  # subsets of 5 estimate the same quantity


def test_fid_kid_need_two_images():
    f = np.zeros((1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        M.fid_from_features(f, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        M.kid_from_features(np.zeros((3, 4)), f)
    x = shapes(2)
    with pytest.raises(ValueError, match="generated"):
        M.set_metrics(x[:1], x, features="handcrafted")


# --------------------------------------------------------------------------------------------------------------
# set_metrics, feature selection, CLIP
# --------------------------------------------------------------------------------------------------------------


def test_set_metrics_keys_and_feature_name(monkeypatch):
    monkeypatch.delenv(M.INCEPTION_ENV, raising=False)
    ref = shapes(6, seed=9)
    gen = gaussian_blur(ref, 1.5)
    events = []
    m = M.set_metrics(gen, ref, features="auto", progress=events.append)
    assert m["features"] == M.FEATURES_HANDCRAFTED
    assert "fid_prev" not in m and "clip_score" not in m
    assert m["fid_ref"] > 0 and m["hf_share"] == pytest.approx(M.image_statistics(gen)["hf_share"])
    assert events and events[-1].step == events[-1].total
    m2 = M.set_metrics(gen, ref, previous=ref, features="handcrafted")
    assert m2["fid_prev"] == pytest.approx(m2["fid_ref"])
    m3 = M.set_metrics(ref, ref, previous=gen, features="handcrafted")
    assert m3["fid_ref"] == pytest.approx(0.0, abs=1e-8) and m3["fid_prev"] > 0


def test_set_metrics_honours_cancel():
    x = shapes(4)
    tok = CancelToken()
    tok.set()
    with pytest.raises(Cancelled):
        M.set_metrics(x, x, features="handcrafted", cancel=tok)


def test_feature_choice_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="features"):
        M.get_feature_extractor("resnet")
    with pytest.raises(ValueError, match="does not exist"):
        M.get_feature_extractor(f"inception:{tmp_path / 'missing.safetensors'}")
    with pytest.raises(ValueError, match="safetensors"):
        M.get_feature_extractor(f"inception:{tmp_path / 'weights.pth'}")
    monkeypatch.setenv(M.INCEPTION_ENV, str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="does not exist"):
        M.get_feature_extractor("auto")


def test_inception_without_torchvision_is_a_clear_error(tmp_path):
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision is installed here")
    except ImportError:
        pass
    from safetensors.torch import save_file

    path = tmp_path / "pt_inception-2015-12-05.safetensors"
    save_file({"fc.weight": torch.zeros(1008, 2048)}, str(path))
    with pytest.raises(ImportError, match="torchvision"):
        M.get_feature_extractor(path)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from redifine_core.toy.word_tokenizer import write_word_tokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    write_word_tokenizer("a red blue circle square on white background".split(), folder)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_hidden_layers=1, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(folder))
    return folder


def test_clip_score_with_local_model(tiny_clip_dir):
    x = shapes(3, size=40, seed=10)
    caps = ["a red circle", "a blue square on white background", "a circle"]
    s = M.clip_score(x, caps, tiny_clip_dir)
    assert 0.0 <= s <= 100.0 and math.isfinite(s)
    m = M.set_metrics(x, x, features="handcrafted", captions=caps, clip_model=tiny_clip_dir)
    assert m["clip_score"] == pytest.approx(s, rel=1e-4)
    with pytest.raises(ValueError, match="aligned"):
        M.clip_score(x, caps[:2], tiny_clip_dir)
    with pytest.raises(ValueError, match="clip_model"):
        M.clip_score(x, caps, tiny_clip_dir / "missing")


# --------------------------------------------------------------------------------------------------------------
# verdicts
# --------------------------------------------------------------------------------------------------------------


def test_verdict_blur_over_guidance_and_stable():
    d = shapes(8, seed=11)
    it0 = M.image_statistics(d)
    blurred = M.verdict(M.image_statistics(gaussian_blur(d, 1.5)), it0)
    assert blurred.label == "drifting to blur"
    assert any("hf_share" in r for r in blurred.reasons) and any("laplacian_var" in r for r in blurred.reasons)
    burnt = M.verdict(M.image_statistics(sharpen(saturate(d, 2.0), 1.5)), it0)
    assert burnt.label == "drifting to over-guidance"
    assert any("saturation" in r for r in burnt.reasons)
    # a fresh draw from the same generator: same look, different images
    same = M.verdict(M.image_statistics(shapes(8, seed=12)), it0)
    assert same.label == "stable"
    assert M.verdict(it0, it0) == M.Verdict("stable", ["all metrics within thresholds of iteration 0"])


BASE = {"hf_share": 0.2, "laplacian_var": 0.05, "spectral_slope": -2.0, "saturation": 0.3, "colourfulness": 40.0,
        "clipped_fraction": 0.0, "fid_ref": 0.6}


def test_verdict_needs_two_signs_and_names_relative_change():
    base = BASE
    one = dict(base, hf_share=0.1)  # -50 % alone
    v = M.verdict(one, base)
    assert v.label == "stable" and "-50%" in v.reasons[0] and "only one sign" in v.reasons[0]
    # hf_share and laplacian_var measure the same thing: a moderate move of both is still one sign
    assert M.verdict(dict(base, hf_share=0.1, laplacian_var=0.03), base).label == "stable"
    assert M.verdict(dict(base, hf_share=0.3, laplacian_var=0.08), base).label == "stable"
    two = dict(base, hf_share=0.1, spectral_slope=-2.5)
    v = M.verdict(two, base)
    assert v.label == "drifting to blur" and any("steeper" in r for r in v.reasons)
    over = dict(base, saturation=0.4, clipped_fraction=0.05)
    v = M.verdict(over, base)
    assert v.label == "drifting to over-guidance"
    assert any("+33%" in r for r in v.reasons) and any("+5.0 points" in r for r in v.reasons)
    sharp_flat = dict(base, laplacian_var=0.1, spectral_slope=-1.5)
    assert M.verdict(sharp_flat, base).label == "drifting to over-guidance"
    # one mode with more signs than the other wins; the other's sign is listed as "also"
    mostly_over = dict(base, hf_share=0.1, saturation=0.4, clipped_fraction=0.1)
    v = M.verdict(mostly_over, base)
    assert v.label == "drifting to over-guidance" and any(r.startswith("(also: hf_share") for r in v.reasons)
    # missing metrics are skipped rather than failing
    assert M.verdict({"hf_share": 0.1}, {"saturation": 0.3}).label == "stable"


def test_a_strong_move_of_one_family_counts_as_two_signs():
    # the issue's example: baseline-high's Laplacian variance +105 % and HF share +31 %, stripes visible
    stripes = dict(BASE, laplacian_var=BASE["laplacian_var"] * 2.05, hf_share=BASE["hf_share"] * 1.31)
    v = M.verdict(stripes, BASE)
    assert v.label == "drifting to over-guidance"
    assert any("laplacian_var +105%" in r for r in v.reasons) and any("hf_share +31%" in r for r in v.reasons)
    # both members must have moved: Laplacian variance alone, however far, stays one sign
    alone = dict(BASE, laplacian_var=BASE["laplacian_var"] * 2.05, hf_share=BASE["hf_share"] * 1.1)
    assert M.verdict(alone, BASE).label == "stable"
    # and the strong one must be STRONG thresholds away: +60 % and +31 % stay one sign
    moderate = dict(BASE, laplacian_var=BASE["laplacian_var"] * 1.6, hf_share=BASE["hf_share"] * 1.31)
    assert M.verdict(moderate, BASE).label == "stable"
    # blur: both sharpness measures collapsing is enough on its own
    assert M.verdict(dict(BASE, hf_share=0.02, laplacian_var=0.01), BASE).label == "drifting to blur"
    # saturation and colourfulness are one family too: a moderate rise of both is one sign, a strong one two
    assert M.verdict(dict(BASE, saturation=0.36, colourfulness=50.0), BASE).label == "stable"
    assert M.verdict(dict(BASE, saturation=0.5, colourfulness=50.0), BASE).label == "drifting to over-guidance"


def test_drift_from_the_data_without_a_mode():
    worse = dict(BASE, fid_ref=BASE["fid_ref"] * 1.8)  # the full demo: FID vs D0 0.6 -> 1.1
    v = M.verdict(worse, BASE)
    assert v.label == "drifting from the data"
    assert v.reasons[0].startswith("fid_ref +80% vs iteration 0 (0.6 -> 1.08)")
    # one sign of a mode is listed, not promoted
    v = M.verdict(dict(worse, hf_share=0.1), BASE)
    assert v.label == "drifting from the data" and any(r.startswith("(also: hf_share -50%") for r in v.reasons)
    # below FID_RISE it is stable; a clear mode keeps its label and lists the FID rise
    assert M.verdict(dict(BASE, fid_ref=BASE["fid_ref"] * 1.2), BASE).label == "stable"
    v = M.verdict(dict(worse, hf_share=0.1, spectral_slope=-2.5), BASE)
    assert v.label == "drifting to blur" and any(r.startswith("(also: fid_ref +80%") for r in v.reasons)
    assert M.verdict({"fid_ref": 3.0}, {"fid_ref": 1.0}).label == "drifting from the data"


def test_inconclusive_when_signs_disagree_or_sets_are_small():
    mixed = dict(BASE, hf_share=0.1, spectral_slope=-2.5, saturation=0.4, clipped_fraction=0.1)
    v = M.verdict(mixed, BASE)
    assert v.label == "inconclusive" and v.reasons[0] == "signs disagree: 2 of blur and 2 of over-guidance"
    assert any(r.startswith("blur: hf_share") for r in v.reasons)
    assert any(r.startswith("over-guidance: saturation") for r in v.reasons)
    blur = dict(BASE, hf_share=0.1, spectral_slope=-2.5)
    v = M.verdict(blur, BASE, n_images=8)
    assert v.label == "inconclusive"
    assert v.reasons[0].startswith(f"only 8 images per set: below {MIN_IMAGES}")
    assert v.reasons[1] == "would read: drifting to blur" and any("steeper" in r for r in v.reasons)
    # the count may come with the metrics themselves; at MIN_IMAGES the label stands
    assert M.verdict(dict(blur, n_images=4.0), BASE).label == "inconclusive"
    assert M.verdict(blur, BASE, n_images=MIN_IMAGES).label == "drifting to blur"


def test_the_3_seed_study_reads_as_it_was_measured():
    """docs/toy-lab.md's 3-seed means (iteration 4 against iteration 0): over-guidance, never blur, for high CFG;
    drift with no mode for low CFG and redifine (neither showed blur or over-guidance there)."""
    it0 = {
        "baseline-low": dict(hf_share=0.0390, laplacian_var=0.00216, saturation=0.542, clipped_fraction=0.00003,
                             colourfulness=92.6, fid_ref=0.57),
        "baseline-high": dict(hf_share=0.0272, laplacian_var=0.00207, saturation=0.558, clipped_fraction=0.00015,
                              colourfulness=97.9, fid_ref=0.66),
        "redifine": dict(hf_share=0.0244, laplacian_var=0.00183, saturation=0.561, clipped_fraction=0.00004,
                         colourfulness=95.7, fid_ref=0.62),
    }
    it4 = {
        "baseline-low": dict(hf_share=0.0363, laplacian_var=0.00233, saturation=0.581, clipped_fraction=0.00012,
                             colourfulness=91.0, fid_ref=1.03),
        "baseline-high": dict(hf_share=0.0357, laplacian_var=0.00426, saturation=0.584, clipped_fraction=0.0033,
                              colourfulness=103.2, fid_ref=1.48),
        "redifine": dict(hf_share=0.0206, laplacian_var=0.00176, saturation=0.610, clipped_fraction=0.00055,
                         colourfulness=96.6, fid_ref=1.13),
    }
    labels = {m: M.verdict(it4[m], it0[m], n_images=48).label for m in it0}
    assert labels == {"baseline-low": "drifting from the data", "baseline-high": "drifting to over-guidance",
                      "redifine": "drifting from the data"}


def test_verdict_dict_round_trip_and_validation():
    v = M.Verdict("drifting to blur", ["hf_share -40%"])
    assert M.Verdict.from_dict(v.to_dict()) == v
    assert v.to_dict() == {"label": "drifting to blur", "reasons": ["hf_share -40%"]}
    with pytest.raises(ValueError, match="label"):
        M.Verdict("collapsed", [])
    with pytest.raises(ValueError, match="verdict"):
        M.Verdict.from_dict({"reasons": []})
