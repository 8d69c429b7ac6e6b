"""The texture and patterned-shape sets: deterministic from their seed, captions that say what the pixels show, a
checker that reads them back (and fails shuffled or blurred captions), and the registry of toy datasets."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from redifine_core.toy import textures as tx
from redifine_core.toy.model_config import ARCHITECTURES
from redifine_core.toy.registry import TOY_DATASETS, TRAINING_SETS, training_images
from redifine_core.toy.texture_checker import check_patterned_shapes, check_textures, classify_texture


@pytest.mark.parametrize("gen", [tx.generate_textures, tx.generate_patterned_shapes])
def test_same_seed_same_images_other_seed_other_images(gen):
    a, ca, _ = gen(12, seed=3)
    b, cb, _ = gen(12, seed=3)
    c, _, _ = gen(12, seed=4)
    assert np.array_equal(a, b) and ca == cb and not np.array_equal(a, c)
    assert a.shape == (12, tx.TEXTURE_SIZE, tx.TEXTURE_SIZE, 3) and a.dtype == np.uint8


def test_texture_captions_parse_back_and_use_only_the_vocabulary():
    _, captions, attrs = tx.generate_textures(200, seed=0)
    for cap, at in zip(captions, attrs):
        p = tx.parse_texture_caption(cap)
        assert (p["scale"], p["pattern"], p["orientation"], p["color"], p["background"]) == (
            at.scale, at.pattern, at.orientation, at.color, at.background)
        assert set(cap.split()) <= set(tx.TEXTURE_VOCABULARY)
    assert {a.pattern for a in attrs} == set(tx.PATTERNS) and {a.scale for a in attrs} == set(tx.SCALES)
    assert {a.orientation for a in attrs if a.pattern == "stripes"} == set(tx.ORIENTATIONS)
    assert len(set(tx.balanced_texture_captions(300))) == len(tx.texture_combinations()) == 300


def test_patterned_captions_parse_back_and_pixels_follow_them():
    images, captions, attrs = tx.generate_patterned_shapes(120, seed=0)
    for im, cap, at in zip(images, captions, attrs):
        assert tx.parse_patterned_caption(cap) == {"fill": at.fill, "shape": at.shape, "color": at.color,
                                                   "background": at.background}
        assert set(cap.split()) <= set(tx.PATTERNED_SHAPES_VOCABULARY)
        assert tuple(im[0, 0]) == tx.PALETTE[at.background]
        centre = im[at.y - 2 : at.y + 2, at.x - 2 : at.x + 2].reshape(-1, 3)
        n_colours = len({tuple(p) for p in centre})
        assert (n_colours == 1) == (at.fill == "plain")  # a fine pattern shows two colours in any 4x4 block
    assert {a.fill for a in attrs} == set(tx.FILLS)
    assert len(set(tx.balanced_patterned_captions(360))) == 360


def test_fine_textures_carry_more_high_frequency_power_than_coarse():
    from redifine_core.metrics import image_statistics

    fine = [tx.render_texture(tx.TextureAttributes("fine", "stripes", "diagonal", "red", "blue"))]
    coarse = [tx.render_texture(tx.TextureAttributes("coarse", "stripes", "diagonal", "red", "blue"))]
    f, c = image_statistics(np.stack(fine)), image_statistics(np.stack(coarse))
    assert f["hf_share"] > 10 * c["hf_share"] and f["laplacian_var"] > 3 * c["laplacian_var"]  # 1.0 vs 0.04; 0.021 vs 0.006


@pytest.mark.parametrize("bad, field", [
    (lambda: tx.generate_textures(0), "n=0"), (lambda: tx.generate_textures(2, size=30), "size=30"),
    (lambda: tx.generate_patterned_shapes(10**6, size=1024), "GiB"), (lambda: tx.generate_textures(2, seed=-1), "seed"),
    (lambda: tx.parse_texture_caption("a fine red stripes on a blue background"), "not a texture caption"),
    (lambda: tx.parse_texture_caption("a fine diagonal red dots on a blue background"), "not a texture caption"),
    (lambda: tx.parse_patterned_caption("a red circle on a blue background"), "not a patterned-shape caption"),
    (lambda: tx.TextureAttributes("fine", "stripes", "", "red", "blue"), "orientation"),
    (lambda: tx.PatternedShapeAttributes("plain", "circle", "red", "red", 9, 30, 30), "differ"),
])
def test_bad_requests_are_refused_with_one_clear_line(bad, field):
    with pytest.raises(ValueError, match=field):
        bad()


@pytest.mark.parametrize("name, check", [("textures", check_textures), ("patterned_shapes", check_patterned_shapes)])
def test_checker_reads_ground_truth_and_rejects_shuffled_and_blurred_captions(name, check):
    images, captions = TOY_DATASETS[name].images(120, seed=11)
    assert check(images, captions)["full"] == 1.0
    shuffled = [captions[i] for i in np.random.default_rng(0).permutation(len(captions))]
    assert check(images, shuffled)["full"] < 0.1
    blurred = np.stack([ndimage.gaussian_filter(im.astype(np.float32), (1.2, 1.2, 0)) for im in images])
    assert check(blurred.clip(0, 255).astype(np.uint8), captions)["full"] < 0.75  # fine detail is read from pixels


def test_texture_checker_reads_a_flat_image_as_no_pattern():
    flat = np.full((64, 64, 3), 120, np.uint8)
    assert classify_texture(flat)["pattern"] == "none"
    with pytest.raises(ValueError, match="must match"):
        check_textures(flat[None], ["a fine red dots on a blue background"] * 2)


def test_registry_names_every_dataset_and_the_training_sets_cover_their_vocabulary():
    assert set(TOY_DATASETS) >= {"shapes", "textures", "patterned_shapes"}
    for name, ds in TOY_DATASETS.items():
        images, captions = ds.images(6, seed=1)
        assert images.shape == (6, ds.size, ds.size, 3) and len(captions) == 6
        assert set(" ".join(ds.balanced_captions(50, 0)).split()) <= set(ds.vocabulary)
        assert 0.0 <= ds.check(images, captions)["full"] <= 1.0
    for arch, names in TRAINING_SETS.items():
        words = set(ARCHITECTURES[arch].vocabulary)
        assert all(set(TOY_DATASETS[n].vocabulary) <= words for n in names)
        assert all(TOY_DATASETS[n].size == ARCHITECTURES[arch].image_size for n in names)


def test_training_images_interleave_the_datasets_deterministically():
    images, captions = training_images("bed", 6, seed=5, size=tx.TEXTURE_SIZE)
    tex, tcap = TOY_DATASETS["textures"].images(3, seed=5)
    pat, pcap = TOY_DATASETS["patterned_shapes"].images(3, seed=6)
    assert np.array_equal(images[0::2], tex) and np.array_equal(images[1::2], pat)
    assert captions[0::2] == tcap and captions[1::2] == pcap


def test_word_tokenizer_keeps_every_word_one_token_when_merges_collide(tmp_path):
    """"plain" brings the merge "p l", which outranks the "p u" that "purple" starts with; the tokenizer must still
    turn each word into one token."""
    from transformers import CLIPTokenizer

    from redifine_core.toy.word_tokenizer import write_word_tokenizer

    words = ["plain", "purple", "dotted", "dots", "stripes", "striped", "checks", "checked"]
    tok = CLIPTokenizer.from_pretrained(str(write_word_tokenizer(words, tmp_path, max_length=16)))
    for w in words:
        assert len(tok(w).input_ids) == 3, w  # start, the word, end
    assert len(tok("plain purple dots").input_ids) == 5
