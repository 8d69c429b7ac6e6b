"""Claim files: which process runs which method and seed (a *lane*) of a run, with heartbeats, in the run folder.

Every process of a launch writes ``claims/worker.<launch>.<rank>.json`` and claims lanes with
``claims/lane.<method>.seed_<S>.<gen>.json``. A claim file is created exclusively (written beside, then hard-linked
into place: exactly one process gets a name, on local disks and NFS alike) and records host, pid, rank and launch.
A background thread touches the files a process holds every ``timeout / 4`` seconds: that file time is the heartbeat.

Time is the run folder's time, never a local clock: a process reads "now" by touching its own probe file in
``claims/`` and reading its mtime, so hosts with skewed clocks agree. A claim is *live* while its heartbeat is
younger than ``timeout`` and, when it was written on this host, its pid still runs (a process killed here is seen
at once). A lane whose newest claim is not live is taken over by writing the next generation ``<gen+1>``
(exclusive again: one taker). The old owner, if it was only frozen, sees the newer generation at its next heartbeat
and abandons the lane (its cancel flag is set); the taker redoes the interrupted iteration from its last DONE.

A launch refuses a run folder while another launch has a live worker file there (two launches never share a
folder; a launch is joined only by resuming after the other one ended or died). ``report.<launch>.json``, created
exclusively, picks the one process that renders the report. When a worker of this launch has not appeared in the
folder after ``timeout`` seconds, the folder is probably not shared between the machines: a warning says so.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from ..distributed import Processes
from .run_folder import RunFolder

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0  # seconds without a heartbeat before a claim is stale (NFS caches file times for up to 60 s)
Lane = tuple[str, int]  # (method name, replicate seed)


def new_launch_id() -> str:
    return secrets.token_hex(6)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def create_exclusive(path: Path, record: dict) -> bool:
    """Write ``record`` as JSON at ``path`` unless something is there already; True when this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"  # a stale one is removed by clean_stale_temps
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: O_EXCL create (the content follows at once)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(tmp.read_text(encoding="utf-8"))
            return True
    finally:
        tmp.unlink(missing_ok=True)


def read_claim(path: Path) -> dict:
    """A claim file's record ({} when it is gone or unreadable: a claim being written)."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


@dataclass
class _Held:
    path: Path
    generation: int
    lost: threading.Event


class LaneCancel:
    """The caller's cancel flag, or this process lost the lane's claim (another process took it over)."""

    def __init__(self, user: Any, lost: threading.Event) -> None:
        self.user, self.lost = user, lost

    def is_set(self) -> bool:
        return bool(self.lost.is_set() or (self.user is not None and self.user.is_set()))


class Claims:
    """This process's claims in one run folder (see the module docstring)."""

    def __init__(self, folder: RunFolder, procs: Processes, launch: str, timeout: float = DEFAULT_TIMEOUT,
                 hosts: Optional[list[str]] = None) -> None:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"claim_timeout={timeout!r} must be a number of seconds > 0")
        self.folder, self.procs, self.launch, self.timeout = folder, procs, launch, float(timeout)
        self.hosts = list(hosts or [procs.host] * procs.world_size)
        self.pid = os.getpid()
        self.held: dict[Lane, _Held] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._seen: set[int] = set()
        self._started: Optional[float] = None
        self._warned = False

    # ---------------------------------------------------------------------------------------------- basics
    def _record(self, **extra: Any) -> dict:
        return {"launch": self.launch, "host": self.procs.host, "pid": self.pid, "rank": self.procs.rank,
                "world_size": self.procs.world_size, **extra}

    def now(self) -> float:
        """The run folder's clock: the mtime of this process's freshly touched probe file."""
        probe = self.folder.clock_probe(self.procs.host, self.pid)
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        os.utime(probe, None)
        return probe.stat().st_mtime

    def is_live(self, path: Path, now: Optional[float] = None) -> bool:
        """A claim or worker file whose heartbeat is fresh and (written here) whose process still runs."""
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return False
        now = self.now() if now is None else now
        if now - mtime > self.timeout:
            return False
        rec = read_claim(path)
        if rec.get("host") == self.procs.host and isinstance(rec.get("pid"), int) and rec["pid"] != self.pid:
            return _pid_running(rec["pid"])
        return True

    # ---------------------------------------------------------------------------------------------- launch
    def enter(self) -> None:
        """Write this process's worker file; on rank 0 first refuse a folder another launch is using."""
        path = self.folder.worker_claim(self.launch, self.procs.rank)
        create_exclusive(path, self._record())
        if not self.procs.is_main:
            return
        now = self.now()
        for launch, rank, p in self.folder.worker_claims():
            if launch != self.launch and self.is_live(p, now):
                rec = read_claim(p)
                path.unlink(missing_ok=True)
                raise FileExistsError(
                    f"run folder {str(self.folder.root)!r} is in use by another launch (host {rec.get('host')!r}, "
                    f"pid {rec.get('pid')}, rank {rank}, heartbeat {now - p.stat().st_mtime:.0f} s ago); two launches "
                    f"never share a folder: wait for it to end (or, if it died, {self.timeout:.0f} s, the claim "
                    "timeout) and resume")

    def reset(self) -> None:
        """Rank 0 at start: delete every claim file but this launch's (none of them is live, see ``enter``)."""
        mine = self.folder.worker_claim(self.launch, self.procs.rank)
        for p in self.folder.claims_dir.iterdir() if self.folder.claims_dir.is_dir() else ():
            if p.is_file() and p != mine:
                p.unlink(missing_ok=True)

    def start(self, progress: Optional[Callable[[str], None]] = None) -> None:
        """Start the heartbeat thread (call after every rank's ``enter``)."""
        self._started = self.now()
        self._note_workers()
        self._thread = threading.Thread(target=self._beat, name="redifine-heartbeat", daemon=True)
        self._thread.start()

    def leave(self) -> None:
        """Stop the heartbeat, release every claim held, remove the worker file; the last worker removes claims/."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for lane in list(self.held):
            self.release(lane)
        self.folder.worker_claim(self.launch, self.procs.rank).unlink(missing_ok=True)
        self.folder.clock_probe(self.procs.host, self.pid).unlink(missing_ok=True)
        try:
            if not any(p.name.startswith(("worker.", "lane.")) for p in self.folder.claims_dir.iterdir()):
                for p in self.folder.claims_dir.iterdir():
                    if p.name.startswith("report."):
                        p.unlink(missing_ok=True)
                self.folder.claims_dir.rmdir()
        except OSError:  # another process still works here, or removed it first
            pass

    # ---------------------------------------------------------------------------------------------- lanes
    def claim(self, lane: Lane) -> bool:
        """Claim ``lane`` unless a live claim holds it; a stale one is taken over (next generation)."""
        method, seed = lane
        found = self.folder.lane_claims(method, seed)
        gen = 0
        if found:
            top, path = found[-1]
            if self.is_live(path):
                return False
            gen = top + 1
            old = read_claim(path)
        target = self.folder.lane_claim(method, seed, gen)
        if not create_exclusive(target, self._record(lane=[method, int(seed)], generation=gen)):
            return False
        if gen:
            log.warning("%s took over %s seed %d from host %r pid %s rank %s (its heartbeat is stale): its "
                        "unfinished iteration is redone", self.procs.label or "process", method, seed,
                        old.get("host"), old.get("pid"), old.get("rank"))
        for g, p in found:  # older generations are history now
            p.unlink(missing_ok=True)
        with self._lock:
            self.held[lane] = _Held(target, gen, threading.Event())
        return True

    def claim_all(self, lanes: Iterable[Lane]) -> None:
        """Claim every lane (one process runs them all); a live claim of another process is an error."""
        for lane in lanes:
            if not self.claim(lane):
                raise FileExistsError(f"{lane[0]} seed {lane[1]} of {str(self.folder.root)!r} is claimed by a "
                                      "live process of another launch")

    def cancel_for(self, lane: Lane, user: Any) -> LaneCancel:
        held = self.held.get(lane)
        return LaneCancel(user, held.lost if held else threading.Event())

    def lost(self, lane: Lane) -> bool:
        held = self.held.get(lane)
        return held is None or held.lost.is_set()

    def release(self, lane: Lane) -> None:
        with self._lock:
            held = self.held.pop(lane, None)
        if held is not None and not held.lost.is_set():
            held.path.unlink(missing_ok=True)

    def claim_report(self) -> bool:
        """True in exactly one process of the launch: the one that renders the report."""
        return create_exclusive(self.folder.report_claim(self.launch), self._record())

    # ---------------------------------------------------------------------------------------------- heartbeat
    def _beat(self) -> None:
        interval = max(self.timeout / 4.0, 0.05)
        while not self._stop.wait(interval):
            try:
                self.heartbeat()
            except OSError as e:  # a passing filesystem error must not kill the thread
                log.warning("%s heartbeat in %s failed: %s", self.procs.label, self.folder.claims_dir, e)

    def heartbeat(self) -> None:
        """Touch this process's files; flag lanes another process took over; warn about an unshared folder."""
        worker = self.folder.worker_claim(self.launch, self.procs.rank)
        try:
            os.utime(worker, None)
        except FileNotFoundError:  # removed (by hand, or a reset that took it for dead): written again
            create_exclusive(worker, self._record())
        with self._lock:
            held = list(self.held.items())
        for (method, seed), h in held:
            newer = [g for g, _ in self.folder.lane_claims(method, seed) if g > h.generation]
            if newer or not h.path.exists():
                if not h.lost.is_set():
                    log.warning("%s lost %s seed %d to another process (this one's heartbeat was stale): "
                                "leaving it", self.procs.label or "process", method, seed)
                h.lost.set()
                continue
            os.utime(h.path, None)
        self._note_workers()

    def _note_workers(self) -> None:
        self._seen.update(r for launch, r, _ in self.folder.worker_claims() if launch == self.launch)
        missing = sorted(set(range(self.procs.world_size)) - self._seen)
        if missing and not self._warned and self._started is not None and self.now() - self._started > self.timeout:
            self._warned = True
            hosts = sorted({self.hosts[r] for r in missing if r < len(self.hosts)})
            log.warning("%s run folder %s: processes %s of this launch (hosts %s) have not appeared in it after %.0f "
                        "s: is it on a filesystem every machine shares? Otherwise each machine runs the whole run "
                        "on its own (see docs/scale.md)", self.procs.label, self.folder.root, missing, hosts,
                        self.timeout)
