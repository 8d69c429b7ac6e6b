"""Condition-drop LoRA finetuning on the tiny SD/SDXL pipelines: determinism, drop pattern, cleanup, modes."""

from __future__ import annotations

import threading

import pytest
import torch

from redifine_core.data import CaptionedImages
from redifine_core.lora import LoraWeights
from redifine_core.models import Pipeline
from redifine_core.progress import Cancelled, CancelToken
from redifine_core.training import LoraTrainer, TrainConfig, finetune_lora, noisy_and_target

CAPTIONS = ["a red circle", "a blue square", "a cat", "a dog on a tree"]


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return Pipeline.from_diffusers(tiny_sd)


@pytest.fixture(scope="module")
def ds():
    g = torch.Generator().manual_seed(1)
    return CaptionedImages.from_images(torch.rand(4, 36, 40, 3, generator=g), CAPTIONS)


def _snapshot(pipeline):
    """Everything training could leave behind: tensors, module types, grad flags, peft bookkeeping."""
    out = {}
    for name in ("unet", "text_encoder", "vae"):
        m = getattr(pipeline, name)
        out[name] = (
            {k: v.detach().clone() for k, v in m.state_dict().items()},
            [(n, type(x).__name__) for n, x in m.named_modules()],
            {n: p.requires_grad for n, p in m.named_parameters()},
            hasattr(m, "peft_config"),
            [x.training for x in m.modules()],
            {p.device for p in m.parameters()},
        )
    out["gc"] = pipeline.unet.is_gradient_checkpointing
    out["te_gc"] = any(getattr(x, "gradient_checkpointing", False) for x in pipeline.text_encoder.modules())
    return out


def _assert_same(a, b):
    assert a["gc"] == b["gc"] and a["te_gc"] == b["te_gc"]
    for name in ("unet", "text_encoder", "vae"):
        sa, sb = a[name], b[name]
        assert list(sa[0]) == list(sb[0]), f"{name}: state-dict keys changed"
        assert all(torch.equal(sa[0][k], sb[0][k]) for k in sa[0]), f"{name}: weights changed"
        assert sa[1] == sb[1], f"{name}: module tree changed"
        assert sa[2] == sb[2], f"{name}: requires_grad flags changed"
        assert sa[3] == sb[3]
        assert sa[4] == sb[4], f"{name}: train/eval modes changed"
        assert sa[5] == sb[5], f"{name}: device changed"


def _lora_equal(a: LoraWeights, b: LoraWeights) -> bool:
    return (a.unet.keys() == b.unet.keys() and all(torch.equal(a.unet[k], b.unet[k]) for k in a.unet)
            and a.text_encoder.keys() == b.text_encoder.keys()
            and all(torch.equal(a.text_encoder[k], b.text_encoder[k]) for k in a.text_encoder))


FAST = dict(steps=3, batch_size=2, rank=2, alpha=4.0, learning_rate=1e-3)


def test_training_learns_reports_progress_and_leaves_pipeline_clean(pipe, ds):
    before = _snapshot(pipe)
    events = []
    res = finetune_lora(pipe, ds, TrainConfig(**FAST, cond_drop=0.5, warmup_steps=2), progress=events.append)
    _assert_same(before, _snapshot(pipe))
    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    assert [e.step for e in events] == [1, 2, 3] and {e.total for e in events} == {3}
    assert all(e.phase == "train" and e.eta_s is not None and e.eta_s >= 0 for e in events)
    assert [e.loss for e in events] == res.losses
    assert events[-1].eta_s == 0
    assert res.seconds > 0
    mods = res.lora.modules("unet")
    expected = sorted(n for n, _ in pipe.unet.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")))
    assert mods == expected and len(mods) == 32  # 4 transformer blocks x 2 attentions x 4 projections
    # peft's gaussian init starts B at zero: a non-zero B proves gradients reached the LoRA
    assert all(res.lora.unet[f"{m}.lora_B.weight"].abs().sum() > 0 for m in mods)
    assert res.lora.rank == 2 and res.lora.alpha == 4.0
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in res.lora.unet.values())
    md = res.lora.metadata
    assert md["ss_caption_dropout_rate"] == "0.5" and md["ss_steps"] == "3" and md["ss_network_alpha"] == "4.0"
    assert md["ss_resolution"] == "(32, 32)" and md["ss_base_model_version"] == "sd_v1"


def test_same_seed_same_lora_other_seed_differs(pipe, ds):
    cfg = TrainConfig(**FAST, cond_drop=0.3, random_flip=True)
    a = finetune_lora(pipe, ds, cfg)
    b = finetune_lora(pipe, ds, cfg)
    assert _lora_equal(a.lora, b.lora) and a.losses == b.losses and a.drop_masks == b.drop_masks
    c = finetune_lora(pipe, ds, TrainConfig(**FAST, cond_drop=0.3, random_flip=True, seed=1))
    assert not _lora_equal(a.lora, c.lora)


def test_drop_pattern_is_reproducible_and_independent_of_caching(pipe, ds):
    base = dict(steps=4, batch_size=3, rank=2, learning_rate=1e-3, cond_drop=0.5, seed=7)
    cached = finetune_lora(pipe, ds, TrainConfig(**base))
    uncached = finetune_lora(pipe, ds, TrainConfig(**base, cache_latents=False))
    flip_crop = finetune_lora(pipe, ds, TrainConfig(**base, random_flip=True, center_crop=False))
    masks = cached.drop_masks
    assert len(masks) == 4 and all(len(m) == 3 for m in masks)
    assert 0 < sum(map(sum, masks)) < 12  # some dropped, some kept
    assert uncached.drop_masks == masks and flip_crop.drop_masks == masks
    assert uncached.sample_indices == cached.sample_indices == flip_crop.sample_indices
    # cached latents are sampled with the same draws as fresh encodings: same training up to VAE batching noise
    assert torch.allclose(torch.tensor(cached.losses), torch.tensor(uncached.losses), atol=1e-4)
    other = finetune_lora(pipe, ds, TrainConfig(**{**base, "seed": 8}))
    assert other.drop_masks != masks


def test_full_drop_equals_training_on_empty_captions(pipe, ds):
    """cond_drop=1 must feed exactly the empty-prompt embedding, and the drop draws must not shift other randomness."""
    dropped = finetune_lora(pipe, ds, TrainConfig(**FAST, cond_drop=1.0))
    assert all(all(m) for m in dropped.drop_masks)
    empty = CaptionedImages(ds.images, ("",) * len(ds), ds.names)
    plain = finetune_lora(pipe, empty, TrainConfig(**FAST, cond_drop=0.0))
    assert not any(any(m) for m in plain.drop_masks)
    assert _lora_equal(dropped.lora, plain.lora)
    kept = finetune_lora(pipe, ds, TrainConfig(**FAST, cond_drop=0.0))
    assert not _lora_equal(kept.lora, plain.lora)


def test_cancel_and_failure_leave_pipeline_clean(pipe, ds):
    before = _snapshot(pipe)
    token = CancelToken()
    seen = []

    def cancel_after_first(ev):
        seen.append(ev.step)
        token.set()

    with pytest.raises(Cancelled):
        finetune_lora(pipe, ds, TrainConfig(**FAST), progress=cancel_after_first, cancel=token)
    assert seen == [1]
    _assert_same(before, _snapshot(pipe))

    def boom(ev):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        finetune_lora(pipe, ds, TrainConfig(**FAST, gradient_checkpointing=True, target=("attention", "text_encoder")),
                      progress=boom)
    _assert_same(before, _snapshot(pipe))
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        finetune_lora(pipe, ds, TrainConfig(**FAST), cancel=ev)


def test_works_inside_inference_mode_with_a_pipeline_loaded_there(ds):
    from redifine_core.tiny import tiny_sd_pipeline

    with torch.inference_mode():
        p = Pipeline.from_diffusers(tiny_sd_pipeline())
        images = torch.rand(2, 32, 32, 3)  # an inference tensor, as ComfyUI hands over
        data = CaptionedImages.from_images(images, "a cat")
        res = finetune_lora(p, data, TrainConfig(**FAST))
        assert torch.is_inference_mode_enabled()
    assert all(torch.isfinite(v).all() and not v.is_inference() for v in res.lora.unet.values())
    assert all(res.lora.unet[k].abs().sum() > 0 for k in res.lora.unet if k.endswith("lora_B.weight"))
    assert not hasattr(p.unet, "peft_config")


def test_gradient_checkpointing_gives_the_same_lora(pipe, ds):
    """Same result with and without it (that it really recomputes is tested in test_training_caches.py)."""
    a = finetune_lora(pipe, ds, TrainConfig(**FAST))
    b = finetune_lora(pipe, ds, TrainConfig(**FAST, gradient_checkpointing=True))
    assert not pipe.unet.is_gradient_checkpointing
    for k in a.lora.unet:
        assert torch.allclose(a.lora.unet[k], b.lora.unet[k], atol=1e-6), k


def test_targets_text_encoder_and_extra_unet_modules(pipe, ds):
    res = finetune_lora(pipe, ds, TrainConfig(**FAST, cond_drop=0.5,
                                              target=("attention", "feedforward", "resnet", "text_encoder")))
    mods = res.lora.modules("unet")
    assert any(m.endswith("ff.net.2") for m in mods) and any(m.endswith("ff.net.0.proj") for m in mods)
    assert any(m.endswith("resnets.0.conv1") for m in mods) and any(m.endswith("time_emb_proj") for m in mods)
    te = res.lora.modules("text_encoder")
    assert te and all(m.startswith("text_model.encoder.layers.") for m in te)
    assert {m.rsplit(".", 1)[-1] for m in te} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert all(res.lora.text_encoder[f"{m}.lora_B.weight"].abs().sum() > 0 for m in te)


def test_init_lora_continues_from_given_weights(pipe, ds):
    first = finetune_lora(pipe, ds, TrainConfig(**FAST))
    tiny_lr = TrainConfig(**{**FAST, "steps": 1, "learning_rate": 1e-12})
    cont = finetune_lora(pipe, ds, tiny_lr, init_lora=first.lora)
    fresh = finetune_lora(pipe, ds, tiny_lr)
    for k in first.lora.unet:
        assert torch.allclose(cont.lora.unet[k], first.lora.unet[k], atol=1e-8), k
    assert not _lora_equal(cont.lora, fresh.lora)
    # the continued run starts from the trained adapter, so its loss is the trained model's, not the base's
    assert cont.losses != fresh.losses


def test_warmup_grad_accum_and_v_prediction(pipe, ds):
    cfg = TrainConfig(steps=4, batch_size=1, grad_accum=2, rank=2, warmup_steps=3, learning_rate=3e-3)
    with torch.enable_grad(), LoraTrainer(pipe, ds, cfg) as tr:
        lrs = []
        for _ in range(4):
            lrs.append(tr.optimizer.param_groups[0]["lr"])  # the rate this step uses
            tr.step()
        assert [len(m) for m in tr.drop_masks] == [2] * 4
    assert cfg.lr_scheduler == "constant_with_warmup"
    assert lrs == pytest.approx([0.0, 1e-3, 2e-3, 3e-3])  # diffusers' warm-up: 0 at the first step, as sd-scripts
    assert not hasattr(pipe.unet, "peft_config")


def test_noisy_and_target_match_diffusers_ddpm():
    from diffusers import DDPMScheduler

    from redifine_core.tiny import SD_SCHEDULER

    sched = DDPMScheduler.from_config({**SD_SCHEDULER, "prediction_type": "v_prediction"})
    g = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    noisy, v = noisy_and_target(sched.alphas_cumprod, lat, noise, t, "v_prediction")
    assert torch.allclose(noisy, sched.add_noise(lat, noise, t), atol=1e-6)
    assert torch.allclose(v, sched.get_velocity(lat, noise, t), atol=1e-6)
    assert noisy_and_target(sched.alphas_cumprod, lat, noise, t, "epsilon")[1] is noise


def test_v_prediction_and_bf16_on_cpu_train(ds):
    from redifine_core.tiny import tiny_sd_pipeline

    p = Pipeline.from_diffusers(tiny_sd_pipeline(prediction_type="v_prediction"))
    assert p.prediction_type == "v_prediction"
    res = finetune_lora(p, ds, TrainConfig(**{**FAST, "steps": 2}, noise_offset=0.1))
    assert res.lora.metadata["redifine_prediction_type"] == "v_prediction"
    res16 = finetune_lora(p, ds, TrainConfig(**{**FAST, "steps": 1}, mixed_precision="bf16"))
    assert all(torch.isfinite(torch.tensor(res16.losses)))


def test_sdxl_with_both_text_encoders(tiny_sdxl, ds):
    p = Pipeline.from_diffusers(tiny_sdxl)
    before = {k: v.clone() for k, v in p.text_encoder_2.state_dict().items()}
    res = finetune_lora(p, ds, TrainConfig(**{**FAST, "steps": 2}, cond_drop=0.5, target=("attention", "text_encoder")))
    assert res.lora.unet and res.lora.text_encoder and res.lora.text_encoder_2
    assert all(k.startswith("text_model.") for k in res.lora.text_encoder_2)
    assert res.lora.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    after = p.text_encoder_2.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not hasattr(p.unet, "peft_config")


@pytest.mark.parametrize("field, value, allowed", [
    ("rank", 1025, "an integer >= 1, at most 1024"),
    ("steps", 1_000_001, "at most 1000000"),
    ("batch_size", 5000, "at most 1024"),
    ("learning_rate", 2.0, "a finite number > 0, at most 1"),
    ("alpha", 1e30, "at most 4096"),
    ("resolution", 8192, "positive multiple of 8, at most 4096"),
    ("gradient_checkpointing", "yes", "True, False or None"),
    ("mixed_precision", "half", "('auto', 'no', 'fp16', 'bf16')"),
])
def test_train_config_upper_bounds_and_new_fields(field, value, allowed):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{field: value})
    msg = str(err.value)
    assert msg.startswith(f"TrainConfig.{field} = {value!r} is invalid: must be ") and allowed in msg, msg
    assert "\n" not in msg


def test_train_config_defaults_follow_the_model():
    cfg = TrainConfig()
    assert cfg.mixed_precision == "auto" and cfg.gradient_checkpointing is None
    assert cfg.checkpointing_for(sdxl=True) and not cfg.checkpointing_for(sdxl=False)
    assert not TrainConfig(gradient_checkpointing=False).checkpointing_for(sdxl=True)
    assert TrainConfig(gradient_checkpointing=True).checkpointing_for(sdxl=False)
    assert TrainConfig(steps=1_000_000, rank=1024, resolution=4096).rank == 1024  # the bounds are inclusive
    assert TrainConfig(**cfg.to_dict()) == cfg  # what run.json stores reads back
