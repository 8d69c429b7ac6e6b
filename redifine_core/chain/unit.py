"""One unit of a chain run: train LoRA_i on D_i, generate D_{i+1} streamed to disk, measure it, mark it DONE.

A *unit* is one (iteration, method, replicate seed) step: train LoRA_i on D_i, generate D_{i+1} from D0's captions,
measure it. Each unit is a pure function of files on disk (the RunFolder) and is marked DONE last; a resumed run
redoes only unfinished units and gives exactly the files an uninterrupted run gives, whichever process runs it.

Our choices, documented:

* Seeds. Image k of caption c in replicate S is generated with ``image_seed(S, c, k)`` (SHA-256 of the triple): the
  same initial noise for that image in every iteration and method, so differences are the model's, not the noise's.
  Training in replicate S, iteration i uses ``train_seed(train.seed, S, i)``, the same for every method.
* Data. D_{i+1} is the 8-bit PNG set written at iteration i; training and metrics use those 8-bit images read back
  from disk. D_0 is the user's images centre-cropped and resized to the generation size (``reference/images``).
* Memory. Generation streams: each batch is written as PNGs (atomically) and folded into a ``metrics.SetSummary``
  (per-image statistics and feature vectors), so no generated set is ever held as float images; the previous set's
  summary is rebuilt from its PNGs, and the next training set is read from the PNGs as 8-bit images.
* LoRAs. Each LoRA is saved (kohya layout) and read back before it is used for sampling or as ``init_lora``. With
  ``config.init_lora`` iteration 0's LoRA is that file, copied untrained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ..atomic import save_png, write_json
from ..progress import CancelFlag, ProgressCallback, ProgressEvent, check_cancel, report
from .backend import ChainBackend
from .config import ChainConfig, MethodConfig
from .run_folder import RunFolder, read_png
from .start import now


# --------------------------------------------------------------------------------------------------------- seeds
def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big")


def image_seed(replicate: int, caption_index: int, k: int) -> int:
    """The sampling seed of image ``k`` of caption ``caption_index`` in replicate ``replicate`` (0 <= seed < 2**32).

    Independent of the iteration and the method: the same image position gets the same initial noise all along.
    """
    return _hash_int(f"redifine-image:{int(replicate)}:{int(caption_index)}:{int(k)}")


def train_seed(base: int, replicate: int, iteration: int) -> int:
    """The training seed at ``iteration`` of replicate ``replicate`` (shared by all methods: a paired comparison)."""
    return _hash_int(f"redifine-train:{int(base)}:{int(replicate)}:{int(iteration)}")


# ------------------------------------------------------------------------------------------------------ results
@dataclass
class ChainResult:
    """What a run produced: its folder, final status, and verdict labels[method][seed] = [label per iteration]."""

    run_dir: Path
    status: str
    verdicts: dict[str, dict[int, list[str]]] = field(default_factory=dict)
    report: Optional[Path] = None


@dataclass(frozen=True)
class Unit:
    """One step of the run: ``index`` in run order, the iteration, the method and the replicate seed."""

    index: int
    iteration: int
    method: MethodConfig
    seed: int

    @property
    def label(self) -> str:
        return f"{self.method.name} seed {self.seed} iter {self.iteration}"


def units(config: ChainConfig) -> list[Unit]:
    """Every unit of a run, iteration-major (then method, then seed)."""
    out: list[Unit] = []
    for i in range(config.iterations):
        for m in config.methods:
            for s in config.seeds:
                out.append(Unit(len(out), i, m, s))
    return out


def _to_uint8(images: Any) -> np.ndarray:
    """[N, H, W, 3] float in [0, 1] (torch or numpy) -> uint8, rounding to nearest."""
    arr = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images, dtype=np.float32)
    return np.clip(np.rint(np.clip(arr, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


def _fit(image: Any, width: int, height: int) -> Any:
    """Centre-crop to the aspect ratio and resize to (width, height), RGB 8-bit (unchanged when already that size)."""
    from PIL import Image, ImageOps

    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def _generation_size(pipeline: Any, config: ChainConfig) -> tuple[int, int]:
    res = getattr(config.train, "resolution", None) or int(getattr(pipeline, "default_size", 512))
    return int(config.width or res), int(config.height or res)


def _floats(d: dict) -> dict[str, float]:
    """The numeric entries of a metrics dict, as plain floats (strings such as "features" dropped)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (str, bool)) or v is None:
            continue
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


# --------------------------------------------------------------------------------------------------------- run
@dataclass
class _Run:
    """What every unit of one run shares."""

    pipeline: Any
    config: ChainConfig
    folder: RunFolder
    captions: list[str]
    reference: list  # D0 as PIL images at the generation size
    size: tuple[int, int]
    backend: ChainBackend
    manifest: dict
    progress: Optional[ProgressCallback]
    cancel: Optional[CancelFlag]
    result: ChainResult
    features: Any = None  # the run's feature extractor (resolved once)
    reference_summary: Any = None
    train_processes: Any = None  # parallel="data": the processes every LoRA is trained over (distributed.Processes)
    before_train: Any = None  # parallel="data", rank 0: tells the other processes which unit to train

    def stage(self, unit: Unit, stage: str, step: Optional[int] = None, message: Optional[str] = None) -> None:
        ctx = {"unit": unit.index, "method": unit.method.name, "seed": unit.seed, "iteration": unit.iteration}
        report(self.progress, ProgressEvent(
            phase="chain", step=unit.index if step is None else step, total=self.config.n_units(),
            message=f"{unit.label}: {message or stage}", extra={**ctx, "stage": stage}))

    def nested(self, unit: Unit) -> ProgressCallback:
        ctx = {"unit": unit.index, "method": unit.method.name, "seed": unit.seed, "iteration": unit.iteration}

        def forward(ev: ProgressEvent) -> None:
            ev.extra = {**(ev.extra or {}), **ctx}
            report(self.progress, ev)

        return forward


def _write_reference(run: _Run) -> None:
    """D0 as used, its captions and statistics; the run's feature set and D0's summary (read back from the PNGs)."""
    folder = run.folder
    for c, im in enumerate(run.reference):
        if not folder.reference_image(c).exists():
            save_png(folder.reference_image(c), im)
    if not folder.reference_captions_json.exists():
        write_json(folder.reference_captions_json, run.captions)
    run.features = run.backend.feature_extractor(run.config.features)
    run.reference_summary = _summary_of(run, [folder.reference_image(c) for c in range(len(run.reference))])
    if not folder.reference_metrics_json.exists():
        stats = run.backend.image_statistics(run.reference_summary)
        write_json(folder.reference_metrics_json, {"metrics": _floats(stats)})


def _summary_of(run: _Run, paths: list[Path]) -> Any:
    """The summary of a set on disk, read in generation-sized batches (the batching its summary was built with)."""
    return run.backend.summary_from_pngs(paths, batch_size=run.config.batch_size, cancel=run.cancel,
                                         features=run.features)


def _run_unit(run: _Run, unit: Unit) -> None:
    folder, m, S, i = run.folder, unit.method.name, unit.seed, unit.iteration
    check_cancel(run.cancel)
    if folder.is_done(m, S, i):
        run.stage(unit, "done")
        _record_verdict(run.result, m, S, folder.read_metrics(m, S, i))
        return
    folder.clear_iteration(m, S, i)  # partial iteration from an interrupted run: redo it from scratch
    lora = _train(run, unit)
    check_cancel(run.cancel)
    generated = _generate(run, unit, lora)
    check_cancel(run.cancel)
    record = _measure(run, unit, generated)
    folder.mark_done(m, S, i, now())
    _record_verdict(run.result, m, S, record)
    run.stage(unit, "verdict", step=unit.index + 1, message=record["verdict"]["label"])


def _training_set(run: _Run, unit: Unit) -> Any:
    """D_i: the user's images for iteration 0, else the previous iteration's PNGs read back as 8-bit images."""
    if unit.iteration == 0:
        return run.backend.make_dataset(list(run.reference), list(run.captions))
    from PIL import Image

    prev = (unit.method.name, unit.seed, unit.iteration - 1)
    images = [Image.fromarray(read_png(p)) for p in run.folder.iteration_images(*prev)]
    return run.backend.make_dataset(images, run.folder.read_captions(*prev))


def train_lora(run: _Run, unit: Unit) -> tuple[Any, Any, int]:
    """Finetune LoRA_i on D_i: (TrainResult, its TrainConfig, |D_i|). With ``run.train_processes`` every process of
    the launch calls this for the same unit (one LoRA trained data-parallel)."""
    folder, config, m, S, i = run.folder, run.config, unit.method.name, unit.seed, unit.iteration
    if run.before_train is not None:
        run.before_train(unit)
    d_i = _training_set(run, unit)
    run.stage(unit, "training")
    init = None
    if config.protocol == "continue" and i > 0:
        init = run.backend.load_lora(folder.lora_path(m, S, i - 1))
    elif config.init_lora is not None:
        init = run.backend.load_lora(config.init_lora)
    tcfg = dataclasses.replace(config.train, cond_drop=float(unit.method.cond_drop or 0.0),
                               seed=train_seed(getattr(config.train, "seed", 0), S, i))
    extra = {"processes": run.train_processes} if run.train_processes is not None else {}
    tres = run.backend.finetune(run.pipeline, d_i, tcfg, progress=run.nested(unit), cancel=run.cancel, init_lora=init,
                                **extra)
    return tres, tcfg, len(d_i.captions)


def _train(run: _Run, unit: Unit) -> Any:
    """LoRA_i on D_i, saved and read back (sampling uses exactly what a resumed run would read)."""
    folder, config, m, S, i = run.folder, run.config, unit.method.name, unit.seed, unit.iteration
    if config.init_lora is not None and i == 0:  # iteration 0 is the given LoRA itself, copied into the run
        run.backend.save_lora(run.backend.load_lora(config.init_lora), folder.lora_path(m, S, i))
        write_json(folder.train_json(m, S, i), {"losses": [], "seconds": 0.0, "init_lora": config.init_lora,
                                                "protocol": config.protocol, "dataset_size": 0})
        return run.backend.load_lora(folder.lora_path(m, S, i))
    t0 = time.perf_counter()
    tres, tcfg, n_train = train_lora(run, unit)
    run.backend.save_lora(tres.lora, folder.lora_path(m, S, i))
    write_json(folder.train_json(m, S, i), {
        "losses": [float(x) for x in tres.losses],
        "seconds": float(getattr(tres, "seconds", time.perf_counter() - t0)),
        "seed": tcfg.seed, "cond_drop": tcfg.cond_drop, "protocol": config.protocol, "dataset_size": n_train,
    })
    return run.backend.load_lora(folder.lora_path(m, S, i))


def _batches(run: _Run, unit: Unit, prompts: list[str], seeds: list[int], lora: Any) -> Iterator[tuple[list[int], Any]]:
    """(indices, float images) per batch from the backend's stream; closing it removes the LoRA at once, also on
    error or cancel."""
    (width, height), config, b = run.size, run.config, run.config.batch_size
    kw = dict(steps=config.steps, negative_prompt=config.negative_prompt, sampler=config.sampler, width=width,
              height=height, batch_size=b, lora=lora, lora_scale=config.lora_scale, iteration=unit.iteration,
              progress=run.nested(unit), cancel=run.cancel)
    if config.train.clip_skip is not None:  # sample with the text layer the LoRA was trained on
        kw["clip_skip"] = config.train.clip_skip
    stream = run.backend.generate_batches(run.pipeline, prompts, unit.method.guidance, seeds=seeds, **kw)
    with contextlib.closing(stream):
        for idx, images in stream:
            yield list(idx), images


def _generate(run: _Run, unit: Unit, lora: Any) -> Any:
    """D_{i+1}, streamed: each batch is written as PNGs and added to the set's summary, then dropped."""
    from PIL import Image

    folder, m, S, i = run.folder, unit.method.name, unit.seed, unit.iteration
    n, ipc = len(run.captions), run.config.images_per_caption
    prompts = [run.captions[c] for c in range(n) for _ in range(ipc)]
    names = [folder.image_name(c, k) for c in range(n) for k in range(ipc)]  # sorted order == generation order
    seeds = [image_seed(S, c, k) for c in range(n) for k in range(ipc)]
    run.stage(unit, "sampling")
    summary = run.backend.new_summary(features=run.features)
    written = 0
    with contextlib.closing(_batches(run, unit, prompts, seeds, lora)) as batches:
        for idx, images in batches:
            u8 = _to_uint8(images)
            del images
            if u8.shape[0] != len(idx) or (idx and idx[0] != written):
                raise RuntimeError(f"generation returned images {idx[:1]}.. ({u8.shape[0]} images) after {written}; "
                                   f"expected them in order, {len(names)} in all")
            for j, arr in zip(idx, u8):
                save_png(folder.images_dir(m, S, i) / names[j], Image.fromarray(arr))
            summary.add(u8, cancel=run.cancel)
            written += len(idx)
    if written != len(names):
        raise RuntimeError(f"generation returned {written} images, expected {len(names)}")
    write_json(folder.captions_json(m, S, i), prompts)
    return summary


def _measure(run: _Run, unit: Unit, generated: Any) -> dict:
    """metrics.json of D_{i+1} against D0 and D_i, with the verdict against the unit's own iteration 0."""
    folder, config, m, S, i = run.folder, run.config, unit.method.name, unit.seed, unit.iteration
    run.stage(unit, "metrics")
    previous = run.reference_summary if i == 0 else _summary_of(run, folder.iteration_images(m, S, i - 1))
    raw = run.backend.set_metrics(generated, run.reference_summary, previous, features=run.features,
                                  progress=run.nested(unit), cancel=run.cancel)
    features = str(raw.get("features", config.features))
    metrics = _floats(raw)
    metrics["n_images"] = float(len(generated))  # the verdict reads small sets as inconclusive
    if i > 0 and run.backend.change_intervals is not None:  # each change's interval from the images themselves
        first = previous if i == 1 else _summary_of(run, folder.iteration_images(m, S, 0))
        metrics.update(_floats(run.backend.change_intervals(generated, first, run.reference_summary)))
    base = metrics if i == 0 else folder.read_metrics(m, S, 0)["metrics"]
    v = run.backend.verdict(metrics, base)
    record = {
        "method": m, "seed": S, "iteration": i, "metrics": metrics,
        "verdict": {"label": str(v.label), "reasons": [str(r) for r in v.reasons]}, "features": features,
    }
    write_json(folder.metrics_json(m, S, i), record)
    if run.manifest.get("features") != features:
        run.manifest.update(features=features, updated=now())
        folder.write_manifest(run.manifest)
    return record


def _record_verdict(result: ChainResult, method: str, seed: int, record: dict) -> None:
    _record_verdict_to(result.verdicts, method, seed, record)


def _record_verdict_to(verdicts: dict, method: str, seed: int, record: dict) -> None:
    labels = verdicts.setdefault(method, {}).setdefault(int(seed), [])
    labels.append(str(record.get("verdict", {}).get("label", "")))
