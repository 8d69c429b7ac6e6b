"""Shared by several test modules: the pack loaded the way ComfyUI loads it, and a small valid chain TOML."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The smallest valid chain config on the toy model (tests edit it to make one key wrong).
GOOD_CHAIN_TOML = """
[pipeline]
source = "toy"
[dataset]
source = "toy:4"
[chain]
iterations = 2
steps = 2
[train]
steps = 2
[[methods]]
name = "low"
kind = "baseline"
cfg = 1.5
"""


def load_pack():
    """Import the repo root as ComfyUI does: spec_from_file_location on __init__.py under a path-derived name."""
    name = "redifine_pack_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def write_captioned_folder(folder: Path, captions=("a red circle", "a blue square", "a green triangle",
                                                   "a yellow star"), size: int = 32, seed: int = 0) -> Path:
    """``img<i>.png`` (seeded noise, ``size`` px) + ``img<i>.txt`` per caption in a new folder: a tiny D0."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, cap in enumerate(captions):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(cap)
    return folder
