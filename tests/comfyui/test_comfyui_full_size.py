"""The full-size random SD1.5 single file in a real ComfyUI (CPU, bf16): the stock loader and ReDiFine on one copy of
the weights, GPU sharing (modules parked on the offload device after each heavy node), Train -> stock LoraLoader ->
KSampler with 0 "lora key not loaded" lines, the fallback when sharing is refused, and the shipped
``train_then_ksampler`` workflow switched to that checkpoint exactly as its Note says.

Runs by default where it can: a ComfyUI checkout (see harness.py) and at least 12 GB of MemAvailable (the server
peaks at 9.7 GB); otherwise each test skips with the reason. ``REDIFINE_FULL_SIZE=0`` opts out, ``=1`` runs
whatever the free memory. The 2.1 GB checkpoint is built once with ``redifine_core.random_models`` into
``$REDIFINE_FULL_SIZE_CACHE`` (default ``~/.cache/redifine``). The memory figures of docs/comfyui.md come from
``bench/comfyui_rss.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import pytest

from harness import REPO, WORKFLOW_DIR, ComfyServer, load_workflow, unavailable_reason

CKPT = "sd15_random_fp16.safetensors"
BF16 = ("--bf16-unet", "--bf16-vae", "--bf16-text-enc")
SD15_BF16_BYTES = 2.0e9  # SD1.5's UNet + VAE + CLIP-L hold 1.07e9 parameters: 2.13 GB in bf16
MIN_AVAILABLE_GB = 12.0


def mem_available_gb() -> Optional[float]:
    """MemAvailable from /proc/meminfo in GB (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        return None
    return None


def full_size_skip_reason() -> Optional[str]:
    """Why the full-size tests do not run here (None when they do)."""
    flag = os.environ.get("REDIFINE_FULL_SIZE", "")
    if flag == "0":
        return "full-size SD1.5 in ComfyUI: opted out with REDIFINE_FULL_SIZE=0"
    if flag == "1":
        return None
    available = mem_available_gb()
    if available is None:
        return "full-size SD1.5 in ComfyUI: MemAvailable unreadable in /proc/meminfo (REDIFINE_FULL_SIZE=1 forces it)"
    if available < MIN_AVAILABLE_GB:
        return (f"full-size SD1.5 in ComfyUI needs MemAvailable >= {MIN_AVAILABLE_GB:.0f} GB, this machine has "
                f"{available:.1f} GB (REDIFINE_FULL_SIZE=1 forces it)")
    return None



def test_full_size_runs_by_default_with_enough_memory_and_skips_with_the_reason_otherwise(monkeypatch):
    this = sys.modules[__name__]
    monkeypatch.delenv("REDIFINE_FULL_SIZE", raising=False)
    monkeypatch.setattr(this, "mem_available_gb", lambda: 13.0)
    assert full_size_skip_reason() is None
    monkeypatch.setattr(this, "mem_available_gb", lambda: 4.0)
    reason = full_size_skip_reason()
    assert "needs MemAvailable >= 12 GB, this machine has 4.0 GB" in reason and "\n" not in reason
    monkeypatch.setenv("REDIFINE_FULL_SIZE", "1")
    assert full_size_skip_reason() is None
    monkeypatch.setenv("REDIFINE_FULL_SIZE", "0")
    monkeypatch.setattr(this, "mem_available_gb", lambda: 64.0)
    assert "opted out with REDIFINE_FULL_SIZE=0" in full_size_skip_reason()
    assert mem_available_gb() is None or mem_available_gb() > 0

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
    reason = full_size_skip_reason() or unavailable_reason()
    if reason:
        pytest.skip(reason)
    ckpt = full_size_checkpoint()
    s = ComfyServer(extra_packs={"redifine_probe": REPO / "tests" / "comfyui" / "probe_pack"}, extra_args=BF16)
    (s.tmp / "models" / "checkpoints" / CKPT).symlink_to(ckpt)
    yield from s.serve()


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


NOTE = "train_then_ksampler"
# what the Note tells a user to set, each a phrase the Note must contain (the test below sets exactly these)
NOTE_SWITCH = ("ComfyUI/models/checkpoints", "ComfyUI/input/<folder>", "model = checkpoints/<your file>",
               "precision = auto", "source = folder", "folder = <folder>", "resolution = 0",
               "Replace 'ReDiFine Pipeline to MODEL/CLIP/VAE' by the stock 'Load Checkpoint' with the same file",
               "its MODEL and CLIP go to LoraLoader, its VAE to VAE Decode",
               "'ReDiFine Pipeline from MODEL/CLIP/VAE (shared weights)'", "SD2.x, SDXL and v-prediction")


def _note_text() -> str:
    return json.loads((WORKFLOW_DIR / "api" / "notes.json").read_text())[NOTE]


def test_the_note_tells_how_to_switch_to_ones_own_checkpoint_and_the_ui_workflow_shows_it():
    note = _note_text()
    missing = [phrase for phrase in NOTE_SWITCH if phrase not in note]
    assert missing == [], f"the {NOTE} Note no longer says: {missing}"
    ui = json.loads((WORKFLOW_DIR / f"{NOTE}.json").read_text())
    (ui_note,) = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert ui_note["widgets_values"] == [note]  # the UI workflow and notes.json (the converter's input) agree


def _switched_as_the_note_says(folder: str) -> dict:
    """example_workflows/api/train_then_ksampler.api.json with the Note's steps 2-6 applied for the full-size SD1.5 file,
    plus the CPU-only reductions (64 px, one train step, two sampling steps; the server runs with bf16 flags)."""
    wf = load_workflow(NOTE)
    by_type = {node["class_type"]: node_id for node_id, node in wf.items()}
    load, data = wf[by_type["ReDiFineLoadPipeline"]], wf[by_type["ReDiFineDataset"]]
    train = wf[by_type["ReDiFineTrainLoRA"]]
    load["inputs"].update(model="checkpoints/" + CKPT, precision="auto")                    # step 2
    data["inputs"].update(source="folder", folder=folder)                                   # step 3
    train["inputs"].update(lora_name="my_sd15_lora", precision="auto", rank=8,              # step 4 (+ CPU sizes)
                           steps=1, batch_size=1, resolution=64)
    bridge = by_type["ReDiFinePipelineToNative"]                                            # step 5: same outputs
    wf[bridge] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}    # MODEL, CLIP, VAE
    wf[by_type["EmptyLatentImage"]]["inputs"].update(width=64, height=64, batch_size=1)     # step 6 (CPU size)
    wf[by_type["KSampler"]]["inputs"].update(steps=2)
    for node_id in (by_type["LoraLoader"], by_type["VAEDecode"]):  # what step 5 rewires: now Load Checkpoint's
        assert any(v == [bridge, i] for v in wf[node_id]["inputs"].values() for i in range(3)), node_id
    return wf


def test_the_shipped_workflow_switched_to_the_users_checkpoint_as_its_note_says_runs(big_server):
    from PIL import Image

    s = big_server
    folder = "my_images"
    (s.input / folder).mkdir(exist_ok=True)
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (96, 80), color).save(s.input / folder / f"{i}.png")
        (s.input / folder / f"{i}.txt").write_text(f"a {color} square")
    wf = _switched_as_the_note_says(folder)
    before_log = s.log().count("lora key not loaded")
    entry = s.run(wf, timeout=900)
    lora = s.loras / "my_sd15_lora.safetensors"
    assert lora.is_file() and lora.stat().st_size > 100_000
    assert s.log().count("lora key not loaded") == before_log  # the stock LoraLoader applied every key
    by_type = {node["class_type"]: node_id for node_id, node in wf.items()}
    (image,) = s.image_paths(entry, by_type["SaveImage"])
    assert Image.open(image).size == (64, 64)  # the stock KSampler + the checkpoint's own 8x VAE
