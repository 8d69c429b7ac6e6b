"""Benchmark: our LoRA training step (``LoraTrainer.step``) vs a minimal hand-written diffusers + peft loop.

Both run in this process on two identical copies of a tiny-but-real SD UNet (block_out_channels (64, 128), two
cross-attention down blocks, 64-px images through the tiny f=2 VAE -> 32x32 latents), batch 4, the same rank-4
attention LoRA config, AdamW, gradient clipping at 1.0, cached latents (mean/std, sampled per step) and cached text
embeddings. Ours runs with condition drop 0.2 (its normal use); the baseline has no condition drop, like diffusers'
``train_text_to_image_lora.py``. Steps of both are interleaved in blocks so machine load hits both alike; the
median seconds per step is compared, plus the median of the per-block ratios and, on CPU, the process CPU time
(steadier than wall time on a shared machine).

    python bench/train_step.py [--repeats 15] [--steps 5] [--threads 1] [--device cpu|cuda]

Target: ratio ours / baseline <= 1.03.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F


def build_pipeline(device: str):
    from diffusers import UNet2DConditionModel

    from redifine_core.models import Pipeline
    from redifine_core.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    p = Pipeline.from_diffusers(pipe)
    return p.to(device)


class BaselineLoop:
    """What a user would write from diffusers' train_text_to_image_lora.py, on cached latents and embeddings."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config, images, captions, batch_size, device):
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        self.unet = unet
        self.device = device
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-2)
        self.sched = DDPMScheduler.from_config(scheduler_config)
        with torch.no_grad():
            dist = vae.encode(images.to(device)).latent_dist
            self.mean, self.std = dist.mean, dist.std
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            self.emb = text_encoder(ids)[0]
        self.sf = vae.config.scaling_factor
        self.bs = batch_size
        self.g = torch.Generator().manual_seed(0)

    def step(self) -> float:
        idx = torch.randint(0, self.mean.shape[0], (self.bs,), generator=self.g).to(self.device)
        eps = torch.randn(self.mean[idx].shape, generator=self.g).to(self.device)
        latents = (self.mean[idx] + self.std[idx] * eps) * self.sf
        noise = torch.randn(latents.shape, generator=self.g).to(self.device)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (self.bs,), generator=self.g).to(self.device)
        noisy = self.sched.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, self.emb[idx], return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from redifine_core.data import CaptionedImages
    from redifine_core.training import LoraTrainer, TrainConfig, _resize_short_side, _to_pixels

    g = torch.Generator().manual_seed(0)
    captions = ["a red circle", "a blue square on a green background", "a cat", "a dog", "a tree", "a house",
                "a bird in a tree", "a small car"]
    ds = CaptionedImages.from_images(torch.rand(len(captions), 64, 64, 3, generator=g), captions)
    ours_pipe = build_pipeline(args.device)
    base_unet = copy.deepcopy(ours_pipe.unet)
    cfg = TrainConfig(steps=10**6, batch_size=4, rank=4, alpha=4.0, learning_rate=1e-4, cond_drop=0.2,
                      resolution=64, max_grad_norm=1.0)
    pixels = torch.stack([_to_pixels(_resize_short_side(im, 64)) for im in ds.images])
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    with torch.enable_grad(), LoraTrainer(ours_pipe, ds, cfg) as ours:
        base = BaselineLoop(base_unet, ours_pipe.vae, ours_pipe.text_encoder, ours_pipe.tokenizer,
                            ours_pipe.scheduler.config, pixels, captions, 4, args.device)
        n_lora = sum(p.numel() for p in ours.params)
        assert n_lora == sum(p.numel() for p in base.params), "both loops must train the same LoRA"
        for _ in range(3):  # warm-up
            ours.step()
            base.step()
        t_ours, t_base, c_ours, c_base = [], [], [], []
        for r in range(args.repeats):
            order = ((ours.step, t_ours, c_ours), (base.step, t_base, c_base))
            for fn, acc, cpu_acc in (order if r % 2 == 0 else order[::-1]):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    fn()
                sync()
                acc.append((time.perf_counter() - t0) / args.steps)
                cpu_acc.append((time.process_time() - c0) / args.steps)
    m_ours, m_base = statistics.median(t_ours), statistics.median(t_base)
    # adjacent blocks share the machine's momentary load: the median of per-repeat ratios is the steadier figure
    paired = statistics.median(o / b for o, b in zip(t_ours, t_base))
    unet_params = sum(p.numel() for p in base_unet.parameters() if not p.requires_grad)
    print(f"device={args.device} threads={args.threads} unet_params={unet_params / 1e6:.2f}M lora_params={n_lora} "
          f"batch=4 latents=32x32 repeats={args.repeats}x{args.steps} steps")
    print(f"ours     median {m_ours * 1000:.1f} ms/step  (min {min(t_ours) * 1000:.1f})")
    print(f"baseline median {m_base * 1000:.1f} ms/step  (min {min(t_base) * 1000:.1f})")
    print(f"ratio of medians ours/baseline = {m_ours / m_base:.3f}; median of paired ratios = {paired:.3f}"
          "  (target <= 1.03)")
    if args.device == "cpu":
        # on a shared CPU, wall time includes waiting for other processes; CPU time of this process does not
        cpu_ratio = statistics.median(c_ours) / statistics.median(c_base)
        print(f"process CPU time: ours {statistics.median(c_ours) * 1000:.1f} ms/step, baseline "
              f"{statistics.median(c_base) * 1000:.1f} ms/step, ratio {cpu_ratio:.3f}")


if __name__ == "__main__":
    main()
