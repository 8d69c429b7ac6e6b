"""``redifine check``: will a LoRA trained on the images it makes degrade? The artist's LoRA, images and recipe in, one
screen of answer out (check_answer.py).

    check_inputs(lora, images, model, cfg, rounds, out, resume) -> CheckInputs   # every check, nothing loaded/written
    run_check(lora, images, model, cfg=7.0, rounds=3, out=..., progress, cancel, resume) -> CheckResult

A check is a chain run (chain/) in ``<out>/chain`` with two methods over the same captions and seeds (a paired
comparison) and ``init_lora`` = the artist's LoRA, so the run folder, units, resume and atomic writes are the chain's:

* round 0 generates with the base model and the artist's LoRA as it is (no training);
* round k >= 1 finetunes with the artist's recipe (``recipe.read_recipe``) on round k-1's images, continuing round
  k-1's LoRA (``protocol="continue"``: round 1 continues the artist's LoRA), then generates from the artist's captions.
  Continuing is what an artist who keeps training their LoRA on its own outputs does, and the recipe's rank, alpha
  and trained modules are those of the artist's weights, which only a continued LoRA keeps;
* the arms: ``your-cfg`` (constant CFG ``cfg``, the recipe's caption dropout) and ``redifine`` (the ``redifine(cfg)``
  schedule, decaying from ``cfg``, and condition drop 0.2).

``lora="toy"`` / ``images="toy"`` (with ``model="toy"``) make a toy image folder and a toy LoRA trained on it with a
small recipe, in ``<out>/toy_inputs``: the way to try the check on a fresh install (docs/check.md).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import bounds
from .atomic import PathLike, write_text
from .paths import check_input_dir, check_input_file, check_output_dir
from .progress import CancelFlag, ProgressCallback, ProgressEvent, report

TOY = "toy"
DEFAULT_CFG = 7.0
DEFAULT_ROUNDS = 3
ARMS = ("your-cfg", "redifine")
SAMPLE_STEPS = {"toy": 10}  # denoising steps of the check's generation (toy: the toy study's); others: DEFAULT_STEPS
DEFAULT_STEPS = 20
TOY_IMAGES = 16  # the fewest images a set needs for the verdict to read it (metrics/verdict.py)
TOY_RECIPE = dict(steps=12, learning_rate=2e-3, rank=8, alpha=8.0, batch_size=4, target=("attention", "resnet"))
CHAIN_SUBDIR = "chain"


@dataclass(frozen=True)
class CheckInputs:
    """What a check was given, checked (paths resolved; ``"toy"`` kept as it is)."""

    lora: str
    images: str
    model: str
    cfg: float
    rounds: int
    out: Path
    resume: bool

    @property
    def toy_lora(self) -> bool:
        return self.lora == TOY

    @property
    def toy_images(self) -> bool:
        return self.images == TOY

    @property
    def chain_dir(self) -> Path:
        return self.out / CHAIN_SUBDIR


@dataclass
class CheckResult:
    """A finished check: its folder, the answer text, the grid PNG, and what the recipe read and assumed."""

    out: Path
    answer: str
    grid: Optional[Path]
    read: dict
    assumed: dict
    estimate: dict


def _is_toy_model(model: str) -> bool:
    from .models import TOY_MODELS

    return str(model) in TOY_MODELS


def default_out(lora: str) -> Path:
    """``check-<LoRA file stem>`` in the working folder (``check-toy`` for the toy LoRA)."""
    return Path(f"check-{Path(str(lora)).stem}")


def has_run(out: PathLike) -> bool:
    """True when ``out`` holds a check that can be resumed."""
    from .chain import RunFolder

    return RunFolder(Path(out) / CHAIN_SUBDIR).exists()


def out_name(lora: str, images: str, cfg: float, rounds: int) -> str:
    """A check folder name that changes with every input a resumed check must keep (ComfyUI's node resumes it)."""
    import re

    stem = lambda p: re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(p)).stem or "x")[:40]  # noqa: E731
    return f"check-{stem(lora)}-{stem(images)}-cfg{float(cfg):g}-r{int(rounds)}"


def check_inputs(lora: str, images: str, model: str, cfg: float = DEFAULT_CFG, rounds: int = DEFAULT_ROUNDS,
                 out: Optional[PathLike] = None, resume: bool = False) -> CheckInputs:
    """Every input checked before any model loads and before any file is written: ValueError / FileNotFoundError
    with one line naming the input and what was expected."""
    cfg = float(bounds.check("check_cfg", cfg, "cfg"))
    rounds = int(bounds.check("check_rounds", rounds, "rounds"))
    model = str(model)
    if not _is_toy_model(model) and not Path(model).expanduser().exists():
        raise FileNotFoundError(f"model {model!r} does not exist; expected 'toy', a diffusers folder or a "
                                ".safetensors checkpoint")
    for name, value in (("lora", lora), ("images", images)):
        if str(value) == TOY and not _is_toy_model(model):
            raise ValueError(f"{name}='toy' needs model='toy' (the toy inputs are made for the toy model)")
    lora, images = str(lora), str(images)
    if lora != TOY:
        check_input_file(lora, "lora", "a LoRA .safetensors file")
        from .recipe import read_recipe

        read_recipe(lora)  # an unreadable file, or a LoHa/LoKr, is one line here
        lora = str(Path(lora).expanduser().resolve())
    if images != TOY:
        check_input_dir(images, "images", "a folder of images, each with a <name>.txt caption")
        _captioned_images(images)
        images = str(Path(images).expanduser().resolve())
    out_path = Path(out) if out is not None else default_out(lora)
    if resume:
        if not has_run(out_path):
            raise FileNotFoundError(f"out {str(out_path)!r} holds no check to resume; drop resume to start one")
        check_output_dir(out_path, "out")
    else:
        check_output_dir(out_path, "out", empty=True, hint="resume it, or choose another out folder")
    return CheckInputs(lora, images, model, cfg, rounds, out_path, bool(resume))


def _captioned_images(folder: PathLike, cancel: Optional[CancelFlag] = None) -> Any:
    """D0: the images of ``folder`` with their ``.txt`` captions (every image needs one; at least 2 images)."""
    from .data import CaptionedImages

    try:
        data = CaptionedImages.from_folder(folder, cancel=cancel)
    except ValueError as e:
        raise ValueError(f"images: {str(e).splitlines()[0]}") from None
    if len(data.captions) < 2:
        raise ValueError(f"images {str(folder)!r} holds {len(data.captions)} image; a check needs at least 2")
    bounds.check("images", len(data.captions), "images (in the folder)")
    return data


# ---------------------------------------------------------------------------------------------------- toy inputs
def make_toy_inputs(folder: PathLike, pipeline: Any, make_lora: bool = True, make_images: bool = True,
                    progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFlag] = None
                    ) -> tuple[Path, Path]:
    """A toy image folder (``images/``: PNG + .txt) and a toy LoRA trained on it with ``TOY_RECIPE``
    (``toy_lora.safetensors``, with its ss_* recipe) in ``folder``; files already there are kept (resume)."""
    from .atomic import save_png
    from .lora import save_lora
    from .toy.demo import DATA_SEED
    from .toy.dataset import make_toy_dataset
    from .training import TrainConfig, finetune_lora

    folder = Path(folder)
    images_dir, lora_path = folder / "images", folder / "toy_lora.safetensors"
    data = make_toy_dataset(TOY_IMAGES, seed=DATA_SEED)
    if make_images and not (images_dir / f"{TOY_IMAGES - 1:03d}.txt").exists():
        for k, (im, cap) in enumerate(zip(data.images, data.captions)):
            save_png(images_dir / f"{k:03d}.png", im)
            write_text(images_dir / f"{k:03d}.txt", cap)
    if make_lora and not lora_path.exists():
        res = finetune_lora(pipeline, data, TrainConfig(**TOY_RECIPE), progress=progress, cancel=cancel)
        save_lora(res.lora, lora_path)
    return lora_path, images_dir


# ------------------------------------------------------------------------------------------------ the chain config
def check_config(inputs: CheckInputs, recipe: dict, init_lora: str, model_kind: str) -> Any:
    """The ChainConfig of a check: the two arms, the artist's recipe for every round, their LoRA as round 0."""
    from .chain import ChainConfig, MethodConfig
    from .training import TrainConfig

    drop = float(recipe.get("cond_drop") or 0.0)
    train = TrainConfig(**{**recipe, "cond_drop": 0.0})  # the chain sets each arm's drop per unit
    yours = (MethodConfig(name=ARMS[0], kind="baseline", cfg=inputs.cfg) if drop == 0 else
             MethodConfig(name=ARMS[0], kind="custom", cfg=inputs.cfg, cond_drop=drop))
    redifine = MethodConfig(name=ARMS[1], kind="redifine", schedule=f"redifine({inputs.cfg:g})")
    return ChainConfig(iterations=inputs.rounds, methods=(yours, redifine), train=train,
                       steps=SAMPLE_STEPS.get(model_kind, DEFAULT_STEPS), sampler="ddim", seeds=(0,),
                       protocol="continue", batch_size=64 if model_kind == "toy" else 4, init_lora=init_lora)


def recipe_lines(read: dict, assumed: dict) -> list[str]:
    """What the check read from the LoRA and what it assumed, one setting a line."""
    lines = ["Read from the LoRA's metadata:"] + [f"  {k} = {v}" for k, v in read.items()]
    lines += ["Assumed (not in the file, or not usable as it is):"] + [f"  {k} = {v}" for k, v in assumed.items()]
    return lines


# ---------------------------------------------------------------------------------------------------- cost estimate
def _timed(run: Any) -> tuple[float, float]:
    """(seconds in all, seconds per step after the first) of ``run(progress)``, from its progress events' times."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    run(lambda ev: stamps.append(time.perf_counter()))
    total = time.perf_counter() - t0
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else total
    return total, per_step


def measure_estimate(pipeline: Any, dataset: Any, config: Any, lora: Any) -> dict:
    """Time two training steps and two sampling steps on this device and scale them to the whole check: each
    training and each generated set costs its set-up (the first step's extra time) plus its steps."""
    from .sampling import generate
    from .training import finetune_lora

    n = len(dataset.captions)
    t_cfg = config.train
    batch = min(config.batch_size, n)
    k = min(t_cfg.batch_size, n)
    small = type(dataset).from_images(list(dataset.images[:k]), list(dataset.captions[:k]))
    train_total, train_step = _timed(lambda cb: finetune_lora(
        pipeline, small, dataclasses.replace(t_cfg, steps=2, warmup_steps=0, grad_accum=1), progress=cb,
        init_lora=lora))
    size = config.width or t_cfg.resolution or pipeline.default_size
    sample_total, sample_step = _timed(lambda cb: generate(
        pipeline, list(dataset.captions[:batch]), config.methods[0].guidance, steps=2, seeds=list(range(batch)),
        width=size, height=size, batch_size=batch, lora=lora, progress=cb))
    arms, rounds = len(config.methods), config.iterations
    steps_per_set = math.ceil(n / batch) * config.steps
    train_setup = max(0.0, train_total - 2 * train_step)
    sample_setup = max(0.0, sample_total - 2 * sample_step)
    train_one = train_setup + t_cfg.steps * t_cfg.grad_accum * train_step
    sample_one = sample_setup + steps_per_set * sample_step
    return {"images": n, "train_steps": t_cfg.steps, "batch_size": t_cfg.batch_size, "rounds": rounds,
            "arms": arms, "sample_steps": config.steps, "train_step_s": train_step, "sample_step_s": sample_step,
            "train_one_s": train_one, "sample_one_s": sample_one, "trainings": arms * (rounds - 1),
            "seconds": arms * ((rounds - 1) * train_one + rounds * sample_one)}


def _duration(s: float) -> str:
    s = max(0.0, float(s))
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


def estimate_text(e: dict) -> str:
    return (f"Cost: {e['images']} images x {e['rounds']} rounds x {e['arms']} arms; {e['trainings']} trainings of "
            f"{e['train_steps']} steps (batch {e['batch_size']}) and {e['images'] * e['rounds'] * e['arms']} images "
            f"of {e['sample_steps']} denoising steps. Estimated time on this device: about "
            f"{_duration(e['seconds'])} (an estimate from two measured training steps, {e['train_step_s']:.2f} s a step, "
            f"and two measured sampling steps, {e['sample_step_s']:.2f} s a step of one batch, each with its "
            "set-up; the metrics are not counted).")


class EtaProgress:
    """Forwards events to ``inner``, adding the estimated time left to the chain's messages (the measured rate of
    the finished units, scaled by each unit's estimated cost: round 0 has no training)."""

    def __init__(self, inner: Optional[ProgressCallback], estimate: dict, config: Any) -> None:
        from .chain import units

        self.inner, self.start = inner, time.perf_counter()
        e = estimate
        self.costs = [e["sample_one_s"] + (e["train_one_s"] if u.iteration > 0 else 0.0) for u in units(config)]
        self.first: Optional[int] = None

    def eta(self, done: int) -> Optional[float]:
        if self.first is None:
            self.first = done
        spent = sum(self.costs[self.first:done])
        left = sum(self.costs[done:])
        elapsed = time.perf_counter() - self.start
        return left * (elapsed / spent) if spent > 0 else left

    def __call__(self, ev: ProgressEvent) -> None:
        if ev.phase == "chain":
            done = min(int(ev.step), len(self.costs))
            ev = dataclasses.replace(ev, message=f"{ev.message} (about {_duration(self.eta(done))} left)")
        report(self.inner, ev)


# ------------------------------------------------------------------------------------------------------------ run
def run_check(lora: str, images: str, model: str, cfg: float = DEFAULT_CFG, rounds: int = DEFAULT_ROUNDS,
              out: Optional[PathLike] = None, progress: Optional[ProgressCallback] = None,
              cancel: Optional[CancelFlag] = None, resume: bool = False, *, echo: Any = None,
              tokenizer_dir: Optional[str] = None) -> CheckResult:
    """Run (or resume) a check into ``out`` and write its answer (answer.txt, check_grid.png, check.html).

    ``echo`` (e.g. ``print``) receives the recipe read and assumed and the cost estimate before the run starts.
    ``tokenizer_dir`` goes to ``load_pipeline`` (a single-file checkpoint's tokenizer, when not shipped). Bad input raises one line
    before anything loads (``check_inputs``); Cancelled / KeyboardInterrupt leave the check resumable.
    """
    from .chain import run_chain
    from .check_answer import write_answer
    from .lora import load_lora, save_lora
    from .models import load_pipeline
    from .recipe import read_recipe

    inputs = check_inputs(lora, images, model, cfg, rounds, out, resume)
    say = echo or (lambda text: None)
    pipeline = load_pipeline(inputs.model, tokenizer_dir=tokenizer_dir)
    lora_path, images_dir = Path(inputs.lora), Path(inputs.images)
    if inputs.toy_lora or inputs.toy_images:
        say(f"Making the toy inputs in {inputs.out / 'toy_inputs'} (toy images; a toy LoRA trained on them)")
        toy_lora, toy_images = make_toy_inputs(inputs.out / "toy_inputs", pipeline, inputs.toy_lora,
                                               inputs.toy_images, progress=progress, cancel=cancel)
        lora_path = toy_lora if inputs.toy_lora else lora_path
        images_dir = toy_images if inputs.toy_images else images_dir
    recipe, read, assumed = read_recipe(lora_path)
    say("\n".join(recipe_lines(read, assumed)))
    artist = load_lora(lora_path, pipeline)  # names mapped with this model's UNet, as the chain will read it
    init_path = inputs.out / "your_lora.safetensors"
    if not init_path.exists():
        save_lora(artist, init_path)
    config = check_config(inputs, recipe, str(init_path.resolve()), str(getattr(pipeline, "kind", "")))
    dataset = _captioned_images(images_dir, cancel)
    estimate = measure_estimate(pipeline, dataset, config, artist)
    say(estimate_text(estimate))
    run_chain(pipeline, dataset, config, inputs.chain_dir, progress=EtaProgress(progress, estimate, config),
              cancel=cancel, resume=inputs.resume and has_run(inputs.out), render=False)
    answer, grid = write_answer(inputs.out)
    return CheckResult(inputs.out, answer, grid, read, assumed, estimate)

