"""The verdict's calibration data: the label rates and held-out curves in docs/metrics.md come from the stored data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from redifine_core.metrics import calibration as C
from redifine_core.metrics import calibration_heldout as H
from redifine_core.metrics.intervals import change_intervals
from redifine_core.metrics.verdict import verdict

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def _documented_table() -> dict[int, dict[str, tuple[int, int, int, int]]]:
    """The "right / wrong / inconclusive / missed" table of docs/metrics.md, by N and change."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("| change | N = "))
    sizes = [int(x) for x in re.findall(r"N = (\d+)", lines[head])]
    out: dict[int, dict[str, tuple[int, int, int, int]]] = {n: {} for n in sizes}
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for n, cell in zip(sizes, cells[1:]):
            out[n][cells[0]] = tuple(int(x) for x in cell.split(" / "))
    return out


def test_documented_label_rates_are_recomputed_from_the_stored_sets():
    data = C.load_calibration()
    counts = C.label_counts(data)
    documented = _documented_table()
    assert set(documented) == set(C.SET_SIZES) == set(counts)
    for n, per in counts.items():
        assert set(documented[n]) == set(C.CHANGES)
        for change, c in per.items():
            r = C.rates(c, change)
            got = tuple(round(r[k] * r["n"]) for k in ("right", "wrong", "inconclusive", "missed"))
            assert got == documented[n][change], (n, change, c)


def test_at_16_images_no_false_alarm_and_below_it_inconclusive():
    data = C.load_calibration()
    counts = C.label_counts(data)
    for n in (16, 48):
        assert counts[n]["none"] == {"stable": 3 * C.NULL_DRAWS}
        for change in ("blur 1", "blur 1.5", "over-guidance"):
            assert counts[n][change] == {C.CHANGES[change][0]: 3 * C.CHANGE_DRAWS}
    # without the image-count rule, small sets raise false alarms: the reason MIN_IMAGES exists
    raw = C.label_counts(data, lambda cur, base, n_images=None: verdict(cur, base))
    alarms = {n: 3 * C.NULL_DRAWS - raw[n]["none"].get("stable", 0) - raw[n]["none"].get("inconclusive", 0)
              for n in (4, 8)}
    assert alarms == {4: 51, 8: 10}
    text = DOC.read_text(encoding="utf-8")
    assert "51 times in 180 at\n  N = 4 and 10 times in 180 at N = 8" in text


def test_the_rates_count_a_wrong_label_apart_from_a_miss():
    assert C.rates({"stable": 3, "drifting to blur": 1}, "blur 1") == {
        "n": 4, "right": 0.25, "inconclusive": 0.0, "missed": 0.75, "wrong": 0.0}
    r = C.rates({"drifting to over-guidance": 2, "inconclusive": 2}, "none")
    assert r["wrong"] == 0.5 and r["inconclusive"] == 0.5 and r["missed"] == 0.0
    with pytest.raises(ValueError, match="change"):
        C.changed("stripes", 2, 0)


@pytest.mark.slow
def test_the_stored_sets_rebuild_from_their_seeds():
    stored = C.load_calibration()
    rebuilt = C.calibration_data(set_sizes=(16,))
    for group, sets in rebuilt["sets"]["16"].items():
        for a, b in zip(sets, stored["sets"]["16"][group]):
            for k in C.KEYS:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-9), (group, k)


# ---- the held-out calibration (calibration_heldout.py, verdict_calibration_heldout.json) -------------------------

TINY = H.HeldOutConfig(datasets=("shapes",), set_sizes=(16,), draws=1, report_sizes=(16,), reports=1,
                       families={"blur": (0.8,), "hue": (80,)})


def test_the_documented_heldout_tables_are_recomputed_from_the_stored_data():
    data = H.load_heldout()
    text = DOC.read_text(encoding="utf-8")
    for row in H.detection_markdown(data) + H.report_markdown(data) + H.detection_markdown(data["family_wise"]):
        assert row in text, row
    # the family-wise rule's detections against the chain's rule on the same sets, as the page quotes them
    k = data["config"]["family_wise_draws"]
    first = {"curves": {d: {"32": {f: {s: {"labels": p["labels"][:k], "effects": p["effects"][:k]}
                                       for s, p in pts.items()} for f, pts in per["32"].items()}}
                        for d, per in data["curves"].items()}}
    hits = lambda d, f, s: H.detection_table(d)[f][s][32]["hits"]  # noqa: E731
    fw = data["family_wise"]
    assert (f"σ 0.6 right in {hits(fw, 'blur', '0.6')} of 30 (95 % rule: {hits(first, 'blur', '0.6')}), unsharp 0.5 "
            f"in {hits(fw, 'unsharp', '0.5')} ({hits(first, 'unsharp', '0.5')})") in " ".join(text.split())
    # the stored data is what the default configuration describes, on every toy dataset
    cfg = H.HeldOutConfig()
    assert tuple(data["config"]["set_sizes"]) == cfg.set_sizes and data["config"]["draws"] == cfg.draws
    assert set(data["curves"]) == set(cfg.datasets) == set(data["reports"])
    for per_n in data["curves"].values():
        for cell in per_n.values():
            for family, points in cell.items():
                assert [float(s) for s in points] == [0.0] + list(cfg.families[family])
                assert all(len(p["labels"]) == len(p["effects"]) == cfg.draws for p in points.values())
    for per_n in data["reports"].values():
        assert all(len(rs) == cfg.reports and all(len(r) == 15 for r in rs) for rs in per_n.values())


def test_the_false_alarm_rate_counts_reports_and_its_exact_interval():
    data = {"reports": {"a": {"16": ["s" * 15, "s" * 14 + "d", "i" * 15]}, "b": {"16": ["bo" + "s" * 13]}}}
    r = H.report_rate(data, 16)
    assert (r["alarmed"], r["reports"], r["alarms"], r["comparisons"]) == (2, 4, 3, 60)
    lo, hi = r["ci"]
    assert 0.06 < lo < 0.07 and 0.93 < hi < 0.94  # Clopper-Pearson for 2 of 4
    assert H.clopper_pearson(0, 72)[1] < 0.05 < H.clopper_pearson(0, 58)[1]


def test_perturbations_move_their_statistic_and_leave_strength_0_alone():
    from redifine_core.metrics.summary import SetSummary
    from redifine_core.toy.registry import TOY_DATASETS

    raw = TOY_DATASETS["shapes"].images(4, 5)[0]
    stats = lambda x: SetSummary.from_images(x, features="handcrafted").statistics()  # noqa: E731
    ref = stats(raw)
    for family in H.PERTURBATIONS:
        np.testing.assert_array_equal(H.perturb(raw, family, 0), raw.astype(np.float32) / 255)
    assert stats(H.perturb(raw, "blur", 0.8))["hf_share"] < 0.8 * ref["hf_share"]
    assert stats(H.perturb(raw, "unsharp", 1.0))["laplacian_var"] > 1.25 * ref["laplacian_var"]
    assert stats(H.perturb(raw, "saturation", 1.6))["saturation"] > ref["saturation"]
    hue = H.perturb(raw, "hue", 80)
    assert np.abs(hue - raw / 255).mean() > 0.05 and stats(hue)["saturation"] == pytest.approx(
        ref["saturation"], rel=0.05)  # a hue rotation keeps HSV saturation
    with pytest.raises(ValueError, match="family"):
        H.perturb(raw, "stripes", 1)


def test_the_lazy_intervals_give_the_verdict_of_the_full_rule():
    from redifine_core.metrics.summary import SetSummary
    from redifine_core.toy.registry import TOY_DATASETS

    ds = TOY_DATASETS["shapes"]
    d0, base = (SetSummary.from_images(ds.images(16, s)[0], features="handcrafted") for s in (1, 2))
    raw = ds.images(16, 3)[0]
    labels = []
    for family, s in (("blur", 0), ("blur", 0.8), ("unsharp", 2.0), ("hue", 80), ("saturation", 1.6)):
        cur = SetSummary.from_images(H.perturb(raw, family, s), features="handcrafted")
        label, _ = H.compare(cur, base, d0)
        full = H.set_metrics(cur, d0) | change_intervals(cur, base, d0)
        assert label == verdict(full, H.set_metrics(base, d0), n_images=16).label, (family, s)
        labels.append(label)
    assert labels[1] == C.BLUR and labels[2] == C.OVER


def test_the_heldout_machinery_runs_small_and_is_deterministic():
    a = H.detection_curves(TINY)
    assert a == H.detection_curves(TINY)
    cell = a["shapes"]["16"]
    assert set(cell) == {"blur", "hue"} and set(cell["blur"]) == {"0", "0.8"}
    assert cell["blur"]["0"]["labels"] == cell["hue"]["0"]["labels"]  # one null draw serves every family
    assert cell["blur"]["0.8"]["effects"][0] < -0.25
    reports = H.simulated_reports(TINY, methods=1, iterations=2)
    assert reports == H.simulated_reports(TINY, methods=1, iterations=2)
    assert len(reports["shapes"]["16"]) == 1 and len(reports["shapes"]["16"][0]) == 2
    data = {"curves": a, "reports": reports}
    assert H.detection_table(data)["blur"]["0.8"][16]["n"] == 1
    assert H.report_rate(data)["reports"] == 1
