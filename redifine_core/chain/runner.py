"""run_chain: a whole run (every unit of every method and replicate seed), resumable, over one or many processes.

One process runs the units iteration-major, so a partial run has every method at the same depth. Several
processes (``accelerate launch``, torchrun, srun: see docs/scale.md) each claim one method and seed (a *lane*) at a
time through claim files in the run folder (claims.py) and run its iterations; start-up is the only collective step
(rank 0 opens the run, every process checks it agrees with run.json). Each unit is a pure function of files on disk
(unit.py), so the files are the same whichever process ran which unit, and a resumed run redoes only unfinished units.

Starting over. A run folder is continued with ``resume``; a config that differs from the stored one is refused once
any unit is DONE, and replaces it while none is (a run that failed before finishing anything is fixed by correcting
the config). ``overwrite`` deletes a previous run's files and starts afresh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Union

from .. import bounds
from ..distributed import Processes
from ..distributed import current as current_processes
from ..progress import CancelFlag, Cancelled, ProgressCallback, ProgressEvent, check_cancel, report
from .backend import ChainBackend, default_backend
from .claims import DEFAULT_TIMEOUT, Claims, new_launch_id
from .coerce import config_diff
from .config import ChainConfig
from .run_folder import SCHEMA_VERSION, RunFolder
from .start import check_run_folder, now, open_run, resolved_schedules, versions, with_recorded_schedules
from .unit import (  # noqa: F401 (re-exported)
    ChainResult,
    Unit,
    _fit,
    _generation_size,
    _record_verdict_to,
    _Run,
    _run_unit,
    _write_reference,
    image_seed,
    train_lora,
    train_seed,
    units,
)

log = logging.getLogger(__name__)


def iteration_dir(run_dir: Union[str, Path], method: str, seed: int, iteration: int) -> Path:
    """``RunFolder(run_dir).iteration_dir(method, seed, iteration)``."""
    return RunFolder(run_dir).iteration_dir(method, seed, iteration)


def _render_report(run_dir: Path) -> Optional[Path]:
    """Render the report; a failure is logged and never loses the run."""
    from .. import report as report_mod

    try:
        return Path(report_mod.render_report(run_dir))
    except Exception as e:  # noqa: BLE001 - a report failure must not lose the run
        log.warning("could not render the report of %s: %s: %s", run_dir, type(e).__name__, e)
        return None


def run_chain(
    pipeline: Any,
    dataset: Any,
    config: ChainConfig,
    run_dir: Union[str, Path],
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFlag] = None,
    resume: bool = False,
    *,
    overwrite: bool = False,
    backend: Optional[ChainBackend] = None,
    render: bool = True,
    processes: Optional[Processes] = None,
    claim_timeout: float = DEFAULT_TIMEOUT,
) -> ChainResult:
    """Run (or resume) the Chain of Diffusion of every method and replicate seed in ``config`` into ``run_dir``.

    ``dataset`` is D_0 (a ``data.CaptionedImages``). Raises FileExistsError for a non-empty ``run_dir`` without
    ``resume`` or ``overwrite``, or one another launch is using; FileNotFoundError when resuming a folder that holds
    no run; ValueError for a run.json that is not a run, or when resuming with a different config or dataset after a
    unit finished (naming every differing field). ``overwrite`` deletes a previous run's files first. Re-raises
    Cancelled / KeyboardInterrupt after marking the run "cancelled" (it stays resumable).

    Several processes (``processes``, default: the launch found in the environment by ``distributed.current()``,
    i.e. ``accelerate launch`` / torchrun / srun) share the run: each claims one method and seed at a time
    (chain/claims.py), a claim without a heartbeat for ``claim_timeout`` seconds is taken over, and the files are
    those one process writes. One process (no launcher) runs the units iteration-major, as always.
    """
    if not isinstance(config, ChainConfig):
        raise ValueError(f"config={config!r} must be a ChainConfig")
    captions = [str(c) for c in getattr(dataset, "captions", ())]
    images_in = list(getattr(dataset, "images", ()))
    if not captions or len(captions) != len(images_in):
        raise ValueError(f"dataset must hold images with one caption each (got {len(images_in)} images, "
                         f"{len(captions)} captions)")
    if len(captions) < 2:
        raise ValueError(f"dataset has {len(captions)} image(s); a chain needs at least 2 (FID/KID compare sets)")
    bounds.check("images", len(captions) * config.images_per_caption,
                 "images per generated set (dataset images x images_per_caption)")
    if not isinstance(claim_timeout, (int, float)) or isinstance(claim_timeout, bool) or not claim_timeout > 0:
        raise ValueError(f"claim_timeout={claim_timeout!r} must be a number of seconds > 0")
    procs = processes if processes is not None else current_processes()
    data_parallel = config.parallel == "data" and procs.world_size > 1
    if data_parallel and getattr(config.train, "batch_size", 0) % procs.world_size:
        raise ValueError(f"train.batch_size={config.train.batch_size} must be a multiple of the number of processes "
                         f"({procs.world_size}) with parallel='data' (each LoRA's global batch is split evenly)")
    folder = RunFolder(run_dir)
    width, height = _generation_size(pipeline, config)
    reference = [_fit(im, width, height) for im in images_in]
    fresh = {
        "schema_version": SCHEMA_VERSION, "status": "running", "config": json.loads(json.dumps(config.to_dict())),
        "seeds": list(config.seeds), "versions": versions(), "created": now(), "updated": now(),
        "dataset": {"n": len(captions), "captions": captions},
        "pipeline": {"source": str(getattr(pipeline, "source", "")), "kind": str(getattr(pipeline, "kind", ""))},
        "features": config.features, "size": [width, height], "schedules": resolved_schedules(config),
    }
    run = _Run(pipeline, config, folder, captions, reference, (width, height), backend or default_backend(),
               fresh, progress, cancel, ChainResult(run_dir=folder.root, status="running"))
    claims = _start(run, procs, resume, overwrite, float(claim_timeout))
    manifest = run.manifest

    def set_status(status: str, **extra: Any) -> None:
        manifest.update(status=status, updated=now(), **extra)
        folder.write_manifest(manifest)

    alone = procs.world_size == 1 or data_parallel  # one process writes the run (the others only help train)
    if data_parallel:
        run.train_processes = procs
        if procs.is_main:
            run.before_train = lambda unit: procs.broadcast(unit.index)
        else:
            return _follow(run, claims, procs)
    try:
        if alone:
            try:
                claims.claim_all(lanes(config))
                for unit in units(run.config):
                    run.cancel = claims.cancel_for((unit.method.name, unit.seed), cancel)
                    _run_unit(run, unit)
            finally:
                if data_parallel:  # the other processes are done (best effort after an error outside training)
                    with contextlib.suppress(Exception):
                        procs.broadcast(None)
        else:
            _run_lanes(run, claims, cancel)
        run.cancel = cancel
    except (Cancelled, KeyboardInterrupt):
        lost = [f"{m} seed {s}" for (m, s) in list(claims.held) if claims.lost((m, s))]
        if lost and not (cancel is not None and cancel.is_set()):
            set_status("failed", error=f"another process took over {', '.join(lost)}")
            claims.leave()
            raise RuntimeError(f"another process took over {', '.join(lost)} of {str(folder.root)!r} (this "
                               f"process's heartbeat was older than {claim_timeout:g} s)") from None
        set_status("cancelled")
        run.result.status = "cancelled"
        claims.leave()
        if render and alone:
            run.result.report = _render_report(folder.root)
        raise
    except BaseException as e:
        set_status("failed", error=f"{type(e).__name__}: {e}")
        claims.leave()
        raise
    try:
        run.result.status = "complete"
        if not alone:
            run.result.verdicts = _verdicts_on_disk(run)
        if alone or claims.claim_report():  # exactly one process finishes the run
            set_status("complete")
            n = config.n_units()
            report(progress, ProgressEvent(phase="chain", step=n, total=n, message="complete",
                                           extra={"stage": "complete"}))
            if render:
                run.result.report = _render_report(folder.root)
    finally:
        claims.leave()
    return run.result


def lanes(config: ChainConfig) -> list[tuple[str, int]]:
    """The (method, seed) pairs of a run, each run through its iterations by one process: method, then seed order."""
    return [(m.name, s) for m in config.methods for s in config.seeds]


def _lane_done(run: _Run, lane: tuple[str, int]) -> bool:
    return all(run.folder.is_done(lane[0], lane[1], i) for i in range(run.config.iterations))


def _run_lanes(run: _Run, claims: Claims, cancel: Optional[CancelFlag]) -> None:
    """Several processes: claim one unfinished lane at a time (rank r looks from lane r on), run its iterations,
    release it; wait for lanes others hold (taking over stale ones) until every lane is DONE."""
    procs = claims.procs
    all_lanes = lanes(run.config)
    k = procs.rank % len(all_lanes)
    order = all_lanes[k:] + all_lanes[:k]
    poll = max(0.05, min(claims.timeout / 4.0, 5.0))
    while True:
        check_cancel(cancel)
        pending = [lane for lane in order if not _lane_done(run, lane)]
        if not pending:
            return
        lane = next((ln for ln in pending if claims.claim(ln)), None)
        if lane is None:  # every unfinished lane is held by a live process: wait (and take over if one dies)
            time.sleep(poll)
            continue
        log.info("%s runs %s seed %d", procs.label, *lane)
        run.cancel = claims.cancel_for(lane, cancel)
        try:
            for unit in units(run.config):
                if (unit.method.name, unit.seed) == lane:
                    _run_unit(run, unit)
        except Cancelled:
            if claims.lost(lane) and not (cancel is not None and cancel.is_set()):
                claims.release(lane)
                continue
            raise
        finally:
            run.cancel = cancel
        claims.release(lane)


def _follow(run: _Run, claims: Claims, procs: Processes) -> ChainResult:
    """parallel="data", ranks > 0: train each LoRA rank 0 announces, together with it (rank 0 writes every file)."""
    try:
        while True:
            index = procs.broadcast(None)
            if index is None:
                break
            train_lora(run, units(run.config)[index])
    finally:
        claims.leave()
    run.result.status = "complete"
    run.result.verdicts = _verdicts_on_disk(run)
    return run.result


def _verdicts_on_disk(run: _Run) -> dict[str, dict[int, list[str]]]:
    """Verdict labels of every DONE iteration (all processes' work), method/seed/iteration order."""
    out: dict[str, dict[int, list[str]]] = {}
    for unit in sorted(units(run.config), key=lambda u: (u.method.name, u.seed, u.iteration)):
        m, s, i = unit.method.name, unit.seed, unit.iteration
        if run.folder.is_done(m, s, i):
            _record_verdict_to(out, m, s, run.folder.read_metrics(m, s, i))
    return {m.name: out[m.name] for m in run.config.methods if m.name in out}


_ERRORS = {c.__name__: c for c in (ValueError, FileExistsError, FileNotFoundError, PermissionError, RuntimeError)}


def _start(run: _Run, procs: Processes, resume: bool, overwrite: bool, timeout: float) -> Claims:
    """Check every process was given rank 0's config, dataset and model kind (before anything is written), open the
    run on rank 0 (folder checks, claims, run.json checked and written as for one process, D0), share the outcome,
    and start this process's heartbeat. One process: the same steps without collectives."""
    folder, fresh = run.folder, run.manifest
    mine = {"config": fresh["config"], "dataset": fresh["dataset"], "pipeline": {"kind": fresh["pipeline"]["kind"]},
            "size": fresh["size"]}
    gathered = procs.all_gather((procs.host, mine))
    hosts = [h for h, _ in gathered]
    bad = [(r, d) for r, d in ((r, config_diff(gathered[0][1], m)) for r, (_, m) in enumerate(gathered)) if d]
    if bad:
        r, d = bad[0]
        procs.barrier()  # every rank is past the gather before any tears its process group down (gloo aborts else)
        raise ValueError(f"process rank {r} (host {hosts[r]!r}) disagrees with rank 0 about the run in "
                         f"{str(folder.root)!r} in {', '.join(d)}: every process of a launch must be given the same "
                         "config, dataset and model (nothing was written)")
    launch = new_launch_id() if procs.is_main else ""
    error: Optional[BaseException] = None
    claims: Optional[Claims] = None
    if procs.is_main:
        claims = Claims(folder, procs, launch, timeout, hosts)
        try:
            check_run_folder(folder.root, resume=resume, overwrite=overwrite)
            claims.enter()
        except BaseException as e:
            error, claims = e, None
        if claims is not None:
            try:
                claims.reset()
                run.manifest = open_run(folder, fresh, run.reference, resume, overwrite)
                folder.root.mkdir(parents=True, exist_ok=True)
                folder.write_manifest(run.manifest)
                try:
                    _write_reference(run)
                except (Cancelled, KeyboardInterrupt):
                    run.manifest.update(status="cancelled", updated=now())
                    folder.write_manifest(run.manifest)
                    raise
                except BaseException as e:
                    run.manifest.update(status="failed", updated=now(), error=f"{type(e).__name__}: {e}")
                    folder.write_manifest(run.manifest)
                    raise
            except BaseException as e:
                error = e
                claims.leave()
    shared = procs.broadcast((launch, run.manifest if procs.is_main else None,
                              None if error is None else (type(error).__name__, str(error).splitlines()[0])))
    if error is not None:
        raise error
    launch, manifest, err = shared
    if err is not None:
        raise _ERRORS.get(err[0], RuntimeError)(err[1])
    if not procs.is_main:
        run.manifest = manifest
    run.config = with_recorded_schedules(run.config, run.manifest)  # what the run started with, also on resume
    if claims is None:
        claims = Claims(folder, procs, launch, timeout, hosts)
        claims.enter()
        _write_reference(run)  # D0's files exist (rank 0 wrote them): read back for the summaries
    procs.barrier()
    claims.start()
    return claims
