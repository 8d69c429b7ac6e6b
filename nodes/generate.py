"""ReDiFineGenerate: text-to-image with a per-step CFG schedule (and an optional LoRA), on a REDIFINE_PIPELINE."""

from __future__ import annotations

from .common import (CATEGORY, ComfyCancel, ProgressAdapter, bound_error, comfy_cancellation, first_error, lines,
                     run_checks, schedule_error, widget)
from .gpu import KEEP_LOADED_TOOLTIP, on_device

def sampler_names() -> list[str]:
    """The samplers the core's denoising loop knows."""
    from redifine_core.sampling import SAMPLERS

    return list(SAMPLERS)


class ReDiFineGenerate:
    DESCRIPTION = ("Generates one image per prompt line with a CFG schedule: a constant ('7.5') or a per-step "
                   "schedule (e.g. the 'redifine' preset or another reading, docs/schedules.md); steps where the "
                   "scale is 1 skip the unconditional pass. Image i uses seed + i, so results are reproducible.")
    CATEGORY = CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The generated images, one per prompt line, in prompt order.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipeline": ("REDIFINE_PIPELINE", {"tooltip": "The model (from ReDiFine Load Pipeline)."}),
                "prompts": ("STRING", {"default": "a red circle on a blue background", "multiline": True,
                            "tooltip": "One prompt per line; one image per line."}),
                "schedule": ("STRING", {"default": "7.5", "tooltip":
                             "CFG schedule: a number (constant), a preset name such as 'redifine', or a schedule "
                             "spec (see the Plot CFG Schedule node and docs/comfyui.md)."}),
                "steps": ("INT", widget("steps", 20, "Denoising steps.")),
                "sampler": (sampler_names(), {"default": "ddim", "tooltip": "The denoising sampler."}),
                "seed": ("INT", widget("seed", 0, "Seed of the first image; image i uses seed + i.")),
                "width": ("INT", widget("width", 0, "Width in pixels; 0 = the model's own size.",
                                        zero_means_default=True)),
                "height": ("INT", widget("height", 0, "Height in pixels; 0 = the model's own size.",
                                         zero_means_default=True)),
                "negative_prompt": ("STRING", {"default": "", "tooltip":
                                    "The prompt that CFG steers away from (empty = unconditional)."}),
                "lora_scale": ("FLOAT", widget("lora_scale", 1.0, "Strength of the connected LoRA.", step=0.05)),
            },
            "optional": {
                "lora": ("REDIFINE_LORA", {"tooltip": "Optional LoRA (from ReDiFine Train LoRA)."}),
                "keep_loaded": ("BOOLEAN", {"default": False, "tooltip": KEEP_LOADED_TOOLTIP}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, prompts, schedule, steps, width, height, seed=None, lora_scale=None):
        if prompts is not None and not lines(prompts):
            return "prompts is empty: write at least one prompt (one per line)"
        return first_error(
            None if prompts is None else bound_error("images", len(lines(prompts)), "prompt lines"),
            None if schedule is None else schedule_error(schedule),
            bound_error("steps", steps, "steps"),
            bound_error("seed", seed, "seed"),
            bound_error("width", width, "width", zero_means_default=True),
            bound_error("height", height, "height", zero_means_default=True),
            bound_error("lora_scale", lora_scale, "lora_scale"),
        )

    def generate(self, pipeline, prompts, schedule, steps, sampler, seed, width, height, negative_prompt,
                 lora_scale, lora=None, unique_id=None, keep_loaded=False):
        from redifine_core.sampling import generate

        run_checks(self.VALIDATE_INPUTS(prompts, schedule, steps, width, height, seed, lora_scale))
        with comfy_cancellation(), on_device(pipeline, bool(keep_loaded)):
            images = generate(pipeline, lines(prompts), schedule, steps=int(steps), seeds=int(seed),
                              negative_prompt=negative_prompt or "", sampler=sampler, width=int(width) or None,
                              height=int(height) or None, lora=lora, lora_scale=float(lora_scale),
                              progress=ProgressAdapter(unique_id), cancel=ComfyCancel())
        return (images.float().cpu(),)
