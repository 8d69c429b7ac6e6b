"""The toy datasets by name (``TOY_DATASETS``) and the training sets of the toy models (``TRAINING_SETS``).

Each :class:`ToyDataset` bundles what a study needs to run a chain on it: the generator, balanced captions for
sampling, the attribute checker that measures prompt fidelity, the image size and the toy model trained on it
(a ``load_pipeline`` source).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..progress import CancelFlag
from . import dataset, textures


@dataclass(frozen=True)
class ToyDataset:
    """One named toy dataset: ``generate(n, seed, size, cancel) -> (uint8 [n, size, size, 3], captions, attributes)``,
    ``balanced_captions(n, seed)``, ``check(images, captions) -> {"full", ...}`` and the model trained on it."""

    name: str
    description: str
    size: int
    model: str
    generate: Callable
    balanced_captions: Callable[[int, int], list[str]]
    check: Callable
    vocabulary: tuple[str, ...]

    def images(self, n: int, seed: int = 0, cancel: Optional[CancelFlag] = None) -> tuple[np.ndarray, list[str]]:
        """``n`` images of this set at its size and their captions."""
        images, captions, _ = self.generate(n, seed, self.size, cancel=cancel)
        return images, captions


def _check_shapes(images, captions):
    from .checker import check

    return check(images, captions)


def _check_textures(images, captions):
    from .texture_checker import check_textures

    return check_textures(images, captions)


def _check_patterned(images, captions):
    from .texture_checker import check_patterned_shapes

    return check_patterned_shapes(images, captions)


def _shapes_generate(n, seed=0, size=dataset.DEFAULT_SIZE, cancel=None):
    return dataset.generate(n, seed, size, cancel=cancel)


TOY_DATASETS: dict[str, ToyDataset] = {
    "shapes": ToyDataset("shapes", "one flat coloured shape on a coloured background, 32 px", dataset.DEFAULT_SIZE,
                         "toy", _shapes_generate, dataset.balanced_captions, _check_shapes, dataset.VOCABULARY),
    "textures": ToyDataset("textures", "a two-colour texture (stripes, dots, checks; fine 4 px or coarse 8 px), 32 px",
                           textures.TEXTURE_SIZE, "toy:bed", textures.generate_textures,
                           textures.balanced_texture_captions, _check_textures, textures.TEXTURE_VOCABULARY),
    "patterned_shapes": ToyDataset("patterned_shapes", "one shape filled plain or with a fine 4 px pattern, 32 px",
                                   textures.TEXTURE_SIZE, "toy:bed", textures.generate_patterned_shapes,
                                   textures.balanced_patterned_captions, _check_patterned,
                                   textures.PATTERNED_SHAPES_VOCABULARY),
}

TRAINING_SETS: dict[str, tuple[str, ...]] = {"shapes": ("shapes",), "bed": ("textures", "patterned_shapes")}
"""The datasets each toy architecture (``model_config.ARCHITECTURES``) is trained on, in equal shares."""


def training_images(arch: str, n: int, seed: int, size: int) -> tuple[np.ndarray, list[str]]:
    """``n`` training images of ``arch``'s datasets: dataset j of k gives images j, j + k, ..., drawn from ``seed + j``
    (for one dataset, exactly ``generate(n, seed, size)``)."""
    names = TRAINING_SETS[arch]
    k = len(names)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions: list[str] = [""] * n
    for j, name in enumerate(names):
        m = len(range(j, n, k))
        if m == 0:
            continue
        ims, caps, _ = TOY_DATASETS[name].generate(m, seed + j, size)
        images[j::k] = ims
        captions[j::k] = caps
    return images, captions
