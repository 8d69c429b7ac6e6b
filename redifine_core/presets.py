"""The named CFG-schedule presets: each reading of ReDiFine's schedule, what it expands to, and where it comes from.

The paper's schedule formula is unknown (reference/paper.md §5 and §12) and our sources disagree on its shape, so every
reading is a preset of the schedule grammar (``guidance.parse_schedule``), measured side by side by the ``science``
study (``toy.science``). Each preset takes its parameters positionally; missing ones keep the defaults, so
``redifine(10)`` is ``exp(10, 1, 3)``. The table is plain data: ``guidance`` builds the schedules from it, and
docs/schedules.md gives the same sources and the reasons for each default.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """One named schedule: ``form(*defaults)`` of the grammar, its parameter names and the source of the reading."""

    name: str
    form: str  # the grammar form it expands to: exp, chain_decay, linear or cycle
    params: tuple[str, ...]
    defaults: tuple[float, ...]
    axis: str  # "steps" (over the denoising steps) or "chain" (along the chain's iterations)
    source: str  # who describes this shape (reference/paper.md)
    shape: str  # the shape in a few words

    def __post_init__(self) -> None:
        if len(self.params) != len(self.defaults):
            raise ValueError(f"preset {self.name!r}: {len(self.params)} parameter names for {len(self.defaults)} "
                             "defaults; they must match one to one")
        if self.axis not in ("steps", "chain"):
            raise ValueError(f"preset {self.name!r}: axis={self.axis!r}; expected 'steps' or 'chain'")

    @property
    def expansion(self) -> str:
        """The canonical text it expands to with its defaults, e.g. ``exp(7.5, 1, 3)``."""
        return f"{self.form}({', '.join(_fmt(v) for v in self.defaults)})"

    @property
    def note(self) -> str:
        """The prefix ``describe()`` puts before the expanded schedule's own description."""
        return f"preset {self.name!r} ({self.source}; a reading, not the paper's formula): "


def _fmt(x: float) -> str:
    x = float(x) + 0.0
    return str(int(x)) if x.is_integer() else repr(x)


PRESET_TABLE: tuple[Preset, ...] = (
    Preset("redifine", "exp", ("w_start", "w_end", "rate"), (7.5, 1.0, 3.0), "steps",
           "the paper's reviewers: 'decayed CFG scaling during sampling', scales 5 to 10",
           "decaying over the denoising steps"),
    Preset("redifine_chain", "chain_decay", ("w_start", "w_end", "rate"), (7.5, 5.0, 0.5), "chain",
           "the paper's reviewers: 'adjusting the CFG scale along the chain'",
           "decaying along the chain, constant within a generation"),
    Preset("redifine_rising", "linear", ("w_low", "w_high"), (2.0, 7.5), "steps",
           "the project's brief: 'first capture low-frequency features with low CFG, then refine high-frequency "
           "details with high CFG'", "increasing over the denoising steps"),
    Preset("redifine_alternate", "cycle", ("w_low", "w_high"), (2.0, 7.5), "chain",
           "the project's brief: 'alternates between low and high CFG scales'",
           "low and high alternating along the chain"),
)
"""Every preset, in the order the docs list them. The two brief readings share w_low = 2 (the demo's low CFG, where the
toy model still draws the right caption: full-caption accuracy >= 0.97) and w_high = 7.5 (the reviewers' 5-10 range
and the usual SD default)."""

PRESET_DEFS: dict[str, Preset] = {p.name: p for p in PRESET_TABLE}
