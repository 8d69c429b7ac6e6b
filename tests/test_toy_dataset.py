"""The toy data generator: deterministic from its seed, captions that say what the pixels show."""

from __future__ import annotations

import numpy as np
import pytest

from redifine_core.toy.dataset import (
    COLORS, PALETTE, SHAPES, VOCABULARY, ToyAttributes, balanced_captions, caption_for, generate, make_toy_dataset,
    parse_caption, render,
)


def test_same_seed_same_images_other_seed_other_images():
    a, ca, _ = generate(20, seed=3)
    b, cb, _ = generate(20, seed=3)
    c, cc, _ = generate(20, seed=4)
    assert np.array_equal(a, b) and ca == cb
    assert not np.array_equal(a, c)
    assert a.shape == (20, 32, 32, 3) and a.dtype == np.uint8


def test_captions_match_attributes_and_pixels():
    images, captions, attrs = generate(60, seed=0, grain=0.0)
    for im, cap, at in zip(images, captions, attrs):
        assert parse_caption(cap) == {"shape": at.shape, "color": at.color, "background": at.background}
        assert at.color != at.background
        assert tuple(im[0, 0]) == PALETTE[at.background]  # corner is background
        assert tuple(im[at.y, at.x]) == PALETTE[at.color]  # centre of the shape is its colour
        assert set(cap.split()) <= set(VOCABULARY)


def test_all_attribute_values_occur():
    _, _, attrs = generate(300, seed=1)
    assert {a.shape for a in attrs} == set(SHAPES)
    assert {a.color for a in attrs} == set(COLORS)
    assert {a.background for a in attrs} == set(COLORS)


def test_grain_adds_high_frequency_detail_without_changing_colours():
    at = ToyAttributes("circle", "red", "blue", 8, 16, 16)
    clean = render(at, grain=0.0).astype(float)
    grainy = render(at, grain=0.03, rng=np.random.default_rng(0)).astype(float)
    diff = grainy - clean
    assert 0 < np.abs(diff).max() <= 0.03 * 255 + 1
    assert abs(diff.mean()) < 2  # zero-mean grain


def test_square_fills_its_box_and_triangle_about_half():
    sq = render(ToyAttributes("square", "red", "blue", 8, 16, 16), grain=0.0)
    tri = render(ToyAttributes("triangle", "red", "blue", 8, 16, 16), grain=0.0)
    red = np.array(PALETTE["red"])
    assert (sq == red).all(-1).sum() == 16 * 16
    assert 0.4 < (tri == red).all(-1).sum() / (16 * 16) < 0.65


def test_balanced_captions_cover_every_combination():
    caps = balanced_captions(len(SHAPES) * len(COLORS) * (len(COLORS) - 1), seed=0)
    assert len(set(caps)) == len(caps)
    assert caps[:5] == balanced_captions(5, seed=0)


@pytest.mark.parametrize("bad", ["a red circle", "a pink circle on a blue background", "a red blob on a blue background"])
def test_parse_caption_rejects_other_text(bad):
    with pytest.raises(ValueError, match="not a toy caption"):
        parse_caption(bad)


def test_caption_roundtrip():
    assert parse_caption(caption_for("triangle", "gray", "yellow")) == {
        "shape": "triangle", "color": "gray", "background": "yellow"}


@pytest.mark.parametrize("kwargs, field", [
    (dict(shape="star", color="red", background="blue"), "shape"),
    (dict(shape="circle", color="pink", background="blue"), "color"),
    (dict(shape="circle", color="red", background="red"), "color"),
])
def test_attributes_validated(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ToyAttributes(size=5, x=10, y=10, **kwargs)


@pytest.mark.parametrize("kwargs, field", [(dict(n=0), "n"), (dict(n=2, size=8), "size"), (dict(n=2, grain=1.0), "grain")])
def test_generate_validates(kwargs, field):
    with pytest.raises(ValueError, match=field):
        generate(**kwargs)


def test_make_toy_dataset_is_captioned_images():
    ds = make_toy_dataset(6, seed=2)
    images, captions, _ = generate(6, seed=2)
    assert len(ds) == 6 and list(ds.captions) == captions
    assert np.array_equal(ds.to_tensor().mul(255).round().byte().numpy(), images)
