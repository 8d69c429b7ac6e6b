"""The quantitative-trait model of the Chain of Diffusion: a small, seeded numerical simulation.

OUR FORMULATION, NOT THE PAPER'S. The paper analyses the chain with quantitative-trait modelling, but its
variables and equations are not available to us (see docs/traits.md and reference/paper.md section 8). This module
is a documented stand-in built from textbook quantitative genetics, so users can see the mechanisms the paper
describes (selection, drift, mutation) at work and compare guidance settings before spending GPU hours.

The model. Each image of a generated set carries one trait value z, read as normalised high-frequency energy:
z = 0 is the real data, z < 0 blurrier, z > 0 over-sharpened (saturated, high-frequency artefacts). Generation 0
is the user's data, z ~ N(0, 1). One chain iteration maps the set D_i to D_(i+1):

1. finetune: the model fitted to D_i is a Gaussian with the set's mean and (maximum-likelihood) variance, shifted
   by ``bias`` (imperfect finetuning loses detail: a drift towards blur, negative by default) and widened by the
   ``mutation`` variance sigma_m^2 (condition drop: see :func:`mutation_from_cond_drop`);
2. generate: ``population`` images are drawn from that model under guidance, which acts as **selection**:
   - ``Selection.truncation(q)``: draw population/q candidates, keep the top fraction q (textbook truncation);
   - ``Selection.guidance(w, tau)``: the candidates are weighted by Phi(z/tau)^(w-1) and resampled. This is what
     classifier-free guidance does to a distribution: sampling p(x|c)^w p(x)^(1-w) = p(x|c) p(c|x)^(w-1), with the
     implicit classifier p(c|z) = Phi(z/tau) rising with detail. For integer w and a N(0, tau^2) population it is
     exactly "best of w draws" selection. w = 1 is no selection; larger w is stronger, truncation-like selection.
     The model covers w >= 1 (for w < 1 the implied unconditional distribution is improper).
3. random drift: finite ``population`` makes every fitted mean and variance a noisy estimate.

Mappings (our choice): a CFG scale or schedule becomes a guidance selection with the schedule's mean scale over the
denoising steps (:func:`selection_from_cfg`; chain-axis schedules give each iteration its own); condition-drop
probability p becomes mutation with sigma_m = sqrt(p) (:func:`mutation_from_cond_drop`).

Public API: :class:`Selection`, :class:`TraitHistory`, :func:`simulate`, :func:`sweep`, :func:`plot_traits`,
:func:`selection_from_cfg`, :func:`effective_scale`, :func:`mutation_from_cond_drop`.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .atomic import atomic_path
from .bounds import check as check_bound
from .guidance import PRESETS, Constant, Schedule, parse_schedule
from .progress import CancelFlag, ProgressCallback, ProgressEvent, check_cancel, report

__all__ = [
    "Selection",
    "TraitHistory",
    "simulate",
    "sweep",
    "plot_traits",
    "selection_from_cfg",
    "effective_scale",
    "mutation_from_cond_drop",
    "DEFAULT_SELECTIONS",
    "DEFAULT_MUTATIONS",
]

SelectionLike = Union["Selection", float, str, Schedule]

_SQRT2 = math.sqrt(2.0)
_ERFC = np.vectorize(math.erfc, otypes=[float])


def _log_ndtr(x: np.ndarray) -> np.ndarray:
    """log Phi(x) for standard normal Phi, accurate far into the left tail (numpy + math only)."""
    x = np.asarray(x, dtype=float)
    out = np.empty_like(x)
    mid = x > -20.0
    out[mid] = np.log(0.5 * _ERFC(-x[mid] / _SQRT2))
    t = x[~mid]  # asymptotic series: Phi(t) ~ phi(t)/(-t) * (1 - 1/t^2 + 3/t^4 - 15/t^6)
    out[~mid] = -0.5 * t * t - np.log(-t) - 0.5 * math.log(2 * math.pi) + np.log1p(-1 / t**2 + 3 / t**4 - 15 / t**6)
    return out


def _check_real(name: str, value, *, low: Optional[float] = None, low_open: bool = False,
                high: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return v


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Selection:
    """How guided generation selects images by trait value.

    kind: "none" | "truncation" (strength = fraction kept q in (0, 1]) | "guidance" (strength = CFG scale w >= 1,
    tau = softness of the implicit classifier Phi(z/tau); see the module docstring).
    """

    kind: str = "none"
    strength: float = 1.0
    tau: float = 1.0

    def __post_init__(self):
        if self.kind not in ("none", "truncation", "guidance"):
            raise ValueError(f"Selection.kind must be 'none', 'truncation' or 'guidance', got {self.kind!r}")
        if self.kind == "truncation":
            _check_real("Selection.strength (truncation: fraction kept q)", self.strength, low=0.0, low_open=True,
                        high=1.0)
        elif self.kind == "guidance":
            # w < 1 would weight by 1/Phi^(1-w): our implicit unconditional distribution is improper there
            _check_real("Selection.strength (guidance: CFG scale w; the trait model covers w >= 1)", self.strength,
                        low=1.0)
        _check_real("Selection.tau", self.tau, low=0.0, low_open=True)

    @classmethod
    def none(cls) -> "Selection":
        return cls("none")

    @classmethod
    def truncation(cls, q: float) -> "Selection":
        """Keep the top fraction ``q`` of the candidates (q = 1: no selection)."""
        return cls("truncation", q)

    @classmethod
    def guidance(cls, w: float, tau: float = 1.0) -> "Selection":
        """CFG at scale ``w`` as selection with fitness Phi(z/tau)^(w-1) (w = 1: no selection)."""
        return cls("guidance", w, tau)

    @property
    def label(self) -> str:
        if self.kind == "truncation":
            return f"truncation q={self.strength:g}"
        if self.kind == "guidance":
            return f"cfg {self.strength:.3g}" + (f" tau={self.tau:g}" if self.tau != 1.0 else "")
        return "no selection"

    def generate(self, mean: float, std: float, population: int, rng: np.random.Generator,
                 oversample: int = 16) -> np.ndarray:
        """Draw ``population`` trait values from N(mean, std^2) under this selection."""
        if self.kind == "truncation" and self.strength < 1.0:
            n_cand = max(population, math.ceil(population / self.strength))
            cand = rng.normal(mean, std, n_cand)
            return np.sort(cand)[-population:]
        if self.kind == "guidance" and self.strength != 1.0:
            cand = rng.normal(mean, std, population * oversample)
            logw = (self.strength - 1.0) * _log_ndtr(cand / self.tau)
            p = np.exp(logw - logw.max())
            return cand[rng.choice(cand.size, size=population, replace=True, p=p / p.sum())]
        return rng.normal(mean, std, population)


def effective_scale(schedule: Union[str, float, Schedule], steps: int = 30, iteration: int = 0) -> float:
    """The mean guidance scale of ``schedule`` over ``steps`` denoising steps at chain iteration ``iteration``."""
    values = parse_schedule(schedule).values(steps, iteration)
    return float(sum(values) / len(values))


def selection_from_cfg(cfg: Union[str, float, Schedule], *, steps: int = 30, iteration: int = 0,
                       tau: float = 1.0) -> Selection:
    """Map a CFG scale or schedule to a selection (our formulation): guidance at the schedule's mean scale.

    A per-step schedule is summarised by its mean over ``steps`` steps (so ``redifine`` = exp(7.5, 1, 3) acts like a
    constant w of about 3.1); a chain-axis schedule is read at chain iteration ``iteration``.
    """
    return Selection.guidance(effective_scale(cfg, steps, iteration), tau)


def mutation_from_cond_drop(p_drop: float, scale: float = 1.0) -> float:
    """Map a condition-drop probability to a mutation std (our formulation): sigma_m = scale * sqrt(p_drop).

    A fraction p_drop of the finetuning updates fit the unconditional model to the whole set instead of sharpening
    the conditional one; we model that as fresh trait variance p_drop * scale^2 (in units of the real data's
    variance) added at every finetuning.
    """
    p = _check_real("p_drop", p_drop, low=0.0, high=1.0)
    s = _check_real("scale", scale, low=0.0)
    return s * math.sqrt(p)


@dataclass(frozen=True)
class TraitHistory:
    """Trait mean and variance of the generated set per generation (index 0 = the real data)."""

    label: str
    mean: tuple[float, ...]
    var: tuple[float, ...]
    selections: tuple[str, ...]  # the selection used to generate each generation 1..G
    mutation: float
    bias: float
    population: int
    seed: int

    @property
    def generations(self) -> int:
        return len(self.mean) - 1

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(math.sqrt(v) for v in self.var)

    def to_dict(self) -> dict:
        return {
            "label": self.label, "mean": list(self.mean), "var": list(self.var), "selections": list(self.selections),
            "mutation": self.mutation, "bias": self.bias, "population": self.population, "seed": self.seed,
        }


def _resolve(selection, generation: int) -> Selection:
    """The Selection used to generate generation ``generation + 1`` (chain iteration ``generation``)."""
    if isinstance(selection, Selection):
        return selection
    is_number = isinstance(selection, numbers.Real) and not isinstance(selection, bool)
    if is_number or isinstance(selection, (str, Schedule)):
        return selection_from_cfg(selection, iteration=generation)
    raise TypeError(f"selection must be a Selection, a CFG scale, a schedule spec or a Schedule, got {selection!r}")


def _label(selection) -> str:
    if isinstance(selection, Selection):
        return selection.label
    if isinstance(selection, (list, tuple)):
        return "per-generation [" + ", ".join(_label(s) for s in selection) + "]"
    s = parse_schedule(selection)
    if isinstance(s, Constant):
        return f"cfg {s.spec}"
    text = s.spec if s.is_chain_axis else f"{s.spec} (mean w {effective_scale(s):.2f})"
    if isinstance(selection, str) and selection.strip().lower() in PRESETS:
        text = f"{selection.strip().lower()} = {text}"
    return text


def simulate(selection: Union[SelectionLike, Sequence[SelectionLike]] = Selection("none"), mutation: float = 0.0,
             bias: float = -0.15, population: int = 1000, generations: int = 10, seed: int = 0, *,
             init_mean: float = 0.0, init_std: float = 1.0, cancel: Optional[CancelFlag] = None) -> TraitHistory:
    """Simulate ``generations`` chain iterations of the trait model; returns mean and variance per generation.

    selection: a :class:`Selection`; a CFG scale, schedule spec or Schedule (mapped by :func:`selection_from_cfg`,
    chain-axis schedules per iteration); or a sequence of those, one per generation.
    mutation: sigma_m, the std added at every finetuning. bias: mean shift per finetuning (negative = blur).
    """
    mutation = _check_real("mutation", mutation, low=0.0)
    bias = _check_real("bias", bias)
    population = check_bound("population", population)
    generations = _check_int("generations", generations, 0)
    if generations:
        check_bound("generations", generations)
    seed = check_bound("seed", seed)
    init_mean = _check_real("init_mean", init_mean)
    init_std = _check_real("init_std", init_std, low=0.0)
    if isinstance(selection, (list, tuple)):
        if len(selection) != generations:
            raise ValueError(f"selection: a per-generation sequence needs {generations} entries (one per generation), "
                             f"got {len(selection)}")
        per_gen = [_resolve(s, g) for g, s in enumerate(selection)]
    else:
        if isinstance(selection, str):
            parse_schedule(selection)  # a bad spec fails here, before any work
        per_gen = [_resolve(selection, g) for g in range(generations)]

    rng = np.random.default_rng(seed)
    z = rng.normal(init_mean, init_std, population)
    means, variances = [float(z.mean())], [float(z.var())]
    for sel in per_gen:
        check_cancel(cancel)
        fit_mean = float(z.mean()) + bias  # finetune: ML Gaussian fit, drifting by `bias`
        fit_std = math.sqrt(float(z.var()) + mutation**2)  # ... plus mutation variance (condition drop)
        z = sel.generate(fit_mean, fit_std, population, rng)  # generate under guidance = selection
        means.append(float(z.mean()))
        variances.append(float(z.var()))
    return TraitHistory(
        label=_label(selection), mean=tuple(means), var=tuple(variances), selections=tuple(s.label for s in per_gen),
        mutation=mutation, bias=bias, population=population, seed=seed,
    )


# Defaults of the sweep and the plot: no guidance, weak and strong CFG, the redifine preset, textbook truncation;
# without and with the mutation of a 10% condition drop.
DEFAULT_SELECTIONS: tuple = (1.0, 1.5, 7.5, "redifine", Selection.truncation(0.5))
DEFAULT_MUTATIONS: tuple = (0.0, mutation_from_cond_drop(0.1))


def sweep(selections: Sequence[Union[SelectionLike, Sequence[SelectionLike]]] = DEFAULT_SELECTIONS,
          mutations: Sequence[float] = DEFAULT_MUTATIONS, *, bias: float = -0.15, population: int = 1000,
          generations: int = 10, seed: int = 0, progress: Optional[ProgressCallback] = None,
          cancel: Optional[CancelFlag] = None) -> list[TraitHistory]:
    """Simulate every (selection, mutation) pair with the same seed; results in selection-major order."""
    if not selections or not mutations:
        raise ValueError("sweep needs at least one selection and one mutation level")
    for m in mutations:
        _check_real("mutations[]", m, low=0.0)
    total = len(selections) * len(mutations)
    out: list[TraitHistory] = []
    for sel in selections:
        for m in mutations:
            check_cancel(cancel)
            out.append(simulate(sel, m, bias, population, generations, seed, cancel=cancel))
            report(progress, ProgressEvent("traits", len(out), total, message=f"{out[-1].label}, mutation {m:.3g}"))
    return out


def plot_traits(path: Union[str, os.PathLike],
                selections: Sequence[Union[SelectionLike, Sequence[SelectionLike]]] = DEFAULT_SELECTIONS,
                mutations: Sequence[float] = DEFAULT_MUTATIONS, *, bias: float = -0.15, population: int = 1000,
                generations: int = 20, seed: int = 0, dpi: int = 100, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelFlag] = None) -> Path:
    """Write a PNG of trait mean and variance vs generation for each selection (colour) and mutation (line style)."""
    path = Path(path)  # the library creates a missing parent; the CLI and nodes check paths first (paths.py)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    _check_int("dpi", dpi, 10)
    histories = sweep(selections, mutations, bias=bias, population=population, generations=generations, seed=seed,
                      progress=progress, cancel=cancel)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(14, 4.8))
    FigureCanvasAgg(fig)
    ax_mean, ax_var = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    colours = [f"C{i}" for i in range(10)]
    for k, h in enumerate(histories):
        si, mi = divmod(k, len(mutations))
        gens = range(h.generations + 1)
        kw = dict(color=colours[si % 10], linestyle=styles[mi % len(styles)], linewidth=1.6)
        name = f"{h.label}, σm={h.mutation:.2f}"
        ax_mean.plot(gens, h.mean, label=name, **kw)
        ax_var.plot(gens, h.var, **kw)
    ax_mean.axhline(0.0, color="grey", linewidth=0.8)
    ax_mean.set(xlabel="generation (chain iteration)", ylabel="trait mean  (<0 blur, >0 over-sharpened)",
                title="trait mean")
    ax_var.set(xlabel="generation (chain iteration)", ylabel="trait variance", title="trait variance (diversity)")
    ax_var.set_ylim(bottom=0.0)
    fig.suptitle(f"Quantitative-trait simulation (our formulation): bias {bias:g}/generation, "
                 f"population {population}, seed {seed}", fontsize=10)
    for ax in (ax_mean, ax_var):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.legend(*ax_mean.get_legend_handles_labels(), loc="center right", fontsize=8, frameon=False,
               title="selection (colour), mutation (style)", title_fontsize=8)
    fig.tight_layout(rect=(0.0, 0.0, 0.74, 0.95))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
