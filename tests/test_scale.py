"""One chain run over several processes: claim files, heartbeats, takeover, one report, the same files as one process.

The claim tests and the in-process lane tests use the fake backend of test_chain.py (fast, exact). The slow ones
start real processes on the tiny SD model: ``accelerate launch`` of the CLI (2 processes on CPU, gloo), and two
``srun``-style tasks of which one is SIGKILLed mid-unit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_chain import PIPE, FakeBackend, _cfg, _dataset, _files  # noqa: E402

from redifine_core import distributed  # noqa: E402
from redifine_core.chain import MethodConfig, RunFolder, run_chain  # noqa: E402
from redifine_core.chain.claims import Claims, create_exclusive  # noqa: E402
from redifine_core.distributed import Processes  # noqa: E402
from helpers import write_captioned_folder


class FakeProcs(Processes):
    """Rank ``rank`` of a launch whose other processes never start: collectives answer as if they agreed."""

    def broadcast(self, obj):
        return obj

    def all_gather(self, obj):
        return [obj] * self.world_size

    def barrier(self):
        pass


def _claims(tmp_path, launch="aaaa", rank=0, world=1, host="", timeout=60.0) -> Claims:
    folder = RunFolder(tmp_path / "run")
    return Claims(folder, FakeProcs(rank=rank, world_size=world, host=host), launch, timeout)


# ------------------------------------------------------------------------------------------------------ claims
def test_a_lane_has_one_owner_and_is_free_again_after_release(tmp_path):
    a, b = _claims(tmp_path, "aaaa"), _claims(tmp_path, "bbbb", host="elsewhere")
    assert a.claim(("low", 0)) and not b.claim(("low", 0))
    rec = json.loads(a.held[("low", 0)].path.read_text())
    assert rec["host"] == socket.gethostname() and rec["pid"] == os.getpid() and rec["rank"] == 0
    assert b.claim(("low", 1))  # another seed is another lane
    a.release(("low", 0))
    assert b.claim(("low", 0)) and a.folder.lane_claims("low", 0)[0][0] == 0


def test_a_stale_heartbeat_by_file_time_is_taken_over_and_the_old_owner_lets_go(tmp_path, caplog):
    owner = _claims(tmp_path, "aaaa", host="elsewhere", timeout=30.0)  # another machine: no pid check possible
    taker = _claims(tmp_path, "bbbb", rank=1, world=2, timeout=30.0)
    assert owner.claim(("rd", 0))
    path = owner.held[("rd", 0)].path
    now = taker.now()  # the run folder's clock, not time.time()
    os.utime(path, (now - 10, now - 10))
    assert not taker.claim(("rd", 0))  # 10 s old: still live
    os.utime(path, (now - 31, now - 31))
    with caplog.at_level(logging.WARNING):
        assert taker.claim(("rd", 0))
    assert "took over rd seed 0" in caplog.text and "elsewhere" in caplog.text
    assert [g for g, _ in taker.folder.lane_claims("rd", 0)] == [1]
    owner.heartbeat()  # the frozen owner wakes up: it sees the newer claim and abandons the lane
    assert owner.lost(("rd", 0)) and owner.cancel_for(("rd", 0), None).is_set()
    owner.release(("rd", 0))
    assert taker.folder.lane_claims("rd", 0)[0][1].exists()  # releasing a lost lane leaves the taker's claim


def test_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    folder = RunFolder(tmp_path / "run")
    create_exclusive(folder.lane_claim("low", 0, 0), {"host": socket.gethostname(), "pid": p.pid, "rank": 1})
    c = _claims(tmp_path)
    assert c.claim(("low", 0)) and c.held[("low", 0)].generation == 1


def test_a_claim_file_is_created_once(tmp_path):
    target = tmp_path / "c" / "x.json"
    assert create_exclusive(target, {"n": 1}) and not create_exclusive(target, {"n": 2})
    assert json.loads(target.read_text()) == {"n": 1} and list(target.parent.iterdir()) == [target]


def test_the_report_is_claimed_by_exactly_one_process(tmp_path):
    cs = [_claims(tmp_path, "aaaa", rank=r, world=3) for r in range(3)]
    assert [c.claim_report() for c in cs] == [True, False, False]


def test_an_unshared_run_folder_is_reported_after_the_timeout(tmp_path, caplog):
    c = _claims(tmp_path, "aaaa", rank=0, world=2, timeout=0.2)
    c.enter()
    with caplog.at_level(logging.WARNING):
        c.start()
        time.sleep(0.8)
        c.leave()
    assert "processes [1] of this launch" in caplog.text and "shares" in caplog.text
    assert not c.folder.claims_dir.exists()  # the last worker out removes claims/


def test_claim_timeout_is_checked():
    with pytest.raises(ValueError, match="claim_timeout"):
        run_chain(PIPE, _dataset(), _cfg(), "/nonexistent/run", backend=FakeBackend().backend(), claim_timeout=0)


def test_srun_tasks_become_torch_ranks():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2(x2)"}
    assert distributed.slurm_to_torch_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("3", "4", "1", "2")
    assert distributed.launched_world_size(env) == 4
    torchrun = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "WORLD_SIZE": "8", "RANK": "5"}
    assert not distributed.slurm_to_torch_env(torchrun) and torchrun["RANK"] == "5"  # a launcher's own vars win
    assert distributed.launched_world_size({}) == 1 and distributed.current().world_size == 1


# ------------------------------------------------------------------------------------------- runs (fake backend)
def test_one_process_leaves_no_claims_and_refuses_a_live_other_launch(tmp_path):
    run = tmp_path / "run"
    run_chain(PIPE, _dataset(), _cfg(), run, backend=FakeBackend().backend(), render=False)
    assert not (run / "claims").exists()
    folder = RunFolder(run)
    other = {"launch": "bbbb", "host": socket.gethostname(), "pid": os.getppid(), "rank": 0}  # a live process
    create_exclusive(folder.worker_claim("bbbb", 0), other)
    before = folder.run_json.read_bytes()
    with pytest.raises(FileExistsError, match=f"in use by another launch .*pid {os.getppid()}"):
        run_chain(PIPE, _dataset(), _cfg(), run, resume=True, backend=FakeBackend().backend(), render=False)
    assert folder.run_json.read_bytes() == before  # refused before anything was touched
    other["pid"] = 2**22 + 12345  # no such process: its launch died, so its files are cleared
    folder.worker_claim("bbbb", 0).write_text(json.dumps(other))
    res = run_chain(PIPE, _dataset(), _cfg(), run, resume=True, backend=FakeBackend().backend(), render=False)
    assert res.status == "complete" and not (run / "claims").exists()


def test_parallel_key_is_checked_and_a_run_from_before_it_resumes(tmp_path):
    from redifine_core.chain import ChainConfig, check_run_folder
    from redifine_core.training import TrainConfig

    with pytest.raises(ValueError, match="parallel='sideways'"):
        _cfg(parallel="sideways")
    with pytest.raises(ValueError, match="train.batch_size=3 must be a multiple of the number of processes"):
        run_chain(PIPE, _dataset(), _cfg(parallel="data", train=TrainConfig(steps=2, batch_size=3, resolution=16)),
                  tmp_path / "x", backend=FakeBackend().backend(), processes=FakeProcs(rank=0, world_size=2))
    assert not (tmp_path / "x").exists()
    run = tmp_path / "run"
    run_chain(PIPE, _dataset(), _cfg(iterations=1), run, backend=FakeBackend().backend(), render=False)
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["config"].pop("parallel") == "units"  # as an older version wrote it
    (run / "run.json").write_text(json.dumps(manifest))
    check_run_folder(run, resume=True, config=_cfg(iterations=1))  # parallel missing from run.json: not a change
    with pytest.raises(ValueError, match=r"config\.steps") as e:
        check_run_folder(run, resume=True, config=_cfg(iterations=1, steps=3))
    assert "config.parallel" not in str(e.value)
    res = run_chain(PIPE, _dataset(), _cfg(iterations=1), run, resume=True, backend=FakeBackend().backend(),
                    render=False)
    assert res.status == "complete" and ChainConfig.from_dict(manifest["config"]).parallel == "units"


def test_a_method_named_claims_is_refused():
    with pytest.raises(ValueError, match="name"):
        MethodConfig("claims", cfg=2.0)


def test_lanes_mode_gives_the_files_of_one_process_and_takes_over_a_stale_lane(tmp_path, caplog):
    cfg = _cfg(seeds=(0, 1))
    one = tmp_path / "one"
    run_chain(PIPE, _dataset(), cfg, one, backend=FakeBackend().backend(), render=False)
    run = tmp_path / "lanes"
    folder = RunFolder(run)
    planted = []

    def plant_stale_claim(ev):  # while rank 0 runs its first lane, a dead machine "holds" rd seed 1
        if not planted:
            p = folder.lane_claim("rd", 1, 0)
            create_exclusive(p, {"launch": "dead", "host": "elsewhere", "pid": 1, "rank": 1})
            os.utime(p, (time.time() - 100, time.time() - 100))
            planted.append(p)

    with caplog.at_level(logging.WARNING):
        res = run_chain(PIPE, _dataset(), cfg, run, progress=plant_stale_claim, backend=FakeBackend().backend(),
                        processes=FakeProcs(rank=0, world_size=2), claim_timeout=5.0)
    assert planted and "took over rd seed 1" in caplog.text
    assert res.status == "complete" and res.report is not None and res.report.exists()
    assert res.verdicts.keys() == {"low", "rd"} and all(len(v) == 2 for s in res.verdicts.values() for v in s.values())
    got = {k: v for k, v in _files(run).items() if not k.startswith(("report", "curves", "grid", "metrics.csv"))}
    assert got == _files(one) and json.loads((run / "run.json").read_text())["status"] == "complete"
    assert not (run / "claims").exists()


def test_a_process_waits_for_a_lane_held_by_a_live_process(tmp_path):
    run = tmp_path / "run"
    folder = RunFolder(run)
    held = {}

    def hold_rd(ev):  # a live process of this launch (another host, fresh heartbeat) holds rd, then finishes it
        if not held:
            held["p"] = folder.lane_claim("rd", 0, 0)
            create_exclusive(held["p"], {"launch": "x", "host": "elsewhere", "pid": 1, "rank": 1})
            held["t"] = time.monotonic()

    import threading

    def release_later():
        while "p" not in held:
            time.sleep(0.05)
        time.sleep(1.0)
        held["p"].unlink()

    t = threading.Thread(target=release_later)
    t.start()
    res = run_chain(PIPE, _dataset(), _cfg(), run, progress=hold_rd, backend=FakeBackend().backend(),
                    render=False, processes=FakeProcs(rank=0, world_size=2), claim_timeout=4.0)
    t.join()
    assert res.status == "complete" and time.monotonic() - held["t"] >= 1.0
    assert all(folder.is_done(m, 0, i) for m in ("low", "rd") for i in range(2))


# ------------------------------------------------------------------------------------------- real processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(one_thread: bool = True, **extra) -> dict:
    """This environment without any launcher's variables; ``one_thread``: BLAS/OpenMP on one thread (as torchrun
    sets it), else the thread settings of this pytest process (for a comparison with an in-process run)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "ACCELERATE_")) and k not in (
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    if one_thread:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra)
    return env


@pytest.mark.slow
def test_accelerate_launch_of_two_processes_gives_the_files_of_one(tiny_sd_dir, tmp_path):
    from test_chain_resume import _assert_same, _outputs

    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate's launcher is not installed")
    write_captioned_folder(tmp_path / "data")
    toml = tmp_path / "c.toml"
    toml.write_text(f'[pipeline]\nsource = "{tiny_sd_dir}"\ndevice = "cpu"\n[dataset]\nsource = "data"\n'
                    "[chain]\niterations = 2\nsteps = 2\n[train]\nsteps = 2\nbatch_size = 2\n"
                    '[[methods]]\nname = "rd"\nkind = "redifine"\n'
                    '[[methods]]\nname = "low"\nkind = "baseline"\ncfg = 1.5\n')
    one = tmp_path / "one"  # one process in the environment the launcher gives its processes (OMP_NUM_THREADS=1):
    # FID's float64 linear algebra changes in the 10th digit with the BLAS thread count, whatever the process count
    r = subprocess.run([sys.executable, "-m", "redifine_core.cli", "chain", str(toml), "--out", str(one), "--quiet"],
                       env=_clean_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two"
    # --multi_gpu is accelerate's multi-process launcher (torchrun); on a machine without CUDA the processes use
    # gloo on the CPU (accelerate's --cpu starts one process unless MPI is set up)
    r = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                        "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--main_process_port", str(_free_port()), "-m", "redifine_core.cli", "chain", str(toml),
                        "--out", str(two)], env=_clean_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert any(ln.startswith("[rank 0/2] ") for ln in lines) and any(ln.startswith("[rank 1/2] ") for ln in lines)
    ran = {ln.split()[0] + ln.split()[1]: ln.split()[3] for ln in lines if ln.endswith(": training")}
    assert len(set(ran.values())) == 2  # each process ran one method
    assert sum(ln.startswith("report: ") for ln in lines) == 1  # exactly one process rendered the report
    _assert_same(_outputs(two), _outputs(one))
    assert json.loads((two / "run.json").read_text())["status"] == "complete" and (two / "report.html").exists()
    assert not (two / "claims").exists()


def _start_tasks(run: Path, *, kill_rank: int | None = None, kill_at: str = "", extra: dict | None = None,
                 timeout: float = 3.0) -> list[subprocess.Popen]:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = _clean_env(False, SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=port, CUDA_VISIBLE_DEVICES="")
        if rank == kill_rank:
            env["REDIFINE_TEST_KILL_AT"] = kill_at
        args = [sys.executable, str(HERE / "scale_helper.py"), str(run), "--timeout", str(timeout)]
        args += (extra or {}).get(rank, [])
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs: list[subprocess.Popen], limit: float = 600) -> list[tuple[int, str, str]]:
    """Wait for every task, reaping each as it ends (a dead task must not linger as a zombie)."""
    end = time.monotonic() + limit
    while any(p.poll() is None for p in procs) and time.monotonic() < end:
        time.sleep(0.2)
    out = []
    for p in procs:
        if p.poll() is None:
            p.kill()
        so, se = p.communicate()
        out.append((p.returncode, so, se))
    return out


@pytest.mark.slow
def test_sigkill_one_of_two_processes_the_other_takes_over_and_the_result_is_exact(tmp_path):
    import torch

    from chain_resume_helper import THREADS, make_inputs
    from test_chain_resume import _assert_same, _outputs

    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        ref = tmp_path / "ref"
        pipe, ds, cfg = make_inputs()
        run_chain(pipe, ds, cfg, ref, render=False)
        run = tmp_path / "run"
        # lanes: (low, 0) then (rd, 0); rank 1 starts at rd = unit 1 (rd iter 0); it dies inside training
        (r0, out0, err0), (r1, _, err1) = _finish(_start_tasks(run, kill_rank=1, kill_at="1:train:1"))
        assert r1 == -9, err1[-2000:]
        assert r0 == 0, err0[-3000:]
        assert "took over rd seed 0" in err0 and "rank 0/2: complete" in out0
        _assert_same(_outputs(run), _outputs(ref))
        pipe, ds, cfg = make_inputs()
        res = run_chain(pipe, ds, cfg, run, resume=True, render=False)  # a resume finds the run complete
        assert res.status == "complete"
        _assert_same(_outputs(run), _outputs(ref))
    finally:
        torch.set_num_threads(old)


@pytest.mark.slow
def test_processes_that_disagree_on_the_config_are_refused_naming_the_field(tmp_path):
    results = _finish(_start_tasks(tmp_path / "run", extra={1: ["--steps", "4"]}))
    for rc, _, err in results:
        assert rc == 2, err[-2000:]
        assert "process rank 1" in err and "disagrees with rank 0" in err and "config.steps" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.slow
def test_one_lora_trained_data_parallel_on_two_processes_equals_one_process(tmp_path):
    import torch
    from safetensors import safe_open

    from redifine_core.training import finetune_lora
    from scale_helper import THREADS, train_inputs

    out = tmp_path / "ddp.safetensors"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = _clean_env(False, SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=port, CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "scale_helper.py"), str(out), "--train"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for rc, _, err in _finish(procs):
        assert rc == 0, err[-3000:]
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        pipe, ds, cfg = train_inputs()
        one = finetune_lora(pipe, ds, cfg)
    finally:
        torch.set_num_threads(old)
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
        two = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(two) == sorted(one.lora.unet) and len(two) > 0
    worst = max(float((two[k] - one.lora.unet[k]).abs().max()) for k in two)
    print(f"data-parallel vs one process: max |diff| {worst:.2e}")
    assert worst < 1e-5, worst
    assert any(float(v.abs().max()) > 1e-4 for k, v in two.items() if "lora_B" in k or "lora_up" in k)  # it trained
    assert md["drops"] == repr(one.drop_masks) and md["indices"] == repr(one.sample_indices)  # per sample, not rank
    assert any(any(m) for m in one.drop_masks) and not all(all(m) for m in one.drop_masks)
    np.testing.assert_allclose([float(x) for x in md["losses"].split()], one.losses, rtol=1e-5)


@pytest.mark.slow
def test_parallel_data_trains_each_lora_over_both_processes_and_matches_one_process(tmp_path):
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from chain_resume_helper import THREADS, make_inputs

    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        pipe, ds, cfg = make_inputs()
        ref = tmp_path / "ref"
        run_chain(pipe, ds, dataclasses.replace(cfg, parallel="data"), ref, render=False)  # one process
    finally:
        torch.set_num_threads(old)
    run = tmp_path / "run"
    (r0, out0, err0), (r1, out1, err1) = _finish(_start_tasks(run, extra={0: ["--parallel", "data"],
                                                                          1: ["--parallel", "data"]}))
    assert r0 == 0 and r1 == 0, (err0 + err1)[-3000:]
    assert "complete" in out0 and "complete" in out1
    loras = sorted(p.relative_to(ref) for p in ref.rglob("lora.safetensors"))
    assert len(loras) == 4 and sorted(p.relative_to(run) for p in run.rglob("lora.safetensors")) == loras
    worst = 0.0
    for rel in loras:
        a, b = load_file(str(ref / rel)), load_file(str(run / rel))
        assert sorted(a) == sorted(b)
        worst = max(worst, max(float((a[k] - b[k]).abs().max()) for k in a))
        la = json.loads((ref / rel.parent / "train.json").read_text())["losses"]
        lb = json.loads((run / rel.parent / "train.json").read_text())["losses"]
        np.testing.assert_allclose(lb, la, rtol=1e-5)
    print(f"parallel='data' chain vs one process: LoRA max |diff| {worst:.2e}")
    assert worst < 1e-5
    assert json.loads((run / "run.json").read_text())["config"]["parallel"] == "data"
    assert len(list(run.glob("*/seed_0/iter_*/DONE"))) == 4 and not (run / "claims").exists()


def test_each_process_computes_its_share_of_the_same_global_micro_batch():
    """Random crops, flips, condition drop, noise and timesteps belong to the sample: the shares' losses average to
    the single-process loss of the whole micro-batch (no collective is needed for one micro-batch)."""
    import torch

    from chain_resume_helper import make_inputs
    from redifine_core.data import CaptionedImages
    from redifine_core.training import LoraTrainer, TrainConfig

    pipe, _, _ = make_inputs()
    rng = np.random.default_rng(3)
    ds = CaptionedImages.from_images([Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))
                                      for _ in range(6)], [f"caption {i}" for i in range(6)])
    cfg = TrainConfig(steps=1, batch_size=4, cond_drop=0.5, random_flip=True, center_crop=False, resolution=32,
                      seed=11)
    out = []
    with torch.enable_grad():
        for procs in (None, FakeProcs(rank=0, world_size=2), FakeProcs(rank=1, world_size=2)):
            with LoraTrainer(pipe, ds, cfg, processes=procs) as tr:
                out.append([(float(loss.detach()), i, d) for loss, i, d in (tr._micro_batch() for _ in range(2))])
    for k in range(2):
        (l1, idx1, drop1), (la, idxa, dropa), (lb, idxb, dropb) = out[0][k], out[1][k], out[2][k]
        assert idx1 == idxa == idxb and torch.equal(drop1, dropa) and torch.equal(drop1, dropb)
        assert abs(l1 - (la + lb) / 2) < 1e-6 * max(1.0, l1)
    with pytest.raises(ValueError, match="batch_size=4 must be a multiple of the number of processes"):
        LoraTrainer(pipe, ds, cfg, processes=FakeProcs(rank=0, world_size=3))
