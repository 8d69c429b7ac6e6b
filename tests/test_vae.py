"""The VAE helpers: compute dtype (force_upcast), latent scaling, sliced and tiled encode/decode."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import redifine_core.vae as vae_mod
from redifine_core.models import Pipeline
from redifine_core.vae import decode, encode_moments, scale_latents, unscale_latents, vae_dtype


def _own_vae(tiny_sd, dtype=torch.float32) -> Pipeline:
    """A pipeline sharing the tiny UNet/text encoder but with its own copy of the VAE (tests may cast it)."""
    pipe = Pipeline.from_diffusers(tiny_sd)
    pipe.vae = copy.deepcopy(tiny_sd.vae).float()
    pipe.dtype = dtype
    return pipe


def _fake(**config) -> SimpleNamespace:
    base = dict(scaling_factor=0.5, shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True)
    base.update(config)
    return SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(**base)), dtype=torch.float32)


@pytest.mark.parametrize("config", [
    {},
    {"shift_factor": 0.25},
    {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [2.0, 0.5, 1.5, 1.0]},
])
def test_scale_and_unscale_are_exact_inverses(config):
    pipe = _fake(**config)
    raw = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scaled = scale_latents(pipe, raw)
    if "latents_mean" in config:
        mean = torch.tensor(config["latents_mean"], dtype=raw.dtype).view(1, -1, 1, 1)
        std = torch.tensor(config["latents_std"], dtype=raw.dtype).view(1, -1, 1, 1)
        expected = (raw - mean) * 0.5 / std
    else:
        expected = (raw - config.get("shift_factor", 0.0)) * 0.5
    torch.testing.assert_close(scaled, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(unscale_latents(pipe, scaled), raw, atol=1e-12, rtol=0)


def test_vae_dtype_upcasts_only_fp16_with_force_upcast():
    pipe = _fake()
    for dtype, want in ((torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)):
        pipe.dtype = dtype
        assert vae_dtype(pipe) == want
    pipe = _fake(force_upcast=False)
    pipe.dtype = torch.float16
    assert vae_dtype(pipe) == torch.float16


def test_decode_of_a_batch_equals_per_image_decodes(tiny_sd):
    pipe = _own_vae(tiny_sd)
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = decode(pipe, latents, batch_size=4)
    assert tuple(whole.shape) == (5, 16, 16, 3) and whole.dtype == torch.float32 and whole.device.type == "cpu"
    assert 0.0 <= float(whole.min()) and float(whole.max()) <= 1.0
    singles = torch.cat([decode(pipe, latents[i:i + 1], batch_size=1) for i in range(5)])
    torch.testing.assert_close(whole, singles, atol=1e-5, rtol=0)
    with torch.no_grad():  # and it is the diffusers VAE decode of the unscaled latents
        ref = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(whole, (ref * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), atol=1e-5, rtol=0)


def _record_decoder_inputs(vae) -> list[tuple[int, ...]]:
    seen: list[tuple[int, ...]] = []
    vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    return seen


def test_decode_slices_by_batch_size_and_pixel_budget(tiny_sd, monkeypatch):
    pipe = _own_vae(tiny_sd)
    seen = _record_decoder_inputs(pipe.vae)
    latents = torch.randn(7, 4, 8, 8)
    decode(pipe, latents, batch_size=3)
    assert [s[0] for s in seen] == [3, 3, 1]
    seen.clear()
    monkeypatch.setattr(vae_mod, "MAX_PIXELS_PER_CALL", 2 * 16 * 16)  # two 16x16 images per call at most
    decode(pipe, latents, batch_size=4)
    assert [s[0] for s in seen] == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="batch_size=0"):
        decode(pipe, latents, batch_size=0)


def test_decode_tiles_above_the_vae_sample_size(tiny_sd):
    pipe = _own_vae(tiny_sd)
    tile = pipe.vae.tile_latent_min_size  # the VAE's sample_size (32 px) in latent cells
    seen = _record_decoder_inputs(pipe.vae)
    decode(pipe, torch.randn(1, 4, tile, tile))
    assert seen[-1][-2:] == (tile, tile)  # at the native size: one untiled call
    seen.clear()
    images = decode(pipe, torch.randn(1, 4, 2 * tile, 2 * tile))
    assert tuple(images.shape) == (1, 4 * tile, 4 * tile, 3)
    assert len(seen) > 1 and all(s[-1] <= tile and s[-2] <= tile for s in seen)
    assert pipe.vae.use_tiling is False  # switched off again after the call


def test_fp16_pipeline_decodes_in_a_float32_vae(tiny_sd):
    pipe = _own_vae(tiny_sd, dtype=torch.float16)
    ref = decode(_own_vae(tiny_sd), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)))
    pipe.vae.to(torch.float16)  # as a pipeline wrapped from an fp16 diffusers pipe would hold it
    seen: list[torch.dtype] = []
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).half()
    images = decode(pipe, latents)
    assert seen == [torch.float32] and pipe.vae.dtype == torch.float32
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, ref, atol=2e-3, rtol=0)  # only the fp16 rounding of the latents differs


def test_pipeline_to_fp16_keeps_the_vae_float32_so_decode_costs_no_cast(tiny_sd, monkeypatch):
    pipe = _own_vae(tiny_sd)
    pipe.unet, pipe.text_encoder = copy.deepcopy(tiny_sd.unet), copy.deepcopy(tiny_sd.text_encoder)
    pipe.to(dtype=torch.float16)
    assert pipe.vae.dtype == torch.float32 and vae_dtype(pipe) == torch.float32
    calls = []
    real_to = type(pipe.vae).to
    monkeypatch.setattr(type(pipe.vae), "to", lambda self, *a, **k: calls.append(k) or real_to(self, *a, **k))
    decode(pipe, torch.randn(1, 4, 8, 8))
    assert calls == []  # the VAE is not cast per call


def test_encode_moments_batches_and_matches_the_vae(tiny_sd):
    pipe = _own_vae(tiny_sd)
    pixels = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mean, std = encode_moments(pipe, pixels.half(), batch_size=2)  # any dtype in
    assert mean.dtype == std.dtype == torch.float32 and mean.device == pipe.device
    assert tuple(mean.shape) == tuple(std.shape) == (5, 4, 8, 8)
    with torch.no_grad():
        dist = pipe.vae.encode(pixels.half().float()).latent_dist
    torch.testing.assert_close(mean, dist.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(std, dist.std, atol=1e-5, rtol=0)
    seen: list[int] = []
    pipe.vae.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    encode_moments(pipe, pixels, batch_size=2)
    assert seen == [2, 2, 1]
    with pytest.raises(ValueError, match=r"pixels has shape \(5, 16, 16\)"):
        encode_moments(pipe, pixels[:, 0])


def test_a_float32_vae_in_a_bf16_pipeline_is_not_rounded_down(tiny_sd):
    pipe = _own_vae(tiny_sd, dtype=torch.bfloat16)
    assert vae_dtype(pipe) == torch.bfloat16
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    images = decode(pipe, latents.bfloat16())
    assert pipe.vae.dtype == torch.float32 and images.dtype == torch.float32
    torch.testing.assert_close(images, decode(_own_vae(tiny_sd), latents.bfloat16().float()), atol=0, rtol=0)


def test_decode_out_of_memory_retries_in_half_size_tiles(tiny_sd, caplog):
    """A card with memory for half-size tiles only: the untiled decode of a native-size image runs out of memory, the
    call is retried in tiles of half the VAE's native size, and the VAE's tile settings are restored afterwards."""
    pipe = _own_vae(tiny_sd)
    vae = pipe.vae
    tile = vae.tile_latent_min_size
    seen: list[tuple[int, ...]] = []

    def small_card(module, args):
        seen.append(tuple(args[0].shape))
        if args[0].shape[-1] > tile // 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = vae.decoder.register_forward_pre_hook(small_card)
    latents = torch.randn(2, 4, tile, tile, generator=torch.Generator().manual_seed(3))
    with caplog.at_level("WARNING", logger="redifine_core.vae"):
        images = decode(pipe, latents, batch_size=2)
    assert tuple(images.shape) == (2, 2 * tile, 2 * tile, 3)
    assert seen[0][-1] == tile and len(seen) > 2 and all(s[-1] <= tile // 2 for s in seen[1:])
    assert "ran out of memory" in caplog.text
    assert vae.tile_latent_min_size == tile and vae.tile_sample_min_size == 2 * tile and vae.use_tiling is False
    handle.remove()
    with torch.no_grad(), vae_mod._half_tiles(vae):  # the retry is the half-tile decode itself
        ref = vae.decode(latents / vae.config.scaling_factor).sample
    torch.testing.assert_close(images, (ref * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), atol=1e-5, rtol=0)
    assert vae.tile_latent_min_size == tile and vae.use_tiling is False
