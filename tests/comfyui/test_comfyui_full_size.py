"""The full-size random SD1.5 single file in a real ComfyUI (CPU, bf16): the stock loader and ReDiFine on one copy of
the weights, GPU sharing (modules parked on the offload device after each heavy node), Train -> stock LoraLoader ->
KSampler with 0 "lora key not loaded" lines, and the fallback when sharing is refused.

Slow (a 2.1 GB checkpoint, full-size UNet steps at 64 px on a CPU): run when ``REDIFINE_FULL_SIZE=1``. The
checkpoint is built once with ``redifine_core.random_models`` into ``$REDIFINE_FULL_SIZE_CACHE`` (default
``~/.cache/redifine``). The memory figures of docs/comfyui.md come from ``bench/comfyui_rss.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness import REPO, ComfyServer, unavailable_reason

CKPT = "sd15_random_fp16.safetensors"
BF16 = ("--bf16-unet", "--bf16-vae", "--bf16-text-enc")
SD15_BF16_BYTES = 2.0e9  # SD1.5's UNet + VAE + CLIP-L hold 1.07e9 parameters: 2.13 GB in bf16

pytestmark = pytest.mark.skipif(os.environ.get("REDIFINE_FULL_SIZE") != "1",
                                reason="full-size SD1.5 in ComfyUI: set REDIFINE_FULL_SIZE=1")


def full_size_checkpoint() -> Path:
    import torch

    from redifine_core.random_models import write_single_file

    cache = Path(os.environ.get("REDIFINE_FULL_SIZE_CACHE", "~/.cache/redifine")).expanduser()
    path = cache / CKPT
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        write_single_file("sd1", path, dtype=torch.float16)
    return path


@pytest.fixture(scope="module")
def big_server():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    ckpt = full_size_checkpoint()
    s = ComfyServer(extra_packs={"redifine_probe": REPO / "tests" / "comfyui" / "probe_pack"}, extra_args=BF16)
    (s.tmp / "models" / "checkpoints" / CKPT).symlink_to(ckpt)
    try:
        s.start()
    except Exception:
        s.cleanup()
        raise
    yield s
    s.cleanup()


def _loader():
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}}


def _probe(out: dict, node: str) -> dict:
    return json.loads(out[node]["text"][0])


def test_shared_pipeline_uses_the_loaders_memory_trains_and_the_stock_nodes_apply_the_lora(big_server):
    s = big_server
    p = _loader()
    p["90"] = {"class_type": "ReDiFineTestMemory", "inputs": {"model": ["1", 0]}}  # loads the file, warms imports
    s.run(p, timeout=600)
    before = s.memory()["rss"]
    p["20"] = {"class_type": "ReDiFinePipelineFromNative",
               "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "fallback": "none (refuse)"}}
    p["91"] = {"class_type": "ReDiFineTestMemory", "inputs": {"pipeline": ["20", 0], "model": ["1", 0],
                                                              "clip": ["1", 1], "vae": ["1", 2]}}
    out = s.run(p, timeout=600)["outputs"]
    grown = s.memory()["rss"] - before
    info = _probe(out, "91")
    assert info["shared_bytes"] == info["pipeline_bytes"] > SD15_BF16_BYTES  # every weight is the loader's memory
    assert grown < 0.10 * info["pipeline_bytes"], f"RSS grew by {grown / 2**20:.0f} MiB"
    assert info["devices"] == [info["offload_device"]]

    # Train on the shared pipeline, then the stock LoraLoader + CFG schedule + KSampler on the loader's MODEL/CLIP
    p["2"] = {"class_type": "ReDiFineDataset", "inputs": {"source": "toy", "folder": "(none)", "toy_count": 2,
                                                          "toy_seed": 1, "default_caption": "", "captions": ""}}
    p["3"] = {"class_type": "ReDiFineTrainLoRA", "inputs": {
        "pipeline": ["20", 0], "dataset": ["2", 0], "lora_name": "full_size_lora", "cond_drop": 0.1, "rank": 4,
        "alpha": 4.0, "learning_rate": 1e-4, "steps": 2, "batch_size": 1, "resolution": 64, "seed": 0,
        "precision": "no", "gradient_checkpointing": False}}
    p["92"] = {"class_type": "ReDiFineTestMemory", "inputs": {"pipeline": ["20", 0], "model": ["1", 0],
                                                              "clip": ["1", 1], "vae": ["1", 2], "after": ["3", 1]}}
    p["5"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": ["3", 1],
                                                     "strength_model": 1.0, "strength_clip": 1.0}}
    p["6"] = {"class_type": "ReDiFineCFGScheduleModel", "inputs": {"model": ["5", 0], "schedule": "redifine",
                                                                   "iteration": 0}}
    p["7"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["5", 1]}}
    p["8"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["5", 1]}}
    p["9"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    p["10"] = {"class_type": "KSampler", "inputs": {
        "model": ["6", 0], "seed": 0, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["7", 0], "negative": ["8", 0], "latent_image": ["9", 0], "denoise": 1.0}}
    p["11"] = {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}}
    p["12"] = {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "full_size"}}
    p["13"] = {"class_type": "ReDiFineGenerate", "inputs": {
        "pipeline": ["20", 0], "prompts": "a red circle", "schedule": "redifine", "steps": 2, "sampler": "ddim",
        "seed": 0, "width": 64, "height": 64, "negative_prompt": "", "lora_scale": 1.0, "lora": ["3", 0]}}
    p["93"] = {"class_type": "ReDiFineTestMemory", "inputs": {"pipeline": ["20", 0], "model": ["1", 0],
                                                              "clip": ["1", 1], "vae": ["1", 2], "after": ["13", 0]}}
    p["14"] = {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "full_size_gen"}}
    before_log = s.log().count("lora key not loaded")
    out = s.run(p, timeout=900)["outputs"]
    assert (s.loras / "full_size_lora.safetensors").is_file()
    assert s.log().count("lora key not loaded") == before_log  # the stock LoraLoader applied every key
    assert len(s.image_paths({"outputs": out}, "12")) == 1 and len(s.image_paths({"outputs": out}, "14")) == 1
    for node in ("92", "93"):  # after each heavy node: on the offload device, still the loader's memory
        info = _probe(out, node)
        assert info["devices"] == [info["offload_device"]], node
        assert info["shared_bytes"] == info["pipeline_bytes"] > SD15_BF16_BYTES, node


def test_a_lora_patched_model_is_refused_and_the_fallback_file_is_loaded(big_server):
    s = big_server
    loras = sorted(f.name for f in s.loras.glob("*.safetensors"))
    if not loras:
        pytest.skip("needs the LoRA trained by the previous test")
    p = _loader()
    p["5"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": loras[0],
                                                     "strength_model": 1.0, "strength_clip": 1.0}}
    p["20"] = {"class_type": "ReDiFinePipelineFromNative",
               "inputs": {"model": ["5", 0], "clip": ["5", 1], "vae": ["1", 2], "fallback": "none (refuse)"}}
    p["91"] = {"class_type": "ReDiFineTestMemory", "inputs": {"pipeline": ["20", 0]}}
    entry = s.wait(s.queue(p), timeout=600)
    assert entry["status"]["status_str"] == "error"
    msg = json.dumps(entry["status"]["messages"])
    assert "cannot share the loader's weights: the MODEL has weight patches" in msg
    p["20"]["inputs"]["fallback"] = "checkpoints/" + CKPT
    p["95"] = {"class_type": "PreviewAny", "inputs": {"source": ["20", 1]}}
    out = s.run(p, timeout=600)["outputs"]
    info = _probe(out, "91")
    assert info["devices"] == [info["offload_device"]]
    assert "not shared: the MODEL has weight patches" in json.dumps(out["95"])


def test_bridge_builds_a_standard_vae_publicly_and_it_decodes_like_the_stock_one(big_server):
    s = big_server
    p = _loader()
    p["20"] = {"class_type": "ReDiFinePipelineFromNative",
               "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "fallback": "none (refuse)"}}
    p["21"] = {"class_type": "ReDiFinePipelineToNative", "inputs": {"pipeline": ["20", 0]}}
    p["94"] = {"class_type": "ReDiFineTestVaeParity", "inputs": {"vae_a": ["1", 2], "vae_b": ["21", 2]}}
    out = json.loads(s.run(p, timeout=900)["outputs"]["94"]["text"][0])
    assert out["class_a"] == out["class_b"] == "comfy.sd.VAE"  # ComfyUI's own class, built by its constructor
    assert out["shape"] == [1, 64, 64, 3]
    assert out["diff"] < 2e-2  # bf16 stock weights vs the bridge's float32 copy of them
