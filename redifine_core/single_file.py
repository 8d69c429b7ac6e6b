"""Single-file SD1.x / SD2.x / SDXL checkpoints (original "ckpt" layout, ``.safetensors`` only), loaded offline.

The architecture is detected from the key names (SD1.x: ``cond_stage_model.transformer.*``; SD2.x: OpenCLIP
``cond_stage_model.model.*``; SDXL: ``conditioner.embedders.0/1.*``), the matching configs bundled under
``redifine_core/configs/<kind>/`` (or ``config_dir``) give the module shapes, and the weights are converted with
diffusers' own original->diffusers converters. The CLIP tokenizer comes from ``tokenizer_dir`` (a folder holding
``vocab.json`` + ``merges.txt`` or ``tokenizer.json``, or a diffusers model folder with a ``tokenizer/`` subfolder),
``$REDIFINE_TOKENIZER_DIR``, a ComfyUI checkout, and otherwise the CLIP vocabulary bundled with the package
(``clip_vocab``) for any text encoder with CLIP's 49408 ids; its maximum length is always forced to the text encoder's
77 positions.

SD2.x: whether a checkpoint predicts epsilon (the 512-px "base" models) or v (the 768-px models) cannot be read from
its weights. The default is ``"v_prediction"`` at 768 px (SD 2.0-v / 2.1, the flagship releases) unless the file
stores ``global_step == 875000`` (2.0-base); pass ``prediction_type="epsilon"`` for the 512-px base models.

**Host memory.** Weights go straight into the target dtype, one component and one tensor at a time: each module is
built on the meta device (accelerate's ``init_empty_weights``), each tensor is read at the offset the safetensors
header gives and cast as it is read, diffusers' converter renames the tensors (views, no copies), and
``load_state_dict(assign=True)`` adopts them. Every check that needs no weights runs before the first weight is read.
Our own header reader replaces ``safetensors.safe_open`` / ``load_file``, whose mmap counts every touched page of the
file in the process's RSS on top of the cast copies; text encoders load first, the UNet last; on a GPU each component
moves there as soon as it is built. Measured peaks: docs/benchmarks.md.

**Why not diffusers' public ``from_single_file``.** It reads the whole file into one dict of tensors before
converting, so its peak is the file plus the model (docs/benchmarks.md). The key renaming is still diffusers' own
(``diffusers.loaders.single_file_utils``). ``tests/test_single_file.py::
test_the_reason_for_our_reader_diffusers_from_single_file_holds_the_whole_file_at_once`` fails when diffusers stops
holding the whole file at once; then this reader should give way to ``from_single_file``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from .clip_tokenizer import load_clip_tokenizer

PathLike = Union[str, os.PathLike]
PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_ROOT = PACKAGE_DIR / "configs"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
# one cross-attention key projection that exists in every SD1/SD2/SDXL UNet; its input width is the context dim
_CONTEXT_KEYS = (
    _UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",  # SD1.x / SD2.x
    _UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",  # SDXL (first down block has no attention)
)
_TEXT_PREFIXES = {  # kind -> [(config subfolder, transformers class, key prefix)]
    "sd1": [("text_encoder", "CLIPTextModel", "cond_stage_model.transformer.")],
    "sd2": [("text_encoder", "CLIPTextModel", "cond_stage_model.model.")],
    "sdxl": [("text_encoder", "CLIPTextModel", "conditioner.embedders.0.transformer."),
             ("text_encoder_2", "CLIPTextModelWithProjection", "conditioner.embedders.1.model.")],
}
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


# ------------------------------------------------------------------------------------------------ safetensors reader


class SafetensorsFile:
    """The header of a ``.safetensors`` file, and its tensors read one at a time with plain file reads (no mmap)."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist or is not a file; expected a .safetensors checkpoint")
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(8)
                if len(raw) < 8:
                    raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", raw)
                if n > min(_MAX_HEADER, size - 8):
                    raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
                header = json.loads(fh.read(n).decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            self.data_start = 8 + n
            self.metadata = header.pop("__metadata__", None) or {}
            self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            for key, entry in header.items():
                dtype = _ST_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
                if dtype is None:
                    raise ValueError(f"tensor {key!r} has an unknown dtype {entry!r}")
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(v) for v in entry["data_offsets"])
                nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                if end - begin != nbytes or begin < 0 or self.data_start + end > size:
                    raise ValueError(f"tensor {key!r} lies outside the file (truncated?)")
                self.entries[key] = (dtype, shape, self.data_start + begin, nbytes)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as exc:
            raise ValueError(
                f"{self.path} is not a readable safetensors file ({type(exc).__name__}: {exc}); expected an SD1.x, "
                "SD2.x or SDXL checkpoint in the original single-file layout, saved as .safetensors"
            ) from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[1] for k, v in self.entries.items()}

    def read(self, keys: list[str], dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """The tensors ``keys``; floating-point ones cast to ``dtype`` as they are read (one tensor at a time)."""
        out: dict[str, torch.Tensor] = {}
        scratch = bytearray()  # one reused buffer for the file's bytes of tensors that get cast (see below)
        with open(self.path, "rb", buffering=0) as fh:
            for key in keys:
                file_dtype, shape, offset, nbytes = self.entries[key]
                cast = dtype is not None and file_dtype.is_floating_point and file_dtype != dtype
                if not cast:  # read straight into the tensor that is kept
                    value = torch.empty(shape, dtype=file_dtype)
                    self._read_into(fh, key, offset, memoryview(value.reshape(-1).view(torch.uint8).numpy()))
                    out[key] = value
                    continue
                # A fresh temporary per tensor is not returned to the OS reliably (glibc keeps freed heap chunks
                # between the kept copies: measured 1.5x instead of 1.0x of the cast weights), so reuse one buffer.
                if len(scratch) < nbytes:
                    scratch = bytearray(nbytes)
                self._read_into(fh, key, offset, memoryview(scratch)[:nbytes])
                if nbytes == 0:
                    out[key] = torch.empty(shape, dtype=dtype)
                    continue
                src = torch.frombuffer(scratch, dtype=file_dtype, count=math.prod(shape)).view(shape)
                out[key] = src.to(dtype)
                del src
        return out

    def _read_into(self, fh: Any, key: str, offset: int, view: memoryview) -> None:
        fh.seek(offset)
        got = 0
        while got < len(view):
            n = fh.readinto(view[got:])
            if not n:
                raise ValueError(f"{self.path}: tensor {key!r} is cut short (truncated file?)")
            got += n


def _reject_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path}: refusing to load a pickle-based checkpoint ({path.suffix}); pickle files can run arbitrary "
            "code. Convert it to .safetensors first (for example with a trusted converter) and load that."
        )


def checkpoint_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in a safetensors file, read from its header only (no weights loaded)."""
    path = Path(path)
    _reject_pickle(path)
    shapes = SafetensorsFile(path).shapes()
    if not shapes:
        raise ValueError(f"{path} holds no tensors; expected an SD1.x, SD2.x or SDXL checkpoint")
    return shapes


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def detect_architecture(tensors: Mapping[str, Any]) -> str:
    """"sd1" | "sd2" | "sdxl" from the key names (and the context width) of an original-layout state dict.

    ``tensors`` maps keys to tensors or shapes. Raises ``ValueError`` describing the expected layout otherwise.
    """
    keys = tensors.keys()
    has_unet = any(k.startswith(_UNET) for k in keys)
    context = next((_shape(tensors[k])[-1] for k in _CONTEXT_KEYS if k in tensors), None)
    if any(k.startswith("conditioner.embedders.1.") for k in keys) and any(
        k.startswith("conditioner.embedders.0.transformer.") for k in keys
    ):
        kind = "sdxl"
    elif any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ValueError("this looks like an SDXL refiner checkpoint (one OpenCLIP encoder); only SDXL base is supported")
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
        kind = "sd1"
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        kind = "sd2"
    elif has_unet and context in (768, 1024):  # a UNet without its text encoder: tell SD1/SD2 by context width
        kind = "sd1" if context == 768 else "sd2"
    else:
        sample = ", ".join(sorted(keys)[:3])
        raise ValueError(
            "unknown checkpoint layout: expected an original-layout SD1.x (cond_stage_model.transformer.*), SD2.x "
            "(cond_stage_model.model.*) or SDXL (conditioner.embedders.0/1.*) checkpoint with UNet keys under "
            f"{_UNET}*; found keys like: {sample}"
        )
    if not has_unet:
        raise ValueError(f"the checkpoint has text-encoder keys for {kind} but no UNet keys ({_UNET}*)")
    return kind


# ------------------------------------------------------------------------------------------------------------ load


def read_json(path: Path) -> dict:
    """A JSON config file; a missing or broken one is a one-line error naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing config file {path}") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def single_file_components(
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    tokenizer_dir: Optional[PathLike] = None,
    config_dir: Optional[PathLike] = None,
    prediction_type: Optional[str] = None,
) -> dict[str, Any]:
    """An original-layout .safetensors file as the fields of a ``models.Pipeline`` (``Pipeline(**fields)``), on
    ``device`` in ``dtype`` (see the module docstring). ``models.load_pipeline`` builds the Pipeline, so this module
    does not depend on it.

    The VAE is kept in float32 when ``dtype`` is float16 and its config sets ``force_upcast``.
    """
    import transformers

    path = Path(path)
    _reject_pickle(path)
    st = SafetensorsFile(path)
    shapes = st.shapes()
    if not shapes:
        raise ValueError(f"{path} holds no tensors; expected an SD1.x, SD2.x or SDXL checkpoint")
    kind = detect_architecture(shapes)
    cfg_dir = Path(config_dir).expanduser() if config_dir is not None else CONFIG_ROOT / kind
    if not (cfg_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"config folder {cfg_dir} has no model_index.json (config_dir must be a diffusers-style config folder)")
    index = json.loads((cfg_dir / "model_index.json").read_text())
    unet_config = read_json(cfg_dir / "unet" / "config.json")
    vae_config = read_json(cfg_dir / "vae" / "config.json")
    context = next((shapes[k][-1] for k in _CONTEXT_KEYS if k in shapes), None)
    if context is not None and context != unet_config.get("cross_attention_dim"):
        hint = "" if config_dir is not None else " (pass config_dir= with matching configs for non-standard models)"
        raise ValueError(
            f"{path}: detected {kind} keys but the UNet cross-attention width is {context}; the configs in {cfg_dir} "
            f"expect {unet_config.get('cross_attention_dim')}{hint}"
        )
    if config_dir is None and kind == "sd2":
        prediction_type = prediction_type or _sd2_prediction_type(st)
        if prediction_type == "epsilon":
            unet_config["sample_size"] = 64  # the 512-px base models
    if not any(k.startswith(_VAE) for k in shapes):
        raise ValueError(f"{path}: no VAE weights ({_VAE}*) in the checkpoint")
    encoders = []
    for folder, class_name, prefix in _TEXT_PREFIXES[kind]:
        if not any(k.startswith(prefix) for k in shapes):
            raise ValueError(f"{path}: no text-encoder weights under {prefix}* in the checkpoint")
        config = transformers.CLIPTextConfig.from_pretrained(str(cfg_dir / folder), local_files_only=True)
        encoders.append((folder, class_name, prefix, config))
    tokenizers = [load_clip_tokenizer(name.replace("text_encoder", "tokenizer"), config, cfg_dir, tokenizer_dir, path)
                  for name, _, _, config in encoders]
    scheduler = _load_scheduler(cfg_dir, index, prediction_type)

    vae_dtype = torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", False) else dtype
    text = [_clip_from_file(st, class_name, prefix, config, dtype, path).to(device)
            for _, class_name, prefix, config in encoders]
    vae = _vae_from_file(st, vae_config, vae_dtype, path).to(device)
    unet = _unet_from_file(st, unet_config, dtype, path).to(device)
    return dict(
        unet=unet, vae=vae, text_encoder=text[0], tokenizer=tokenizers[0], scheduler=scheduler, kind=kind,
        source=str(path), text_encoder_2=text[1] if len(text) > 1 else None,
        tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None, device=device, dtype=dtype,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)) and kind == "sdxl",
    )


def _sd2_prediction_type(st: SafetensorsFile) -> str:
    """v-prediction unless the file stores SD 2.0-base's global_step (875000); see the module docstring."""
    if "global_step" in st.entries:
        step = st.read(["global_step"])["global_step"]
        if step.numel() == 1 and int(step.item()) == 875000:
            return "epsilon"
    return "v_prediction"


def _component(st: SafetensorsFile, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return st.read([k for k in st.entries if k.startswith(prefix)], dtype)


def _assign_weights(model: Any, state_dict: dict, what: str, path: Path) -> Any:
    """Load ``state_dict`` into a model built on the meta device; every parameter must be provided."""
    try:
        result = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(
            f"{path}: the {what} weights do not fit the configured architecture: {' '.join(first[:3])[:600]}"
        ) from None
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if missing or unexpected or still_meta:
        missing = missing or still_meta
        raise ValueError(
            f"{path}: the {what} weights do not match the configured architecture: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model.eval()


def _unet_from_file(st: SafetensorsFile, config: dict, dtype: torch.dtype, path: Path) -> Any:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = convert_ldm_unet_checkpoint(_component(st, _UNET, dtype), config)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    return _assign_weights(unet, state, "UNet", path)


def _vae_from_file(st: SafetensorsFile, config: dict, dtype: torch.dtype, path: Path) -> Any:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = convert_ldm_vae_checkpoint(_component(st, _VAE, dtype), config)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    return _assign_weights(vae, state, "VAE", path)


def _clip_from_file(st: SafetensorsFile, class_name: str, prefix: str, config: Any, dtype: torch.dtype,
                    path: Path) -> Any:
    """A CLIP text encoder from HF-layout (``<prefix>text_model.*``) or OpenCLIP-layout (``<prefix>transformer.*``) keys."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    with init_empty_weights():
        model = getattr(transformers, class_name)(config)
    tensors = _component(st, prefix, dtype)
    if prefix.endswith(".transformer."):
        state = convert_ldm_clip_checkpoint(tensors, prefix)
    else:
        state = convert_open_clip_checkpoint(model, tensors, prefix=prefix)
    del tensors
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    elif not any(k.startswith("text_model.") for k in state):
        state = {("text_model." + k if k != "text_projection.weight" else k): v for k, v in state.items()}
    return _assign_weights(model, state, f"text encoder ({prefix}*)", path)


def _load_scheduler(cfg_dir: Path, index: dict, prediction_type: Optional[str]) -> Any:
    import diffusers

    entry = index.get("scheduler") or [None, None]
    cls = getattr(diffusers, str(entry[1]), None)
    if cls is None:
        raise ValueError(f"{cfg_dir / 'model_index.json'}: unknown scheduler class {entry[1]!r}")
    config = read_json(cfg_dir / "scheduler" / "scheduler_config.json")
    return cls.from_config(
        config,
        timestep_spacing=config.get("timestep_spacing", "leading"),
        prediction_type=prediction_type or config.get("prediction_type", "epsilon"),
    )
