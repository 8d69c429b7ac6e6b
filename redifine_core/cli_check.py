"""``redifine check``: its arguments and its body (cli.py registers it). See docs/check.md."""

from __future__ import annotations

import argparse
import sys
from typing import Any

DEFAULT_CFG = 7.0  # check.DEFAULT_CFG (not imported here: the CLI starts without torch)
DEFAULT_ROUNDS = 3


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--lora", required=True, help="your LoRA (.safetensors; 'toy' with --model toy: a toy LoRA)")
    c.add_argument("--images", required=True, help="your images, each with a <name>.txt caption ('toy' with "
                   "--model toy: a toy folder)")
    c.add_argument("--model", required=True, help="the base model: a .safetensors checkpoint, a diffusers folder, "
                   "or 'toy'")
    c.add_argument("--cfg", type=float, default=DEFAULT_CFG, help=f"the CFG you generate with (default {DEFAULT_CFG:g})")
    c.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                   help=f"rounds, round 0 being your LoRA as it is (default {DEFAULT_ROUNDS})")
    c.add_argument("--out", help="the check folder (default: check-<LoRA name>)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted check in --out")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--verbose", action="store_true", help="show third-party warnings and loading bars")


def cmd_check(args: argparse.Namespace) -> int:
    from .cli_progress import TqdmProgress
    from .cli_terminal import EXIT_INTERRUPTED, EXIT_OK, SigintCancel, third_party_quiet
    from .check import check_inputs, default_out, run_check
    from .progress import Cancelled

    out = args.out or str(default_out(args.lora))
    with third_party_quiet(args.verbose):  # one line, nothing loaded
        check_inputs(args.lora, args.images, args.model, args.cfg, args.rounds, out, args.resume)
    progress = TqdmProgress(disable=args.quiet)

    def echo(text: str) -> None:
        progress.close()
        print(text, flush=True)

    resume_cmd = (f"redifine check --lora {args.lora} --images {args.images} --model {args.model} --cfg {args.cfg:g} "
                  f"--rounds {args.rounds} --out {out} --resume")
    try:
        with third_party_quiet(args.verbose), SigintCancel() as sig:
            result: Any = run_check(args.lora, args.images, args.model, args.cfg, args.rounds, out, progress=progress,
                                    cancel=sig.token, resume=args.resume, echo=echo)
    except (Cancelled, KeyboardInterrupt):
        progress.close()
        print(f"\ninterrupted: the check in {out} is resumable; continue it with:\n  {resume_cmd}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        progress.close()
    print()
    print(result.answer)
    if result.grid is not None:
        print(f"grid: {result.grid}")
    print(f"answer: {result.out / 'answer.txt'} (and {result.out / 'check.html'})")
    return EXIT_OK
