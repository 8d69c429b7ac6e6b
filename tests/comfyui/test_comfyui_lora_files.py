"""ComfyUI's own code on LoRA files, without a server (its python imports comfy.* on a meta-device model): the keys
its Train LoRA node writes for the real SD1.5 / SDXL UNets are the ones tests/test_lora_comfyui_trainer.py rebuilds,
and the kohya file we save after reading such a file loads in its LoraLoader with 0 "lora key not loaded" lines and
patches every weight as the node's own file does."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
from safetensors import safe_open
from test_lora_comfyui_trainer import comfyui_trainer_state, write
from test_lora_thirdparty import meta_pipeline

from harness import comfyui_python, comfyui_root, unavailable_reason
from redifine_core.lora import load_lora, save_lora

_SCRIPT = textwrap.dedent(
    """
    import json, logging, logging.handlers, sys
    import torch
    trainer_file, ours_file, shapes_file = sys.argv[1:4]
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.lora, comfy.model_detection, comfy.utils

    shapes = json.load(open(shapes_file))
    unet_config = comfy.model_detection.unet_config_from_diffusers_unet(
        {k: torch.empty(v, device="meta") for k, v in shapes.items()})
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        model = model_config.get_model({})

    # the keys TrainLoraNode writes (comfy_extras/nodes_train.py), from the model's own modules
    node_keys = {}
    for n, m in model.named_modules():
        if hasattr(m, "weight_function") and m.weight is not None:
            s = tuple(m.weight.shape)
            if len(s) >= 2:
                node_keys.update({f"{n}.lora_up.weight": [s[0], 1], f"{n}.lora_down.weight": [1, int(torch.Size(s[1:]).numel())],
                                  f"{n}.alpha": []})
            else:
                node_keys[f"{n}.diff"] = list(s)
        if hasattr(m, "weight_function") and getattr(m, "bias", None) is not None:
            node_keys[f"{n}.diff_b"] = list(m.bias.shape)

    key_map = comfy.lora.model_lora_keys_unet(model, {})
    grab = logging.handlers.BufferingHandler(1 << 20)  # the "lora key not loaded" warnings
    logging.getLogger().addHandler(grab)
    logging.getLogger().setLevel(logging.WARNING)
    result = {"node_keys": node_keys}
    patches = {}
    for name, path in (("trainer", trainer_file), ("ours", ours_file)):
        grab.buffer.clear()
        sd = comfy.utils.load_torch_file(path, safe_load=True)
        patches[name] = comfy.lora.load_lora(sd, key_map)
        missed = [r.getMessage() for r in grab.buffer if "not loaded" in r.getMessage()]
        result[name] = {"patches": len(patches[name]), "not_loaded": missed}
    # the weight change each file makes, on every 7th patched parameter (zeros + patch, strength 1)
    worst, checked = 0.0, 0
    for key in sorted(patches["trainer"])[::7]:
        shape = [int(x) for x in model.state_dict()[key].shape]
        a, b = (comfy.lora.calculate_weight([(1.0, patches[n][key], 1.0, None, None)], torch.zeros(shape), key)
                for n in ("trainer", "ours"))
        worst = max(worst, float((a - b).abs().max()) / max(1e-12, float(a.abs().max())))
        checked += 1
    result["same_patch_keys"] = sorted(patches["trainer"]) == sorted(patches["ours"])
    result["worst_relative_difference"], result["checked"] = worst, checked
    print(json.dumps(result))
    """
)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_comfyui_reads_the_trainer_layout_and_our_kohya_file_alike(tmp_path, kind):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    p = meta_pipeline(kind)
    state = comfyui_trainer_state(p.unet, rank=1)
    trainer = write(tmp_path / "ComfyUI_trained_lora_10_steps_00001_.safetensors", state)
    loaded = load_lora(trainer)
    ours = save_lora(loaded, tmp_path / "ours.safetensors")
    with safe_open(str(ours), framework="pt") as fh:
        assert all(k.startswith("lora_unet_") for k in fh.keys())
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({k: list(v.shape) for k, v in p.unet.state_dict().items()}))
    script = tmp_path / "check.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(comfyui_root()), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(comfyui_python()), str(script), str(trainer), str(ours), str(shapes)],
                          cwd=comfyui_root(), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["node_keys"] == {k: list(v.shape) for k, v in state.items()}  # our rebuild is the node's layout
    n = len(loaded.modules("unet")) + len(loaded.fixed_deltas)  # one patch per LoRA module and per delta
    assert result["trainer"] == {"patches": n, "not_loaded": []}
    assert result["ours"] == {"patches": n, "not_loaded": []}
    assert result["same_patch_keys"] and result["checked"] > 50
    assert result["worst_relative_difference"] <= 1e-6  # the same bf16 factors and deltas, alpha 1.0 as float32
