"""Aspect-ratio bucketing on the tiny SD/SDXL pipelines: sd-scripts' buckets, one bucket per micro-batch, latents
of each image's own shape, SDXL time_ids per bucket, the bucket metadata, and a step the model cannot take refused."""

from __future__ import annotations

import json

import pytest
import torch

from redifine_core.data import CaptionedImages
from redifine_core.models import Pipeline
from redifine_core.training import LoraTrainer, TrainConfig, finetune_lora
from redifine_core.training.buckets import assign_buckets, bucket_sizes

# (height, width): two wide, two tall, one square
SHAPES = [(32, 64), (30, 62), (64, 32), (60, 30), (40, 40)]
BUCKETED = dict(steps=2, batch_size=2, rank=2, learning_rate=1e-3, resolution=32, enable_bucket=True, bucket_step=8)


def _mixed(shapes=SHAPES):
    g = torch.Generator().manual_seed(3)
    return CaptionedImages.from_images([torch.rand(h, w, 3, generator=g) for h, w in shapes],
                                       [f"image {i}" for i in range(len(shapes))])


def test_buckets_are_sd_scripts_and_nearest_in_aspect():
    sizes = bucket_sizes(512, 64)
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512 and 256 <= min(h, w) for h, w in sizes)
    assert all((w, h) in sizes for h, w in sizes)
    images = [(512, 768), (1000, 500), (300, 300), (480, 640)]
    for (h, w), (bh, bw) in zip(images, assign_buckets(images, 512, 64)):
        assert abs(bw / bh - w / h) == min(abs(sw / sh - w / h) for sh, sw in sizes)
    assert assign_buckets([(300, 300)], 512, 64) == [(512, 512)]


def test_each_image_trains_at_its_bucket_one_bucket_per_batch(tiny_sd):
    pipe = Pipeline.from_diffusers(tiny_sd)
    data = _mixed()
    expected = assign_buckets(SHAPES, 32, 8)
    assert len(set(expected)) == 3  # wide, tall and square
    shapes_seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: shapes_seen.append(tuple(a[0].shape[-2:])))
    try:
        with torch.enable_grad(), LoraTrainer(pipe, data, TrainConfig(**BUCKETED, random_flip=True)) as tr:
            assert tr.targets == expected
            for i, (h, w) in enumerate(expected):  # the cached latents have the bucket's shape (2x VAE)
                assert tuple(tr.latents.moment_list[i][0].shape) == (4, h // 2, w // 2)
                assert tuple(tr.latents.moment_list[i][2].shape) == (4, h // 2, w // 2)  # the mirrored image
            losses = [tr.step() for _ in range(6)]
            batches = tr.sample_indices  # one micro-batch per step (grad_accum 1)
            md = tr.lora_weights().metadata
    finally:
        hook.remove()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(len({expected[i] for i in b}) == 1 for b in batches)  # one bucket per micro-batch
    assert {i for b in batches[:3] for i in b} == set(range(5))  # an epoch (3 batches of 2) covers every image
    assert shapes_seen == [(expected[b[0]][0] // 2, expected[b[0]][1] // 2) for b in batches]
    assert md["ss_enable_bucket"] == "True" and md["ss_bucket_reso_steps"] == "8"
    counts = {tuple(v["resolution"]): v["count"] for v in json.loads(md["ss_bucket_info"])["buckets"].values()}
    assert counts == {(w, h): expected.count((h, w)) for h, w in set(expected)}
    # the same images without buckets all train as 32 x 32 squares
    square = finetune_lora(pipe, data, TrainConfig(**{**BUCKETED, "enable_bucket": False}))
    assert square.lora.metadata["ss_enable_bucket"] == "False"


def test_random_crop_in_buckets_and_sdxl_time_ids(tiny_sdxl):
    pipe = Pipeline.from_diffusers(tiny_sdxl)
    data = _mixed()
    expected = assign_buckets(SHAPES, 32, 8)
    seen = []

    def grab(module, args, kwargs):
        seen.append((tuple(args[0].shape[-2:]), kwargs["added_cond_kwargs"]["time_ids"].tolist()))

    hook = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        cfg = TrainConfig(**BUCKETED, center_crop=False, gradient_checkpointing=False)
        with torch.enable_grad(), LoraTrainer(pipe, data, cfg) as tr:
            for _ in range(3):
                tr.step()
            batches = tr.sample_indices
    finally:
        hook.remove()
    for (latent_hw, time_ids), batch in zip(seen, batches):
        h, w = expected[batch[0]]
        assert latent_hw == (h // 2, w // 2)
        for row, i in zip(time_ids, batch):
            orig_h, orig_w, top, left, th, tw = row
            assert (orig_h, orig_w) == SHAPES[i] and (th, tw) == expected[i]  # target size = the image's bucket
            scale = max(tw / orig_w, th / orig_h)  # resized to cover the bucket, then cropped inside it
            assert 0 <= top <= round(orig_h * scale) - th and 0 <= left <= round(orig_w * scale) - tw


def test_a_step_the_model_cannot_take_is_refused():
    from PIL import Image

    from redifine_core.training.buckets import crop_sizes

    images = [Image.new("RGB", (768, 512))]
    assert crop_sizes(images, 512, 0, 64) == [(512, 512)]  # no buckets: the square
    assert crop_sizes(images, 512, 64, 64) == assign_buckets([(512, 768)], 512, 64)
    with pytest.raises(ValueError, match=r"^TrainConfig.bucket_step = 32 is invalid for this model: must be a "
                                         r"multiple of 64 \(the VAE's and the UNet's downsampling\)$"):
        crop_sizes(images, 512, 32, 64)  # SD's UNet needs 8 (VAE) x 8 (three downsamplings) pixels
    with pytest.raises(ValueError, match="TrainConfig.bucket_step = 12 is invalid: must be a positive multiple of 8"):
        TrainConfig(bucket_step=12)
