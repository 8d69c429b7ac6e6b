"""The operations a chain run calls, bound to the real modules by ``default_backend()``: a seam for tests.

``ChainBackend`` names what a unit needs: finetune, generate (streamed when ``sampling.generate_batches`` exists),
LoRA save/load, set summaries and metrics, the verdict, and the dataset constructor. Tests pass fakes with the same
signatures to drive the loop exactly and fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from ..progress import CancelFlag
from .run_folder import read_png


class _ImageStack:
    """A stand-in set summary that keeps the 8-bit images (used only when metrics has no SetSummary)."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []

    def add(self, images: np.ndarray, cancel: Optional[CancelFlag] = None) -> None:
        self.arrays.extend(np.asarray(images, dtype=np.uint8))

    def __len__(self) -> int:
        return len(self.arrays)

    @classmethod
    def from_pngs(cls, paths: Sequence[Path], batch_size: int = 16, cancel: Optional[CancelFlag] = None) -> Any:
        s = cls()
        for p in paths:
            s.add(read_png(p)[None])
        return s

    def images(self) -> np.ndarray:
        return np.stack(self.arrays)


@dataclass
class ChainBackend:
    """The operations the chain calls (a seam for tests); ``default_backend()`` binds the real modules.

    ``generate_batches`` (optional) streams ``(indices, images)``; without it ``generate`` is called per batch.
    ``new_summary()`` gives an empty set summary with ``add(uint8 images [b, H, W, 3], cancel=)``,
    ``summary_from_pngs(paths, cancel=)`` the summary of a set on disk; ``set_metrics`` takes summaries.
    """

    finetune: Callable[..., Any]  # (pipeline, dataset, train_config, progress, cancel, init_lora) -> TrainResult
    generate: Callable[..., Any]  # sampling.generate
    save_lora: Callable[..., Any]
    load_lora: Callable[..., Any]
    set_metrics: Callable[..., dict]
    verdict: Callable[..., Any]
    make_dataset: Callable[..., Any]  # (list of PIL images, list of captions) -> CaptionedImages
    image_statistics: Callable[..., dict]
    generate_batches: Optional[Callable[..., Iterator[tuple[Sequence[int], Any]]]] = None
    new_summary: Callable[[], Any] = _ImageStack
    summary_from_pngs: Callable[..., Any] = _ImageStack.from_pngs


def default_backend() -> ChainBackend:
    from .. import metrics, sampling
    from ..data import CaptionedImages
    from ..lora import load_lora, save_lora
    from ..training import finetune_lora

    def finetune(pipeline, dataset, config, progress=None, cancel=None, init_lora=None):
        return finetune_lora(pipeline, dataset, config, progress=progress, cancel=cancel, init_lora=init_lora)

    summary = getattr(metrics, "SetSummary", None)
    set_metrics = metrics.set_metrics
    if summary is None:  # metrics without streaming summaries: hand it the 8-bit images

        def set_metrics(generated, reference, previous=None, **kw):  # type: ignore[no-redef]
            return metrics.set_metrics(generated.images(), reference.images(),
                                       None if previous is None else previous.images(), **kw)

    return ChainBackend(
        finetune=finetune,
        generate=sampling.generate,
        save_lora=save_lora,
        load_lora=load_lora,
        set_metrics=set_metrics,
        verdict=metrics.verdict,
        make_dataset=lambda images, captions: CaptionedImages.from_images(list(images), list(captions)),
        image_statistics=metrics.image_statistics,
        generate_batches=getattr(sampling, "generate_batches", None),
        new_summary=summary if summary is not None else _ImageStack,
        summary_from_pngs=summary.from_pngs if summary is not None else _ImageStack.from_pngs,
    )


