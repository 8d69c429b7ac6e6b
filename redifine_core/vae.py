"""The VAE of a pipeline: its compute dtype, latent scaling, and encode/decode in bounded memory.

Every VAE use in the core goes through here, so three things hold everywhere:

- **Precision.** The VAE computes in :func:`vae_dtype`: float32 when its config sets ``force_upcast`` and the pipeline
  is float16 (the SDXL VAE overflows to NaN/inf in fp16; diffusers' pipelines upcast for the same reason), otherwise
  the pipeline's dtype. ``Pipeline.to`` puts the VAE in that dtype, so an upcast VAE stays float32 permanently and no
  call pays a per-call weight copy. Encode and decode compute in the VAE's own dtype; an fp16 VAE found where float32
  is required (a pipeline wrapped from outside) is upcast once, in place.
- **Scaling.** :func:`scale_latents` maps the VAE's raw latent space to the UNet's (``latents_mean``/``latents_std``
  when the config has both, else ``shift_factor`` and ``scaling_factor``, as diffusers' pipelines do) and
  :func:`unscale_latents` is its exact inverse.
- **Memory.** Encode and decode never see the whole set: each VAE call gets at most ``batch_size`` images and at most
  ``MAX_PIXELS_PER_CALL`` output pixels (one 1024x1024 image: decoding four SDXL images at once in the float32 VAE
  runs out of memory on 24 GB cards; four 512-px SD1.5 images still go in one call). Images larger than the VAE's own
  tile size (``vae.config.sample_size``: 512 for SD1.x, 768 for SD2.x, 1024 for SDXL, i.e. its native resolution)
  are tiled with diffusers' public AutoencoderKL tiling (``enable_tiling``), which bounds memory by the tile size. At
  or below the native resolution nothing is tiled, so outputs there are exactly the untiled VAE's (tiles blend at
  their seams and change pixels slightly; diffusers' pipelines do not tile by default either). Measured on CPU with
  the full-size SD1.5 VAE in float32, 8 latents decoded to 256 px: RSS grows 1.76 GB for the whole batch in one call,
  0.87 GB at 4 images per call, 0.38 GB at 1; activation memory grows with the pixels per call.
- **Out of GPU memory.** A decode call that runs out of memory is retried once in tiles of half the VAE's native size
  (:func:`_half_tiles`; diffusers' tiling with its tile size lowered), with a warning. On an H200 one 1024 px SDXL
  image in the float32 VAE took 5.2 GB above the resident weights (docs/benchmarks.md), which is what pushes an SDXL
  chain past a 12 GB card; 512 px tiles need about a quarter of that. Outputs that fit stay exactly untiled.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

import torch

logger = logging.getLogger(__name__)

# at most this many output pixels per VAE call (one 1024x1024 image); see the module docstring
MAX_PIXELS_PER_CALL = 1024 * 1024


def vae_dtype(pipeline: Any) -> torch.dtype:
    """The dtype the VAE computes in: float32 for a ``force_upcast`` VAE in a float16 pipeline, else the pipeline's."""
    if pipeline.dtype == torch.float16 and bool(getattr(pipeline.vae.config, "force_upcast", False)):
        return torch.float32
    return pipeline.dtype


def _ready_vae(pipeline: Any) -> Any:
    """The pipeline's VAE, upcast once, in place, if it is float16 where :func:`vae_dtype` asks for float32.

    A VAE in any other dtype is used as it is (inputs are cast to it): a VAE someone keeps in float32 under a bf16
    pipeline is never rounded down behind their back.
    """
    vae = pipeline.vae
    if vae.dtype == torch.float16 and vae_dtype(pipeline) == torch.float32:
        vae.to(dtype=torch.float32)
    return vae


def _stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``latents_mean``/``latents_std`` as [1, C, 1, 1] tensors like ``like``, or None when the config has not both."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    view = (1, -1) + (1,) * (like.ndim - 2)
    return (torch.tensor(mean, device=like.device, dtype=like.dtype).view(view),
            torch.tensor(std, device=like.device, dtype=like.dtype).view(view))


def scale_latents(pipeline: Any, raw: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the UNet's latent space (see the module docstring)."""
    config = pipeline.vae.config
    stats = _stats(pipeline.vae, raw)
    if stats is not None:
        return (raw - stats[0]) * config.scaling_factor / stats[1]
    shift = getattr(config, "shift_factor", None)
    return (raw - shift if shift else raw) * config.scaling_factor


def unscale_latents(pipeline: Any, latents: torch.Tensor) -> torch.Tensor:
    """The UNet's latent space -> raw VAE latents: the exact inverse of :func:`scale_latents`."""
    config = pipeline.vae.config
    stats = _stats(pipeline.vae, latents)
    if stats is not None:
        return latents * stats[1] / config.scaling_factor + stats[0]
    shift = getattr(config, "shift_factor", None)
    latents = latents / config.scaling_factor
    return latents + shift if shift else latents


def _per_call(batch_size: int, height: int, width: int) -> int:
    """Images per VAE call: at most ``batch_size`` and at most ``MAX_PIXELS_PER_CALL`` pixels (at least one)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    return max(1, min(batch_size, MAX_PIXELS_PER_CALL // max(1, height * width)))


@contextmanager
def _tiling(vae: Any) -> Iterator[None]:
    """diffusers' tiling switched on for the call (it only tiles inputs above ``vae.config.sample_size``)."""
    was = bool(getattr(vae, "use_tiling", False))
    if not hasattr(vae, "enable_tiling"):
        yield
        return
    vae.enable_tiling()
    try:
        yield
    finally:
        if not was:
            vae.disable_tiling()


@contextmanager
def _half_tiles(vae: Any) -> Iterator[None]:
    """:func:`_tiling` with tiles of half the VAE's native size (AutoencoderKL's tile attributes), for the call."""
    names = ("tile_sample_min_size", "tile_latent_min_size")
    if not all(hasattr(vae, n) for n in names):
        raise RuntimeError(f"{type(vae).__name__} has no tile size to lower")
    saved = {n: getattr(vae, n) for n in names}
    with _tiling(vae):
        for n, v in saved.items():
            setattr(vae, n, max(1, v // 2))
        try:
            yield
        finally:
            for n, v in saved.items():
                setattr(vae, n, v)


def _decode_call(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """One VAE decode; on running out of memory, once more in half-size tiles (see the module docstring)."""
    try:
        return vae.decode(z, return_dict=False)[0]
    except torch.OutOfMemoryError:
        if z.is_cuda:
            torch.cuda.empty_cache()
        logger.warning("the VAE ran out of memory decoding %d image(s) of %dx%d latents; decoding again in tiles of "
                       "half its native size (seams are blended)", z.shape[0], z.shape[-2], z.shape[-1])
        with _half_tiles(vae):
            return vae.decode(z, return_dict=False)[0]


def cast_inputs_to_weights(vae: Any) -> Any:
    """Let code outside the core (diffusers' pipelines) call an upcast VAE with half-precision tensors; returns ``vae``.

    diffusers' SD pipeline hands its float16 latents straight to ``vae.decode``, which fails on a VAE kept in float32
    (see :func:`vae_dtype`). Forward pre-hooks on the encoder, ``post_quant_conv`` and decoder cast the incoming tensor
    to the weights' dtype. Registered once per VAE; a no-op for the core's own calls, which already cast.
    """
    if getattr(vae, "_redifine_casts_inputs", False):
        return vae

    def cast(module: Any, args: tuple) -> tuple:
        weight = next(module.parameters(), None)
        if weight is None or not args or not isinstance(args[0], torch.Tensor) or args[0].dtype == weight.dtype:
            return args
        return (args[0].to(weight.dtype),) + tuple(args[1:])

    for name in ("encoder", "post_quant_conv", "decoder"):
        module = getattr(vae, name, None)
        if isinstance(module, torch.nn.Module):
            module.register_forward_pre_hook(cast)
    vae._redifine_casts_inputs = True
    return vae


@torch.no_grad()
def encode_moments(pipeline: Any, pixels: torch.Tensor, batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE latent distribution of ``pixels`` [N, 3, H, W] in [-1, 1]: ``(mean, std)`` in the raw (unscaled) space.

    Both float32 on ``pipeline.device``. Pixels may be on any device and in any dtype; they move to the VAE one slice
    (see the module docstring) at a time.
    """
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"pixels has shape {shape}; expected a tensor [N, 3, H, W] in [-1, 1]")
    vae = _ready_vae(pipeline)
    step = _per_call(batch_size, pixels.shape[-2], pixels.shape[-1])
    means, stds = [], []
    with _tiling(vae):
        for start in range(0, pixels.shape[0], step):
            x = pixels[start:start + step].to(device=vae.device, dtype=vae.dtype)
            dist = vae.encode(x).latent_dist
            means.append(dist.mean.to(device=pipeline.device, dtype=torch.float32))
            stds.append(dist.std.to(device=pipeline.device, dtype=torch.float32))
    if not means:
        empty = torch.empty(0, device=pipeline.device)
        return empty, empty
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode(pipeline: Any, latents: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Latents in the UNet's space [N, C, h, w] -> float32 CPU images [N, H, W, 3] in [0, 1], decoded in slices."""
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents has shape {shape}; expected a tensor [N, C, h, w]")
    vae = _ready_vae(pipeline)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    step = _per_call(batch_size, latents.shape[-2] * factor, latents.shape[-1] * factor)
    images = []
    with _tiling(vae):
        for start in range(0, latents.shape[0], step):
            z = unscale_latents(pipeline, latents[start:start + step].to(device=vae.device, dtype=vae.dtype))
            image = _decode_call(vae, z)
            images.append((image * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float())
    if not images:
        return torch.empty(0, latents.shape[-2] * factor, latents.shape[-1] * factor, 3)
    return torch.cat(images)
