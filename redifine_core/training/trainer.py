"""The LoRA training loop: :class:`LoraTrainer` (set up, :meth:`~LoraTrainer.step`, close) and :func:`finetune_lora`.

A step, as in diffusers' ``train_text_to_image_lora.py``: sample latents ``mean + std * eps`` of the VAE's latent
distribution (cached moments of the center crop, or a fresh encode of a random crop; :mod:`.caches`), map them to the
UNet's space (``vae.scale_latents``: ``latents_mean``/``latents_std`` when the VAE config has them), add DDPM noise at
uniform timesteps (optional noise offset), look up the caption embeddings (``""`` for dropped captions), predict with
the UNet under the precision recipe's autocast (:mod:`.precision`), MSE against the noise (or ``get_velocity`` for
v-prediction; min-SNR weighting with ``min_snr_gamma``: :mod:`.objective`), backward through the gradient scaler
when the recipe has one, clip at ``max_grad_norm``, step the optimizer and diffusers' learning-rate schedule
(:mod:`.optim`; the UNet and the text encoders each with their own learning rate). SDXL
gets ``time_ids`` = (original size, crop top-left, target size); a flipped sample reports the mirrored crop offset.

We keep this loop instead of running the example because the example owns its process (``accelerate launch``, its own
model loading and saving), while here the caller's pipeline is borrowed inside ComfyUI or a chain and must come back
unchanged, every random draw must be reproducible per sample, and the loss scaling must follow the weights' dtype.
What differs from the example:

* Every random draw comes from one of four seeded CPU generators (sample order, condition drop, augmentation, noise),
  drawn in a fixed order per micro-batch, so the drop pattern and the samples depend only on ``seed``, ``batch_size``,
  ``grad_accum`` and the step, never on caching, cropping, the text-encoder setting or the device.
  :attr:`TrainResult.drop_masks` records it.
* The pipeline is borrowed (:mod:`.borrow`): the adapter is removed in ``close`` whatever happens (success, error,
  cancel), and everything changed for training is put back (``requires_grad``, train/eval modes, checkpointing,
  modules parked on the CPU while a step does not need them).
* The trained modules are in train mode while training, as in the example: transformers' text encoders only
  checkpoint in train mode (and diffusers UNets before 0.32 did too). SD's UNet and CLIP have no active dropout, so
  results equal eval mode's.
* Text embeddings are cached once per run unless the text encoders train (prompts are encoded by the function
  sampling uses, :mod:`redifine_core.prompt_encoding`, CLIP skip included); gradient accumulation over
  ``grad_accum`` micro-batches.

Data parallel (``processes``: a :class:`redifine_core.distributed.Processes` of several ranks): every process
draws the whole global micro-batch's random values from the same generators (so condition drop, noise, timesteps
and crops belong to the sample index, not to the process) and computes the loss of its contiguous share of the
``batch_size`` samples; after the backward pass the LoRA gradients and the loss are averaged over the processes
with ``accelerate.utils.reduce`` (the all-reduce DDP does). That equals the single-process gradient of the same
global batch, so the processes' LoRAs stay identical and match one process's to float rounding. We reduce the
gradients ourselves instead of wrapping the UNet in ``DistributedDataParallel`` because the UNet is borrowed from the
caller's pipeline and must come back as it was (DDP replaces the module and hooks its parameters).

Determinism: same seed and inputs give identical LoRA tensors on CPU (tested). On an H100 the fp16/bf16 runs were
bit-identical run to run, while fp32 runs differed by up to ~1e-4 (non-deterministic CUDA kernels;
``torch.use_deterministic_algorithms(True)`` is the caller's switch for that).
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import numpy as np
import torch

from ..data import CaptionedImages
from ..lora import (TEXT_ENCODER_TARGETS, LoraWeights, add_fixed_deltas, add_lora_adapter, remove_lora_adapters,
                    set_lora_state, te_from_canonical, te_to_canonical)
from ..progress import CancelFlag, ProgressCallback, ProgressEvent, check_cancel, report
from ..prompt_encoding import check_clip_skip
from ..vae import encode_moments, scale_latents
from .borrow import (BorrowedPipeline, default_size, empty_cuda_cache, force_zeros_for_empty_prompt, is_sdxl,
                     pipeline_device, replace_inference_tensors, vae_scale_factor)
from .buckets import BatchOrder, crop_sizes
from .caches import LatentCache, ResizedImages, TextCache, TextEncoder, mirrored_left, uint8_to_pixels
from .config import TrainConfig, TrainResult
from .metadata import training_metadata
from .objective import diffusion_loss, noisy_and_target
from .optim import make_lr_schedule, make_optimizer
from .precision import resolve_precision

# ----------------------------------------------------------------------------------------------- helpers


def _seeds(seed: int, n: int) -> list[int]:
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(n, dtype=np.uint64) % (2**63)]


# ----------------------------------------------------------------------------------------------- trainer


class LoraTrainer:
    """One LoRA finetuning run: set up with the adapter injected, call :meth:`step` per optimizer step, then
    :meth:`close` (or use as a context manager), which removes the adapter. Call inside grad mode."""

    def __init__(self, pipeline: Any, dataset: CaptionedImages, config: TrainConfig,
                 init_lora: Optional[LoraWeights] = None, processes: Any = None) -> None:
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not isinstance(dataset, CaptionedImages):
            raise ValueError(f"dataset must be a CaptionedImages, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError("dataset is empty: training needs at least one image")
        self.pipeline, self.dataset, self.config = pipeline, dataset, config
        self.world = int(getattr(processes, "world_size", 1) or 1)
        self.rank = int(getattr(processes, "rank", 0) or 0)
        if config.batch_size % self.world:
            raise ValueError(f"batch_size={config.batch_size} must be a multiple of the number of processes "
                             f"({self.world}) to train one LoRA data-parallel (the global batch is split evenly)")
        share = config.batch_size // self.world
        self.share = slice(self.rank * share, (self.rank + 1) * share)  # this process's samples of a micro-batch
        self.device = pipeline_device(pipeline)
        self.sdxl = is_sdxl(pipeline)
        self.unet_dtype = next(pipeline.unet.parameters()).dtype
        self.precision = resolve_precision(config.mixed_precision, self.unet_dtype, self.device)
        self.checkpointing = config.checkpointing_for(self.sdxl)
        self.resolution = config.resolution or default_size(pipeline)
        vsf = vae_scale_factor(pipeline)
        if self.resolution % vsf:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the VAE scale factor {vsf}")
        if init_lora is not None:
            self._check_init_lora(init_lora)
        self.init_lora = init_lora
        self.vsf = vsf
        unit = vsf * 2 ** (len(pipeline.unet.config.down_block_types) - 1)  # pixels per UNet bottleneck cell
        self.targets = crop_sizes(dataset.images, self.resolution, config.bucket_step if config.enable_bucket else 0,
                                  unit)
        self.latent_channels = int(pipeline.unet.config.in_channels)
        self.random_crop = not config.center_crop
        self.cache_latents = config.cache_latents and not self.random_crop
        self.train_te = config.trains_text_encoder
        check_clip_skip(config.clip_skip, self.sdxl, pipeline.text_encoder)
        self.step_count = 0
        self.drop_masks: list[list[bool]] = []
        self.sample_indices: list[list[int]] = []
        self._closed = False
        self._injected: list[torch.nn.Module] = []
        self._restore_deltas: Any = None
        self.borrowed: Optional[BorrowedPipeline] = None

        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        pred = getattr(pipeline, "prediction_type", None) or pipeline.scheduler.config.get("prediction_type", "epsilon")
        if pred not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type {pred!r} is not supported for training (epsilon or v_prediction)")
        self.prediction_type = pred
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)

        s = _seeds(config.seed, 5)
        self.g_index = torch.Generator().manual_seed(s[0])
        self.order = BatchOrder(len(dataset), config.batch_size, self.g_index,
                                self.targets if config.enable_bucket else None)
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
        if bool(lora.text_encoder) != c.trains_text_encoder:
            raise ValueError(
                "init_lora " + ("has" if lora.text_encoder else "has no") + " text-encoder weights but TrainConfig.target "
                + ("does not include" if lora.text_encoder else "includes") + " 'text_encoder'"
            )

    def _unet_targets(self) -> list[str]:
        """The config's target modules plus every UNet module the initial LoRA has (which keep training)."""
        extra = self.init_lora.modules("unet") if self.init_lora is not None else []
        return list(dict.fromkeys(list(self.config.unet_target_modules) + extra))

    def _text_parts(self) -> list[tuple[str, Any, Any]]:
        return self.text_encoder.parts()

    def _setup(self) -> None:
        p, c = self.pipeline, self.config
        unet = p.unet
        self.text_encoder = TextEncoder(p, self.sdxl, c.clip_skip)
        self.borrowed = BorrowedPipeline({"unet": unet, **{n: te for n, te, _ in self._text_parts()}})
        trained = [unet] + ([te for _, te, _ in self._text_parts()] if self.train_te else [])

        # phase 1: latents (or the uint8 images a step crops and encodes)
        self.latents, self.images = None, None
        if self.cache_latents:
            self.latents = LatentCache(p, self.dataset.images, self.resolution, c.random_flip, self.targets)
        else:
            self.images = ResizedImages.build(self.dataset.images, self.resolution, self.targets)
        empty_cuda_cache(self.device)

        # phase 2: text embeddings; then what a step does not need leaves the GPU until close()
        self.zero_uncond = self.sdxl and force_zeros_for_empty_prompt(p)
        self.text_cache = None
        if not self.train_te:
            self.text_cache = TextCache(self.text_encoder, self.dataset.captions, self.unet_dtype, self.zero_uncond)
            for _, te, _ in self._text_parts():
                self.borrowed.park(te)
        if self.cache_latents:
            self.borrowed.park(p.vae)
        self.unique_captions = list(dict.fromkeys(list(self.dataset.captions) + [""]))
        self.caption_id_list = [self.unique_captions.index(cap) for cap in self.dataset.captions]
        self.empty_id = self.unique_captions.index("")
        empty_cuda_cache(self.device)

        # phase 3: the adapter (fp32 LoRA parameters on frozen weights), checkpointing, train mode, optimizer
        for m in trained:  # frozen inference tensors cannot be saved for backward
            replace_inference_tensors(m)
        if self.init_lora is not None:  # its fixed deltas (full-weight differences) stay applied, frozen
            self._restore_deltas = add_fixed_deltas(unet, self.init_lora.fixed_deltas)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._init_seed)
            for m in trained:
                self._injected.append(m)
                add_lora_adapter(m, c.rank, c.alpha, self._unet_targets() if m is unet else TEXT_ENCODER_TARGETS)
        if self.init_lora is not None:
            set_lora_state(unet, self.init_lora.unet, "unet")
            if self.train_te:
                for name, te, _ in self._text_parts():
                    sd = getattr(self.init_lora, name)
                    set_lora_state(te, {te_from_canonical(k, te): v for k, v in sd.items()}, name)
        unet_params: list[torch.nn.Parameter] = []
        te_params: list[torch.nn.Parameter] = []
        for m in trained:
            for n, prm in m.named_parameters():
                prm.requires_grad_(".lora_" in n)
                if ".lora_" in n:
                    prm.data = prm.data.float()  # LoRA weights, their gradients and the optimizer's state: float32
                    (unet_params if m is unet else te_params).append(prm)
        self.params = unet_params + te_params
        groups = [{"params": unet_params, "lr": c.unet_learning_rate}]
        groups += [{"params": te_params, "lr": c.text_encoder_learning_rate}] if te_params else []
        if self.checkpointing:
            self.borrowed.checkpoint_unet(unet)
            for te in trained[1:]:
                self.borrowed.checkpoint_text_encoder(te)
        for m in trained:
            self.borrowed.train_mode(m)
        self.optimizer = make_optimizer(c.optimizer, groups, c.weight_decay)
        self.lr_schedule = make_lr_schedule(c.lr_scheduler, self.optimizer, c.warmup_steps, c.steps)
        self.scaler = self.precision.make_scaler()

    # ----------------------------------------------------------------------------------------------- stepping

    def _encode_crops(self, idx: list[int], flip: torch.Tensor,
                      share: slice) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Crop (random or center), flip and encode the samples ``idx[share]``: (mean, std, SDXL crop offsets).
        The crops of every sample in ``idx`` are drawn (in order), so a sample's crop does not depend on the share."""
        imgs = self.images
        crops, offsets = [], []
        mine = range(len(idx))[share]
        for j, i in enumerate(idx):
            (h, w), (th, tw) = imgs.size(i), self.targets[i]
            if self.random_crop:
                top = int(torch.randint(0, h - th + 1, (1,), generator=self.g_aug))
                left = int(torch.randint(0, w - tw + 1, (1,), generator=self.g_aug))
            else:
                top, left = imgs.center_offsets(i)
            if j not in mine:
                continue
            crop = imgs.crop(i, top, left)
            crops.append(torch.flip(crop, dims=[-1]) if flip[j] else crop)
            offsets.append((top, mirrored_left(w, left, tw) if flip[j] else left))
        mean, std = encode_moments(self.pipeline, uint8_to_pixels(torch.stack(crops)), batch_size=len(crops))
        return mean, std, offsets

    def _micro_batch(self) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """One micro-batch: (loss, indices, drop mask). Random draws in a fixed order, independent of caching."""
        c, dev = self.config, self.device
        B = c.batch_size
        idx = self.order.next()
        drop = torch.rand(B, generator=self.g_drop) < c.cond_drop if c.cond_drop > 0 else torch.zeros(B, dtype=torch.bool)
        flip = (torch.rand(B, generator=self.g_aug) < 0.5) if c.random_flip else torch.zeros(B, dtype=torch.bool)
        th, tw = self.targets[idx[0]]  # a micro-batch holds one bucket (one size)
        shape = (B, self.latent_channels, th // self.vsf, tw // self.vsf)
        eps = torch.randn(shape, generator=self.g_noise)
        noise = torch.randn(shape, generator=self.g_noise)
        if c.noise_offset > 0:
            noise = noise + c.noise_offset * torch.randn((B, self.latent_channels, 1, 1), generator=self.g_noise)
        t = torch.randint(0, self.num_train_timesteps, (B,), generator=self.g_noise)
        all_idx, all_drop = idx, drop
        if self.world > 1:  # this process's share of the global micro-batch (the draws above are the same everywhere)
            sh = self.share
            if self.latents is None:
                mean, std, offsets = self._encode_crops(idx, flip, sh)  # draws every sample's crop, encodes ours
            idx, drop, flip, eps, noise, t = idx[sh], drop[sh], flip[sh], eps[sh], noise[sh], t[sh]
        elif self.latents is None:
            mean, std, offsets = self._encode_crops(idx, flip, slice(None))

        # latents: a sample of the VAE's latent distribution, in the UNet's latent space
        if self.latents is not None:
            mean, std = self.latents.moments(idx, flip)
            offsets = [self.latents.crop_top_left(i, bool(f)) for i, f in zip(idx, flip.tolist())]
        latents = scale_latents(self.pipeline, torch.addcmul(mean, std, eps.to(dev, non_blocking=True)))
        noise, t = noise.to(dev, non_blocking=True), t.to(dev, non_blocking=True)
        noisy, target = noisy_and_target(self.alphas_cumprod, latents, noise, t, self.prediction_type)

        # text: cached embeddings, or encoded with grad when the text encoders train
        if self.text_cache is not None:
            enc, pooled = self.text_cache.lookup(idx, drop.tolist())
        else:
            ids = [self.empty_id if d else self.caption_id_list[i] for d, i in zip(drop.tolist(), idx)]
            with self.precision.autocast():
                enc, pooled = self.text_encoder([self.unique_captions[k] for k in ids])
            if self.zero_uncond and bool(drop.any()):
                keep = (~drop).to(dev)
                enc = enc * keep.view(-1, 1, 1).to(enc.dtype)
                pooled = pooled * keep.view(-1, 1).to(pooled.dtype)
        added = None
        if self.sdxl:
            time_ids = torch.tensor([[*self._orig_size(i), top, left, *self.targets[i]]
                                     for i, (top, left) in zip(idx, offsets)], dtype=torch.float32, device=dev)
            added = {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}

        udt = self.unet_dtype
        with self.precision.autocast():
            pred = self.pipeline.unet(noisy.to(udt), t, encoder_hidden_states=enc.to(udt), added_cond_kwargs=added,
                                      return_dict=False)[0]
        loss = diffusion_loss(pred, target, t, self.noise_scheduler, self.prediction_type, c.min_snr_gamma)
        return loss, all_idx, all_drop

    def _orig_size(self, i: int) -> tuple[int, int]:
        source = self.latents if self.latents is not None else self.images
        return source.orig_sizes[i]

    def step(self) -> float:
        """One optimizer step (``grad_accum`` micro-batches); returns the mean loss."""
        if self._closed:
            raise RuntimeError("LoraTrainer.step called after close()")
        c = self.config
        total, drops, indices = 0.0, [], []
        for _ in range(c.grad_accum):
            loss, idx, drop = self._micro_batch()
            scaled = loss / c.grad_accum if c.grad_accum > 1 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += float(loss.detach())
            drops.extend(drop.tolist())
            indices.extend(idx)
        if self.world > 1:
            total = self._average_over_processes(total)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if c.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.drop_masks.append(drops)
        self.sample_indices.append(indices)
        loss_value = total / c.grad_accum
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training loss became {loss_value} at step {self.step_count}; "
                                     "lower the learning rate or train in float32 (mixed_precision='no')")
        return loss_value

    def _average_over_processes(self, loss_sum: float) -> float:
        """Average the LoRA gradients (one flat all-reduce) and the loss over the processes; returns the loss."""
        from accelerate.utils import reduce

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss_sum], device=grads[0].device)])
        flat = reduce(flat, reduction="mean")
        k = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[k:k + n].view_as(p).to(p.dtype)
            k += n
        return float(flat[-1])

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
        md = training_metadata(self)
        if metadata:
            md.update({str(k): str(v) for k, v in metadata.items()})
        return LoraWeights(unet=unet_sd, text_encoder=te_sds["text_encoder"], text_encoder_2=te_sds["text_encoder_2"],
                           rank=c.rank, alpha=float(c.alpha), target_modules=c.unet_target_modules, metadata=md,
                           fixed_deltas=dict(self.init_lora.fixed_deltas) if self.init_lora is not None else {})

    def close(self) -> None:
        """Remove the adapter and put the pipeline back as it was; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for m in self._injected:
            remove_lora_adapters(m)
        self._injected = []
        if self._restore_deltas is not None:
            self._restore_deltas()
        if self.borrowed is not None:
            self.borrowed.restore()
        self.optimizer = self.lr_schedule = None  # type: ignore[assignment]
        self.latents = self.images = self.text_cache = None
        empty_cuda_cache(self.device)

    def __enter__(self) -> "LoraTrainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def finetune_lora(pipeline: Any, dataset: CaptionedImages, config: TrainConfig,
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None,
                  init_lora: Optional[LoraWeights] = None, processes: Any = None) -> TrainResult:
    """Train a LoRA on ``dataset`` with condition drop; the pipeline is left unchanged (adapter removed).

    ``pipeline`` is a :class:`redifine_core.models.Pipeline` (a diffusers pipeline object works too). Works inside
    ``torch.inference_mode()``. Raises :class:`~redifine_core.progress.Cancelled` if ``cancel`` is set (checked before
    every step). ``init_lora`` continues training an existing LoRA (the chain's "continue" protocol).
    ``processes`` (a ``distributed.Processes`` of several ranks, every one calling this with the same arguments)
    trains data-parallel at the same global batch: ``batch_size`` samples per micro-batch split over the processes.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    check_cancel(cancel)
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        trainer = LoraTrainer(pipeline, dataset, config, init_lora=init_lora, processes=processes)
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
