"""ReDiFinePlotSchedule: draw one or more CFG schedules over the denoising steps."""

from __future__ import annotations

from .common import CATEGORY, bound_error, lines, pils_to_tensor, run_checks, schedule_error, widget


class ReDiFinePlotSchedule:
    DESCRIPTION = ("Plots CFG schedules (one spec per line) as guidance scale against denoising step, to compare "
                   "a constant CFG with ReDiFine's decaying schedule before running anything expensive.")
    CATEGORY = CATEGORY + "/sampling"
    FUNCTION = "plot"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("plot",)
    OUTPUT_TOOLTIPS = ("The plot: guidance scale per step, one line per schedule.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "schedules": ("STRING", {"default": "7.5\nredifine", "multiline": True, "tooltip":
                          "One schedule per line: a number, a preset such as 'redifine', or a schedule spec."}),
            "steps": ("INT", widget("steps", 30, "Number of denoising steps to plot.", min=2)),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, schedules, steps):
        if schedules is not None:
            specs = lines(schedules)
            if not specs:
                return "schedules is empty: write one schedule per line"
            for i, spec in enumerate(specs, 1):
                err = schedule_error(spec, f"schedules line {i}")
                if err:
                    return err
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 2):
            return f"steps={steps!r} must be an integer >= 2"
        return bound_error("steps", steps, "steps") or True

    def plot(self, schedules, steps):
        from redifine_core.report_images import plot_schedule

        run_checks(self.VALIDATE_INPUTS(schedules, steps))
        img = plot_schedule(lines(schedules), int(steps))
        return (pils_to_tensor([img]),)
