"""Two toy image sets whose captions name fine detail, drawn procedurally and deterministically (32 px by default).

- ``textures``: the whole image is one two-colour texture: stripes (horizontal, vertical or diagonal), dots or
  checks, at a fine (4 px) or coarse (8 px) period, e.g. ``"a fine diagonal red stripes on a blue background"``.
- ``patterned_shapes``: one shape (circle, square, triangle) on a plain background, filled with a fine pattern of its
  colour and a dark shade of it (striped, dotted, checked) or plain, e.g. ``"a striped red circle on a blue background"``.

The captions name detail finer than a few pixels, so a model that averages over captions (what low classifier-free
guidance allows) loses it. Everything follows from ``seed``: the same ``(n, seed, size)`` gives the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..bounds import check as check_bound
from ..progress import CancelFlag, check_cancel
from .dataset import COLORS, PALETTE, SHAPES, MAX_TOY_BYTES

TEXTURE_SIZE = 32
SCALES: dict[str, int] = {"fine": 4, "coarse": 8}
"""Pattern period in pixels: 4 px puts a fine pattern's fundamental at the high-frequency cutoff (0.25 cycles/px)."""
PATTERNS: tuple[str, ...] = ("stripes", "dots", "checks")
ORIENTATIONS: tuple[str, ...] = ("horizontal", "vertical", "diagonal")
FILLS: tuple[str, ...] = ("plain", "striped", "dotted", "checked")
FILL_PATTERN = {"striped": "stripes", "dotted": "dots", "checked": "checks"}
SHADE = 0.45
"""A patterned shape's second colour is its colour times SHADE."""
SUPERSAMPLE = 4

TEXTURE_VOCABULARY: tuple[str, ...] = ("a", "on", "background", *SCALES, *ORIENTATIONS, *PATTERNS, *COLORS)
PATTERNED_SHAPES_VOCABULARY: tuple[str, ...] = ("a", "on", "background", *FILLS, *SHAPES, *COLORS)


# ---------------------------------------------------------------------------------------------------------------
# textures
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextureAttributes:
    """One texture image: ``pattern`` of ``color`` on ``background``; ``orientation`` only for stripes (else "")."""

    scale: str
    pattern: str
    orientation: str
    color: str
    background: str
    phase_x: int = 0
    phase_y: int = 0

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r} is not allowed; use one of {tuple(SCALES)}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern={self.pattern!r} is not allowed; use one of {PATTERNS}")
        if (self.pattern == "stripes") != (self.orientation in ORIENTATIONS):
            raise ValueError(f"orientation={self.orientation!r}: stripes take one of {ORIENTATIONS}, other "
                             "patterns none ('')")
        _check_colors(self.color, self.background)

    @property
    def caption(self) -> str:
        return texture_caption(self.scale, self.pattern, self.orientation, self.color, self.background)


def texture_caption(scale: str, pattern: str, orientation: str, color: str, background: str) -> str:
    """``"a <scale> [<orientation>] <color> <pattern> on a <background> background"``."""
    words = ["a", scale] + ([orientation] if pattern == "stripes" else []) + [color, pattern]
    return " ".join(words) + f" on a {background} background"


def parse_texture_caption(caption: str) -> dict[str, str]:
    """Invert :func:`texture_caption`: ``{"scale", "pattern", "orientation", "color", "background"}``."""
    w = caption.strip().lower().split()
    ok = len(w) in (8, 9) and w[0] == "a" and w[1] in SCALES and w[-4:-2] == ["on", "a"] and w[-1] == "background"
    if ok:
        orientation = w[2] if len(w) == 9 else ""
        color, pattern, background = w[-6], w[-5], w[-2]
        ok = (pattern in PATTERNS and color in PALETTE and background in PALETTE
              and (pattern == "stripes") == (orientation in ORIENTATIONS))
    if not ok:
        raise ValueError(f"caption={caption!r} is not a texture caption; expected 'a <fine|coarse> [<orientation>] "
                         f"<color> <stripes|dots|checks> on a <color> background' (orientation only for stripes)")
    return {"scale": w[1], "pattern": pattern, "orientation": orientation, "color": color, "background": background}


def pattern_mask(pattern: str, orientation: str, period: int, size: int, phase_x: int = 0, phase_y: int = 0,
                 supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Ink coverage in [0, 1] of ``pattern`` [size, size], drawn at ``supersample`` x and box-averaged down."""
    k = supersample
    c = (np.arange(size * k) + 0.5) / k
    x, y = c[None, :] + phase_x, c[:, None] + phase_y
    if pattern == "stripes":
        u = {"horizontal": y + 0 * x, "vertical": x + 0 * y, "diagonal": x + y}[orientation]
        ink = (u % period) < period / 2
    elif pattern == "checks":
        ink = ((np.floor(x / (period / 2)) + np.floor(y / (period / 2))) % 2) == 0
    else:  # dots: a disc of radius period/4 (fine: a 2x2 block) in each period x period cell
        dx, dy = (x % period) - period / 2, (y % period) - period / 2
        ink = (np.abs(dx) < period / 4) & (np.abs(dy) < period / 4) if period <= 4 else dx**2 + dy**2 < (period / 3.2) ** 2
    return ink.reshape(size, k, size, k).mean(axis=(1, 3))


def render_texture(attrs: TextureAttributes, size: int = TEXTURE_SIZE) -> np.ndarray:
    """Draw ``attrs`` as a uint8 array [size, size, 3]."""
    m = pattern_mask(attrs.pattern, attrs.orientation, SCALES[attrs.scale], size, attrs.phase_x, attrs.phase_y)
    ink, ground = np.array(PALETTE[attrs.color], np.float32), np.array(PALETTE[attrs.background], np.float32)
    arr = m[..., None] * ink + (1 - m[..., None]) * ground
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def sample_texture(rng: np.random.Generator) -> TextureAttributes:
    """Uniform scale, pattern (stripes: uniform orientation), colour, other background colour and phase."""
    scale = tuple(SCALES)[int(rng.integers(len(SCALES)))]
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))] if pattern == "stripes" else ""
    color, background = _two_colors(rng)
    period = SCALES[scale]
    return TextureAttributes(scale, pattern, orientation, color, background,
                             int(rng.integers(period)), int(rng.integers(period)))


def texture_combinations() -> list[tuple[str, str, str, str, str]]:
    """Every (scale, pattern, orientation, color, background) a texture caption can name (300)."""
    kinds = [("stripes", o) for o in ORIENTATIONS] + [(p, "") for p in PATTERNS if p != "stripes"]
    return [(s, p, o, c, b) for s in SCALES for p, o in kinds for c in COLORS for b in COLORS if b != c]


# ---------------------------------------------------------------------------------------------------------------
# patterned shapes
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatternedShapeAttributes:
    """One shape of ``color`` with ``fill`` on a plain ``background``; ``size`` is its half-extent, (x, y) its centre."""

    fill: str
    shape: str
    color: str
    background: str
    size: int
    x: int
    y: int
    phase_x: int = 0
    phase_y: int = 0

    def __post_init__(self) -> None:
        if self.fill not in FILLS:
            raise ValueError(f"fill={self.fill!r} is not allowed; use one of {FILLS}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape={self.shape!r} is not allowed; use one of {SHAPES}")
        _check_colors(self.color, self.background)

    @property
    def caption(self) -> str:
        return patterned_caption(self.fill, self.shape, self.color, self.background)


def patterned_caption(fill: str, shape: str, color: str, background: str) -> str:
    """``"a <fill> <color> <shape> on a <background> background"``."""
    return f"a {fill} {color} {shape} on a {background} background"


def parse_patterned_caption(caption: str) -> dict[str, str]:
    """Invert :func:`patterned_caption`: ``{"fill", "shape", "color", "background"}``."""
    w = caption.strip().lower().split()
    if (len(w) != 8 or w[0] != "a" or w[1] not in FILLS or w[2] not in PALETTE or w[3] not in SHAPES
            or w[4:6] != ["on", "a"] or w[6] not in PALETTE or w[7] != "background"):
        raise ValueError(f"caption={caption!r} is not a patterned-shape caption; expected 'a <{'|'.join(FILLS)}> "
                         f"<color> <shape> on a <color> background'")
    return {"fill": w[1], "color": w[2], "shape": w[3], "background": w[6]}


def shape_mask(shape: str, x: int, y: int, half: int, size: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage in [0, 1] of one filled shape [size, size], drawn at ``supersample`` x and box-averaged down."""
    k = supersample
    c = (np.arange(size * k) + 0.5) / k
    px, py = c[None, :] - x, c[:, None] - y
    if shape == "circle":
        inside = px**2 + py**2 < half**2
    elif shape == "square":
        inside = (np.abs(px) < half) & (np.abs(py) < half)
    else:  # triangle pointing up: apex (0, -half), base at y = +half
        inside = (py < half) & (np.abs(px) < (py + half) / 2)
    return inside.reshape(size, k, size, k).mean(axis=(1, 3))


def render_patterned_shape(attrs: PatternedShapeAttributes, size: int = TEXTURE_SIZE) -> np.ndarray:
    """Draw ``attrs`` as a uint8 array [size, size, 3]."""
    col = np.array(PALETTE[attrs.color], np.float32)
    if attrs.fill == "plain":
        fill = np.broadcast_to(col, (size, size, 3))
    else:
        orient = "diagonal" if attrs.fill == "striped" else ""
        m = pattern_mask(FILL_PATTERN[attrs.fill], orient, SCALES["fine"], size, attrs.phase_x, attrs.phase_y)
        fill = (1 - m[..., None]) * col + m[..., None] * col * SHADE
    s = shape_mask(attrs.shape, attrs.x, attrs.y, attrs.size, size)[..., None]
    arr = s * fill + (1 - s) * np.array(PALETTE[attrs.background], np.float32)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def sample_patterned_shape(rng: np.random.Generator, size: int = TEXTURE_SIZE) -> PatternedShapeAttributes:
    """Uniform fill, shape, colour, other background colour; half-extent 28-40 % of the side, in the frame."""
    fill = FILLS[int(rng.integers(len(FILLS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color, background = _two_colors(rng)
    half = int(rng.integers(round(size * 0.28), round(size * 0.40) + 1))
    margin = max(1, size // 16)
    lo, hi = half + margin, size - half - margin
    x, y = int(rng.integers(lo, max(lo, hi) + 1)), int(rng.integers(lo, max(lo, hi) + 1))
    p = SCALES["fine"]
    return PatternedShapeAttributes(fill, shape, color, background, half, x, y,
                                    int(rng.integers(p)), int(rng.integers(p)))


def patterned_combinations() -> list[tuple[str, str, str, str]]:
    """Every (fill, shape, color, background) a patterned-shape caption can name (360)."""
    return [(f, s, c, b) for f in FILLS for s in SHAPES for c in COLORS for b in COLORS if b != c]


# ---------------------------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------------------------


def _check_colors(color: str, background: str) -> None:
    if color not in PALETTE or background not in PALETTE or color == background:
        raise ValueError(f"colors {color!r} on {background!r}: both must be in {COLORS} and differ")


def _two_colors(rng: np.random.Generator) -> tuple[str, str]:
    color_i = int(rng.integers(len(COLORS)))
    bg_i = int(rng.integers(len(COLORS) - 1))
    return COLORS[color_i], COLORS[bg_i + (bg_i >= color_i)]


def _check_request(n: int, seed: int, size: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer")
    seed = check_bound("seed", seed, "seed")
    if not isinstance(size, int) or isinstance(size, bool) or not 32 <= size <= 1024 or size % 8:
        raise ValueError(f"size={size!r} must be a multiple of 8 in [32, 1024]")
    if n * size * size * 3 > MAX_TOY_BYTES:
        raise ValueError(f"n={n}, size={size}: the set would take {n * size * size * 3 / 2**30:.1f} GiB; keep "
                         f"n * size * size * 3 under {MAX_TOY_BYTES / 2**30:.0f} GiB")
    return seed


def generate_textures(n: int, seed: int = 0, size: int = TEXTURE_SIZE, cancel: Optional[CancelFlag] = None
                      ) -> tuple[np.ndarray, list[str], list[TextureAttributes]]:
    """``n`` texture images uint8 [n, size, size, 3], their captions and attributes, all determined by ``seed``."""
    rng = np.random.default_rng(_check_request(n, seed, size))
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    attrs = []
    for i in range(n):
        check_cancel(cancel)
        attrs.append(sample_texture(rng))
        images[i] = render_texture(attrs[-1], size)
    return images, [a.caption for a in attrs], attrs


def generate_patterned_shapes(n: int, seed: int = 0, size: int = TEXTURE_SIZE, cancel: Optional[CancelFlag] = None
                              ) -> tuple[np.ndarray, list[str], list[PatternedShapeAttributes]]:
    """``n`` patterned-shape images uint8 [n, size, size, 3], captions and attributes, determined by ``seed``."""
    rng = np.random.default_rng(_check_request(n, seed, size))
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    attrs = []
    for i in range(n):
        check_cancel(cancel)
        attrs.append(sample_patterned_shape(rng, size))
        images[i] = render_patterned_shape(attrs[-1], size)
    return images, [a.caption for a in attrs], attrs


def balanced_texture_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` texture captions cycling through every combination in a seeded order."""
    combos = texture_combinations()
    order = np.random.default_rng(seed).permutation(len(combos))
    return [texture_caption(*combos[order[i % len(combos)]]) for i in range(n)]


def balanced_patterned_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` patterned-shape captions cycling through every combination in a seeded order."""
    combos = patterned_combinations()
    order = np.random.default_rng(seed).permutation(len(combos))
    return [patterned_caption(*combos[order[i % len(combos)]]) for i in range(n)]
