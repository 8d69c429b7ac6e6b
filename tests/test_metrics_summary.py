"""SetSummary: metrics gathered batch by batch equal the whole-array metrics exactly, and hold no images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from redifine_core import metrics as M
from redifine_core.metrics import features as F
from redifine_core.progress import Cancelled, CancelToken
from test_metrics import gaussian_blur, saturate, shapes, tiny_clip_dir  # noqa: F401 (tiny_clip_dir is a fixture)


class MeanColour(M.FeatureExtractor):
    """A deterministic per-image external extractor (stands in for Inception): channel means and stds, 6 dims."""

    name = "mean-colour"

    def __init__(self):
        self.calls = []

    def __call__(self, images, cancel=None):
        arr = M.as_image_array(images).astype(np.float64)
        self.calls.append(arr.shape[0])
        return np.concatenate([arr.mean(axis=(1, 2)), arr.std(axis=(1, 2))], axis=1)


def summarise(images, sizes, **kw):
    s = M.SetSummary(**kw)
    start = 0
    for b in sizes:
        s.add(images[start : start + b])
        start += b
    assert start == len(images)
    return s


def test_statistics_identical_for_any_batching():
    x = shapes(9, seed=21)
    whole = M.image_statistics(x)
    for sizes in ([9], [1] * 9, [4, 5], [2, 3, 4]):
        s = summarise(x, sizes, features="handcrafted")
        assert len(s) == 9
        assert s.statistics() == whole  # exact, in the same key order
        assert list(s.statistics()) == list(whole)
        assert M.image_statistics(s) == whole


def test_set_metrics_identical_with_summaries_arrays_or_a_mix(monkeypatch):
    monkeypatch.delenv(M.INCEPTION_ENV, raising=False)
    ref = shapes(8, seed=22)
    gen = gaussian_blur(ref, 1.2)
    prev = saturate(shapes(6, seed=23, size=40), 1.5)  # another size: summaries do not care
    events_a, events_b = [], []
    from_arrays = M.set_metrics(gen, ref, prev, features="auto", progress=events_a.append)
    sg, sr, sp = summarise(gen, [3, 5]), summarise(ref, [8]), summarise(prev, [1, 2, 3])
    from_summaries = M.set_metrics(sg, sr, sp, features="auto", progress=events_b.append)
    assert from_summaries == from_arrays
    assert [(e.step, e.total) for e in events_b] == [(e.step, e.total) for e in events_a]
    assert M.set_metrics(sg, ref, prev, features="handcrafted") == from_arrays
    assert M.set_metrics(gen, sr, sp, features="handcrafted") == from_arrays
    assert from_arrays["fid_ref"] > 0 and from_arrays["fid_prev"] > 0


def test_external_extractor_rows_are_fed_per_batch_and_match():
    ref = shapes(7, seed=24)
    gen = saturate(ref, 2.0)
    ext = MeanColour()
    whole = M.set_metrics(gen, ref, features=ext)
    assert whole["features"] == "mean-colour"
    sg = summarise(gen, [2, 2, 3], features=ext)
    sr = summarise(ref, [7], features=ext)
    assert ext.calls[-4:] == [2, 2, 3, 7]  # the extractor ran on each batch as it came, once
    assert sg.feature_rows.shape == (7, 6) and sg.handcrafted.shape == (7, 135)
    calls = len(ext.calls)
    assert M.set_metrics(sg, sr, features=ext) == whole
    assert len(ext.calls) == calls  # nothing recomputed from summaries
    # an array next to summaries reuses the summaries' extractor for that array only
    assert M.set_metrics(sg, ref, features=ext) == whole and ext.calls[calls:] == [7]


def test_summary_and_set_metrics_must_agree_on_the_feature_set(monkeypatch):
    monkeypatch.delenv(M.INCEPTION_ENV, raising=False)
    x = shapes(4, seed=25)
    hand = M.SetSummary.from_images(x, features="handcrafted")
    other = M.SetSummary.from_images(x, features=MeanColour())
    with pytest.raises(ValueError, match=r"reference: this SetSummary holds 'mean-colour' features"):
        M.set_metrics(hand, other, features="handcrafted")
    with pytest.raises(ValueError, match=r"generated: this SetSummary holds 'handcrafted-v1'"):
        M.set_metrics(hand, other, features=other.extractor)


def test_too_few_or_no_images():
    x = shapes(3, seed=26)
    one = M.SetSummary.from_images(x[:1], features="handcrafted")
    with pytest.raises(ValueError, match="previous: FID/KID need at least 2 images per set, got 1"):
        M.set_metrics(x, x, one, features="handcrafted")
    empty = M.SetSummary(features="handcrafted")
    assert len(empty) == 0
    with pytest.raises(ValueError, match="empty set"):
        empty.statistics()
    with pytest.raises(ValueError, match="generated: FID/KID need at least 2 images per set, got 0"):
        M.set_metrics(empty, x, features="handcrafted")


def test_bad_batch_and_cancel_leave_the_summary_unchanged():
    x = shapes(5, seed=27)
    s = M.SetSummary.from_images(x[:3], features="handcrafted")
    before = s.statistics()
    with pytest.raises(ValueError, match=r"batch 2: values must lie in \[0, 1\]"):
        s.add(np.full((2, 16, 16, 3), 3.0, np.float32), name="batch 2")
    tok = CancelToken()
    tok.set()
    with pytest.raises(Cancelled):
        s.add(x[3:], cancel=tok)
    assert len(s) == 3 and s.statistics() == before
    s.add(x[3:])
    assert s.statistics() == M.image_statistics(x)


def test_memory_holds_feature_rows_not_images():
    x = shapes(24, size=64, seed=28)
    s = summarise(x, [8, 8, 8], features="handcrafted")

    def held(obj, seen=None):
        seen = set() if seen is None else seen
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            return obj.nbytes
        if isinstance(obj, dict):
            return sum(held(v, seen) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(held(v, seen) for v in obj)
        return 0

    per_image = held(vars(s)) / len(s)
    assert per_image <= (135 + 16) * 8  # one handcrafted row and a few floats; one 64 px image is 49 KB as float32
    assert per_image < x[0].nbytes / 20


def test_from_pngs_matches_the_uint8_array(tmp_path):
    x = shapes(7, seed=29)
    u8 = np.round(x * 255).astype(np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i, a in enumerate(u8):
        p = folder / f"{i:04d}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    whole = M.image_statistics(u8)
    for batch_size in (1, 3, 16):
        assert M.SetSummary.from_pngs(paths, batch_size=batch_size, features="handcrafted").statistics() == whole
    assert M.SetSummary.from_pngs(folder, features="handcrafted").statistics() == whole
    # a set of two sizes is read in runs of one size
    small = np.round(shapes(2, size=32, seed=30) * 255).astype(np.uint8)
    for i, a in enumerate(small):
        Image.fromarray(a).save(folder / f"9{i}.png")
    mixed = M.SetSummary.from_pngs(folder, batch_size=4, features="handcrafted")
    expected = M.SetSummary(features="handcrafted")
    expected.add(u8)
    expected.add(small)
    assert len(mixed) == 9 and mixed.statistics() == expected.statistics()


def test_from_pngs_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        M.SetSummary.from_pngs(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no .png files"):
        M.SetSummary.from_pngs(tmp_path)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        M.SetSummary.from_pngs([tmp_path / "gone.png"], features="handcrafted")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        M.SetSummary.from_pngs([bad], features="handcrafted")
    with pytest.raises(ValueError, match="batch_size"):
        M.SetSummary.from_pngs([bad], batch_size=0)


def test_pairwise_distance_blocks_agree_with_one_matrix(monkeypatch):
    rng = np.random.default_rng(31)
    feats = rng.normal(size=(11, 5))
    brute = np.mean([np.linalg.norm(feats[i] - feats[j]) for i in range(11) for j in range(i + 1, 11)])
    one = M.mean_pairwise_distance(feats)
    for block in (1, 3, 4, 10):
        monkeypatch.setattr(F, "PAIRWISE_BLOCK", block)
        assert M.mean_pairwise_distance(feats) == pytest.approx(one, rel=1e-12)
    assert one == pytest.approx(brute, rel=1e-12)


def test_clip_scores_through_a_summary(tiny_clip_dir):  # noqa: F811
    x = shapes(4, size=40, seed=32)
    caps = ["a red circle", "a blue square on white background", "a circle", "a square"]
    direct = M.set_metrics(x, x, features="handcrafted", captions=caps, clip_model=tiny_clip_dir)
    scorer = M.ClipScorer(tiny_clip_dir)
    s = M.SetSummary(features="handcrafted", clip_model=scorer)
    s.add(x[:2], captions=caps[:2])
    s.add(x[2:], captions=caps[2:])
    assert s.clip_scores.shape == (4,)
    via = M.set_metrics(s, x, features="handcrafted", clip_model=tiny_clip_dir)
    assert via["clip_score"] == pytest.approx(direct["clip_score"], rel=1e-5)
    with pytest.raises(ValueError, match="add\\(\\) needs the batch's captions"):
        s.add(x[:2])
    with pytest.raises(ValueError, match="generated: a CLIP score needs a SetSummary built with clip_model"):
        M.set_metrics(M.SetSummary.from_images(x, features="handcrafted"), x, features="handcrafted",
                      clip_model=tiny_clip_dir)
