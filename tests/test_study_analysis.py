"""The schedule study's analysis rules (docs/study-protocol.md) on synthetic per-seed tables."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from redifine_core.toy import study_analysis as sa
from study_tables import synthetic_table as _table

def test_tost_matches_scipy_one_sided_t_tests():
    d = [0.3, -0.1, 0.2, 0.05, 0.12, -0.04, 0.2, 0.1]
    t = sa.tost(d, margin=0.25)
    lower = stats.ttest_1samp([x + 0.25 for x in d], 0.0, alternative="greater").pvalue
    upper = stats.ttest_1samp([x - 0.25 for x in d], 0.0, alternative="less").pvalue
    assert t["p_lower"] == pytest.approx(lower) and t["p_upper"] == pytest.approx(upper)
    assert t["p_tost"] == pytest.approx(max(lower, upper))
    # equivalence at alpha 0.05 <=> the 90 % interval lies inside the margin
    assert (t["p_tost"] < 0.05) == (-0.25 < t["ci90_low"] and t["ci90_high"] < 0.25)


def test_holm_adjusts_in_order_and_stays_monotone():
    adj = sa.holm({"x": 0.01, "y": 0.04, "z": 0.03})
    assert adj == pytest.approx({"x": 0.03, "z": 0.06, "y": 0.06})
    assert sa.holm({"only": 0.7}) == {"only": 0.7}


def test_controls_name_the_datasets_where_cfg_acts_as_in_sd_and_the_collapse_modes():
    ctl = sa.controls(_table(sd_like=("a", "b")))
    assert [ds for ds, c in ctl.items() if c["cfg_acts_as_sd"]] == ["a", "b"]
    assert ctl["a"]["blur_shows"] and ctl["a"]["over_guidance_shows"]
    assert ctl["a"]["last_hf_share_change"]["cfg-1"] == pytest.approx(-0.4)


def test_the_reading_at_the_best_constant_is_selected_and_failing_datasets_are_left_out():
    result = sa.analyse(_table(sd_like=("a", "b")))
    assert result["eligible"] == ["a", "b"]
    assert result["best_constant"] == {"a": "cfg-2.5", "b": "cfg-2.5", "c": "cfg-2.5"}
    assert result["readings"]["redifine_rising"]["qualifies"] == ["a", "b"]
    assert result["readings"]["redifine_decay"]["qualifies"] == []
    assert result["selected"] in ("redifine_rising", "redifine_alternate")
    assert result["claim_supported"]


def test_a_reading_far_better_than_the_best_constant_qualifies_but_is_not_equivalent():
    result = sa.analyse(_table(reading_offsets={"redifine_decay": -0.5, "redifine_rising": 0.6,
                                                "redifine_alternate": 0.7, "redifine_chain": 0.8}))
    decay = result["readings"]["redifine_decay"]
    assert decay["qualifies"] == ["a", "b"] and decay["equivalent"] == []
    assert result["selected"] == "redifine_decay"


def test_no_qualifying_reading_is_reported_and_the_closest_is_named():
    result = sa.analyse(_table(reading_offsets={"redifine_decay": 0.9, "redifine_rising": 0.5,
                                                "redifine_alternate": 0.7, "redifine_chain": 0.8}))
    assert all(not r["qualifies"] for r in result["readings"].values())
    assert not result["claim_supported"]
    assert result["selected"] == "redifine_rising"


def test_fidelity_loss_beyond_its_margin_disqualifies():
    rows = _table()
    for r in rows:
        if r["method"] == "redifine_rising" and r["dataset"] == "a":
            r["fidelity"] = 0.80 + 0.01 * (r["seed"] % 3)
    result = sa.analyse(rows)
    assert result["readings"]["redifine_rising"]["qualifies"] == ["b"]
    assert result["readings"]["redifine_rising"]["vs_best"]["a"]["fidelity"]["mean"] > 0.05


def test_table_round_trips_through_csv(tmp_path):
    rows = _table()
    path = sa.write_table(rows, tmp_path / "study.csv")
    back = sa.read_table(path)
    assert len(back) == len(rows)
    for k, v in rows[5].items():
        assert back[5][k] == v if isinstance(v, (str, int)) else math.isclose(back[5][k], v), k
    assert sa.analyse(back)["selected"] == sa.analyse(rows)["selected"]
