"""Peak memory of load, one LoRA train step, generation and one chain unit, ours next to diffusers + peft.

    python bench/memory.py --model sd1                      # CPU: peak RSS at 64 px (about 5 minutes on 2 cores)
    python bench/memory.py --model sdxl --dtype bf16         # CPU: SDXL (peaks near 14 GB RSS: run alone)
    python bench/memory.py --model sd1 --device cuda         # CUDA: max_memory_allocated at 512 px (1024 for SDXL)
    python bench/memory.py --toy-chain                       # host RAM of a toy chain unit, 256 vs 16 images
    add --out docs/benchmarks.md to write the table into its memory.py section (rows of other runs are kept)

The model is a full-size random-weight original-layout single file (fp16, as released checkpoints are) built once
from the bundled configs by ``redifine_core.random_models`` into ``--cache`` (nothing is downloaded). Every figure
comes from its own fresh process, so no phase inherits another's peak:

* ``load``: the file loaded into ``--load-dtype`` (default fp32 on CPU, the CPU default) and every weight touched (safetensors maps
  files lazily: a load counts once every page is resident). Ours is ``load_pipeline``; the reference is diffusers'
  ``StableDiffusion(XL)Pipeline.from_single_file`` with the same bundled configs. Also the load target: peak /
  max(file size, loaded weights) <= 1.3.
* ``train`` (one LoRA step, set-up included), ``generate`` (2 images, 4 DDIM steps, CFG 7.5) and ``chain`` (one unit:
  1 iteration, 8 images, 2 LoRA steps, 4 sampling steps, batch 1): the model is loaded by ``load_pipeline`` in both,
  every weight is touched, then the peak is reset (Linux ``clear_refs``) and the phase runs. The reference phases
  are the hand-written loop of ``bench/_full_size.py``, ``StableDiffusion(XL)Pipeline.__call__``, and a chain unit
  made of the two. Figures are the phase's peak (weights included) and its growth over the loaded model.
* ``--toy-chain``: one chain unit of the toy model with 16 and with 256 images (1 iteration); target ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched (a lent GPU machine has no network)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # redifine_core from this checkout, installed or not
import _full_size as fs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CAPTIONS = ["a red circle on a black background", "a photo of a small cat", "a blue square", "a dog in a house",
            "a painting of a tree", "a yellow star on a white background", "a bird on a car", "a green triangle"]
PHASES = ("load", "train", "generate", "chain")
GB = 1e9


# ------------------------------------------------------------------------------------------------ in the child

def _weights_bytes(pipe: Any) -> int:
    return sum(t.numel() * t.element_size() for m in pipe.modules() for t in list(m.parameters()) + list(m.buffers()))


def _load_ours(a: argparse.Namespace, dtype: torch.dtype) -> Any:
    from redifine_core.models import load_pipeline

    return load_pipeline(a.file, device=a.device, dtype=dtype, tokenizer_dir=a.tokenizer)


def _load_reference(a: argparse.Namespace, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from redifine_core.models import CONFIG_ROOT, Pipeline

    tok = CLIPTokenizer.from_pretrained(a.tokenizer, local_files_only=True, model_max_length=77)
    kw: dict[str, Any] = dict(config=str(CONFIG_ROOT / a.model), local_files_only=True, torch_dtype=dtype, tokenizer=tok)
    if a.model == "sdxl":
        pipe = StableDiffusionXLPipeline.from_single_file(a.file, tokenizer_2=tok, **kw)
    else:
        pipe = StableDiffusionPipeline.from_single_file(a.file, safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False, **kw)
    return Pipeline.from_diffusers(pipe, source=a.file).to(a.device)


def _dataset(n: int, size: int) -> Any:
    from redifine_core.data import CaptionedImages

    imgs = torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(0))
    return CaptionedImages.from_images(imgs, [CAPTIONS[i % len(CAPTIONS)] for i in range(n)])


def _phase(a: argparse.Namespace) -> dict:
    """Run one phase of one implementation in this (fresh) process; the figures as a dict."""
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype]
    size = a.size
    out: dict[str, Any] = {"phase": a.phase, "impl": a.impl, "model": a.model, "dtype": a.dtype, "size": size}
    t0 = time.perf_counter()
    if a.phase == "load":
        pipe = (_load_ours if a.impl == "ours" else _load_reference)(a, DTYPES[a.load_dtype])
        fs.touch_weights(pipe.modules())
        out.update(dtype=a.load_dtype, seconds=time.perf_counter() - t0, peak_rss=fs.peak_rss_bytes(),
                   weights=_weights_bytes(pipe), file=os.path.getsize(a.file), peak_vram=fs.peak_vram(device))
        return out
    pipe = _load_ours(a, dtype)
    fs.touch_weights(pipe.modules())
    out.update(load_peak_rss=fs.peak_rss_bytes(), weights=_weights_bytes(pipe))
    out["peak_reset"] = fs.reset_peak_rss()
    out["base_rss"] = fs.rss_bytes()
    fs.reset_vram(device)
    out["base_vram"] = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
    t0 = time.perf_counter()
    if a.phase == "train":
        _train(a, pipe, size, steps=1)
    elif a.phase == "generate":
        _generate(a, pipe, CAPTIONS[:2], size, steps=4, batch=2)
    elif a.phase == "chain":
        _chain(a, pipe, size)
    fs.sync(device)
    out.update(seconds=time.perf_counter() - t0, peak_rss=fs.peak_rss_bytes(), peak_vram=fs.peak_vram(device))
    return out


def _train(a: argparse.Namespace, pipe: Any, size: int, steps: int, data: Any = None) -> None:
    from redifine_core.training import LoraTrainer, TrainConfig

    data = data if data is not None else _dataset(4, size)
    with torch.enable_grad():
        if a.impl == "ours":
            cfg = TrainConfig(steps=steps, batch_size=1, rank=a.rank, alpha=float(a.rank), resolution=size,
                              cond_drop=0.2)
            with LoraTrainer(pipe, data, cfg) as trainer:
                for _ in range(steps):
                    trainer.step()
        else:
            px = torch.stack([torch.as_tensor(np.asarray(im)) for im in data.images])
            px = px.permute(0, 3, 1, 2).float() / 127.5 - 1
            loop = fs.ReferenceLoraLoop(pipe, px, list(data.captions), rank=a.rank, alpha=float(a.rank), batch_size=1,
                                        gradient_checkpointing=pipe.is_sdxl)
            try:
                for _ in range(steps):
                    loop.step()
            finally:
                loop.close()


def _generate(a: argparse.Namespace, pipe: Any, prompts: list, size: int, steps: int, batch: int) -> None:
    from redifine_core.sampling import generate

    seeds = list(range(len(prompts)))
    if a.impl == "ours":
        generate(pipe, prompts, 7.5, steps=steps, seeds=seeds, width=size, height=size, batch_size=batch)
    else:
        ref = fs.reference_pipe(pipe)
        for s in range(0, len(prompts), batch):
            fs.reference_generate(ref, prompts[s: s + batch], 7.5, steps, seeds[s: s + batch], size)


def _chain(a: argparse.Namespace, pipe: Any, size: int) -> None:
    data = _dataset(8, size)
    if a.impl == "ours":
        from redifine_core.chain import ChainConfig, MethodConfig, run_chain
        from redifine_core.training import TrainConfig

        config = ChainConfig(iterations=1, methods=(MethodConfig("redifine", kind="redifine"),),
                             train=TrainConfig(steps=2, batch_size=1, rank=a.rank, alpha=float(a.rank), resolution=size),
                             steps=4, batch_size=1, width=size, height=size, features="handcrafted")
        with tempfile.TemporaryDirectory(prefix="redifine_mem_chain_") as tmp:
            run_chain(pipe, data, config, Path(tmp) / "run", render=False)
    else:
        _train(a, pipe, size, steps=2, data=data)
        _generate(a, pipe, list(data.captions), size, steps=4, batch=1)


def _toy_phase(n: int) -> dict:
    from redifine_core.chain import ChainConfig, MethodConfig, run_chain
    from redifine_core.models import load_pipeline
    from redifine_core.toy.dataset import make_toy_dataset
    from redifine_core.training import TrainConfig

    pipe = load_pipeline("toy", device="cpu")
    data = make_toy_dataset(n, seed=0)
    fs.touch_weights(pipe.modules())
    base = fs.rss_bytes()
    fs.reset_peak_rss()
    config = ChainConfig(iterations=1, methods=(MethodConfig("redifine", kind="redifine"),),
                         train=TrainConfig(steps=2, batch_size=4), steps=4, features="handcrafted")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="redifine_mem_toy_") as tmp:
        run_chain(pipe, data, config, Path(tmp) / "run", render=False)
    return {"images": n, "base_rss": base, "peak_rss": fs.peak_rss_bytes(), "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------- in the parent

def _child(args: list[str], timeout: float) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1][len("RESULT "):])


def _ensure_model(model: str, cache: Path) -> tuple[Path, Path]:
    from redifine_core.random_models import write_single_file, write_tokenizer

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{model}_random_fp16.safetensors"
    if not path.is_file():
        print(f"building {path} (random weights, fp16) ...", flush=True)
        write_single_file(model, path, dtype=torch.float16)
    tok = cache / "tokenizer"
    if not (tok / "vocab.json").is_file():
        write_tokenizer(tok)
    return path, tok


def _fmt(x: Optional[float]) -> str:
    return "" if x is None else f"{x / GB:.2f}"


def run_model(a: argparse.Namespace) -> tuple[list[list[str]], list[str]]:
    path, tok = _ensure_model(a.model, a.cache)
    common = ["--file", str(path), "--tokenizer", str(tok), "--model", a.model, "--device", a.device, "--dtype",
              a.dtype, "--load-dtype", a.load_dtype, "--size", str(a.size), "--rank", str(a.rank),
              "--threads", str(a.threads)]
    key = "peak_vram" if a.device == "cuda" else "peak_rss"
    unit = "peak VRAM GB" if a.device == "cuda" else "peak RSS GB"
    rows, notes = [], []
    for phase in a.phases:
        res = {}
        for impl in ("ours", "ref"):
            if impl not in a.impls:
                res[impl] = {"error": "not run"}
                continue
            print(f"{a.model} {phase} {impl} ...", flush=True)
            res[impl] = _child(["--_phase", phase, "--_impl", impl, *common], a.timeout)
            print(f"  {json.dumps(res[impl])}", flush=True)
        o, r = res["ours"], res["ref"]
        setting = (f"{o.get('dtype', a.dtype)}" + ("" if phase == "load" else f", {a.size} px"))
        if phase == "load" and "error" not in o:
            larger = max(o["file"], o["weights"])
            ratio = o["peak_rss"] / larger
            ref_txt = f"{r['peak_rss'] / larger:.2f}x" if "error" not in r else "not run"
            notes.append(f"{a.model} load target ({o['dtype']} from the {o['file'] / GB:.2f} GB fp16 file, "
                         f"{o['weights'] / GB:.2f} GB loaded): peak RSS {o['peak_rss'] / GB:.2f} GB = {ratio:.2f}x the "
                         f"larger (target <= 1.3x: {'meets' if ratio <= 1.3 else 'MISSES'}); diffusers' "
                         f"from_single_file: {ref_txt}")
        if "error" in o or "error" in r:
            rows.append([a.model, phase, setting, unit, o.get("error") or _fmt(o.get(key)),
                         r.get("error") or _fmt(r.get(key)), "", ""])
            continue
        growth = "" if phase == "load" or a.device == "cuda" else \
            f"+{(o['peak_rss'] - o['base_rss']) / GB:.2f} / +{(r['peak_rss'] - r['base_rss']) / GB:.2f}"
        rows.append([a.model, phase, setting, unit, _fmt(o[key]), _fmt(r[key]), f"{o[key] / r[key]:.3f}", growth])
    return rows, notes


def run_toy(a: argparse.Namespace) -> tuple[list[list[str]], list[str]]:
    res = {n: _child(["--_toy", str(n), "--threads", str(a.threads)], a.timeout) for n in (16, 256)}
    for n, r in res.items():
        print(f"toy chain {n} images: {json.dumps(r)}", flush=True)
    if any("error" in r for r in res.values()):
        return [["toy", "chain unit", "16 vs 256 images", "peak RSS GB", res[256].get("error", ""),
                 res[16].get("error", ""), "", ""]], []
    ratio = res[256]["peak_rss"] / res[16]["peak_rss"]
    row = ["toy", "chain unit, 1 iteration", "256 images (ours) vs 16 images (ref column)", "peak RSS GB",
           _fmt(res[256]["peak_rss"]), _fmt(res[16]["peak_rss"]), f"{ratio:.3f}",
           f"+{(res[256]['peak_rss'] - res[256]['base_rss']) / GB:.2f} / +{(res[16]['peak_rss'] - res[16]['base_rss']) / GB:.2f}"]
    note = f"toy chain host RAM, 256 vs 16 images: {ratio:.2f}x (target <= 1.2x: {'meets' if ratio <= 1.2 else 'MISSES'})"
    return [row], [note]


HEADER = ["model", "phase", "setting", "figure", "ours", "reference", "ratio", "growth over loaded model (ours / ref)"]


def _existing(out: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Rows and notes already in the memory.py section of ``out`` (so runs for other models are kept)."""
    import re

    if not out.is_file():
        return {}, {}
    m = re.search(r"<!-- memory.py:begin -->(.*?)<!-- memory.py:end -->", out.read_text(), re.S)
    rows: dict[str, list[str]] = {}
    notes: dict[str, str] = {}
    for line in (m.group(1).splitlines() if m else []):
        if line.startswith("| ") and not line.startswith("| model |"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows["|".join(cells[:3])] = cells
        elif line.startswith("- "):
            notes[line[2:].split(":")[0]] = line[2:]
    return rows, notes


def _row_order(row: list[str]) -> tuple:
    models = ("sd1", "sdxl", "toy")
    return (models.index(row[0]) if row[0] in models else 9, PHASES.index(row[1]) if row[1] in PHASES else 9, row[2])


def _write_doc(out: Path, rows: list[list[str]], notes: list[str], machine: str) -> None:
    """Merge these rows into the memory.py section (a row is replaced when model, phase and setting match)."""
    known_rows, known_notes = _existing(out)
    for r in rows:
        known_rows["|".join(r[:3])] = list(r) + [machine]
    for n in notes:
        known_notes[n.split(":")[0]] = f"{n} ({machine})"  # one note per subject (model, dtype, file)
    text = "\n".join(["### Figures written by `bench/memory.py`", "",
                      "Each figure from a fresh process; ratios are ours / reference.", "",
                      fs.markdown_table(HEADER + ["machine"], sorted(known_rows.values(), key=_row_order)), ""]
                     + [f"- {v}" for v in sorted(known_notes.values())])
    fs.write_section(out, "memory.py", text)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("sd1", "sdxl"), default="sd1")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                    help="weights for train/generate/chain (default fp32 on CPU, fp16 on CUDA)")
    ap.add_argument("--load-dtype", choices=tuple(DTYPES), default=None, help="dtype of the load phase (default --dtype)")
    ap.add_argument("--size", type=int, default=None, help="px (default 64 on CPU; 512 / 1024 on CUDA)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--impls", default="ours,ref", help="ours,ref (ref alone or ours alone to spare memory)")
    ap.add_argument("--toy-chain", action="store_true")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "redifine_bench_models")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--_phase", dest="phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_impl", dest="impl", choices=("ours", "ref"), default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--_toy", dest="toy", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.dtype = a.dtype or ("fp16" if a.device == "cuda" else "fp32")
    a.load_dtype = a.load_dtype or a.dtype
    a.size = a.size or (64 if a.device == "cpu" else {"sd1": 512, "sdxl": 1024}[a.model])
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    torch.set_num_threads(a.threads)
    if a.phase is not None or a.toy is not None:  # a child: one figure, as one JSON line
        result = _toy_phase(a.toy) if a.toy is not None else _phase(a)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    a.phases = [p for p in a.phases.split(",") if p]
    a.impls = [i for i in a.impls.split(",") if i]
    rows, notes = run_toy(a) if a.toy_chain else run_model(a)
    machine = (torch.cuda.get_device_name() if a.device == "cuda" else
               f"CPU, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    print(fs.markdown_table(HEADER, rows))
    for n in notes:
        print(n)
    if a.out is not None:
        _write_doc(a.out, rows, notes, machine)
        print(f"wrote the memory.py section of {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
