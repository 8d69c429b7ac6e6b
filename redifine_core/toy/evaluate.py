"""Measure the toy model's prompt fidelity with the attribute checker: ``python -m redifine_core.toy.evaluate``.

Samples ``n`` images from balanced captions (every shape/colour/background combination in turn) at each CFG scale,
with the model's own DDIM scheduler and fixed seeds, and prints the checker's accuracies plus a few image
statistics. Uses diffusers' ``StableDiffusionPipeline`` directly, so it measures the shipped folder as any diffusers
user would load it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from redifine_core import bounds
from redifine_core.models import resolve_device

from .checker import check
from .dataset import balanced_captions

DEFAULT_MODEL = Path(__file__).resolve().parent / "model"


def load_toy_diffusers(folder: str | Path = DEFAULT_MODEL, device: str = "cpu"):
    """The toy folder as a diffusers ``StableDiffusionPipeline`` (float32, progress bar off)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def sample(pipe, captions: Sequence[str], cfg: float, steps: int = 20, seed: int = 0, batch: int = 64) -> np.ndarray:
    """Images [N, H, W, 3] in [0, 1] for ``captions``; image i uses seed ``seed + i``."""
    out = []
    for i in range(0, len(captions), batch):
        chunk = list(captions[i : i + batch])
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        res = pipe(chunk, num_inference_steps=steps, guidance_scale=cfg, generator=gens, output_type="np")
        out.append(res.images)
    return np.concatenate(out)


STAT_KEYS = ("hf_share", "laplacian_var", "saturation", "clipped_fraction")
"""The image statistics reported per CFG scale (and for D0)."""


def _stats(images: np.ndarray) -> dict[str, float]:
    from ..metrics import image_statistics

    st = image_statistics(images)
    return {k: float(st[k]) for k in STAT_KEYS}


def data_statistics(n: int = 256) -> dict[str, float]:
    """STAT_KEYS of ``n`` toy images drawn like a demo's D0 (``toy.demo.DATA_SEED``)."""
    from .dataset import generate
    from .demo import DATA_SEED

    return _stats(generate(n, seed=DATA_SEED)[0])


def evaluate(folder: str | Path = DEFAULT_MODEL, n: int = 256, cfgs: Sequence[float] = (1.0, 3.0, 7.5),
             steps: int = 20, seed: int = 0, device: str = "cpu") -> dict[str, dict[str, float]]:
    """``{str(cfg): checker accuracies + STAT_KEYS}`` for each CFG scale."""
    if n < 1:
        raise ValueError(f"n={n!r} must be >= 1")
    pipe = load_toy_diffusers(folder, device)
    captions = balanced_captions(n, seed)
    results = {}
    for w in cfgs:
        images = sample(pipe, captions, float(w), steps, seed)
        results[f"{float(w):g}"] = {**check(images, captions), **_stats(images)}
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m redifine_core.toy.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=256, help="images per CFG scale (1 to 10000)")
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.5])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    try:  # every argument is checked before the model loads
        bounds.check("images", args.n, "--n")
        bounds.check("steps", args.steps, "--steps")
        bounds.check("seed", args.seed, "--seed")
        bounds.check("threads", args.threads, "--threads")
        for w in args.cfg:
            bounds.check("cfg", w, "--cfg")
        if not (args.model / "model_index.json").is_file():
            raise ValueError(f"--model={str(args.model)!r} is not a diffusers folder (no model_index.json in it)")
        device = str(resolve_device(args.device))
    except ValueError as exc:
        ap.error(str(exc))
    torch.set_num_threads(args.threads)
    res = evaluate(args.model, args.n, args.cfg, args.steps, args.seed, device)
    data = data_statistics(args.n)
    print(f"D0 ({args.n} toy images): hf_share {data['hf_share']:.4f}  laplacian_var {data['laplacian_var']:.5f}  "
          f"saturation {data['saturation']:.3f}")
    for w, r in res.items():
        print(f"CFG {w:>4}: full {r['full']:.3f}  shape {r['shape']:.3f}  color {r['color']:.3f}  "
              f"background {r['background']:.3f}  saturation {r['saturation']:.3f}  clipped {r['clipped_fraction']:.4f}"
              f"  hf_share {r['hf_share']:.4f} ({r['hf_share'] / data['hf_share'] - 1:+.0%} vs D0)  laplacian_var "
              f"{r['laplacian_var']:.5f} ({r['laplacian_var'] / data['laplacian_var'] - 1:+.0%})")
    if args.json:
        from redifine_core.atomic import write_json

        write_json(args.json, {"n": args.n, "steps": args.steps, "seed": args.seed, "results": res, "data": data})
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
