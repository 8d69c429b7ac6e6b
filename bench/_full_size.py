"""Shared pieces of the full-size benchmarks (``bench/memory.py``, ``bench/gpu.py``): the hand-written diffusers + peft
reference loops that our figures are compared with, memory readings, and the docs/benchmarks.md section writer.

The reference training step is what a user writes from diffusers' ``train_text_to_image_lora.py`` /
``train_text_to_image_lora_sdxl.py``: peft LoRA through ``unet.add_adapter``, LoRA parameters cast to fp32, the frozen
weights in the pipeline's dtype, autocast in that dtype (fp16 with a ``GradScaler``), AdamW, gradient clipping, text
encoders and VAE left where they are (the scripts keep them on the GPU), latents and embeddings encoded once.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # our "attention" target, as in diffusers' LoRA scripts


# ------------------------------------------------------------------------------------------------------ readings

def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or the last :func:`reset_peak_rss` (Linux VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, ``clear_refs`` 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_vram(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_vram(device: torch.device) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def touch_weights(modules: Sequence[Any]) -> float:
    """Read every parameter and buffer once (safetensors maps files lazily: a load counts once all are resident)."""
    total = 0.0
    with torch.no_grad():
        for m in modules:
            if m is None:
                continue
            for t in list(m.parameters()) + list(m.buffers()):
                if t.numel() and t.is_floating_point():  # one element per 4 KiB page faults every page in
                    flat = t.detach().reshape(-1)
                    step = max(1, 4096 // t.element_size())
                    total += float(flat[::step].float().sum())
    return total


# ------------------------------------------------------------------------------------------------- reference loop

def _diffusers_pipe(pipeline: Any) -> Any:
    return pipeline.to_diffusers()


class ReferenceLoraLoop:
    """The hand-written diffusers + peft training step (see the module docstring); SD1.x and SDXL."""

    def __init__(self, pipeline: Any, images: torch.Tensor, captions: Sequence[str], *, rank: int, alpha: float,
                 batch_size: int, gradient_checkpointing: bool, learning_rate: float = 1e-4, seed: int = 0) -> None:
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        self.pipeline = pipeline
        self.device = pipeline.device
        unet = self.unet = pipeline.unet
        self.weight_dtype = next(unet.parameters()).dtype
        self.autocast_dtype = self.weight_dtype if self.weight_dtype in (torch.float16, torch.bfloat16) else None
        self.sdxl = pipeline.text_encoder_2 is not None
        self.bs = batch_size
        self.sched = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.g = torch.Generator().manual_seed(seed)

        pipe = _diffusers_pipe(pipeline)
        vae = pipeline.vae
        with torch.no_grad():  # latents and text embeddings once, like --cache_latents / precomputed embeddings
            means, stds = [], []
            for i in range(images.shape[0]):  # one image at a time: the SDXL VAE runs in fp32 at 1024 px
                px = images[i: i + 1].to(self.device, vae.dtype)
                dist = vae.encode(px).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
            self.mean, self.std = torch.cat(means), torch.cat(stds)
            if self.sdxl:
                emb, _, pooled, _ = pipe.encode_prompt(list(captions), device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
                self.pooled = pooled.to(self.weight_dtype)
                h, w = images.shape[-2:]
                self.time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=self.weight_dtype)
            else:
                emb, _ = pipe.encode_prompt(list(captions), device=self.device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
            self.emb = emb.to(self.weight_dtype)
        self.sf = float(vae.config.scaling_factor)

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
        self.params = [p for p in unet.parameters() if p.requires_grad]
        for p in self.params:  # diffusers' cast_training_params: trainable LoRA weights in fp32
            p.data = p.data.float()
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.checkpointing = gradient_checkpointing
        self.opt = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=1e-2)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None

    def step(self) -> float:
        idx = torch.randint(0, self.mean.shape[0], (self.bs,), generator=self.g)
        eps = torch.randn(self.mean[idx].shape, generator=self.g).to(self.device, self.mean.dtype)
        latents = ((self.mean[idx.to(self.device)] + self.std[idx.to(self.device)] * eps) * self.sf)
        noise = torch.randn(latents.shape, generator=self.g).to(self.device, latents.dtype)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (self.bs,), generator=self.g).to(self.device)
        noisy = self.sched.add_noise(latents, noise, t).to(self.weight_dtype)
        kwargs = {}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled[idx.to(self.device)],
                                           "time_ids": self.time_ids.repeat(self.bs, 1)}
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            pred = self.unet(noisy, t, self.emb[idx.to(self.device)], return_dict=False, **kwargs)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def close(self) -> None:
        """Take the adapter out and put the UNet back as it was (frozen, eval, no checkpointing)."""
        from redifine_core.lora import remove_lora_adapters

        if self.checkpointing:
            self.unet.disable_gradient_checkpointing()
        remove_lora_adapters(self.unet)
        self.unet.requires_grad_(False).eval()
        self.opt = None
        self.params = []


def reference_pipe(pipeline: Any, sampler: str = "ddim") -> Any:
    """A ``StableDiffusion(XL)Pipeline`` on the same modules, with the scheduler ``sampling.generate`` uses for ``sampler``."""
    from redifine_core.sampling import make_scheduler

    pipe = _diffusers_pipe(pipeline)
    pipe.scheduler = make_scheduler(pipeline, sampler)
    return pipe


def reference_generate(pipe: Any, prompts: Sequence[str], guidance: float, steps: int, seeds: Sequence[int],
                       size: int) -> Any:
    """``pipe.__call__`` (see :func:`reference_pipe`) at constant CFG with one CPU generator per image; numpy images."""
    return pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                output_type="np", generator=[torch.Generator().manual_seed(s) for s in seeds]).images


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------------------------------- docs section

DOC_HEADER = """# Benchmarks

Figures measured by the scripts under `bench/`. Each script prints ratios against a reference measured in the same
command and writes its own section below (between its markers); see each script's docstring for how to run it.
"""


def write_section(path: os.PathLike | str, name: str, text: str) -> Path:
    """Replace the ``<!-- name:begin -->``...``<!-- name:end -->`` block of ``path`` (appended if absent), atomically."""
    from redifine_core.atomic import write_text

    path = Path(path)
    doc = path.read_text() if path.is_file() else DOC_HEADER
    block = f"<!-- {name}:begin -->\n{text.rstrip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:begin -->.*?<!-- {re.escape(name)}:end -->", re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
    write_text(path, doc)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
    return "\n".join(lines)
