"""The analytic attribute checker: right on the generator's images, wrong captions score low, robust to blur/saturation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from redifine_core.toy.checker import check, classify
from redifine_core.toy.dataset import caption_for, generate


@pytest.fixture(scope="module")
def toy():
    return generate(200, seed=11)


def test_generator_images_score_near_perfect(toy):
    images, captions, _ = toy
    r = check(images, captions)
    assert r["n"] == 200
    assert r["full"] >= 0.99 and r["shape"] >= 0.99 and r["color"] >= 0.99 and r["background"] >= 0.99


def test_swapped_colours_score_low(toy):
    images, _, attrs = toy
    swapped = [caption_for(a.shape, a.background, a.color) for a in attrs]
    r = check(images, swapped)
    assert r["color"] <= 0.05 and r["background"] <= 0.05 and r["full"] <= 0.05
    assert r["shape"] >= 0.99  # the shape word is still right


def test_wrong_shape_scores_low(toy):
    images, _, attrs = toy
    other = {"circle": "square", "square": "triangle", "triangle": "circle"}
    r = check(images, [caption_for(other[a.shape], a.color, a.background) for a in attrs])
    assert r["shape"] <= 0.05 and r["color"] >= 0.99


def test_blurred_and_saturated_images_still_read_sanely(toy):
    images, captions, _ = toy
    f = images[:100].astype(np.float32) / 255
    blurred = ndimage.gaussian_filter(f, (0, 1.0, 1.0, 0))
    saturated = np.clip((f - 0.5) * 2.5 + 0.5, 0, 1)
    for imgs in (blurred, saturated):
        r = check(imgs, captions[:100])
        assert 0.9 <= r["full"] <= 1.0
    heavy = ndimage.gaussian_filter(f, (0, 6.0, 6.0, 0))  # the shape is gone: low but valid scores
    r = check(heavy, captions[:100])
    assert 0.0 <= r["full"] < 0.5 and set(r) == {"shape", "color", "background", "full", "n"}


def test_plain_background_reads_as_no_shape():
    flat = np.full((32, 32, 3), 0.5, dtype=np.float32)
    assert classify(flat) == {"shape": "none", "color": "none", "background": "gray"}
    assert check(flat[None], ["a red circle on a gray background"])["full"] == 0.0


def test_accepts_pil_tensor_and_uint8(toy):
    images, captions, _ = toy
    ref = check(images[:10], captions[:10])
    assert check([Image.fromarray(im) for im in images[:10]], captions[:10]) == ref
    assert check(torch.from_numpy(images[:10]).float() / 255, captions[:10]) == ref


def test_nan_pixels_do_not_crash():
    img = np.full((32, 32, 3), np.nan, dtype=np.float32)
    assert check(img[None], ["a red circle on a blue background"])["full"] == 0.0


def test_validation(toy):
    images, captions, _ = toy
    with pytest.raises(ValueError, match="captions has 3 entries"):
        check(images[:2], captions[:3])
    with pytest.raises(ValueError, match="not a toy caption"):
        check(images[:1], ["a photo of a cat"])
    with pytest.raises(ValueError, match="image shape"):
        classify(np.zeros((32, 32)))
