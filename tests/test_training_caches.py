"""Training memory and latent space: latents cached from a few images at a time, uint8 images, modules parked off the
GPU and put back, gradient checkpointing that really recomputes, SDXL flip/crop conditioning, latents_mean/std."""

from __future__ import annotations

import pytest
import torch

from redifine_core.data import CaptionedImages
from redifine_core.models import Pipeline
from redifine_core.training import BorrowedPipeline, LoraTrainer, TrainConfig, finetune_lora
from redifine_core.training.caches import ENCODE_BATCH

FAST = dict(steps=1, batch_size=2, rank=2, alpha=4.0, learning_rate=1e-3)


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return Pipeline.from_diffusers(tiny_sd)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return Pipeline.from_diffusers(tiny_sdxl)


def _data(n, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CaptionedImages.from_images(torch.rand(n, h, w, 3, generator=g), [f"caption {i % 3}" for i in range(n)])


def _count_calls(module):
    """Count calls with a pre-hook: a checkpoint's recomputation stops early once it has what backward needs, so a
    post-forward hook would miss it."""
    calls = []
    return calls, module.register_forward_pre_hook(lambda *a: calls.append(1))


# ----------------------------------------------------------------------------------------------- latents and pixels


def test_latent_cache_encodes_a_few_images_at_a_time_and_keeps_no_pixels(pipe, monkeypatch):
    ds = _data(7, 36, 44)
    sizes = []
    real = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x, *a, **k: (sizes.append(x.shape[0]), real(x, *a, **k))[1])
    with torch.enable_grad(), LoraTrainer(pipe, ds, TrainConfig(**FAST, random_flip=True)) as tr:
        assert tr.images is None  # nothing at pixel level survives caching
        assert tr.latents.mean.shape == (7, 4, 16, 16) and tr.latents.mean_f.shape == (7, 4, 16, 16)
        assert tr.latents.mean.dtype == torch.float32
        tr.step()
    assert sizes == [4, 4, 3, 3] and max(sizes) <= ENCODE_BATCH  # two orientations per slice of four images


def test_random_crop_keeps_resized_images_as_uint8(pipe):
    ds = _data(3, 40, 48)
    with torch.enable_grad(), LoraTrainer(pipe, ds, TrainConfig(**FAST, center_crop=False)) as tr:
        assert tr.latents is None
        imgs = tr.images.images
        assert [tuple(x.shape) for x in imgs] == [(3, 32, 38)] * 3 and all(x.dtype == torch.uint8 for x in imgs)
        assert tr.step() > 0


def test_modules_a_step_does_not_need_are_parked_and_come_back(pipe, monkeypatch):
    parked = []
    monkeypatch.setattr(BorrowedPipeline, "park", lambda self, m: parked.append(m) or False)
    finetune_lora(pipe, _data(2), TrainConfig(**FAST))
    assert parked == [pipe.text_encoder, pipe.vae]  # text cached, latents cached
    parked.clear()
    finetune_lora(pipe, _data(2), TrainConfig(**FAST, target=("attention", "text_encoder"), cache_latents=False))
    assert parked == []  # the text encoder trains and the VAE encodes every step


class _FakeGpuModule(torch.nn.Module):
    """A module that reports a CUDA device and records moves (no GPU needed)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.where = torch.device("cuda", 0)
        self.moves = []

    def parameters(self, recurse=True):
        for p in super().parameters(recurse):
            yield type("P", (), {"device": self.where})()

    def to(self, device):
        self.moves.append(torch.device(device))
        self.where = torch.device(device)
        return self


def test_borrowed_pipeline_parks_off_gpu_and_restores_the_exact_state():
    gpu, cpu_mod = _FakeGpuModule(), torch.nn.Linear(2, 2)
    b = BorrowedPipeline({"unet": cpu_mod})
    assert b.park(gpu) and not b.park(cpu_mod) and b.parked == [gpu]
    assert gpu.where.type == "cpu"
    cpu_mod.weight.requires_grad_(False)  # training freezes weights...
    b.restore()  # ...and the loan gives them back as they were
    assert gpu.moves == [torch.device("cpu"), torch.device("cuda", 0)] and b.parked == []
    assert cpu_mod.weight.requires_grad
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    m.eval()
    m[0].train()
    b2 = BorrowedPipeline({"unet": m})
    b2.train_mode(m)
    assert all(x.training for x in m.modules())
    b2.restore()
    assert [x.training for x in m.modules()] == [False, True, False]


# ------------------------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("setting, counted", [(True, 2), (False, 1), (None, 1)])
def test_gradient_checkpointing_recomputes_in_backward_sd(pipe, setting, counted):
    """A checkpointed block that gradients flow through (it holds LoRA layers) runs twice per step (forward, then
    again in backward); once when checkpointing is off. None = off for SD1.x. Afterwards: eval mode, no checkpointing."""
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    calls, h = _count_calls(block)
    try:
        res = finetune_lora(pipe, _data(2), TrainConfig(**FAST, gradient_checkpointing=setting))
    finally:
        h.remove()
    assert len(calls) == counted
    assert res.lora.metadata["ss_gradient_checkpointing"] == str(counted == 2)
    assert not pipe.unet.is_gradient_checkpointing and not pipe.unet.training and not block.training


def test_gradient_checkpointing_is_on_by_default_for_sdxl_and_reaches_text_encoders(sdxl):
    unet_block = sdxl.unet.down_blocks[1].attentions[0].transformer_blocks[0]
    # transformers checkpoints a layer's forward (not its __call__): count a module called inside it
    te_layer = next(m for n, m in sdxl.text_encoder.named_modules() if n.endswith("layers.0.self_attn"))
    u_calls, h1 = _count_calls(unet_block)
    t_calls, h2 = _count_calls(te_layer)
    try:
        finetune_lora(sdxl, _data(2), TrainConfig(**FAST))  # gradient_checkpointing=None: auto
        assert len(u_calls) == 2 and len(t_calls) == 1  # the text encoder only ran to fill the cache
        u_calls.clear()
        t_calls.clear()
        finetune_lora(sdxl, _data(2), TrainConfig(**FAST, target=("attention", "text_encoder")))
        assert len(u_calls) == 2 and len(t_calls) == 2  # no cache: encoded with grad, then recomputed in backward
    finally:
        h1.remove()
        h2.remove()
    assert not sdxl.unet.is_gradient_checkpointing and not sdxl.unet.training
    assert not sdxl.text_encoder.training and not any(getattr(m, "gradient_checkpointing", False)
                                                       for m in sdxl.text_encoder.modules())


# ------------------------------------------------------------------------------------------------- SDXL conditioning


def _time_ids(pipeline, ds, cfg, steps):
    seen = []

    def pre(module, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].detach().float().cpu())

    h = pipeline.unet.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.enable_grad(), LoraTrainer(pipeline, ds, cfg) as tr:
            for _ in range(steps):
                tr.step()
    finally:
        h.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("cache_latents", [True, False])
def test_sdxl_flip_mirrors_the_crop_offset(sdxl, cache_latents):
    """A 32x49 image at resolution 32 is center-cropped at left 8; flipped, the same pixels are the crop of the
    mirrored image at left 49 - 8 - 32 = 9. A square image is never reported as cropped, flipped or not."""
    wide = CaptionedImages.from_images(torch.rand(1, 32, 49, 3), "wide")
    cfg = dict(**{**FAST, "batch_size": 8}, resolution=32, cache_latents=cache_latents)
    ids = _time_ids(sdxl, wide, TrainConfig(**cfg, random_flip=True), 2)
    assert ids.shape == (16, 6)
    assert set(ids[:, 0].tolist()) == {32.0} and set(ids[:, 1].tolist()) == {49.0}  # original (h, w)
    assert set(ids[:, 2].tolist()) == {0.0} and set(ids[:, 3].tolist()) == {8.0, 9.0}  # both orientations seen
    assert set(ids[:, 4:].flatten().tolist()) == {32.0}
    plain = _time_ids(sdxl, wide, TrainConfig(**cfg), 1)
    assert set(plain[:, 3].tolist()) == {8.0}
    square = _time_ids(sdxl, _data(2), TrainConfig(**cfg, random_flip=True), 1)
    assert set(square[:, 2:4].flatten().tolist()) == {0.0}


def test_sdxl_random_crop_flip_offsets_stay_inside_the_image(sdxl):
    wide = CaptionedImages.from_images(torch.rand(1, 32, 57, 3), "wide")
    ids = _time_ids(sdxl, wide, TrainConfig(**{**FAST, "batch_size": 8}, resolution=32, center_crop=False,
                                            random_flip=True), 2)
    lefts = ids[:, 3]
    assert lefts.min() >= 0 and lefts.max() <= 57 - 32 and len(set(lefts.tolist())) > 2


def test_training_applies_the_vae_latents_mean_and_std(sdxl):
    """With latents_mean/latents_std in the VAE config, UNet inputs are sqrt(acp) * (raw - mean) * sf / std + noise
    terms: two runs whose configs differ only in the mean differ by exactly -sqrt(acp) * mean * sf / std."""
    cfg = sdxl.vae.config
    ds = _data(2)
    mean = [0.5, -1.0, 2.0, 0.25]

    def inputs(latents_mean, latents_std):
        sdxl.vae.register_to_config(latents_mean=latents_mean, latents_std=latents_std)
        seen = []
        h = sdxl.unet.register_forward_pre_hook(lambda m, a: seen.append((a[0].detach().clone(), a[1].clone())))
        try:
            with torch.enable_grad(), LoraTrainer(sdxl, ds, TrainConfig(**FAST)) as tr:
                tr.step()
                acp = tr.alphas_cumprod
        finally:
            h.remove()
        return seen[0][0], acp[seen[0][1]].sqrt().view(-1, 1, 1, 1)

    try:
        base, sqrt_a = inputs([0.0] * 4, [2.0] * 4)
        shifted, sqrt_a2 = inputs(mean, [2.0] * 4)
    finally:
        sdxl.vae.register_to_config(latents_mean=None, latents_std=None)
    assert torch.equal(sqrt_a, sqrt_a2)
    expected = -sqrt_a * torch.tensor(mean).view(1, 4, 1, 1) * cfg.scaling_factor / 2.0
    assert torch.allclose(shifted - base, expected.expand_as(base), atol=1e-5)
    none, _ = inputs(None, None)  # without the statistics: raw * sf, twice the std=2 latents
    assert torch.allclose(none - base, sqrt_a * (none - base) / sqrt_a, atol=1e-6)
    assert (none - base).abs().max() > 1e-3
