"""Wall time of one chain run in 1 process vs N processes (``accelerate launch``), and whether the files are the same.

    python bench/scale.py                        # CPU: tiny SD, 2 methods x 2 seeds x 2 iterations, 1 vs 2 processes
    python bench/scale.py --processes 4 --device cuda --methods 4 --seeds 2   # a machine with 4 GPUs

Both runs are ``redifine chain`` on the same TOML (the tiny random-weight SD pipeline of ``redifine_core.tiny`` and
random 32 px images with captions, built into a temp folder), each process on OMP_NUM_THREADS=--threads (torchrun's
default of 1 unless set). The N-process run is ``accelerate launch --multi_gpu --num_processes N -m
redifine_core.cli chain``: accelerate's multi-process launcher, which on a machine without CUDA runs the processes on
the CPU with gloo. Times include starting Python and loading the model in every process. The run's units are
(method, seed) lanes: N processes can use at most methods x seeds of them.

On a 2-core CPU the figures show that the sharded run is correct and how much start-up costs, not the speed-up of a
GPU machine (every process competes for the same 2 cores and memory bandwidth).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _toml(model: Path, data: Path, a: argparse.Namespace) -> str:
    methods = "".join(f'[[methods]]\nname = "w{i}"\nkind = "baseline"\ncfg = {1.5 + i}\n' for i in range(a.methods))
    seeds = ", ".join(str(s) for s in range(a.seeds))
    return (f'[pipeline]\nsource = "{model}"\ndevice = "{a.device}"\n[dataset]\nsource = "{data}"\n'
            f"[chain]\niterations = {a.iterations}\nsteps = {a.steps}\nseeds = [{seeds}]\nbatch_size = 4\n"
            f"[train]\nsteps = {a.train_steps}\nbatch_size = 2\n" + methods)


def _run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--methods", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="denoising steps")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    from PIL import Image

    from redifine_core.tiny import save_tiny_sd
    from test_chain_resume import _assert_same, _outputs

    with tempfile.TemporaryDirectory(prefix="redifine_scale_") as tmp:
        tmp_p = Path(tmp)
        model = save_tiny_sd(tmp_p / "model")
        data = tmp_p / "data"
        data.mkdir()
        rng = np.random.default_rng(0)
        for i in range(a.images):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
            (data / f"{i}.txt").write_text(f"picture number {i}")
        toml = tmp_p / "c.toml"
        toml.write_text(_toml(model, data, a))
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
        if a.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        cli = ["-m", "redifine_core.cli", "chain", str(toml), "--quiet", "--out"]
        t1 = _run([sys.executable, *cli, str(tmp_p / "one")], env)
        accelerate = str(Path(sys.executable).parent / "accelerate")
        tn = _run([accelerate, "launch", "--multi_gpu", "--num_processes", str(a.processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", *cli, str(tmp_p / "many")], env)
        try:
            _assert_same(_outputs(tmp_p / "many"), _outputs(tmp_p / "one"))
            same = "identical"
        except AssertionError as e:
            same = f"DIFFERENT ({str(e).splitlines()[0]})"
    lanes = a.methods * a.seeds
    print(f"chain: {a.methods} methods x {a.seeds} seeds x {a.iterations} iterations ({lanes} lanes), {a.images} "
          f"images, {a.train_steps} LoRA steps, {a.steps} sampling steps, device {a.device}, "
          f"OMP_NUM_THREADS={a.threads}, {os.cpu_count()} CPUs")
    print("| processes | wall s | speed-up | files |")
    print("|---|---|---|---|")
    print(f"| 1 | {t1:.1f} | 1.00 | reference |")
    print(f"| {a.processes} | {tn:.1f} | {t1 / tn:.2f} | {same} |")
    return 0 if same == "identical" else 1


if __name__ == "__main__":
    sys.exit(main())
