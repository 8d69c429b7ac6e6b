"""ReDiFineGenerate: text-to-image with a per-step CFG schedule (and an optional LoRA), on a REDIFINE_PIPELINE."""

from __future__ import annotations

from .common import CATEGORY, ComfyCancel, ProgressAdapter, comfy_cancellation, lines, schedule_error

FALLBACK_SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "pndm")


def sampler_names() -> list[str]:
    try:
        from redifine_core.sampling import SAMPLERS

        return list(SAMPLERS)
    except Exception:  # the core is importable but incomplete: keep the node listable
        return list(FALLBACK_SAMPLERS)


def _positive_int(value, field, allow_zero=False):
    if value is None:
        return None
    lo = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        return f"{field}={value!r} must be an integer >= {lo}"
    return None


class ReDiFineGenerate:
    DESCRIPTION = ("Generates one image per prompt line with a CFG schedule: a constant ('7.5') or a per-step "
                   "schedule (e.g. the 'redifine' preset) that lowers guidance as denoising proceeds; steps where the "
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
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Denoising steps."}),
                "sampler": (sampler_names(), {"default": "ddim", "tooltip": "The denoising sampler."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip":
                         "Seed of the first image; image i uses seed + i."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8, "tooltip":
                          "Width in pixels; 0 = the model's own size."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8, "tooltip":
                           "Height in pixels; 0 = the model's own size."}),
                "negative_prompt": ("STRING", {"default": "", "tooltip":
                                    "The prompt that CFG steers away from (empty = unconditional)."}),
                "lora_scale": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05, "tooltip":
                               "Strength of the connected LoRA."}),
            },
            "optional": {
                "lora": ("REDIFINE_LORA", {"tooltip": "Optional LoRA (from ReDiFine Train LoRA)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, prompts, schedule, steps, width, height):
        if prompts is not None and not lines(prompts):
            return "prompts is empty: write at least one prompt (one per line)"
        if schedule is not None:
            err = schedule_error(schedule)
            if err:
                return err
        for v, f, z in ((steps, "steps", False), (width, "width", True), (height, "height", True)):
            err = _positive_int(v, f, z)
            if err:
                return err
        return True

    def generate(self, pipeline, prompts, schedule, steps, sampler, seed, width, height, negative_prompt,
                 lora_scale, lora=None, unique_id=None):
        from redifine_core.sampling import generate

        with comfy_cancellation():
            images = generate(pipeline, lines(prompts), schedule, steps=int(steps), seeds=int(seed),
                              negative_prompt=negative_prompt or "", sampler=sampler, width=int(width) or None,
                              height=int(height) or None, lora=lora, lora_scale=float(lora_scale),
                              progress=ProgressAdapter(unique_id), cancel=ComfyCancel())
        return (images.float().cpu(),)
