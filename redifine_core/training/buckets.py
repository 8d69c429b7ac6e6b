"""Aspect-ratio buckets: training sizes of about one area in several shapes, and the order samples are drawn in.

    bucket_sizes(resolution, step) -> [(height, width), ...]; side_range(resolution, step) -> (smallest, largest)
    assign_buckets(sizes, resolution, step) -> [(height, width) per image]
    crop_sizes(pil_images, resolution, step, unit) -> [(height, width) per image]   (step 0: the square)
    BatchOrder(n, batch_size, generator, buckets=None).next() -> dataset indices of one micro-batch

The buckets are sd-scripts' (``make_bucket_resolutions``): sides are multiples of ``step`` between ``resolution // 2``
and ``2 * resolution`` with an area of at most ``resolution ** 2``, plus the square. Each image goes to the bucket whose
aspect ratio is nearest its own; it is resized to cover the bucket and cropped to it (see :mod:`.caches`). A
micro-batch holds one bucket's images: every epoch each bucket's images are shuffled and repeated to whole batches,
and the batches are shuffled. Without buckets the order is a fresh permutation of the data set per epoch.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch


def side_range(resolution: int, step: int) -> tuple[int, int]:
    """The smallest and the largest side of a bucket (sd-scripts' min_bucket_reso and max_bucket_reso)."""
    return max(step, resolution // 2 // step * step), 2 * resolution


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    """Every (height, width) bucket for ``resolution`` (the square's side) and ``step`` (sides' multiple)."""
    lo, hi = side_range(resolution, step)
    sizes = {(resolution, resolution)}
    for width in range(lo, hi + 1, step):
        height = min(hi, resolution * resolution // width // step * step)
        if height >= lo:
            sizes.update({(height, width), (width, height)})
    return sorted(sizes)


def assign_buckets(sizes: Sequence[tuple[int, int]], resolution: int, step: int) -> list[tuple[int, int]]:
    """The bucket of each (height, width) image size: the one whose width / height is nearest, as in sd-scripts."""
    buckets = bucket_sizes(resolution, step)
    ratios = [w / h for h, w in buckets]
    return [buckets[min(range(len(buckets)), key=lambda k: (abs(ratios[k] - w / h), k))] for h, w in sizes]


def crop_sizes(pil_images: Sequence[Any], resolution: int, step: int, unit: int) -> list[tuple[int, int]]:
    """The size each image is cropped to: its bucket, or the square ``resolution`` when ``step`` is 0. ``unit``: the
    multiple of pixels the model needs (VAE factor x UNet downsampling); ``step`` must be a multiple of it."""
    if not step:
        return [(resolution, resolution)] * len(pil_images)
    if step % unit:
        raise ValueError(f"TrainConfig.bucket_step = {step} is invalid for this model: must be a multiple of {unit} "
                         "(the VAE's and the UNet's downsampling)")
    return assign_buckets([(im.height, im.width) for im in pil_images], resolution, step)


class BatchOrder:
    """The dataset indices of each micro-batch, drawn from ``generator`` only."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator,
                 buckets: Optional[Sequence[tuple[int, int]]] = None) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.buckets = list(buckets) if buckets is not None else None
        self._queue: list = []

    def next(self) -> list[int]:
        B = self.batch_size
        if self.buckets is None:
            while len(self._queue) < B:
                self._queue.extend(torch.randperm(self.n, generator=self.generator).tolist())
            out, self._queue = self._queue[:B], self._queue[B:]
            return out
        if not self._queue:
            self._queue = self._epoch()
        return self._queue.pop(0)

    def _epoch(self) -> list[list[int]]:
        B, groups = self.batch_size, {}
        for i, b in enumerate(self.buckets):  # type: ignore[arg-type]
            groups.setdefault(b, []).append(i)
        batches = []
        for key in sorted(groups):
            members = groups[key]
            order = [members[k] for k in torch.randperm(len(members), generator=self.generator).tolist()]
            whole = -(-len(order) // B) * B
            order = (order * -(-whole // len(order)))[:whole]
            batches += [order[s:s + B] for s in range(0, whole, B)]
        return [batches[k] for k in torch.randperm(len(batches), generator=self.generator).tolist()]
