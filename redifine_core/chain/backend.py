"""The operations a chain run calls, bound to the real modules by ``default_backend()``: a seam for tests.

``ChainBackend`` names what a unit needs: finetune, streamed generation, LoRA save/load, set summaries and metrics, the verdict, and the dataset constructor. Tests pass fakes with the same
signatures to drive the loop exactly and fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence


@dataclass
class ChainBackend:
    """The operations the chain calls (a seam for tests); ``default_backend()`` binds the real modules.

    ``generate_batches`` streams ``(indices, images)``; a backend that gives only ``generate`` (one call per batch,
    as test fakes do) gets a stream built from it (``per_batch``).
    Set summaries: ``feature_extractor(spec)`` resolves the run's feature set once (Inception loads once);
    ``new_summary(features=fx)`` gives an empty summary with ``add(uint8 images [b, H, W, 3], cancel=)``;
    ``summary_from_pngs(paths, batch_size=, cancel=, features=fx)`` summarises a set on disk; ``set_metrics`` and
    ``image_statistics`` take summaries (``metrics.SetSummary``).
    """

    finetune: Callable[..., Any]  # (pipeline, dataset, train_config, progress, cancel, init_lora[, processes])
    generate: Callable[..., Any]  # sampling.generate
    save_lora: Callable[..., Any]
    load_lora: Callable[..., Any]
    set_metrics: Callable[..., dict]
    verdict: Callable[..., Any]
    make_dataset: Callable[..., Any]  # (list of PIL images, list of captions) -> CaptionedImages
    image_statistics: Callable[..., dict]
    new_summary: Callable[..., Any]
    summary_from_pngs: Callable[..., Any]
    feature_extractor: Callable[[Any], Any] = lambda spec: spec
    generate_batches: Optional[Callable[..., Iterator[tuple[Sequence[int], Any]]]] = None
    change_intervals: Optional[Callable[..., dict]] = None  # (summary_i, summary_0, reference) -> interval keys

    def __post_init__(self) -> None:
        if self.generate_batches is None:
            self.generate_batches = per_batch(lambda *a, **k: self.generate(*a, **k))  # the field as it is then


def per_batch(generate: Callable[..., Any]) -> Callable[..., Iterator[tuple[list[int], Any]]]:
    """A ``generate_batches`` stream from a ``generate(pipeline, prompts, schedule, seeds=, batch_size=, ...)`` that
    returns one batch of images per call (per-image seeds make the images independent of the batching)."""

    def stream(pipeline, prompts, schedule, seeds, batch_size, **kw):
        for start in range(0, len(prompts), batch_size):
            idx = list(range(start, min(start + batch_size, len(prompts))))
            yield idx, generate(pipeline, [prompts[j] for j in idx], schedule, seeds=[seeds[j] for j in idx],
                                batch_size=batch_size, **kw)

    return stream


def default_backend() -> ChainBackend:
    """The real modules: training.finetune_lora, sampling.generate_batches, lora files, metrics.SetSummary."""
    from .. import metrics, sampling
    from ..data import CaptionedImages
    from ..lora import load_lora, save_lora
    from ..training import finetune_lora

    def finetune(pipeline, dataset, config, progress=None, cancel=None, init_lora=None, processes=None):
        return finetune_lora(pipeline, dataset, config, progress=progress, cancel=cancel, init_lora=init_lora,
                             processes=processes)

    return ChainBackend(
        finetune=finetune,
        generate=sampling.generate,
        save_lora=save_lora,
        load_lora=load_lora,
        set_metrics=metrics.set_metrics,
        verdict=metrics.verdict,
        make_dataset=lambda images, captions: CaptionedImages.from_images(list(images), list(captions)),
        image_statistics=metrics.image_statistics,
        new_summary=metrics.SetSummary,
        summary_from_pngs=metrics.SetSummary.from_pngs,
        feature_extractor=metrics.get_feature_extractor,
        generate_batches=sampling.generate_batches,
        change_intervals=metrics.change_intervals,
    )
