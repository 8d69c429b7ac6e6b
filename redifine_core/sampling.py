"""The denoising loop: per-step guidance scale, one batched UNet forward for [uncond, cond], no uncond pass where w == 1.

The API:

    SAMPLERS: tuple[str, ...]  # at least "ddim", "euler", "euler_a", "dpmpp_2m", "pndm"

    def generate(pipeline: Pipeline, prompts: str | Sequence[str], schedule: str | float | Schedule = 7.5,
                 steps: int = 20, seeds: int | Sequence[int] = 0, *, negative_prompt: str | Sequence[str] = "",
                 sampler: str = "ddim", width: int | None = None, height: int | None = None,
                 batch_size: int = 8, lora: "LoraWeights | None" = None, lora_scale: float = 1.0,
                 iteration: int = 0, progress: ProgressCallback | None = None,
                 cancel: CancelFlag | None = None, clip_skip: int | None = None) -> torch.Tensor
        # returns float32 CPU tensor [N, H, W, 3] in [0, 1] (the ComfyUI IMAGE layout, = diffusers output_type="np").
        # seeds: an int s means seeds s, s+1, ..., s+N-1; image i depends only on (model, prompt i, seed i).

Also public: ``generate_batches(...)`` (the same arguments as ``generate``; yields ``(indices, images [b, H, W, 3])``
per batch, so callers can stream images to disk), ``encode_prompts(pipeline, prompts, clip_skip=None) ->
(prompt_embeds, pooled_or_None)`` (:mod:`redifine_core.prompt_encoding`, as training encodes),
``decode_latents(pipeline, latents) -> [N, H, W, 3]`` (= ``vae.decode``: sliced, tiled above the VAE's native size,
float32 for a ``force_upcast`` VAE in fp16), ``make_scheduler(pipeline, sampler)``,
``size_multiple(pipeline)``, ``guidance_values(schedule, n, iteration)``.

The loop follows diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` step for step, so at a constant
guidance scale it reproduces them (same seeds, same scheduler) to float rounding. What it adds: the guidance scale is
looked up per model evaluation from a schedule, and on evaluations where it is exactly 1 the unconditional half of the
batch is not computed at all. The schedule is evaluated at ``len(scheduler.timesteps)`` points (``steps`` for most
samplers; ``steps + 1`` for "pndm", whose PLMS warm-up evaluates the model once more).
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from .models import Pipeline
from .prompt_encoding import check_clip_skip, text_conditioning
from .progress import CancelFlag, ProgressCallback, ProgressEvent, check_cancel, report
from .vae import decode as vae_decode

# name -> (diffusers scheduler class, settings that define the sampler)
_SAMPLER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
    ),
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=True)),
}
SAMPLERS: tuple[str, ...] = ("default",) + tuple(_SAMPLER_CLASSES)  # "default" = the pipeline's own scheduler class

ScheduleLike = Union[str, float, int, Any]


# --------------------------------------------------------------------------------------------- validation helpers


def size_multiple(pipeline: Pipeline) -> int:
    """Width and height must be multiples of this: the VAE factor times the UNet's down-sampling factor."""
    return pipeline.vae_scale_factor * pipeline.unet_scale_factor


def _as_list(value: Union[str, Sequence[str]], name: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
    return items


def _seed_list(seeds: Union[int, Sequence[int]], n: int) -> list[int]:
    if isinstance(seeds, bool):
        raise ValueError(f"seeds={seeds!r} must be an int or a list of ints")
    if isinstance(seeds, int):
        out = [seeds + i for i in range(n)]
    elif isinstance(seeds, (list, tuple)) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        out = list(seeds)
        if len(out) != n:
            raise ValueError(f"seeds has {len(out)} entries but there are {n} prompts; give one seed per prompt")
    else:
        raise ValueError(f"seeds={seeds!r} must be an int or a list of ints")
    for s in out:
        if not 0 <= s < 2**63:
            raise ValueError(f"seed {s} is out of range; allowed 0 <= seed < 2**63")
    return out


def _check_size(pipeline: Pipeline, width: Optional[int], height: Optional[int]) -> tuple[int, int]:
    multiple = size_multiple(pipeline)
    out = []
    for name, value in (("width", width), ("height", height)):
        value = pipeline.default_size if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
            raise ValueError(
                f"{name}={value!r} must be a positive multiple of {multiple} for this model "
                f"(VAE factor {pipeline.vae_scale_factor} x UNet down-sampling {pipeline.unet_scale_factor})"
            )
        out.append(value)
    return out[0], out[1]


def guidance_values(schedule: ScheduleLike, n: int, iteration: int = 0) -> list[float]:
    """The guidance scale at each of ``n`` model evaluations, at chain iteration ``iteration``.

    ``schedule`` is a number (constant w), a schedule spec string (parsed by ``guidance.parse_schedule``), or an
    object with ``at_iteration(i)`` and ``values(n)`` (a ``guidance.Schedule``).
    """
    if not (hasattr(schedule, "at_iteration") and hasattr(schedule, "values")):
        from .guidance import parse_schedule

        schedule = parse_schedule(schedule)
    values = [float(v) for v in schedule.at_iteration(iteration).values(n)]
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise ValueError(f"schedule {schedule!r} gave {values!r}; expected {n} finite guidance scales")
    return values


# -------------------------------------------------------------------------------------------------------- sampler


def make_scheduler(pipeline: Pipeline, sampler: str) -> Any:
    """A fresh scheduler of kind ``sampler`` with the pipeline's noise schedule, spacing and prediction type.

    Keys are copied from the pipeline's scheduler config and ``timestep_spacing`` / ``prediction_type`` are always
    set explicitly (a ``from_config`` across classes would otherwise silently fall back to the new class's defaults).
    """
    import diffusers

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    base = pipeline.scheduler
    config = {k: v for k, v in dict(base.config).items() if not k.startswith("_")}
    if sampler == "default":
        cls, settings = type(base), {}
    else:
        class_name, settings = _SAMPLER_CLASSES[sampler]
        cls = getattr(diffusers, class_name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    kwargs = {k: v for k, v in config.items() if k in accepted}
    kwargs.update(
        timestep_spacing=config.get("timestep_spacing", "leading"),
        prediction_type=config.get("prediction_type", "epsilon"),
    )
    if "clip_sample" in accepted and "clip_sample" not in config:
        kwargs["clip_sample"] = False  # latents are not in [-1, 1]; DDIM/DDPM would clip them by default
    kwargs.update(settings)
    return cls.from_config({k: v for k, v in kwargs.items() if k in accepted})


# ------------------------------------------------------------------------------------------------- text encoding


def encode_prompts(pipeline: Pipeline, prompts: Union[str, Sequence[str]],
                   clip_skip: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Encode prompts as the UNet's cross-attention input; returns ``(prompt_embeds, pooled_or_None)``.

    :func:`text_conditioning` without gradients, on ``pipeline.device`` in ``pipeline.dtype``. SD1.x/SD2.x/toy:
    ``prompt_embeds`` [N, L, D] and None. SDXL: [N, 77, 768 + 1280] and text_encoder_2's pooled, projected embedding
    [N, 1280] (the UNet's ``text_embeds``). The text is encoded literally ("" is encoded, never zeroed).
    """
    prompts = _as_list(prompts, "prompts")
    device, dtype = pipeline.device, pipeline.dtype
    with torch.no_grad():
        embeds, pooled = text_conditioning(pipeline, prompts, pipeline.is_sdxl, clip_skip, device)
    return embeds.to(device=device, dtype=dtype), (None if pooled is None else pooled.to(device=device, dtype=dtype))


@dataclass
class _Conditioning:
    """What the UNet is conditioned on for a batch: cross-attention states and, for SDXL, the added embeddings."""

    embeds: torch.Tensor
    text_embeds: Optional[torch.Tensor] = None  # SDXL pooled embedding
    time_ids: Optional[torch.Tensor] = None  # SDXL (original size, crop, target size)

    def unet_kwargs(self) -> dict[str, Any]:
        added = None if self.text_embeds is None else {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return dict(encoder_hidden_states=self.embeds, added_cond_kwargs=added)

    @staticmethod
    def cat(first: "_Conditioning", second: "_Conditioning") -> "_Conditioning":
        join = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        return _Conditioning(join(first.embeds, second.embeds), join(first.text_embeds, second.text_embeds),
                             join(first.time_ids, second.time_ids))


def _encode_unique(pipeline: Pipeline, texts: list[str],
                   clip_skip: Optional[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """encode_prompts on the distinct texts only, expanded back to one row per text."""
    unique = list(dict.fromkeys(texts))
    embeds, pooled = encode_prompts(pipeline, unique, clip_skip)
    index = torch.tensor([unique.index(t) for t in texts], device=embeds.device)
    return embeds[index], (None if pooled is None else pooled[index])


def _conditioning(pipeline: Pipeline, texts: list[str], width: int, height: int, zero_empty: bool,
                  clip_skip: Optional[int] = None) -> _Conditioning:
    """Encode ``texts``; with ``zero_empty`` (SDXL's force_zeros_for_empty_prompt) rows for "" become zeros."""
    embeds, pooled = _encode_unique(pipeline, texts, clip_skip)
    if zero_empty:
        keep = torch.tensor([t != "" for t in texts], device=embeds.device, dtype=embeds.dtype)
        embeds = embeds * keep[:, None, None]
        pooled = pooled * keep[:, None] if pooled is not None else None
    if not pipeline.is_sdxl:
        return _Conditioning(embeds)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype, device=embeds.device)
    return _Conditioning(embeds, pooled, time_ids.repeat(len(texts), 1))


# ------------------------------------------------------------------------------------------------- denoising loop


def _initial_latents(pipeline: Pipeline, scheduler: Any, generators: list[torch.Generator], width: int,
                     height: int) -> torch.Tensor:
    """One CPU-generated noise sample per image from its own generator, scaled by the scheduler's initial sigma."""
    shape = (1, pipeline.unet.config.in_channels, height // pipeline.vae_scale_factor,
             width // pipeline.vae_scale_factor)
    noise = [torch.randn(shape, generator=g, device="cpu", dtype=pipeline.dtype) for g in generators]
    return torch.cat(noise).to(pipeline.device) * scheduler.init_noise_sigma


def _predict_noise(pipeline: Pipeline, scheduler: Any, latents: torch.Tensor, t: torch.Tensor, w: float,
                   cond: _Conditioning, both: Optional[_Conditioning]) -> torch.Tensor:
    """Guided noise prediction: one UNet forward on [uncond, cond], or on cond alone where w == 1."""
    if w == 1.0:
        model_input = scheduler.scale_model_input(latents, t)
        return pipeline.unet(model_input, t, **cond.unet_kwargs(), return_dict=False)[0]
    model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
    noise_uncond, noise_cond = pipeline.unet(model_input, t, **both.unet_kwargs(), return_dict=False)[0].chunk(2)
    return noise_uncond + w * (noise_cond - noise_uncond)


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    """The per-image generators for schedulers that draw noise (ancestral, DDPM), eta=0 for DDIM."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generators
    return kwargs


def _denoise(pipeline: Pipeline, scheduler: Any, latents: torch.Tensor, scales: list[float], cond: _Conditioning,
             both: Optional[_Conditioning], generators: list[torch.Generator], cancel: Optional[CancelFlag],
             on_step: Any) -> torch.Tensor:
    """Run the scheduler's timesteps over ``latents``: check ``cancel``, guided prediction, step, ``on_step(i)``."""
    step_kwargs = _step_kwargs(scheduler, generators)
    for i, t in enumerate(scheduler.timesteps):
        check_cancel(cancel)
        noise = _predict_noise(pipeline, scheduler, latents, t, scales[i], cond, both)
        latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        on_step(i)
    return latents


def decode_latents(pipeline: Pipeline, latents: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """VAE-decode latents to a float32 CPU tensor [N, H, W, 3] in [0, 1]: :func:`redifine_core.vae.decode`."""
    return vae_decode(pipeline, latents, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------------- entry


def generate_batches(
    pipeline: Pipeline,
    prompts: Union[str, Sequence[str]],
    schedule: ScheduleLike = 7.5,
    steps: int = 20,
    seeds: Union[int, Sequence[int]] = 0,
    *,
    negative_prompt: Union[str, Sequence[str]] = "",
    sampler: str = "ddim",
    width: Optional[int] = None,
    height: Optional[int] = None,
    batch_size: int = 8,
    lora: Any = None,
    lora_scale: float = 1.0,
    iteration: int = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFlag] = None,
    clip_skip: Optional[int] = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """:func:`generate`, streamed: yields ``(indices into prompts, float32 CPU images [b, H, W, 3] in [0, 1])`` per batch.

    Same arguments and same images as :func:`generate`. Every argument is checked when this is called, before any
    model work; the model runs as the iterator is consumed. Only the batch being yielded is held, so memory does not
    grow with the number of prompts. ``lora`` stays applied until the iterator is exhausted or closed (use it in a
    ``for`` loop or ``contextlib.closing``).
    """
    prompt_list = _as_list(prompts, "prompts")
    n = len(prompt_list)
    if n == 0:
        raise ValueError("prompts is empty; give at least one prompt")
    negatives = _as_list(negative_prompt, "negative_prompt")
    if isinstance(negative_prompt, str):
        negatives = negatives * n
    elif len(negatives) != n:
        raise ValueError(f"negative_prompt has {len(negatives)} entries but there are {n} prompts")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an int >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration={iteration!r} must be an int >= 0")
    if not isinstance(lora_scale, (int, float)) or not math.isfinite(lora_scale):
        raise ValueError(f"lora_scale={lora_scale!r} must be a finite number")
    seed_list = _seed_list(seeds, n)
    check_clip_skip(clip_skip, pipeline.is_sdxl, pipeline.text_encoder)
    width, height = _check_size(pipeline, width, height)
    first_scheduler = make_scheduler(pipeline, sampler)  # validates the sampler name; used by the first batch
    first_scheduler.set_timesteps(steps, device=pipeline.device)
    scales = guidance_values(schedule, len(first_scheduler.timesteps), iteration)
    if lora is not None:
        from .lora import lora_applied

        lora_context = lora_applied(pipeline, lora, lora_scale)
    else:
        lora_context = nullcontext()
    job = _Job(pipeline, prompt_list, negatives, seed_list, steps, sampler, width, height, batch_size, scales,
               progress, cancel, clip_skip)
    return _run_batches(job, first_scheduler, lora_context)


@dataclass
class _Job:
    """The checked arguments of one generate call."""

    pipeline: Pipeline
    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    steps: int
    sampler: str
    width: int
    height: int
    batch_size: int
    scales: list[float]
    progress: Optional[ProgressCallback]
    cancel: Optional[CancelFlag]
    clip_skip: Optional[int] = None


@torch.no_grad()
def _run_batches(job: _Job, first_scheduler: Any, lora_context: Any) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The denoising loop over batches of ``job``; yields each batch's indices and decoded images."""
    pipeline, n, scales = job.pipeline, len(job.prompts), job.scales
    chunks = [list(range(s, min(n, s + job.batch_size))) for s in range(0, n, job.batch_size)]
    total = len(scales) * len(chunks)
    done, started = 0, time.monotonic()
    try:
        with lora_context:
            for k, chunk in enumerate(chunks):
                scheduler = first_scheduler if k == 0 else make_scheduler(pipeline, job.sampler)
                if k > 0:
                    scheduler.set_timesteps(job.steps, device=pipeline.device)
                if hasattr(scheduler, "set_begin_index"):
                    scheduler.set_begin_index(0)
                cond = _conditioning(pipeline, [job.prompts[i] for i in chunk], job.width, job.height, zero_empty=False,
                                    clip_skip=job.clip_skip)
                both = None
                if any(w != 1.0 for w in scales):
                    uncond = _conditioning(pipeline, [job.negatives[i] for i in chunk], job.width, job.height,
                                           pipeline.force_zeros_for_empty_prompt, job.clip_skip)
                    both = _Conditioning.cat(uncond, cond)
                generators = [torch.Generator("cpu").manual_seed(job.seeds[i]) for i in chunk]
                latents = _initial_latents(pipeline, scheduler, generators, job.width, job.height)

                def on_step(i: int, chunk: list[int] = chunk) -> None:
                    nonlocal done
                    done += 1
                    elapsed = time.monotonic() - started
                    report(job.progress, ProgressEvent(
                        phase="sample", step=done, total=total, eta_s=elapsed / done * (total - done),
                        message=f"images {chunk[0] + 1}-{chunk[-1] + 1} of {n}, step {i + 1}/{len(scales)}",
                        extra={"guidance_scale": scales[i]},
                    ))

                latents = _denoise(pipeline, scheduler, latents, scales, cond, both, generators, job.cancel, on_step)
                del cond, both
                images = decode_latents(pipeline, latents)
                del latents
                yield chunk, images
    finally:
        if pipeline.device.type == "cuda":
            torch.cuda.empty_cache()  # activations of the last batch; the next phase (training, metrics) needs the room


def generate(
    pipeline: Pipeline,
    prompts: Union[str, Sequence[str]],
    schedule: ScheduleLike = 7.5,
    steps: int = 20,
    seeds: Union[int, Sequence[int]] = 0,
    *,
    negative_prompt: Union[str, Sequence[str]] = "",
    sampler: str = "ddim",
    width: Optional[int] = None,
    height: Optional[int] = None,
    batch_size: int = 8,
    lora: Any = None,
    lora_scale: float = 1.0,
    iteration: int = 0,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFlag] = None,
    clip_skip: Optional[int] = None,
) -> torch.Tensor:
    """Text-to-image with a per-step guidance schedule; float32 CPU [N, H, W, 3] in [0, 1].

    Image i uses ``torch.Generator("cpu").manual_seed(seed_i)`` for its initial noise and any sampler noise, so it
    does not depend on ``batch_size`` or on the other prompts. ``negative_prompt`` is one string for all prompts or
    one per prompt. ``lora`` (a ``lora.LoraWeights``) is applied at ``lora_scale`` for the call and removed after.
    ``clip_skip`` picks the text encoder's layer as training does (:mod:`redifine_core.prompt_encoding`).
    One ``ProgressEvent(phase="sample")`` is sent per model evaluation; ``cancel`` is checked before each.
    The result is filled batch by batch from :func:`generate_batches` (no second copy of the set); to write images
    out without holding them all, use :func:`generate_batches` directly.
    """
    batches = generate_batches(
        pipeline, prompts, schedule, steps, seeds, negative_prompt=negative_prompt, sampler=sampler, width=width,
        height=height, batch_size=batch_size, lora=lora, lora_scale=lora_scale, iteration=iteration,
        progress=progress, cancel=cancel, clip_skip=clip_skip,
    )
    n = len(_as_list(prompts, "prompts"))
    out: Optional[torch.Tensor] = None
    for chunk, images in batches:
        if out is None:
            out = torch.empty((n,) + tuple(images.shape[1:]), dtype=images.dtype)
        out[chunk[0]:chunk[-1] + 1] = images
    if out is None:  # unreachable: generate_batches refuses an empty prompt list
        raise ValueError("prompts is empty; give at least one prompt")
    return out
