"""Reading LoRA files written by other tools into peft module paths, and checking that a LoRA fits a pipeline.

Layouts read (:func:`read_state_dict` turns a file's tensors into ``{part: {module: ModuleLora}}``):

* kohya / sd-scripts: ``lora_unet_*`` / ``lora_te_*`` (SD1.x/SD2.x) / ``lora_te1_*`` and ``lora_te2_*`` (SDXL), with
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``. The UNet part comes with diffusers module names (our own
  files, sd-scripts for SD1.x/SD2.x) or with the original LDM names sd-scripts writes for SDXL
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``middle_block_1``, ``output_blocks_…``).
  Names go through diffusers' public ``StableDiffusion(XL)Pipeline.lora_state_dict(state_dict, unet_config=…)``
  (its ``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_non_diffusers_lora_to_diffusers``) and then
  ``diffusers.utils.convert_unet_state_dict_to_peft`` / ``convert_state_dict_to_peft``, exactly the chain
  ``load_lora_weights`` runs.
* diffusers / PEFT: ``unet.<path>.lora_A.weight`` (``text_encoder.`` / ``text_encoder_2.``), the older
  ``…processor.to_q_lora.down.weight`` / ``…lora.down.weight`` / ``…lora_linear_layer.down.weight`` keys,
  bare peft keys (``base_model.model.`` stripped), with the ``lora_adapter_metadata`` diffusers writes for alpha.

Own code kept here, and why (the diffusers behaviours behind the first three are pinned by tests in
tests/test_lora_thirdparty.py that fail once diffusers changes them, so the workaround can go):

* two renames before diffusers' converter (:func:`_kohya_renames`). Measured on diffusers 0.42: it turns
  ``lora_unet_add_embedding_linear_1`` (diffusers names, SDXL) into ``add.embedding.linear`` (its SDXL index strip), and
  maps an LDM ``output_blocks_N_1_conv`` (the upsampler of an up block without attention, SD1.x's first one) to
  ``attentions``. We rename them to the LDM spellings it does map (``label_emb_0_0``, ``output_blocks_N_2_conv``).
* alpha per module is read from the file's own ``.alpha`` next to each ``lora_down`` (paired by tensor identity through
  the conversion), not from diffusers' ``network_alphas``: its names for attention modules
  (``…processor.to_q_lora.down.weight.alpha``) match no module, so where alphas differ per module
  ``load_lora_weights`` applies the most common alpha to those modules.
* the text-encoder state-dict types are passed to diffusers' converters (:func:`_te_to_peft`): their own guess
  raises on a file whose text LoRA has no ``out_proj``.
* one rank and one alpha (:func:`unify`): :class:`~redifine_core.lora.LoraWeights` is the training contract (one
  rank, one alpha). Modules of lower rank (e.g. sd-scripts' ``conv_dim`` LoCon, resized LoRAs) are zero-padded and a
  module's own alpha/rank is folded into its B; every ``(alpha/rank) * B @ A`` is unchanged.
* the fit check (:func:`check_fits`): peft only says "size mismatch" deep inside; a LoRA for another architecture gets
  one line naming both.

LDM names need the UNet's ``layers_per_block``: the pipeline's when given, else 2 (every released SD1.x, SD2.x and
SDXL UNet).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Mapping, Optional

import torch

PARTS = ("unet", "text_encoder", "text_encoder_2")
ARCH_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                   ("lora_te_", "text_encoder"))
_KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
_LYCORIS = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
            "lora_mid": "LoCon with a Tucker middle", ".diff": "full-weight difference", "ia3": "IA3",
            "oft_": "OFT"}
_SGM = ("input_blocks", "middle_block", "output_blocks")
_NOT_SGM = ("down_blocks", "mid_block", "up_blocks")


@dataclass
class ModuleLora:
    """One module's LoRA: A (down), B (up) and its alpha (None: none given, applied at factor 1)."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: Optional[float] = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


Parts = dict[str, dict[str, ModuleLora]]


def bad_keys_message(source: str, keys: list[str]) -> str:
    kinds = sorted({name for k in keys for tag, name in _LYCORIS.items() if tag in k})
    if kinds:
        return (f"{source} is a {'/'.join(kinds)} network, not a plain LoRA ({len(keys)} keys such as {keys[:2]}); "
                "only LoRA (lora_down/lora_up or lora_A/lora_B) files are supported")
    return (f"{source} has {len(keys)} keys in no known layout (kohya lora_down/lora_up/alpha or peft lora_A/lora_B), "
            f"e.g. {keys[:3]}")


def is_kohya(keys: Any) -> bool:
    return any(k.startswith("lora_") for k in keys)


# ------------------------------------------------------------------------------------------------------------ kohya


def _kohya_renames(name: str) -> str:
    """The two module names diffusers' kohya converter gets wrong (see the module docstring)."""
    name = re.sub(r"^lora_unet_add_embedding_linear_1$", "lora_unet_label_emb_0_0", name)
    name = re.sub(r"^lora_unet_add_embedding_linear_2$", "lora_unet_label_emb_0_2", name)
    return re.sub(r"^(lora_unet_output_blocks_\d+)_1_conv$", r"\1_2_conv", name)


def _kohya_parts(raw: Mapping[str, torch.Tensor], source: str, unet_config: Any, sdxl: bool) -> Parts:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    unknown = [k for k in raw if k.partition(".")[2] not in _KOHYA_SUFFIXES
               or not any(k.startswith(p) for p, _ in _KOHYA_PREFIXES)]
    if unknown:
        raise ValueError(bad_keys_message(source, unknown))
    names = {k.partition(".")[0] for k in raw}
    for name in sorted(names):
        for side in ("lora_down.weight", "lora_up.weight"):
            if f"{name}.{side}" not in raw:
                missing = "B (lora_up)" if side == "lora_up.weight" else "A (lora_down)"
                raise ValueError(f"{source}: module {name} lacks its {missing} matrix")
    unet_names = [n for n in names if n.startswith("lora_unet_")]
    if any(p in n for n in unet_names for p in _SGM) and any(p in n for n in unet_names for p in _NOT_SGM):
        raise ValueError(f"{source} mixes LDM UNet names (input_blocks/middle_block/output_blocks) with diffusers "
                         "names (down_blocks/mid_block/up_blocks); expected one naming")

    # renamed copy for diffusers; alphas and owners by the identity of the down tensor (kept through the conversion)
    sd: dict[str, torch.Tensor] = {}
    alpha_of: dict[int, Optional[float]] = {}
    owner: dict[int, str] = {}
    for name in names:
        new = _kohya_renames(name)
        down, up = raw[f"{name}.lora_down.weight"], raw[f"{name}.lora_up.weight"]
        sd[f"{new}.lora_down.weight"], sd[f"{new}.lora_up.weight"] = down, up
        alpha = raw.get(f"{name}.alpha")
        alpha_of[id(down)] = None if alpha is None else float(alpha.float().item())
        owner[id(down)] = owner[id(up)] = name
    loader = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    try:
        converted, _ = loader.lora_state_dict(sd, unet_config=unet_config)
    except (ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"{source}: diffusers cannot map its kohya names: {exc}") from exc

    parts: Parts = {p: {} for p in PARTS}
    for part in PARTS:
        sub = {k[len(part) + 1:]: v for k, v in converted.items() if k.startswith(part + ".")}
        sub = convert_unet_state_dict_to_peft(sub) if part == "unet" else _te_to_peft(sub)
        _collect(parts[part], sub, part, source, alpha_of)
    got = {owner[id(m.A)] for mods in parts.values() for m in mods.values()}
    if got != names:
        lost = sorted(names - got)
        raise ValueError(f"{source}: diffusers left {len(lost)} modules unmapped, e.g. {lost[:3]}")
    return parts


def _te_to_peft(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder keys in any diffusers spelling -> peft (what ``_load_lora_into_text_encoder`` does; the types
    are given because diffusers' own guess fails on files without ``out_proj`` LoRAs)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    sd = convert_state_dict_to_diffusers(sd, original_type=StateDictType.DIFFUSERS_OLD)
    return convert_state_dict_to_peft(sd, original_type=StateDictType.DIFFUSERS)


def _collect(out: dict[str, ModuleLora], sd: Mapping[str, torch.Tensor], part: str, source: str,
             alpha_of: Optional[dict[int, Optional[float]]] = None) -> None:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in sd.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight", key)
        if m is None or m.group(1).endswith(".lora"):
            unknown.append(f"{part}.{key}")
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if unknown:
        raise ValueError(bad_keys_message(source, unknown))
    for module, t in pairs.items():
        if set(t) != {"A", "B"}:
            raise ValueError(f"{source}: module {part}.{module} lacks its {'B' if 'A' in t else 'A'} matrix")
        alpha = alpha_of.get(id(t["A"])) if alpha_of is not None else None
        out[module] = ModuleLora(t["A"], t["B"], alpha)


# -------------------------------------------------------------------------------------------------- diffusers / peft


def _diffusers_parts(raw: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> Parts:
    from diffusers.utils import convert_unet_state_dict_to_peft

    split: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PARTS}
    for key, t in raw.items():
        key = key.removeprefix("base_model.model.")
        prefix, _, rest = key.partition(".")
        if prefix in split:
            split[prefix][rest] = t
        else:  # bare peft keys: a UNet LoRA
            split["unet"][key] = t
    parts: Parts = {p: {} for p in PARTS}
    for part, sd in split.items():
        if sd:
            sd = convert_unet_state_dict_to_peft(sd) if part == "unet" else _te_to_peft(sd)
            _collect(parts[part], sd, part, source)
    try:
        adapter_md = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError as exc:
        raise ValueError(f"{source}: its lora_adapter_metadata is not JSON: {exc}") from exc
    fallback = metadata.get("ss_network_alpha")  # our own diffusers files before lora_adapter_metadata
    for part, mods in parts.items():
        if adapter_md.get(f"{part}.use_dora"):
            raise ValueError(f"{source} is a DoRA network (use_dora in its metadata); only plain LoRA is supported")
        if f"{part}.lora_alpha" in adapter_md:
            alpha = float(adapter_md[f"{part}.lora_alpha"])
            pattern = adapter_md.get(f"{part}.alpha_pattern") or {}
            for module, m in mods.items():
                from peft.utils.other import get_pattern_key

                key = get_pattern_key(list(pattern), module)
                m.alpha = float(pattern.get(key, alpha))
        elif fallback is not None and not adapter_md:
            for m in mods.values():
                m.alpha = float(fallback)
    return parts


# ---------------------------------------------------------------------------------------------------------- reading


def read_state_dict(raw: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str,
                    pipeline: Any = None) -> Parts:
    """A file's tensors (either layout) -> ``{part: {peft module path: ModuleLora}}``; ``source`` names the file in
    errors, ``pipeline`` (optional) gives the UNet config that LDM block numbers are mapped with."""
    if is_kohya(raw):
        unet = getattr(pipeline, "unet", None)
        config = unet.config if unet is not None else SimpleNamespace(layers_per_block=2)
        sdxl = getattr(pipeline, "text_encoder_2", None) is not None
        parts = _kohya_parts(raw, source, config, sdxl)
    else:
        parts = _diffusers_parts(raw, metadata, source)
    if not any(parts.values()):
        raise ValueError(f"{source} holds no LoRA modules")
    return parts


def unify(parts: Parts) -> tuple[dict[str, dict[str, torch.Tensor]], int, float]:
    """One rank (the largest) and one alpha (the most common among modules of that rank) for all modules.

    A module of rank r and alpha a contributes (a/r) B A; with the common (alpha, rank) its B is scaled by
    (a/r) / (alpha/rank) and A/B are zero-padded to the common rank, so the product is unchanged. A module without
    alpha is applied at factor 1 (alpha = its rank), as kohya, ComfyUI and diffusers do.
    """
    mods = [m for p in PARTS for m in parts[p].values()]
    rank = max(m.rank for m in mods)
    alphas = [m.alpha if m.alpha is not None else float(m.rank) for m in mods if m.rank == rank]
    alpha = Counter(alphas).most_common(1)[0][0]
    out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PARTS}
    for part in PARTS:
        for module, m in parts[part].items():
            a = m.alpha if m.alpha is not None else float(m.rank)
            A, B = m.A, m.B
            if (a, m.rank) != (alpha, rank):
                B = B.float() * ((a / m.rank) / (alpha / rank))
                A = A.float()
            if m.rank < rank:
                A = torch.cat([A, A.new_zeros((rank - m.rank,) + tuple(A.shape[1:]))], dim=0)
                B = torch.cat([B, B.new_zeros((B.shape[0], rank - m.rank) + tuple(B.shape[2:]))], dim=1)
            out[part][f"{module}.lora_A.weight"] = A.contiguous()
            out[part][f"{module}.lora_B.weight"] = B.contiguous()
    return out, rank, float(alpha)


# ----------------------------------------------------------------------------------------------------- architecture


def pipeline_architecture(pipeline: Any) -> str:
    """"sd1", "sd2" or "sdxl" for a pipeline (ours or a diffusers one); the toy model reads as SD1.x."""
    kind = getattr(pipeline, "kind", None)
    if kind in ARCH_NAMES:
        return kind
    config = pipeline.unet.config
    second = getattr(pipeline, "text_encoder_2", None) is not None
    if second or getattr(config, "addition_embed_type", "") == "text_time":
        return "sdxl"
    return "sd2" if getattr(config, "cross_attention_dim", None) == 1024 else "sd1"


def lora_architecture(unet: Mapping[str, torch.Tensor], text_encoder_2: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str]) -> Optional[str]:
    """The architecture a LoRA was made for when its weights or metadata tell, else None."""
    if text_encoder_2:
        return "sdxl"
    widths = {t.shape[1] for k, t in unet.items() if k.endswith("attn2.to_k.lora_A.weight")}
    for width, arch in ((2048, "sdxl"), (1024, "sd2"), (768, "sd1")):
        if width in widths:
            return arch
    tag = (metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")).lower()
    for needle, arch in (("xl", "sdxl"), ("v2", "sd2"), ("v1", "sd1")):
        if needle in tag:
            return arch
    if any(k.startswith("up_blocks.0.attentions.") for k in unet):  # SDXL's first up block has attention
        return "sdxl"
    if any(k.startswith("down_blocks.0.attentions.") for k in unet):  # SD1.x/SD2.x: the first down block has it
        return "sd1"
    return None


def _misfit(module: Optional[torch.nn.Module], A: torch.Tensor, B: torch.Tensor) -> Optional[str]:
    """Why the LoRA matrices cannot sit on ``module`` (None if they can)."""
    if module is None:
        return "no such module"
    if isinstance(module, torch.nn.Linear):
        want_a, want_b = (module.in_features,), (module.out_features,)
        got_a, got_b = tuple(A.shape[1:]), (B.shape[0],)
        ok = A.dim() == 2 and B.dim() == 2
    elif isinstance(module, torch.nn.Conv2d):
        want_a, want_b = (module.in_channels, *module.kernel_size), (module.out_channels,)
        got_a, got_b = tuple(A.shape[1:]), (B.shape[0],)
        ok = A.dim() == 4 and B.dim() == 4
    else:
        return f"a {type(module).__name__}, not Linear/Conv2d"
    if ok and got_a == want_a and got_b == want_b:
        return None
    return f"LoRA in {list(got_a)} out {list(got_b)}, module in {list(want_a)} out {list(want_b)}"


def check_fits(parts: Mapping[str, Mapping[str, torch.Tensor]], metadata: Mapping[str, str], pipeline: Any,
               source: str, to_model_path: Any) -> None:
    """ValueError naming both architectures when any LoRA module is missing from the pipeline or of another shape.

    ``parts`` holds peft-layout dicts per part; ``to_model_path(part, model, key)`` maps a key to the model's path.
    """
    bad: list[str] = []
    total = 0
    for part in PARTS:
        sd = parts.get(part) or {}
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
        total += len(modules)
        model = getattr(pipeline, part, None)
        for module in modules:
            A, B = sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"]
            target = None
            if model is not None:
                try:
                    target = model.get_submodule(to_model_path(part, model, module))
                except AttributeError:
                    target = None
            why = _misfit(target, A, B) if model is not None else f"the pipeline has no {part}"
            if why is not None:
                bad.append(f"{part}.{module} ({why})")
    if not bad:
        return
    pipe_arch = ARCH_NAMES[pipeline_architecture(pipeline)]
    lora_arch = lora_architecture(parts.get("unet") or {}, parts.get("text_encoder_2") or {}, metadata)
    what = (f"is a LoRA for {ARCH_NAMES[lora_arch]} but the pipeline is {pipe_arch}"
            if lora_arch is not None and ARCH_NAMES[lora_arch] != pipe_arch
            else f"does not fit this {pipe_arch} pipeline (a LoRA for another architecture or model)")
    raise ValueError(f"{source} {what}: {len(bad)} of its {total} modules do not fit, e.g. {'; '.join(bad[:2])}")
