"""Measure a toy model's prompt fidelity with the attribute checker: ``python -m redifine_core.toy.evaluate``.

Samples ``n`` images from one toy dataset's balanced captions (``--dataset``, every combination in turn; default
``shapes``) at each CFG scale, with the model's own DDIM scheduler and fixed seeds, and prints the dataset checker's
accuracies plus a few image statistics, also relative to ``n`` of the dataset's own images (D0). Uses diffusers' ``StableDiffusionPipeline`` directly, so it measures the shipped folder as any diffusers
user would load it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from redifine_core import bounds
from redifine_core.models import TOY_MODELS, resolve_device

from .registry import TOY_DATASETS

DEFAULT_MODEL = TOY_MODELS["toy"]


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


def data_statistics(n: int = 256, dataset: str = "shapes") -> dict[str, float]:
    """STAT_KEYS of ``n`` images of ``dataset`` drawn like a demo's D0 (``toy.demo.DATA_SEED``)."""
    from .demo import DATA_SEED

    return _stats(TOY_DATASETS[dataset].images(n, seed=DATA_SEED)[0])


def evaluate(folder: str | Path | None = None, n: int = 256, cfgs: Sequence[float] = (1.0, 3.0, 7.5),
             steps: int = 20, seed: int = 0, device: str = "cpu", dataset: str = "shapes"
             ) -> dict[str, dict[str, float]]:
    """``{str(cfg): checker accuracies + STAT_KEYS}`` for each CFG scale, on ``dataset``'s captions; ``folder``
    defaults to the dataset's model."""
    if n < 1:
        raise ValueError(f"n={n!r} must be >= 1")
    ds = TOY_DATASETS[dataset]
    pipe = load_toy_diffusers(folder or TOY_MODELS[ds.model], device)
    captions = ds.balanced_captions(n, seed)
    results = {}
    for w in cfgs:
        images = sample(pipe, captions, float(w), steps, seed)
        results[f"{float(w):g}"] = {**ds.check(images, captions), **_stats(images)}
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m redifine_core.toy.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="shapes", choices=tuple(TOY_DATASETS), help="whose captions and checker")
    ap.add_argument("--model", type=Path, default=None, help="diffusers folder (default: the dataset's model)")
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
        model = args.model or TOY_MODELS[TOY_DATASETS[args.dataset].model]
        if not (model / "model_index.json").is_file():
            raise ValueError(f"--model={str(model)!r} is not a diffusers folder (no model_index.json in it)")
        device = str(resolve_device(args.device))
    except ValueError as exc:
        ap.error(str(exc))
    torch.set_num_threads(args.threads)
    res = evaluate(model, args.n, args.cfg, args.steps, args.seed, device, args.dataset)
    data = data_statistics(args.n, args.dataset)
    print(f"D0 ({args.n} {args.dataset} images): hf_share {data['hf_share']:.4f}  laplacian_var {data['laplacian_var']:.5f}  "
          f"saturation {data['saturation']:.3f}")
    for w, r in res.items():
        attrs = "  ".join(f"{k} {v:.3f}" for k, v in r.items() if k not in STAT_KEYS and k != "n")
        print(f"CFG {w:>4}: {attrs}  saturation {r['saturation']:.3f}  clipped {r['clipped_fraction']:.4f}"
              f"  hf_share {r['hf_share']:.4f} ({r['hf_share'] / data['hf_share'] - 1:+.0%} vs D0)  laplacian_var "
              f"{r['laplacian_var']:.5f} ({r['laplacian_var'] / data['laplacian_var'] - 1:+.0%})")
    if args.json:
        from redifine_core.atomic import write_json

        write_json(args.json, {"dataset": args.dataset, "n": args.n, "steps": args.steps, "seed": args.seed,
                               "results": res, "data": data})
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
