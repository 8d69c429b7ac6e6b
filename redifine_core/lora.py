"""LoRA files: save/load kohya and diffusers layouts with alpha per module and ss_* metadata.

The API:

    @dataclass
    class LoraWeights:
        unet: dict[str, torch.Tensor]            # peft layout, keys "<diffusers module path>.lora_A.weight" / ".lora_B.weight"
        text_encoder: dict[str, torch.Tensor]    # same, for the text encoder (usually empty)
        rank: int
        alpha: float
        target_modules: tuple[str, ...]
        metadata: dict[str, str]                 # ss_* fields
        fixed_deltas: dict[str, torch.Tensor]    # UNet parameter path -> difference added while applied; never trains
    def save_lora(lora: LoraWeights, path, layout: str = "kohya") -> Path      # atomic; layout "kohya" | "diffusers"
    def load_lora(path, pipeline=None) -> LoraWeights                           # any layout below; checked on pipeline
    def check_lora_fits(lora, pipeline, source="the LoRA") -> None              # ValueError naming both architectures
    @contextmanager
    def lora_applied(pipeline: Pipeline, lora: LoraWeights | None, scale: float = 1.0)   # inject, yield, remove
    def add_fixed_deltas(model, deltas, scale=1.0) -> Callable[[], None]       # (lora_comfyui) add; result restores

Layouts
-------
* ``kohya`` (what ComfyUI's stock LoraLoader, A1111/Forge and kohya tools read):
  ``lora_unet_<diffusers module path, "." -> "_">.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` where
  ``.alpha`` is the peft ``lora_alpha`` (the scale applied is alpha / rank, as in peft). Text encoder modules are
  ``lora_te_text_model_encoder_layers_N_...`` (SDXL: ``lora_te1_`` for the first encoder, ``lora_te2_`` for the second).
* ``diffusers``: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.`` / ``text_encoder_2.`` for the
  text encoders) plus the ``lora_adapter_metadata`` JSON that diffusers' ``load_lora_weights`` reads to rebuild the
  ``LoraConfig`` (so alpha survives). Our own ``ss_*`` metadata is written in both layouts.

Reading also takes the files other tools write (kohya sd-scripts for SD1.x/SD2.x/SDXL, LDM UNet names included;
diffusers/PEFT in every spelling diffusers has used; :mod:`redifine_core.lora_convert` maps them through diffusers'
own converters and says where and why it keeps code of its own), and the files ComfyUI's own Train LoRA node writes
(:mod:`redifine_core.lora_comfyui`). Writing stays in the two layouts above.

Fixed deltas: ComfyUI's trainer also trains every norm weight and bias as a full difference (``diff``/``diff_b``).
They are kept in ``LoraWeights.fixed_deltas``, added to the UNet's parameters (times ``scale``) while the LoRA is
applied or trained on, and never trained themselves; reading such a file logs one warning line saying so. The kohya
layout writes them as ``lora_unet_<module>.diff`` / ``.diff_b`` (the names ComfyUI's LoraLoader applies as weight and
bias differences), with the module paths in the ``redifine_fixed_deltas`` metadata; the diffusers layout has no place
for them and refuses.

Text-encoder keys in :class:`LoraWeights` always use the ``text_model.encoder...`` module path (the CLIP naming used
by every LoRA tool); transformers >= 5.6 ``CLIPTextModel`` drops the ``text_model.`` level, which is resolved when the
LoRA is injected.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch

from .atomic import PathLike, save_safetensors
from .lora_comfyui import (DELTA_METADATA, add_fixed_deltas, check_delta_fits, check_delta_keys, deltas_from_kohya,
                           deltas_to_kohya, is_comfyui_trainer_layout, read_comfyui_trainer)
from .lora_convert import check_fits, read_state_dict, unify

log = logging.getLogger(__name__)

LAYOUTS = ("kohya", "diffusers")

# Names a user picks in TrainConfig.target, and the peft target-module suffixes they stand for.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "feedforward": ("ff.net.0.proj", "ff.net.2"),
    "resnet": ("conv1", "conv2", "time_emb_proj"),
}
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")

ADAPTER_NAME = "default"
TE_CANONICAL_PREFIX = "text_model."
_TE_FIELDS = ("text_encoder", "text_encoder_2")


@dataclass
class LoraWeights:
    """A LoRA in peft layout (CPU tensors), with one rank and one alpha for every module."""

    unet: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    rank: int = 4
    alpha: float = 4.0
    target_modules: tuple[str, ...] = TARGET_GROUPS["attention"]
    metadata: dict[str, str] = field(default_factory=dict)
    text_encoder_2: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL's second text encoder
    fixed_deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # UNet parameter path -> added while applied

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraWeights.rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoraWeights.alpha must be a finite number > 0, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        self.target_modules = tuple(self.target_modules)
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}
        for name in ("unet",) + _TE_FIELDS:
            sd = getattr(self, name)
            for key in sd:
                if not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")):
                    raise ValueError(
                        f"LoraWeights.{name} key {key!r} is not in peft layout "
                        "('<module path>.lora_A.weight' or '<module path>.lora_B.weight')"
                    )
        check_delta_keys(self.fixed_deltas, "LoraWeights.fixed_deltas")

    @property
    def scale(self) -> float:
        """The factor peft applies to B @ A: alpha / rank."""
        return self.alpha / self.rank

    def modules(self, part: str = "unet") -> list[str]:
        """Sorted module paths that carry a LoRA in ``part`` ("unet", "text_encoder", "text_encoder_2")."""
        return sorted({k.rsplit(".lora_", 1)[0] for k in getattr(self, part)})

    def num_modules(self) -> int:
        return sum(len(self.modules(p)) for p in ("unet",) + _TE_FIELDS)


# ----------------------------------------------------------------------------------------------------------- names

def _kohya_prefixes(lora: LoraWeights) -> dict[str, str]:
    if lora.text_encoder_2:
        return {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    return {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def _infer_targets(paths: Sequence[str]) -> tuple[str, ...]:
    known = [t for g in TARGET_GROUPS.values() for t in g] + list(TEXT_ENCODER_TARGETS)
    out: list[str] = []
    for p in paths:
        hit = next((t for t in known if p == t or p.endswith("." + t)), p.rsplit(".", 1)[-1])
        if hit not in out:
            out.append(hit)
    return tuple(out)


# ----------------------------------------------------------------------------------------------------- save / load


def _metadata_strings(lora: LoraWeights) -> dict[str, str]:
    md = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": _fmt_float(lora.alpha),
        "redifine_target_modules": json.dumps(list(lora.target_modules)),
    }
    md.update({str(k): str(v) for k, v in lora.metadata.items()})
    return md


def _fmt_float(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def save_lora(lora: LoraWeights, path: PathLike, layout: str = "kohya") -> Path:
    """Write ``lora`` to ``path`` (.safetensors) atomically in ``layout`` ("kohya" or "diffusers"); return the path."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors (weights are only written as safetensors), got {str(path)!r}")
    tensors: dict[str, torch.Tensor] = {}
    metadata = _metadata_strings(lora)
    if layout == "kohya":
        prefixes = _kohya_prefixes(lora)
        for part in ("unet",) + _TE_FIELDS:
            sd = getattr(lora, part)
            for module in lora.modules(part):
                name = prefixes[part] + module.replace(".", "_")
                tensors[f"{name}.lora_down.weight"] = sd[f"{module}.lora_A.weight"]
                tensors[f"{name}.lora_up.weight"] = sd[f"{module}.lora_B.weight"]
                tensors[f"{name}.alpha"] = torch.tensor(lora.alpha, dtype=torch.float32)
        if lora.fixed_deltas:
            delta_tensors, metadata[DELTA_METADATA] = deltas_to_kohya(lora.fixed_deltas)
            tensors.update(delta_tensors)
    else:
        if lora.fixed_deltas:
            raise ValueError(f"this LoRA carries {len(lora.fixed_deltas)} fixed deltas (full-weight differences), "
                             "which only the kohya layout can hold; save it with layout='kohya'")
        adapter_md: dict[str, Any] = {}
        for part in ("unet",) + _TE_FIELDS:
            sd = getattr(lora, part)
            if not sd:
                continue
            tensors.update({f"{part}.{k}": v for k, v in sd.items()})
            cfg = {
                "r": lora.rank,
                "lora_alpha": lora.alpha,
                "target_modules": lora.modules(part),
                "lora_dropout": 0.0,
                "bias": "none",
            }
            adapter_md.update({f"{part}.{k}": v for k, v in cfg.items()})
        metadata["lora_adapter_metadata"] = json.dumps(adapter_md, sort_keys=True)
        metadata["format"] = "pt"
    # own copies: tensors sharing storage (views, one tensor reused for several modules) cannot go to safetensors
    save_safetensors(path, {k: v.detach().to("cpu").clone() for k, v in tensors.items()}, metadata)
    return path


def load_lora(path: PathLike, pipeline: Any = None) -> LoraWeights:
    """Read a LoRA file in any layout :mod:`redifine_core.lora_convert` knows (ours, kohya sd-scripts with diffusers
    or LDM UNet names, diffusers/PEFT, ComfyUI's Train LoRA node) to :class:`LoraWeights`.

    With ``pipeline`` (ours or a diffusers one), LDM block numbers are mapped with its UNet config and the LoRA is
    checked to fit it (a LoRA for another architecture is one ValueError naming both).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LoRA file not found: {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            raw = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"cannot read LoRA file {str(path)!r} as safetensors: {exc}") from exc
    if not raw:
        raise ValueError(f"LoRA file {str(path)!r} holds no tensors")
    source = f"LoRA file {str(path)!r}"
    if is_comfyui_trainer_layout(raw):
        parts, deltas = read_comfyui_trainer(raw, source, pipeline)
        if deltas:
            weights = sum(k.endswith(".weight") for k in deltas)
            log.warning("%s: %d full-weight differences (%d weights, %d biases) are applied as fixed deltas and not "
                        "trained", path.name, len(deltas), weights, len(deltas) - weights)
    else:
        raw, deltas = deltas_from_kohya(raw, metadata)
        parts = read_state_dict(raw, metadata, source, pipeline)
    tensors, rank, alpha = unify(parts)
    for part in _TE_FIELDS:  # canonical text-encoder paths start at text_model. (text_projection sits above it)
        tensors[part] = {k if k.startswith((TE_CANONICAL_PREFIX, "text_projection.")) else TE_CANONICAL_PREFIX + k: v
                         for k, v in tensors[part].items()}
    md = {k: v for k, v in metadata.items() if k not in ("lora_adapter_metadata", "format", DELTA_METADATA)}
    try:
        targets = tuple(json.loads(md.pop("redifine_target_modules", "[]")))
    except ValueError:
        targets = ()
    if not targets:
        targets = _infer_targets([k.rsplit(".lora_", 1)[0] for p in tensors for k in tensors[p]])
    lora = LoraWeights(
        unet=tensors["unet"], text_encoder=tensors["text_encoder"], text_encoder_2=tensors["text_encoder_2"],
        rank=rank, alpha=alpha, target_modules=targets, metadata=md, fixed_deltas=deltas,
    )
    if pipeline is not None:
        check_lora_fits(lora, pipeline, source)
    return lora


def check_lora_fits(lora: LoraWeights, pipeline: Any, source: str = "the LoRA") -> None:
    """Raise one ValueError (naming the LoRA's and the pipeline's architectures) unless every module of ``lora``
    exists in ``pipeline`` with the LoRA's shapes, and every fixed delta has a UNet parameter of its shape."""

    def to_model_path(part: str, model: torch.nn.Module, key: str) -> str:
        return key if part == "unet" else te_from_canonical(key, model)

    parts = {p: getattr(lora, p) for p in ("unet",) + _TE_FIELDS}
    check_fits(parts, lora.metadata, pipeline, source, to_model_path)
    check_delta_fits(lora.fixed_deltas, pipeline.unet, source)


# ------------------------------------------------------------------------------------------------- inject / remove


def te_module_prefix(text_encoder: torch.nn.Module) -> str:
    """"" when the model's modules already start at ``text_model.`` (or has no such level), for canonical keys."""
    return TE_CANONICAL_PREFIX if not hasattr(text_encoder, "text_model") else ""


def te_to_canonical(key: str, text_encoder: torch.nn.Module) -> str:
    """Model-native text-encoder key -> canonical ``text_model.``-prefixed key."""
    return te_module_prefix(text_encoder) + key


def te_from_canonical(key: str, text_encoder: torch.nn.Module) -> str:
    """Canonical ``text_model.``-prefixed key -> the model's own module path."""
    prefix = te_module_prefix(text_encoder)
    if prefix and key.startswith(prefix):
        return key[len(prefix):]
    return key


def add_lora_adapter(model: torch.nn.Module, rank: int, alpha: float, target_modules: Sequence[str],
                     init_lora_weights: Union[bool, str] = "gaussian") -> None:
    """Inject a peft LoRA adapter named "default" into ``model`` (the UNet through ``add_adapter``)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init_lora_weights,
                        target_modules=list(target_modules))
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):  # the diffusers UNet: its own add_adapter (sets peft bookkeeping)
        model.add_adapter(config)
    else:
        inject_adapter_in_model(config, model, ADAPTER_NAME)


def remove_lora_adapters(model: torch.nn.Module) -> None:
    """Replace every peft tuner layer in ``model`` by its original base layer and drop peft bookkeeping."""
    from diffusers.utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(model)
    for attr in ("peft_config",):
        if attr in vars(model):
            delattr(model, attr)
    if "_hf_peft_config_loaded" in vars(model):
        model._hf_peft_config_loaded = False


def has_lora_layers(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def set_lora_state(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """Load peft-layout tensors into the injected adapter; every key must land."""
    from peft import set_peft_model_state_dict

    ref = next(p for p in model.parameters())
    sd = {k: v.to(device=ref.device) for k, v in sd.items()}
    result = set_peft_model_state_dict(model, sd, adapter_name=ADAPTER_NAME)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora_" in k]
    if unexpected:
        raise ValueError(f"{len(unexpected)} LoRA keys of the {what} match no module of this model, e.g. {unexpected[:3]}")


def _set_scale(model: torch.nn.Module, scale: float) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if scale == 1.0:
        return
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.scale_layer(scale)


def _text_encoders(pipeline: Any) -> dict[str, Any]:
    return {"text_encoder": getattr(pipeline, "text_encoder", None),
            "text_encoder_2": getattr(pipeline, "text_encoder_2", None)}


@contextmanager
def lora_applied(pipeline: Any, lora: Optional[LoraWeights], scale: float = 1.0) -> Iterator[Any]:
    """Inject ``lora`` into the pipeline's UNet (and text encoders) at ``scale``, yield the pipeline, then remove it.

    The pipeline's modules are exactly as before afterwards (same module objects, no peft layers, the parameters
    that fixed deltas changed back to their original tensors), also on error.
    ``lora=None`` or ``scale == 0`` yields the pipeline unchanged. A LoRA that does not fit the pipeline (another
    architecture) is one ValueError naming both, before anything is injected.
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if lora is None or scale == 0:
        yield pipeline
        return
    check_lora_fits(lora, pipeline)
    encoders = _text_encoders(pipeline)
    touched: list[torch.nn.Module] = []
    restore = add_fixed_deltas(pipeline.unet, lora.fixed_deltas, float(scale))
    try:
        targets = [(pipeline.unet, lora.unet, "unet", lambda k: k)]
        for part in _TE_FIELDS:
            te = encoders[part]
            if getattr(lora, part):
                targets.append((te, getattr(lora, part), part, lambda k, te=te: te_from_canonical(k, te)))
        for model, sd, what, rename in targets:
            if not sd:
                continue
            sd = {rename(k): v for k, v in sd.items()}
            modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
            ref = next(model.parameters())
            touched.append(model)
            add_lora_adapter(model, lora.rank, lora.alpha, modules, init_lora_weights=False)
            set_lora_state(model, {k: v.to(ref.dtype) for k, v in sd.items()}, what)
            _set_scale(model, float(scale))
        yield pipeline
    finally:
        for model in touched:
            remove_lora_adapters(model)
        restore()
