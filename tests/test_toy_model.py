"""The shipped toy model: loads offline through the normal code paths, generates the right size, follows prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from redifine_core.toy.checker import check
from redifine_core.toy.dataset import balanced_captions

MODEL = Path(__file__).resolve().parents[1] / "redifine_core" / "toy" / "model"


def test_shipped_folder_is_small_fp16_safetensors_and_sd_layout():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 1024 * 1024
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl")]
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    sched = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "epsilon" and sched["timestep_spacing"] == "trailing"
    unet = json.loads((MODEL / "unet" / "config.json").read_text())
    assert unet["sample_size"] == 16  # 32 px images through the 2x VAE


def test_diffusers_loads_it_directly_offline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle on a blue background", num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 32, 32, 3)


@pytest.fixture(scope="module")
def toy_pipeline():
    from redifine_core.models import load_pipeline

    return load_pipeline("toy", device="cpu")


def test_load_pipeline_toy_generates_default_size(toy_pipeline):
    from redifine_core.sampling import generate

    assert toy_pipeline.kind == "toy" and toy_pipeline.default_size == 32
    img = generate(toy_pipeline, ["a green square on a gray background"] * 2, schedule=3.0, steps=3, seeds=0)
    assert tuple(img.shape) == (2, 32, 32, 3)
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0


def test_prompt_fidelity_at_best_cfg(toy_pipeline):
    """256 samples, 20 DDIM steps, CFG 3 measured 0.996 full-caption accuracy (docs/toy-lab.md); here 32 samples at
    10 steps must reach 0.85: with p = 0.99 per image, 5+ misses out of 32 has probability < 1e-4."""
    from redifine_core.sampling import generate

    captions = balanced_captions(32, seed=7)
    images = generate(toy_pipeline, captions, schedule=3.0, steps=10, seeds=100, batch_size=32)
    r = check(images, captions)
    assert r["full"] >= 0.85, r


def test_reproduces_the_detail_of_its_data_at_iteration_0(toy_pipeline):
    """Issue 11's bar for a test bed that can show blur: at the best constant CFG of the study (2), the base model's
    HF share and Laplacian variance are within 30 % of toy data drawn like a demo's D0 (48 samples at 15 steps, as in
    a demo's iteration 0). Measured -20 % and -22 % (CFG 3: -27 % and -25 %); without the decoder phase of the
    training recipe it was -24 % and -33 %, and the first toy model -75 % and -80 %, both failing it."""
    from redifine_core.metrics import image_statistics
    from redifine_core.sampling import generate
    from redifine_core.toy.dataset import generate as toy_images
    from redifine_core.toy.demo import DATA_SEED

    data, captions, _ = toy_images(48, seed=DATA_SEED)
    images = generate(toy_pipeline, captions, schedule=2.0, steps=15, seeds=0, batch_size=48)
    made, d0 = image_statistics(images), image_statistics(data)
    for key in ("hf_share", "laplacian_var"):
        assert abs(made[key] / d0[key] - 1) <= 0.30, (key, made[key], d0[key])
