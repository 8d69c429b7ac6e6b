"""The toy demo: its settings are validated, its chain compares the three methods, `redifine demo --quick` works."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from redifine_core.toy.demo import FULL, QUICK, SCIENCE, demo_config, demo_dataset, run_demo


def test_presets_and_config():
    for s in (FULL, QUICK, SCIENCE):
        cfg = demo_config(s, seeds=(0, 1))
        assert [m.name for m in cfg.methods] == ["baseline-low", "baseline-high", "redifine"]
        low, high, red = cfg.methods
        assert low.cfg == s.low_cfg < high.cfg == s.high_cfg and low.cond_drop == high.cond_drop == 0.0
        assert red.kind == "redifine" and red.cond_drop > 0
        assert cfg.iterations >= 5 and cfg.seeds == (0, 1)
    assert QUICK.n_images < FULL.n_images and QUICK.finetune_steps < FULL.finetune_steps


def test_dataset_is_seeded_toy_data():
    a, b = demo_dataset(QUICK), demo_dataset(QUICK)
    assert len(a) == QUICK.n_images and a.captions == b.captions
    assert all(c.startswith("a ") and c.endswith(" background") for c in a.captions)


@pytest.mark.parametrize("change, field", [
    (dict(n_images=1), "n_images"), (dict(iterations=0), "iterations"), (dict(learning_rate=0.0), "learning_rate"),
    (dict(low_cfg=8.0), "low_cfg"), (dict(redifine_cond_drop=1.0), "redifine_cond_drop"),
])
def test_settings_validation(change, field):
    with pytest.raises(ValueError, match=field):
        replace(QUICK, **change)


def test_refuses_a_non_empty_folder_before_any_work(tmp_path):
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        run_demo(tmp_path, quick=True)
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


@pytest.mark.slow
def test_redifine_demo_quick_end_to_end(tmp_path, capsys):
    """`redifine demo --quick`: three methods, five iterations, a report (CI runs this; bench/demo.py times it)."""
    from redifine_core.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert "report" in capsys.readouterr().out
    assert (out / "report.html").is_file() and (out / "curves.png").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete"
    for method in ("baseline-low", "baseline-high", "redifine"):
        done = sorted(out.glob(f"{method}/seed_0/iter_*/DONE"))
        assert len(done) == QUICK.iterations
        assert len(list((done[-1].parent / "images").glob("*.png"))) == QUICK.n_images


@pytest.mark.slow
def test_quick_demo_verdicts_never_contradict_the_study(tmp_path):
    """Issue 11: over 3 seeds no verdict cell of the quick demo names a direction the study found absent for that
    method. Needs the committed findings of a science run (python -m redifine_core.toy.science RUN --findings)."""
    from redifine_core.toy.science import FINDINGS_FILE, contradictions

    if not FINDINGS_FILE.is_file():
        pytest.skip(f"no committed study findings ({FINDINGS_FILE.name}): run the science study first")
    found = json.loads(FINDINGS_FILE.read_text())["findings"]
    run_demo(tmp_path / "demo", quick=True, seeds=(0, 1, 2))
    from redifine_core.chain.run_folder import RunFolder

    labels: dict = {}
    for r in RunFolder(tmp_path / "demo").read().records:
        labels.setdefault(r.method, {}).setdefault(r.seed, {})[r.iteration] = (r.verdict or {}).get("label", "")
    labels = {m: {s: [its[i] for i in sorted(its)] for s, its in seeds.items()} for m, seeds in labels.items()}
    assert contradictions(labels, found) == []
