"""The prepared GPU suite: full-size random-weight SD1.5 and SDXL, our code against diffusers + peft, one table.

    python bench/gpu.py                          # on a CUDA GPU: about 5 minutes (283 s on an H200), writes
                                                 # docs/benchmarks.md
    python bench/gpu.py --device cpu --small     # smoke run on tiny configs (seconds); writes only with --out

Builds SD1.5 (512 px) and SDXL (1024 px) from the bundled configs with random weights (nothing is downloaded;
``redifine_core.random_models``) and measures, each next to the same figure for a hand-written reference:

* LoRA training step (rank 16, batch 1, attention target): median seconds per step and peak VRAM against the
  diffusers + peft loop of ``bench/_full_size.py`` with identical settings, for fp16 and bf16 weights, gradient
  checkpointing off and on. Targets: time <= 1.03x, VRAM <= 1.00x.
* Sampling (DDIM, 20 steps): ``sampling.generate`` at constant CFG 7.5 against ``StableDiffusion(XL)Pipeline`` on the
  same modules and seeds (target <= 1.00x), and with the ``redifine`` schedule (informational: fewer uncond passes).
* One chain unit (1 iteration of the ``redifine`` method: 20 LoRA steps rank 16 batch 1, 8 images generated one at a
  time, metrics): wall time, peak VRAM, the resident weights, and the peak of each phase (LoRA training, UNet
  sampling, VAE decode, the rest; ``PhasePeaks``). Targets: SD1.5 512 px <= 6 GB, SDXL 1024 px <= 12 GB.

Peak VRAM is ``torch.cuda.max_memory_allocated`` and includes the model's resident weights. Every section runs in its
own try/except (an error is recorded in the table and the run goes on); a time budget (``--budget``, default 420 s)
skips what would not fit; progress lines are flushed as it goes. The table is printed and written to the
``gpu.py`` section of ``--out`` (default docs/benchmarks.md on a GPU run; a ``--small`` run writes only with --out).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched (a lent GPU machine has no network)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # redifine_core from this checkout, installed or not
import _full_size as fs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADER = ["section", "model", "setting", "figure", "ours", "reference", "ratio", "target", "verdict"]
VRAM_TARGET_GB = {"sd1": 6.0, "sdxl": 12.0}
CAPTIONS = ["a red circle on a black background", "a photo of a small cat", "a blue square", "a dog in a house",
            "a painting of a tree", "a yellow star on a white background", "a bird on a car", "a green triangle"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.small = args.small
        self.start = time.monotonic()
        self.rows: list[list[Any]] = []

    # ------------------------------------------------------------------------------------------- bookkeeping
    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def add(self, section: str, model: str, setting: str, figure: str, ours: Any = "", ref: Any = "",
            ratio: Optional[float] = None, target: str = "", ok: Optional[bool] = None) -> None:
        verdict = "" if ok is None or self.small else ("meets" if ok else "MISSES")  # smoke timings mean nothing
        row = [section, model, setting, figure, ours, ref, "" if ratio is None else f"{ratio:.3f}", target, verdict]
        self.rows.append(row)
        log(" | ".join(str(c) for c in row))

    def guarded(self, section: str, model: str, setting: str, estimate_s: float, fn: Callable[[], None]) -> None:
        """Run one section: skipped if the budget cannot fit it, any error recorded in the table."""
        if self.left() < estimate_s:
            self.add(section, model, setting, "skipped", f"time budget ({self.left():.0f} s left, needs ~{estimate_s:.0f} s)")
            return
        t0 = time.monotonic()
        log(f"{section} {model} {setting}: start ({self.left():.0f} s of budget left)")
        try:
            fn()
        except Exception as exc:  # recorded, and the suite goes on
            traceback.print_exc()
            self.add(section, model, setting, "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        log(f"{section} {model} {setting}: {time.monotonic() - t0:.1f} s")

    # ------------------------------------------------------------------------------------------------ models
    def size(self, kind: str, pipe: Any) -> int:
        if self.args.size:
            return self.args.size
        return pipe.default_size if self.small else {"sd1": 512, "sdxl": 1024}[kind]

    def steps(self, full: int) -> int:
        """Sampling / chain steps: ``full`` on a real run, fewer in smoke (--small) and dry (--steps) runs."""
        return self.args.steps or (2 if self.small else full)

    def build(self, kind: str, dtype: torch.dtype) -> Any:
        if self.small:
            from redifine_core.models import Pipeline
            from redifine_core.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

            pipe = tiny_sdxl_pipeline() if kind == "sdxl" else tiny_sd_pipeline()
            return Pipeline.from_diffusers(pipe, source=f"tiny:{kind}").to(self.device, dtype)
        from redifine_core.random_models import random_pipeline

        return random_pipeline(kind, self.device, dtype)

    def images(self, n: int, size: int) -> torch.Tensor:
        return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(0))

    # ------------------------------------------------------------------------------------------------ sections
    def train(self, kind: str, pipe: Any, precision: str, checkpointing: bool) -> None:
        from redifine_core.data import CaptionedImages
        from redifine_core.training import LoraTrainer, TrainConfig

        size, rank = self.size(kind, pipe), (4 if self.small else 16)
        warm, steps = (1, 2) if self.small or self.args.steps else (2, 6)
        pipe.to(dtype=DTYPES[precision])
        imgs = self.images(4, size)
        data = CaptionedImages.from_images(imgs, CAPTIONS[:4])
        cfg = TrainConfig(steps=10**6, batch_size=1, rank=rank, alpha=float(rank), learning_rate=1e-4, cond_drop=0.2,
                          resolution=size, gradient_checkpointing=checkpointing, mixed_precision="auto")
        pixels = imgs.permute(0, 3, 1, 2) * 2 - 1

        def ours() -> Any:
            return LoraTrainer(pipe, data, cfg)

        def reference() -> Any:
            return fs.ReferenceLoraLoop(pipe, pixels, CAPTIONS[:4], rank=rank, alpha=float(rank), batch_size=1,
                                        gradient_checkpointing=checkpointing)

        results = {}
        for name, make in (("ours", ours), ("ref", reference)):
            results[name] = self._loop(pipe, make, warm, steps)
        setting = f"{precision} weights, checkpointing {'on' if checkpointing else 'off'}, {size} px b1 r{rank}"
        (t_o, v_o), (t_r, v_r) = results["ours"], results["ref"]
        self.add("LoRA step", kind, setting, "s/step (median)", f"{t_o:.4f}", f"{t_r:.4f}", t_o / t_r, "<= 1.03x",
                 t_o / t_r <= 1.03)
        if v_o is not None and v_r is not None:
            self.add("LoRA step", kind, setting, "peak VRAM GB", f"{v_o / 1e9:.2f}", f"{v_r / 1e9:.2f}", v_o / v_r,
                     "<= 1.00x", v_o / v_r <= 1.0)

    def _loop(self, pipe: Any, make: Callable[[], Any], warm: int, steps: int) -> tuple[float, Optional[int]]:
        fs.reset_vram(self.device)
        loop = None
        try:
            with torch.enable_grad():
                loop = make()
                for _ in range(warm):
                    loop.step()
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                times = [fs.timed(loop.step, self.device)[0] for _ in range(steps)]
            return statistics.median(times), fs.peak_vram(self.device)
        finally:
            if loop is not None:
                loop.close()
            _restore_unet(pipe)

    def sampling(self, kind: str, pipe: Any) -> None:
        from redifine_core.sampling import generate

        size = self.size(kind, pipe)
        pipe.to(dtype=DTYPES[self.precisions()[0]])
        n = 2 if kind == "sdxl" else 4
        steps, repeats = self.steps(20), (1 if self.small or self.args.steps else 3)
        prompts, seeds = CAPTIONS[:n], list(range(n))
        reference = fs.reference_pipe(pipe)
        runs = {
            "diffusers": lambda: fs.reference_generate(reference, prompts, 7.5, steps, seeds, size),
            "ours": lambda: generate(pipe, prompts, 7.5, steps=steps, seeds=seeds, width=size, height=size,
                                     batch_size=n),
            "redifine": lambda: generate(pipe, prompts, "redifine", steps=steps, seeds=seeds, width=size, height=size,
                                         batch_size=n),
        }
        first = {k: fs.timed(fn, self.device)[1] for k, fn in runs.items()}  # warm-up, and the outputs to compare
        diff = float((torch.as_tensor(first["diffusers"]).float() - first["ours"].float()).abs().max())
        times: dict[str, list[float]] = {k: [] for k in runs}
        order = list(runs)
        for r in range(repeats):
            for k in order[r % 3:] + order[: r % 3]:
                times[k].append(fs.timed(runs[k], self.device)[0])
        med = {k: statistics.median(v) for k, v in times.items()}
        setting = f"{self.precisions()[0]}, {n} images {size} px, DDIM {steps} steps, batch {n}"
        ratio = med["ours"] / med["diffusers"]
        self.add("sampling", kind, setting, "s, constant CFG 7.5", f"{med['ours']:.3f}", f"{med['diffusers']:.3f}",
                 ratio, "<= 1.00x", ratio <= 1.0)
        self.add("sampling", kind, setting, "s, redifine schedule vs constant-CFG diffusers", f"{med['redifine']:.3f}",
                 f"{med['diffusers']:.3f}", med["redifine"] / med["diffusers"], "")
        self.add("sampling", kind, setting, "max abs pixel difference to diffusers, constant CFG", f"{diff:.1e}", "",
                 None, "same images")

    def chain(self, kind: str, pipe: Any) -> None:
        from redifine_core.chain import ChainConfig, MethodConfig, run_chain
        from redifine_core.data import CaptionedImages
        from redifine_core.training import TrainConfig

        size = self.size(kind, pipe)
        precision = self.precisions()[0]
        pipe.to(dtype=DTYPES[precision])
        rank = 4 if self.small else 16
        train_steps, steps = self.steps(20), self.steps(20)
        data = CaptionedImages.from_images(self.images(len(CAPTIONS), 64), CAPTIONS)
        config = ChainConfig(
            iterations=1, methods=(MethodConfig("redifine", kind="redifine"),),
            train=TrainConfig(steps=train_steps, batch_size=1, rank=rank, alpha=float(rank), resolution=size),
            steps=steps, batch_size=1, width=size, height=size, features="handcrafted",
        )
        fs.reset_vram(self.device)
        resident = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None
        phases = PhasePeaks(self.device)
        with tempfile.TemporaryDirectory(prefix="redifine_gpu_chain_") as tmp, phases.tracking():
            t0 = time.perf_counter()
            run_chain(pipe, data, config, Path(tmp) / "run", render=False, backend=phases.backend())
            fs.sync(self.device)
            wall = time.perf_counter() - t0
        peak = phases.overall()
        setting = (f"{precision}, {size} px, 1 iteration: {train_steps} LoRA steps r{rank} b1, {len(CAPTIONS)} images "
                   f"x {steps} steps, batch 1")
        self.add("chain unit", kind, setting, "wall s", f"{wall:.1f}", "", None, "")
        if peak is not None:
            target = VRAM_TARGET_GB[kind]
            self.add("chain unit", kind, setting, "peak VRAM GB", f"{peak / 1e9:.2f}", "", None, f"<= {target:g} GB",
                     peak / 1e9 <= target)
            if resident is not None:
                self.add("chain unit", kind, setting, "VRAM GB before the run (resident weights)", f"{resident / 1e9:.2f}")
            for name, value in phases.peaks.items():
                self.add("chain unit", kind, setting, f"peak VRAM GB, {name}", f"{value / 1e9:.2f}")

    # ------------------------------------------------------------------------------------------------- driver
    def precisions(self) -> list[str]:
        if self.args.precisions:
            return self.args.precisions
        return ["fp16", "bf16"] if self.device.type == "cuda" else ["fp32", "bf16"]

    def estimate(self, kind: str, what: str) -> float:
        if self.small:
            return 1.0
        table = {("sd1", "build"): 20, ("sdxl", "build"): 40, ("sd1", "train"): 15, ("sdxl", "train"): 35,
                 ("sd1", "sampling"): 20, ("sdxl", "sampling"): 60, ("sd1", "chain"): 40, ("sdxl", "chain"): 90}
        return float(table[(kind, what)])

    def run(self) -> None:
        for kind in self.args.models:
            holder: dict[str, Any] = {}

            def build(kind: str = kind) -> None:
                t0 = time.perf_counter()
                holder["pipe"] = self.build(kind, DTYPES[self.precisions()[0]])
                n = sum(p.numel() for m in holder["pipe"].modules() for p in m.parameters())
                self.add("build", kind, "random weights from the bundled configs", "parameters, build s",
                         f"{n / 1e6:.1f} M", f"{time.perf_counter() - t0:.1f} s")

            self.guarded("build", kind, "", self.estimate(kind, "build"), build)
            pipe = holder.get("pipe")
            if pipe is None:
                continue
            for precision in self.precisions():
                for ckpt in (False, True):
                    self.guarded("LoRA step", kind, f"{precision} checkpointing {'on' if ckpt else 'off'}",
                                 self.estimate(kind, "train"),
                                 lambda p=precision, c=ckpt: self.train(kind, pipe, p, c))
            self.guarded("sampling", kind, "", self.estimate(kind, "sampling"), lambda: self.sampling(kind, pipe))
            self.guarded("chain unit", kind, "", self.estimate(kind, "chain"), lambda: self.chain(kind, pipe))
            del pipe, holder
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def machine(self) -> str:
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    def report(self) -> str:
        import diffusers
        import peft

        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        kind = ("smoke run on tiny configs (not a measurement)" if self.small else
                "dry run of the full-size models at reduced size or steps (not a measurement)"
                if self.args.size or self.args.steps else "full-size random-weight models")
        return "\n".join([
            "## GPU suite (`bench/gpu.py`)",
            "",
            f"Measured {when} on **{self.machine()}** ({kind}); torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, peft {peft.__version__}; {time.monotonic() - self.start:.0f} s in all.",
            "Ratios are ours / reference; VRAM is `torch.cuda.max_memory_allocated` including resident weights.",
            "",
            fs.markdown_table(HEADER, self.rows),
        ])


class PhasePeaks:
    """Peak VRAM per phase of a chain unit (LoRA training, UNet sampling, VAE decode, the rest), via the chain's backend
    seam and ``sampling.decode_latents``: each phase resets the peak on entry and folds it into its own figure on exit.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peaks: dict[str, int] = {}
        self._current = "other (metrics, files)"
        self._max = 0

    def _fold(self) -> None:
        value = fs.peak_vram(self.device)
        if value is not None:
            self.peaks[self._current] = max(self.peaks.get(self._current, 0), value)
            self._max = max(self._max, value)
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        outer = self._current
        self._fold()
        self._current = name
        try:
            yield
        finally:
            self._fold()
            self._current = outer

    def backend(self) -> Any:
        from redifine_core.chain import default_backend

        backend = default_backend()
        finetune, batches = backend.finetune, backend.generate_batches

        def tracked_finetune(*args: Any, **kwargs: Any) -> Any:
            with self.phase("LoRA training"):
                return finetune(*args, **kwargs)

        def tracked_batches(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with self.phase("sampling (UNet)"):
                yield from batches(*args, **kwargs)

        backend.finetune = tracked_finetune
        if batches is not None:
            backend.generate_batches = tracked_batches
        return backend

    @contextmanager
    def tracking(self) -> Iterator[None]:
        """``sampling.decode_latents`` counted as its own phase while the block runs."""
        from redifine_core import sampling

        decode = sampling.decode_latents

        def tracked_decode(*args: Any, **kwargs: Any) -> Any:
            with self.phase("VAE decode"):
                return decode(*args, **kwargs)

        sampling.decode_latents = tracked_decode
        try:
            yield
        finally:
            sampling.decode_latents = decode
            self._fold()

    def overall(self) -> Optional[int]:
        return self._max if self.device.type == "cuda" else None


def _restore_unet(pipe: Any) -> None:
    """Whatever a failed loop left: no adapter, no checkpointing, frozen, eval."""
    from redifine_core.lora import has_lora_layers, remove_lora_adapters

    unet = pipe.unet
    if has_lora_layers(unet):
        remove_lora_adapters(unet)
    if getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()
    unet.requires_grad_(False).eval()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --small)")
    ap.add_argument("--small", action="store_true", help="tiny configs: a smoke run in seconds")
    ap.add_argument("--models", default="sd1,sdxl", help="comma-separated: sd1, sdxl")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; sections that would not fit are skipped")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown file whose gpu.py section is rewritten (default docs/benchmarks.md, not with --small)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads on --device cpu")
    ap.add_argument("--size", type=int, default=None, help="px for every model (dry runs of the full-size models on a CPU)")
    ap.add_argument("--steps", type=int, default=None, help="sampling and chain steps (dry runs)")
    ap.add_argument("--precisions", default=None, help="comma-separated weight dtypes: fp16, bf16, fp32")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in VRAM_TARGET_GB]
    if bad:
        ap.error(f"--models {bad} unknown; use sd1, sdxl")
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()] if args.precisions else None
    if args.precisions and any(p not in DTYPES for p in args.precisions):
        ap.error(f"--precisions {args.precisions}: use fp16, bf16, fp32")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible; use --device cpu --small for a smoke run")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else (None if args.small else ROOT / "docs" / "benchmarks.md")

    suite = Suite(args)
    log(f"device {suite.machine()}, models {args.models}, budget {args.budget:.0f} s")
    try:
        suite.run()
    finally:
        text = suite.report()
        print(text, flush=True)
        if out is not None:
            fs.write_section(out, "gpu.py", text)
            log(f"wrote the gpu.py section of {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
