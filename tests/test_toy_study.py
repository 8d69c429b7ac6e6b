"""The schedule study's command: its methods, its dataset names, and the analysis rerun from a per-seed CSV."""

from __future__ import annotations

import pytest

from redifine_core.toy import study
from redifine_core.toy import study_analysis as sa
from study_tables import synthetic_table


def test_unknown_dataset_is_one_line_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        study.main([str(tmp_path / "out"), "--run", "--datasets", "shapes,nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown 'nope'" in err and "shapes" in err
    assert not (tmp_path / "out").exists()


def test_bad_seed_count_is_refused(capsys):
    with pytest.raises(SystemExit):
        study.main(["--analyse", "x.csv", "--seeds", "0"])
    assert "seeds=0" in capsys.readouterr().err


def test_analysis_reruns_from_the_committed_csv_and_names_the_selection(tmp_path, capsys):
    path = sa.write_table(synthetic_table(sd_like=("a", "b")), tmp_path / "per_seed.csv")
    assert study.main(["--analyse", str(path)]) == 0
    out = capsys.readouterr().out
    assert "c: CFG acts as in SD at iteration 0: NO" in out
    assert "a: CFG acts as in SD at iteration 0: yes" in out
    assert "redifine_decay: at least as good as the best constant on 0 of 2 eligible datasets" in out
    assert "selected: redifine_rising" in out or "selected: redifine_alternate" in out
    assert out.strip().endswith("supported on this bed")


def test_the_plan_names_every_reading_the_presets_ship():
    from redifine_core.presets import READINGS

    assert set(sa.PLAN.readings) == {p.name for p in READINGS}
    methods = {m.name: m for m in study.method_configs()}
    assert methods["redifine_rising"].schedule == "redifine_rising(7.5)" and methods["redifine_rising"].cond_drop > 0
    assert methods["cfg-1"].cfg == 1.0 and methods["cfg-1"].cond_drop == 0


@pytest.mark.slow
def test_a_tiny_study_runs_seed_by_seed_and_its_table_holds_every_lane(tmp_path):
    from redifine_core.toy.demo import DemoSettings

    tiny = DemoSettings(n_images=4, iterations=2, finetune_steps=1, learning_rate=2e-3, rank=2, batch_size=2,
                        sample_steps=2, low_cfg=1.0, high_cfg=7.5)
    study.run_study(tmp_path, ["shapes"], (0,), settings=tiny)
    first = study.table_rows(tmp_path)
    study.run_study(tmp_path, ["shapes"], (1,), settings=tiny)  # a later sitting adds a seed
    rows = study.table_rows(tmp_path)
    methods = len(study.method_configs())
    assert len(first) == 1 + methods * 2 and len(rows) == 1 + 2 * methods * 2
    assert [r["method"] for r in rows].count(sa.REFERENCE) == 1
    assert {r["seed"] for r in rows if r["method"] != sa.REFERENCE} == {0, 1}
    assert all(0.0 <= r["fidelity"] <= 1.0 for r in rows)
    assert all(r["fid_ref"] >= 0 for r in rows if r["method"] != sa.REFERENCE)
    back = sa.read_table(sa.write_table(rows, tmp_path / "t.csv"))
    assert sa.endpoints(back, "fid_ref", sa.StudyPlan(endpoint_iterations=(0, 1)))["shapes"]["cfg-7.5"].keys() == {0, 1}


def test_a_dataset_whose_model_is_missing_stops_the_study_before_any_run(tmp_path, monkeypatch, capsys):
    from redifine_core import models

    monkeypatch.setitem(models.TOY_MODELS, "toy:bed", tmp_path / "no_model")
    with pytest.raises(SystemExit) as e:
        study.main([str(tmp_path / "out"), "--run", "--datasets", "shapes,textures"])
    assert e.value.code == 2
    assert "toy model weights are missing" in capsys.readouterr().err
    assert not (tmp_path / "out" / "shapes").exists()  # shapes did not start either
