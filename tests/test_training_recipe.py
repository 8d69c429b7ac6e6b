"""The recipe features artists train with, on the tiny SD/SDXL pipelines: min-SNR weighting, separate UNet and
text-encoder learning rates, diffusers' schedules, CLIP skip (the same conditioning in training and sampling),
optimizers by name, and the recipe written back as sd-scripts' ss_* metadata."""

from __future__ import annotations

import math

import pytest
import torch

from redifine_core.data import CaptionedImages
from redifine_core.models import Pipeline
from redifine_core.sampling import encode_prompts, generate
from redifine_core.training import LoraTrainer, TrainConfig, diffusion_loss, finetune_lora
from redifine_core.training.caches import TextEncoder

FAST = dict(steps=3, batch_size=2, rank=2, alpha=4.0, learning_rate=1e-3)
PROMPTS = ["a red circle", "a blue square", "", "a cat"]
DS = CaptionedImages.from_images(torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(1)),
                                 ["a red circle", "a blue square", "a cat", "a dog"])


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return Pipeline.from_diffusers(tiny_sd)


def _first_losses(pipe, **kw):
    with torch.enable_grad(), LoraTrainer(pipe, DS, TrainConfig(**{**FAST, **kw})) as tr:
        return [tr.step() for _ in range(2)]


# ----------------------------------------------------------------------------------------------------- min-SNR


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_matches_the_diffusers_example(prediction_type):
    """The weighting of diffusers' train_text_to_image.py, written out here as that script has it."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from redifine_core.tiny import SD_SCHEDULER

    sched = DDPMScheduler.from_config(SD_SCHEDULER)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 300, 700, 999])
    gamma = 5.0
    snr = compute_snr(sched, t)
    w = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    w = w / snr if prediction_type == "epsilon" else w / (snr + 1)
    ref = (torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=[1, 2, 3]) * w).mean()
    got = diffusion_loss(pred, target, t, sched, prediction_type, gamma)
    assert torch.allclose(got, ref, rtol=1e-6)
    plain = torch.nn.functional.mse_loss(pred, target)
    assert not torch.allclose(got, plain, rtol=1e-3)
    assert torch.equal(diffusion_loss(pred, target, t, sched, prediction_type, None), plain)


def test_min_snr_weights_the_training_loss(pipe):
    off = _first_losses(pipe)
    # epsilon: weight min(snr, gamma) / snr = 1 wherever gamma >= snr, so a gamma above every snr changes nothing
    assert _first_losses(pipe, min_snr_gamma=1e4) == pytest.approx(off, rel=1e-5)
    on = _first_losses(pipe, min_snr_gamma=1.0)
    assert on[0] < off[0]  # the same first batch, with low-noise samples down-weighted
    res = finetune_lora(pipe, DS, TrainConfig(**FAST, min_snr_gamma=5.0))
    assert res.lora.metadata["ss_min_snr_gamma"] == "5.0"
    assert finetune_lora(pipe, DS, TrainConfig(**FAST)).lora.metadata["ss_min_snr_gamma"] == "None"


# ------------------------------------------------------------------------------------ learning rates and schedules


def test_unet_and_text_encoder_learn_at_their_own_rates(pipe):
    both = ("attention", "text_encoder")
    res = finetune_lora(pipe, DS, TrainConfig(**FAST, target=both, unet_lr=1e-3, text_encoder_lr=1e-9))
    te_b = max(v.abs().max() for k, v in res.lora.text_encoder.items() if k.endswith("lora_B.weight"))
    unet_b = max(v.abs().max() for k, v in res.lora.unet.items() if k.endswith("lora_B.weight"))
    assert 0 < te_b < 1e-8 and unet_b > 1e-4  # AdamW moves each weight by about its group's rate per step
    flipped = finetune_lora(pipe, DS, TrainConfig(**FAST, target=both, unet_lr=1e-9, text_encoder_lr=1e-3))
    assert max(v.abs().max() for k, v in flipped.lora.unet.items() if k.endswith("lora_B.weight")) < 1e-8
    md = res.lora.metadata
    assert (md["ss_learning_rate"], md["ss_unet_lr"], md["ss_text_encoder_lr"]) == ("0.001", "0.001", "1e-09")
    with torch.enable_grad(), LoraTrainer(pipe, DS, TrainConfig(**FAST, target=both, text_encoder_lr=5e-4)) as tr:
        assert [g["lr"] for g in tr.optimizer.param_groups] == [1e-3, 5e-4]  # the unset UNet rate is learning_rate


@pytest.mark.parametrize("scheduler, warmup", [("constant", 0), ("constant_with_warmup", 2), ("cosine", 2),
                                               ("cosine", 0)])
def test_schedules_are_diffusers_own(pipe, scheduler, warmup):
    from diffusers.optimization import get_scheduler

    steps = 6
    cfg = TrainConfig(**{**FAST, "steps": steps}, lr_scheduler=scheduler, warmup_steps=warmup,
                      target=("attention", "text_encoder"), text_encoder_lr=2e-4)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_scheduler(scheduler, ref_opt, num_warmup_steps=warmup, num_training_steps=steps)
    factors = []
    for _ in range(steps):
        factors.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    with torch.enable_grad(), LoraTrainer(pipe, DS, cfg) as tr:
        seen = []
        for _ in range(steps):
            seen.append([g["lr"] for g in tr.optimizer.param_groups])
            tr.step()
        md = tr.lora_weights().metadata
    assert [u for u, _ in seen] == pytest.approx([1e-3 * f for f in factors])
    assert [te for _, te in seen] == pytest.approx([2e-4 * f for f in factors])
    if scheduler == "cosine":
        assert seen[-1][0] < seen[warmup][0] and len({round(u, 12) for u, _ in seen}) > 2
    assert (md["ss_lr_scheduler"], md["ss_lr_warmup_steps"]) == (scheduler, str(warmup))


# ----------------------------------------------------------------------------------------------------- CLIP skip


def _final_norm(te, h):
    return getattr(te, "text_model", te).final_layer_norm(h)


@pytest.mark.parametrize("clip_skip", [None, 1, 2])
def test_clip_skip_training_and_sampling_condition_alike_sd(pipe, clip_skip):
    with torch.no_grad():
        train, _ = TextEncoder(pipe, False, clip_skip)(PROMPTS)
        sample, pooled = encode_prompts(pipe, PROMPTS, clip_skip=clip_skip)
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        out = pipe.text_encoder(ids, output_hidden_states=True)
    assert pooled is None and torch.equal(train, sample)
    if clip_skip == 2:  # the penultimate layer through the final layer norm, as sd-scripts and A1111 do
        assert torch.allclose(sample, _final_norm(pipe.text_encoder, out.hidden_states[-2]), atol=1e-6)
        assert not torch.allclose(sample, out.last_hidden_state, atol=1e-3)
    else:
        assert torch.allclose(sample, out.last_hidden_state, atol=1e-6)


@pytest.mark.parametrize("clip_skip", [None, 2])
def test_clip_skip_training_and_sampling_condition_alike_sdxl(tiny_sdxl, clip_skip):
    sdxl = Pipeline.from_diffusers(tiny_sdxl)
    with torch.no_grad():
        train, train_pooled = TextEncoder(sdxl, True, clip_skip)(PROMPTS)
        sample, pooled = encode_prompts(sdxl, PROMPTS, clip_skip=clip_skip)
        default, _ = encode_prompts(sdxl, PROMPTS)
    assert torch.equal(train, sample) and torch.equal(train_pooled, pooled)
    assert torch.equal(sample, default)  # SDXL is always conditioned on the penultimate layers
    with pytest.raises(ValueError, match=r"^clip_skip=1 does not apply to SDXL.*use None or 2$"):
        encode_prompts(sdxl, PROMPTS, clip_skip=1)
    with pytest.raises(ValueError, match="does not apply to SDXL"):
        LoraTrainer(sdxl, CaptionedImages.from_images(torch.rand(1, 32, 32, 3), "a cat"),
                    TrainConfig(**FAST, clip_skip=3))


def test_clip_skip_reaches_training_and_sampling(pipe):
    a = _first_losses(pipe, clip_skip=1)
    assert _first_losses(pipe) == a  # None = the last layer = 1
    assert _first_losses(pipe, clip_skip=2) != a
    kw = dict(steps=2, seeds=0, width=32, height=32)
    assert not torch.equal(generate(pipe, "a cat", 3.0, **kw), generate(pipe, "a cat", 3.0, clip_skip=2, **kw))
    with pytest.raises(ValueError, match="more than the text encoder's 2 layers"):
        generate(pipe, "a cat", 3.0, clip_skip=3, **kw)
    res = finetune_lora(pipe, DS, TrainConfig(**FAST, clip_skip=2))
    assert res.lora.metadata["ss_clip_skip"] == "2"


# ---------------------------------------------------------------------------------------------------- optimizers


def test_adamw_is_named_as_sd_scripts_names_it(pipe):
    res = finetune_lora(pipe, DS, TrainConfig(**FAST))
    assert res.lora.metadata["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"


def test_prodigy_trains(pipe):
    pytest.importorskip("prodigyopt", reason="the test extra installs prodigyopt")
    cfg = TrainConfig(**{**FAST, "learning_rate": 1.0}, optimizer="prodigy")
    with torch.enable_grad(), LoraTrainer(pipe, DS, cfg) as tr:
        assert type(tr.optimizer).__name__ == "Prodigy"
        losses = [tr.step() for _ in range(3)]
        lora = tr.lora_weights()
    assert all(math.isfinite(x) for x in losses)
    assert all(v.abs().sum() > 0 for k, v in lora.unet.items() if k.endswith("lora_B.weight"))
    assert lora.metadata["ss_optimizer"] == "prodigyopt.prodigy.Prodigy(weight_decay=0.01)"


@pytest.mark.parametrize("optimizer, package", [("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")])
def test_missing_optimizer_package_is_one_line(monkeypatch, optimizer, package):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ValueError) as err:
        TrainConfig(optimizer=optimizer)
    msg = str(err.value)
    assert msg.endswith(f"pip install {package}") and "\n" not in msg and f"'{optimizer}'" in msg


# ------------------------------------------------------------------------------------------- settings and metadata


@pytest.mark.parametrize("field, value, allowed", [
    ("min_snr_gamma", -1.0, "None or 0 (off) or a finite number > 0, at most 10000"),
    ("min_snr_gamma", float("nan"), "None or 0 (off)"),
    ("unet_lr", 2.0, "None (= learning_rate) or a finite number > 0, at most 1"),
    ("text_encoder_lr", 1e-4, "None unless target includes 'text_encoder'"),
    ("lr_scheduler", "linear", "None or one of ('constant', 'constant_with_warmup', 'cosine')"),
    ("optimizer", "lion", "one of ('adamw', 'adamw8bit', 'prodigy')"),
    ("clip_skip", 0, "an integer >= 1 (1 = last layer, 2 = penultimate), at most 48"),
    ("clip_skip", 2.0, "an integer >= 1"),
])
def test_recipe_settings_are_checked(field, value, allowed):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{field: value})
    msg = str(err.value)
    assert msg.startswith(f"TrainConfig.{field} = {value!r} is invalid: must be ") and allowed in msg, msg
    assert "\n" not in msg


def test_recipe_defaults_and_warmup_with_constant():
    cfg = TrainConfig()
    assert (cfg.lr_scheduler, cfg.optimizer, cfg.min_snr_gamma, cfg.clip_skip) == ("constant", "adamw", None, None)
    assert cfg.unet_learning_rate == cfg.text_encoder_learning_rate == cfg.learning_rate
    assert TrainConfig(warmup_steps=5).lr_scheduler == "constant_with_warmup"
    assert TrainConfig(min_snr_gamma=0).min_snr_gamma is None  # 0 = off, as sd-scripts
    with pytest.raises(ValueError, match="'constant_with_warmup' or 'cosine' when warmup_steps = 5"):
        TrainConfig(warmup_steps=5, lr_scheduler="constant")
    full = TrainConfig(unet_lr=2e-4, text_encoder_lr=5e-5, target=("attention", "text_encoder"), clip_skip=2,
                       lr_scheduler="cosine", warmup_steps=3, min_snr_gamma=5.0)
    assert TrainConfig(**full.to_dict()) == full


def test_recipe_is_written_as_sd_scripts_metadata(pipe):
    cfg = TrainConfig(**FAST, cond_drop=0.25, noise_offset=0.05, seed=11)
    md = finetune_lora(pipe, DS, cfg).lora.metadata
    expected = {"ss_network_dim": "2", "ss_network_alpha": "4.0", "ss_resolution": "(32, 32)",
                "ss_max_train_steps": "3", "ss_seed": "11", "ss_noise_offset": "0.05",
                "ss_caption_dropout_rate": "0.25", "ss_learning_rate": "0.001", "ss_unet_lr": "None",
                "ss_text_encoder_lr": "None", "ss_lr_scheduler": "constant", "ss_lr_warmup_steps": "0",
                "ss_min_snr_gamma": "None", "ss_clip_skip": "None", "ss_enable_bucket": "False"}
    assert {k: md.get(k) for k in expected} == expected
