"""The run summariser: fidelity from the checker, seed averages, drift from each seed's own iteration 0."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from redifine_core.toy.dataset import caption_for, generate
from redifine_core.toy.science import iteration_records, reference_record, summarise


def _write_iter(folder, images, captions, metrics):
    (folder / "images").mkdir(parents=True)
    for c, im in enumerate(images):
        Image.fromarray(im).save(folder / "images" / f"{c:04d}_00.png")
    (folder / "captions.json").write_text(json.dumps(captions))
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics, "verdict": {"label": "stable"}}))
    (folder / "DONE").write_text("")


def _small_run(tmp_path):
    """A run folder: D0 of 6 toy images, method "m" with 2 seeds x 2 iterations; iteration 1 has wrong captions."""
    images, captions, attrs = generate(6, seed=0)
    wrong = [caption_for(a.shape, a.background, a.color) for a in attrs]
    (tmp_path / "reference" / "images").mkdir(parents=True)
    for c, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "reference" / "images" / f"{c:04d}.png")
    (tmp_path / "reference" / "metrics.json").write_text(json.dumps({"metrics": {"hf_share": 0.2}}))
    (tmp_path / "run.json").write_text(json.dumps({"schema_version": 1, "config": {"iterations": 2, "methods": [
        {"name": "m"}]}, "seeds": [0, 1], "dataset": {"captions": captions}}))
    base = {"hf_share": 0.1, "saturation": 0.5}
    for seed in (0, 1):
        _write_iter(tmp_path / "m" / f"seed_{seed}" / "iter_000", images, captions, base)
        # iteration 1: the captions no longer match (fidelity 0) and hf_share halves
        _write_iter(tmp_path / "m" / f"seed_{seed}" / "iter_001", images, wrong, {**base, "hf_share": 0.05})
    return images


def test_summary_of_a_small_run(tmp_path):
    _small_run(tmp_path)
    rec = iteration_records(tmp_path)
    assert rec["m"][0][0]["fidelity"] == 1.0 and rec["m"][1][1]["fidelity"] == 0.0
    s = summarise(rec)["m"]
    assert s[0]["drift"][0] == 0.0
    assert np.isclose(s[1]["drift"][0], 0.25)  # |0.05-0.1|/0.1 = 0.5 and 0 for saturation: mean 0.25
    assert s[1]["hf_share"] == (0.05, 0.0, 2)
    assert reference_record(tmp_path)["fidelity"] == 1.0


def test_a_folder_that_is_not_a_run_is_refused_in_one_line(tmp_path, capsys):
    from redifine_core.toy.science import main

    (tmp_path / "run.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="is not a chain run"):
        iteration_records(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert e.value.code == 2 and "run.json" in capsys.readouterr().err


# ---- the science preset ----------------------------------------------------------------------------------------

def test_science_config_has_every_method_and_paired_seeds():
    from redifine_core.chain import REDIFINE_COND_DROP, units
    from redifine_core.presets import READINGS, REDIFINE_READING
    from redifine_core.toy.demo import SCIENCE
    from redifine_core.toy.science import science_config

    cfg = science_config()
    by = {m.name: m for m in cfg.methods}
    consts = [by[f"cfg-{w}"] for w in ("1.5", "2", "3", "5", "7.5")]
    assert [m.cfg for m in consts] == [1.5, 2.0, 3.0, 5.0, 7.5]
    assert all(m.cond_drop == 0.0 and m.schedule is None for m in consts)
    red = by["redifine"]
    assert red.kind == "redifine" and red.schedule == "redifine" and red.cond_drop == REDIFINE_COND_DROP > 0
    # the two halves of ReDiFine alone
    assert (by["drop-cfg-7.5"].cfg, by["drop-cfg-7.5"].cond_drop) == (7.5, REDIFINE_COND_DROP)
    assert (by["schedule-no-drop"].schedule, by["schedule-no-drop"].cond_drop) == ("redifine", 0.0)
    # every other reading of the schedule, each with condition drop
    readings = {m.schedule for m in cfg.methods if m.name.endswith("-drop") and m.name != "schedule-no-drop"}
    assert readings == {p.name for p in READINGS} - {REDIFINE_READING}  # the one behind redifine runs once
    assert all(by[f"{r}-drop"].cond_drop == REDIFINE_COND_DROP for r in readings)
    assert len(cfg.methods) == 5 + 3 + len(READINGS) - 1
    assert cfg.seeds == (0, 1, 2, 3, 4) and cfg.iterations == SCIENCE.iterations == 5
    assert cfg.train.steps == SCIENCE.finetune_steps
    # paired: every method runs every seed, and a seed's training and image seeds do not depend on the method
    assert {(u.method.name, u.seed) for u in units(cfg)} == {(m.name, s) for m in cfg.methods for s in cfg.seeds}
    assert science_config(seeds=(3, 9)).seeds == (3, 9)


@pytest.mark.parametrize("seeds", [0, -1, True, "5", 2.5])
def test_science_config_refuses_bad_seeds(seeds):
    from redifine_core.toy.science import science_config

    with pytest.raises(ValueError, match="seeds"):
        science_config(seeds)


def test_run_science_refuses_a_non_empty_folder_before_loading(tmp_path):
    from redifine_core.toy.science import run_science

    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        run_science(tmp_path, seeds=1)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run_science(tmp_path / "missing", seeds=1, resume=True)


def test_interval_is_the_student_t_interval():
    from redifine_core.toy.science import interval

    m, lo, hi = interval([1.0, 2.0, 3.0])
    assert m == 2.0 and np.isclose(hi - m, 4.303 / np.sqrt(3)) and np.isclose(m - lo, hi - m)
    assert interval([5.0]) == (5.0, 5.0, 5.0)
    m, lo, hi = interval([1.0, 1.2, 0.9, 1.1, 1.0])
    assert lo < m < hi and np.isclose(hi - m, 2.776 * np.std([1.0, 1.2, 0.9, 1.1, 1.0], ddof=1) / np.sqrt(5))


def _records(rng):
    """Five seeds: cfg-1.5 blurs, cfg-7.5 over-guides, redifine and drop-cfg-7.5 barely move, the rest drift."""
    def rec(hf, lap, slope, sat, clip, col, fid=1.0):
        return {"hf_share": hf, "laplacian_var": lap, "spectral_slope": slope, "saturation": sat,
                "clipped_fraction": clip, "colourfulness": col, "diversity": 1.0, "fidelity": fid}

    def run(end):
        out = {}
        for s in range(5):
            j = 1 + rng.normal(0, 0.01, 6)
            start = rec(0.1, 0.01, -3.0, 0.5, 0.001, 90.0)
            out[s] = {0: start, 1: rec(*(np.array(end) * j))}
        return out

    return {
        "cfg-1.5": run([0.05, 0.005, -3.6, 0.5, 0.001, 90.0]),
        "cfg-2": run([0.1, 0.01, -3.0, 0.5, 0.001, 90.0]),
        "cfg-7.5": run([0.15, 0.02, -2.5, 0.6, 0.01, 100.0]),
        "redifine": run([0.101, 0.0101, -3.0, 0.5, 0.001, 90.5]),
        "drop-cfg-7.5": run([0.102, 0.0101, -3.0, 0.5, 0.001, 90.0]),
        "schedule-no-drop": run([0.13, 0.015, -3.0, 0.55, 0.001, 95.0]),
        "redifine_rising-drop": run([0.2, 0.02, -3.0, 0.7, 0.001, 120.0]),
    }


def test_study_answers_the_questions_with_intervals():
    from redifine_core.toy.science import answers, study

    result = study(_records(np.random.default_rng(0)))
    assert result["best_constant"] == "cfg-2"
    lines = answers(result)
    text = "\n".join(lines)
    assert "Does low CFG 1.5 drift towards blur? yes: hf_share -50% [" in text
    assert "Does low CFG 2 drift towards blur? no:" in text  # a "no" is reported as such
    assert "Does high CFG 7.5 drift towards over-guidance? yes: hf_share +50% [" in text
    red = next(l for l in lines if l.startswith("redifine: final drift"))
    rising = next(l for l in lines if l.startswith("redifine_rising-drop: final drift"))
    assert "within cfg-2's interval" in red and "above (more drift than) cfg-2's interval" in rising
    assert "Which half of ReDiFine does the work? condition drop (drop-cfg-7.5" in text
    assert not any(l.startswith("schedule-no-drop: final drift") for l in lines)  # a half, not a reading
    from redifine_core.toy.science import format_study

    table = format_study(result).splitlines()
    row = next(l for l in table if l.startswith("cfg-1.5") and l.split()[1] == "1")
    d = result["methods"]["cfg-1.5"]["iterations"][1]["drift"]
    assert f"{d[0]:.3f} [{d[1]:.3f}, {d[2]:.3f}]" in row
    assert result["methods"]["cfg-1.5"]["changes"]["spectral_slope"][0] < -0.5
    assert not any(l.startswith("Only") for l in lines)  # five seeds: the study's bar


def test_findings_and_contradicting_verdict_cells():
    from redifine_core.toy.science import contradictions, findings, study

    found = findings(study(_records(np.random.default_rng(0))))
    assert found["cfg-1.5"] == {"blur": "yes", "over-guidance": "no"}
    assert found["cfg-7.5"] == {"blur": "no", "over-guidance": "yes"}
    assert found["redifine"]["blur"] == "no"
    labels = {"baseline-high": {0: ["stable", "drifting to over-guidance"]},
              "redifine": {0: ["stable", "drifting to blur"], 1: ["stable", "drifting from the data"]},
              "cfg-1.5": {0: ["inconclusive", "drifting to blur"]}}
    bad = contradictions(labels, found)
    assert bad == ["redifine seed 0 iteration 1: 'drifting to blur', but the study found no blur for redifine"]
    assert contradictions({"baseline-high": {0: ["drifting to blur"]}}, found) == [
        "baseline-high seed 0 iteration 0: 'drifting to blur', but the study found no blur for cfg-7.5"]


def test_one_seed_answers_unclear_not_yes():
    from redifine_core.toy.science import answers, findings, study

    one = {m: {0: seeds[0]} for m, seeds in _records(np.random.default_rng(1)).items()}
    text = "\n".join(answers(study(one)))
    assert "Does low CFG 1.5 drift towards blur? unclear:" in text
    assert "Only 1 seed(s)" in text
    assert findings(study(one))["cfg-7.5"] == {"blur": "unclear", "over-guidance": "unclear"}


def test_no_needs_intervals_that_exclude_a_flaggable_change():
    """A "no" must rule out a change the verdict would flag: an interval that crosses 0 but reaches the blur
    threshold (-25 %) is "unclear", and the same mean with a narrow interval is "no"."""
    from redifine_core.toy.science import _direction

    wide = {"hf_share": (0.40, 0.10, 0.70), "laplacian_var": (-0.28, -0.72, 0.17), "spectral_slope": (0.26, 0.08, 0.43)}
    narrow = dict(wide, laplacian_var=(-0.05, -0.12, 0.02))
    assert _direction(wide, ("hf_share", "laplacian_var", "spectral_slope"), -1)[0] == "unclear"
    assert _direction(narrow, ("hf_share", "laplacian_var", "spectral_slope"), -1)[0] == "no"
    assert _direction(dict(narrow, spectral_slope=(-0.1, -0.35, 0.1)), ("spectral_slope",), -1)[0] == "unclear"


def test_grid_shows_d0_then_each_method_at_its_first_and_last_iteration(tmp_path):
    from redifine_core.report_images import PAD, ROW_LABEL_W
    from redifine_core.toy.science import grid

    images = _small_run(tmp_path)
    out = grid(tmp_path, tmp_path / "grid.png", n=4, scale=2)
    with Image.open(out) as im:
        sheet = np.asarray(im.convert("RGB"))
    tile = 2 * images.shape[1]
    assert sheet.shape[:2] == (3 * (tile + PAD) + PAD, ROW_LABEL_W + 4 * (tile + PAD) + PAD)  # D0, m 0, m 1 x 4
    x0, y0 = ROW_LABEL_W + PAD, PAD
    np.testing.assert_array_equal(sheet[y0:y0 + tile:2, x0:x0 + tile:2], images[0])  # D0's first image, 2x nearest
