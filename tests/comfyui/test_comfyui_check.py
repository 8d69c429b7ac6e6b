"""The ReDiFine Check template in the real ComfyUI: the toy LoRA and images are made, both arms run, the answer and
the grid come out, and the check folder holds the finished run (resume itself is tested in tests/test_check.py)."""

from __future__ import annotations

import json

import pytest

from conftest import toy_available
from harness import load_workflow


def test_check_template_runs_and_resumes(server):
    if not toy_available():
        pytest.skip("the toy model is not built: the check template's toy LoRA and images need it")
    p = load_workflow("redifine_check")
    assert p["1"]["class_type"] == "ReDiFineCheck"
    entry = server.run(p, timeout=900)
    answer = " ".join(entry["outputs"]["2"]["text"])
    assert "Direction:" in answer and "Does ReDiFine hold it?" in answer and "Read from the LoRA's metadata" in answer
    assert len(entry["outputs"]["3"]["images"]) == 1
    checks = sorted((server.output / "redifine").glob("check-*"))
    assert len(checks) == 1
    out = checks[0]
    assert (out / "answer.txt").read_text().strip() in answer
    assert json.loads((out / "chain" / "run.json").read_text())["status"] == "complete"
    assert len(list((out / "chain").glob("*/seed_0/iter_*/DONE"))) == 2 * p["1"]["inputs"]["rounds"]
    assert (out / "toy_inputs" / "toy_lora.safetensors").is_file()
