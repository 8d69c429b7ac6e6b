"""A lane's reading: an established drift does not flip back to stable inside the noise; split seeds read inconclusive."""

from __future__ import annotations

import json
import shutil

import pytest

from redifine_core.chain.run_folder import RunFolder
from redifine_core.metrics.lanes import lane_readings, method_reading
from redifine_core.metrics.verdict import DRIFT, INCONCLUSIVE, OVER, STABLE
from redifine_core.report import metrics_csv_text
from redifine_core.report_answer import plain_answer, verdict_table_html
from test_report import ITERATIONS, SEEDS, build_fake_run

BASE = {"fid_ref": 1.0, "hf_share": 0.2}


def fid_round(it: int, rise: float, lo: float, hi: float, label: str) -> tuple[int, dict, dict]:
    metrics = {"fid_ref": 1.0 + rise, "hf_share": 0.2, "fid_ref_change_lo": lo, "fid_ref_change_hi": hi}
    return it, metrics, {"label": label, "reasons": [f"round {it}'s own reason"]}


def test_an_established_drift_holds_inside_the_noise_and_ends_on_a_real_recovery():
    rounds = [(0, dict(BASE), {"label": STABLE, "reasons": ["all metrics within thresholds of iteration 0"]}),
              fid_round(1, 0.40, 0.10, 0.70, DRIFT),
              fid_round(2, 0.25, -0.05, 0.55, STABLE),   # alone: stable; its interval reaches past +30 %
              fid_round(3, 0.05, -0.10, 0.20, STABLE),   # its whole interval is below +30 %: a real recovery
              fid_round(4, 0.25, -0.05, 0.55, STABLE)]   # no drift held any more
    out = lane_readings(rounds, BASE)
    assert [r["label"] for r in out] == [STABLE, DRIFT, DRIFT, STABLE, STABLE]
    assert out[2]["reasons"][0] == ("held from round 1: this round alone reads stable, but fid_ref +25% [-5%, +55%] "
                                    "does not rule out the +30% threshold")
    assert out[2]["reasons"][1] == "(this round: round 2's own reason)"
    assert out[3]["reasons"][0].startswith("recovered from drifting from the data (round 1)")
    assert out[3]["reasons"][1:] == ["round 3's own reason"]
    assert out[4] == {"label": STABLE, "reasons": ["round 4's own reason"]}
    again = lane_readings([(it, m, v) for (it, m, _), v in zip(rounds, out)], BASE)
    assert again == out  # reading readings changes nothing


def test_without_recorded_intervals_a_round_inside_its_thresholds_is_a_recovery():
    rounds = [(0, dict(BASE), {"label": STABLE}), (1, {"fid_ref": 1.4, "hf_share": 0.2}, {"label": DRIFT}),
              (2, {"fid_ref": 1.25, "hf_share": 0.2}, {"label": STABLE})]
    assert [r["label"] for r in lane_readings(rounds, BASE)] == [STABLE, DRIFT, STABLE]


@pytest.mark.parametrize("labels, expected", [
    ([STABLE, DRIFT, DRIFT], (INCONCLUSIVE, "2 seeds: drifting from the data; 1 seed: stable", True)),
    ([OVER, OVER, INCONCLUSIVE], (OVER, "in 2 of 3 seeds (1 seed: inconclusive)", False)),
    ([STABLE, STABLE], (STABLE, "", False)),
])
def test_a_method_whose_seeds_split_between_stable_and_a_drift_is_inconclusive(labels, expected):
    assert method_reading(labels) == expected


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_fake_run(tmp_path_factory.mktemp("lanes") / "run", status="complete")


def _set_label(root, method, seed, it, label):
    p = root / method / f"seed_{seed}" / f"iter_{it:03d}" / "metrics.json"
    d = json.loads(p.read_text())
    d["verdict"] = {"label": label, "reasons": [f"set to {label}"]}
    p.write_text(json.dumps(d))


def test_the_report_holds_the_drift_and_reads_split_seeds_as_inconclusive(run_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(run_dir, root)
    last = ITERATIONS - 1
    _set_label(root, "baseline-w9", SEEDS[0], last, STABLE)  # its round 1 read over-guidance; saturation still up
    data = RunFolder(root).read()
    table = verdict_table_html(data)
    held = table[table.index("held from round 1: this round alone reads stable, but "):]
    assert "saturation +" in held[:held.index("</li>")] and "does not rule out the +15% threshold" in held
    csv_rows = [row for row in metrics_csv_text(data).splitlines() if row.startswith(f"baseline-w9,{SEEDS[0]},{last},")]
    assert csv_rows and f",{OVER}," in csv_rows[0]
    for it in range(1, ITERATIONS):  # now the first seed reads stable all along: the seeds split
        _set_label(root, "baseline-w9", SEEDS[0], it, STABLE)
    line = next(l for l in plain_answer(root).splitlines() if l.startswith("baseline-w9"))
    assert f"gave no clear reading at round {last}: its seeds split (1 seed: " in line, line
    assert "1 seed: stable" in line and f"1 seed: {OVER}" in line
