"""The denoising loop: equality with diffusers at constant CFG, per-step schedules, w == 1 skipping, seeds, LoRA."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from redifine_core.models import Pipeline
from redifine_core.progress import Cancelled
from redifine_core.sampling import (
    SAMPLERS,
    decode_latents,
    encode_prompts,
    generate,
    generate_batches,
    guidance_values,
    make_scheduler,
    size_multiple,
)

PROMPTS = ["a red cat", "a blue dog on a tree", "a photo of a house"]
SEEDS = [3, 7, 11]


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return Pipeline.from_diffusers(tiny_sd, source="tiny")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return Pipeline.from_diffusers(tiny_sdxl, source="tiny-xl")


def _diffusers(pipeline: Pipeline, sampler: str, prompts, seeds, guidance: float, steps: int, size: int = 16, **kw):
    """The reference: diffusers' own pipeline with the same modules and the same scheduler config."""
    pipe = pipeline.to_diffusers()
    pipe.scheduler = make_scheduler(pipeline, sampler)
    out = pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in seeds], **kw,
    )
    return out.images


class UNetCalls:
    """Records the batch size of every UNet forward."""

    def __init__(self, unet):
        self.sizes: list[int] = []
        self.handle = unet.register_forward_pre_hook(lambda mod, args: self.sizes.append(int(args[0].shape[0])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m", "pndm", "default"])
def test_matches_stable_diffusion_pipeline_at_constant_cfg(sd, sampler):
    ref = _diffusers(sd, sampler, PROMPTS, SEEDS, guidance=5.0, steps=3)
    ours = generate(sd, PROMPTS, 5.0, steps=3, seeds=SEEDS, sampler=sampler, width=16, height=16, batch_size=2)
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert tuple(ours.shape) == ref.shape == (3, 16, 16, 3)
    assert float(ours.min()) >= 0.0 and float(ours.max()) <= 1.0
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5, rtol=0)
    assert np.abs(ref[0] - ref[1]).max() > 1e-3  # different prompts/seeds really give different images


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim"])
def test_matches_stable_diffusion_xl_pipeline_at_constant_cfg(sdxl, sampler):
    ref = _diffusers(sdxl, sampler, PROMPTS[:2], SEEDS[:2], guidance=6.0, steps=3)
    ours = generate(sdxl, PROMPTS[:2], 6.0, steps=3, seeds=SEEDS[:2], sampler=sampler, width=16, height=16)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5, rtol=0)


def test_sdxl_non_square_size_goes_into_time_ids(sdxl):
    pipe = sdxl.to_diffusers()
    pipe.scheduler = make_scheduler(sdxl, "euler")
    wide = pipe(PROMPTS[:1], num_inference_steps=2, guidance_scale=3.0, height=16, width=32, output_type="np",
                generator=[torch.Generator().manual_seed(SEEDS[0])]).images
    ours = generate(sdxl, PROMPTS[:1], 3.0, steps=2, seeds=SEEDS[:1], sampler="euler", width=32, height=16)
    assert tuple(ours.shape) == (1, 16, 32, 3)
    np.testing.assert_allclose(ours.numpy(), wide, atol=1e-5, rtol=0)


def test_sdxl_force_zeros_for_empty_negative_prompt(sdxl):
    zeroing = Pipeline.from_diffusers(sdxl.to_diffusers(), source="x")
    zeroing.force_zeros_for_empty_prompt = True
    pipe = zeroing.to_diffusers()
    assert pipe.config.force_zeros_for_empty_prompt is True
    pipe.scheduler = make_scheduler(zeroing, "euler")
    ref = pipe(PROMPTS[:1], num_inference_steps=2, guidance_scale=4.0, height=16, width=16, output_type="np",
               generator=[torch.Generator().manual_seed(1)]).images  # negative_prompt=None -> zero embeddings
    ours = generate(zeroing, PROMPTS[:1], 4.0, steps=2, seeds=[1], sampler="euler", width=16, height=16)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5, rtol=0)
    encoded_empty = generate(sdxl, PROMPTS[:1], 4.0, steps=2, seeds=[1], sampler="euler", width=16, height=16)
    assert np.abs(encoded_empty.numpy() - ref).max() > 1e-4


def test_negative_prompts_match_diffusers(sd):
    negs = ["a green bird", "a star"]
    ref = _diffusers(sd, "ddim", PROMPTS[:2], SEEDS[:2], guidance=7.0, steps=3, negative_prompt=negs)
    ours = generate(sd, PROMPTS[:2], 7.0, steps=3, seeds=SEEDS[:2], negative_prompt=negs, width=16, height=16)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5, rtol=0)
    one = generate(sd, PROMPTS[:2], 7.0, steps=3, seeds=SEEDS[:2], negative_prompt="a green bird", width=16, height=16)
    np.testing.assert_allclose(one[0].numpy(), ours[0].numpy(), atol=1e-6)
    assert (one[1] - ours[1]).abs().max() > 1e-4


def test_image_depends_only_on_its_prompt_and_seed(sd):
    together = generate(sd, PROMPTS, 4.0, steps=3, seeds=SEEDS, sampler="euler_a", width=16, height=16, batch_size=3)
    one_by_one = generate(sd, PROMPTS, 4.0, steps=3, seeds=SEEDS, sampler="euler_a", width=16, height=16, batch_size=1)
    alone = generate(sd, PROMPTS[2], 4.0, steps=3, seeds=SEEDS[2], sampler="euler_a", width=16, height=16)
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[2:], alone, atol=1e-5, rtol=0)


def test_int_seed_means_consecutive_seeds(sd):
    a = generate(sd, PROMPTS[:2], 3.0, steps=2, seeds=5, width=16, height=16)
    b = generate(sd, PROMPTS[:2], 3.0, steps=2, seeds=[5, 6], width=16, height=16)
    c = generate(sd, PROMPTS[:2], 3.0, steps=2, seeds=[5, 7], width=16, height=16)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a[1] - c[1]).abs().max() > 1e-4


class _HalfOff:
    """A duck-typed schedule: w for the first half of the evaluations, 1 (no guidance) after."""

    def __init__(self, w: float):
        self.w = w

    def at_iteration(self, iteration):
        return self

    def values(self, n):
        return [self.w if i < n // 2 else 1.0 for i in range(n)]


def test_no_uncond_pass_where_w_is_one(sd):
    with UNetCalls(sd.unet) as calls:
        out = generate(sd, PROMPTS[:2], _HalfOff(6.0), steps=4, seeds=SEEDS[:2], width=16, height=16)
    assert calls.sizes == [4, 4, 2, 2]
    with UNetCalls(sd.unet) as calls:
        generate(sd, PROMPTS[:2], 1.0, steps=3, seeds=SEEDS[:2], width=16, height=16)
    assert calls.sizes == [2, 2, 2]
    full = generate(sd, PROMPTS[:2], 6.0, steps=4, seeds=SEEDS[:2], width=16, height=16)
    assert (out - full).abs().max() > 1e-4


def test_constant_one_matches_diffusers_without_guidance(sd):
    ref = _diffusers(sd, "euler", PROMPTS[:2], SEEDS[:2], guidance=1.0, steps=3)
    ours = generate(sd, PROMPTS[:2], 1.0, steps=3, seeds=SEEDS[:2], sampler="euler", width=16, height=16)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5, rtol=0)


def test_schedule_string_is_evaluated_per_step_and_iteration(sd):
    from redifine_core.guidance import parse_schedule

    seen: list[float] = []
    generate(sd, PROMPTS[:1], "linear(7, 2)", steps=5, width=16, height=16,
             progress=lambda e: seen.append(e.extra["guidance_scale"]))
    assert seen == pytest.approx(parse_schedule("linear(7, 2)").values(5))
    assert seen[0] == pytest.approx(7.0) and seen[-1] == pytest.approx(2.0)
    assert guidance_values("cycle(3, 5)", 2, iteration=1) == [5.0, 5.0]
    # PNDM evaluates the model steps + 1 times: the schedule is spread over every evaluation
    seen.clear()
    generate(sd, PROMPTS[:1], "linear(7, 2)", steps=4, sampler="pndm", width=16, height=16,
             progress=lambda e: seen.append(e.extra["guidance_scale"]))
    assert len(seen) == 5 and seen[-1] == pytest.approx(2.0)


def test_progress_counts_steps_across_batches_and_cancel_stops(sd):
    events = []
    generate(sd, PROMPTS, 3.0, steps=2, width=16, height=16, batch_size=2, progress=events.append)
    assert [e.phase for e in events] == ["sample"] * 4
    assert [e.step for e in events] == [1, 2, 3, 4] and {e.total for e in events} == {4}

    cancel = threading.Event()

    def stop_after_two(event):
        if event.step == 2:
            cancel.set()

    with UNetCalls(sd.unet) as calls, pytest.raises(Cancelled):
        generate(sd, PROMPTS, 3.0, steps=3, width=16, height=16, batch_size=1, progress=stop_after_two,
                 cancel=cancel)
    assert len(calls.sizes) == 2


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(width=30), ["width=30", "multiple of 4"]),
        (dict(height=18), ["height=18", "multiple of 4"]),
        (dict(steps=0), ["steps"]),
        (dict(prompts=[]), ["prompts"]),
        (dict(prompts=["a", 3]), ["prompts"]),
        (dict(sampler="k_lms"), ["k_lms", "euler_a", "dpmpp_2m"]),
        (dict(seeds=[1, 2]), ["seeds", "3"]),
        (dict(negative_prompt=["x", "y"]), ["negative_prompt"]),
        (dict(batch_size=0), ["batch_size"]),
        (dict(schedule="linear(7"), ["linear(7"]),
    ],
)
def test_bad_arguments_fail_before_any_work(sd, kwargs, words):
    args = dict(prompts=PROMPTS, schedule=3.0, steps=2, width=16, height=16)
    args.update(kwargs)
    with UNetCalls(sd.unet) as calls, pytest.raises(ValueError) as err:
        generate(sd, args.pop("prompts"), args.pop("schedule"), **args)
    assert calls.sizes == []
    for w in words:
        assert w in str(err.value)


def test_size_multiple_and_default_size(sd, sdxl):
    assert size_multiple(sd) == 2 * 2 and sd.default_size == 32
    assert size_multiple(sdxl) == 4
    out = generate(sd, PROMPTS[0], 2.0, steps=1)
    assert tuple(out.shape) == (1, 32, 32, 3)
    assert set(SAMPLERS) >= {"default", "ddim", "euler", "euler_a", "dpmpp_2m", "pndm"}


def test_make_scheduler_keeps_spacing_and_prediction_type(sd):
    for name in SAMPLERS:
        sched = make_scheduler(sd, name)
        assert sched.config.timestep_spacing == "leading"
        assert sched.config.prediction_type == "epsilon"
    assert make_scheduler(sd, "ddim").config.clip_sample is False
    assert type(make_scheduler(sd, "default")) is type(sd.scheduler)


def test_encode_prompts_and_decode_latents(sd, sdxl):
    embeds, pooled = encode_prompts(sd, PROMPTS)
    ref, _ = sd.to_diffusers().encode_prompt(PROMPTS, sd.device, 1, False)
    assert pooled is None and tuple(embeds.shape) == (3, 77, 32)
    torch.testing.assert_close(embeds, ref)
    xl_embeds, xl_pooled = encode_prompts(sdxl, "a cat")
    ref_e, _, ref_p, _ = sdxl.to_diffusers().encode_prompt("a cat", device=sdxl.device, do_classifier_free_guidance=False)
    assert tuple(xl_embeds.shape) == (1, 77, 64) and tuple(xl_pooled.shape) == (1, 32)
    torch.testing.assert_close(xl_embeds, ref_e)
    torch.testing.assert_close(xl_pooled, ref_p)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = decode_latents(sd, latents)
    assert tuple(images.shape) == (2, 16, 16, 3) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0


def _random_lora(unet, seed: int = 0):
    from redifine_core.lora import LoraWeights

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_k")):
            sd[f"{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g) * 0.5
            sd[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.5
    return LoraWeights(unet=sd, rank=2, alpha=2.0, target_modules=("to_q", "to_k", "to_v"))


def test_lora_changes_output_and_is_removed_afterwards(sd):
    lora = _random_lora(sd.unet)
    args = dict(prompts=PROMPTS[:1], schedule=3.0, steps=2, seeds=[4], width=16, height=16)
    base = generate(sd, **args)
    with_lora = generate(sd, **args, lora=lora, lora_scale=1.0)
    half = generate(sd, **args, lora=lora, lora_scale=0.5)
    after = generate(sd, **args)
    assert (with_lora - base).abs().max() > 1e-3
    assert (half - base).abs().max() > 1e-4 and (half - with_lora).abs().max() > 1e-4
    torch.testing.assert_close(after, base, atol=0, rtol=0)


def test_generate_batches_streams_the_same_images_as_generate(sd):
    prompts = PROMPTS + ["a green tree", "two cats"]
    args = dict(schedule="linear(7, 2)", steps=3, seeds=[5, 1, 9, 2, 8], width=16, height=16, sampler="euler_a")
    whole = generate(sd, prompts, batch_size=2, **args)
    batches = list(generate_batches(sd, prompts, batch_size=2, **args))
    assert [idx for idx, _ in batches] == [[0, 1], [2, 3], [4]]
    for idx, images in batches:
        assert images.dtype == torch.float32 and images.device.type == "cpu" and tuple(images.shape) == (len(idx), 16, 16, 3)
        assert torch.equal(images, whole[idx])  # bit-identical to generate with the same batches
    torch.testing.assert_close(generate(sd, prompts, batch_size=5, **args), whole, atol=1e-5, rtol=0)


def test_generate_batches_checks_arguments_on_call_and_runs_lazily(sd):
    with UNetCalls(sd.unet) as calls:
        with pytest.raises(ValueError, match="width=30"):
            generate_batches(sd, PROMPTS, 3.0, steps=2, width=30, height=16)  # raised before iterating
        batches = generate_batches(sd, PROMPTS, 3.0, steps=2, width=16, height=16, batch_size=1)
        assert calls.sizes == []  # nothing ran yet
        idx, _ = next(batches)
        assert idx == [0] and len(calls.sizes) == 2
        batches.close()


def test_generate_batches_removes_the_lora_when_closed_early(sd):
    args = dict(prompts=PROMPTS, schedule=3.0, steps=2, seeds=[4, 5, 6], width=16, height=16, batch_size=1)
    base = generate(sd, **args)
    batches = generate_batches(sd, **args, lora=_random_lora(sd.unet), lora_scale=1.0)
    _, first = next(batches)
    assert (first - base[:1]).abs().max() > 1e-3  # applied while streaming
    batches.close()
    torch.testing.assert_close(generate(sd, **args), base, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_to_diffusers_runs_at_fp16_with_the_upcast_vae(kind):
    """Under fp16 the VAE stays float32 (force_upcast); diffusers' own pipeline hands it fp16 latents and must not fail."""
    from redifine_core.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

    half = Pipeline.from_diffusers(tiny_sd_pipeline() if kind == "sd" else tiny_sdxl_pipeline(), source="half")
    half.to(dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    ref = _diffusers(half, "ddim", PROMPTS[:2], SEEDS[:2], guidance=5.0, steps=2)
    ours = generate(half, PROMPTS[:2], 5.0, steps=2, seeds=SEEDS[:2], width=16, height=16)
    assert np.isfinite(ref).all() and ref.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-3, rtol=0)
    assert half.vae.dtype == torch.float32  # still upcast: nothing was cast back behind our back
