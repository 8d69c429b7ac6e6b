"""The toy captioned image set: coloured shapes on coloured backgrounds, drawn procedurally and deterministically.

Each image is one filled shape (circle, square or triangle) in one colour on a background of another colour, at a
random size and position, with sharp edges (one pixel of anti-aliasing). The caption names the shape, its colour and
the background colour: ``"a red circle on a blue background"``. The edges are the high-frequency detail that blur
destroys, drawn at a scale the toy model reproduces; the palette is moderately saturated, so over-guidance has room
to push colours towards saturation and clipping.

Everything follows from ``seed``: the same ``(n, seed, size)`` gives the same images, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
from PIL import Image, ImageDraw

from ..bounds import check as check_bound
from ..progress import CancelFlag, check_cancel

if TYPE_CHECKING:  # pragma: no cover
    from redifine_core.data import CaptionedImages

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Moderately saturated on purpose: leaves headroom for over-guidance to push saturation up. The six luminances are
# spread evenly (Rec. 709 luma 63, 91, 116, 142, 172, 201 of 255), so every shape differs from its background in
# brightness too: with two colours of equal luma (the first palette had red, blue and purple all at about 82), an
# image's luminance spectrum is almost all reconstruction error, and its high-frequency share means nothing.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 90, 70),
    "green": (70, 170, 80),
    "blue": (50, 90, 220),
    "yellow": (230, 205, 70),
    "purple": (110, 40, 150),
    "gray": (172, 172, 172),
}
COLORS: tuple[str, ...] = tuple(PALETTE)

#: Every word a toy caption uses (the toy tokenizer's vocabulary).
VOCABULARY: tuple[str, ...] = ("a", "on", "background") + SHAPES + COLORS

DEFAULT_SIZE = 32
MAX_TOY_BYTES = 2**30  # 1 GiB of uint8 pixels: 10000 images of 32 px take 30 MiB
DEFAULT_GRAIN = 0.0  # amplitude of an optional per-pixel luminance grain, as a fraction of full scale
SUPERSAMPLE = 2
"""Shapes are drawn at this multiple of the image size and box-averaged down: edges one pixel wide, at a scale the
toy VAE and UNet reproduce (a 2x VAE cannot reproduce per-pixel random grain, so D0 has none by default)."""


@dataclass(frozen=True)
class ToyAttributes:
    """What one toy image shows; ``size`` is the shape's half-extent and ``(x, y)`` its centre, in pixels."""

    shape: str
    color: str
    background: str
    size: int
    x: int
    y: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape={self.shape!r} is not allowed; use one of {SHAPES}")
        if self.color not in PALETTE:
            raise ValueError(f"color={self.color!r} is not allowed; use one of {COLORS}")
        if self.background not in PALETTE:
            raise ValueError(f"background={self.background!r} is not allowed; use one of {COLORS}")
        if self.color == self.background:
            raise ValueError(f"color={self.color!r} equals background; they must differ")
        if self.size < 2:
            raise ValueError(f"size={self.size!r} is too small; it must be >= 2 pixels")

    @property
    def caption(self) -> str:
        return caption_for(self.shape, self.color, self.background)


def caption_for(shape: str, color: str, background: str) -> str:
    """The caption for one image: ``"a <color> <shape> on a <background> background"``."""
    return f"a {color} {shape} on a {background} background"


def parse_caption(caption: str) -> dict[str, str]:
    """Invert :func:`caption_for`: ``{"shape", "color", "background"}``; raises ValueError for other text."""
    words = caption.strip().lower().split()
    if (
        len(words) != 7
        or words[0] != "a"
        or words[3:5] != ["on", "a"]
        or words[6] != "background"
        or words[1] not in PALETTE
        or words[2] not in SHAPES
        or words[5] not in PALETTE
    ):
        raise ValueError(
            f"caption={caption!r} is not a toy caption; expected 'a <color> <shape> on a <color> background' "
            f"with colors from {COLORS} and shapes from {SHAPES}"
        )
    return {"color": words[1], "shape": words[2], "background": words[5]}


def sample_attributes(rng: np.random.Generator, size: int = DEFAULT_SIZE) -> ToyAttributes:
    """Draw one image's attributes: uniform shape, colour, a different background colour, size and position."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color_i = int(rng.integers(len(COLORS)))
    bg_i = int(rng.integers(len(COLORS) - 1))
    if bg_i >= color_i:
        bg_i += 1
    half = int(rng.integers(max(2, round(size * 0.22)), max(3, round(size * 0.36)) + 1))
    margin = max(1, size // 16)
    lo, hi = half + margin, size - half - margin
    x = int(rng.integers(lo, max(lo, hi) + 1))
    y = int(rng.integers(lo, max(lo, hi) + 1))
    return ToyAttributes(shape, COLORS[color_i], COLORS[bg_i], half, x, y)


def render(attrs: ToyAttributes, size: int = DEFAULT_SIZE, grain: float = DEFAULT_GRAIN,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw ``attrs`` as a uint8 array [size, size, 3]; ``grain`` > 0 needs ``rng`` for the noise."""
    k = SUPERSAMPLE
    img = Image.new("RGB", (size * k, size * k), PALETTE[attrs.background])
    draw = ImageDraw.Draw(img)
    fill = PALETTE[attrs.color]
    x, y, h = attrs.x * k, attrs.y * k, attrs.size * k
    box = (x - h, y - h, x + h - 1, y + h - 1)
    if attrs.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif attrs.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle pointing up
        draw.polygon([(x, y - h), (x + h - 1, y + h - 1), (x - h, y + h - 1)], fill=fill)
    if k > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float32)
    if grain > 0:
        if rng is None:
            raise ValueError("grain > 0 needs an rng for the noise")
        noise = rng.uniform(-grain, grain, size=(size, size, 1)).astype(np.float32) * 255.0
        arr = arr + noise
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def generate(n: int, seed: int = 0, size: int = DEFAULT_SIZE, grain: float = DEFAULT_GRAIN,
             cancel: Optional[CancelFlag] = None) -> tuple[np.ndarray, list[str], list[ToyAttributes]]:
    """``n`` toy images as uint8 [n, size, size, 3], their captions and attributes, all determined by ``seed``.

    ``cancel`` is checked before each image (``progress.Cancelled``)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer")
    seed = check_bound("seed", seed, "seed")
    if not isinstance(size, int) or isinstance(size, bool) or not 16 <= size <= 1024:
        raise ValueError(f"size={size!r} must be an integer in [16, 1024]")
    if n * size * size * 3 > MAX_TOY_BYTES:
        raise ValueError(f"n={n}, size={size}: the toy set would take {n * size * size * 3 / 2**30:.1f} GiB; keep "
                         f"n * size * size * 3 under {MAX_TOY_BYTES / 2**30:.0f} GiB")
    if not 0.0 <= grain <= 0.25:
        raise ValueError(f"grain={grain!r} must be in [0, 0.25]")
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    attrs: list[ToyAttributes] = []
    for i in range(n):
        check_cancel(cancel)
        a = sample_attributes(rng, size)
        images[i] = render(a, size, grain, rng)
        attrs.append(a)
    return images, [a.caption for a in attrs], attrs


def balanced_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` captions cycling through every (shape, colour, background) combination in a seeded order."""
    combos = [(s, c, b) for s in SHAPES for c in COLORS for b in COLORS if b != c]
    order = np.random.default_rng(seed).permutation(len(combos))
    return [caption_for(*combos[order[i % len(combos)]]) for i in range(n)]


def make_toy_dataset(n: int, seed: int = 0, size: int = DEFAULT_SIZE, grain: float = DEFAULT_GRAIN,
                     cancel: Optional[CancelFlag] = None) -> "CaptionedImages":
    """The toy set as :class:`redifine_core.data.CaptionedImages` (D0 of a toy chain)."""
    from redifine_core.data import CaptionedImages

    n = check_bound("images", n, "toy image count")  # a user-facing set: the documented bound (generate has none)
    images, captions, _ = generate(n, seed, size, grain, cancel)
    return CaptionedImages.from_images([Image.fromarray(im) for im in images], captions)
