"""The verdict's calibration data: the label rates in docs/metrics.md come from the stored sets, which rebuild."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from redifine_core.metrics import calibration as C
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
