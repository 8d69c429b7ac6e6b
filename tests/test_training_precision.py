"""The precision recipe: half-precision weights train with autocast, fp32 LoRA/optimizer state and loss scaling."""

from __future__ import annotations

import itertools

import pytest
import torch

from redifine_core.data import CaptionedImages
from redifine_core.models import Pipeline
from redifine_core.training import MIXED_PRECISION, LoraTrainer, TrainConfig, finetune_lora, resolve_precision

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FAST = dict(batch_size=2, rank=2, alpha=4.0, learning_rate=1e-3)


@pytest.fixture(scope="module")
def ds():
    g = torch.Generator().manual_seed(3)
    return CaptionedImages.from_images(torch.rand(4, 32, 32, 3, generator=g), ["a cat", "a dog", "a tree", "a car"])


def _pipelines():
    """The same tiny SD weights as float16 and as float32 (the fp16 values upcast, so both compute one function)."""
    from redifine_core.tiny import tiny_sd_pipeline

    p16 = Pipeline.from_diffusers(tiny_sd_pipeline()).to(dtype=torch.float16)
    p32 = Pipeline.from_diffusers(tiny_sd_pipeline()).to(dtype=torch.float16).to(dtype=torch.float32)
    return p16, p32


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_no_combination_trains_unscaled_through_fp16(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for weights, mp in itertools.product(DTYPES, MIXED_PRECISION):
        if device == "cpu" and weights == torch.float32 and mp == "fp16":
            with pytest.raises(ValueError, match=r"mixed_precision = 'fp16' needs a CUDA device"):
                resolve_precision(mp, weights, device)
            continue
        r = resolve_precision(mp, weights, device)
        fp16_runs = weights == torch.float16 or r.autocast_dtype == torch.float16
        assert r.loss_scaling == fp16_runs, (weights, mp, r)
        if device == "cpu":  # a CUDA scaler warns and disables itself without a GPU
            assert (r.make_scaler() is not None) == fp16_runs
        if weights != torch.float32:  # half weights decide their own recipe
            assert r.autocast_dtype == weights, (weights, mp, r)
        else:
            want = {"auto": None, "no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
            assert r.autocast_dtype == want, (mp, r)


def test_bad_precision_inputs_fail_before_work(monkeypatch):
    with pytest.raises(ValueError, match=r"mixed_precision = 'fp8' is invalid.*'auto'"):
        resolve_precision("fp8", torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"float64.*float32, float16 or bfloat16"):
        resolve_precision("auto", torch.float64, "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ValueError, match=r"'bf16' but the GPU on cuda does not support bfloat16"):
        resolve_precision("bf16", torch.float32, "cuda")
    assert TrainConfig().mixed_precision == "auto"


def _pred_grad_max(pipeline, ds, cfg):
    """One step; the largest |gradient| that reached the UNet's output (the start of the backward through fp16)."""
    seen = []

    def hook(module, args, out):
        out[0].register_hook(lambda g: seen.append(float(g.detach().float().abs().max())))

    handle = pipeline.unet.register_forward_hook(hook)
    try:
        with torch.enable_grad(), LoraTrainer(pipeline, ds, cfg) as tr:
            tr.step()
            scale = tr.scaler.get_scale() if tr.scaler is not None else None
            recipe = tr.precision
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0], scale, recipe


def test_fp16_weights_backpropagate_scaled_and_keep_fp32_lora(ds):
    """fp16 weights with mixed_precision='no' must still scale the loss: the gradient entering the fp16 UNet is the
    true gradient times the scaler's scale (65536 at the first step). Unscaled fp16 would give a ratio of 1."""
    p16, p32 = _pipelines()
    cfg = TrainConfig(**FAST, steps=1, mixed_precision="no")
    g16, scale, recipe = _pred_grad_max(p16, ds, cfg)
    g32, none_scale, recipe32 = _pred_grad_max(p32, ds, cfg)
    assert recipe.loss_scaling and recipe.autocast_dtype == torch.float16 and recipe32.autocast_dtype is None
    assert none_scale is None and scale == 65536.0
    assert 0.5 < (g16 / g32) / 65536.0 < 2.0, (g16, g32)

    before = {k: v.clone() for k, v in p16.unet.state_dict().items()}
    with torch.enable_grad(), LoraTrainer(p16, ds, TrainConfig(**FAST, steps=2)) as tr:
        for _ in range(2):
            tr.step()
        assert all(prm.dtype == torch.float32 for prm in tr.params)
        assert tr.optimizer.state and all(st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype ==
                                          torch.float32 for st in tr.optimizer.state.values())
        frozen = [prm for n, prm in p16.unet.named_parameters() if ".lora_" not in n]
        assert frozen and all(prm.dtype == torch.float16 and not prm.requires_grad for prm in frozen)
        lora = tr.lora_weights()
    after = p16.unet.state_dict()
    assert list(after) == list(before) and all(after[k].dtype == torch.float16 and torch.equal(after[k], before[k])
                                               for k in before)
    assert lora.metadata["ss_mixed_precision"] == "fp16" and lora.metadata["redifine_weight_dtype"] == "float16"


def test_fp16_training_matches_fp32_training(ds):
    """Scaled fp16 training learns what fp32 training learns (same seed, same starting weights)."""
    p16, p32 = _pipelines()
    cfg = TrainConfig(**FAST, steps=3)
    a, b = finetune_lora(p16, ds, cfg), finetune_lora(p32, ds, cfg)
    assert a.lora.metadata["ss_mixed_precision"] == "fp16" and b.lora.metadata["ss_mixed_precision"] == "no"
    ups = [k for k in a.lora.unet if k.endswith("lora_B.weight")]
    assert ups
    for k in ups:
        x, y = a.lora.unet[k].flatten(), b.lora.unet[k].flatten()
        assert x.dtype == torch.float32 and x.abs().sum() > 0
        assert torch.nn.functional.cosine_similarity(x, y, dim=0) > 0.95, k
    assert torch.allclose(torch.tensor(a.losses), torch.tensor(b.losses), rtol=2e-2)


def test_bf16_weights_train_under_bf16_autocast_without_scaler(ds):
    from redifine_core.tiny import tiny_sd_pipeline

    p = Pipeline.from_diffusers(tiny_sd_pipeline()).to(dtype=torch.bfloat16)
    with torch.enable_grad(), LoraTrainer(p, ds, TrainConfig(**FAST, steps=1, mixed_precision="fp16")) as tr:
        assert tr.precision.autocast_dtype == torch.bfloat16 and tr.scaler is None
        loss = tr.step()
        assert all(prm.dtype == torch.float32 for prm in tr.params)
        assert all(prm.grad is None for prm in tr.params)  # zeroed after the step
    assert loss == loss and not hasattr(p.unet, "peft_config")
