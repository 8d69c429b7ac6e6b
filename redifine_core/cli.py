"""The ``redifine`` command line: chain, demo, report, schedule, traits, dataset (see docs/cli.md).

Bad arguments or a bad config exit with status 2 and one line naming the problem (no traceback); Ctrl-C stops a
run cleanly (first press: at the next step; second press: at once), leaves it resumable and exits with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .progress import Cancelled, CancelToken, ProgressEvent

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A bad argument or config: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------------------ progress
class TqdmProgress:
    """Map ProgressEvents to one tqdm bar per phase (chain on top, then train / sample / metrics)."""

    ORDER = ("chain", "demo", "train", "sample", "metrics", "dataset")

    def __init__(self, disable: bool = False) -> None:
        self.bars: dict[str, Any] = {}
        self.disable = disable

    def __call__(self, ev: ProgressEvent) -> None:
        from tqdm.auto import tqdm

        bar = self.bars.get(ev.phase)
        total = max(int(ev.total or 0), 0) or None
        if bar is None:
            pos = self.ORDER.index(ev.phase) if ev.phase in self.ORDER else len(self.ORDER) + len(self.bars)
            bar = tqdm(total=total, desc=ev.phase, position=pos, leave=ev.phase == "chain", disable=self.disable,
                       dynamic_ncols=True)
            self.bars[ev.phase] = bar
        elif bar.total != total or ev.step < bar.n:
            bar.reset(total=total)
        bar.n = max(int(ev.step), 0)
        if ev.message:
            bar.set_description_str(f"{ev.phase}: {ev.message}"[:70], refresh=False)
        if ev.loss is not None:
            bar.set_postfix_str(f"loss {ev.loss:.4f}", refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


class _SigintCancel:
    """First Ctrl-C sets the cancel token (stop at the next step); a second one raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.token = CancelToken()
        self._old: Any = None

    def __enter__(self) -> "_SigintCancel":
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not in the main thread
            self._old = None
        return self

    def _handler(self, signum, frame) -> None:
        if self.token.is_set():
            raise KeyboardInterrupt
        self.token.set()
        print("\nstopping at the next step (press Ctrl-C again to stop at once)...", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# ----------------------------------------------------------------------------------------------------- TOML config
@dataclass(frozen=True)
class ChainJob:
    """A ``redifine chain`` TOML file, parsed and validated (nothing loaded yet)."""

    pipeline_source: str
    tokenizer_dir: Optional[str]
    device: Optional[str]
    dtype: Optional[str]
    dataset_source: str
    default_caption: Optional[str]
    dataset_limit: Optional[int]
    config: Any  # chain.ChainConfig


_TOP_KEYS = ("pipeline", "dataset", "chain", "train", "methods")
_PIPELINE_KEYS = {"source": str, "tokenizer_dir": str, "device": str, "dtype": str}
_DATASET_KEYS = {"source": str, "default_caption": str, "limit": int}
_DTYPES = ("float32", "float16", "bfloat16")


def _table(d: dict, name: str, spec: dict[str, type], required: Sequence[str]) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"[{name}] must be a table")
    for k, v in d.items():
        if k not in spec:
            raise ValueError(f"unknown key '{name}.{k}' (allowed: {', '.join(spec)})")
        if not isinstance(v, spec[k]) or isinstance(v, bool):
            raise ValueError(f"{name}.{k}: expected {spec[k].__name__}, got {v!r}")
    for k in required:
        if k not in d:
            raise ValueError(f"missing key '{name}.{k}'")
    return d


def _resolve(path: str, base: Path) -> str:
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else (base / p))


def parse_chain_toml(path: str | os.PathLike) -> ChainJob:
    """Read and validate a chain TOML (see examples/chain.toml); ValueError names the offending key."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    from .chain import ChainConfig

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path.name} is not valid TOML: {e}") from None
    for k in data:
        if k not in _TOP_KEYS:
            raise ValueError(f"unknown key '{k}' (allowed top-level tables: {', '.join(_TOP_KEYS)})")
    base = path.resolve().parent
    pipe = _table(data.get("pipeline", {}), "pipeline", _PIPELINE_KEYS, ["source"])
    ds = _table(data.get("dataset", {}), "dataset", _DATASET_KEYS, ["source"])
    if "dtype" in pipe and pipe["dtype"] not in _DTYPES:
        raise ValueError(f"pipeline.dtype={pipe['dtype']!r} is not allowed; use one of {_DTYPES}")
    if "limit" in ds and ds["limit"] < 2:
        raise ValueError(f"dataset.limit={ds['limit']!r} must be >= 2")
    chain = data.get("chain", {})
    if not isinstance(chain, dict):
        raise ValueError("[chain] must be a table")
    methods = data.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ValueError("missing key 'methods': add at least one [[methods]] table")
    overlap = [k for k in ("methods", "train") if k in chain]
    if overlap:
        raise ValueError(f"unknown key 'chain.{overlap[0]}' (use the top-level [{overlap[0]}] table)")
    cfg_dict = dict(chain, methods=methods)
    if "train" in data:
        cfg_dict["train"] = data["train"]
    config = ChainConfig.from_dict(cfg_dict)
    src = pipe["source"]
    if src != "toy":
        src = _resolve(src, base)
    dsrc = ds["source"]
    if not dsrc.startswith("toy:"):
        dsrc = _resolve(dsrc, base)
    else:
        n = dsrc[4:]
        if not n.isdigit() or int(n) < 2:
            raise ValueError(f"dataset.source={dsrc!r}: the toy set is 'toy:N' with N >= 2")
    return ChainJob(
        pipeline_source=src,
        tokenizer_dir=_resolve(pipe["tokenizer_dir"], base) if "tokenizer_dir" in pipe else None,
        device=pipe.get("device"),
        dtype=pipe.get("dtype"),
        dataset_source=dsrc,
        default_caption=ds.get("default_caption"),
        dataset_limit=ds.get("limit"),
        config=config,
    )


def load_job_dataset(job: ChainJob):
    """D_0 of a job: the toy set ("toy:N") or a folder of images + .txt captions."""
    from .data import CaptionedImages

    if job.dataset_source.startswith("toy:"):
        from .toy.dataset import make_toy_dataset

        return make_toy_dataset(int(job.dataset_source[4:]))
    folder = Path(job.dataset_source)
    if not folder.is_dir():
        raise UsageError(f"dataset.source {str(folder)!r} is not a folder")
    ds = CaptionedImages.from_folder(folder, default_caption=job.default_caption)
    if job.dataset_limit is not None and len(ds) > job.dataset_limit:
        ds = CaptionedImages.from_images(list(ds.images[: job.dataset_limit]), list(ds.captions[: job.dataset_limit]))
    return ds


def load_job_pipeline(job: ChainJob):
    import torch

    from .models import load_pipeline

    device = None if job.device in (None, "auto") else torch.device(job.device)
    dtype = getattr(torch, job.dtype) if job.dtype else None
    return load_pipeline(job.pipeline_source, device=device, dtype=dtype, tokenizer_dir=job.tokenizer_dir)


# -------------------------------------------------------------------------------------------------------- commands
def _err(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def cmd_chain(args: argparse.Namespace) -> int:
    prog = "redifine chain"
    try:
        job = parse_chain_toml(args.config)
    except ValueError as e:
        _err(prog, f"{args.config}: {e}")
        return EXIT_USAGE
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        _err(prog, f"--out {str(out)!r} is a file")
        return EXIT_USAGE
    if out.is_dir() and any(out.iterdir()) and not args.resume:
        _err(prog, f"run folder {str(out)!r} exists and is not empty; add --resume to continue it, or choose another --out")
        return EXIT_USAGE
    from .chain import run_chain

    resume_cmd = f"redifine chain {args.config} --out {args.out} --resume"
    progress = TqdmProgress(disable=args.quiet)
    try:
        dataset = load_job_dataset(job)
        pipeline = load_job_pipeline(job)
        with _SigintCancel() as sig:
            result = run_chain(pipeline, dataset, job.config, out, progress=progress, cancel=sig.token,
                               resume=args.resume)
    except (Cancelled, KeyboardInterrupt):
        progress.close()
        print(f"\ninterrupted: the run in {out} is resumable; continue it with:\n  {resume_cmd}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, ValueError, FileExistsError, FileNotFoundError) as e:
        progress.close()
        _err(prog, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return EXIT_USAGE
    progress.close()
    print(f"run complete: {result.run_dir}")
    for method, per_seed in result.verdicts.items():
        for seed, labels in per_seed.items():
            print(f"  {method} seed {seed}: " + " -> ".join(labels))
    if result.report is not None:
        print(f"report: {result.report}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .toy.demo import run_demo
    except ImportError as e:
        _err("redifine demo", f"the toy demo is not available in this install ({e})")
        return EXIT_FAILED
    out = Path(args.out)
    progress = TqdmProgress(disable=args.quiet)
    kwargs: dict[str, Any] = {"quick": args.quick}
    if args.seeds is not None:
        kwargs["seeds"] = tuple(args.seeds)
    if args.resume:
        kwargs["resume"] = True
    try:
        with _SigintCancel() as sig:
            result = run_demo(out, progress=progress, cancel=sig.token, **kwargs)
    except (Cancelled, KeyboardInterrupt):
        progress.close()
        print(f"\ninterrupted: the demo in {out} is resumable; continue it with:\n"
              f"  redifine demo --out {args.out}{' --quick' if args.quick else ''}"
              f"{' --seeds ' + ' '.join(map(str, args.seeds)) if args.seeds else ''} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FileExistsError:
        progress.close()
        _err("redifine demo", f"{str(out)!r} exists and is not empty; add --resume to continue it, or choose another --out")
        return EXIT_USAGE
    except ValueError as e:
        progress.close()
        _err("redifine demo", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return EXIT_USAGE
    except FileNotFoundError as e:  # e.g. the toy model weights are not built
        progress.close()
        _err("redifine demo", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return EXIT_FAILED
    progress.close()
    report_path = getattr(result, "report", None) or (result if isinstance(result, (str, Path)) else None)
    if report_path is None:
        hits = sorted(out.rglob("report.html"))
        report_path = hits[0] if hits else None
    print(f"demo complete: {out}")
    if report_path is not None:
        print(f"report: {report_path}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    run = Path(args.run_dir)
    if not (run / "run.json").exists():
        _err("redifine report", f"{str(run)!r} is not a chain run folder (no run.json)")
        return EXIT_USAGE
    from .report import render_report

    try:
        path = render_report(run)
    except ValueError as e:
        _err("redifine report", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return EXIT_USAGE
    print(f"report: {path}")
    return EXIT_OK


def cmd_schedule(args: argparse.Namespace) -> int:
    from .guidance import parse_schedule

    if args.steps < 1:
        _err("redifine schedule", f"--steps {args.steps} must be >= 1")
        return EXIT_USAGE
    try:
        sched = parse_schedule(args.spec)
        values = [float(v) for v in sched.values(args.steps, iteration=args.iteration)]
    except ValueError as e:
        _err("redifine schedule", f"bad schedule {args.spec!r}: {str(e).splitlines()[0]}")
        return EXIT_USAGE
    if args.json:
        print(json.dumps(values))
    else:
        print(f"schedule: {sched.spec}" + (f"  (iteration {args.iteration})" if sched.is_chain_axis else ""))
        print(f"{'step':>5}  {'progress':>8}  {'w':>8}")
        for i, v in enumerate(values):
            prog = i / (args.steps - 1) if args.steps > 1 else 0.0
            print(f"{i:>5}  {prog:>8.3f}  {v:>8.4f}")
    if args.plot:
        from .report import plot_schedule

        plot_schedule([args.spec], args.steps, args.plot, iteration=args.iteration)
        print(f"plot: {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def cmd_traits(args: argparse.Namespace) -> int:
    try:
        from .traits import plot_traits
    except ImportError as e:
        _err("redifine traits", f"the trait model is not available in this install ({e})")
        return EXIT_FAILED
    progress = TqdmProgress(disable=args.quiet)
    try:
        path = plot_traits(args.out, generations=args.generations, population=args.population, seed=args.seed,
                           progress=progress)
    except ValueError as e:
        progress.close()
        _err("redifine traits", str(e).splitlines()[0])
        return EXIT_USAGE
    progress.close()
    print(f"plot: {path}")
    return EXIT_OK


def cmd_dataset(args: argparse.Namespace) -> int:
    from .datasets_hf import DatasetUnavailable, prepare_dataset

    if args.limit is not None and args.limit < 1:
        _err("redifine dataset", f"--limit {args.limit} must be >= 1")
        return EXIT_USAGE
    progress = TqdmProgress(disable=args.quiet)
    try:
        with _SigintCancel() as sig:
            n = prepare_dataset(args.name, args.out, image_column=args.image_column,
                                caption_column=args.caption_column, split=args.split, limit=args.limit,
                                progress=progress, cancel=sig.token)
    except DatasetUnavailable as e:
        progress.close()
        _err("redifine dataset", str(e))
        return EXIT_FAILED
    except ValueError as e:
        progress.close()
        _err("redifine dataset", str(e).splitlines()[0])
        return EXIT_USAGE
    except (Cancelled, KeyboardInterrupt):
        progress.close()
        print(f"\ninterrupted: {args.out} holds a partial dataset", file=sys.stderr)
        return EXIT_INTERRUPTED
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
    c.add_argument("config", help="the TOML file (see examples/chain.toml)")
    c.add_argument("--out", required=True, help="the run folder (new, or an existing one with --resume)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    d = add("demo", "the toy-model demo: baseline low/high CFG vs ReDiFine, with a report", cmd_demo)
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--quick", action="store_true", help="a smaller, faster demo")
    d.add_argument("--seeds", type=int, nargs="+", metavar="S", help="replicate seeds (default: the demo's)")
    d.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    d.add_argument("--quiet", action="store_true", help="no progress bars")

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
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
