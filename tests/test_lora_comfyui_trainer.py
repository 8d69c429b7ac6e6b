"""Files written by ComfyUI's own Train LoRA node (comfy_extras/nodes_train.py, ComfyUI 0.3.64), rebuilt here with
torch from its code: every key maps, the LoRA part is what was written and keeps training, the diff/diff_b entries
act as fixed deltas while applied (and are gone after), and our kohya file carries them on."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sd_single_file import unet_to_original
from test_lora_thirdparty import meta_pipeline, sd, sdxl  # noqa: F401 (the tiny pipelines' fixtures)

from redifine_core.data import CaptionedImages
from redifine_core.lora import LoraWeights, check_lora_fits, load_lora, lora_applied, save_lora
from redifine_core.training import LoraTrainer, TrainConfig

RANK = 4
_WEIGHTED = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)  # ComfyUI's weight_function ops


def ldm_params(unet) -> dict[str, str]:
    """diffusers UNet parameter path -> LDM parameter path (our diffusers->original converter, fed the names as
    values so that it also works on a meta-device UNet)."""
    fake = SimpleNamespace(state_dict=lambda: {k: k for k in unet.state_dict()}, config=unet.config,
                           up_blocks=unet.up_blocks)
    return {v: k[len("model.diffusion_model."):] for k, v in unet_to_original(fake).items()}


def comfyui_trainer_state(unet, rank: int = RANK, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                          scale: float = 0.1) -> dict[str, torch.Tensor]:
    """What TrainLoraNode saves for ``unet`` after training: for each module with a weight (Linear, Conv2d,
    GroupNorm, LayerNorm), a weight of >= 2 dims gets LoraDiff's lora_up (out, rank), lora_down (rank, in*kh*kw) and
    alpha (1.0, as create_train sets it), a smaller one a ``diff`` of its shape; every bias a ``diff_b``. All under
    ``diffusion_model.<LDM module>``, cast to lora_dtype (bf16 by default)."""
    names = ldm_params(unet)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for path, m in unet.named_modules():
        if not isinstance(m, _WEIGHTED):
            continue
        key = "diffusion_model." + names[f"{path}.weight"][: -len(".weight")]
        shape = tuple(m.weight.shape)
        if len(shape) >= 2:
            fan_in = int(torch.Size(shape[1:]).numel())
            out[f"{key}.lora_up.weight"] = torch.randn(shape[0], rank, generator=g) * scale
            out[f"{key}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g) * scale / fan_in ** 0.5 * 4
            out[f"{key}.alpha"] = torch.tensor(1.0)
        else:
            out[f"{key}.diff"] = torch.randn(shape, generator=g) * scale
        if m.bias is not None:
            out[f"{key}.diff_b"] = torch.randn(tuple(m.bias.shape), generator=g) * scale
    return {k: v.to(dtype) for k, v in out.items()}


def write(path, state) -> str:
    save_file(state, str(path))  # SaveLoRA: safetensors.torch.save_file(lora, path), no metadata
    return path


def comfyui_merged(unet, state, strength: float = 1.0):
    """A copy of ``unet`` with the file applied the way ComfyUI's LoraLoader does: W += strength * alpha/rank *
    (up @ down).reshape(W.shape); diff / diff_b added to the weight / bias."""
    names = {v: k for k, v in ldm_params(unet).items()}
    merged = copy.deepcopy(unet)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for key, t in state.items():
            module, _, suffix = key[len("diffusion_model."):].rpartition(".")
            if key.endswith(".lora_up.weight"):
                module = key[len("diffusion_model."):-len(".lora_up.weight")]
                w = params[names[f"{module}.weight"]]
                down = state[f"diffusion_model.{module}.lora_down.weight"].float()
                alpha = float(state[f"diffusion_model.{module}.alpha"])
                w += strength * alpha / t.shape[1] * (t.float() @ down).reshape(w.shape)
            elif suffix in ("diff", "diff_b"):
                param = params[names[f"{module}.{'weight' if suffix == 'diff' else 'bias'}"]]
                param += strength * t.float()
    return merged


def probe(unet, sdxl: bool = False) -> torch.Tensor:
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, cfg.in_channels, 16, 16, generator=g), torch.tensor([10, 700])
    emb = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    kw = {}
    if sdxl:
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                   "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2)}
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=emb, **kw).sample


# ----------------------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_every_key_maps_and_the_lora_part_is_what_was_written(sd, sdxl, tmp_path, model, caplog):
    p = sd if model == "sd" else sdxl
    state = comfyui_trainer_state(p.unet, seed=1)
    path = write(tmp_path / "ComfyUI_trained_lora_10_steps_00001_.safetensors", state)
    with caplog.at_level(logging.WARNING, logger="redifine_core.lora"):
        loaded = load_lora(path, pipeline=p)
    n_deltas = sum(k.endswith((".diff", ".diff_b")) for k in state)
    n_modules = sum(k.endswith(".lora_up.weight") for k in state)
    # 0 dropped: every module with a LoRA and every diff/diff_b is in the LoraWeights
    assert len(loaded.modules("unet")) == n_modules and len(loaded.fixed_deltas) == n_deltas
    assert not loaded.text_encoder and not loaded.text_encoder_2
    assert (loaded.rank, loaded.alpha) == (RANK, 1.0)
    names = ldm_params(p.unet)
    for path_, m in p.unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            key = "diffusion_model." + names[f"{path_}.weight"][: -len(".weight")]
            A, B = loaded.unet[f"{path_}.lora_A.weight"], loaded.unet[f"{path_}.lora_B.weight"]
            assert A.dim() == m.weight.dim() == B.dim(), path_  # peft shapes: conv factors are 4-d
            assert torch.equal(A.flatten(1), state[f"{key}.lora_down.weight"])
            assert torch.equal(B.flatten(1), state[f"{key}.lora_up.weight"])
        if isinstance(m, _WEIGHTED) and m.bias is not None:
            assert torch.equal(loaded.fixed_deltas[f"{path_}.bias"], state[f"{key_of(names, path_)}.diff_b"])
    lines = [r.getMessage() for r in caplog.records if "fixed deltas" in r.getMessage()]
    assert lines == [f"{path.name}: {n_deltas} full-weight differences "
                     f"({sum(k.endswith('.diff') for k in state)} weights, "
                     f"{sum(k.endswith('.diff_b') for k in state)} biases) are applied as fixed deltas and not trained"]


def key_of(names: dict[str, str], module: str) -> str:
    return "diffusion_model." + names[f"{module}.weight"][: -len(".weight")]


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_without_a_pipeline_reads_the_same(sd, sdxl, tmp_path, model):
    """layers_per_block (1 here, 2 in released models) is read from the names, conv kernels from the UNet layout."""
    p = sd if model == "sd" else sdxl
    path = write(tmp_path / "c.safetensors", comfyui_trainer_state(p.unet, seed=2))
    a, b = load_lora(path), load_lora(path, pipeline=p)
    assert a.unet.keys() == b.unet.keys() and a.fixed_deltas.keys() == b.fixed_deltas.keys()
    assert all(a.unet[k].shape == b.unet[k].shape and torch.equal(a.unet[k], b.unet[k]) for k in a.unet)
    check_lora_fits(a, p)


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_applied_like_comfyui_and_restored_after(sd, sdxl, tmp_path, model):
    """Inside lora_applied the UNet computes what ComfyUI's LoraLoader computes from this file (LoRA + deltas); the
    deltas alone move the output; afterwards every parameter is its original tensor again."""
    p = sd if model == "sd" else sdxl
    xl = model == "sdxl"
    state = comfyui_trainer_state(p.unet, seed=3)
    loaded = load_lora(write(tmp_path / "c.safetensors", state), pipeline=p)
    base = probe(p.unet, xl)
    before = {k: (v, v.data_ptr()) for k, v in p.unet.state_dict().items()}
    full = None
    for strength in (1.0, 0.5):
        want = probe(comfyui_merged(p.unet, {k: v.float() for k, v in state.items()}, strength), xl)
        with lora_applied(p, loaded, scale=strength):
            got = probe(p.unet, xl)
        assert (want - base).abs().max() > 1e-2
        assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max())), float((got - want).abs().max())
        full = got if full is None else full
    no_deltas = LoraWeights(unet=loaded.unet, rank=loaded.rank, alpha=loaded.alpha)
    with lora_applied(p, no_deltas):
        lora_only = probe(p.unet, xl)
    assert (lora_only - full).abs().max() > 1e-2  # the deltas change the output
    assert torch.equal(probe(p.unet, xl), base)
    after = p.unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) and after[k].data_ptr() == ptr for k, (v, ptr) in before.items())


def test_full_weight_diff_on_a_matrix_is_a_fixed_delta(sd, tmp_path):
    """A ``diff`` on a Linear weight (a full-matrix difference, as other ComfyUI tools write) is applied the same way."""
    state = comfyui_trainer_state(sd.unet, seed=4)
    key = key_of(ldm_params(sd.unet), "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    up, down = state.pop(f"{key}.lora_up.weight"), state.pop(f"{key}.lora_down.weight")
    state.pop(f"{key}.alpha")
    state[f"{key}.diff"] = (up.float() @ down.float() * 0.25).to(torch.bfloat16)
    loaded = load_lora(write(tmp_path / "d.safetensors", state), pipeline=sd)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(loaded.fixed_deltas[name], state[f"{key}.diff"])
    want = probe(comfyui_merged(sd.unet, {k: v.float() for k, v in state.items()}))
    with lora_applied(sd, loaded):
        assert (probe(sd.unet) - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))


# -------------------------------------------------------------------------------------------------- real-size files


@pytest.mark.parametrize("kind,keys,deltas", [("sd1", 1250, 404), ("sdxl", 3268, 886)])
def test_real_size_files_map_every_key_without_a_pipeline(kind, keys, deltas, tmp_path):
    """The node's key counts on the real SD1.5 / SDXL UNets (counted from ComfyUI 0.3.64's own modules:
    tests/comfyui/test_comfyui_lora_files.py checks the key sets) all map, read without a pipeline (the
    layers_per_block 2 and the SD1.x conv / SDXL linear transformer projections are read from the names)."""
    p = meta_pipeline(kind)
    state = comfyui_trainer_state(p.unet, rank=1)
    assert (len(state), sum(k.endswith((".diff", ".diff_b")) for k in state)) == (keys, deltas)
    loaded = load_lora(write(tmp_path / f"{kind}.safetensors", state))
    check_lora_fits(loaded, p)
    assert len(loaded.modules("unet")) * 3 + len(loaded.fixed_deltas) == keys


# ------------------------------------------------------------------------------------------ our files, training


def test_our_kohya_file_carries_the_deltas(sd, tmp_path):
    loaded = load_lora(write(tmp_path / "c.safetensors", comfyui_trainer_state(sd.unet, seed=5)), pipeline=sd)
    path = save_lora(loaded, tmp_path / "ours.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
    assert all(k.startswith("lora_unet_") for k in keys)
    assert sum(k.endswith((".diff", ".diff_b")) for k in keys) == len(loaded.fixed_deltas)
    back = load_lora(path)
    assert back.unet.keys() == loaded.unet.keys() and back.fixed_deltas.keys() == loaded.fixed_deltas.keys()
    assert all(torch.equal(back.fixed_deltas[k], v) for k, v in loaded.fixed_deltas.items())
    with lora_applied(sd, loaded):
        want = probe(sd.unet)
    with lora_applied(sd, back):
        assert (probe(sd.unet) - want).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="only the kohya layout can hold"):
        save_lora(loaded, tmp_path / "d.safetensors", layout="diffusers")


def test_training_continues_the_lora_with_the_deltas_applied(sd, tmp_path):
    """init_lora from a ComfyUI file: every one of its modules trains (also those outside the config's targets),
    the deltas stay applied and frozen, the trained LoRA carries them, and the pipeline is restored after."""
    loaded = load_lora(write(tmp_path / "c.safetensors", comfyui_trainer_state(sd.unet, seed=6)), pipeline=sd)
    with lora_applied(sd, loaded):
        applied = probe(sd.unet)
    base = probe(sd.unet)
    g = torch.Generator().manual_seed(0)
    ds = CaptionedImages.from_images(torch.rand(2, 32, 32, 3, generator=g), ["a red circle", "a cat"])
    cfg = TrainConfig(steps=1, batch_size=2, rank=RANK, alpha=1.0, learning_rate=1e-2, target=("attention",))
    with torch.enable_grad(), LoraTrainer(sd, ds, cfg, init_lora=loaded) as tr:
        assert (probe(sd.unet) - applied).abs().max() <= 1e-5  # the trainer starts from the LoRA and the deltas
        norm = sd.unet.down_blocks[0].resnets[0].norm1.weight
        assert not norm.requires_grad
        tr.step()
        trained = tr.lora_weights()
    assert torch.equal(probe(sd.unet), base)
    assert trained.unet.keys() == loaded.unet.keys()
    moved = {k.rsplit(".lora_", 1)[0] for k in trained.unet if not torch.equal(trained.unet[k].float(),
                                                                               loaded.unet[k].float())}
    assert {"conv_in", "time_embedding.linear_1", "down_blocks.0.resnets.0.conv1"} <= moved  # not in "attention"
    assert trained.fixed_deltas.keys() == loaded.fixed_deltas.keys()
    assert all(torch.equal(trained.fixed_deltas[k], v) for k, v in loaded.fixed_deltas.items())


# -------------------------------------------------------------------------------------------------- what we refuse


@pytest.mark.parametrize("algorithm,names", [("LoHa", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")),
                                             ("LoKr", ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha")),
                                             ("OFT", ("oft_blocks", "rescale", "alpha"))])
def test_other_trainer_algorithms_are_refused_by_name(sd, tmp_path, algorithm, names):
    """The same node with algorithm LoHa / LoKr / OFT: one line naming the type (norms and biases still diff)."""
    state = {k: v for k, v in comfyui_trainer_state(sd.unet, seed=7).items() if not k.endswith((".lora_up.weight",
                                                                                                ".lora_down.weight",
                                                                                                ".alpha"))}
    key = key_of(ldm_params(sd.unet), "conv_in")
    state.update({f"{key}.{n}": torch.zeros(2, 2) for n in names})
    with pytest.raises(ValueError, match=rf"c\.safetensors' is a {algorithm} network, not a plain LoRA"):
        load_lora(write(tmp_path / "c.safetensors", state))


def test_keys_that_name_no_unet_module_are_refused(sd, tmp_path):
    state = comfyui_trainer_state(sd.unet, seed=8)
    bad = dict(state, **{"diffusion_model.no_such_layer.diff_b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"1 of its \d+ modules name no module of an SD1\.x/SD2\.x/SDXL UNet"):
        load_lora(write(tmp_path / "c.safetensors", bad))
    bad = dict(state, **{"diffusion_model.input_blocks.1.1.no_such_layer.diff_b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"1 of its \d+ fixed deltas do not fit this UNet"):
        load_lora(write(tmp_path / "c.safetensors", bad), pipeline=sd)
    with pytest.raises(ValueError, match=r"1 of its \d+ fixed deltas do not fit this UNet"):
        with lora_applied(sd, load_lora(tmp_path / "c.safetensors")):  # read without a pipeline: refused when applied
            pass
