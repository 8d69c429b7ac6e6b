"""ComfyUI's own LoRA conventions: the files its Train LoRA node writes, and fixed full-weight deltas.

**Train LoRA files** (``comfy_extras/nodes_train.py``, algorithm "LoRA"). That node puts an adapter on every weight of
the diffusion model and saves it under the model's LDM module names (``diffusion_model.input_blocks.1.1.proj_in``), in
its ``lora_dtype`` (bf16 by default), without metadata:

* every Linear and Conv2d: ``<module>.lora_up.weight`` (out, rank), ``<module>.lora_down.weight`` (rank, in * kh * kw:
  a conv kernel is stored flattened) and ``<module>.alpha``;
* every weight of fewer than two dimensions (GroupNorm, LayerNorm): ``<module>.diff``, the whole weight's difference;
* every bias: ``<module>.diff_b``.

:func:`read_comfyui_trainer` turns the LoRA factors into peft-shaped :class:`~redifine_core.lora_convert.ModuleLora`
and the ``diff``/``diff_b`` tensors into fixed deltas keyed by the UNet parameter path (a ``diff`` on a Linear or Conv
weight is read the same way). Names go through diffusers' own single-file converter (``convert_ldm_unet_checkpoint``,
fed the parameter names in place of tensors), so every key maps or the file is refused; nothing is dropped.

Without a pipeline, LDM block numbers use the ``layers_per_block`` read from the names (the first downsampler's input
block), and conv kernels follow the diffusers UNet's layout: 3x3 for ``conv_in``, ``conv_out``, the resnets'
``conv1``/``conv2`` and the down/upsamplers; 1x1 for ``conv_shortcut``, and for the transformers' ``proj_in``/
``proj_out`` unless the file is for SDXL (``label_emb``) or SD2.x (1024-wide cross-attention), whose transformers
project with Linear layers. With a pipeline, its UNet config and module shapes decide.

**Fixed deltas** (:func:`add_fixed_deltas`) are added to the UNet's parameters while a LoRA is applied or trained on,
and never trained. In our kohya files they are ``lora_unet_<module>.diff`` / ``.diff_b`` (the names ComfyUI's
LoraLoader applies as weight and bias differences), their module paths in the ``redifine_fixed_deltas`` metadata.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping, Optional

import torch

from .lora_convert import PARTS, ModuleLora, Parts, bad_keys_message

PREFIX = "diffusion_model."
DELTA_METADATA = "redifine_fixed_deltas"
_KOHYA_DELTA = {"weight": "diff", "bias": "diff_b"}  # parameter -> the suffix ComfyUI applies as its difference
_LORA_SUFFIXES = ("lora_up.weight", "lora_down.weight", "alpha")
_DELTA_SUFFIXES = {"diff": "weight", "diff_b": "bias"}
_CONV3 = re.compile(r"^(conv_in|conv_out|.*\.resnets\.\d+\.conv[12]|.*\.(down|up)samplers\.0\.conv)$")
_CONV1 = re.compile(r"^.*\.conv_shortcut$")
_PROJ = re.compile(r"^.*\.attentions\.\d+\.proj_(in|out)$")


def is_comfyui_trainer_layout(keys: Any) -> bool:
    """Whether a file's keys use ComfyUI's generic diffusion-model names (what its Train LoRA node writes)."""
    return any(k.startswith(PREFIX) for k in keys)


def _split(raw: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{LDM module path: {suffix: tensor}}``; one ValueError for keys of another kind (LoHa, LoKr, OFT...)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in raw.items():
        rest = key[len(PREFIX):] if key.startswith(PREFIX) else None
        suffix = next((s for s in _LORA_SUFFIXES + tuple(_DELTA_SUFFIXES) if rest and rest.endswith("." + s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        modules.setdefault(rest[: -len(suffix) - 1], {})[suffix] = t
    if unknown:
        raise ValueError(bad_keys_message(source, unknown))
    return modules


def _layers_per_block(ldm_modules: Any) -> int:
    """The UNet's ``layers_per_block`` from LDM names: the first downsampler sits at input block lpb + 1."""
    ops = sorted(int(m.group(1)) for n in ldm_modules if (m := re.match(r"input_blocks\.(\d+)\.0\.op$", n)))
    if ops:
        return ops[0] - 1
    blocks = {int(m.group(1)) for n in ldm_modules if (m := re.match(r"input_blocks\.(\d+)\.", n))}
    return max(blocks) if blocks else 2


def _name_map(ldm_modules: list[str], unet_config: Any) -> dict[str, str]:
    """LDM parameter path -> diffusers parameter path, through diffusers' single-file UNet converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    names = {f"model.{PREFIX}{m}.{p}": f"{m}.{p}" for m in ldm_modules for p in ("weight", "bias")}
    try:
        converted = convert_ldm_unet_checkpoint(names, dict(unet_config))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"diffusers cannot map these diffusion-model names: {exc!r}") from exc
    return {ldm: dif for dif, ldm in converted.items() if isinstance(ldm, str)}


def _conv_shape(path: str, A: torch.Tensor, unet: Any, linear_proj: bool) -> Optional[tuple[int, int, int]]:
    """(in_channels, kh, kw) when ``path`` is a Conv2d (the pipeline's module, else the naming rules), else None."""
    if unet is not None:
        try:
            module = unet.get_submodule(path)
        except AttributeError:
            return None  # the fit check names it
        if isinstance(module, torch.nn.Conv2d):
            return (module.in_channels, *module.kernel_size)
        return None
    if _CONV3.match(path):
        if A.shape[1] % 9:
            return None
        return A.shape[1] // 9, 3, 3
    if _CONV1.match(path) or (_PROJ.match(path) and not linear_proj):
        return A.shape[1], 1, 1
    return None


def read_comfyui_trainer(raw: Mapping[str, torch.Tensor], source: str,
                         pipeline: Any = None) -> tuple[Parts, dict[str, torch.Tensor]]:
    """A ComfyUI Train LoRA file's tensors -> (``{part: {peft module path: ModuleLora}}``, fixed deltas keyed by the
    UNet parameter path). ``source`` names the file in errors; ``pipeline`` (optional) gives the UNet config and
    module shapes."""
    modules = _split(raw, source)
    unet = getattr(pipeline, "unet", None)
    sdxl = any(m.startswith("label_emb.") for m in modules)
    if unet is not None:
        config: Any = unet.config
    else:
        config = {"layers_per_block": _layers_per_block(modules), "class_embed_type": None,
                  "addition_embed_type": "text_time" if sdxl else None}
    try:
        names = _name_map(sorted(modules), config)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc
    widths = {int(t["lora_down.weight"].shape[1]) for m, t in modules.items()
              if m.endswith("attn2.to_k") and "lora_down.weight" in t}
    linear_proj = sdxl or 1024 in widths

    parts: Parts = {p: {} for p in PARTS}
    deltas: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for ldm, tensors in sorted(modules.items()):
        weight = names.get(f"{ldm}.weight")
        if weight is None:
            unmapped.append(PREFIX + ldm)
            continue
        path = weight[: -len(".weight")]
        for suffix, param in _DELTA_SUFFIXES.items():
            if suffix in tensors:
                deltas[f"{path}.{param}"] = tensors[suffix]
        lora = {s: tensors[s] for s in _LORA_SUFFIXES if s in tensors}
        if not lora:
            continue
        if "lora_up.weight" not in lora or "lora_down.weight" not in lora:
            side = "B (lora_up)" if "lora_up.weight" not in lora else "A (lora_down)"
            raise ValueError(f"{source}: module {PREFIX}{ldm} lacks its {side} matrix")
        A, B = lora["lora_down.weight"], lora["lora_up.weight"]
        if A.dim() == 2 and B.dim() == 2:
            conv = _conv_shape(path, A, unet, linear_proj)
            if conv is not None and A.shape[1] == conv[0] * conv[1] * conv[2]:
                A, B = A.reshape(A.shape[0], *conv), B.reshape(B.shape[0], B.shape[1], 1, 1)
        alpha = lora.get("alpha")
        parts["unet"][path] = ModuleLora(A, B, None if alpha is None else float(alpha.float().item()))
    if unmapped:
        raise ValueError(f"{source}: {len(unmapped)} of its {len(modules)} modules name no module of an SD1.x/SD2.x/"
                         f"SDXL UNet, e.g. {unmapped[:3]}")
    return parts, deltas


# ------------------------------------------------------------------------------------------------------ fixed deltas


def check_delta_keys(deltas: Mapping[str, Any], what: str) -> None:
    """One ValueError unless every key is a parameter path (``.weight``/``.bias``) holding a tensor."""
    for key, t in deltas.items():
        if key.rpartition(".")[2] not in _KOHYA_DELTA or not isinstance(t, torch.Tensor):
            raise ValueError(f"{what} key {key!r} must be a UNet parameter path ending in '.weight' or '.bias', "
                             "with a tensor")


def check_delta_fits(deltas: Mapping[str, torch.Tensor], unet: torch.nn.Module, source: str) -> None:
    """One ValueError unless every delta has a parameter of its shape in ``unet``."""
    params = dict(unet.named_parameters()) if deltas else {}
    bad = [f"{k} ({list(t.shape)} vs {list(params[k].shape) if k in params else 'no such parameter'})"
           for k, t in deltas.items() if k not in params or params[k].shape != t.shape]
    if bad:
        raise ValueError(f"{source}: {len(bad)} of its {len(deltas)} fixed deltas do not fit this UNet, "
                         f"e.g. {'; '.join(bad[:2])}")


def deltas_to_kohya(deltas: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Fixed deltas -> kohya-named tensors and the metadata value that names their module paths."""
    tensors, names = {}, {}
    for key, delta in deltas.items():
        module, _, param = key.rpartition(".")
        name = "lora_unet_" + module.replace(".", "_")
        names[name] = module
        tensors[f"{name}.{_KOHYA_DELTA[param]}"] = delta
    return tensors, json.dumps(names, sort_keys=True)


def deltas_from_kohya(raw: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our kohya files' fixed deltas (named in their metadata) split off the LoRA tensors; other ``.diff`` keys stay
    (and are refused as a full-weight difference network)."""
    try:
        names = json.loads(metadata.get(DELTA_METADATA) or "{}")
    except ValueError:
        names = {}
    suffixes = {v: k for k, v in _KOHYA_DELTA.items()}
    deltas, rest = {}, {}
    for key, t in raw.items():
        name, _, suffix = key.partition(".")
        if suffix in suffixes and name in names:
            deltas[f"{names[name]}.{suffixes[suffix]}"] = t
        else:
            rest[key] = t
    return rest, deltas


def add_fixed_deltas(model: torch.nn.Module, deltas: Mapping[str, torch.Tensor], scale: float = 1.0
                     ) -> Callable[[], None]:
    """Add ``scale * delta`` to each named parameter of ``model`` (call before peft layers are injected: the paths
    are the plain model's). The parameters get new tensors; the returned function puts the original ones back, so
    the model is restored exactly. The deltas are not parameters and never train."""
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def restore() -> None:
        while saved:
            prm, data = saved.pop()
            prm.data = data

    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                try:
                    prm = model.get_parameter(name)
                except AttributeError as exc:
                    raise ValueError(f"fixed delta {name!r} names no parameter of this model") from exc
                if delta.shape != prm.shape:
                    raise ValueError(f"fixed delta {name!r} has shape {list(delta.shape)}, its parameter "
                                     f"{list(prm.shape)}")
                new = (prm.data.float() + scale * delta.to(prm.device, torch.float32)).to(prm.dtype)
                saved.append((prm, prm.data))
                prm.data = new
    except BaseException:
        restore()
        raise
    return restore
