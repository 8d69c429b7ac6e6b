"""ReDiFineChain: the Chain of Diffusion (finetune, regenerate, repeat) for one or more methods, side by side."""

from __future__ import annotations

from redifine_core.chain import PROTOCOLS, RunFolder, parse_method_line, parse_methods  # noqa: F401 (re-exported)
from redifine_core.report_answer import plain_answer, with_lane_readings

from . import _comfy
from .common import (CATEGORY, ComfyCancel, ProgressAdapter, comfy_cancellation, name_error, path_inside,
                     pils_to_tensor, widget)
from .gpu import KEEP_LOADED_TOOLTIP, on_device

RUNS_SUBDIR = "redifine"
"""Runs live in ``<ComfyUI output>/redifine/<run_name>``. Method lines are parsed and validated by the core's
``parse_methods`` (one MethodConfig per line) and run folders are read through ``RunFolder``: the node holds no
parsing or layout knowledge of its own."""


def run_directory(run_name: str) -> str:
    """``<ComfyUI output>/redifine/<run_name>``, refusing names that would land anywhere else."""
    return path_inside(_comfy.output_directory(), RUNS_SUBDIR, run_name.strip())


def final_verdicts(run_dir: str) -> list[str]:
    """'method (seed S), iteration i: label - reasons' for the last finished iteration of every method and seed, as
    its lane reads it (an established drift holds until its intervals show a recovery)."""
    out = []
    for r in with_lane_readings(RunFolder(run_dir).read()).last_done():
        v = r.verdict or {}
        reasons = "; ".join(str(x) for x in v.get("reasons") or [])
        out.append(f"{r.method} (seed {r.seed}), iteration {r.iteration}: {v.get('label', '?')}"
                   + (f" - {reasons}" if reasons else ""))
    return out


class ChainProgress(ProgressAdapter):
    """One steady bar for the whole chain: each (method, seed, iteration) unit is split into training (60%),
    sampling (35%) and metrics (5%), filled from the nested events; after sampling, the unit's first new image is
    shown as the preview."""

    SPANS = {"train": (0.0, 0.60), "sample": (0.60, 0.95), "metrics": (0.95, 1.0)}
    RESOLUTION = 1000

    def __init__(self, node_id, run_dir: str):
        super().__init__(node_id)
        self.run_dir = run_dir
        self.unit = 0
        self.total = 1

    def __call__(self, event) -> None:
        self.events += 1
        if _comfy.processing_interrupted():
            from redifine_core.progress import Cancelled

            raise Cancelled("interrupted in ComfyUI")
        extra = getattr(event, "extra", None) or {}
        preview = None
        if event.phase == "chain":
            self.unit, self.total = int(event.step), max(1, int(event.total))
            stage = extra.get("stage", "")
            frac = {"sampling": self.SPANS["sample"][0], "metrics": self.SPANS["metrics"][0]}.get(stage, 0.0)
            if stage == "metrics":
                preview = self._newest_image(extra)
        else:
            lo, hi = self.SPANS.get(event.phase, (0.0, 1.0))
            frac = lo + (hi - lo) * min(1.0, int(event.step) / max(1, int(event.total or 1)))
            self.unit = int(extra.get("unit", self.unit))
        if self._bar is None:
            self._bar = _comfy.progress_bar(self.RESOLUTION, self.node_id)
        if self._bar is not None:
            value = int(self.RESOLUTION * min(1.0, (self.unit + frac) / self.total))
            self._last = max(value, getattr(self, "_last", 0))  # never move backwards
            self._bar.update_absolute(self._last, self.RESOLUTION, preview)

    def _newest_image(self, ctx: dict):
        try:
            from PIL import Image

            first = RunFolder(self.run_dir).iteration_images(str(ctx["method"]), int(ctx["seed"]),
                                                             int(ctx["iteration"]))[0]
            with Image.open(first) as im:
                return ("JPEG", im.convert("RGB").resize((256, 256), Image.NEAREST), 256)
        except Exception:  # a preview is a nicety; never let it break the run
            return None


def _load_images(paths):
    from PIL import Image

    ims = []
    for p in paths:
        with Image.open(p) as im:
            ims.append(im.convert("RGB"))
    return ims


class ReDiFineChain:
    DESCRIPTION = ("Runs the Chain of Diffusion: finetune a LoRA on the images, generate a new set from the same "
                   "captions, finetune on that, and so on, for each method side by side (e.g. constant CFG baselines "
                   "against ReDiFine). Writes a resumable run folder under ComfyUI's output/redifine/<run_name> with "
                   "images, LoRAs, metrics, curves and an HTML report. Cancel stops within one step; run again with "
                   "resume on to continue.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("grids", "curves", "verdict", "run_dir")
    OUTPUT_TOOLTIPS = (
        "One grid per method: rows are iterations (D0 first), columns are captions.",
        "Metric curves along the chain, one line per method.",
        "The answer in plain sentences (what each method did over the rounds, from this run's numbers), then the "
        "verdict for the last iteration of each method and seed (stable / drifting to blur / drifting to "
        "over-guidance / drifting from the data / inconclusive) with its reasons, each change with its 95 % "
        "interval [low, high]; a change past its threshold whose interval includes 0 reads inconclusive.",
        "The run folder (inside ComfyUI's output folder) with report.html.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        from .generate import sampler_names

        samplers = sampler_names()
        return {"required": {
            "pipeline": ("REDIFINE_PIPELINE", {"tooltip": "The base model (from ReDiFine Load Pipeline)."}),
            "dataset": ("REDIFINE_DATASET", {"tooltip": "D0: the captioned images the chain starts from."}),
            "run_name": ("STRING", {"default": "my_chain", "tooltip":
                         "Run folder name under ComfyUI's output/redifine/. A plain name: no '/', '\\' or '..'."}),
            "iterations": ("INT", {"default": 3, "min": 1, "max": 1000, "tooltip":
                           "How many finetune-and-regenerate rounds."}),
            "methods": ("STRING", {"default": "baseline 7.5\nredifine", "multiline": True, "tooltip":
                        "One method per line: 'baseline <cfg>' (constant CFG, no condition drop), 'redifine' "
                        "(condition drop + the redifine CFG schedule preset; options cond_drop=, schedule=) or "
                        "'custom schedule=<spec> cond_drop=<p>'. Prefix 'name: ' to label a line."}),
            "steps": ("INT", widget("steps", 20, "Denoising steps per generated image.")),
            "sampler": (samplers, {"default": "ddim", "tooltip": "The denoising sampler for generation."}),
            "images_per_caption": ("INT", widget("images_per_caption", 1,
                                                 "Images generated per caption in each iteration.")),
            "seed": ("INT", widget("seed", 0, "Seed of the first replicate (training and generation seeds follow "
                                   "from it).")),
            "replicates": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip":
                           "Independent replicate chains (seeds seed, seed+1, ...) for error bars."}),
            "train_steps": ("INT", widget("train_steps", 200, "LoRA optimizer steps per iteration.")),
            "rank": ("INT", widget("rank", 4, "LoRA rank (alpha = rank).")),
            "learning_rate": ("FLOAT", widget("learning_rate", 1e-4, "AdamW learning rate.", min=1e-7, step=1e-5,
                                              round=False)),
            "batch_size": ("INT", widget("batch_size", 4, "Images per optimizer step.")),
            "resolution": ("INT", widget("resolution", 0, "Training and generation size in pixels; 0 = the model's "
                                         "own.", zero_means_default=True)),
            "protocol": (list(PROTOCOLS), {"default": "restart", "tooltip":
                         "restart = each LoRA is trained from the base model (the paper's protocol); continue = "
                         "keep training the previous iteration's LoRA."}),
            "resume": ("BOOLEAN", {"default": True, "tooltip":
                       "Continue a run folder of the same name (finished iterations are kept); off = refuse to "
                       "touch an existing folder."}),
        }, "optional": {
            "keep_loaded": ("BOOLEAN", {"default": False, "tooltip": KEEP_LOADED_TOOLTIP}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, run_name, methods, iterations, protocol):
        # Inputs taken here lose ComfyUI's own min/max check: each is checked with the core's bounds and parsers.
        from redifine_core import bounds

        if run_name is not None:
            err = name_error(run_name, "run_name")
            if err:
                return err
        if methods is not None:
            try:
                parse_methods(methods)
            except ValueError as e:
                return str(e)
        if iterations is not None and not bounds.in_bounds("iterations", iterations):
            return f"iterations={iterations!r} must be {bounds.BOUNDS['iterations'].allowed}"
        if protocol is not None and protocol not in PROTOCOLS:
            return f"protocol={protocol!r} must be one of {PROTOCOLS}"
        return True

    def run(self, pipeline, dataset, run_name, iterations, methods, steps, sampler, images_per_caption, seed,
            replicates, train_steps, rank, learning_rate, batch_size, resolution, protocol, resume, unique_id=None,
            keep_loaded=False):
        import torch

        from redifine_core.chain import ChainConfig, run_chain
        from redifine_core.training import TrainConfig

        err = name_error(run_name, "run_name")
        if err:
            raise ValueError(err)
        run_dir = run_directory(run_name)
        folder = RunFolder(run_dir)
        if folder.exists() and not resume:
            raise ValueError(f"run_name={run_name!r}: {run_dir} already holds a run; turn resume on to continue it "
                             "or choose another run_name")
        size = int(resolution) or None
        config = ChainConfig(
            iterations=int(iterations),
            methods=parse_methods(methods),
            train=TrainConfig(steps=int(train_steps), learning_rate=float(learning_rate), rank=int(rank),
                              alpha=float(rank), batch_size=int(batch_size), resolution=size, seed=int(seed)),
            images_per_caption=int(images_per_caption), steps=int(steps), sampler=sampler,
            seeds=tuple(int(seed) + i for i in range(int(replicates))), protocol=protocol, width=size, height=size,
        )
        with torch.inference_mode(False), comfy_cancellation(), on_device(pipeline, bool(keep_loaded)):
            run_chain(pipeline, dataset, config, run_dir, progress=ChainProgress(unique_id, run_dir),
                      cancel=ComfyCancel(), resume=bool(resume) and folder.exists())  # also renders the report
        grids = folder.grids()
        grid_t = pils_to_tensor(_load_images(grids)) if grids else torch.zeros(1, 64, 64, 3)
        curves = folder.curves_png
        curves_t = pils_to_tensor(_load_images([curves])) if curves.exists() else torch.zeros(1, 64, 64, 3)
        verdicts = "\n".join(final_verdicts(run_dir))
        verdict = (plain_answer(run_dir) + "\n\n" + verdicts) if verdicts else "no finished iteration"
        return {"ui": {"text": [verdict]}, "result": (grid_t, curves_t, verdict, run_dir)}
