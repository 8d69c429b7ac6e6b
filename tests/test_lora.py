"""LoRA files: exact round trips in both layouts (alpha != rank), diffusers and ComfyUI read our kohya files."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from redifine_core.data import CaptionedImages
from redifine_core.lora import LoraWeights, load_lora, lora_applied, save_lora
from redifine_core.models import Pipeline
from redifine_core.training import LoraTrainer, TrainConfig


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return Pipeline.from_diffusers(tiny_sd)


def _probe_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)


def _unet_out(pipeline):
    x, t, emb = _probe_inputs()
    with torch.no_grad():
        return pipeline.unet(x, t, encoder_hidden_states=emb).sample


def _text_out(pipeline):
    ids = pipeline.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipeline.text_encoder(ids)[0]


@pytest.fixture(scope="module")
def trained(pipe):
    """A LoRA (rank 2, alpha 5: alpha != rank) on attention + resnet + text encoder, and the trained model's outputs."""
    g = torch.Generator().manual_seed(3)
    ds = CaptionedImages.from_images(torch.rand(4, 32, 32, 3, generator=g), ["a red circle", "a cat", "a dog", "a tree"])
    base_unet, base_text = _unet_out(pipe), _text_out(pipe)
    cfg = TrainConfig(steps=3, batch_size=2, rank=2, alpha=5.0, learning_rate=2e-2, cond_drop=0.25,
                      target=("attention", "resnet", "text_encoder"))
    with torch.enable_grad(), LoraTrainer(pipe, ds, cfg) as tr:
        for _ in range(cfg.steps):
            tr.step()
        lora = tr.lora_weights(metadata={"redifine_cfg_schedule": "linear(7.5, 1.0)"})
        trained_unet, trained_text = _unet_out(pipe), _text_out(pipe)
    assert (trained_unet - base_unet).abs().max() > 1e-3  # the LoRA really changes the outputs
    assert (trained_text - base_text).abs().max() > 1e-4
    assert torch.equal(_unet_out(pipe), base_unet)  # and the trainer removed it
    return lora, trained_unet, trained_text, base_unet


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_round_trip_reproduces_the_trained_model(pipe, trained, tmp_path, layout):
    lora, trained_unet, trained_text, base_unet = trained
    path = save_lora(lora, tmp_path / f"l_{layout}.safetensors", layout=layout)
    back = load_lora(path)
    assert back.rank == 2 and back.alpha == 5.0
    assert back.target_modules == lora.target_modules
    assert back.unet.keys() == lora.unet.keys() and back.text_encoder.keys() == lora.text_encoder.keys()
    assert all(torch.equal(back.unet[k], lora.unet[k]) for k in lora.unet)
    with lora_applied(pipe, back):
        assert (_unet_out(pipe) - trained_unet).abs().max() <= 1e-5
        assert (_text_out(pipe) - trained_text).abs().max() <= 1e-5
    assert torch.equal(_unet_out(pipe), base_unet)
    assert not hasattr(pipe.unet, "peft_config") and not hasattr(pipe.text_encoder, "peft_config")


def test_kohya_keys_and_alpha_tensors(trained, tmp_path):
    lora = trained[0]
    path = save_lora(lora, tmp_path / "k.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        alphas = {k: fh.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert len(alphas) == lora.num_modules() and set(alphas.values()) == {5.0}  # lora_alpha, not rank
    assert len(keys) == 3 * lora.num_modules()


def test_metadata_round_trip(trained, tmp_path):
    lora = trained[0]
    for layout in ("kohya", "diffusers"):
        back = load_lora(save_lora(lora, tmp_path / f"m_{layout}.safetensors", layout=layout))
        assert back.metadata == lora.metadata
    md = lora.metadata
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "2"
    assert md["ss_network_alpha"] == "5.0" and md["ss_caption_dropout_rate"] == "0.25"
    assert md["ss_max_train_steps"] == "3" and md["ss_learning_rate"] == "0.02"
    assert md["redifine_cfg_schedule"] == "linear(7.5, 1.0)"
    assert json.loads(md["redifine_train_config"])["rank"] == 2
    assert all(isinstance(v, str) for v in md.values())


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_diffusers_load_lora_weights_reads_our_file(pipe, trained, tmp_path, layout):
    """diffusers' own loader applies our file at the same scale (its kohya converter folds alpha/rank into the
    weights, a reordering of float products, hence the 1e-5 tolerance)."""
    lora, trained_unet, trained_text, base_unet = trained
    unet_only = LoraWeights(unet=lora.unet, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules,
                            metadata=lora.metadata)
    path = save_lora(unet_only, tmp_path / f"d_{layout}.safetensors", layout=layout)
    dpipe = pipe.to_diffusers()
    dpipe.load_lora_weights(str(path))
    try:
        assert (_unet_out(pipe) - trained_unet).abs().max() <= 1e-5
    finally:
        dpipe.unload_lora_weights()
    assert torch.equal(_unet_out(pipe), base_unet)


def test_scale_is_linear_in_each_lora_layer(pipe, trained):
    lora = trained[0]
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    x = torch.randn(1, 5, layer.to_q.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = layer.to_q(x)
        outs = {}
        for s in (1.0, 0.5):
            with lora_applied(pipe, lora, scale=s):
                outs[s] = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q(x)
    assert (outs[1.0] - base).abs().max() > 1e-4
    assert torch.allclose(outs[0.5] - base, 0.5 * (outs[1.0] - base), atol=1e-6)
    with lora_applied(pipe, lora, scale=0.0):
        assert torch.equal(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q(x), base)
    with lora_applied(pipe, None):
        pass
    with pytest.raises(ValueError, match="finite"):
        with lora_applied(pipe, lora, scale=float("nan")):
            pass


def test_lora_applied_removes_adapter_on_error(pipe, trained):
    lora, _, _, base_unet = trained
    with pytest.raises(RuntimeError, match="inside"):
        with lora_applied(pipe, lora):
            raise RuntimeError("inside")
    assert torch.equal(_unet_out(pipe), base_unet)
    bad = LoraWeights(unet={"no.such.module.lora_A.weight": torch.zeros(2, 4),
                            "no.such.module.lora_B.weight": torch.zeros(4, 2)}, rank=2, alpha=2.0)
    with pytest.raises(Exception):
        with lora_applied(pipe, bad):
            pass
    assert torch.equal(_unet_out(pipe), base_unet) and not hasattr(pipe.unet, "peft_config")


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_kohya_names_read_back_for_every_unet_and_clip_module(pipe, tiny_sdxl, tmp_path, model):
    """Every Linear/Conv2d of the UNet and the text encoders, written in our kohya layout, reads back to its own
    module path (through diffusers' converter), with its tensors untouched."""
    p = pipe if model == "sd" else Pipeline.from_diffusers(tiny_sdxl)
    g = torch.Generator().manual_seed(1)

    def lora_for(m):
        a_shape = (2, m.in_features) if isinstance(m, torch.nn.Linear) else (2, m.in_channels, *m.kernel_size)
        b_shape = (m.out_features, 2) if isinstance(m, torch.nn.Linear) else (m.out_channels, 2, 1, 1)
        return torch.randn(a_shape, generator=g), torch.randn(b_shape, generator=g)

    parts = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        model_ = getattr(p, part, None)
        if model_ is None:
            continue
        prefix = "" if part == "unet" or hasattr(model_, "text_model") else "text_model."
        sd = {}
        for n, m in model_.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                a, b = lora_for(m)
                sd[f"{prefix}{n}.lora_A.weight"], sd[f"{prefix}{n}.lora_B.weight"] = a, b
        parts[part] = sd
    lora = LoraWeights(rank=2, alpha=3.0, **parts)
    assert lora.num_modules() > (140 if model == "sdxl" else 90)
    back = load_lora(save_lora(lora, tmp_path / "all.safetensors"), pipeline=p)
    for part, sd in parts.items():
        got = getattr(back, part)
        assert got.keys() == sd.keys(), sorted(set(sd) ^ set(got))[:5]
        assert all(torch.equal(got[k], v) for k, v in sd.items())
    assert back.rank == 2 and back.alpha == 3.0


def test_foreign_kohya_files_alpha_conventions(pipe, tmp_path):
    """No .alpha = factor 1 (alpha = rank, as ComfyUI/kohya apply it); differing alphas are folded into B."""
    g = torch.Generator().manual_seed(0)
    d = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_"
    down, up = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    save_file({d + "to_q.lora_down.weight": down, d + "to_q.lora_up.weight": up}, str(tmp_path / "a.safetensors"))
    a = load_lora(tmp_path / "a.safetensors")
    assert a.rank == 4 and a.alpha == 4.0 and a.target_modules == ("to_q",)
    tensors = {}
    for proj, alpha in (("to_q", 2.0), ("to_k", 2.0), ("to_v", 8.0)):
        tensors.update({d + proj + ".lora_down.weight": down.clone(), d + proj + ".lora_up.weight": up.clone(),
                        d + proj + ".alpha": torch.tensor(alpha)})
    save_file(tensors, str(tmp_path / "b.safetensors"))
    b = load_lora(tmp_path / "b.safetensors")
    p = "down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    assert b.alpha == 2.0
    # effective delta of to_v = (8/4) B A must survive: B is scaled by 8/2
    assert torch.allclose(b.scale * b.unet[p + "to_v.lora_B.weight"] @ b.unet[p + "to_v.lora_A.weight"],
                          (8.0 / 4) * up @ down, atol=1e-5)
    assert torch.equal(b.unet[p + "to_q.lora_B.weight"], up)
    save_file({d + "to_q.lora_down.weight": down}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match="lacks its B"):
        load_lora(tmp_path / "c.safetensors")
    save_file({"model.weird.key": down}, str(tmp_path / "e.safetensors"))
    with pytest.raises(ValueError, match="no known layout"):
        load_lora(tmp_path / "e.safetensors")


# ---------------------------------------------------------------------------------------------------- ComfyUI


def _comfy_python() -> tuple[Path, Path] | None:
    root = Path(os.environ.get("COMFYUI_ROOT", "~/ComfyUI")).expanduser()
    py = Path(os.environ["COMFYUI_PYTHON"]) if os.environ.get("COMFYUI_PYTHON") else root / "venv" / "bin" / "python"
    if (root / "comfy" / "lora.py").is_file() and py.exists():
        return root, py
    return None


def _sd15_lora(rank: int = 4, alpha: float = 8.0) -> LoraWeights:
    """Small random LoRA tensors on every real SD1.5 attention module (diffusers paths from a meta-device UNet)
    and on the 12 CLIP-L layers' attention projections."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for name, m in unet.named_modules():
        if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
            sd[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.01
            sd[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
    te: dict[str, torch.Tensor] = {}
    for layer in range(12):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            key = f"text_model.encoder.layers.{layer}.self_attn.{proj}"
            te[f"{key}.lora_A.weight"] = torch.randn(rank, 768, generator=g) * 0.01
            te[f"{key}.lora_B.weight"] = torch.randn(768, rank, generator=g) * 0.01
    shapes = {k: list(v.shape) for k, v in unet.state_dict().items()}
    return LoraWeights(unet=sd, text_encoder=te, rank=rank, alpha=alpha), shapes


_COMFY_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    import torch
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.lora, comfy.model_detection, comfy.utils

    lora_path, shapes_path = sys.argv_in
    shapes = json.load(open(shapes_path))
    diffusers_sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    unet_config = comfy.model_detection.unet_config_from_diffusers_unet(diffusers_sd)
    assert unet_config is not None and unet_config["context_dim"] == 768, unet_config

    class ModelConfig:
        pass

    class FakeUnet:  # model_lora_keys_unet only needs .state_dict() and .model_config.unet_config
        def __init__(self):
            self.model_config = ModelConfig()
            self.model_config.unet_config = unet_config
            ldm = comfy.utils.unet_to_diffusers(unet_config)
            self.keys = {"diffusion_model." + v: None for v in ldm.values()}
        def state_dict(self):
            return self.keys

    class FakeClip:
        def state_dict(self):
            return {f"clip_l.transformer.text_model.encoder.layers.{b}.self_attn.{p}.weight": None
                    for b in range(12) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}

    key_map = comfy.lora.model_lora_keys_unet(FakeUnet(), {})
    key_map = comfy.lora.model_lora_keys_clip(FakeClip(), key_map)
    records = []
    class Grab(logging.Handler):
        def emit(self, r):
            records.append(r.getMessage())
    logging.getLogger().addHandler(Grab())
    logging.getLogger().setLevel(logging.WARNING)
    sd = comfy.utils.load_torch_file(lora_path, safe_load=True)
    patches = comfy.lora.load_lora(sd, key_map)
    alphas = sorted({None if p.weights[2] is None else float(p.weights[2]) for p in patches.values()}, key=str)
    print(json.dumps({"patches": len(patches), "not_loaded": [m for m in records if "lora key not loaded" in m],
                      "alphas": alphas, "targets": sorted(str(k) for k in patches)[:3]}))
    """
)


@pytest.mark.comfyui
def test_comfyui_loads_every_key_of_our_kohya_file(tmp_path):
    found = _comfy_python()
    if found is None:
        pytest.skip("no ComfyUI checkout with a python at COMFYUI_ROOT (default ~/ComfyUI) or COMFYUI_PYTHON")
    root, py = found
    lora, shapes = _sd15_lora()
    assert len(lora.modules("unet")) == 128
    path = save_lora(lora, tmp_path / "sd15.safetensors")
    (tmp_path / "shapes.json").write_text(json.dumps(shapes))
    script = tmp_path / "check.py"
    script.write_text("import sys\nsys.argv_in = sys.argv[1:]\n" + _COMFY_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(py), str(script), str(path), str(tmp_path / "shapes.json")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["not_loaded"] == []
    assert result["patches"] == 128 + 48  # one patch per trained module
    assert result["alphas"] == [8.0]  # ComfyUI scales by alpha / rank = lora_alpha / r, as peft did


def test_sdxl_round_trip_with_both_text_encoders(tiny_sdxl, tmp_path):
    p = Pipeline.from_diffusers(tiny_sdxl)
    g = torch.Generator().manual_seed(5)
    ds = CaptionedImages.from_images(torch.rand(2, 32, 32, 3, generator=g), ["a red circle", "a cat"])
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([300])
    emb, pooled = torch.randn(1, 77, 64, generator=g), torch.randn(1, 32, generator=g)
    ids = torch.tensor([[8.0, 8.0, 0.0, 0.0, 32.0, 32.0]])
    tok = p.tokenizer_2(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def outs():
        with torch.no_grad():
            u = p.unet(x, t, encoder_hidden_states=emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
            return u, p.text_encoder_2(tok)[0]

    base = outs()
    cfg = TrainConfig(steps=2, batch_size=2, rank=2, alpha=3.0, learning_rate=2e-2, target=("attention", "text_encoder"))
    with torch.enable_grad(), LoraTrainer(p, ds, cfg) as tr:
        for _ in range(2):
            tr.step()
        lora = tr.lora_weights()
        trained = outs()
    assert (trained[1] - base[1]).abs().max() > 1e-5
    path = save_lora(lora, tmp_path / "xl.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        prefixes = {k.split("_text_model")[0] for k in fh.keys() if k.startswith("lora_te")}
    assert prefixes == {"lora_te1", "lora_te2"}
    back = load_lora(path)
    assert back.text_encoder.keys() == lora.text_encoder.keys()
    assert back.text_encoder_2.keys() == lora.text_encoder_2.keys()
    with lora_applied(p, back):
        got = outs()
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(got, trained))
    assert all(torch.equal(a, b) for a, b in zip(outs(), base))
