"""Offline pipeline loading: diffusers folders, single-file SD1/SDXL checkpoints, architecture detection, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import redifine_core.models as models
from redifine_core.models import CONFIG_ROOT, Pipeline, checkpoint_shapes, detect_architecture, load_pipeline

from sd_single_file import open_clip_to_original, sd1_to_original, sdxl_to_original, unet_to_original, vae_to_original


@pytest.fixture(autouse=True)
def no_outside_tokenizers(monkeypatch, tmp_path):
    """Tokenizer look-ups must not find a real ComfyUI or an env folder on the test machine."""
    monkeypatch.delenv("REDIFINE_TOKENIZER_DIR", raising=False)
    monkeypatch.setenv("COMFYUI_ROOT", str(tmp_path / "no_comfyui"))


def _config_folder(pipe, folder: Path) -> Path:
    """The pipeline saved as a diffusers folder, minus every weight file (configs + tokenizer only)."""
    pipe.save_pretrained(folder)
    for f in folder.rglob("*.safetensors"):
        f.unlink()
    return folder


def _save(state: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def sd1_file(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1_single")
    return _save(sd1_to_original(tiny_sd), root / "tiny_sd1.safetensors"), _config_folder(tiny_sd, root / "config")


@pytest.fixture(scope="module")
def sdxl_file(tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_single")
    return _save(sdxl_to_original(tiny_sdxl), root / "tiny_sdxl.safetensors"), _config_folder(tiny_sdxl, root / "config")


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, msg=k)


# ------------------------------------------------------------------------------------------- test converter itself


def test_original_layout_converter_round_trips_through_diffusers(tiny_sd, tiny_sdxl):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    for pipe, state in ((tiny_sd, sd1_to_original(tiny_sd)), (tiny_sdxl, sdxl_to_original(tiny_sdxl))):
        assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
                   for k in state)
        for module, back in (
            (pipe.unet, convert_ldm_unet_checkpoint(state, dict(pipe.unet.config))),
            (pipe.vae, convert_ldm_vae_checkpoint(state, dict(pipe.vae.config))),
            (pipe.text_encoder, {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}),
        ):
            ref = module.state_dict()
            assert set(back) == set(ref)
            assert all(torch.equal(back[k], ref[k]) for k in ref)
    state = sdxl_to_original(tiny_sdxl)
    back = convert_open_clip_checkpoint(tiny_sdxl.text_encoder_2, state, prefix="conditioner.embedders.1.model.")
    ref = tiny_sdxl.text_encoder_2.state_dict()
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)


# ---------------------------------------------------------------------------------------------- single-file loads


def test_single_file_sd1_loads_the_same_model(tiny_sd, sd1_file):
    path, config = sd1_file
    pipe = load_pipeline(path, device="cpu", config_dir=config)
    assert pipe.kind == "sd1" and pipe.source == str(path) and not pipe.is_sdxl
    for a, b in ((tiny_sd.unet, pipe.unet), (tiny_sd.vae, pipe.vae), (tiny_sd.text_encoder, pipe.text_encoder)):
        _assert_same_weights(a, b)
    assert pipe.tokenizer("a red cat on a tree").input_ids == tiny_sd.tokenizer("a red cat on a tree").input_ids
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.prediction_type == "epsilon"
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    from redifine_core.sampling import generate

    ours = generate(pipe, ["a red cat"], 4.0, steps=2, seeds=[1], width=16, height=16)
    ref = generate(Pipeline.from_diffusers(tiny_sd), ["a red cat"], 4.0, steps=2, seeds=[1], width=16, height=16)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_single_file_sdxl_loads_both_text_encoders_from_their_own_keys(tiny_sdxl, sdxl_file):
    path, config = sdxl_file
    pipe = load_pipeline(path, device="cpu", config_dir=config)
    assert pipe.kind == "sdxl" and pipe.is_sdxl
    for a, b in ((tiny_sdxl.unet, pipe.unet), (tiny_sdxl.vae, pipe.vae), (tiny_sdxl.text_encoder, pipe.text_encoder),
                 (tiny_sdxl.text_encoder_2, pipe.text_encoder_2)):
        _assert_same_weights(a, b)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2 is not None and pipe.force_zeros_for_empty_prompt is False


def test_single_file_prediction_type_override(sd1_file):
    path, config = sd1_file
    pipe = load_pipeline(path, device="cpu", config_dir=config, prediction_type="v_prediction")
    assert pipe.prediction_type == "v_prediction" and pipe.scheduler.config.timestep_spacing == "leading"
    with pytest.raises(ValueError, match="prediction_type"):
        load_pipeline(path, config_dir=config, prediction_type="sample_x0")


def test_tokenizer_from_a_comfyui_style_folder_is_forced_to_77(tiny_sd, sd1_file, tmp_path):
    from redifine_core.tiny import TINY_WORDS
    from redifine_core.toy.word_tokenizer import write_word_tokenizer

    path, config = sd1_file
    bare = tmp_path / "config"
    shutil.copytree(config, bare)
    shutil.rmtree(bare / "tokenizer")
    comfy_like = write_word_tokenizer(TINY_WORDS, tmp_path / "sd1_tokenizer", max_length=8192)
    cfg = json.loads((comfy_like / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 8192  # what ComfyUI ships
    pipe = load_pipeline(path, device="cpu", config_dir=bare, tokenizer_dir=comfy_like)
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("a red cat", padding="max_length", max_length=pipe.tokenizer.model_max_length).input_ids
    assert len(ids) == 77
    assert ids == tiny_sd.tokenizer("a red cat", padding="max_length", max_length=77).input_ids


def test_missing_tokenizer_names_the_files_and_every_place(sd1_file, tmp_path):
    path, config = sd1_file
    bare = tmp_path / "config"
    shutil.copytree(config, bare)
    shutil.rmtree(bare / "tokenizer")
    with pytest.raises(FileNotFoundError) as err:
        load_pipeline(path, device="cpu", config_dir=bare, tokenizer_dir=tmp_path / "empty")
    msg = str(err.value)
    for part in ("vocab.json", "merges.txt", str(tmp_path / "empty"), str(bare / "tokenizer"), "sd1_tokenizer",
                 "tokenizer_dir"):
        assert part in msg


def test_single_file_with_mismatched_configs_is_a_clear_error(sd1_file, sdxl_file):
    path, _ = sd1_file
    with pytest.raises(ValueError, match=r"cross-attention width is 32.*expect 768"):
        load_pipeline(path, device="cpu")  # the bundled full-size SD1 configs
    _, xl_config = sdxl_file
    with pytest.raises(ValueError, match="cross-attention width"):
        load_pipeline(path, device="cpu", config_dir=xl_config)


def test_single_file_with_missing_weights_names_the_part(tiny_sd, sd1_file, tmp_path):
    path, config = sd1_file
    state = sd1_to_original(tiny_sd)
    state = {k: v for k, v in state.items() if "output_blocks.1.0.in_layers" not in k}
    broken = _save(state, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=r"broken\.safetensors.*UNet.*missing"):
        load_pipeline(broken, device="cpu", config_dir=config)
    no_vae = _save({k: v for k, v in sd1_to_original(tiny_sd).items() if not k.startswith("first_stage_model.")},
                   tmp_path / "no_vae.safetensors")
    with pytest.raises(ValueError, match="first_stage_model"):
        load_pipeline(no_vae, device="cpu", config_dir=config)


# ------------------------------------------------------------------------------------------ architecture detection


def _fake(kind: str, context: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape sets with the names of each layout and the one shape that tells SD1 from SD2."""
    unet_key = {
        "sdxl": "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    }.get(kind, "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    shapes = {unet_key: (8, context), "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
              "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)}
    if kind == "sd1":
        shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = (10, context)
    elif kind == "sd2":
        shapes["cond_stage_model.model.token_embedding.weight"] = (10, context)
    elif kind == "sdxl":
        shapes["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = (10, 768)
        shapes["conditioner.embedders.1.model.token_embedding.weight"] = (10, 1280)
    return shapes


def test_detect_architecture_from_key_names():
    assert detect_architecture(_fake("sd1", 768)) == "sd1"
    assert detect_architecture(_fake("sd2", 1024)) == "sd2"
    assert detect_architecture(_fake("sdxl", 2048)) == "sdxl"
    tensors = {k: torch.zeros(s) for k, s in _fake("sd2", 1024).items()}  # tensors work as well as shapes
    assert detect_architecture(tensors) == "sd2"


def test_detect_unet_only_checkpoints_by_context_width():
    for kind, width in (("sd1", 768), ("sd2", 1024)):
        shapes = {k: s for k, s in _fake(kind, width).items() if not k.startswith("cond_stage_model.")}
        assert detect_architecture(shapes) == kind


@pytest.mark.parametrize(
    "shapes, words",
    [
        ({"double_blocks.0.img_attn.norm.key_norm.scale": (8,)}, ["unknown checkpoint layout", "double_blocks"]),
        ({"conditioner.embedders.0.model.token_embedding.weight": (10, 1280),
          "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}, ["refiner"]),
        ({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (10, 768)}, ["no UNet keys"]),
    ],
)
def test_detect_rejects_other_layouts(shapes, words):
    with pytest.raises(ValueError) as err:
        detect_architecture(shapes)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("kind, context", [("sd1", 768), ("sd2", 1024), ("sdxl", 2048)])
def test_bundled_configs_describe_the_real_architectures(kind, context):
    """Build each bundled architecture on the meta device, write its original-layout keys, and detect it back."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = CONFIG_ROOT / kind
    index = json.loads((folder / "model_index.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = {name: getattr(transformers, index[name][1])(transformers.CLIPTextConfig.from_pretrained(folder / name))
                    for name in ("text_encoder", "text_encoder_2") if name in index}
    state = {**unet_to_original(unet), **vae_to_original(vae)}
    if kind == "sd1":
        state.update({f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
                      for k, v in encoders["text_encoder"].state_dict().items()})
    elif kind == "sd2":
        state.update(open_clip_to_original(encoders["text_encoder"], "cond_stage_model.model."))
    else:
        state.update({f"conditioner.embedders.0.transformer.text_model.{k.removeprefix('text_model.')}": v
                      for k, v in encoders["text_encoder"].state_dict().items()})
        state.update(open_clip_to_original(encoders["text_encoder_2"], "conditioner.embedders.1.model."))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert detect_architecture(shapes) == kind
    assert unet.config.cross_attention_dim == context
    n_params = sum(v.numel() for k, v in state.items() if k.startswith("model.diffusion_model."))
    expected = {"sd1": 859.52e6, "sd2": 865.91e6, "sdxl": 2567.46e6}[kind]  # published UNet sizes
    assert abs(n_params - expected) / expected < 0.001
    if kind == "sd1":  # the key names real SD1.x files use (ComfyUI / A1111 layout)
        assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in shapes
        assert "model.diffusion_model.output_blocks.2.1.conv.weight" in shapes
        assert "model.diffusion_model.middle_block.1.proj_in.weight" in shapes
        assert "first_stage_model.decoder.mid.attn_1.q.weight" in shapes


# ------------------------------------------------------------------------------------------------ other sources


def test_diffusers_folder(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir, device="cpu")
    assert pipe.kind == "sd1" and pipe.source == str(tiny_sd_dir)
    assert pipe.vae_scale_factor == 2 and pipe.default_size == 32 and pipe.unet_scale_factor == 2
    assert pipe.prediction_type == "epsilon" and pipe.is_sdxl is False
    assert pipe.scheduler.config.timestep_spacing == "leading"
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())


def test_from_diffusers_properties(tiny_sdxl):
    pipe = Pipeline.from_diffusers(tiny_sdxl)
    assert pipe.kind == "sdxl" and pipe.is_sdxl and pipe.default_size == 32
    with pytest.raises(ValueError, match="kind"):
        Pipeline(unet=None, vae=None, text_encoder=None, tokenizer=None, scheduler=None, kind="sd3", source="")


def test_pipeline_to_keeps_an_upcast_vae_in_float32(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir, device="cpu")
    pipe.to(dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.unet.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    pipe.to(dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32  # force_upcast VAE


def test_toy_source_missing_weights_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "TOY_MODEL_DIR", tmp_path / "model")
    with pytest.raises(FileNotFoundError, match=r"toy model weights are missing.*python -m redifine_core\.toy\.train"):
        load_pipeline("toy")


def test_toy_source_loads_through_the_diffusers_path(monkeypatch, tiny_sd_dir):
    monkeypatch.setattr(models, "TOY_MODEL_DIR", Path(tiny_sd_dir))
    pipe = load_pipeline("toy", device="cpu")
    assert pipe.kind == "toy" and pipe.source == "toy"


# ------------------------------------------------------------------------------------------------------ bad input


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "nope.safetensors")
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match=r"model\.ckpt.*pickle"):
        load_pipeline(pickle_file)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match=r"garbage\.safetensors is not a readable safetensors file"):
        load_pipeline(garbage)
    empty_dir = tmp_path / "folder"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(empty_dir)
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline(garbage, dtype=torch.int8)


def test_truncated_and_unknown_files(sd1_file, tmp_path):
    path, config = sd1_file
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.safetensors"):
        load_pipeline(truncated, config_dir=config)
    other = _save({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 2)}, tmp_path / "flux.safetensors")
    with pytest.raises(ValueError, match=r"unknown checkpoint layout"):
        load_pipeline(other)
    assert checkpoint_shapes(other) == {"double_blocks.0.img_attn.qkv.weight": (3, 2)}


def test_diffusers_folder_of_another_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline.*StableDiffusionPipeline"):
        load_pipeline(tmp_path)


@pytest.mark.skipif(not (models.TOY_MODEL_DIR / "model_index.json").is_file(), reason="toy weights not built")
def test_bundled_toy_model_loads_and_samples():
    from redifine_core.sampling import generate

    pipe = load_pipeline("toy", device="cpu")
    assert pipe.kind == "toy" and pipe.default_size == 32 and not pipe.is_sdxl
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    images = generate(pipe, "a red circle on a blue background", 5.0, steps=2, seeds=0)
    assert tuple(images.shape) == (1, 32, 32, 3) and 0.0 <= float(images.min()) <= float(images.max()) <= 1.0


# ------------------------------------------------------------------------------------------- precision and devices


def _fake_cuda(monkeypatch, count: int = 1, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_resolve_dtype_auto_is_fp16_on_cuda_and_fp32_elsewhere(monkeypatch):
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype(None, "cpu") == torch.float32
    assert models.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert models.resolve_dtype(" FP32 ", "cpu") == torch.float32
    assert models.resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    _fake_cuda(monkeypatch)
    assert models.resolve_dtype("auto", "cuda") == torch.float16
    assert models.resolve_dtype("auto", "cuda:0") == torch.float16
    assert models.resolve_dtype("bf16", "cuda") == torch.bfloat16
    assert models.resolve_dtype(None, None) == torch.float16  # default device is the GPU here


def test_resolve_dtype_refuses_what_the_device_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match=r"precision='fp16' on device 'cpu'.*3000x slower.*'bf16' or 'fp32'"):
        models.resolve_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="3000x"):
        models.resolve_dtype(torch.float16, "cpu")
    for bad in ("fp8", "half-ish", torch.int8, torch.float8_e4m3fn, 16):
        with pytest.raises(ValueError, match=r"precision=.*is not one of \('auto', 'fp32', 'fp16', 'bf16'\)"):
            models.resolve_dtype(bad, "cpu")
    _fake_cuda(monkeypatch, bf16=False)
    with pytest.raises(ValueError, match=r"precision='bf16' on device 'cuda'.*no bf16 support.*'fp16'"):
        models.resolve_dtype("bf16", "cuda")
    assert models.resolve_dtype("fp16", "cuda") == torch.float16


def test_resolve_device_says_what_to_do(monkeypatch):
    assert models.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='gpu0' is not a device; expected 'auto', 'cpu', 'cuda'"):
        models.resolve_device("gpu0")
    _fake_cuda(monkeypatch, count=0)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError, match=r"device='cuda' but this torch was built without CUDA; use device='cpu'"):
        models.resolve_device("cuda")
    assert models.resolve_device(None) == torch.device("cpu") and models.resolve_device("auto") == torch.device("cpu")
    _fake_cuda(monkeypatch, count=2)
    assert models.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"device='cuda:3' but 2 CUDA device\(s\) are visible; use cuda:0 to cuda:1"):
        models.resolve_device("cuda:3")
    with pytest.raises(ValueError, match="device='xpu'"):
        monkeypatch.setattr(torch, "xpu", None, raising=False)
        models.resolve_device("xpu")


def test_load_pipeline_checks_device_and_precision_before_reading(sd1_file, monkeypatch):
    path, config = sd1_file
    read = []
    monkeypatch.setattr(models, "single_file_components", lambda *a, **k: read.append(a))
    with pytest.raises(ValueError, match="3000x"):
        load_pipeline(path, device="cpu", dtype="fp16", config_dir=config)
    with pytest.raises(ValueError, match="device='cuda'"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        load_pipeline(path, device="cuda", config_dir=config)
    with pytest.raises(ValueError, match="device='cuda'"):
        load_pipeline(path / "missing.safetensors", device="cuda")  # before the file is even looked for
    assert read == []


def test_single_file_in_bf16_by_name(tiny_sd, sd1_file):
    path, config = sd1_file
    pipe = load_pipeline(path, device="cpu", dtype="bf16", config_dir=config)
    assert pipe.dtype == torch.bfloat16 and pipe.device == torch.device("cpu")
    assert {p.dtype for m in pipe.modules() for p in m.parameters()} == {torch.bfloat16}
    ref = tiny_sd.unet.state_dict()
    assert all(torch.equal(v, ref[k].bfloat16()) for k, v in pipe.unet.state_dict().items())


def test_diffusers_folder_loads_straight_into_the_dtype(tiny_sd, tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir, device="cpu", dtype="bf16")
    assert {p.dtype for m in pipe.modules() for p in m.parameters()} == {torch.bfloat16}
    half = models._load_diffusers_folder(Path(tiny_sd_dir), None, "", torch.float16)  # fp16 is for GPUs; no compute
    assert half.unet.dtype == torch.float16 and half.text_encoder.dtype == torch.float16
    ref = tiny_sd.vae.state_dict()
    # the force_upcast VAE is read in float32, not rounded through fp16 and upcast
    assert half.vae.dtype == torch.float32 and all(torch.equal(v, ref[k]) for k, v in half.vae.state_dict().items())


def test_toy_bed_source_names_its_own_folder(monkeypatch, tmp_path, tiny_sd_dir):
    monkeypatch.setitem(models.TOY_MODELS, "toy:bed", tmp_path / "model_bed")
    with pytest.raises(FileNotFoundError, match=r"python -m redifine_core\.toy\.train --arch bed"):
        load_pipeline("toy:bed")
    monkeypatch.setitem(models.TOY_MODELS, "toy:bed", Path(tiny_sd_dir))
    pipe = load_pipeline("toy:bed", device="cpu")
    assert pipe.kind == "toy" and pipe.source == "toy:bed"
