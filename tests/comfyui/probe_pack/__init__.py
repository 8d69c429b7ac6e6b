"""Test-only ComfyUI pack: records, per model call, whether ComfyUI ran the unconditional pass.

Loaded only by tests/comfyui (never shipped in the node pack). ``ReDiFineTestUncondProbe`` wraps a MODEL with a
CALC_COND_BATCH wrapper that appends one JSON line {"sigma", "uncond"} per call to ``log_path``.
"""

import json


class ReDiFineTestUncondProbe:
    CATEGORY = "ReDiFine/testing"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "log_path": ("STRING", {"default": ""})}}

    def patch(self, model, log_path):
        import comfy.patcher_extension as pe

        def wrapper(executor, model_, conds, x_in, timestep, model_options):
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"sigma": float(timestep.flatten()[0]), "uncond": conds[1] is not None}) + "\n")
            return executor(model_, conds, x_in, timestep, model_options)

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "redifine_test_probe", wrapper)
        return (m,)


NODE_CLASS_MAPPINGS = {"ReDiFineTestUncondProbe": ReDiFineTestUncondProbe}
