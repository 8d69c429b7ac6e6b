"""Quantitative-trait simulation: known answers from textbook formulas, determinism, mappings, the plot."""

from __future__ import annotations

import math
import threading
from statistics import NormalDist

import numpy as np
import pytest
from PIL import Image

from redifine_core.guidance import ScheduleSyntaxError
from redifine_core.progress import Cancelled
from redifine_core.traits import (
    Selection,
    effective_scale,
    mutation_from_cond_drop,
    plot_traits,
    selection_from_cfg,
    simulate,
    sweep,
)

STD_NORMAL = NormalDist()


def truncation_moments(q: float) -> tuple[float, float]:
    """Mean and variance of the top fraction q of N(0, 1): i = phi(x_q)/q and 1 - i(i - x_q)."""
    x_q = STD_NORMAL.inv_cdf(1 - q)
    i = STD_NORMAL.pdf(x_q) / q
    return i, 1 - i * (i - x_q)


def test_truncation_formula_helper_matches_textbook_value():
    i, v = truncation_moments(0.5)
    assert i == pytest.approx(math.sqrt(2 / math.pi))  # phi(0)/0.5 = 0.798
    assert v == pytest.approx(1 - 2 / math.pi)


# --- known answers ---------------------------------------------------------------------------------------

def test_no_selection_no_bias_mean_stays_near_zero():
    # Each generation refits on N draws, so the mean is a random walk with step variance var_t/N <= 1/N.
    # After G generations (plus the initial sample) sd(mean) <= sqrt((G + 1)/N); allow 4 sd per run
    # and 4 sd for the average over K independent runs.
    n, g, k = 500, 10, 20
    finals = [simulate(Selection.none(), 0.0, 0.0, n, g, seed).mean[-1] for seed in range(k)]
    bound = math.sqrt((g + 1) / n)
    assert all(abs(m) < 4 * bound for m in finals)
    assert abs(np.mean(finals)) < 4 * bound / math.sqrt(k)


def test_bias_alone_drifts_the_mean_by_bias_per_generation():
    n, g, bias = 1000, 10, -0.15
    h = simulate(Selection.none(), 0.0, bias, n, g, seed=3)
    assert h.mean[-1] == pytest.approx(g * bias, abs=4 * math.sqrt((g + 1) / n))


def test_refitting_shrinks_variance_by_n_minus_1_over_n_per_generation():
    # ML refit on N draws: E[var_t] = ((N-1)/N)^(t+1) (the initial sample is itself an ML estimate).
    n, g, runs = 10, 10, 300
    finals = np.array([simulate(Selection.none(), 0.0, 0.0, n, g, seed).var[-1] for seed in range(runs)])
    expected = ((n - 1) / n) ** (g + 1)
    assert finals.mean() == pytest.approx(expected, abs=4 * finals.std() / math.sqrt(runs))


@pytest.mark.parametrize("q", [0.5, 0.2])
def test_one_generation_of_truncation_matches_textbook_moments(q):
    i, v_frac = truncation_moments(q)
    h = simulate(Selection.truncation(q), 0.0, 0.0, 20000, 1, seed=1)
    m0, v0 = h.mean[0], h.var[0]
    assert h.mean[1] == pytest.approx(m0 + math.sqrt(v0) * i, abs=0.02)
    assert h.var[1] == pytest.approx(v0 * v_frac, abs=0.02)
    if q == 0.5:
        assert h.mean[1] == pytest.approx(0.798, abs=0.03)
        assert h.var[1] == pytest.approx(0.363, abs=0.03)


@pytest.mark.parametrize(
    "w, tau, mean, var",
    [
        (1.0, 1.0, 0.0, 1.0),  # no selection
        (2.0, 1.0, 1 / math.sqrt(math.pi), 1 - 1 / math.pi),  # best of 2 standard normals
        (3.0, 1.0, 3 / (2 * math.sqrt(math.pi)), None),  # best of 3
        # weight Phi(z/tau) on N(0, 1): E = 1/sqrt(1 + tau^2) * phi(0)/Phi(0)
        (2.0, 2.0, (1 / math.sqrt(5)) * STD_NORMAL.pdf(0) / 0.5, None),
    ],
)
def test_guidance_selection_is_best_of_w(w, tau, mean, var):
    z = Selection.guidance(w, tau).generate(0.0, 1.0, 40000, np.random.default_rng(0))
    assert z.size == 40000
    assert z.mean() == pytest.approx(mean, abs=0.02)
    if var is not None:
        assert z.var() == pytest.approx(var, abs=0.03)


def test_truncation_generate_keeps_top_fraction():
    z = Selection.truncation(0.25).generate(5.0, 2.0, 10000, np.random.default_rng(0))
    i, v = truncation_moments(0.25)
    assert z.mean() == pytest.approx(5.0 + 2.0 * i, abs=0.03)
    assert z.var() == pytest.approx(4.0 * v, abs=0.06)


def test_variance_collapses_without_mutation_and_not_with_it():
    no_mut = simulate(Selection.truncation(0.5), 0.0, -0.15, 1000, 10, seed=0)
    with_mut = simulate(Selection.truncation(0.5), 0.3, -0.15, 1000, 10, seed=0)
    assert no_mut.var[-1] < 1e-3
    # each generation adds 0.09 and truncation keeps 36% of it: the variance can never drop below ~0.03
    assert min(with_mut.var) > 0.02
    strong = simulate(7.5, 0.0, -0.15, 1000, 20, seed=0)
    strong_mut = simulate(7.5, mutation_from_cond_drop(0.1), -0.15, 1000, 20, seed=0)
    assert strong.var[-1] < 0.1 < strong_mut.var[-1]


def test_direction_of_drift_flips_with_cfg():
    low = simulate(1.0, 0.3, -0.15, 1000, 10, seed=0)
    high = simulate(7.5, 0.3, -0.15, 1000, 10, seed=0)
    assert low.mean[-1] < -1.0  # no guidance: blur
    assert high.mean[-1] > 1.0  # strong guidance: over-sharpened


# --- determinism, chain axis, mappings ----------------------------------------------------------------------

def test_same_seed_same_history_and_different_seed_differs():
    a = simulate("redifine", 0.3, -0.15, 300, 5, seed=7)
    b = simulate("redifine", 0.3, -0.15, 300, 5, seed=7)
    c = simulate("redifine", 0.3, -0.15, 300, 5, seed=8)
    assert a == b
    assert a.mean != c.mean
    assert len(a.mean) == len(a.var) == 6 and a.generations == 5
    assert a.std == tuple(math.sqrt(v) for v in a.var)
    assert a.to_dict()["mean"] == list(a.mean)


def test_selection_from_cfg_uses_mean_scale():
    assert selection_from_cfg(7.5) == Selection.guidance(7.5)
    assert selection_from_cfg("linear(7, 1)").strength == pytest.approx(4.0)  # any step count: mean of a line
    manual = np.mean([1 + 6.5 * math.exp(-3 * i / 29) for i in range(30)])
    assert effective_scale("redifine", steps=30) == pytest.approx(manual)
    assert selection_from_cfg("by_iter(3, 5)", iteration=1) == Selection.guidance(5.0)
    assert selection_from_cfg(2.0, tau=0.5).tau == 0.5


def test_chain_axis_schedule_gives_each_generation_its_selection():
    h = simulate("by_iter(3, 5, 1)", 0.0, 0.0, 100, 4, seed=0)
    assert h.selections == ("cfg 3", "cfg 5", "cfg 1", "cfg 1")
    per_gen = simulate([Selection.truncation(0.5), 2.0], 0.0, 0.0, 100, 2, seed=0)
    assert per_gen.selections == ("truncation q=0.5", "cfg 2")


def test_mutation_from_cond_drop():
    assert mutation_from_cond_drop(0.0) == 0.0
    assert mutation_from_cond_drop(0.25) == pytest.approx(0.5)
    assert mutation_from_cond_drop(0.1, scale=2.0) == pytest.approx(2 * math.sqrt(0.1))
    with pytest.raises(ValueError, match="p_drop"):
        mutation_from_cond_drop(1.5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(population=1), "population"),
        (dict(generations=-1), "generations"),
        (dict(mutation=-0.1), "mutation"),
        (dict(bias=float("nan")), "bias"),
        (dict(seed=-3), "seed"),
        (dict(selection=[1.0, 2.0], generations=3), "selection"),
    ],
)
def test_simulate_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        simulate(**kwargs)


def test_selection_validation():
    with pytest.raises(ValueError, match="fraction kept"):
        Selection.truncation(0.0)
    with pytest.raises(ValueError, match="fraction kept"):
        Selection.truncation(1.5)
    with pytest.raises(ValueError, match="w >= 1"):
        Selection.guidance(0.5)
    with pytest.raises(ValueError, match="tau"):
        Selection.guidance(2.0, tau=0.0)
    with pytest.raises(ValueError, match="kind"):
        Selection("stabilizing")
    with pytest.raises(ScheduleSyntaxError):
        simulate("linear(7,", generations=0)
    with pytest.raises(TypeError):
        simulate(object())  # type: ignore[arg-type]


# --- sweep, progress, cancel, plot ----------------------------------------------------------------------------

def test_sweep_order_and_progress():
    events = []
    out = sweep([1.0, Selection.truncation(0.5)], [0.0, 0.3], population=100, generations=3, progress=events.append)
    assert [(h.label, h.mutation) for h in out] == [
        ("cfg 1", 0.0), ("cfg 1", 0.3), ("truncation q=0.5", 0.0), ("truncation q=0.5", 0.3)]
    assert [(e.phase, e.step, e.total) for e in events] == [("traits", k, 4) for k in range(1, 5)]


def test_cancel_stops_before_work():
    flag = threading.Event()
    flag.set()
    with pytest.raises(Cancelled):
        simulate(7.5, generations=3, cancel=flag)
    with pytest.raises(Cancelled):
        sweep(cancel=flag)


def test_plot_traits_writes_a_valid_png(tmp_path):
    out = plot_traits(tmp_path / "sub" / "traits.png", [1.0, "redifine"], [0.0, 0.3], population=200, generations=4)
    assert out == tmp_path / "sub" / "traits.png"
    with Image.open(out) as im:
        assert im.format == "PNG"
        im.load()
        w, h = im.size
        assert w > 400 and h > 200
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 10  # something was drawn
    assert [p.name for p in out.parent.iterdir()] == ["traits.png"]  # no temp file left behind


def test_plot_traits_refuses_non_png_before_writing(tmp_path):
    with pytest.raises(ValueError, match="png"):
        plot_traits(tmp_path / "traits.jpg")
    assert list(tmp_path.iterdir()) == []


def test_log_normal_cdf_tail_is_accurate():
    from redifine_core.traits import _log_ndtr

    xs = np.array([3.0, 0.0, -5.0, -19.9, -20.1, -25.0, -30.0])
    exact = [math.log(0.5 * math.erfc(-x / math.sqrt(2))) for x in xs]  # erfc is still representable at -30
    assert _log_ndtr(xs) == pytest.approx(exact, rel=1e-10)


def test_guidance_far_in_the_blur_region_stays_finite_and_pushes_up():
    z = Selection.guidance(7.5).generate(-10.0, 1.0, 2000, np.random.default_rng(0))
    assert np.isfinite(z).all()
    assert z.mean() > -9.5
