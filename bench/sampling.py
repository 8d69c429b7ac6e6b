"""Benchmark the denoising loop against diffusers, in one process, on a small (not trivial) SD pipeline.

(a) ``sampling.generate`` vs ``StableDiffusionPipeline.__call__`` at constant CFG, same sampler, steps and seeds
    (target: ratio ours/diffusers <= 1.00);
(b) a schedule with half its steps at w = 1 (no unconditional pass there) vs the same steps at constant CFG
    (target: ratio <= 0.78).

Medians over ``--repeats`` rounds; each round runs the three cases in a rotated order. Usage::

    python bench/sampling.py [--device cpu|cuda] [--repeats 5] [--steps 10] [--images 4] [--size 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def build_pipeline(device: torch.device, dtype: torch.dtype):
    """A StableDiffusionPipeline from configs: UNet (64, 128) channels, 2 layers per block, 2x VAE, tiny CLIP."""
    from diffusers import UNet2DConditionModel

    from redifine_core.models import Pipeline
    from redifine_core.tiny import tiny_sd_components

    comps = tiny_sd_components()
    torch.manual_seed(0)
    comps["unet"] = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=comps["text_encoder"].config.hidden_size,
        attention_head_dim=(2, 4),  # heads per block: head width 32, as in SD (40-160) rather than 8
        norm_num_groups=32,
    ).eval()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**comps, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return Pipeline.from_diffusers(pipe, source="bench").to(device, dtype)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> int:
    from redifine_core.models import default_device
    from redifine_core.sampling import generate, make_scheduler

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 gives steady timings on a shared machine)")
    args = ap.parse_args(argv)

    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    pipeline = build_pipeline(device, torch.float32)
    n_unet = sum(p.numel() for p in pipeline.unet.parameters())
    prompts = [f"a {c} circle on a {b} background" for c, b in
               zip(["red", "blue", "green", "yellow", "white", "black", "purple", "orange"] * 4,
                   ["black", "white", "yellow", "green", "blue", "red", "orange", "purple"] * 4)][: args.images]
    seeds = list(range(len(prompts)))
    size = args.size
    ref_pipe = pipeline.to_diffusers()
    ref_pipe.scheduler = make_scheduler(pipeline, args.sampler)

    def diffusers_run():
        return ref_pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, height=size,
                        width=size, output_type="np",
                        generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    def ours(schedule):
        return lambda: generate(pipeline, prompts, schedule, steps=args.steps, seeds=seeds, sampler=args.sampler,
                                width=size, height=size, batch_size=len(prompts))

    half_off = f"interval({args.guidance}, 0, 0.5)"  # w for the first half of the steps, 1 (no uncond pass) after
    # warm-up and a correctness check
    diff = float(abs(torch.from_numpy(diffusers_run()) - ours(args.guidance)()).max())
    ours(half_off)()

    runs = {"diffusers": diffusers_run, "ours": ours(args.guidance), "ours_half": ours(half_off)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(args.repeats):  # rotate the order so that drifting machine load hits every run alike
        for name in order[r % 3:] + order[: r % 3]:
            times[name].append(timed(runs[name], device))
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}

    print(f"device {device} ({torch.get_num_threads()} threads)  UNet {n_unet / 1e6:.2f}M params  "
          f"{len(prompts)} images {size}x{size}  {args.steps} steps {args.sampler}  repeats {args.repeats}")
    print(f"max |ours - diffusers| at constant CFG {args.guidance}: {diff:.2e}")
    print(f"{'run':<44}{'median s':>10}{'min s':>10}")
    labels = {"diffusers": f"diffusers StableDiffusionPipeline, w={args.guidance}",
              "ours": f"ours, constant w={args.guidance}", "ours_half": f"ours, {half_off}"}
    for key, label in labels.items():
        print(f"{label:<44}{med[key]:>10.3f}{low[key]:>10.3f}")
    def paired(num: str, den: str) -> float:  # median of per-round ratios: robust to load drifting between rounds
        return statistics.median(a / b for a, b in zip(times[num], times[den]))

    print(f"{'ratio':<44}{'median':>10}{'min':>10}{'paired':>10}")
    for label, num, den in (("(a) ours / diffusers, constant CFG (<= 1.00)", "ours", "diffusers"),
                            ("(b) half steps at w=1 / constant (<= 0.78)", "ours_half", "ours")):
        print(f"{label:<44}{med[num] / med[den]:>10.3f}{low[num] / low[den]:>10.3f}{paired(num, den):>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
