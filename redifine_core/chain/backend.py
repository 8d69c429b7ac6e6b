"""The operations a chain run calls, bound to the real modules by ``default_backend()``: a seam for tests.

``ChainBackend`` names what a unit needs: finetune, generate (streamed when ``sampling.generate_batches`` exists),
LoRA save/load, set summaries and metrics, the verdict, and the dataset constructor. Tests pass fakes with the same
signatures to drive the loop exactly and fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence


@dataclass
class ChainBackend:
    """The operations the chain calls (a seam for tests); ``default_backend()`` binds the real modules.

    ``generate_batches`` (optional) streams ``(indices, images)``; without it ``generate`` is called per batch.
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
        generate_batches=getattr(sampling, "generate_batches", None),
        change_intervals=metrics.change_intervals,
    )
