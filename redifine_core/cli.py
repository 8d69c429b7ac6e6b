"""The ``redifine`` command line: chain, check, demo, report, schedule, traits, dataset (see docs/cli.md).

Bad arguments or a bad config exit with status 2 and one line naming the problem (no traceback); Ctrl-C stops a
run cleanly (first press: at the next step; second press: at once), leaves it resumable and exits with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import bounds
from .chain_toml import ChainJob, check_job, load_job_dataset, load_job_pipeline, parse_chain_toml  # noqa: F401
from .paths import check_output_dir, check_output_file
from .cli_progress import RankLines, TqdmProgress  # noqa: F401 (cli.TqdmProgress stays importable)
from .progress import Cancelled
from .cli_terminal import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, SigintCancel,  # noqa: F401
                           third_party_quiet)

CLAIM_TIMEOUT = 300.0  # chain.DEFAULT_CLAIM_TIMEOUT (not imported here: the CLI starts without torch)


class UsageError(Exception):
    """A bad argument or config: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -------------------------------------------------------------------------------------------------------- commands
USER_ERRORS = (UsageError, ValueError, OSError)  # OSError covers FileNotFoundError, FileExistsError, PermissionError


def _err(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def _line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, OSError) and e.filename is not None and e.strerror:  # an OS error from deep inside
        text = f"{e.filename!r}: {e.strerror}"
    return text.splitlines()[0] if text else type(e).__name__


def _check_chain_out(args: argparse.Namespace, job: ChainJob) -> None:
    """The run folder checks made before any model loads (rank 0 of a launch makes them for every process)."""
    out = Path(args.out)
    check_output_dir(out, "--out")  # a file, or a folder the user cannot write
    from .chain import check_run_folder

    if args.resume and not out.exists():
        raise FileNotFoundError(f"--out {args.out!r} does not exist: there is nothing to resume; check the folder "
                                "name, or drop --resume to start a new run")
    try:
        check_run_folder(out, resume=args.resume, overwrite=args.overwrite, config=job.config)
    except FileExistsError:
        raise UsageError(f"run folder {args.out!r} exists and is not empty; add --resume to continue it, "
                         "--overwrite to start it again, or choose another --out") from None


def cmd_chain(args: argparse.Namespace) -> int:
    prog = "redifine chain"
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run, or start it again")
    if not args.claim_timeout > 0:
        raise UsageError(f"--claim-timeout {args.claim_timeout!r} must be a number of seconds > 0")
    try:
        job = parse_chain_toml(args.config)
    except ValueError as e:
        _err(prog, f"{args.config}: {_line(e)}" if args.config not in str(e) else _line(e))
        return EXIT_USAGE
    from .distributed import current as current_processes

    procs = current_processes()  # one process, or this one's place in an accelerate / torchrun / srun launch
    return _chain_in_process(args, job, procs)


def _chain_in_process(args: argparse.Namespace, job: ChainJob, procs: Any) -> int:
    """The chain command once the config is read, in this process of the launch (or the only one)."""
    from .chain import run_chain

    out = Path(args.out)
    problem: Optional[BaseException] = None
    if procs.is_main:
        try:
            _check_chain_out(args, job)
        except USER_ERRORS as e:
            problem = e
    shared = procs.broadcast(None if problem is None else _line(problem))
    if problem is not None:
        raise problem
    if shared is not None:
        raise UsageError(shared)
    if procs.world_size > 1 and job.device in (None, "auto", "cuda"):
        import dataclasses

        import torch

        if torch.cuda.is_available():  # accelerate made this process's GPU the current one
            job = dataclasses.replace(job, device=f"cuda:{torch.cuda.current_device()}")
    check_job(job)  # model/dataset paths, device, dtype: before anything loads
    kwargs: dict[str, Any] = {"overwrite": True} if args.overwrite else {}
    if procs.world_size > 1:
        kwargs["processes"] = procs
    if args.claim_timeout != CLAIM_TIMEOUT:
        kwargs["claim_timeout"] = args.claim_timeout
    resume_cmd = f"redifine chain {args.config} --out {args.out} --resume"
    progress: Any = RankLines(procs.label, disable=args.quiet) if procs.world_size > 1 \
        else TqdmProgress(disable=args.quiet)
    try:
        with third_party_quiet(args.verbose):
            dataset = load_job_dataset(job)
            pipeline = load_job_pipeline(job)
            with SigintCancel() as sig:
                result = run_chain(pipeline, dataset, job.config, out, progress=progress, cancel=sig.token,
                                   resume=args.resume, **kwargs)
    except (Cancelled, KeyboardInterrupt):
        progress.close()
        print(f"\ninterrupted: the run in {out} is resumable; continue it with:\n  {resume_cmd}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        progress.close()
    print(f"{procs.label + ' ' if procs.label else ''}run complete: {result.run_dir}")
    for method, per_seed in result.verdicts.items():
        for seed, labels in per_seed.items():
            print(f"  {method} seed {seed}: " + " -> ".join(labels))
    if result.report is not None:
        print(f"report: {result.report}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """``redifine demo`` and ``redifine science``: a toy chain into --out, resumable, with its report."""
    science = args.command == "science"
    try:
        if science:
            from .toy.science import answers, iteration_records, run_science, science_config, study
        else:
            from .toy.demo import run_demo
    except ImportError as e:
        _err(f"redifine {args.command}", f"the toy lab is not available in this install ({e})")
        return EXIT_FAILED
    out = Path(args.out)
    for s in args.seeds or ():
        bounds.check("seed", s, "--seeds")
    if science:
        science_config(tuple(args.seeds or range(5)))  # a bad seed list is one line before anything loads
    if args.resume and not out.is_dir():
        raise FileNotFoundError(f"--out {args.out!r} does not exist: there is nothing to resume; drop --resume to "
                                f"start a new {args.command}")
    check_output_dir(out, "--out", empty=not args.resume,
                     hint="add --resume to continue it, or choose another --out")
    progress = TqdmProgress(disable=args.quiet)
    kwargs: dict[str, Any] = {} if science else {"quick": args.quick}
    if args.seeds is not None:
        kwargs["seeds"] = tuple(args.seeds)
    if args.resume:
        kwargs["resume"] = True
    try:
        with third_party_quiet(args.verbose), SigintCancel() as sig:
            runner = run_science if science else run_demo
            result = runner(out, progress=progress, cancel=sig.token, **kwargs)
    except (Cancelled, KeyboardInterrupt):
        progress.close()
        print(f"\ninterrupted: the {args.command} in {out} is resumable; continue it with:\n"
              f"  redifine {args.command} --out {args.out}{' --quick' if getattr(args, 'quick', False) else ''}"
              f"{' --seeds ' + ' '.join(map(str, args.seeds)) if args.seeds else ''} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FileExistsError:
        raise UsageError(f"{str(out)!r} exists and is not empty; add --resume to continue it, or choose another "
                         "--out") from None
    except FileNotFoundError as e:  # the toy model weights are not built: not the user's input
        _err(f"redifine {args.command}", _line(e))
        return EXIT_FAILED
    finally:
        progress.close()
    report_path = getattr(result, "report", None) or (result if isinstance(result, (str, Path)) else None)
    if report_path is None:
        hits = sorted(out.rglob("report.html"))
        report_path = hits[0] if hits else None
    if science:
        for line in answers(study(iteration_records(out))):
            print(line)
    print(f"{args.command} complete: {out}")
    if report_path is not None:
        print(f"report: {report_path}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    run = Path(args.run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"RUN_DIR {args.run_dir!r} is not a folder; give a chain run folder (holds run.json)")
    if not (run / "run.json").is_file():
        raise ValueError(f"{args.run_dir!r} is not a chain run folder (no run.json)")
    from .chain import RunFolder

    RunFolder(run).read_manifest()  # run.json that is not JSON, or not a run: one line naming it
    check_output_dir(run, "RUN_DIR")  # the report is written into the run folder
    from .report import render_report

    path = render_report(run)
    print(f"report: {path}")
    return EXIT_OK


def cmd_schedule(args: argparse.Namespace) -> int:
    from .guidance import parse_schedule

    bounds.check("steps", args.steps, "--steps")
    bounds.check("iteration", args.iteration, "--iteration")
    if args.plot:
        check_output_file(args.plot, "--plot", (".png",))
    try:
        sched = parse_schedule(args.spec)
        values = [float(v) for v in sched.values(args.steps, iteration=args.iteration)]
    except ValueError as e:
        raise UsageError(f"bad schedule {args.spec!r}: {_line(e)}") from None
    if args.json:
        print(json.dumps(values))
    else:
        print(f"schedule: {sched.spec}" + (f"  (iteration {args.iteration})" if sched.is_chain_axis else ""))
        print(f"{'step':>5}  {'progress':>8}  {'w':>8}")
        for i, v in enumerate(values):
            prog = i / (args.steps - 1) if args.steps > 1 else 0.0
            print(f"{i:>5}  {prog:>8.3f}  {v:>8.4f}")
    if args.plot:
        from .report_images import plot_schedule

        plot_schedule([args.spec], args.steps, args.plot, iteration=args.iteration)
        print(f"plot: {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def cmd_traits(args: argparse.Namespace) -> int:
    try:
        from .traits import plot_traits
    except ImportError as e:
        _err("redifine traits", f"the trait model is not available in this install ({e})")
        return EXIT_FAILED
    bounds.check("generations", args.generations, "--generations")
    bounds.check("population", args.population, "--population")
    bounds.check("seed", args.seed, "--seed")
    check_output_file(args.out, "--out", (".png",))
    progress = TqdmProgress(disable=args.quiet)
    try:
        path = plot_traits(args.out, generations=args.generations, population=args.population, seed=args.seed,
                           progress=progress)
    finally:
        progress.close()
    print(f"plot: {path}")
    return EXIT_OK


def cmd_dataset(args: argparse.Namespace) -> int:
    from .datasets_hf import DatasetUnavailable, prepare_dataset

    if args.limit is not None:
        bounds.check("download_limit", args.limit, "--limit")
    check_output_dir(args.out, "--out", empty=True, hint="choose a new or empty folder")
    progress = TqdmProgress(disable=args.quiet)
    try:
        with third_party_quiet(args.verbose), SigintCancel() as sig:
            n = prepare_dataset(args.name, args.out, image_column=args.image_column,
                                caption_column=args.caption_column, split=args.split, limit=args.limit,
                                progress=progress, cancel=sig.token)
    except DatasetUnavailable as e:
        _err("redifine dataset", _line(e))
        return EXIT_FAILED
    except (Cancelled, KeyboardInterrupt):
        progress.close()
        print(f"\ninterrupted: {args.out} holds a partial dataset", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        progress.close()
    print(f"wrote {n} images with captions to {args.out}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="redifine", description="Chain of Diffusion and ReDiFine: will a LoRA trained on its own "
                "outputs degrade, and how to stop it. See docs/cli.md.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"redifine {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    c = add("chain", "run (or resume) a Chain of Diffusion described by a TOML file", cmd_chain)
    c.formatter_class = argparse.RawDescriptionHelpFormatter
    c.epilog = ("Several GPUs or machines: start it with accelerate, e.g.\n"
                "  accelerate launch --num_processes 4 -m redifine_core.cli chain CONFIG.toml --out RUN\n"
                "(torchrun and srun work too). Every process claims one method and seed at a time through claim files\n"
                "in RUN (a folder all of them see); the files are the same as from one process. See docs/scale.md.")
    c.add_argument("config", help="the TOML file (see example_configs/chain.toml)")
    c.add_argument("--out", required=True, help="the run folder (new, or an existing one with --resume)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    c.add_argument("--overwrite", action="store_true", help="delete the previous run in --out and start again")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--verbose", action="store_true", help="show third-party warnings and loading bars")
    c.add_argument("--claim-timeout", type=float, default=CLAIM_TIMEOUT, metavar="SECONDS",
                   help="under accelerate launch / torchrun / srun: a process whose claim has no heartbeat for this "
                        "long is taken to be dead and its unit is taken over (default 300)")

    d = add("demo", "the toy-model demo: baseline low/high CFG vs ReDiFine, with a report", cmd_demo)
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--quick", action="store_true", help="a smaller, faster demo")
    d.add_argument("--seeds", type=int, nargs="+", metavar="S", help="replicate seeds (default: the demo's)")
    d.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--verbose", action="store_true", help="show third-party warnings and loading bars")

    sc = add("science", "the toy study: constant CFG 1.5-7.5, ReDiFine, its two halves and every schedule reading, "
             "over paired replicate seeds (hours on a CPU; docs/toy-lab.md)", cmd_demo)
    sc.add_argument("--out", required=True, help="the run folder (new, or an existing one with --resume)")
    sc.add_argument("--seeds", type=int, nargs="+", metavar="S", help="replicate seeds (default: 0 1 2 3 4)")
    sc.add_argument("--resume", action="store_true", help="continue an interrupted study in --out")
    sc.add_argument("--quiet", action="store_true", help="no progress bars")
    sc.add_argument("--verbose", action="store_true", help="show third-party warnings and loading bars")

    from .cli_check import add_arguments, cmd_check

    add_arguments(add("check", "will my LoRA degrade? your LoRA, images and recipe over a few rounds of training on "
                      "its own images, at your CFG and with ReDiFine (docs/check.md)", cmd_check))

    r = add("report", "re-render the report of a finished or partial run", cmd_report)
    r.add_argument("run_dir", help="a run folder (holds run.json)")

    s = add("schedule", "print the per-step CFG scales of a schedule spec", cmd_schedule)
    s.add_argument("spec", help="a schedule spec, e.g. 7.5, 'linear(10, 3)' or the preset 'redifine'")
    s.add_argument("--steps", type=int, required=True, help="number of denoising steps")
    s.add_argument("--iteration", type=int, default=0, help="chain iteration for chain-axis schedules (default 0)")
    s.add_argument("--json", action="store_true", help="print one JSON list of the scales")
    s.add_argument("--plot", metavar="FILE", help="also plot the schedule to FILE (PNG)")

    t = add("traits", "plot the quantitative-trait model of the chain", cmd_traits)
    t.add_argument("--out", required=True, help="the PNG file to write")
    t.add_argument("--generations", type=int, default=20, help="generations to simulate (default 20)")
    t.add_argument("--population", type=int, default=1000, help="population size (default 1000)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    ds = add("dataset", "download a public Hugging Face image dataset into a captioned folder", cmd_dataset)
    ds.add_argument("name", help="dataset id, e.g. lambdalabs/pokemon-blip-captions")
    ds.add_argument("--out", required=True, help="a new (or empty) folder for <n>.png + <n>.txt")
    ds.add_argument("--image-column", help="column holding the images (default: known recipe, else 'image')")
    ds.add_argument("--caption-column", help="column holding the captions (default: known recipe, else 'text')")
    ds.add_argument("--split", help="dataset split (default 'train')")
    ds.add_argument("--limit", type=int, help="write at most N images")
    ds.add_argument("--quiet", action="store_true", help="no progress bars")
    ds.add_argument("--verbose", action="store_true", help="show third-party warnings and progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    rc = _run_command(args)
    if "torch.distributed" in sys.modules:  # a process of an accelerate / torchrun / srun launch
        from .distributed import leave_launch

        leave_launch(rc)
    return rc


def _run_command(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as e:  # bad input, path or setting: one line, never a traceback
        if os.environ.get("REDIFINE_DEBUG"):  # for bug reports: the full traceback
            raise
        _err(f"redifine {args.command}", _line(e))
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
