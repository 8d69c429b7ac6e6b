"""ReDiFineTrainLoRA: condition-drop LoRA finetuning, saved to ComfyUI's loras folder in kohya layout."""

from __future__ import annotations

import os

from . import _comfy
from .common import (ANY, CATEGORY, ComfyCancel, ProgressAdapter, bound_error, comfy_cancellation, first_error, name_error,
                     path_inside, run_checks, safe_name, widget)
from .gpu import KEEP_LOADED_TOOLTIP, on_device

PRECISIONS = ("auto", "no", "fp16", "bf16")  # TrainConfig.mixed_precision; "auto" follows the weights


def lora_filename(lora_name: str) -> str:
    """``my_lora`` -> ``my_lora.safetensors`` (ValueError for unsafe names)."""
    name = safe_name(lora_name, "lora_name")
    return name if name.endswith(".safetensors") else name + ".safetensors"


# path -> (mtime of the file this process wrote, the IS_CHANGED value of the run that wrote it)
_WRITTEN: dict[str, tuple[int, str]] = {}


def file_state(path: str) -> str:
    """IS_CHANGED value: stable while the file is the one we wrote; new when it was deleted or replaced."""
    mine = _WRITTEN.get(path)
    if os.path.exists(path):
        mtime = os.stat(path).st_mtime_ns
        if mine is not None and mine[0] == mtime:
            return mine[1]
        return f"external-{mtime}"
    return "missing" if mine is None else f"deleted-{mine[0]}"


def lora_path(lora_name: str) -> str:
    """Where the LoRA is written: inside ComfyUI's first loras folder, never outside it."""
    return path_inside(_comfy.loras_directory(), lora_filename(lora_name))


class ReDiFineTrainLoRA:
    DESCRIPTION = ("Finetunes a LoRA on the captioned set with condition drop (ReDiFine's first half): each caption "
                   "is replaced by the empty prompt with probability cond_drop, which keeps the unconditional branch "
                   "trained so CFG keeps working along a chain. Saves <lora_name>.safetensors into ComfyUI's loras "
                   "folder in kohya layout, so the stock LoraLoader applies every key. Cancel stops within one step "
                   "and leaves no file.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("REDIFINE_LORA", ANY, "IMAGE")
    RETURN_NAMES = ("lora", "lora_name", "loss_curve")
    OUTPUT_TOOLTIPS = (
        "The trained LoRA, for ReDiFine Generate.",
        "The saved file's name in the loras folder: connect it to the stock LoraLoader's lora_name.",
        "The training loss per step.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipeline": ("REDIFINE_PIPELINE", {"tooltip": "The base model to finetune (from ReDiFine Load Pipeline)."}),
            "dataset": ("REDIFINE_DATASET", {"tooltip": "The captioned images to train on (from ReDiFine Dataset)."}),
            "lora_name": ("STRING", {"default": "redifine_lora", "tooltip":
                          "File name in ComfyUI's loras folder (.safetensors is added). A plain name: no '/', '\\' "
                          "or '..'. An existing file of that name is replaced when training finishes."}),
            "cond_drop": ("FLOAT", widget("cond_drop", 0.1, "Probability of training a sample on the empty prompt (0 "
                          "= plain finetuning, the paper's ReDiFine uses about 0.1-0.2).", step=0.01)),
            "rank": ("INT", widget("rank", 4, "LoRA rank (size of the low-rank update).")),
            "alpha": ("FLOAT", widget("alpha", 4.0, "LoRA alpha; the update is scaled by alpha / rank.", min=0.01,
                                      step=0.01)),
            "learning_rate": ("FLOAT", widget("learning_rate", 1e-4, "AdamW learning rate.", min=1e-7, step=1e-5,
                                              round=False)),
            "steps": ("INT", widget("train_steps", 200, "Optimizer steps.")),
            "batch_size": ("INT", widget("batch_size", 4, "Images per optimizer step.")),
            "resolution": ("INT", widget("resolution", 0, "Training resolution in pixels; 0 = the model's own (e.g. "
                                         "512 for SD1.5, 32 for toy).", zero_means_default=True)),
            "seed": ("INT", widget("seed", 0, "Seed for noise, timesteps and condition drop: same seed + inputs = "
                                   "same LoRA.")),
            "precision": (list(PRECISIONS), {"default": "auto", "tooltip":
                          "Mixed precision for the forward pass. auto follows the loaded weights (fp16 weights train "
                          "with fp16 autocast and loss scaling, bf16 with bf16 autocast, fp32 in fp32); no, fp16 or "
                          "bf16 choose for fp32 weights. LoRA weights and optimizer state are always fp32."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip":
                                       "On: always recompute activations in the backward pass (less memory, "
                                       "slower). Off: automatic, on for SDXL where it pays, off otherwise."}),
        }, "optional": {
            "keep_loaded": ("BOOLEAN", {"default": False, "tooltip": KEEP_LOADED_TOOLTIP}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name, cond_drop, rank, alpha, learning_rate, steps, batch_size, resolution,
                        precision, seed=None):
        # A value is None when the widget is fed by a link; it is then checked when the node runs.
        if precision is not None and precision not in PRECISIONS:
            return f"precision={precision!r} must be one of {PRECISIONS}"
        return first_error(
            None if lora_name is None else name_error(lora_name, "lora_name"),
            bound_error("cond_drop", cond_drop, "cond_drop"),
            bound_error("rank", rank, "rank"),
            bound_error("alpha", alpha, "alpha"),
            bound_error("learning_rate", learning_rate, "learning_rate"),
            bound_error("train_steps", steps, "steps"),
            bound_error("batch_size", batch_size, "batch_size"),
            bound_error("resolution", resolution, "resolution", zero_means_default=True),
            bound_error("seed", seed, "seed"),
        )

    @classmethod
    def IS_CHANGED(cls, lora_name=None, **kwargs):
        """Re-train only when the saved file was deleted or replaced (otherwise ComfyUI reuses the cached result)."""
        try:
            return file_state(lora_path(lora_name))
        except Exception:
            return "invalid"

    def train(self, pipeline, dataset, lora_name, cond_drop, rank, alpha, learning_rate, steps, batch_size,
              resolution, seed, precision, gradient_checkpointing, unique_id=None, keep_loaded=False):
        import torch

        from redifine_core.lora import save_lora
        from redifine_core.paths import check_output_dir
        from redifine_core.report_images import plot_losses
        from redifine_core.training import TrainConfig, finetune_lora

        from .common import pils_to_tensor

        run_checks(self.VALIDATE_INPUTS(lora_name, cond_drop, rank, alpha, learning_rate, steps, batch_size,
                                        resolution, precision, seed))
        path = lora_path(lora_name)  # checked before any work
        check_output_dir(os.path.dirname(path), "ComfyUI's loras folder")  # writable: found now, not after training
        if os.path.isdir(path):
            raise ValueError(f"lora_name={lora_name!r}: {path!r} is a folder; choose another name")
        state = file_state(path)
        config = TrainConfig(steps=int(steps), learning_rate=float(learning_rate), rank=int(rank), alpha=float(alpha),
                             cond_drop=float(cond_drop), batch_size=int(batch_size),
                             resolution=int(resolution) or None, mixed_precision=precision,
                             gradient_checkpointing=True if gradient_checkpointing else None, seed=int(seed))
        with torch.inference_mode(False), comfy_cancellation(), on_device(pipeline, bool(keep_loaded)):
            result = finetune_lora(pipeline, dataset, config, progress=ProgressAdapter(unique_id, phases=("train",)),
                                   cancel=ComfyCancel())
            if _comfy.processing_interrupted():  # cancelled after the last step: still leave no file
                _comfy.raise_interrupted()
            save_lora(result.lora, path, layout="kohya")
            _WRITTEN[path] = (os.stat(path).st_mtime_ns, state)
        curve = pils_to_tensor([plot_losses(result.losses, title=f"{os.path.basename(path)}: training loss")])
        return (result.lora, os.path.basename(path), curve)
