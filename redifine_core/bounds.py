"""The documented upper (and lower) bounds of every count and scale a user can type.

One table, used by the CLI, the config dataclasses and the ComfyUI nodes, so the same value is accepted or refused
everywhere with the same one-line message. The limits are far past anything a real run uses; they exist so that a
typo (``--steps 100000000``, ``toy:100000``, ``alpha=1e30``) is refused at once instead of running for hours or
crashing deep inside numpy, torch or PIL. docs/cli.md lists them (``markdown_table()`` renders the list).

    check(key, value, name=None) -> int | float     # ValueError "name=value must be an integer in [lo, hi]"
    BOUNDS[key] -> Bound(lo, hi, integer, multiple, lo_open, doc)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional, Union

Number = Union[int, float]

__all__ = ["Bound", "BOUNDS", "check", "in_bounds", "markdown_table", "MAX_CFG", "MAX_SEED"]

MAX_CFG = 100.0
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Bound:
    """Allowed values of one setting: ``lo <= v <= hi`` (``lo < v`` when ``lo_open``), integers a multiple of
    ``multiple`` when ``integer``."""

    lo: Number
    hi: Number
    integer: bool = True
    multiple: int = 1
    lo_open: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        if not self.lo <= self.hi:
            raise ValueError(f"Bound: lo={self.lo!r} must be <= hi={self.hi!r}")
        if not (isinstance(self.multiple, int) and self.multiple >= 1):
            raise ValueError(f"Bound: multiple={self.multiple!r} must be an integer >= 1")

    @property
    def allowed(self) -> str:
        """``"an integer in [1, 10000]"``, ``"a number in (0, 1]"``, ``"a multiple of 8 in [8, 4096]"``."""
        left = "(" if self.lo_open else "["
        rng = f"{left}{_fmt(self.lo)}, {_fmt(self.hi)}]"
        if self.integer:
            return f"a multiple of {self.multiple} in {rng}" if self.multiple > 1 else f"an integer in {rng}"
        return f"a number in {rng}"

    def contains(self, value: object) -> bool:
        """True when ``value`` is allowed (bools never are)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer:
            if not isinstance(value, numbers.Integral):
                return False
            value = int(value)
            if value % self.multiple:
                return False
        else:
            value = float(value)
            if not math.isfinite(value):
                return False
        above_lo = value > self.lo if self.lo_open else value >= self.lo
        return above_lo and value <= self.hi


def _fmt(x: Number) -> str:
    if isinstance(x, int) and abs(x) >= 10**12:
        return f"2**{x.bit_length()}-1" if x == 2 ** x.bit_length() - 1 else str(x)
    if isinstance(x, float) and x.is_integer():
        return str(int(x)) if abs(x) < 1e15 else repr(x)
    return str(x)


_B = Bound
BOUNDS: Mapping[str, Bound] = MappingProxyType({
    # guidance and sampling
    "cfg": _B(0.0, MAX_CFG, integer=False, doc="a CFG scale, and every scale inside a schedule spec"),
    "steps": _B(1, 10_000, doc="denoising steps (chain, generate, schedule --steps)"),
    "iteration": _B(0, 10_000, doc="a chain iteration number (schedule --iteration, the schedule node)"),
    "iterations": _B(1, 1_000, doc="chain iterations"),
    "images_per_caption": _B(1, 10_000, doc="images generated per caption"),
    "images": _B(1, 10_000, doc="images in one generated or toy set (dataset source 'toy:N', toy_count)"),
    "batch_size": _B(1, 1_024, doc="images per sampling batch or per training step"),
    "width": _B(8, 4_096, multiple=8, doc="image width in pixels"),
    "height": _B(8, 4_096, multiple=8, doc="image height in pixels"),
    "resolution": _B(8, 4_096, multiple=8, doc="training resolution in pixels"),
    "lora_scale": _B(-10.0, 10.0, integer=False, doc="strength a LoRA is applied with"),
    "seed": _B(0, MAX_SEED, doc="any random seed"),
    # training
    "train_steps": _B(1, 1_000_000, doc="optimizer steps of one LoRA training"),
    "warmup_steps": _B(0, 1_000_000, doc="learning-rate warmup steps"),
    "grad_accum": _B(1, 1_024, doc="gradient accumulation steps"),
    "rank": _B(1, 1_024, doc="LoRA rank"),
    "alpha": _B(0.0, 4_096.0, integer=False, lo_open=True, doc="LoRA alpha (scale = alpha / rank)"),
    "learning_rate": _B(0.0, 1.0, integer=False, lo_open=True, doc="learning rate (also the UNet's and the text "
                                                                   "encoders' own)"),
    "cond_drop": _B(0.0, 1.0, integer=False, doc="condition-drop probability"),
    "noise_offset": _B(0.0, 1.0, integer=False, doc="noise offset"),
    "weight_decay": _B(0.0, 10.0, integer=False, doc="AdamW weight decay"),
    "max_grad_norm": _B(0.0, 1e6, integer=False, doc="gradient clipping norm (0 = none)"),
    "min_snr_gamma": _B(0.0, 1e4, integer=False, doc="min-SNR loss weighting gamma (0 = off)"),
    "clip_skip": _B(1, 48, doc="CLIP skip: 1 = last text-encoder layer, 2 = penultimate"),
    "bucket_step": _B(8, 512, multiple=8, doc="aspect-ratio buckets: sides are multiples of this (pixels)"),
    # data and other commands
    "dataset_limit": _B(2, 1_000_000, doc="images read from a dataset folder (dataset.limit)"),
    "download_limit": _B(1, 1_000_000, doc="images written by `redifine dataset --limit`"),
    "generations": _B(1, 1_000, doc="generations of `redifine traits`"),
    "population": _B(2, 100_000, doc="population of `redifine traits`"),
    "check_rounds": _B(2, 50, doc="rounds of `redifine check` (round 0 is your LoRA as it is)"),
    "check_cfg": _B(1.0, 30.0, integer=False, doc="your CFG in `redifine check` (ReDiFine's schedule decays from it "
                                                  "to 1)"),
    "threads": _B(1, 1_024, doc="torch CPU threads (`--threads` of the toy training and evaluation scripts)"),
})


def check(key: str, value: object, name: Optional[str] = None) -> Number:
    """Return ``value`` (as int or float) if BOUNDS[key] allows it, else raise one-line ValueError.

    ``name`` is how the user spelled the setting (``"--steps"``, ``"train.rank"``, ``"toy_count"``); default ``key``.
    """
    try:
        bound = BOUNDS[key]
    except KeyError:
        raise KeyError(f"bounds: unknown key {key!r} (known: {', '.join(BOUNDS)})") from None
    if not bound.contains(value):
        raise ValueError(f"{name or key}={value!r} must be {bound.allowed}")
    return int(value) if bound.integer else float(value)  # type: ignore[arg-type]


def in_bounds(key: str, value: object) -> bool:
    """True when ``check(key, value)`` would pass."""
    return BOUNDS[key].contains(value)


def markdown_table() -> str:
    """The table docs/cli.md shows: setting, allowed values, what it is."""
    rows = ["| setting | allowed | what |", "|---|---|---|"]
    rows += [f"| `{k}` | {b.allowed} | {b.doc} |" for k, b in BOUNDS.items()]
    return "\n".join(rows) + "\n"
