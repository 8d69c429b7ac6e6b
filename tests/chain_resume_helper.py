"""Helper for tests/test_chain_resume.py: the small chain it runs, and a script that runs it and can SIGKILL itself.

    python chain_resume_helper.py RUN_DIR [--resume]

REDIFINE_TEST_KILL_AT="<unit>:<phase>[:<step>]" kills this process (SIGKILL, no cleanup) when the chain reports
that point: <phase> is a chain phase ("training", "sampling", "metrics") or a nested event phase ("train",
"sample", "metrics") reached at <step> inside unit <unit>. The hook lives here, not in the library.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import torch

THREADS = 1  # the test's in-process runs use the same count: CPU results can depend on it (1 is fastest when shared)


def make_inputs():
    """(pipeline, dataset, config) of the resume test: tiny SD, 2 methods, 2 iterations, 4 images of 32 px."""
    from PIL import Image

    from redifine_core.chain import ChainConfig, MethodConfig
    from redifine_core.data import CaptionedImages
    from redifine_core.models import Pipeline
    from redifine_core.tiny import tiny_sd_pipeline
    from redifine_core.training import TrainConfig

    pipe = Pipeline.from_diffusers(tiny_sd_pipeline())
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    ds = CaptionedImages.from_images(images, ["a red circle", "a blue square", "a green triangle", "a white star"])
    cfg = ChainConfig(
        iterations=2,
        methods=(MethodConfig("low", cfg=1.5), MethodConfig("rd", kind="redifine")),
        train=TrainConfig(steps=2, batch_size=2),
        steps=3,
        protocol="continue",
    )
    return pipe, ds, cfg


def kill_hook(spec: str):
    unit_s, phase, *rest = spec.split(":")
    unit, step = int(unit_s), (int(rest[0]) if rest else None)

    def progress(ev) -> None:
        if ev.extra.get("unit") != unit:
            return
        hit = (ev.phase == "chain" and ev.message.endswith(": " + phase)) or (
            ev.phase == phase and (step is None or ev.step == step)
        )
        if hit:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return progress


def main(argv: list[str]) -> int:
    torch.set_num_threads(THREADS)
    from redifine_core.chain import run_chain

    run_dir, resume = argv[0], "--resume" in argv
    spec = os.environ.get("REDIFINE_TEST_KILL_AT")
    pipe, ds, cfg = make_inputs()
    run_chain(pipe, ds, cfg, run_dir, progress=kill_hook(spec) if spec else None, resume=resume, render=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
