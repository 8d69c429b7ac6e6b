"""Which process this is in a multi-process launch, and the few collectives a chain run needs at start-up.

``current()`` reads the launch from the environment through accelerate's ``PartialState`` (which understands
``accelerate launch``, ``torchrun`` / ``python -m torch.distributed.run`` and MPI launchers) and returns a
:class:`Processes`: rank, world size, host, and ``broadcast`` / ``all_gather`` / ``barrier``. A plain
``python``/``redifine`` start (no launcher variables) is one process and never imports accelerate or initialises
torch.distributed.

Our own code here, and why: accelerate does not read Slurm's variables, so ``redifine chain`` started by ``srun``
(one task per GPU, no launcher) would be N independent single processes; :func:`slurm_to_torch_env` maps
``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` to ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (when those
are not set) before accelerate looks. ``MASTER_ADDR`` / ``MASTER_PORT`` must still come from the job script (docs/scale.md).
On a machine without CUDA the group is made with ``PartialState(cpu=True)`` (gloo): accelerate would otherwise treat a
CPU-only torchrun launch as one process.

The chain uses collectives only while starting (agreeing on the run folder and the config); after that processes
coordinate through claim files in the run folder only, so a process that dies never blocks the others.
"""

from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["Processes", "current", "single", "slurm_to_torch_env", "launched_world_size"]

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def slurm_to_torch_env(env: Optional[dict] = None) -> bool:
    """Under ``srun`` without a launcher: set RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE from Slurm's task
    variables (existing values are kept). Returns True when it set anything."""
    env = os.environ if env is None else env
    if any(env.get(v) for v in _WORLD_VARS) or not env.get("SLURM_PROCID") or not env.get("SLURM_NTASKS"):
        return False
    if int(env["SLURM_NTASKS"]) <= 1:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")  # "4", "4(x2)" or "4,2"
    tasks_per_node = per_node.split("(")[0].split(",")[0]
    if tasks_per_node.isdigit():
        env.setdefault("LOCAL_WORLD_SIZE", tasks_per_node)
    return True


def launched_world_size(env: Optional[dict] = None) -> int:
    """The world size the launcher's variables announce (1 without a launcher)."""
    env = os.environ if env is None else env
    for v in _WORLD_VARS:
        if env.get(v, "").strip().isdigit():
            return max(int(env[v]), 1)
    if env.get("SLURM_NTASKS", "").isdigit() and env.get("SLURM_PROCID"):
        return max(int(env["SLURM_NTASKS"]), 1)
    return 1


@dataclass
class Processes:
    """This process's place in a launch: ``rank`` of ``world_size``, its host, and start-up collectives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    host: str = ""
    _state: Any = None  # accelerate.PartialState when world_size > 1

    def __post_init__(self) -> None:
        if not self.host:
            self.host = socket.gethostname()
        if not (0 <= int(self.rank) < int(self.world_size)):
            raise ValueError(f"rank={self.rank!r} must be in [0, world_size={self.world_size!r})")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        """``[rank r/W]`` for progress lines and logs ("" for a single process)."""
        return f"[rank {self.rank}/{self.world_size}]" if self.world_size > 1 else ""

    def broadcast(self, obj: Any) -> Any:
        """``obj`` of rank 0, on every rank (picklable objects; identity for one process)."""
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))

    def barrier(self) -> None:
        if self.world_size > 1:
            self._state.wait_for_everyone()


def leave_launch(code: int) -> None:
    """End a process of a launch with exit status ``code``: flush its output, destroy the process group, and leave
    with ``os._exit`` when a group existed. Gloo's worker threads can abort the interpreter while it finalizes
    ("terminate called without an active exception", status -6; pytorch/pytorch#190489), measured here in about 1
    of 7 refused 2-process starts without destroy_process_group and 1 of 20 with it. Every file the chain writes is written atomically
    and closed by then, so skipping finalization loses nothing. A single process returns normally."""
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    _destroy_process_group()
    os._exit(code)


def _destroy_process_group() -> None:
    """Destroy the default process group if there is one (idempotent)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def single() -> Processes:
    """One process (no launcher)."""
    return Processes()


def current() -> Processes:
    """This process in the launch described by the environment (accelerate / torchrun / MPI / srun)."""
    slurm_to_torch_env()
    if launched_world_size() <= 1:
        return single()
    import torch
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    atexit.register(_destroy_process_group)  # whoever forgets close(): the group still ends before the interpreter
    if state.num_processes <= 1:
        return single()
    return Processes(rank=int(state.process_index), world_size=int(state.num_processes),
                     local_rank=int(state.local_process_index), _state=state)
