"""Condition-drop LoRA finetuning with peft.

CONTRACT (filled in by issue 2):

    @dataclass(frozen=True)
    class TrainConfig:
        steps: int = 200; learning_rate: float = 1e-4; rank: int = 4; alpha: float = 4.0
        cond_drop: float = 0.0; batch_size: int = 4; grad_accum: int = 1; warmup_steps: int = 0
        resolution: int | None = None (None = pipeline.default_size); center_crop: bool = True; random_flip: bool = False
        target: tuple[str, ...] = ("attention",)   # also "feedforward", "resnet", "text_encoder"
        mixed_precision: str = "no" | "fp16" | "bf16"; gradient_checkpointing: bool = False
        noise_offset: float = 0.0; seed: int = 0; weight_decay: float = 1e-2
        # __post_init__ raises ValueError naming field, value and what is allowed

    @dataclass
    class TrainResult:
        lora: LoraWeights
        losses: list[float]          # one per optimizer step
        seconds: float

    def finetune_lora(pipeline, dataset: CaptionedImages, config: TrainConfig, progress=None, cancel=None,
                      init_lora: LoraWeights | None = None) -> TrainResult
        # init_lora: continue training an existing LoRA (the chain's "continue" protocol)

How a step works (:class:`LoraTrainer`, usable on its own, e.g. by ``bench/train_step.py``)
--------------------------------------------------------------------------------------------
* Images are resized (shorter side = resolution, Lanczos) and center-cropped (``center_crop=True``) or randomly
  cropped per step. With center crop the VAE runs once per run: the latent distribution's mean and std are cached
  (both orientations when ``random_flip``) and a fresh latent ``mean + std * eps`` is sampled every step, exactly what
  ``latent_dist.sample()`` would give. Random crop, or ``cache_latents=False``, encodes the batch every step with the
  same formula and the same random draws.
* Text embeddings of every distinct caption and of the empty prompt ``""`` are cached once per run, unless the text
  encoder is trained ("text_encoder" in ``target``): then the batch's captions are encoded every step, with grad.
* Condition drop: each sample's caption is replaced by ``""`` with probability ``cond_drop``. The drop mask comes
  from its own seeded generator, drawn once per micro-batch right after the sample indices (which come from another
  generator), so the pattern depends only on ``seed``, ``batch_size``, ``grad_accum`` and the step, never on
  caching, cropping, flipping or the text-encoder setting. :attr:`TrainResult.drop_masks` records it.
* Noise-prediction MSE against ``noise`` (epsilon) or ``scheduler.get_velocity`` (v-prediction) of a DDPM
  scheduler built from the pipeline's scheduler config; timesteps uniform over the training range; optional noise
  offset. AdamW, linear warm-up then constant learning rate (step k uses lr * min(1, (k+1)/warmup_steps)), gradient
  clipping at ``max_grad_norm`` (0 = off), gradient accumulation.
* Mixed precision is autocast on CUDA ("fp16" with a gradient scaler, or "bf16"); LoRA parameters stay float32.
  On CPU "fp16" is an error; "bf16" runs under CPU bf16 autocast (slow on most CPUs, but works).
* The adapter is removed in a ``finally`` whatever happens (success, error, cancel): the pipeline's modules,
  ``requires_grad`` flags and gradient-checkpointing setting are as before. Frozen weights that are inference tensors
  (a pipeline loaded inside ComfyUI's ``torch.inference_mode()``) are replaced in place by ordinary copies with the
  same values, since autograd cannot save inference tensors.
* Determinism: same seed and inputs give identical LoRA tensors on CPU (tested). All random draws come from CPU
  generators, so the sample order, drop pattern, noise and timesteps are the same on every device; on an H100 the
  fp16/bf16 runs were bit-identical run to run, while fp32 runs differed by up to ~1e-4 (non-deterministic CUDA
  kernels; ``torch.use_deterministic_algorithms(True)`` is the caller's switch for that).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .data import CaptionedImages
from .lora import (
    TARGET_GROUPS,
    TEXT_ENCODER_TARGETS,
    LoraWeights,
    add_lora_adapter,
    remove_lora_adapters,
    set_lora_state,
    te_from_canonical,
    te_to_canonical,
)
from .progress import CancelFlag, ProgressCallback, ProgressEvent, check_cancel, report

TARGETS: tuple[str, ...] = ("attention", "feedforward", "resnet", "text_encoder")
MIXED_PRECISION: tuple[str, ...] = ("no", "fp16", "bf16")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclass(frozen=True)
class TrainConfig:
    """LoRA finetuning settings; every field is checked in ``__post_init__``."""

    steps: int = 200
    learning_rate: float = 1e-4
    rank: int = 4
    alpha: float = 4.0
    cond_drop: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 0
    resolution: Optional[int] = None
    center_crop: bool = True
    random_flip: bool = False
    target: tuple = ("attention",)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    noise_offset: float = 0.0
    seed: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0 = no clipping
    cache_latents: bool = True  # False: encode images every step (random crop always does)

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} = {getattr(self, name)!r} is invalid: must be {allowed}")

        for name in ("steps", "rank", "batch_size", "grad_accum"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise bad(name, "an integer >= 1")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise bad("warmup_steps", "an integer >= 0")
        if not _is_int(self.seed) or not (0 <= self.seed < 2**63):
            raise bad("seed", "an integer in [0, 2**63)")
        for name in ("learning_rate", "alpha"):
            v = getattr(self, name)
            if not _is_num(v) or not math.isfinite(v) or v <= 0:
                raise bad(name, "a finite number > 0")
        if not _is_num(self.cond_drop) or not (0.0 <= self.cond_drop <= 1.0):
            raise bad("cond_drop", "a probability in [0, 1]")
        for name in ("noise_offset", "weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if not _is_num(v) or not math.isfinite(v) or v < 0:
                raise bad(name, "a finite number >= 0")
        if self.resolution is not None and (not _is_int(self.resolution) or self.resolution < 8 or self.resolution % 8):
            raise bad("resolution", "None (the model's default size) or a positive multiple of 8")
        for name in ("center_crop", "random_flip", "gradient_checkpointing", "cache_latents"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if self.mixed_precision not in MIXED_PRECISION:
            raise bad("mixed_precision", f"one of {MIXED_PRECISION}")
        target = (self.target,) if isinstance(self.target, str) else self.target
        try:
            target = tuple(target)
        except TypeError:
            raise bad("target", f"a tuple of names from {TARGETS}") from None
        unknown = [t for t in target if t not in TARGETS]
        if unknown or not target:
            raise ValueError(
                f"TrainConfig.target = {self.target!r} is invalid: unknown target(s) {unknown} ; must be a non-empty "
                f"tuple of names from {TARGETS}" if unknown else
                f"TrainConfig.target = {self.target!r} is invalid: must be a non-empty tuple of names from {TARGETS}"
            )
        if target == ("text_encoder",):
            raise ValueError(
                f"TrainConfig.target = {self.target!r} is invalid: the UNet must be trained too; add one of "
                f"{TARGETS[:3]}"
            )
        object.__setattr__(self, "target", tuple(dict.fromkeys(target)))

    @property
    def unet_target_modules(self) -> tuple[str, ...]:
        return tuple(m for t in self.target if t in TARGET_GROUPS for m in TARGET_GROUPS[t])

    @property
    def trains_text_encoder(self) -> bool:
        return "text_encoder" in self.target

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target"] = list(self.target)
        return d


@dataclass
class TrainResult:
    lora: LoraWeights
    losses: list  # one float per optimizer step
    seconds: float
    drop_masks: list = field(default_factory=list)  # per optimizer step: one bool per sample (True = caption dropped)
    sample_indices: list = field(default_factory=list)  # per optimizer step: the dataset index of every sample


# --------------------------------------------------------------------------------------------- pipeline accessors


def _vae_scale_factor(pipeline: Any) -> int:
    v = getattr(pipeline, "vae_scale_factor", None)
    return int(v) if v else 2 ** (len(pipeline.vae.config.block_out_channels) - 1)


def _default_size(pipeline: Any) -> int:
    v = getattr(pipeline, "default_size", None)
    if isinstance(v, int) and v > 0:
        return v
    return int(pipeline.unet.config.sample_size) * _vae_scale_factor(pipeline)


def _is_sdxl(pipeline: Any) -> bool:
    v = getattr(pipeline, "is_sdxl", None)
    if isinstance(v, bool):
        return v
    return getattr(pipeline, "text_encoder_2", None) is not None


def _device(pipeline: Any) -> torch.device:
    d = getattr(pipeline, "device", None)
    return torch.device(d) if d is not None else next(pipeline.unet.parameters()).device


def _force_zeros_for_empty_prompt(pipeline: Any) -> bool:
    own = getattr(pipeline, "__dict__", {})
    if "force_zeros_for_empty_prompt" in own:  # redifine_core.models.Pipeline
        return bool(own["force_zeros_for_empty_prompt"])
    cfg = getattr(pipeline, "config", None)  # a diffusers pipeline
    return bool(cfg.get("force_zeros_for_empty_prompt", False)) if isinstance(cfg, dict) else False


def _base_model_version(pipeline: Any) -> str:
    kind = getattr(pipeline, "kind", None) or ("sdxl" if _is_sdxl(pipeline) else "sd1")
    return {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "toy": "redifine_toy"}.get(kind, str(kind))


# ----------------------------------------------------------------------------------------------- image handling


def _resize_short_side(img, size: int):
    from PIL import Image

    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    return img.resize((nw, nh), Image.Resampling.LANCZOS) if (nw, nh) != (w, h) else img


def _to_pixels(img) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # [3, H, W] in [-1, 1]


def noisy_and_target(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDPM forward process and the regression target: (``add_noise``, noise or ``get_velocity``)."""
    acp = alphas_cumprod[t].view(-1, *([1] * (latents.ndim - 1)))
    sqrt_a, sqrt_1ma = acp.sqrt(), (1.0 - acp).sqrt()
    noisy = sqrt_a * latents + sqrt_1ma * noise
    if prediction_type == "epsilon":
        return noisy, noise
    return noisy, sqrt_a * noise - sqrt_1ma * latents


def _seeds(seed: int, n: int) -> list[int]:
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(n, dtype=np.uint64) % (2**63)]


def _replace_inference_tensors(model: torch.nn.Module) -> int:
    """Swap inference-mode parameters/buffers of ``model`` for ordinary copies (same values); return how many."""
    n = 0
    for mod in model.modules():
        for name, prm in list(mod._parameters.items()):
            if prm is not None and prm.is_inference():
                mod._parameters[name] = torch.nn.Parameter(prm.clone(), requires_grad=prm.requires_grad)
                n += 1
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_inference():
                mod._buffers[name] = buf.clone()
                n += 1
    return n


class LoraTrainer:
    """One LoRA finetuning run: set up with the adapter injected, call :meth:`step` per optimizer step, then
    :meth:`close` (or use as a context manager), which removes the adapter. Call inside grad mode."""

    def __init__(self, pipeline: Any, dataset: CaptionedImages, config: TrainConfig,
                 init_lora: Optional[LoraWeights] = None) -> None:
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not isinstance(dataset, CaptionedImages):
            raise ValueError(f"dataset must be a CaptionedImages, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError("dataset is empty: training needs at least one image")
        self.pipeline = pipeline
        self.dataset = dataset
        self.config = config
        self.device = _device(pipeline)
        self.sdxl = _is_sdxl(pipeline)
        mp = config.mixed_precision
        if mp == "fp16" and self.device.type != "cuda":
            raise ValueError(
                f"TrainConfig.mixed_precision = 'fp16' needs a CUDA device, but the pipeline is on {self.device}; "
                "use 'no' (or 'bf16') on CPU"
            )
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp)
        self.resolution = config.resolution or _default_size(pipeline)
        vsf = _vae_scale_factor(pipeline)
        if self.resolution % vsf:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the VAE scale factor {vsf}")
        if init_lora is not None:
            self._check_init_lora(init_lora)
        self.init_lora = init_lora
        self.latent_hw = self.resolution // vsf
        self.latent_channels = int(pipeline.unet.config.in_channels)
        self.random_crop = not config.center_crop
        self.cache_latents = config.cache_latents and not self.random_crop
        self.train_te = config.trains_text_encoder
        self.step_count = 0
        self.drop_masks: list[list[bool]] = []
        self.sample_indices: list[list[int]] = []
        self._closed = False
        self._state: dict[str, Any] = {}
        self._queue: list[int] = []

        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        pred = getattr(pipeline, "prediction_type", None) or pipeline.scheduler.config.get("prediction_type", "epsilon")
        if pred not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type {pred!r} is not supported for training (epsilon or v_prediction)")
        self.prediction_type = pred
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        vae_cfg = pipeline.vae.config
        self.latent_scale = float(vae_cfg.scaling_factor)
        shift = getattr(vae_cfg, "shift_factor", None)
        self.latent_shift = float(shift) if shift is not None else None

        s = _seeds(config.seed, 5)
        self.g_index = torch.Generator().manual_seed(s[0])
        self.g_drop = torch.Generator().manual_seed(s[1])
        self.g_aug = torch.Generator().manual_seed(s[2])
        self.g_noise = torch.Generator().manual_seed(s[3])
        self._init_seed = s[4]

        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------------ setup

    def _check_init_lora(self, lora: LoraWeights) -> None:
        c = self.config
        if lora.rank != c.rank:
            raise ValueError(f"init_lora has rank {lora.rank} but TrainConfig.rank = {c.rank}; they must match")
        if not math.isclose(lora.alpha, c.alpha, rel_tol=1e-6):
            raise ValueError(f"init_lora has alpha {lora.alpha} but TrainConfig.alpha = {c.alpha}; they must match")
        if bool(lora.text_encoder) != self.config.trains_text_encoder:
            raise ValueError(
                "init_lora " + ("has" if lora.text_encoder else "has no") + " text-encoder weights but TrainConfig.target "
                + ("does not include" if lora.text_encoder else "includes") + " 'text_encoder'"
            )

    def _text_parts(self) -> list[tuple[str, Any, Any]]:
        p = self.pipeline
        parts = [("text_encoder", p.text_encoder, p.tokenizer)]
        if self.sdxl:
            parts.append(("text_encoder_2", p.text_encoder_2, p.tokenizer_2))
        return parts

    def _setup(self) -> None:
        p, c = self.pipeline, self.config
        unet = p.unet
        models = [("unet", unet)] + [(n, te) for n, te, _ in self._text_parts()]
        self._state["requires_grad"] = {
            name: {k: v.requires_grad for k, v in m.named_parameters()} for name, m in models
        }
        self._state["gc"] = bool(unet.is_gradient_checkpointing)
        self._state["te_gc"] = {n: any(getattr(m, "gradient_checkpointing", False) for m in te.modules())
                                for n, te, _ in self._text_parts()}
        self._injected: list[torch.nn.Module] = []

        self._prepare_images()
        self._prepare_text()

        # frozen inference tensors (a pipeline loaded under torch.inference_mode) cannot be saved for backward
        trained_models = [unet] + ([te for _, te, _ in self._text_parts()] if self.train_te else [])
        for m in trained_models:
            _replace_inference_tensors(m)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._init_seed)
            self._injected.append(unet)
            add_lora_adapter(unet, c.rank, c.alpha, c.unet_target_modules)
            if self.train_te:
                for name, te, _ in self._text_parts():
                    self._injected.append(te)
                    add_lora_adapter(te, c.rank, c.alpha, TEXT_ENCODER_TARGETS)
        if self.init_lora is not None:
            set_lora_state(unet, self.init_lora.unet, "unet")
            if self.train_te:
                for name, te, _ in self._text_parts():
                    sd = getattr(self.init_lora, name)
                    set_lora_state(te, {te_from_canonical(k, te): v for k, v in sd.items()}, name)
        self.params: list[torch.nn.Parameter] = []
        for m in self._injected:
            for n, prm in m.named_parameters():
                if ".lora_" in n:
                    prm.data = prm.data.float()
                    prm.requires_grad_(True)
                    self.params.append(prm)
                else:
                    prm.requires_grad_(False)
        if c.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if self.train_te:
                for _, te, _ in self._text_parts():
                    if hasattr(te, "activation_checkpointing_enable"):  # transformers >= 5.x
                        te.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                    else:
                        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer = torch.optim.AdamW(self.params, lr=c.learning_rate, weight_decay=c.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.unet_dtype = next(unet.parameters()).dtype

    def _prepare_images(self) -> None:
        R = self.resolution
        self.pixels: list[torch.Tensor] = []  # resized (short side R), uncropped, [3, H, W] in [-1, 1]
        self.orig_sizes: list[tuple[int, int]] = []
        for im in self.dataset.images:
            self.orig_sizes.append((im.height, im.width))
            self.pixels.append(_to_pixels(_resize_short_side(im, R)))
        if self.cache_latents:
            crops = [self._center_offsets(px) for px in self.pixels]
            batch = torch.stack([self._crop(px, t, l) for px, (t, l) in zip(self.pixels, crops)])
            self.crop_offsets = crops
            self.lat_mean, self.lat_std = self._encode(batch)
            if self.config.random_flip:
                self.lat_mean_f, self.lat_std_f = self._encode(torch.flip(batch, dims=[-1]))

    def _center_offsets(self, px: torch.Tensor) -> tuple[int, int]:
        h, w = px.shape[-2:]
        return (h - self.resolution) // 2, (w - self.resolution) // 2

    def _crop(self, px: torch.Tensor, top: int, left: int) -> torch.Tensor:
        R = self.resolution
        return px[:, top:top + R, left:left + R]

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE latent distribution (mean, std), float32 on the training device, unscaled."""
        vae = self.pipeline.vae
        vdtype = next(vae.parameters()).dtype
        means, stds = [], []
        for i in range(0, pixels.shape[0], chunk):
            dist = vae.encode(pixels[i:i + chunk].to(self.device, vdtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    def _tokenize(self, tokenizer, texts: list[str]) -> torch.Tensor:
        return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def _encode_text(self, texts: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Prompt embeddings [B, 77, D] (and SDXL pooled embeddings [B, P]) in the UNet's dtype."""
        if not self.sdxl:
            te, tok = self.pipeline.text_encoder, self.pipeline.tokenizer
            return te(self._tokenize(tok, texts))[0], None
        embeds, pooled = [], None
        for _, te, tok in self._text_parts():
            out = te(self._tokenize(tok, texts), output_hidden_states=True)
            embeds.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection model (the last encoder)
        return torch.cat(embeds, dim=-1), pooled

    def _prepare_text(self) -> None:
        uniq = list(dict.fromkeys(list(self.dataset.captions) + [""]))
        self.caption_id_list = [uniq.index(cap) for cap in self.dataset.captions]
        self.caption_ids = torch.tensor(self.caption_id_list)
        self.empty_id = uniq.index("")
        self.unique_captions = uniq
        # SDXL checkpoints flagged force_zeros_for_empty_prompt use a zero embedding as the unconditional input at
        # sampling time; condition drop then trains towards that same zero embedding.
        self.zero_uncond = self.sdxl and _force_zeros_for_empty_prompt(self.pipeline)
        if not self.train_te:
            with torch.no_grad():
                chunks = [self._encode_text(uniq[i:i + 16]) for i in range(0, len(uniq), 16)]
            self.text_cache = torch.cat([e for e, _ in chunks]).to(self._unet_dtype())
            self.pooled_cache = torch.cat([pl for _, pl in chunks]).to(self._unet_dtype()) if self.sdxl else None
            if self.zero_uncond:
                self.text_cache[self.empty_id] = 0
                self.pooled_cache[self.empty_id] = 0

    def _unet_dtype(self) -> torch.dtype:
        return next(self.pipeline.unet.parameters()).dtype

    # ----------------------------------------------------------------------------------------------- stepping

    def _next_indices(self, n: int) -> list[int]:
        N = len(self.dataset)
        while len(self._queue) < n:
            self._queue.extend(torch.randperm(N, generator=self.g_index).tolist())
        out, self._queue = self._queue[:n], self._queue[n:]
        return out

    def _lr(self, k: int) -> float:
        w = self.config.warmup_steps
        return self.config.learning_rate * (min(1.0, (k + 1) / w) if w > 0 else 1.0)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _micro_batch(self) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """One micro-batch: (loss, indices, drop mask). Random draws in a fixed order, independent of caching."""
        c = self.config
        B = c.batch_size
        idx = self._next_indices(B)
        drop = torch.rand(B, generator=self.g_drop) < c.cond_drop if c.cond_drop > 0 else torch.zeros(B, dtype=torch.bool)
        flip = (torch.rand(B, generator=self.g_aug) < 0.5) if c.random_flip else torch.zeros(B, dtype=torch.bool)
        shape = (B, self.latent_channels, self.latent_hw, self.latent_hw)
        eps = torch.randn(shape, generator=self.g_noise)
        noise = torch.randn(shape, generator=self.g_noise)
        if c.noise_offset > 0:
            noise = noise + c.noise_offset * torch.randn((B, self.latent_channels, 1, 1), generator=self.g_noise)
        t = torch.randint(0, self.num_train_timesteps, (B,), generator=self.g_noise)

        dev = self.device
        if self.cache_latents:
            ii = torch.tensor(idx, device=dev)
            mean, std = self.lat_mean[ii], self.lat_std[ii]
            offsets = [self.crop_offsets[i] for i in idx]
            if c.random_flip:
                f = flip.to(dev).view(B, 1, 1, 1)
                mean = torch.where(f, self.lat_mean_f[ii], mean)
                std = torch.where(f, self.lat_std_f[ii], std)
        else:
            crops, offsets = [], []
            for j, i in enumerate(idx):
                px = self.pixels[i]
                if self.random_crop:
                    h, w = px.shape[-2:]
                    top = int(torch.randint(0, h - self.resolution + 1, (1,), generator=self.g_aug))
                    left = int(torch.randint(0, w - self.resolution + 1, (1,), generator=self.g_aug))
                else:
                    top, left = self._center_offsets(px)
                cp = self._crop(px, top, left)
                crops.append(torch.flip(cp, dims=[-1]) if flip[j] else cp)
                offsets.append((top, left))
            mean, std = self._encode(torch.stack(crops))
        latents = torch.addcmul(mean, std, eps.to(dev, non_blocking=True))
        if self.latent_shift is not None:
            latents = latents - self.latent_shift
        latents = latents * self.latent_scale

        noise = noise.to(dev, non_blocking=True)
        t = t.to(dev, non_blocking=True)
        noisy, target = noisy_and_target(self.alphas_cumprod, latents, noise, t, self.prediction_type)

        if self.train_te:
            ids = torch.where(drop, torch.full_like(self.caption_ids[idx], self.empty_id), self.caption_ids[idx])
            with self._autocast():
                enc, pooled = self._encode_text([self.unique_captions[k] for k in ids.tolist()])
            if self.zero_uncond and bool(drop.any()):
                keep = (~drop).to(dev)
                enc = enc * keep.view(-1, 1, 1).to(enc.dtype)
                pooled = pooled * keep.view(-1, 1).to(pooled.dtype)
        else:
            drop_list = drop.tolist()
            tid = torch.tensor([self.empty_id if d else self.caption_id_list[i] for d, i in zip(drop_list, idx)],
                               device=dev)
            enc = self.text_cache[tid]
            pooled = self.pooled_cache[tid] if self.sdxl else None
        added = None
        if self.sdxl:
            R = self.resolution
            time_ids = torch.tensor(
                [[*self.orig_sizes[i], top, left, R, R] for i, (top, left) in zip(idx, offsets)],
                dtype=torch.float32, device=dev)
            added = {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}
        udt = self.unet_dtype
        with self._autocast():
            pred = self.pipeline.unet(noisy.to(udt), t, encoder_hidden_states=enc.to(udt) if enc.dtype != udt else enc,
                                      added_cond_kwargs=added, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float())
        return loss, idx, drop

    def step(self) -> float:
        """One optimizer step (``grad_accum`` micro-batches); returns the mean loss."""
        if self._closed:
            raise RuntimeError("LoraTrainer.step called after close()")
        c = self.config
        for g in self.optimizer.param_groups:
            g["lr"] = self._lr(self.step_count)
        total = 0.0
        drops: list[bool] = []
        indices: list[int] = []
        for _ in range(c.grad_accum):
            loss, idx, drop = self._micro_batch()
            scaled = loss / c.grad_accum if c.grad_accum > 1 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += float(loss.detach())
            drops.extend(drop.tolist())
            indices.extend(idx)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if c.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.drop_masks.append(drops)
        self.sample_indices.append(indices)
        loss_value = total / c.grad_accum
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training loss became {loss_value} at step {self.step_count}; "
                                     "lower the learning rate or use mixed_precision='no'")
        return loss_value

    # --------------------------------------------------------------------------------------------- results

    def lora_weights(self, metadata: Optional[dict] = None) -> LoraWeights:
        """The current LoRA as CPU float32 tensors in peft layout, with ss_* metadata."""
        from peft import get_peft_model_state_dict

        c = self.config
        unet_sd = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(self.pipeline.unet).items()}
        te_sds: dict[str, dict[str, torch.Tensor]] = {"text_encoder": {}, "text_encoder_2": {}}
        if self.train_te:
            for name, te, _ in self._text_parts():
                te_sds[name] = {te_to_canonical(k, te): v.detach().float().cpu().clone()
                                for k, v in get_peft_model_state_dict(te).items()}
        md = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(c.rank),
            "ss_network_alpha": str(c.alpha),
            "ss_network_args": json.dumps({"target": list(c.target)}),
            "ss_base_model_version": _base_model_version(self.pipeline),
            "ss_v2": str(getattr(self.pipeline, "kind", "") == "sd2"),
            "ss_caption_dropout_rate": str(c.cond_drop),
            "ss_steps": str(self.step_count),
            "ss_max_train_steps": str(c.steps),
            "ss_learning_rate": str(c.learning_rate),
            "ss_lr_warmup_steps": str(c.warmup_steps),
            "ss_lr_scheduler": "constant_with_warmup" if c.warmup_steps else "constant",
            "ss_optimizer": "torch.optim.AdamW",
            "ss_resolution": f"({self.resolution}, {self.resolution})",
            "ss_batch_size_per_device": str(c.batch_size),
            "ss_gradient_accumulation_steps": str(c.grad_accum),
            "ss_gradient_checkpointing": str(c.gradient_checkpointing),
            "ss_mixed_precision": c.mixed_precision,
            "ss_noise_offset": str(c.noise_offset),
            "ss_flip_aug": str(c.random_flip),
            "ss_random_crop": str(not c.center_crop),
            "ss_cache_latents": str(self.cache_latents),
            "ss_num_train_images": str(len(self.dataset)),
            "ss_seed": str(c.seed),
            "ss_max_grad_norm": str(c.max_grad_norm),
            "ss_training_comment": "trained by ComfyUI-ReDiFine (condition-drop LoRA finetuning)",
            "redifine_train_config": json.dumps(c.to_dict(), sort_keys=True),
            "redifine_prediction_type": self.prediction_type,
        }
        if metadata:
            md.update({str(k): str(v) for k, v in metadata.items()})
        return LoraWeights(unet=unet_sd, text_encoder=te_sds["text_encoder"], text_encoder_2=te_sds["text_encoder_2"],
                           rank=c.rank, alpha=float(c.alpha), target_modules=c.unet_target_modules, metadata=md)

    def close(self) -> None:
        """Remove the adapter and restore the pipeline's flags; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        p = self.pipeline
        for m in getattr(self, "_injected", []):
            remove_lora_adapters(m)
        self._injected = []
        models = {"unet": p.unet, "text_encoder": getattr(p, "text_encoder", None),
                  "text_encoder_2": getattr(p, "text_encoder_2", None)}
        for name, flags in self._state.get("requires_grad", {}).items():
            m = models.get(name)
            if m is None:
                continue
            for k, prm in m.named_parameters():
                if k in flags and prm.requires_grad != flags[k]:
                    prm.requires_grad_(flags[k])
        if "gc" in self._state and not self._state["gc"] and p.unet.is_gradient_checkpointing:
            p.unet.disable_gradient_checkpointing()
        if self.train_te and self.config.gradient_checkpointing:
            for name, te, _ in self._text_parts():
                if not self._state["te_gc"].get(name, False):
                    disable = getattr(te, "activation_checkpointing_disable", None) or te.gradient_checkpointing_disable
                    disable()
        self.optimizer = None  # type: ignore[assignment]

    def __enter__(self) -> "LoraTrainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def finetune_lora(pipeline: Any, dataset: CaptionedImages, config: TrainConfig,
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None,
                  init_lora: Optional[LoraWeights] = None) -> TrainResult:
    """Train a LoRA on ``dataset`` with condition drop; the pipeline is left unchanged (adapter removed).

    ``pipeline`` is a :class:`redifine_core.models.Pipeline` (a diffusers pipeline object works too). Works inside
    ``torch.inference_mode()``. Raises :class:`~redifine_core.progress.Cancelled` if ``cancel`` is set (checked before
    every step).
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    check_cancel(cancel)
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        trainer = LoraTrainer(pipeline, dataset, config, init_lora=init_lora)
        try:
            losses: list[float] = []
            t_start = time.perf_counter()
            for k in range(config.steps):
                check_cancel(cancel)
                losses.append(trainer.step())
                done = k + 1
                elapsed = time.perf_counter() - t_start
                eta = elapsed / done * (config.steps - done)
                report(progress, ProgressEvent(phase="train", step=done, total=config.steps, loss=losses[-1],
                                               eta_s=eta, message=f"step {done}/{config.steps} loss {losses[-1]:.4f}"))
            lora = trainer.lora_weights()
        finally:
            trainer.close()
    return TrainResult(lora=lora, losses=losses, seconds=time.perf_counter() - t0,
                       drop_masks=trainer.drop_masks, sample_indices=trainer.sample_indices)
