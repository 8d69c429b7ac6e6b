"""The Chain of Diffusion: finetune, generate from the same captions, repeat; one resumable run folder.

    config.py      ChainConfig, MethodConfig, the method-line parser (CLI and nodes)
    run_folder.py  RunFolder: the run folder's layout, DONE markers and its one reader (load_run)
    start.py       the checks before a run starts, resume and overwrite
    runner.py      run_chain: a whole run over one or many processes (lanes claimed by method and seed)
    unit.py        one unit: train, generate streamed to disk, measure, DONE; the seeds
    claims.py      claim files and heartbeats in the run folder (which process runs which lane)
    backend.py     ChainBackend: the operations a unit calls (a seam for tests)
    coerce.py      dict <-> config dataclass round trip with errors that name the key
"""

from .backend import ChainBackend, default_backend
from .coerce import config_diff
from .config import (
    MAX_CFG,
    METHOD_KINDS,
    PARALLEL_MODES,
    PROTOCOLS,
    REDIFINE_COND_DROP,
    REDIFINE_SCHEDULE,
    ChainConfig,
    MethodConfig,
    parse_method_line,
    parse_methods,
)
from .run_folder import RUN_STATUSES, SCHEMA_VERSION, IterationRecord, RunData, RunFolder, load_run, read_png
from .claims import DEFAULT_TIMEOUT as DEFAULT_CLAIM_TIMEOUT
from .runner import ChainResult, Unit, image_seed, iteration_dir, lanes, run_chain, train_seed, units
from .start import check_run_folder

__all__ = [
    "DEFAULT_CLAIM_TIMEOUT", "ChainBackend", "ChainConfig", "ChainResult", "IterationRecord", "MAX_CFG", "METHOD_KINDS", "MethodConfig",
    "PARALLEL_MODES", "PROTOCOLS", "REDIFINE_COND_DROP", "REDIFINE_SCHEDULE", "RUN_STATUSES", "RunData", "RunFolder", "SCHEMA_VERSION",
    "Unit", "check_run_folder", "config_diff", "default_backend", "image_seed", "iteration_dir", "lanes", "load_run",
    "parse_method_line", "parse_methods", "read_png", "run_chain", "train_seed", "units",
]
