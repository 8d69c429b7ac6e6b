"""The toy demo: a Chain of Diffusion on the toy model and toy data, three methods side by side, with a report.

Methods: ``baseline-low`` (constant low CFG, no condition drop), ``baseline-high`` (constant high CFG) and
``redifine`` (condition-drop finetuning + the decaying ``redifine`` CFG schedule). Same captions, same per-image
seeds and the same training seeds for all three (a paired comparison). ``redifine demo`` calls :func:`run_demo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..progress import CancelFlag, ProgressCallback

#: Seed of the demo's D0 (differs from the toy model's training seed, so D0 is unseen data).
DATA_SEED = 1234


@dataclass(frozen=True)
class DemoSettings:
    """The knobs of a demo run; ``FULL`` (the default) and ``QUICK`` are the presets, ``SCIENCE`` the documented study's."""

    n_images: int
    iterations: int
    finetune_steps: int
    learning_rate: float
    rank: int
    batch_size: int
    sample_steps: int
    low_cfg: float
    high_cfg: float
    redifine_schedule: str = "redifine"
    redifine_cond_drop: float = 0.2
    target: tuple = ("attention", "resnet")

    def __post_init__(self) -> None:
        for name in ("n_images", "iterations", "finetune_steps", "rank", "batch_size", "sample_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.n_images < 2:
            raise ValueError(f"n_images={self.n_images!r} must be >= 2 (a chain compares sets)")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be > 0")
        if not 0 <= self.low_cfg < self.high_cfg:
            raise ValueError(f"low_cfg={self.low_cfg!r}, high_cfg={self.high_cfg!r}: need 0 <= low_cfg < high_cfg")
        if not 0 <= self.redifine_cond_drop < 1:
            raise ValueError(f"redifine_cond_drop={self.redifine_cond_drop!r} must be in [0, 1)")


FULL = DemoSettings(n_images=48, iterations=5, finetune_steps=40, learning_rate=2e-3, rank=8, batch_size=8,
                    sample_steps=15, low_cfg=2.0, high_cfg=7.5)
#: The settings of the science study (toy.science, docs/toy-lab.md): 11 methods x 5 seeds x 5 iterations is 275
#: LoRA trainings, so each is lighter than FULL's (32 images, 30 steps of 8: the same 7.5 passes over the set as
#: FULL's 40 steps over 48 images; 10 DDIM steps), which fits the study into about 45 minutes on 2 CPU cores.
SCIENCE = DemoSettings(n_images=32, iterations=5, finetune_steps=30, learning_rate=2e-3, rank=8, batch_size=8,
                       sample_steps=10, low_cfg=2.0, high_cfg=7.5)
QUICK = DemoSettings(n_images=16, iterations=5, finetune_steps=15, learning_rate=2e-3, rank=8, batch_size=4,
                     sample_steps=8, low_cfg=2.0, high_cfg=7.5)


def demo_config(settings: DemoSettings, seeds: Sequence[int] = (0,)):
    """The :class:`~redifine_core.chain.ChainConfig` of a demo run."""
    from ..chain import ChainConfig, MethodConfig

    methods = (
        MethodConfig(name="baseline-low", kind="baseline", cfg=settings.low_cfg),
        MethodConfig(name="baseline-high", kind="baseline", cfg=settings.high_cfg),
        MethodConfig(name="redifine", kind="redifine", schedule=settings.redifine_schedule,
                     cond_drop=settings.redifine_cond_drop),
    )
    return ChainConfig(iterations=settings.iterations, methods=methods, train=train_config(settings),
                       steps=settings.sample_steps, sampler="ddim", seeds=tuple(seeds), batch_size=64)


def seed_tuple(seeds: Union[int, Sequence[int]], usual: int) -> tuple[int, ...]:
    """Replicate seeds from a count (seeds 0..n-1) or a sequence; one ValueError line otherwise (``usual`` is the
    count the study uses, named in the message)."""
    if isinstance(seeds, bool) or not isinstance(seeds, (int, Sequence)):
        raise ValueError(f"seeds={seeds!r} must be a count (an integer >= 1) or a sequence of seeds")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds={seeds!r} must be >= 1 (the study uses {usual})")
        return tuple(range(seeds))
    return tuple(seeds)


def train_config(settings: DemoSettings):
    """The LoRA finetuning settings of every iteration (the same for every method: a paired comparison)."""
    from ..training import TrainConfig

    return TrainConfig(steps=settings.finetune_steps, learning_rate=settings.learning_rate, rank=settings.rank,
                       alpha=float(settings.rank), batch_size=settings.batch_size, target=settings.target)


def demo_dataset(settings: DemoSettings):
    """D0: ``n_images`` toy images (seeded, unseen by the toy model's training) with their captions."""
    from .dataset import make_toy_dataset

    return make_toy_dataset(settings.n_images, seed=DATA_SEED)


def run_demo(out_dir: Union[str, Path], quick: bool = False, seeds: Sequence[int] = (0,),
             progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None, *,
             model: Union[str, Path] = "toy", settings: Optional[DemoSettings] = None, resume: bool = False) -> Path:
    """Run the demo chain into ``out_dir`` and render its report; returns the report.html path.

    ``settings`` overrides the preset chosen by ``quick``; ``model`` is "toy" (the shipped model) or another toy-layout
    diffusers folder. Before anything loads, ``out_dir`` is checked (one-line errors): FileExistsError if it is a
non-empty folder and ``resume`` is False, FileNotFoundError if ``resume`` and it does not exist, ValueError if it is
a file, PermissionError if it cannot be written.
    """
    settings = settings or (QUICK if quick else FULL)
    if not isinstance(settings, DemoSettings):
        raise ValueError(f"settings={settings!r} must be a DemoSettings")
    seeds = (seeds,) if isinstance(seeds, int) else tuple(seeds)
    config = demo_config(settings, seeds)  # validates before any work
    return run_toy_chain(out_dir, config, settings, progress, cancel, model=model, resume=resume)


def run_toy_chain(out_dir: Union[str, Path], config, settings: DemoSettings,
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None, *,
                  model: Union[str, Path] = "toy", resume: bool = False) -> Path:
    """Run ``config`` (a ChainConfig) on the toy data of ``settings`` into ``out_dir``; returns report.html's path.

    The output folder is checked before the model loads (see :func:`run_demo`); a run is resumed like any chain.
    """
    from ..chain import run_chain
    from ..models import load_pipeline
    from ..paths import check_output_dir
    from ..report import render_report

    out_dir = check_output_dir(out_dir, "out_dir", empty=not resume, hint="choose another folder or resume")
    if resume and not out_dir.is_dir():
        raise FileNotFoundError(f"out_dir {str(out_dir)!r} does not exist: there is nothing to resume")
    pipeline = load_pipeline(model)
    dataset = demo_dataset(settings)
    run_chain(pipeline, dataset, config, out_dir, progress=progress, cancel=cancel, resume=resume, render=False)
    return Path(render_report(out_dir))


def _cli(argv: Optional[Sequence[str]] = None) -> Any:  # pragma: no cover - `redifine demo` is the real entry point
    import argparse

    ap = argparse.ArgumentParser(prog="python -m redifine_core.toy.demo")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--model", default="toy")
    a = ap.parse_args(argv)
    path = run_demo(a.out, quick=a.quick, seeds=a.seeds, model=a.model)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_cli())
