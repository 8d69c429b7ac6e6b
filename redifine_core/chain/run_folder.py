"""RunFolder: the one place that knows the layout of a chain run folder, and its one reader.

The chain writes through it, and the report, the toy science summary, the ComfyUI nodes and ``load_run`` read
through it. Layout (schema_version 1)::

    <run>/run.json            {"schema_version": 1, "status": "running"|"complete"|"cancelled"|"failed",
                               "config": ChainConfig.to_dict(), "seeds": [replicate seeds],
                               "versions": {"redifine": .., "torch": .., "diffusers": .., "peft": ..},
                               "created": iso8601, "updated": iso8601, "dataset": {"n": N, "captions": [...]},
                               "pipeline": {"source": .., "kind": ..}, "features": "<FID/KID feature set used>",
                               "size": [width, height], "resumed": [iso8601, ...], "error": "<on failure>",
                               "schedules": {"<method>": {"given": "redifine", "resolved": "exp(7.5, 1, 3)"}}}
                              (schedules: what each method generates with, resumed runs included; chain/start.py)
    <run>/reference/images/<c:04d>.png   D0 as used (centre-cropped and resized to the generation size)
    <run>/reference/captions.json        D0's captions
    <run>/reference/metrics.json         {"metrics": image_statistics(D0)}
    <run>/<method>/seed_<S>/iter_<i:03d>/images/<c:04d>_<k:02d>.png   D_{i+1}: caption c, image k of the caption
    <run>/<method>/seed_<S>/iter_<i:03d>/captions.json      captions aligned with the sorted image names
    <run>/<method>/seed_<S>/iter_<i:03d>/lora.safetensors   LoRA_i (kohya layout), trained on D_i
    <run>/<method>/seed_<S>/iter_<i:03d>/train.json         {"losses": [...], "seconds": .., "seed": .., ...}
    <run>/<method>/seed_<S>/iter_<i:03d>/metrics.json       {"method", "seed", "iteration", "metrics": {..},
                                                             "verdict": {"label", "reasons"}, "features"}
    <run>/<method>/seed_<S>/iter_<i:03d>/DONE               written last: an iteration without it is redone
    <run>/metrics.csv, curves.png, grid_<method>.png, report.html      written by report.render_report
    <run>/claims/                    while processes work on the run (see chain/claims.py):
        worker.<launch>.<rank>.json          one per live process {"launch", "host", "pid", "rank", ...}
        lane.<method>.seed_<S>.<gen>.json    who runs that method and seed; a higher <gen> took over a stale one
        report.<launch>.json                 the one process of a launch that renders the report
        clock.<host>.<pid>                   touched to read the run folder's clock (heartbeats are file times)

Method folder names are MethodConfig names ([A-Za-z0-9_.-]+, never "reference"). A run.json that is not JSON, or
not a run (no schema_version, no config table), is refused with one line naming the file; per-iteration files that
cannot be read are reported as problems by :meth:`RunFolder.read` (the report shows them) and refused by
:meth:`RunFolder.load`.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..atomic import write_json, write_text

SCHEMA_VERSION = 1
RUN_STATUSES: tuple[str, ...] = ("running", "complete", "cancelled", "failed")
ITER_RE = re.compile(r"^iter_(\d+)$")
LANE_CLAIM_RE = re.compile(r"^lane\.(?P<method>.+)\.seed_(?P<seed>-?\d+)\.(?P<gen>\d+)\.json$")
WORKER_RE = re.compile(r"^worker\.(?P<launch>[A-Za-z0-9]+)\.(?P<rank>\d+)\.json$")
SEED_RE = re.compile(r"^seed_(-?\d+)$")
PathLike = Union[str, Path]


@dataclass
class IterationRecord:
    """One iteration folder as read back: its metrics.json (when readable) and whether it is DONE."""

    method: str
    seed: int
    iteration: int
    folder: Path
    metrics: dict[str, float] = field(default_factory=dict)
    verdict: Optional[dict] = None
    features: str = ""
    done: bool = False


@dataclass
class RunData:
    """Everything a reader needs from a run folder: run.json, every iteration found, D0's metrics, problems."""

    root: Path
    run: dict
    methods: list[str]
    seeds: list[int]
    iterations: Optional[int]
    records: list[IterationRecord]
    reference_metrics: dict[str, float]
    problems: list[str]

    @property
    def status(self) -> str:
        return str(self.run.get("status", "unknown"))

    @property
    def config(self) -> dict:
        c = self.run.get("config")
        return c if isinstance(c, dict) else {}

    @property
    def captions(self) -> list[str]:
        """D0's captions as recorded in run.json (empty when missing)."""
        ds = self.run.get("dataset") if isinstance(self.run.get("dataset"), dict) else {}
        caps = ds.get("captions")
        return [str(c) for c in caps] if isinstance(caps, list) else []

    def record(self, method: str, seed: int, iteration: int) -> Optional[IterationRecord]:
        for r in self.records:
            if (r.method, r.seed, r.iteration) == (method, seed, iteration):
                return r
        return None

    def max_iteration(self) -> int:
        found = max((r.iteration + 1 for r in self.records), default=0)
        return max(found, self.iterations or 0)

    def last_done(self) -> list[IterationRecord]:
        """The last DONE iteration of every method and seed, in method then seed order."""
        best: dict[tuple[str, int], IterationRecord] = {}
        for r in self.records:
            key = (r.method, r.seed)
            if r.done and (key not in best or r.iteration > best[key].iteration):
                best[key] = r
        order = {m: i for i, m in enumerate(self.methods)}
        return sorted(best.values(), key=lambda r: (order.get(r.method, 1 << 30), r.method, r.seed))


def _floats(d: Any) -> dict[str, float]:
    if not isinstance(d, dict):
        return {}
    return {str(k): float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunFolder:
    """Paths, DONE markers and reading of one run folder (see the module docstring for the layout)."""

    RUN_JSON = "run.json"
    DONE = "DONE"

    def __init__(self, root: PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    # ------------------------------------------------------------------------------------------------ paths
    @property
    def run_json(self) -> Path:
        return self.root / self.RUN_JSON

    @property
    def reference_dir(self) -> Path:
        return self.root / "reference"

    @property
    def reference_images_dir(self) -> Path:
        return self.reference_dir / "images"

    @property
    def reference_captions_json(self) -> Path:
        return self.reference_dir / "captions.json"

    @property
    def reference_metrics_json(self) -> Path:
        return self.reference_dir / "metrics.json"

    def reference_image(self, c: int) -> Path:
        return self.reference_images_dir / f"{int(c):04d}.png"

    def reference_images(self) -> list[Path]:
        """D0's PNGs in caption order."""
        d = self.reference_images_dir
        return sorted(d.glob("*.png")) if d.is_dir() else []

    def iteration_dir(self, method: str, seed: int, iteration: int) -> Path:
        return self.root / str(method) / f"seed_{int(seed)}" / f"iter_{int(iteration):03d}"

    def images_dir(self, method: str, seed: int, iteration: int) -> Path:
        return self.iteration_dir(method, seed, iteration) / "images"

    @staticmethod
    def image_name(caption_index: int, k: int) -> str:
        """File name of image ``k`` of caption ``caption_index``; sorted names follow generation order."""
        return f"{int(caption_index):04d}_{int(k):02d}.png"

    def lora_path(self, method: str, seed: int, iteration: int) -> Path:
        return self.iteration_dir(method, seed, iteration) / "lora.safetensors"

    def train_json(self, method: str, seed: int, iteration: int) -> Path:
        return self.iteration_dir(method, seed, iteration) / "train.json"

    def metrics_json(self, method: str, seed: int, iteration: int) -> Path:
        return self.iteration_dir(method, seed, iteration) / "metrics.json"

    def captions_json(self, method: str, seed: int, iteration: int) -> Path:
        return self.iteration_dir(method, seed, iteration) / "captions.json"

    def done_path(self, method: str, seed: int, iteration: int) -> Path:
        return self.iteration_dir(method, seed, iteration) / self.DONE

    # ------------------------------------------------------------------------------------------------ claims
    @property
    def claims_dir(self) -> Path:
        return self.root / "claims"

    def worker_claim(self, launch: str, rank: int) -> Path:
        return self.claims_dir / f"worker.{launch}.{int(rank)}.json"

    def lane_claim(self, method: str, seed: int, generation: int) -> Path:
        return self.claims_dir / f"lane.{method}.seed_{int(seed)}.{int(generation)}.json"

    def lane_claims(self, method: str, seed: int) -> list[tuple[int, Path]]:
        """The claim files of one method and seed as (generation, path), lowest generation first."""
        out = []
        for p in self.claims_dir.glob(f"lane.{method}.seed_{int(seed)}.*.json"):
            m = LANE_CLAIM_RE.match(p.name)
            if m and m.group("method") == method and int(m.group("seed")) == int(seed):
                out.append((int(m.group("gen")), p))
        return sorted(out)

    def worker_claims(self) -> list[tuple[str, int, Path]]:
        """Every worker file as (launch, rank, path)."""
        d = self.claims_dir
        found = [(WORKER_RE.match(p.name), p) for p in d.glob("worker.*.json")] if d.is_dir() else []
        return sorted((m.group("launch"), int(m.group("rank")), p) for m, p in found if m)

    def report_claim(self, launch: str) -> Path:
        return self.claims_dir / f"report.{launch}.json"

    def clock_probe(self, host: str, pid: int) -> Path:
        return self.claims_dir / f"clock.{host}.{int(pid)}"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def curves_png(self) -> Path:
        return self.root / "curves.png"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    def grid_png(self, method: str) -> Path:
        return self.root / f"grid_{method}.png"

    def grids(self) -> list[Path]:
        return sorted(self.root.glob("grid_*.png"))

    def iteration_images(self, method: str, seed: int, iteration: int) -> list[Path]:
        """The generated PNGs of one iteration, sorted (= generation order)."""
        d = self.images_dir(method, seed, iteration)
        return sorted(d.glob("*.png")) if d.is_dir() else []

    def caption_image(self, method: Optional[str], seed: int, iteration: int, c: int) -> Optional[Path]:
        """The first image of caption ``c`` at an iteration (``method=None``: D0's image), or None."""
        if method is None:
            p = self.reference_image(c)
            return p if p.is_file() else None
        d = self.images_dir(method, seed, iteration)
        exact = d / self.image_name(c, 0)
        if exact.is_file():
            return exact
        found = sorted(d.glob(f"{int(c):04d}_*.png")) if d.is_dir() else []
        return found[0] if found else None

    # ------------------------------------------------------------------------------------------------ state
    def exists(self) -> bool:
        """True when the folder holds a run.json (readable or not)."""
        return self.run_json.is_file()

    def is_done(self, method: str, seed: int, iteration: int) -> bool:
        return self.done_path(method, seed, iteration).is_file()

    def mark_done(self, method: str, seed: int, iteration: int, stamp: str) -> None:
        write_text(self.done_path(method, seed, iteration), stamp + "\n")

    def any_done(self) -> bool:
        """True when at least one iteration of any method and seed is DONE."""
        return any(self.root.glob(f"*/seed_*/iter_*/{self.DONE}"))

    def clear_iteration(self, method: str, seed: int, iteration: int) -> None:
        """Delete an unfinished iteration's folder (it is redone from scratch)."""
        d = self.iteration_dir(method, seed, iteration)
        if d.exists():
            shutil.rmtree(d)

    def method_dirs(self) -> list[Path]:
        """Folders holding seed_<S> folders (the methods found on disk), sorted by name."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name not in ("reference", "claims")
                      and any(q.is_dir() and SEED_RE.match(q.name) for q in p.iterdir()))

    def clear(self) -> None:
        """Delete what a run writes (run.json, reference/, method folders, report files); other files are kept, and
        so is ``claims/`` (the live processes' files: chain/claims.py clears stale ones)."""
        for p in [self.reference_dir, *self.method_dirs()]:
            if p.exists():
                shutil.rmtree(p)
        for p in [self.run_json, self.metrics_csv, self.curves_png, self.report_html, *self.grids()]:
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------ reading
    @staticmethod
    def read_json(path: PathLike, expected: str = "JSON") -> Any:
        """A JSON file's content; ValueError naming the file and ``expected`` when it is not valid JSON."""
        path = Path(path)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{str(path)!r} does not exist (expected {expected})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{str(path)!r} is not UTF-8 text (expected {expected})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                             f"expected {expected}") from None
        except IsADirectoryError:
            raise ValueError(f"{str(path)!r} is a folder (expected {expected})") from None

    def read_manifest(self) -> dict:
        """run.json, checked to be a run: ValueError/FileNotFoundError with one line naming the file otherwise."""
        expected = "a run.json written by a chain run"
        if not self.root.is_dir():
            raise FileNotFoundError(f"run folder {str(self.root)!r} does not exist or is not a folder")
        if not self.run_json.exists():
            raise FileNotFoundError(f"{str(self.root)!r} is not a chain run folder: it has no run.json")
        run = self.read_json(self.run_json, expected)
        sv = run.get("schema_version") if isinstance(run, dict) else None
        if not isinstance(run, dict) or isinstance(sv, bool) or not isinstance(sv, int) \
                or not isinstance(run.get("config"), dict):
            got = f"keys {sorted(run)[:6]}" if isinstance(run, dict) else f"a JSON {type(run).__name__}"
            raise ValueError(f"{str(self.run_json)!r} is not a chain run (got {got}; expected a JSON object with "
                             "schema_version and a config table, as written by a chain run)")
        if "status" in run and not isinstance(run["status"], str):
            raise ValueError(f"{str(self.run_json)!r}: status={run['status']!r} is not one of {RUN_STATUSES}")
        return run

    def write_manifest(self, manifest: dict) -> None:
        write_json(self.run_json, manifest)

    def read_captions(self, method: str, seed: int, iteration: int) -> list[str]:
        caps = self.read_json(self.captions_json(method, seed, iteration), "a JSON list of captions")
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"{str(self.captions_json(method, seed, iteration))!r} is not a JSON list of captions")
        return caps

    def read_metrics(self, method: str, seed: int, iteration: int) -> dict:
        """An iteration's metrics.json, checked to hold a metrics table."""
        p = self.metrics_json(method, seed, iteration)
        rec = self.read_json(p, "an iteration's metrics.json")
        if not isinstance(rec, dict) or not isinstance(rec.get("metrics"), dict):
            raise ValueError(f"{str(p)!r} is not an iteration's metrics (expected a JSON object with a metrics table)")
        return rec

    def read_reference_metrics(self) -> Optional[dict]:
        p = self.reference_metrics_json
        return self.read_json(p, "D0's metrics.json") if p.exists() else None

    def read(self) -> RunData:
        """run.json (strict) plus every iteration folder found on disk (lenient: unreadable files become problems)."""
        run = self.read_manifest()
        problems: list[str] = []
        sv = run.get("schema_version")
        if sv != SCHEMA_VERSION:
            problems.append(f"run.json schema_version {sv!r}; this version reads {SCHEMA_VERSION} and may miss fields")
        config = run["config"]
        methods: list[str] = []
        for m in config.get("methods", []) or []:
            name = m.get("name") if isinstance(m, dict) else None
            if isinstance(name, str) and name not in methods:
                methods.append(name)
        methods += [p.name for p in self.method_dirs() if p.name not in methods]
        seeds = [int(s) for s in (run.get("seeds") or config.get("seeds") or [])
                 if isinstance(s, (int, float)) and not isinstance(s, bool)]
        iterations = config.get("iterations")
        iterations = int(iterations) if isinstance(iterations, (int, float)) and not isinstance(iterations, bool) else None
        records: list[IterationRecord] = []
        for method in methods:
            mdir = self.root / method
            if not mdir.is_dir():
                continue
            for sdir in sorted(p for p in mdir.iterdir() if p.is_dir() and SEED_RE.match(p.name)):
                seed = int(SEED_RE.match(sdir.name).group(1))
                if seed not in seeds:
                    seeds.append(seed)
                for idir in sorted(p for p in sdir.iterdir() if p.is_dir() and ITER_RE.match(p.name)):
                    it = int(ITER_RE.match(idir.name).group(1))
                    if not (idir / "metrics.json").exists():
                        continue
                    try:
                        data = self.read_metrics(method, seed, it)
                    except (OSError, ValueError) as e:
                        problems.append(str(e).splitlines()[0])
                        continue
                    records.append(IterationRecord(
                        method=method, seed=seed, iteration=it, folder=idir, metrics=_floats(data.get("metrics")),
                        verdict=data.get("verdict") if isinstance(data.get("verdict"), dict) else None,
                        features=str(data.get("features") or run.get("features") or ""),
                        done=(idir / self.DONE).exists(),
                    ))
        ref_metrics: dict[str, float] = {}
        try:
            ref = self.read_reference_metrics()
            ref_metrics = _floats(ref.get("metrics")) if isinstance(ref, dict) else {}
        except (OSError, ValueError) as e:
            problems.append(str(e).splitlines()[0])
        return RunData(self.root, run, methods, sorted(seeds), iterations, records, ref_metrics, problems)

    def load(self) -> dict:
        """run.json plus ``reference`` (its metrics.json) and ``records``: every DONE iteration's metrics.json (with
        ``dir``) of the configured methods, seeds and iterations, in that order. Works on partial runs; an unreadable
        file of a DONE iteration is an error naming it."""
        run = self.read_manifest()
        run["reference"] = self.read_reference_metrics()
        run["run_dir"] = str(self.root)
        cfg = run["config"]
        methods = [m.get("name") for m in cfg.get("methods", []) if isinstance(m, dict)]
        seeds = run.get("seeds") or cfg.get("seeds") or []
        n_it = cfg.get("iterations", 0)
        n_it = int(n_it) if isinstance(n_it, int) and not isinstance(n_it, bool) else 0
        records = []
        for m in methods:
            for s in seeds:
                for i in range(n_it):
                    if self.is_done(m, s, i):
                        rec = self.read_metrics(m, s, i)
                        rec["dir"] = str(self.iteration_dir(m, s, i))
                        records.append(rec)
        run["records"] = records
        return run


def read_png(path: PathLike) -> np.ndarray:
    """One image file as uint8 RGB [H, W, 3]; ValueError naming the file when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from None


def load_run(run_dir: PathLike) -> dict:
    """``RunFolder(run_dir).load()``: run.json, D0's metrics and every finished iteration's metrics."""
    return RunFolder(run_dir).load()
