"""Kill a chain run with SIGKILL at several points, resume it, and get exactly what an uninterrupted run gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("redifine_core.sampling").generate  # noqa: B018

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from chain_resume_helper import THREADS, make_inputs  # noqa: E402

pytestmark = pytest.mark.slow


def _kill_run(run: Path, at: str) -> None:
    env = dict(os.environ, REDIFINE_TEST_KILL_AT=at)  # same BLAS threading as this process: exact numbers
    args = [sys.executable, str(HERE / "chain_resume_helper.py"), str(run)] + (["--resume"] if run.exists() else [])
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, f"expected SIGKILL at {at}, got {r.returncode}: {r.stderr[-2000:]}"


def _check_loadable(run: Path) -> None:
    from safetensors.torch import load_file

    for p in run.rglob("*.png"):
        with Image.open(p) as im:
            im.load()
    for p in run.rglob("*.safetensors"):
        assert load_file(str(p))
    for p in run.rglob("*.json"):
        json.loads(p.read_text())
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # killed: no chance to update it


def _outputs(run: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for p in sorted(run.rglob("*")):
        rel = str(p.relative_to(run))
        if p.suffix == ".png":
            out[rel] = np.asarray(Image.open(p)).copy()
        elif p.suffix == ".safetensors":
            out[rel] = load_file(str(p))
        elif p.name in ("metrics.json", "captions.json"):
            out[rel] = json.loads(p.read_text())
        elif p.name == "train.json":
            out[rel] = json.loads(p.read_text())["losses"]
        elif p.name == "DONE":
            out[rel] = True
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert np.array_equal(a[k], b[k]), k
        elif isinstance(a[k], dict) and a[k] and isinstance(next(iter(a[k].values())), torch.Tensor):
            assert sorted(a[k]) == sorted(b[k]), k
            assert all(torch.equal(a[k][t], b[k][t]) for t in a[k]), k
        else:
            assert a[k] == b[k], k  # metrics: exact numbers


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


def test_sigkill_at_several_points_then_resume_is_exact(tmp_path, threads):
    from redifine_core.chain import run_chain

    pipe, ds, cfg = make_inputs()
    ref = tmp_path / "ref"
    run_chain(pipe, ds, cfg, ref, render=False)
    expected = _outputs(ref)
    assert len([k for k in expected if k.endswith("DONE")]) == 4

    run = tmp_path / "run"
    # units: 0 = low iter 0, 1 = rd iter 0, 2 = low iter 1, 3 = rd iter 1 (protocol "continue")
    for at in ("0:train:1", "1:metrics", "2:sample:2"):
        _kill_run(run, at)
        _check_loadable(run)
    assert (run / "low" / "seed_0" / "iter_000" / "DONE").exists()
    partial = run / "low" / "seed_0" / "iter_001"
    assert (partial / "lora.safetensors").exists() and not (partial / "DONE").exists()

    pipe, ds, cfg = make_inputs()
    res = run_chain(pipe, ds, cfg, run, resume=True, render=False)
    assert res.status == "complete"
    _assert_same(_outputs(run), expected)
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["resumed"]) == 3


def test_a_run_of_the_previous_version_resumes_with_the_schedule_it_started_with(tmp_path, threads):
    """Tiny SD: a run.json without recorded schedules (as the previous version wrote it) that ran 'redifine_rising'
    then meant linear(2, 7.5); its unfinished iteration is redone with exactly that, not today's meaning."""
    import shutil
    from dataclasses import replace

    from redifine_core.chain import MethodConfig, RunFolder, run_chain

    pipe, ds, cfg = make_inputs()
    method = MethodConfig("rd", kind="custom", schedule="linear(2, 7.5)", cond_drop=0.2)
    ref = tmp_path / "ref"
    run_chain(pipe, ds, replace(cfg, methods=(method,)), ref, render=False)
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    RunFolder(run).clear_iteration("rd", 0, 1)
    manifest = json.loads((run / "run.json").read_text())
    del manifest["schedules"]
    manifest["config"]["methods"][0]["schedule"] = "redifine_rising"
    (run / "run.json").write_text(json.dumps(manifest))
    old = replace(cfg, methods=(replace(method, schedule="redifine_rising"),))
    assert run_chain(pipe, ds, old, run, resume=True, render=False).status == "complete"
    _assert_same(_outputs(run), _outputs(ref))
    assert json.loads((run / "run.json").read_text())["schedules"]["rd"]["resolved"] == "linear(2, 7.5)"
