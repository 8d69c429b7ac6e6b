"""Random-weight full-size SD1.5 / SDXL models from the bundled configs, as modules or as original-layout single files.

Full-size evidence (tests, ``bench/``) needs the real architectures without downloading anything. This module builds
them from ``redifine_core/configs/<kind>/`` on the meta device and fills every tensor from a generator seeded by the
tensor's name, so the same call always gives the same weights and nothing is ever initialised twice (diffusers'
default init of 1B fp32 parameters takes minutes on a small CPU; this takes seconds).

* :func:`build_components` -> the modules (UNet, VAE, text encoders), random weights, on any device and dtype.
* :func:`write_single_file` -> an original-layout (LDM / "ckpt") ``.safetensors`` file, written tensor by tensor so the
  writer never holds the model: ``safetensors.torch.save_file`` needs every tensor in memory at once (6.9 GB for
  SDXL), which would spoil the memory figures measured right after.
* :func:`write_tokenizer` -> a word-level CLIP vocabulary folder to pass as ``load_pipeline(tokenizer_dir=...)``
  (single files carry no vocabulary and the real one is not bundled).
* ``sd1_to_original`` / ``sdxl_to_original`` and the per-part converters: the inverse of diffusers'
  original->diffusers converters (diffusers ships no such direction), verified by round trips through diffusers' own.

Random weights: biases 0, 1-D weights (norms) 1, every other tensor normal with std 1/sqrt(fan_in) (0.01 for
position embeddings). Activations then keep unit scale through the network, so fp16 and bf16 runs are finite.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import torch

from .atomic import atomic_path

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]
KINDS = ("sd1", "sdxl")

_RESNET = [  # (diffusers, original) inside a UNet resnet block
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _rename_resnet(suffix: str) -> str:
    for new, old in _RESNET:
        if suffix.startswith(new + "."):
            return old + suffix[len(new):]
    raise KeyError(f"unexpected resnet key {suffix!r}")


def unet_to_original(unet) -> StateDict:
    """UNet2DConditionModel state dict -> ``model.diffusion_model.*`` keys."""
    sd = unet.state_dict()
    layers = unet.config.layers_per_block
    has_up_attn = [hasattr(b, "attentions") for b in unet.up_blocks]
    out: StateDict = {}

    def put(key: str, value: torch.Tensor) -> None:
        out["model.diffusion_model." + key] = value

    for key, value in sd.items():
        parts = key.split(".")
        module = ".".join(parts[:-1])
        if module in _UNET_TOP:
            put(f"{_UNET_TOP[module]}.{parts[-1]}", value)
        elif parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.*
                put(f"input_blocks.{(layers + 1) * (i + 1)}.0.op.{'.'.join(parts[5:])}", value)
                continue
            j = int(parts[3])
            block = (layers + 1) * i + j + 1
            if kind == "resnets":
                put(f"input_blocks.{block}.0.{_rename_resnet(rest)}", value)
            else:
                put(f"input_blocks.{block}.1.{rest}", value)
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                put(f"middle_block.{2 * j}.{_rename_resnet(rest)}", value)
            else:
                put(f"middle_block.1.{rest}", value)
        elif parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "upsamplers":  # up_blocks.i.upsamplers.0.conv.*
                block = (layers + 1) * i + layers
                put(f"output_blocks.{block}.{2 if has_up_attn[i] else 1}.{rest}", value)
                continue
            j = int(parts[3])
            block = (layers + 1) * i + j
            if kind == "resnets":
                put(f"output_blocks.{block}.0.{_rename_resnet(rest)}", value)
            else:
                put(f"output_blocks.{block}.1.{rest}", value)
        else:
            raise KeyError(f"unexpected UNet key {key!r}")
    return out


_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def vae_to_original(vae) -> StateDict:
    """AutoencoderKL state dict -> ``first_stage_model.*`` keys (attention projections as 1x1 convs)."""
    n_up = len(vae.config.up_block_types)
    out: StateDict = {}
    for key, value in vae.state_dict().items():
        new = key
        for d, o in (("conv_norm_out", "norm_out"), ("conv_shortcut", "nin_shortcut")):
            new = new.replace(d, o)
        parts = new.split(".")
        if parts[0] in ("encoder", "decoder") and parts[1] == "down_blocks":
            i = parts[2]
            if parts[3] == "resnets":
                new = f"{parts[0]}.down.{i}.block.{'.'.join(parts[4:])}"
            else:  # downsamplers.0.conv.*
                new = f"{parts[0]}.down.{i}.downsample.{'.'.join(parts[5:])}"
        elif parts[0] in ("encoder", "decoder") and parts[1] == "up_blocks":
            i = n_up - 1 - int(parts[2])
            if parts[3] == "resnets":
                new = f"{parts[0]}.up.{i}.block.{'.'.join(parts[4:])}"
            else:
                new = f"{parts[0]}.up.{i}.upsample.{'.'.join(parts[5:])}"
        elif parts[0] in ("encoder", "decoder") and parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
            else:  # attentions.0.*
                rest = ".".join(parts[4:])
                for d, o in _VAE_ATTN:
                    if rest.startswith(d):
                        rest = o + rest[len(d):]
                        break
                new = f"{parts[0]}.mid.attn_1.{rest}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_to_original(text_encoder, prefix: str) -> StateDict:
    """CLIPTextModel (HF layout) -> ``<prefix>text_model.*`` keys, e.g. prefix ``cond_stage_model.transformer.``."""
    out: StateDict = {}
    for key, value in text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + key] = value
    return out


_OPEN_CLIP_LAYER = [
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
]


def open_clip_to_original(text_encoder, prefix: str) -> StateDict:
    """CLIPTextModel(WithProjection) (HF layout) -> OpenCLIP keys under ``prefix`` (e.g. ``cond_stage_model.model.``)."""
    sd = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in text_encoder.state_dict().items()}
    out: StateDict = {}
    for key, value in sd.items():
        if key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.split(".")[-1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            parts = key.split(".")
            i, rest = parts[2], ".".join(parts[3:])
            base = f"{prefix}transformer.resblocks.{i}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                kind = rest.split(".")[-1]  # weight | bias
                if rest.startswith("self_attn.q_proj"):
                    pre = f"encoder.layers.{i}.self_attn."
                    out[base + f"attn.in_proj_{kind}"] = torch.cat(
                        [sd[pre + f"{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0
                    )
                continue
            for d, o in _OPEN_CLIP_LAYER:
                if rest.startswith(d):
                    rest = o + rest[len(d):]
                    break
            else:
                raise KeyError(f"unexpected text-encoder key {key!r}")
            out[base + rest] = value
        elif key == "embeddings.position_ids":
            continue
        else:
            raise KeyError(f"unexpected text-encoder key {key!r}")
    return out


def sd1_to_original(pipe) -> StateDict:
    """A StableDiffusionPipeline as one original-layout state dict (SD1.x: CLIP text encoder)."""
    return {
        **unet_to_original(pipe.unet),
        **vae_to_original(pipe.vae),
        **clip_to_original(pipe.text_encoder, "cond_stage_model.transformer."),
    }


def sdxl_to_original(pipe) -> StateDict:
    """A StableDiffusionXLPipeline as one original-layout state dict (two text encoders under ``conditioner``)."""
    return {
        **unet_to_original(pipe.unet),
        **vae_to_original(pipe.vae),
        **clip_to_original(pipe.text_encoder, "conditioner.embedders.0.transformer."),
        **open_clip_to_original(pipe.text_encoder_2, "conditioner.embedders.1.model."),
    }


# ------------------------------------------------------------------------------------------------- random weights


def _config_dir(kind: str, config_dir: Optional[PathLike]) -> Path:
    from .models import CONFIG_ROOT

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    folder = Path(config_dir) if config_dir is not None else CONFIG_ROOT / kind
    if not (folder / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"config folder {folder} has no unet/config.json (expected a diffusers-style config folder)")
    return folder


def _seed_of(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def random_tensor(name: str, shape: Iterable[int], dtype: torch.dtype = torch.float32, device: Any = "cpu",
                  seed: int = 0) -> torch.Tensor:
    """The random value of tensor ``name`` (see the module docstring); the same name and seed give the same values."""
    shape = tuple(int(s) for s in shape)
    if not dtype.is_floating_point:  # e.g. CLIP's position_ids buffer
        return torch.arange(shape[-1], device=device).expand(shape).to(dtype).contiguous()
    leaf = name.rsplit(".", 1)[-1]
    if leaf.endswith("bias") or len(shape) == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype, device=device)
    std = 0.01 if "position" in name else 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
    g = torch.Generator(device=device).manual_seed(_seed_of(name, seed))
    out = torch.randn(shape, generator=g, dtype=torch.float32, device=device)
    return out.mul_(std).to(dtype)


def _meta_components(kind: str, config_dir: Optional[PathLike] = None) -> dict:
    """UNet, VAE and text encoder(s) of ``kind`` built from configs on the meta device (no memory, no init)."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = _config_dir(kind, config_dir)
    out: dict = {}
    with init_empty_weights(include_buffers=False):
        out["unet"] = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        out["vae"] = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
        te_classes = [("text_encoder", "CLIPTextModel")]
        if kind == "sdxl":
            te_classes.append(("text_encoder_2", "CLIPTextModelWithProjection"))
        for name, cls in te_classes:
            config = transformers.CLIPTextConfig.from_pretrained(str(folder / name), local_files_only=True)
            out[name] = getattr(transformers, cls)(config)
    return out


def build_components(kind: str, device: Any = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                     config_dir: Optional[PathLike] = None) -> dict:
    """Random-weight ``unet``, ``vae``, ``text_encoder`` (and SDXL's ``text_encoder_2``) of ``kind``, in eval mode.

    Built on the meta device, then materialised on ``device`` and filled tensor by tensor in ``dtype``: the peak
    memory is the model's size, and a full-size SDXL builds in seconds on a GPU.
    """
    device = torch.device(device)
    comps = _meta_components(kind, config_dir)
    for part, module in comps.items():
        for mod_name, sub in module.named_modules():
            for leaf, param in list(sub._parameters.items()):
                if param is not None:
                    value = random_tensor(f"{part}.{mod_name}.{leaf}".replace("..", "."), param.shape, dtype, device,
                                          seed)
                    sub._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        module.to(device).eval()
    return comps


def _original_shapes(kind: str, config_dir: Optional[PathLike] = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the original-layout single file of ``kind`` (converted from meta modules: no memory)."""
    from types import SimpleNamespace

    comps = SimpleNamespace(**_meta_components(kind, config_dir))
    sd = sdxl_to_original(comps) if kind == "sdxl" else sd1_to_original(comps)
    return {k: tuple(v.shape) for k, v in sd.items() if v.is_floating_point()}


_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def write_single_file(kind: str, path: PathLike, dtype: torch.dtype = torch.float16, seed: int = 0,
                      config_dir: Optional[PathLike] = None) -> Path:
    """Write a random-weight original-layout ``.safetensors`` checkpoint of ``kind`` ("sd1" | "sdxl"); returns ``path``.

    The file is what a user's SD1.5 / SDXL checkpoint looks like to :func:`redifine_core.models.load_pipeline`
    (2.1 GB for SD1.5 and 6.9 GB for SDXL in fp16). Written atomically, one tensor in memory at a time, in the
    safetensors format (8-byte little-endian header length, JSON header, raw little-endian tensor bytes).
    """
    if dtype not in _ST_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {tuple(_ST_DTYPES)}")
    shapes = _original_shapes(kind, config_dir)
    keys = sorted(shapes)
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "redifine_random_model": kind, "seed": str(seed)}}
    offset = 0
    for k in keys:
        n = math.prod(shapes[k]) * itemsize
        header[k] = {"dtype": _ST_DTYPES[dtype], "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for k in keys:
            value = random_tensor(k, shapes[k], dtype, "cpu", seed).contiguous()
            fh.write(memoryview(value.view(torch.uint8).numpy()))
            del value
    return path


def write_tokenizer(folder: PathLike, words: Optional[Iterable[str]] = None) -> Path:
    """A word-level CLIP vocabulary (``vocab.json``, ``merges.txt``) in ``folder``, valid for any CLIP text encoder.

    Its ids are all below the real CLIP vocabulary size, so it drives the full-size text encoders; pass ``folder``
    as ``load_pipeline(..., tokenizer_dir=folder)``.
    """
    from .tiny import TINY_WORDS
    from .toy.word_tokenizer import write_word_tokenizer

    return write_word_tokenizer(list(words) if words is not None else TINY_WORDS, folder, max_length=77)


def random_pipeline(kind: str, device: Any = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                    tokenizer_dir: Optional[PathLike] = None, config_dir: Optional[PathLike] = None) -> Any:
    """A :class:`~redifine_core.models.Pipeline` of ``kind`` with random weights, built in memory on ``device``.

    The scheduler is the bundled config's; the tokenizers are :func:`write_tokenizer`'s vocabulary (written to a temp
    folder unless ``tokenizer_dir`` holds one). Same modules as loading :func:`write_single_file`'s file, without the
    file: what a GPU benchmark needs in seconds.
    """
    import tempfile

    import diffusers
    from transformers import CLIPTokenizer

    from .models import Pipeline

    folder = _config_dir(kind, config_dir)
    index = json.loads((folder / "model_index.json").read_text())
    sched_cls = getattr(diffusers, index["scheduler"][1])
    scheduler = sched_cls.from_config(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    if tokenizer_dir is None:
        tokenizer_dir = write_tokenizer(tempfile.mkdtemp(prefix="redifine_random_tok_"))
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, model_max_length=77)
    comps = build_components(kind, device, dtype, seed, config_dir)
    pipe = Pipeline(
        unet=comps["unet"], vae=comps["vae"], text_encoder=comps["text_encoder"], tokenizer=tokenizer,
        scheduler=scheduler, kind=kind, source=f"random:{kind}:{seed}", text_encoder_2=comps.get("text_encoder_2"),
        tokenizer_2=tokenizer if kind == "sdxl" else None, device=torch.device(device), dtype=dtype,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)) and kind == "sdxl",
    )
    return pipe.to(device, dtype)
