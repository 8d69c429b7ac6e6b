"""The benchmark scripts run: ``bench/gpu.py --device cpu --small`` end to end (every section, table written to a tmp
file, never to docs/), and the docs-section writer keeps the rest of the file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _half_ulp(printed: str) -> float:
    """Half a unit in the last printed digit: how far a rounded table value can be from the value behind it."""
    digits = printed.split(".")[1] if "." in printed else ""
    return 0.5 * 10.0 ** -len(digits)


def _is_ratio(ratio: str, ours: str, ref: str) -> bool:
    """The printed ratio is ours / ref, up to the rounding of the three printed numbers."""
    a, b, r = float(ours), float(ref), float(ratio)
    tol = (a / b) * (_half_ulp(ours) / a + _half_ulp(ref) / b) + _half_ulp(ratio)
    return abs(r - a / b) <= tol * 1.01


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith(("| section |", "| model |"))]


@pytest.mark.slow
def test_gpu_suite_smoke_run_fills_every_section(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nintro kept\n")
    docs = ROOT / "docs" / "benchmarks.md"
    before = docs.read_bytes() if docs.exists() else None
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--small", "--out",
                           str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (docs.read_bytes() if docs.exists() else None) == before  # a smoke run never touches docs/

    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nintro kept\n")
    section = re.search(r"<!-- gpu.py:begin -->(.*)<!-- gpu.py:end -->", text, re.S).group(1)
    assert "smoke run on tiny configs" in section
    rows = _rows(section)
    errors = [r for r in rows if r[3] in ("error", "skipped")]
    assert not errors, errors
    for model in ("sd1", "sdxl"):
        steps = [r for r in rows if r[0] == "LoRA step" and r[1] == model and r[3].startswith("s/step")]
        assert len(steps) == 4  # two precisions x checkpointing off/on
        assert {("checkpointing on" in r[2]) for r in steps} == {True, False}
        for r in steps:
            assert float(r[4]) > 0 and float(r[5]) > 0 and _is_ratio(r[6], r[4], r[5])
        sampling = {r[3]: r for r in rows if r[0] == "sampling" and r[1] == model}
        assert float(sampling["max abs pixel difference to diffusers, constant CFG"][4]) < 1e-3
        assert float(sampling["s, constant CFG 7.5"][6]) > 0
        chain = [r for r in rows if r[0] == "chain unit" and r[1] == model]
        assert chain and float(chain[0][4]) > 0


def test_gpu_suite_refuses_a_missing_gpu_and_unknown_models():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    for args, expected in ((["--device", "cuda"], "no CUDA device"), (["--device", "cpu", "--models", "sd3"], "sd3")):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), *args], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 2 and expected in proc.stderr


def test_section_writer_replaces_only_its_block(tmp_path):
    import _full_size as fs

    doc = tmp_path / "b.md"
    fs.write_section(doc, "memory.py", "first")
    fs.write_section(doc, "gpu.py", "gpu table")
    fs.write_section(doc, "memory.py", "second\nline")
    text = doc.read_text()
    assert text.startswith(fs.DOC_HEADER.strip())
    assert "first" not in text and text.count("<!-- memory.py:begin -->") == 1
    assert "<!-- memory.py:begin -->\nsecond\nline\n<!-- memory.py:end -->" in text
    assert text.index("memory.py:begin") < text.index("gpu.py:begin") and "gpu table" in text


def test_memory_bench_merges_rows_by_model_phase_and_setting(tmp_path):
    import memory

    out = tmp_path / "b.md"
    memory._write_doc(out, [["sd1", "load", "fp32", "peak RSS GB", "3.00", "4.00", "0.750", ""]],
                      ["sd1 load (fp32): 1.1x", "sd1 load (bf16): 1.2x"], "m1")
    memory._write_doc(out, [["sdxl", "load", "bf16", "peak RSS GB", "8.00", "9.00", "0.889", ""],
                            ["sd1", "load", "fp32", "peak RSS GB", "2.50", "4.00", "0.625", ""]], [], "m2")
    rows = _rows(re.search(r"memory.py:begin -->(.*)<!-- memory.py:end", out.read_text(), re.S).group(1))
    assert [r[:2] + [r[4], r[-1]] for r in rows] == [["sd1", "load", "2.50", "m2"], ["sdxl", "load", "8.00", "m2"]]
    memory._write_doc(out, [], ["sd1 load (bf16): 1.3x"], "m3")
    text = out.read_text()
    assert "- sd1 load (fp32): 1.1x (m1)" in text and "- sd1 load (bf16): 1.3x (m3)" in text and "1.2x" not in text
