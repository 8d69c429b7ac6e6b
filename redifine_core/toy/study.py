"""The schedule study: every method of docs/study-protocol.md on every toy dataset, and its per-seed table.

``python -m redifine_core.toy.study OUT --run [--datasets shapes,textures] [--seeds 8]`` runs (or resumes) one chain
run folder per dataset and seed under OUT (so a study may run over several sittings or machines, seed by seed); ``--table FILE.csv`` collects every finished iteration into the per-seed table
(statistics, FID against D0 and the dataset's prompt fidelity; one ``D0`` row per dataset); ``--analyse FILE.csv``
prints the protocol's analysis (``study_analysis``) from a table, so it reruns without the runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from PIL import Image

from ..chain.run_folder import RunFolder
from ..presets import USUAL_CFG
from ..progress import CancelFlag, ProgressCallback
from . import study_analysis as sa
from .demo import DemoSettings
from .science import open_rgb

STUDY_SETTINGS = DemoSettings(n_images=32, iterations=6, finetune_steps=30, learning_rate=2e-3, rank=8, batch_size=8,
                              sample_steps=10, low_cfg=1.0, high_cfg=7.5)
"""The chain of the study: 32 images a round, 6 iterations, the toy LoRA recipe (the low/high CFG fields are unused)."""
STUDY_SEEDS = 8
COND_DROP = 0.2
DATA_SEED = 1234


def _registry():
    from .registry import TOY_DATASETS

    return TOY_DATASETS


def d0(ds, n: int = 32, seed: int = DATA_SEED):
    """D0 of ``ds`` (a registry ToyDataset): ``n`` images drawn from ``seed``, as CaptionedImages."""
    from ..data import CaptionedImages

    images, captions = ds.images(n, seed)
    return CaptionedImages.from_images([Image.fromarray(im) for im in images], captions)


def fidelity(ds, images: Sequence[Image.Image], captions: Sequence[str]) -> float:
    """Full-caption accuracy of ``images`` under ``ds``'s attribute checker."""
    import numpy as np

    return float(ds.check(np.stack([np.asarray(im) for im in images]), list(captions))["full"])


def method_configs(plan: sa.StudyPlan = sa.PLAN) -> tuple:
    """The study's MethodConfigs: the plan's constants without condition drop, its readings with it."""
    from ..chain import MethodConfig

    methods = [MethodConfig(name=c, kind="baseline", cfg=float(c.split("-", 1)[1])) for c in plan.constants]
    methods += [MethodConfig(name=r, kind="custom", schedule=f"{r}({USUAL_CFG:g})", cond_drop=COND_DROP)
                for r in plan.readings]
    return tuple(methods)


def study_config(seeds: Union[int, Sequence[int]] = STUDY_SEEDS, settings: DemoSettings = STUDY_SETTINGS):
    """The ChainConfig run on each dataset; a bad seed count raises ValueError before any work."""
    from ..chain import ChainConfig
    from .demo import seed_tuple, train_config

    seeds = seed_tuple(seeds, STUDY_SEEDS)
    return ChainConfig(iterations=settings.iterations, methods=method_configs(), train=train_config(settings),
                       steps=settings.sample_steps, sampler="ddim", seeds=tuple(seeds), batch_size=64)


def pick_datasets(names: Optional[Sequence[str]]) -> list:
    """The named registry datasets (all when ``names`` is empty); an unknown name is one ValueError line."""
    known = _registry()
    names = list(names or known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"datasets: unknown {', '.join(map(repr, unknown))}; expected some of {', '.join(known)}")
    return [known[n] for n in names]


def lane_folder(out_root: Union[str, Path], dataset: str, seed: int) -> Path:
    """The run folder of one dataset and one seed (every method): ``OUT/<dataset>/seed_<seed>``."""
    return Path(out_root) / dataset / f"seed_{seed}"


def run_study(out_root: Union[str, Path], datasets: Optional[Sequence[str]] = None,
              seeds: Union[int, Sequence[int]] = STUDY_SEEDS, progress: Optional[ProgressCallback] = None,
              cancel: Optional[CancelFlag] = None, settings: DemoSettings = STUDY_SETTINGS) -> list[Path]:
    """Run, or resume, the study: one run folder per dataset and seed (``lane_folder``), seed by seed across the
    datasets, so a study stopped part-way has the same seeds on every dataset and a later call adds the rest."""
    from ..chain import run_chain
    from ..models import load_pipeline
    from ..paths import check_output_dir

    picked = pick_datasets(datasets)
    seeds = study_config(seeds, settings).seeds  # validates before any work
    out_root = check_output_dir(out_root, "out", empty=False)
    pipelines = {ds.model: load_pipeline(ds.model) for ds in picked}  # a missing model stops before any run starts
    folders = []
    for seed in seeds:
        for ds in picked:
            folder = lane_folder(out_root, ds.name, seed)
            run_chain(pipelines[ds.model], d0(ds, settings.n_images), study_config((seed,), settings), folder,
                      progress=progress, cancel=cancel, resume=(folder / "run.json").is_file(), render=False)
            folders.append(folder)
    return folders


def table_rows(out_root: Union[str, Path], datasets: Optional[Sequence[str]] = None) -> list[dict]:
    """The per-seed table of every finished iteration under ``out_root`` (one D0 row per dataset first)."""
    rows: list[dict] = []
    for ds in pick_datasets(datasets):
        run_dirs = sorted((Path(out_root) / ds.name).glob("seed_*/run.json"), key=lambda p: int(p.parent.name[5:]))
        for n, run_json in enumerate(run_dirs):
            folder = RunFolder(run_json.parent)
            data = folder.read()
            if n == 0:  # D0 is the same set in every seed's folder
                ref = {k: v for k, v in data.reference_metrics.items() if isinstance(v, (int, float))}
                ref["fidelity"] = fidelity(ds, open_rgb(folder.reference_images()), data.captions)
                rows.append({"dataset": ds.name, "method": sa.REFERENCE, "seed": 0, "iteration": 0, **ref})
            rows += _lane_rows(ds, folder, data)
    return rows


def _lane_rows(ds, folder: RunFolder, data) -> list[dict]:
    rows = []
    for r in data.records:
        if not r.done:
            continue
        images = open_rgb(folder.iteration_images(r.method, r.seed, r.iteration))
        rec = {k: v for k, v in r.metrics.items() if isinstance(v, (int, float))}
        rec["fidelity"] = fidelity(ds, images, folder.read_captions(r.method, r.seed, r.iteration))
        rows.append({"dataset": ds.name, "method": r.method, "seed": r.seed, "iteration": r.iteration, **rec})
    return rows


def format_analysis(result: Mapping) -> str:
    """The protocol's answers as plain lines: controls, best constants, each reading's tests, the selection."""
    lines = []
    for ds, c in result["controls"].items():
        lines.append(f"{ds}: CFG acts as in SD at iteration 0: {'yes' if c['cfg_acts_as_sd'] else 'NO'}; "
                     f"blur at the lowest CFG: {'yes' if c['blur_shows'] else 'no'}; over-guidance at the highest: "
                     f"{'yes' if c['over_guidance_shows'] else 'no'}; best constant {result['best_constant'][ds]}")
    for name, r in result["readings"].items():
        for ds, per in r["vs_best"].items():
            parts = []
            for m, t in per.items():
                parts.append(f"{m} d={t['mean']:+.4g} 90% [{t['ci90_low']:+.4g}, {t['ci90_high']:+.4g}] "
                             f"margin {t['margin']:.3g}, p_upper(Holm) {t['p_upper_holm']:.3g}, "
                             f"p_TOST(Holm) {t['p_tost_holm']:.3g}")
            lines.append(f"{name} vs best on {ds}: " + "; ".join(parts))
        lines.append(f"{name}: at least as good as the best constant on {len(r['qualifies'])} of "
                     f"{len(result['eligible'])} eligible datasets ({', '.join(r['qualifies']) or 'none'}); "
                     f"equivalent on {', '.join(r['equivalent']) or 'none'}; "
                     f"FID endpoint / best constant's {r['fid_ratio_to_best']:.3g}")
    sel = result["selected"]
    qualified = bool(result["readings"][sel]["qualifies"])
    lines.append(f"selected: {sel}" + ("" if qualified else " (no reading matched the best constant on any dataset; "
                                                            "this is the closest)"))
    lines.append("the paper's claim (one setting as good as the best constant on every dataset): "
                 + ("supported" if result["claim_supported"] else "NOT supported") + " on this bed")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m redifine_core.toy.study", description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, nargs="?", help="the study's root folder (one run folder per dataset)")
    ap.add_argument("--run", action="store_true", help="run or resume the study into OUT first")
    ap.add_argument("--datasets", default="", help="comma-separated toy dataset names (toy.registry), default all")
    ap.add_argument("--seeds", type=int, default=STUDY_SEEDS, help=f"replicate seeds 0..N-1 (default {STUDY_SEEDS})")
    ap.add_argument("--seed", type=int, nargs="+", help="run only these seeds (e.g. the rest of a study stopped early)")
    ap.add_argument("--table", type=Path, help="write the per-seed table of OUT to this CSV")
    ap.add_argument("--analyse", type=Path, help="print the protocol's analysis of this per-seed CSV")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    try:
        pick_datasets(names)
        seeds = tuple(args.seed) if args.seed else args.seeds
        study_config(seeds)
        if (args.run or args.table) and args.out is None:
            raise ValueError("OUT is needed for --run and --table")
        if args.run:
            from ..cli_progress import TqdmProgress

            progress = TqdmProgress()
            try:
                run_study(args.out, names, seeds, progress)
            finally:
                progress.close()
        if args.table:
            print(f"table: {sa.write_table(table_rows(args.out, names), args.table)}")
        if args.analyse:
            print(format_analysis(sa.analyse(sa.read_table(args.analyse))))
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        ap.error(str(e).splitlines()[0])
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
