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


def test_summary_of_a_small_run(tmp_path):
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
