"""Third-party LoRA files read by load_lora and applied through lora_applied, checked against diffusers' own
load_lora_weights on the same pipeline: kohya sd-scripts (SD1.x with diffusers names, LDM names, SDXL with LDM names
and lora_te1/lora_te2, LoCon with a conv rank and alpha of its own), diffusers files as its training scripts write them
and in the older attention-processor spelling, bare PEFT keys; a LoRA for another architecture; and the diffusers
behaviours that redifine_core.lora_convert works around (each pin fails once diffusers no longer needs it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sd_single_file import unet_to_original

from redifine_core.lora import check_lora_fits, load_lora, lora_applied
from redifine_core.models import CONFIG_ROOT, Pipeline

RANK, ALPHA = 4, 3.0  # network_dim / network_alpha (alpha != rank)
CONV_RANK, CONV_ALPHA = 2, 1.0  # conv_dim / conv_alpha of a LoCon


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return Pipeline.from_diffusers(tiny_sd)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return Pipeline.from_diffusers(tiny_sdxl)


# --------------------------------------------------------------------------------------------------------- builders


def _te_path(te, name: str) -> str:
    """The CLIP module path every LoRA tool writes (``text_model.`` level included)."""
    return name if hasattr(te, "text_model") else "text_model." + name


def sd_scripts_modules(p, conv: bool = True) -> list[tuple[str, str, torch.nn.Module]]:
    """(part, module path, module) as sd-scripts' networks/lora.py picks them: every Linear/Conv2d inside a
    Transformer2DModel and inside the text encoders' attention and MLP blocks; with ``conv_dim`` also inside
    ResnetBlock2D, Downsample2D and Upsample2D."""
    blocks = {"Transformer2DModel"} | ({"ResnetBlock2D", "Downsample2D", "Upsample2D"} if conv else set())
    out, seen = [], set()
    for name, block in p.unet.named_modules():
        if type(block).__name__ in blocks:
            for child, m in block.named_modules():
                path = f"{name}.{child}"
                if child and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and path not in seen:
                    seen.add(path)
                    out.append(("unet", path, m))
    for part in ("text_encoder", "text_encoder_2"):
        te = getattr(p, part, None)
        if te is not None:
            out += [(part, _te_path(te, n), m) for n, m in te.named_modules()
                    if isinstance(m, torch.nn.Linear) and (".self_attn." in n or ".mlp." in n)]
    return out


def _rank_alpha(m: torch.nn.Module) -> tuple[int, float]:
    conv3 = isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
    return (CONV_RANK, CONV_ALPHA) if conv3 else (RANK, ALPHA)


def random_lora(modules, seed: int = 0):
    """{(part, path): (A, B, alpha, module)} with sd-scripts' shapes (conv: A k x k, B 1 x 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for part, path, m in modules:
        r, a = _rank_alpha(m)
        if isinstance(m, torch.nn.Linear):
            A, B = torch.randn(r, m.in_features, generator=g), torch.randn(m.out_features, r, generator=g)
        else:
            A = torch.randn(r, m.in_channels, *m.kernel_size, generator=g)
            B = torch.randn(m.out_channels, r, 1, 1, generator=g)
        out[(part, path)] = (A * 0.3 / A[0].numel() ** 0.5, B * 0.3, a, m)
    return out


def ldm_names(unet) -> dict[str, str]:
    """diffusers UNet module path -> original LDM module path (through the single-file key converter, fed the
    parameter names as values so that it also works on a meta-device UNet)."""
    fake = SimpleNamespace(state_dict=lambda: {k: k for k in unet.state_dict()}, config=unet.config,
                           up_blocks=unet.up_blocks)
    by_name = {v: k for k, v in unet_to_original(fake).items()}
    return {n: by_name[f"{n}.weight"][len("model.diffusion_model."):-len(".weight")]
            for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def write_kohya(path, p, lora, ldm: bool, base_model: str, dtype: torch.dtype = torch.float32):
    """An sd-scripts file: lora_unet_<name> (LDM names for SDXL), lora_te_ (SD1) / lora_te1_ + lora_te2_ (SDXL)."""
    names = ldm_names(p.unet) if ldm else {}
    te_prefix = {"text_encoder": "lora_te1_" if p.text_encoder_2 is not None else "lora_te_",
                 "text_encoder_2": "lora_te2_"}
    tensors = {}
    for (part, mod), (A, B, alpha, _) in lora.items():
        name = ("lora_unet_" + names.get(mod, mod) if part == "unet" else te_prefix[part] + mod).replace(".", "_")
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = A.to(dtype), B.to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(RANK),
                                            "ss_network_alpha": str(ALPHA), "ss_base_model_version": base_model})
    return path


# ----------------------------------------------------------------------------------------------------------- probes


def outputs(p) -> list[torch.Tensor]:
    """The UNet's and every text encoder's output on fixed inputs."""
    cfg = p.unet.config
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, cfg.in_channels, 16, 16, generator=g), torch.tensor([10, 700])
    emb = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    kw = {}
    if p.text_encoder_2 is not None:
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                   "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2)}
    ids = p.tokenizer(["a red circle on a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        outs = [p.unet(x, t, encoder_hidden_states=emb, **kw).sample, p.text_encoder(ids)[0]]
        if p.text_encoder_2 is not None:
            outs.append(p.text_encoder_2(ids)[0])
    return outs


def diffusers_outputs(p, path, **kwargs) -> list[torch.Tensor]:
    dpipe = p.to_diffusers()
    dpipe.load_lora_weights(str(path), **kwargs)
    try:
        return outputs(p)
    finally:
        dpipe.unload_lora_weights()


def assert_matches_diffusers(p, path, lora=None, **kwargs):
    base = outputs(p)
    ref = diffusers_outputs(p, path, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(outputs(p), base))  # diffusers unloaded cleanly
    for r, b in zip(ref, base):
        assert (r - b).abs().max() > 1e-3  # the LoRA moves every output
    loaded = load_lora(path, pipeline=p)
    with lora_applied(p, loaded):
        ours = outputs(p)
    diffs = [float((o - r).abs().max()) for o, r in zip(ours, ref)]
    assert max(diffs) <= 1e-5, diffs
    assert all(torch.equal(a, b) for a, b in zip(outputs(p), base))
    return loaded


def module_delta(m, x, A, B, scale):
    if isinstance(m, torch.nn.Linear):
        return scale * (x @ A.T @ B.T)
    h = F.conv2d(x, A, stride=m.stride, padding=m.padding, dilation=m.dilation)
    return scale * F.conv2d(h, B)


# -------------------------------------------------------------------------------------------------------- kohya files


@pytest.mark.parametrize("case", ["sd1_diffusers_names_locon", "sd1_ldm_names", "sdxl_ldm_names_locon",
                                  "sdxl_ldm_names_locon_fp16"])
def test_sd_scripts_file_matches_diffusers(sd, sdxl, tmp_path, case):
    p = sdxl if case.startswith("sdxl") else sd
    ldm = "ldm" in case
    lora = random_lora(sd_scripts_modules(p, conv="locon" in case), seed=len(case))
    path = write_kohya(tmp_path / f"{case}.safetensors", p, lora, ldm, "sdxl_base_v1-0" if p is sdxl else "sd_v1",
                       torch.float16 if "fp16" in case else torch.float32)  # sd-scripts saves fp16 by default
    # diffusers maps LDM block numbers only where it is given the UNet config (its SDXL loader passes it itself)
    kwargs = {"unet_config": p.unet.config} if ldm and p is sd else {}
    loaded = assert_matches_diffusers(p, path, **kwargs)
    assert loaded.rank == RANK and loaded.alpha == ALPHA
    parts = {part for part, _ in lora}
    assert all(len(getattr(loaded, part)) == 2 * sum(1 for q, _ in lora if q == part) for part in parts)


def test_sdxl_ldm_locon_module_deltas_are_alpha_over_rank(sdxl, tmp_path):
    """Each module adds (alpha/rank) B A x with its own rank and alpha (3/4 for linear, 1/2 for 3x3 conv, 5/4 for the
    to_q layers: a minority alpha on attention, which diffusers' load_lora_weights drops, see the pin below): checked
    module by module against the formula."""
    lora = random_lora(sd_scripts_modules(sdxl), seed=7)
    lora = {k: (A, B, 5.0 if k[1].endswith(".to_q") else a, m) for k, (A, B, a, m) in lora.items()}
    path = write_kohya(tmp_path / "xl.safetensors", sdxl, lora, True, "sdxl_base_v1-0")
    loaded = load_lora(path, pipeline=sdxl)
    g = torch.Generator().manual_seed(1)
    checked = {"linear": 0, "conv3x3": 0, "to_q": 0}
    with lora_applied(sdxl, loaded):
        for (part, mod), (A, B, alpha, m) in lora.items():
            if part != "unet":
                continue
            x = (torch.randn(2, m.in_features, generator=g) if isinstance(m, torch.nn.Linear)
                 else torch.randn(1, m.in_channels, 8, 8, generator=g))
            wrapped = sdxl.unet.get_submodule(mod)
            with torch.no_grad():
                got = wrapped(x) - wrapped.base_layer(x)
                want = module_delta(m, x, A, B, alpha / A.shape[0])
            assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max())), mod
            kind = "to_q" if mod.endswith(".to_q") else "conv3x3" if A.dim() == 4 and A.shape[-1] == 3 else "linear"
            checked[kind] += 1
    assert checked["linear"] > 20 and checked["conv3x3"] > 5 and checked["to_q"] > 3, checked
    assert (loaded.rank, loaded.alpha) == (RANK, ALPHA)


def test_sd1_ldm_locon_reads_like_its_diffusers_named_twin(sd, tmp_path):
    """LDM names with conv modules (downsampler op, upsampler of the up block without attention) give the same
    LoRA as the diffusers-named file."""
    lora = random_lora(sd_scripts_modules(sd, conv=True), seed=3)
    assert any(".upsamplers." in m for _, m in lora) and any(".downsamplers." in m for _, m in lora)
    a = load_lora(write_kohya(tmp_path / "ldm.safetensors", sd, lora, True, "sd_v1"), pipeline=sd)
    b = load_lora(write_kohya(tmp_path / "dif.safetensors", sd, lora, False, "sd_v1"), pipeline=sd)
    assert a.unet.keys() == b.unet.keys() and a.text_encoder.keys() == b.text_encoder.keys()
    assert all(torch.equal(a.unet[k], b.unet[k]) for k in a.unet)
    assert (a.rank, a.alpha) == (b.rank, b.alpha) == (RANK, ALPHA)


def test_kohya_file_with_only_q_proj_text_lora(sd, tmp_path):
    """A text-encoder LoRA without out_proj (diffusers' own type guess fails on it: see the pin below)."""
    lora = {k: v for k, v in random_lora(sd_scripts_modules(sd, conv=False), seed=5).items()
            if k[0] == "unet" or k[1].endswith("q_proj")}
    loaded = load_lora(write_kohya(tmp_path / "q.safetensors", sd, lora, False, "sd_v1"), pipeline=sd)
    assert loaded.text_encoder and all(".q_proj." in k for k in loaded.text_encoder)


# ---------------------------------------------------------------------------------------------------- diffusers files


def _peft_state(p, lora) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (part, mod), (A, B, _, _) in lora.items():
        te = getattr(p, part) if part != "unet" else None
        if te is not None and not hasattr(te, "text_model"):
            mod = mod.removeprefix("text_model.")  # as peft names the modules of this model
        out.setdefault(part, {}).update({f"{mod}.lora_A.weight": A, f"{mod}.lora_B.weight": B})
    return out


_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


@pytest.mark.parametrize("spelling", ["training_script", "peft"])
@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_diffusers_file_matches_diffusers(sd, sdxl, tmp_path, model, spelling):
    """Written by diffusers' save_lora_weights with the LoraConfig as adapter metadata (lora_alpha != r).
    ``training_script``: what train_text_to_image_lora(_sdxl).py writes, attention layers only and
    convert_state_dict_to_diffusers applied (``to_q.lora.down``, ``q_proj.lora_linear_layer.down``). ``peft``: peft
    keys on every sd-scripts layer, with a rank and alpha pattern for the 3x3 convs."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors import safe_open

    p = sd if model == "sd" else sdxl
    lora = random_lora(sd_scripts_modules(p), seed=11)
    if spelling == "training_script":
        lora = {k: v for k, v in lora.items() if k[1].endswith(_ATTENTION)}
    state = _peft_state(p, lora)
    meta = {part: {"r": RANK, "lora_alpha": ALPHA, "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in sd_})}
            for part, sd_ in state.items()}
    conv3 = sorted({mod.rsplit(".", 1)[-1] for (_, mod), v in lora.items() if v[0].dim() == 4 and v[0].shape[-1] == 3})
    if conv3:
        meta["unet"]["rank_pattern"] = {c: CONV_RANK for c in conv3}
        meta["unet"]["alpha_pattern"] = {c: CONV_ALPHA for c in conv3}
    if spelling == "training_script":
        state = {part: convert_state_dict_to_diffusers(sd_) for part, sd_ in state.items()}
    kw = {f"{part}_lora_layers": sd_ for part, sd_ in state.items()}
    kw.update({f"{part}_lora_adapter_metadata": m for part, m in meta.items()})
    cls = StableDiffusionXLPipeline if model == "sdxl" else StableDiffusionPipeline
    cls.save_lora_weights(tmp_path, weight_name="d.safetensors", **kw)
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    if spelling == "training_script":
        assert any(".to_q.lora.down.weight" in k for k in keys) and any(".lora_linear_layer.down." in k for k in keys)
    else:
        assert conv3 and all(".lora_A." in k or ".lora_B." in k for k in keys)
    loaded = assert_matches_diffusers(p, tmp_path / "d.safetensors")
    assert (loaded.rank, loaded.alpha) == (RANK, ALPHA)


def test_old_attention_processor_file_matches_diffusers(sd, tmp_path):
    """diffusers 0.1x-0.2x files: ``unet.<block>.processor.to_q_lora.down.weight``, ``<module>.lora.down.weight``
    for other layers, ``text_encoder.….q_proj.lora_linear_layer.down.weight``; no alpha (factor 1)."""
    lora = random_lora(sd_scripts_modules(sd, conv=False), seed=13)
    tensors = {}
    for part, sd_ in _peft_state(sd, lora).items():
        for k, v in sd_.items():
            mod, ab = k.rsplit(".lora_", 1)
            side = "down" if ab.startswith("A") else "up"
            if part != "unet":
                new = f"{mod}.lora_linear_layer.{side}.weight"
            elif mod.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or mod.endswith("to_out.0"):
                attn, proj = mod.removesuffix(".0").rsplit(".", 1)
                new = f"{attn}.processor.{proj}_lora.{side}.weight"
            else:
                new = f"{mod}.lora.{side}.weight"
            tensors[f"{part}.{new}"] = v
    save_file(tensors, str(tmp_path / "old.safetensors"))
    loaded = assert_matches_diffusers(sd, tmp_path / "old.safetensors")
    assert loaded.alpha == loaded.rank  # no alpha in the file: factor 1


def test_bare_peft_keys(sd, tmp_path):
    """A UNet adapter saved by peft itself (``base_model.model.`` prefix, adapter name in the key)."""
    lora = {k: v for k, v in random_lora(sd_scripts_modules(sd, conv=False), seed=17).items() if k[0] == "unet"}
    state = _peft_state(sd, lora)["unet"]
    save_file({"base_model.model." + k.replace(".weight", ".default.weight"): v for k, v in state.items()},
              str(tmp_path / "peft.safetensors"))
    loaded = load_lora(tmp_path / "peft.safetensors", pipeline=sd)
    assert loaded.unet.keys() == state.keys() and all(torch.equal(loaded.unet[k], v) for k, v in state.items())
    assert loaded.alpha == loaded.rank == RANK


# ------------------------------------------------------------------------------------------ real-size module layouts


def meta_pipeline(kind: str) -> SimpleNamespace:
    """The real SD1.5 / SDXL UNet and text encoders from the bundled configs, on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = CONFIG_ROOT / kind
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
        te2 = (CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(root / "text_encoder_2"))
               if (root / "text_encoder_2").is_dir() else None)
    return SimpleNamespace(unet=unet, text_encoder=te, text_encoder_2=te2, kind=kind)


def rank1_lora(modules):
    """Rank-1 tensors of the real shapes (a few MB for a whole SDXL)."""
    out = {}
    for part, path, m in modules:
        if isinstance(m, torch.nn.Linear):
            A, B = torch.ones(1, m.in_features), torch.ones(m.out_features, 1)
        else:
            A, B = torch.ones(1, m.in_channels, *m.kernel_size), torch.ones(m.out_channels, 1, 1, 1)
        out[(part, path)] = (A, B, 1.0, m)
    return out


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    """sd-scripts files for the real SD1.5 (diffusers names) and SDXL (LDM names), LoCon, every module it picks."""
    folder = tmp_path_factory.mktemp("real")
    out = {}
    for kind, ldm, tag in (("sd1", False, "sd_v1"), ("sdxl", True, "sdxl_base_v1-0")):
        p = meta_pipeline(kind)
        lora = rank1_lora(sd_scripts_modules(p))
        out[kind] = (p, lora, write_kohya(folder / f"{kind}.safetensors", p, lora, ldm, tag))
    return out


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_real_size_sd_scripts_files_map_every_module_without_a_pipeline(real_files, kind):
    """Read with no pipeline (LDM block numbers at layers_per_block 2, as every released UNet): every module lands
    on the real model's module of that name and shape."""
    p, lora, path = real_files[kind]
    loaded = load_lora(path)
    check_lora_fits(loaded, p)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        want = {mod for q, mod in lora if q == part}
        assert {k.rsplit(".lora_", 1)[0] for k in getattr(loaded, part)} == want, part
    # sd-scripts reports 192 (SD1.5) / 722 (SDXL) UNet and 72 / 264 text-encoder modules; conv_dim adds 86 / 66
    te = (len(loaded.text_encoder) + len(loaded.text_encoder_2)) // 2
    assert (len(loaded.unet) // 2, te) == ((192 + 86, 72) if kind == "sd1" else (722 + 66, 264))


def test_real_size_files_on_the_other_architecture(real_files):
    sd1, sdxl = real_files["sd1"][0], real_files["sdxl"][0]
    with pytest.raises(ValueError, match=r"sdxl\.safetensors' is a LoRA for SDXL but the pipeline is SD1\.x"):
        load_lora(real_files["sdxl"][2], pipeline=sd1)
    with pytest.raises(ValueError, match=r"sd1\.safetensors' is a LoRA for SD1\.x but the pipeline is SDXL"):
        load_lora(real_files["sd1"][2], pipeline=sdxl)


# --------------------------------------------------------------------------------------------------- wrong files


def test_lora_for_another_architecture_names_both(sd, sdxl, tmp_path):
    xl_lora = random_lora(sd_scripts_modules(sdxl), 1)
    xl = write_kohya(tmp_path / "xl.safetensors", sdxl, xl_lora, True, "sdxl_base_v1-0")
    with pytest.raises(ValueError, match=r"xl\.safetensors' is a LoRA for SDXL but the pipeline is SD1\.x"):
        load_lora(xl, pipeline=sd)
    with pytest.raises(ValueError, match=r"is a LoRA for SDXL but the pipeline is SD1\.x"):
        with lora_applied(sd, load_lora(xl)):  # read without a pipeline: refused when applied
            pass
    base = outputs(sd)
    assert not hasattr(sd.unet, "peft_config") and all(torch.equal(a, b) for a, b in zip(outputs(sd), base))
    one = write_kohya(tmp_path / "sd1.safetensors", sd, random_lora(sd_scripts_modules(sd), 2), False, "")
    with pytest.raises(ValueError, match=r"is a LoRA for SD1\.x but the pipeline is SDXL: \d+ of its \d+ modules"):
        load_lora(one, pipeline=sdxl)
    with pytest.raises(ValueError, match=r"is a LoRA for SD1\.x but the pipeline is SDXL"):
        check_lora_fits(load_lora(one), sdxl)


@pytest.mark.parametrize("tag,keys", [
    ("LoHa", ["lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a",
              "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b"]),
    ("DoRA", ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
              "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale"]),
])
def test_lycoris_and_dora_files_are_refused_by_name(tmp_path, tag, keys):
    save_file({k: torch.zeros(2, 2) for k in keys}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=rf"x\.safetensors' is a {tag} network, not a plain LoRA"):
        load_lora(tmp_path / "x.safetensors")


def test_mixed_ldm_and_diffusers_unet_names_are_refused(tmp_path):
    keys = ["lora_unet_input_blocks_1_1_proj_in", "lora_unet_down_blocks_0_attentions_0_proj_out"]
    save_file({f"{k}.lora_{s}.weight": torch.zeros(2, 2) for k in keys for s in ("down", "up")},
              str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="mixes LDM UNet names"):
        load_lora(tmp_path / "m.safetensors")


# ------------------------------------------------------------------------- pins: why lora_convert keeps its own code


def _diffusers_unet_modules(keys, unet_config):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    sd = {f"{k}.lora_{s}.weight": torch.zeros(2, 2) for k in keys for s in ("down", "up")}
    out, alphas = StableDiffusionXLPipeline.lora_state_dict(sd, unet_config=unet_config)
    peft = convert_unet_state_dict_to_peft({k[5:]: v for k, v in out.items() if k.startswith("unet.")})
    return sorted({k.rsplit(".lora_", 1)[0] for k in peft})


def test_pin_diffusers_misnames_add_embedding_and_upsampler_without_attention(sd):
    """lora_convert._kohya_renames exists because of these two; drop it when this test fails."""
    assert _diffusers_unet_modules(["lora_unet_add_embedding_linear_1"], sd.unet.config) != ["add_embedding.linear_1"]
    block = sd.unet.config.layers_per_block  # the last layer of up block 0, which has no attention in SD1.x
    assert not hasattr(sd.unet.up_blocks[0], "attentions")
    got = _diffusers_unet_modules([f"lora_unet_output_blocks_{block}_1_conv"], sd.unet.config)
    assert got != ["up_blocks.0.upsamplers.0.conv"], got


def test_pin_diffusers_alpha_names_miss_attention_modules():
    """lora_convert pairs alphas with modules itself because diffusers' network_alphas name attention modules by
    their old processor key; drop that when this fails."""
    from diffusers import StableDiffusionPipeline

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    _, alphas = StableDiffusionPipeline.lora_state_dict(
        {f"{name}.lora_down.weight": torch.zeros(2, 2), f"{name}.lora_up.weight": torch.zeros(2, 2),
         f"{name}.alpha": torch.tensor(1.0)})
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.alpha" not in alphas, alphas


def test_pin_diffusers_text_type_guess_fails_without_out_proj():
    """lora_convert._te_to_peft passes the state-dict types because diffusers cannot guess them here."""
    from diffusers.utils import convert_state_dict_to_diffusers

    with pytest.raises(ValueError, match="Could not automatically infer"):
        convert_state_dict_to_diffusers({"text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": torch.zeros(1)})


def test_metadata_survives_and_targets_are_inferred(sd, tmp_path):
    lora = random_lora(sd_scripts_modules(sd, conv=False), seed=19)
    loaded = load_lora(write_kohya(tmp_path / "k.safetensors", sd, lora, False, "sd_v1"))
    assert loaded.metadata["ss_base_model_version"] == "sd_v1" and loaded.metadata["ss_network_dim"] == str(RANK)
    assert {"to_q", "to_k", "to_v", "to_out.0", "q_proj", "fc1"} <= set(loaded.target_modules)
