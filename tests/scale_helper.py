"""Helper for tests/test_scale.py: one process of a sharded chain run, started like ``srun`` starts a task.

    SLURM_PROCID=r SLURM_NTASKS=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python scale_helper.py RUN [--timeout T]
        [--steps N] [--resume] [--parallel data]
    ... python scale_helper.py OUT.safetensors --train      # one LoRA trained data-parallel (train_inputs())

Runs the chain of chain_resume_helper.make_inputs (tiny SD, 2 methods, 2 iterations) in RUN with the launch found in
the environment (redifine_core.distributed.current). REDIFINE_TEST_KILL_AT (see chain_resume_helper.kill_hook)
SIGKILLs this process at that point. ``--steps`` changes the config's denoising steps (a process that disagrees).
Exit 0 on success, 2 with one line on stderr for a refused start.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chain_resume_helper import THREADS, kill_hook, make_inputs  # noqa: E402


def train_inputs():
    """(pipeline, dataset, TrainConfig) of the data-parallel test: global batch 4, condition drop, flips."""
    from redifine_core.training import TrainConfig

    pipe, ds, _ = make_inputs()
    return pipe, ds, TrainConfig(steps=3, batch_size=4, cond_drop=0.5, random_flip=True, seed=7)


def _train(out: str) -> int:
    import torch
    from safetensors.torch import save_file

    from redifine_core.distributed import current
    from redifine_core.training import finetune_lora

    procs = current()
    torch.set_num_threads(THREADS)
    pipe, ds, cfg = train_inputs()
    res = finetune_lora(pipe, ds, cfg, processes=procs)
    if procs.is_main:
        save_file({k: v.contiguous() for k, v in res.lora.unet.items()}, out,
                  metadata={"losses": " ".join(repr(x) for x in res.losses),
                            "drops": repr(res.drop_masks), "indices": repr(res.sample_indices)})
    return 0


def main(argv: list[str]) -> int:
    if "--train" in argv:
        return _train(argv[0])
    import torch

    torch.set_num_threads(THREADS)
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--parallel", choices=("units", "data"))
    a = ap.parse_args(argv)
    from redifine_core.chain import run_chain
    from redifine_core.distributed import current

    procs = current()
    torch.set_num_threads(THREADS)  # again: accelerate sets its own count when OMP_NUM_THREADS is unset
    pipe, ds, cfg = make_inputs()
    if a.steps is not None:
        cfg = dataclasses.replace(cfg, steps=a.steps)
    if a.parallel:
        cfg = dataclasses.replace(cfg, parallel=a.parallel)
    spec = os.environ.get("REDIFINE_TEST_KILL_AT")
    try:
        res = run_chain(pipe, ds, cfg, a.run, progress=kill_hook(spec) if spec else None, resume=a.resume,
                        render=False, processes=procs, claim_timeout=a.timeout)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"rank {procs.rank}/{procs.world_size}: {res.status}")
    return 0


if __name__ == "__main__":
    from redifine_core.distributed import leave_launch

    code = main(sys.argv[1:])
    leave_launch(code)  # as the CLI does: gloo's threads can abort a normal interpreter exit
    sys.exit(code)
