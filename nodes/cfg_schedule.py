"""ReDiFineCFGScheduleModel: make the stock KSampler follow a per-step CFG schedule (PREDICT_NOISE wrapper)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from . import _comfy
from .common import CATEGORY, bound_error, run_checks, schedule_error, widget

WRAPPER_KEY = "redifine_cfg_schedule"


def step_index(sigma: float, sample_sigmas: Sequence[float]) -> int:
    """Which step of this sampler run ``sigma`` belongs to: the last i with sample_sigmas[i] >= sigma.

    Robust for second-order samplers, whose extra model calls happen at sigmas between (or at) the step's ends,
    and for denoise < 1, because ``sample_sigmas`` are the sigmas actually used in this run.
    """
    s = [float(v) for v in sample_sigmas]
    n_steps = max(1, len(s) - 1)  # the last sigma is the end point (usually 0), not a step
    idx = sum(1 for v in s if v >= sigma * (1 - 1e-4)) - 1
    return min(max(idx, 0), n_steps - 1)


def step_progress(sigma: float, sample_sigmas: Sequence[float]) -> float:
    """Progress in [0, 1] of the step ``sigma`` belongs to: step i of n is at i / (n - 1), as Schedule.values uses."""
    n_steps = max(1, len(sample_sigmas) - 1)
    if n_steps == 1:
        return 0.0
    return step_index(sigma, sample_sigmas) / (n_steps - 1)


def _as_floats(t: Any) -> list[float]:
    if hasattr(t, "detach"):
        return [float(v) for v in t.detach().flatten().cpu().tolist()]
    if isinstance(t, (int, float)):
        return [float(t)]
    return [float(v) for v in t]


def make_wrapper(scale_at: Callable[[float], float]):
    """A PREDICT_NOISE wrapper that sets the guider's cfg to ``scale_at(progress)`` for this one model call.

    Setting ``guider.cfg`` (instead of rewriting the CFG formula) keeps every other CFG hook working and lets
    ComfyUI's own cfg == 1 shortcut skip the unconditional pass on exactly the steps where the schedule is 1.
    """

    def wrapper(executor, x, timestep, model_options, seed):
        guider = executor.class_obj
        sigmas = (model_options.get("transformer_options") or {}).get("sample_sigmas")
        sigma = _as_floats(timestep)[0]
        progress = step_progress(sigma, _as_floats(sigmas)) if sigmas is not None else 0.0
        old = guider.cfg
        guider.cfg = float(scale_at(progress))
        try:
            return executor(x, timestep, model_options, seed)
        finally:
            guider.cfg = old

    return wrapper


class ReDiFineCFGScheduleModel:
    DESCRIPTION = ("Makes the stock KSampler (and SamplerCustom with a CFGGuider) follow a per-step CFG schedule "
                   "instead of the constant cfg widget, for any sampler including second-order ones and any denoise. "
                   "Steps where the schedule is 1 skip the unconditional pass. Connect between the model loader "
                   "(or LoraLoader) and KSampler; the KSampler's cfg widget is then ignored.")
    CATEGORY = CATEGORY + "/sampling"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the model whose sampler follows the schedule (the input model is not changed).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to patch (from a checkpoint loader or LoraLoader)."}),
            "schedule": ("STRING", {"default": "redifine", "tooltip":
                         "CFG schedule over the denoising steps: a number (constant), a preset such as 'redifine', "
                         "or a schedule spec. Use ReDiFine Plot CFG Schedule to see it."}),
            "iteration": ("INT", widget("iteration", 0, "Chain iteration for schedules that also change along the "
                                        "chain (0 otherwise).")),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, schedule, iteration):
        if schedule is not None:
            err = schedule_error(schedule)
            if err:
                return err
        return bound_error("iteration", iteration, "iteration") or True

    def patch(self, model, schedule, iteration):
        from redifine_core.guidance import parse_schedule

        run_checks(self.VALIDATE_INPUTS(schedule, iteration))
        sched = parse_schedule(schedule)
        it = int(iteration)
        kind = _comfy.patcher_extension().WrappersMP.PREDICT_NOISE
        m = model.clone()
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)  # a second schedule node replaces the first, not nests in it
        m.add_wrapper_with_key(kind, WRAPPER_KEY, make_wrapper(lambda p: sched.scale(p, it)))
        return (m,)
