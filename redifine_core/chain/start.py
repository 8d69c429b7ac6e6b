"""Starting a run in a folder: the checks made before any work, and the manifest to continue or begin with.

``check_run_folder`` is what a caller that loads a model first (the CLI) runs before loading: it never writes.
``open_run`` returns the manifest to run with: a fresh one, or the stored one when resuming after checking that the
config, the dataset, the model kind and D0's images are the run's. A changed config is refused once any unit is DONE
and replaces the stored one while none is; ``overwrite`` clears a previous run's files.

A run records every method's schedule resolved to its canonical expansion (``resolved_schedules``), and a resumed
run generates with the recorded one (``with_recorded_schedules``), so a preset whose meaning changed since keeps
the meaning the run started with; a run.json from before the record gets the expansion of that time
(``guidance.legacy_expansion``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .. import __version__
from ..atomic import clean_stale_temps
from .coerce import config_diff
from .run_folder import SCHEMA_VERSION, RunFolder, read_png

log = logging.getLogger(__name__)


def now() -> str:
    """UTC time stamp, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Versions of the packages whose changes can change a run's numbers."""
    from importlib import metadata

    out = {"redifine": __version__}
    for pkg in ("torch", "diffusers", "peft", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def stored_config(config: Any) -> Any:
    """run.json's config with the defaults of keys added since it was written (e.g. ``parallel``), so that a run
    from an older version resumes; left as it is when it does not parse (the difference is then reported)."""
    from .config import ChainConfig

    try:
        return json.loads(json.dumps(ChainConfig.from_dict(config).to_dict()))
    except (ValueError, TypeError):
        return config


def _given_schedule(method: dict) -> Any:
    """What a method dict of run.json's config gave as its schedule: the spec, else the constant cfg."""
    from .config import REDIFINE_SCHEDULE

    if method.get("schedule") is not None:
        return method["schedule"]
    return method["cfg"] if method.get("cfg") is not None else REDIFINE_SCHEDULE


def resolved_schedules(config: Any) -> dict[str, dict]:
    """Every method's schedule as given and resolved to its canonical expansion, as run.json records them:
    ``{method: {"given": "redifine", "resolved": "exp(7.5, 1, 3)"}}``."""
    from ..guidance import parse_schedule

    return {m.name: {"given": m.guidance, "resolved": parse_schedule(m.guidance).spec} for m in config.methods}


def recorded_schedules(folder: RunFolder, manifest: dict) -> dict[str, dict]:
    """run.json's resolved schedules; for a run.json written before they were recorded, each method's schedule as it
    expanded then (``guidance.legacy_expansion``). ValueError naming run.json when they cannot be read."""
    from ..guidance import legacy_expansion, parse_schedule

    where = str(folder.run_json)
    methods = [m for m in (manifest.get("config") or {}).get("methods") or [] if isinstance(m, dict)]
    record = manifest.get("schedules")
    out: dict[str, dict] = {}
    for m in methods:
        name = m.get("name")
        try:
            if record is None:
                given = _given_schedule(m)
                out[name] = {"given": given, "resolved": legacy_expansion(given)}
            else:
                out[name] = {"given": record[name]["given"], "resolved": parse_schedule(record[name]["resolved"]).spec}
        except (KeyError, TypeError, ValueError) as e:
            reason = str(e).splitlines()[0] if isinstance(e, ValueError) else f"no resolved schedule ({e!r} missing)"
            raise ValueError(f"{where!r}: the schedule of method {name!r} cannot be resumed: {reason}") from None
    return out


def with_recorded_schedules(config: Any, manifest: dict) -> Any:
    """``config`` with each scheduled method's schedule replaced by the expansion the run recorded, which is what
    a run generates with (a preset's meaning may have changed since the run started)."""
    record = manifest["schedules"]
    methods = tuple(dataclasses.replace(m, schedule=record[m.name]["resolved"]) if m.schedule is not None else m
                    for m in config.methods)
    return dataclasses.replace(config, methods=methods)


def _comparable(folder: RunFolder, manifest: dict, given: dict) -> Any:
    """run.json's config to compare with ``given`` (a config dict): a method whose given schedule text differs from
    the stored one but resolves to the schedule the run recorded takes the given text, so a run started with an old
    call (``redifine_rising(2, 7.5)``) resumes with its plain form (``linear(2, 7.5)``)."""
    from ..guidance import parse_schedule

    stored = manifest.get("config")
    try:
        record = recorded_schedules(folder, manifest)
    except ValueError:
        return stored_config(stored)
    stored = json.loads(json.dumps(stored))
    for sm, gm in zip(stored.get("methods") or [], given.get("methods") or []):
        if not (isinstance(sm, dict) and isinstance(gm, dict) and sm.get("name") == gm.get("name")):
            continue
        text = gm.get("schedule")
        if text is not None and text != sm.get("schedule") and sm.get("name") in record:
            try:
                if parse_schedule(text).spec == record[sm["name"]]["resolved"]:
                    sm["schedule"] = text
            except ValueError:
                pass
    return stored_config(stored)


def _refuse_changes(folder: RunFolder, diff: list[str]) -> None:
    """A changed config or dataset is refused once any unit is DONE (it would mix two runs in one folder)."""
    if diff and folder.any_done():
        raise ValueError(
            f"cannot resume {str(folder.root)!r}: the given config/dataset differ from the run's in "
            f"{', '.join(diff)}; resume with the same settings, start a new run folder, or pass overwrite=True "
            "(CLI: --overwrite) to discard its finished iterations")


def check_run_folder(run_dir: Union[str, Path], resume: bool = False, overwrite: bool = False,
                     config: Optional[Any] = None) -> None:
    """What ``run_chain`` checks about the folder before any work, for callers that load a model first (the CLI).

    With ``config`` (a ChainConfig) and ``resume``, a config that differs from a run with a finished unit is refused
    here too. Raises ValueError / FileNotFoundError / FileExistsError with one line; never writes.
    """
    folder = RunFolder(run_dir)
    root = folder.root
    if root.exists() and not root.is_dir():
        raise ValueError(f"run folder {str(root)!r} is a file, not a folder")
    non_empty = root.is_dir() and any(p.name != "claims" for p in root.iterdir())  # claims/: see claims.py
    if overwrite:
        if non_empty and not folder.exists():
            raise ValueError(f"refusing to overwrite {str(root)!r}: it is not a chain run folder (no run.json); "
                             "choose a new or empty folder")
        return
    if resume:
        if not folder.exists():
            raise FileNotFoundError(f"nothing to resume: {str(root)!r} holds no chain run (no run.json); check the "
                                    "folder name, or start a new run without resume")
        manifest = folder.read_manifest()
        if config is not None:
            given = json.loads(json.dumps(config.to_dict()))
            _refuse_changes(folder, [f"config.{d}" for d in config_diff(_comparable(folder, manifest, given), given)])
        return
    if non_empty:
        raise FileExistsError(f"run folder {str(root)!r} exists and is not empty; pass resume=True (CLI: --resume) "
                              "to continue it, overwrite=True (CLI: --overwrite) to start it again, or choose another "
                              "folder")


def _stored_differences(folder: RunFolder, manifest: dict, given: dict, reference: list) -> list[str]:
    """Where the stored run differs from the given config, dataset, model kind and D0 images."""
    if manifest.get("schema_version") != SCHEMA_VERSION:
        return [f"schema_version ({manifest.get('schema_version')!r}, this version writes {SCHEMA_VERSION})"]
    stored_pipe = manifest.get("pipeline") if isinstance(manifest.get("pipeline"), dict) else {}
    stored = {"config": _comparable(folder, manifest, given["config"]), "dataset": manifest.get("dataset"),
              "pipeline": {"kind": stored_pipe.get("kind")}}
    diff = config_diff(stored, {"config": given["config"], "dataset": given["dataset"],
                                "pipeline": {"kind": given["pipeline"]["kind"]}})
    if diff:
        return diff
    if stored_pipe.get("source") != given["pipeline"]["source"]:
        log.warning("resuming %s with pipeline source %r (the run started with %r): make sure it is the same model",
                    folder.root, given["pipeline"]["source"], stored_pipe.get("source"))
    current = versions()
    changed = sorted(k for k, v in (manifest.get("versions") or {}).items() if current.get(k) != v)
    if changed:
        log.warning("resuming %s with other versions of %s: later iterations may not be bit-identical",
                    folder.root, ", ".join(changed))
    for c, im in enumerate(reference):
        p = folder.reference_image(c)
        if p.exists():
            try:
                stored_arr = read_png(p)
            except ValueError:  # unreadable: rewritten
                continue
            if not np.array_equal(stored_arr, np.asarray(im, dtype=np.uint8)):
                return [f"dataset image {c} (reference/images/{p.name})"]
    return []


def open_run(folder: RunFolder, fresh: dict, reference: list, resume: bool, overwrite: bool) -> dict:
    """The manifest to run with: a fresh one, or the stored one when resuming (checked against ``fresh``)."""
    check_run_folder(folder.root, resume=resume, overwrite=overwrite)
    if overwrite and folder.exists():
        log.info("overwrite: deleting the previous run in %s", folder.root)
        folder.clear()
        return fresh
    if not resume:
        return fresh
    manifest = folder.read_manifest()
    diff = _stored_differences(folder, manifest, fresh, reference)
    if diff:
        _refuse_changes(folder, diff)
        log.info("restarting %s with the given settings: no iteration had finished (it differed in %s)",
                 folder.root, ", ".join(diff))
        folder.clear()
        return fresh
    removed = clean_stale_temps(folder.root)
    if removed:
        log.info("removed %d stale temp file(s) from %s", removed, folder.root)
    manifest.pop("error", None)
    manifest["schedules"] = recorded_schedules(folder, manifest)
    manifest.update(status="running", updated=now())
    manifest.setdefault("resumed", []).append(now())
    return manifest


