"""(maintainer tool) Make each template's thumbnail from a real run: start the test server, run the template's API
twin exactly as shipped, and write the images of its chosen output nodes, side by side, as ``<name>.jpg`` beside
the template (the frontend's template browser shows ``<name>.jpg`` for a custom pack's ``<name>.json``).

    python tests/comfyui/thumbnails.py [NAME ...]        (ComfyUI as for the tests: COMFYUI_ROOT, COMFYUI_PYTHON)
    python tests/comfyui/thumbnails.py --recompose NAME KEPT_DIR   (again from the images a run kept)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from harness import REPO, WORKFLOW_DIR, ComfyServer, load_workflow

SHOWN = {  # template -> (output node shown on the left or None, output nodes shown as rows on the right)
    "collapse_cfg_sweep": (None, ("4",)),  # the Chain node's grids, one per method (rows are iterations)
    "redifine_chain": (None, ("4",)),
    "schedule_explorer": ("3", ("6", "7")),  # the schedules' plot; constant-CFG images, then redifine images
    "train_then_ksampler": ("13", ("12",)),  # the loss curve; the stock KSampler's images
    "redifine_check": (None, ("3",)),  # the Check node's grid: captions x rounds, both arms
}
SIZE = 512  # the template browser shows thumbnails in a 256 px square; twice that for high-density screens


def _row(images: list[Image.Image], height: int, gap: int) -> Image.Image:
    scaled = [im.convert("RGB").resize((max(1, im.width * height // im.height), height), Image.LANCZOS)
              for im in images]
    row = Image.new("RGB", (sum(im.width for im in scaled) + gap * (len(scaled) - 1), height), "white")
    x = 0
    for im in scaled:
        row.paste(im, (x, 0))
        x += im.width + gap
    return row


def _stack(images: list[Image.Image], gap: int) -> Image.Image:
    width = max(im.width for im in images)
    scaled = [im.resize((width, max(1, im.height * width // im.width)), Image.LANCZOS) for im in images]
    out = Image.new("RGB", (width, sum(im.height for im in scaled) + gap * (len(scaled) - 1)), "white")
    y = 0
    for im in scaled:
        out.paste(im, (0, y))
        y += im.height + gap
    return out


def compose(left: list[Image.Image], rows: list[list[Image.Image]], size: int = SIZE) -> Image.Image:
    """``rows`` stacked (each row's images side by side) with ``left`` beside or above them, whichever fills more of
    a white ``size`` x ``size`` square, fitted into it."""
    cell = max(im.height for r in rows for im in r)
    gap = max(2, cell // 30)
    block = _stack([_row(r, cell, gap) for r in rows], gap)
    choices = [block]
    if left:
        choices = [_row(left + [block], block.height, 2 * gap), _stack([_row(left, block.height, gap), block], 2 * gap)]
    whole = max(choices, key=lambda im: min(size / im.width, size / im.height) ** 2 * im.width * im.height)
    scale = min(size / whole.width, size / whole.height)
    whole = whole.resize((max(1, round(whole.width * scale)), max(1, round(whole.height * scale))), Image.LANCZOS)
    square = Image.new("RGB", (size, size), "white")
    square.paste(whole, ((size - whole.width) // 2, (size - whole.height) // 2))
    return square


def recompose(name: str, kept: Path) -> Path:
    """Rebuild ``name``'s thumbnail from the images a run kept in ``kept`` (named ``<node>_<file>``)."""
    left, rows = SHOWN[name]
    def images(node):
        return [Image.open(f) for f in sorted(kept.glob(f"{node}_*"))]
    out = WORKFLOW_DIR / f"{name}.jpg"
    compose(images(left) if left else [], [images(n) for n in rows]).save(out, quality=85, optimize=True)
    return out


def main(names: list[str]) -> None:
    server = ComfyServer(extra_packs={}).start()
    try:
        for name in names:
            t0 = time.time()
            entry = server.run(load_workflow(name), timeout=1800)
            keep = Path(tempfile.mkdtemp(prefix=f"thumb_{name}_"))  # the run's images, to recompose without a rerun
            for node in ([left] if (left := SHOWN[name][0]) else []) + list(SHOWN[name][1]):
                for path in server.image_paths(entry, node):
                    shutil.copy2(path, keep / f"{node}_{path.name}")
            out = recompose(name, keep)
            print(f"{name}: images kept in {keep}, run {time.time() - t0:.0f} s -> {out.relative_to(REPO)} "
                  f"({out.stat().st_size // 1024} KB)", flush=True)
    finally:
        server.cleanup()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--recompose"]:  # python thumbnails.py --recompose NAME KEPT_DIR
        print(recompose(sys.argv[2], Path(sys.argv[3])))
    else:
        main(sys.argv[1:] or list(SHOWN))
