"""Host memory of a real ComfyUI server (CPU) running the stock loader and ReDiFine on the same SD1.5 single file.

    python bench/comfyui_rss.py                     # bf16 (ComfyUI started with --bf16-unet/-vae/-text-enc)
    python bench/comfyui_rss.py --dtype fp32        # fp32 (--fp32-text-enc; the UNet and VAE are fp32 on a CPU)

The checkpoint is the full-size random-weight SD1.5 file (fp16, 2.13 GB, as released checkpoints are) built once by
``redifine_core.random_models`` into ``--cache``. Each route runs in its own fresh server (``tests/comfyui/harness``),
one workflow, the same for both routes but for how the ReDiFine pipeline is made:

* ``two copies``: CheckpointLoaderSimple and ReDiFine Load Pipeline (``checkpoints/<file>``) both load the file;
* ``shared``: CheckpointLoaderSimple, then ReDiFine Pipeline from MODEL/CLIP/VAE over the loader's weights;

then ReDiFine Train LoRA (2 steps, 64 px, batch 1) and the stock LoraLoader + CFG Schedule for MODEL + KSampler
(2 steps, 64 px) + VAEDecode. The workflow is queued in three growing prompts (the stock loader; + the ReDiFine
pipeline; + training and sampling: ComfyUI's cache runs only the new nodes each time), and for each the server's RSS
after it and its own peak (VmHWM, reset before each through Linux ``clear_refs``) are reported, after a start-up
prompt that imports diffusers, transformers and peft. Prints a Markdown table; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "comfyui"))

from harness import ComfyServer, unavailable_reason  # noqa: E402

CKPT = "sd15_random_fp16.safetensors"
FLAGS = {"bf16": ("--bf16-unet", "--bf16-vae", "--bf16-text-enc"), "fp32": ("--fp32-text-enc",)}
GB = 1e9


def checkpoint(cache: Path) -> Path:
    import torch

    from redifine_core.random_models import write_single_file

    path = cache / CKPT
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"building {path} (random weights, fp16) ...", flush=True)
        write_single_file("sd1", path, dtype=torch.float16)
    return path


def workflow(route: str, dtype: str) -> tuple[dict, dict, dict]:
    """(loader-only prompt, prompt up to the pipeline, the whole workflow) for ``route``."""
    load = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
            "90": {"class_type": "ReDiFineTestMemory", "inputs": {"model": ["1", 0]}}}
    if route == "shared":
        pipe = {"20": {"class_type": "ReDiFinePipelineFromNative", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "fallback": "none (refuse)"}}}
    else:
        pipe = {"20": {"class_type": "ReDiFineLoadPipeline", "inputs": {"model": "checkpoints/" + CKPT,
                                                                        "precision": dtype}}}
    pipe["91"] = {"class_type": "ReDiFineTestMemory", "inputs": {"pipeline": ["20", 0], "model": ["1", 0],
                                                                 "clip": ["1", 1], "vae": ["1", 2]}}
    rest = {
        "2": {"class_type": "ReDiFineDataset", "inputs": {"source": "toy", "folder": "(none)", "toy_count": 2,
                                                          "toy_seed": 1, "default_caption": "", "captions": ""}},
        "3": {"class_type": "ReDiFineTrainLoRA", "inputs": {
            "pipeline": ["20", 0], "dataset": ["2", 0], "lora_name": "bench_lora", "cond_drop": 0.1, "rank": 4,
            "alpha": 4.0, "learning_rate": 1e-4, "steps": 2, "batch_size": 1, "resolution": 64, "seed": 0,
            "precision": "no", "gradient_checkpointing": False}},
        "5": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": ["3", 1],
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "6": {"class_type": "ReDiFineCFGScheduleModel", "inputs": {"model": ["5", 0], "schedule": "redifine",
                                                                   "iteration": 0}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["5", 1]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["5", 1]}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "seed": 0, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["7", 0], "negative": ["8", 0], "latent_image": ["9", 0], "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "bench"}},
    }
    return load, {**load, **pipe}, {**load, **pipe, **rest}


def run_route(route: str, dtype: str, ckpt: Path) -> dict:
    s = ComfyServer(extra_packs={"redifine_probe": REPO / "tests" / "comfyui" / "probe_pack"}, extra_args=FLAGS[dtype])
    (s.tmp / "models" / "checkpoints" / CKPT).symlink_to(ckpt)
    row: dict = {"route": route, "dtype": dtype}
    try:
        s.start()
        s.run({"90": {"class_type": "ReDiFineTestMemory", "inputs": {}}})  # imports diffusers/transformers/peft
        row["started"] = s.memory()["rss"]
        load, pipe, whole = workflow(route, dtype)
        before = s.log().count("lora key not loaded")
        for phase, prompt in (("loader", load), ("pipeline", pipe), ("workflow", whole)):
            s.reset_peak()  # each phase's own peak (the earlier phases' nodes are cached and do not run again)
            out = s.run(prompt, timeout=1800)["outputs"]
            mem = s.memory()
            row[phase] = {"rss": mem["rss"], "peak": mem["peak"]}
            if phase == "pipeline":
                info = json.loads(out["91"]["text"][0])
                row["pipeline_bytes"], row["shared_bytes"] = info.get("pipeline_bytes"), info.get("shared_bytes")
        row["lora_keys_not_loaded"] = s.log().count("lora key not loaded") - before
        return row
    finally:
        s.cleanup()


def table(rows: list[dict]) -> str:
    out = ["| route | dtype | started | stock loader: RSS after (peak) | ReDiFine pipeline: RSS after (peak) | "
           "train + stock sampling: RSS after (peak) | highest peak | pipeline weights (of them shared) | "
           "'lora key not loaded' |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ph = [r[k] for k in ("loader", "pipeline", "workflow")]
        cells = [f"{p['rss'] / GB:.2f} GB ({p['peak'] / GB:.2f})" for p in ph]
        out.append(f"| {r['route']} | {r['dtype']} | {r['started'] / GB:.2f} GB | {' | '.join(cells)} | "
                   f"{max(p['peak'] for p in ph) / GB:.2f} GB | {r['pipeline_bytes'] / GB:.2f} GB "
                   f"({(r['shared_bytes'] or 0) / GB:.2f}) | {r['lora_keys_not_loaded']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=sorted(FLAGS), default="bf16")
    ap.add_argument("--routes", default="shared,two copies")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("REDIFINE_FULL_SIZE_CACHE",
                                                                      "~/.cache/redifine")).expanduser())
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason:
        sys.exit(f"cannot run: {reason}")
    ckpt = checkpoint(args.cache)
    rows = [run_route(route.strip(), args.dtype, ckpt) for route in args.routes.split(",")]
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
