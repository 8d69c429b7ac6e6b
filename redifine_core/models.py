"""Load a text-to-image pipeline offline: a diffusers folder, a single-file SD1.x/SD2.x/SDXL checkpoint, or the toy model.

CONTRACT (filled in by issue 2):

    @dataclass
    class Pipeline:
        unet: UNet2DConditionModel
        vae: AutoencoderKL
        text_encoder: CLIPTextModel
        tokenizer: CLIPTokenizer
        scheduler: SchedulerMixin           # the checkpoint's own noise scheduler (training uses it)
        kind: str                           # "sd1" | "sd2" | "sdxl" | "toy"
        source: str
        text_encoder_2: CLIPTextModelWithProjection | None = None   # SDXL
        tokenizer_2: CLIPTokenizer | None = None                    # SDXL
        device: torch.device
        dtype: torch.dtype
        vae_scale_factor: int   (property: 2 ** (len(vae.config.block_out_channels) - 1))
        default_size: int       (property: the resolution the model was trained at, e.g. 512, 1024, 32 for toy)
        prediction_type: str    (property: "epsilon" | "v_prediction")
        is_sdxl: bool           (property)
        def to(self, device=None, dtype=None) -> "Pipeline"
        @classmethod from_diffusers(cls, pipe, kind=None, source="") -> "Pipeline"   # wrap a diffusers pipeline object

    def load_pipeline(source: str | os.PathLike, device=None, dtype=None, tokenizer_dir=None) -> Pipeline
    def default_device() -> torch.device      # cuda if available else cpu

Additions beyond the contract: ``load_pipeline(..., config_dir=None, prediction_type=None)``,
``Pipeline.force_zeros_for_empty_prompt`` (SDXL), ``Pipeline.to_diffusers()``, ``detect_architecture``,
``checkpoint_shapes``, ``TOY_MODEL_DIR`` and ``CONFIG_ROOT``.

Single-file checkpoints (original SD layout, ``.safetensors`` only) are loaded fully offline: the architecture is
detected from the key names (SD1.x: ``cond_stage_model.transformer.*``; SD2.x: OpenCLIP ``cond_stage_model.model.*``;
SDXL: ``conditioner.embedders.0/1.*``), the matching configs bundled under ``redifine_core/configs/<kind>/`` (or
``config_dir``) give the module shapes, and the weights are converted with diffusers' own original->diffusers
converters. The CLIP tokenizer vocabulary is not bundled: it comes from ``tokenizer_dir`` (a folder holding
``vocab.json`` + ``merges.txt`` or ``tokenizer.json``, such as ComfyUI's ``comfy/sd1_tokenizer``, or a diffusers model
folder with a ``tokenizer/`` subfolder), ``$REDIFINE_TOKENIZER_DIR``, or a ComfyUI checkout; its maximum length is
always forced to the text encoder's 77 positions.

SD2.x: whether a checkpoint predicts epsilon (the 512-px "base" models) or v (the 768-px models) cannot be read from
its weights. The default is ``"v_prediction"`` at 768 px (SD 2.0-v / 2.1, the flagship releases) unless the file
stores ``global_step == 875000`` (2.0-base); pass ``prediction_type="epsilon"`` for the 512-px base models.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

PathLike = Union[str, os.PathLike]

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_ROOT = PACKAGE_DIR / "configs"
TOY_MODEL_DIR = PACKAGE_DIR / "toy" / "model"
KINDS = ("sd1", "sd2", "sdxl", "toy")
PREDICTION_TYPES = ("epsilon", "v_prediction")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

_UNET = "model.diffusion_model."
# one cross-attention key projection that exists in every SD1/SD2/SDXL UNet; its input width is the context dim
_CONTEXT_KEYS = (
    _UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",  # SD1.x / SD2.x
    _UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",  # SDXL (first down block has no attention)
)
_CONTEXT_DIM = {"sd1": 768, "sd2": 1024, "sdxl": 2048}


def default_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Pipeline:
    """The components of a Stable Diffusion (1.x, 2.x, XL) text-to-image model, plus what the sampler needs to know."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    kind: str
    source: str
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt is a zero embedding, not encoded ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Pipeline.kind={self.kind!r} is not one of {KINDS}")
        if self.kind == "sdxl" and (self.text_encoder_2 is None or self.tokenizer_2 is None):
            raise ValueError("Pipeline.kind='sdxl' needs text_encoder_2 and tokenizer_2")
        self.device = torch.device(self.device)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD, 2 for the toy model)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_scale_factor(self) -> int:
        """Latent cells per cell of the UNet's coarsest feature map along one side."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """The resolution the model was trained at (UNet sample size times the VAE factor)."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def modules(self) -> list:
        """The torch modules of the pipeline (UNet, VAE, text encoders)."""
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    def to(self, device: Any = None, dtype: Optional[torch.dtype] = None) -> "Pipeline":
        """Move (and cast) every module in place; returns self. A VAE with ``force_upcast`` stays float32 under fp16."""
        device = torch.device(device) if device is not None else self.device
        dtype = dtype if dtype is not None else self.dtype
        vae_dtype = dtype
        if dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            vae_dtype = torch.float32
        for module, want in ((self.unet, dtype), (self.text_encoder, dtype), (self.text_encoder_2, dtype),
                             (self.vae, vae_dtype)):
            if module is not None:
                _move(module, device, want)
        self.device, self.dtype = device, dtype
        return self

    @classmethod
    def from_diffusers(cls, pipe: Any, kind: Optional[str] = None, source: str = "") -> "Pipeline":
        """Wrap a diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (no safety checker is kept)."""
        te2 = getattr(pipe, "text_encoder_2", None)
        if kind is None:
            kind = "sdxl" if te2 is not None else _sd_kind(pipe.unet.config)
        return cls(
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            scheduler=pipe.scheduler,
            kind=kind,
            source=source,
            text_encoder_2=te2,
            tokenizer_2=getattr(pipe, "tokenizer_2", None),
            device=pipe.unet.device,
            dtype=pipe.unet.dtype,
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)) if te2 else False,
        )

    def to_diffusers(self) -> Any:
        """A diffusers pipeline object sharing these modules (for comparisons; its scheduler is a copy)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        if self.is_sdxl:
            pipe = StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=scheduler,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _move(module: Any, device: torch.device, dtype: torch.dtype) -> None:
    """``module.to`` that only casts when needed (diffusers warns on every cast of a model)."""
    if module.dtype != dtype:
        module.to(dtype=dtype)
    if module.device != device:
        module.to(device=device)


def _sd_kind(unet_config: Any) -> str:
    return "sd2" if unet_config.cross_attention_dim == 1024 else "sd1"


# ----------------------------------------------------------------------------------------------------------- entry


def load_pipeline(
    source: PathLike,
    device: Any = None,
    dtype: Optional[torch.dtype] = None,
    tokenizer_dir: Optional[PathLike] = None,
    config_dir: Optional[PathLike] = None,
    prediction_type: Optional[str] = None,
) -> Pipeline:
    """Load ``source`` offline: ``"toy"``, a diffusers folder (``model_index.json``) or a single-file ``.safetensors``.

    ``device`` defaults to :func:`default_device`, ``dtype`` to float32. ``tokenizer_dir`` and ``config_dir`` only
    matter for single files (see the module docstring); ``prediction_type`` ("epsilon" | "v_prediction") overrides
    the scheduler's, e.g. for SD2.x base models. Nothing is ever fetched from a model hub.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch.dtype")

    if str(source) == "toy":
        if not (TOY_MODEL_DIR / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the toy model weights are missing ({TOY_MODEL_DIR / 'model_index.json'} does not exist); "
                "build them with `python -m redifine_core.toy.train`"
            )
        pipe = _load_diffusers_folder(TOY_MODEL_DIR, kind="toy", source="toy")
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"model source {str(source)!r} does not exist; expected 'toy', a diffusers folder with "
                "model_index.json, or a single-file .safetensors checkpoint"
            )
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"{path} is a folder without model_index.json; expected a diffusers pipeline folder "
                    "(StableDiffusionPipeline or StableDiffusionXLPipeline)"
                )
            pipe = _load_diffusers_folder(path, kind=None, source=str(path))
        else:
            pipe = _load_single_file(path, dtype, tokenizer_dir, config_dir, prediction_type)
    if prediction_type is not None and pipe.prediction_type != prediction_type:
        pipe.scheduler = _rebuild_scheduler(pipe.scheduler, prediction_type=prediction_type)
    return pipe.to(device, dtype)


def _rebuild_scheduler(scheduler: Any, prediction_type: Optional[str] = None) -> Any:
    """Same scheduler class with ``timestep_spacing``/``prediction_type`` set explicitly (never left to defaults)."""
    cfg = dict(scheduler.config)
    return type(scheduler).from_config(
        cfg,
        timestep_spacing=cfg.get("timestep_spacing", "leading"),
        prediction_type=prediction_type or cfg.get("prediction_type", "epsilon"),
    )


# ------------------------------------------------------------------------------------------------ diffusers folder


def _load_diffusers_folder(folder: Path, kind: Optional[str], source: str) -> Pipeline:
    """A diffusers folder through ``from_pretrained(local_files_only=True, use_safetensors=True)``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder / 'model_index.json'} is not readable JSON: {exc}") from exc
    class_name = index.get("_class_name")
    kwargs: dict[str, Any] = dict(local_files_only=True, use_safetensors=True)  # cast later by Pipeline.to
    if class_name == "StableDiffusionPipeline":
        cls = StableDiffusionPipeline
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif class_name == "StableDiffusionXLPipeline":
        cls = StableDiffusionXLPipeline
    else:
        raise ValueError(
            f"{folder}: model_index.json names _class_name={class_name!r}; supported: "
            "'StableDiffusionPipeline', 'StableDiffusionXLPipeline'"
        )
    try:
        pipe = cls.from_pretrained(str(folder), **kwargs)
    except (OSError, EnvironmentError) as exc:
        raise ValueError(
            f"{folder}: could not load the diffusers pipeline offline ({exc}); expected every component's "
            "config and .safetensors weights in the folder (pickle .bin weights are refused)"
        ) from exc
    pipe.scheduler = _rebuild_scheduler(pipe.scheduler)
    return Pipeline.from_diffusers(pipe, kind=kind, source=source)


# ----------------------------------------------------------------------------------------------------- single file


def checkpoint_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in a safetensors file, read from its header only (no weights loaded)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path}: refusing to load a pickle-based checkpoint ({path.suffix}); pickle files can run arbitrary "
            "code. Convert it to .safetensors first (for example with a trusted converter) and load that."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers / truncated files
        raise ValueError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); expected an SD1.x, SD2.x "
            "or SDXL checkpoint in the original single-file layout, saved as .safetensors"
        ) from exc
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


def _load_single_file(
    path: Path,
    dtype: torch.dtype,
    tokenizer_dir: Optional[PathLike],
    config_dir: Optional[PathLike],
    prediction_type: Optional[str],
) -> Pipeline:
    """An original-layout .safetensors file: detect, pick configs, convert with diffusers' converters, assemble."""
    from safetensors.torch import load_file

    shapes = checkpoint_shapes(path)
    kind = detect_architecture(shapes)
    cfg_dir = Path(config_dir).expanduser() if config_dir is not None else CONFIG_ROOT / kind
    if not (cfg_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"config folder {cfg_dir} has no model_index.json (config_dir must be a diffusers-style config folder)")
    index = json.loads((cfg_dir / "model_index.json").read_text())
    unet_config = _read_json(cfg_dir / "unet" / "config.json")
    context = next((shapes[k][-1] for k in _CONTEXT_KEYS if k in shapes), None)
    if context is not None and context != unet_config.get("cross_attention_dim"):
        hint = "" if config_dir is not None else " (pass config_dir= with matching configs for non-standard models)"
        raise ValueError(
            f"{path}: detected {kind} keys but the UNet cross-attention width is {context}; the configs in {cfg_dir} "
            f"expect {unet_config.get('cross_attention_dim')}{hint}"
        )
    if config_dir is None and kind == "sd2":
        prediction_type = prediction_type or _sd2_prediction_type(path)
        if prediction_type == "epsilon":
            unet_config["sample_size"] = 64  # the 512-px base models

    tensors = load_file(str(path))
    unet = _unet_from_checkpoint(tensors, unet_config, path)
    vae = _vae_from_checkpoint(tensors, _read_json(cfg_dir / "vae" / "config.json"), path)
    if kind == "sdxl":
        text_encoder = _clip_from_checkpoint(tensors, cfg_dir / "text_encoder", "CLIPTextModel",
                                             "conditioner.embedders.0.transformer.", path)
        text_encoder_2 = _clip_from_checkpoint(tensors, cfg_dir / "text_encoder_2", "CLIPTextModelWithProjection",
                                               "conditioner.embedders.1.model.", path)
    elif kind == "sd2":
        text_encoder = _clip_from_checkpoint(tensors, cfg_dir / "text_encoder", "CLIPTextModel",
                                             "cond_stage_model.model.", path)
        text_encoder_2 = None
    else:
        text_encoder = _clip_from_checkpoint(tensors, cfg_dir / "text_encoder", "CLIPTextModel",
                                             "cond_stage_model.transformer.", path)
        text_encoder_2 = None
    del tensors

    tokenizer = _load_tokenizer("tokenizer", text_encoder, cfg_dir, tokenizer_dir, path)
    tokenizer_2 = _load_tokenizer("tokenizer_2", text_encoder_2, cfg_dir, tokenizer_dir, path) if text_encoder_2 else None
    scheduler = _load_scheduler(cfg_dir, index, prediction_type)
    for m in (unet, vae, text_encoder, text_encoder_2):
        if m is not None:
            _move(m.eval(), torch.device("cpu"), dtype)
    return Pipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, kind=kind,
        source=str(path), text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, dtype=dtype,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)) and kind == "sdxl",
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing config file {path}") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def _sd2_prediction_type(path: Path) -> str:
    """v-prediction unless the file stores SD 2.0-base's global_step (875000); see the module docstring."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if "global_step" in f.keys():
            step = f.get_tensor("global_step")
            if step.numel() == 1 and int(step.item()) == 875000:
                return "epsilon"
    return "v_prediction"


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
    return model


def _unet_from_checkpoint(tensors: dict, config: dict, path: Path) -> Any:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = convert_ldm_unet_checkpoint(tensors, config)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    return _assign_weights(unet, state, "UNet", path)


def _vae_from_checkpoint(tensors: dict, config: dict, path: Path) -> Any:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if not any(k.startswith("first_stage_model.") for k in tensors):
        raise ValueError(f"{path}: no VAE weights (first_stage_model.*) in the checkpoint")
    state = convert_ldm_vae_checkpoint(tensors, config)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    return _assign_weights(vae, state, "VAE", path)


def _clip_from_checkpoint(tensors: dict, config_folder: Path, class_name: str, prefix: str, path: Path) -> Any:
    """A CLIP text encoder from HF-layout (``<prefix>text_model.*``) or OpenCLIP-layout (``<prefix>transformer.*``) keys."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if not any(k.startswith(prefix) for k in tensors):
        raise ValueError(f"{path}: no text-encoder weights under {prefix}* in the checkpoint")
    config = transformers.CLIPTextConfig.from_pretrained(str(config_folder), local_files_only=True)
    cls = getattr(transformers, class_name)
    with init_empty_weights():
        model = cls(config)
    if prefix.endswith(".transformer."):
        state = convert_ldm_clip_checkpoint({k: v for k, v in tensors.items() if k.startswith(prefix)}, prefix)
    else:
        state = convert_open_clip_checkpoint(model, tensors, prefix=prefix)
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
    config = _read_json(cfg_dir / "scheduler" / "scheduler_config.json")
    return cls.from_config(
        config,
        timestep_spacing=config.get("timestep_spacing", "leading"),
        prediction_type=prediction_type or config.get("prediction_type", "epsilon"),
    )


# -------------------------------------------------------------------------------------------------------- tokenizer


def _tokenizer_sources(name: str, cfg_dir: Path, tokenizer_dir: Optional[PathLike]) -> list[Path]:
    """Every folder that may hold the CLIP BPE files, in the order they are tried."""
    places: list[Path] = []
    if tokenizer_dir is not None:
        base = Path(tokenizer_dir).expanduser()
        places += [base / name, base / "tokenizer", base]
    places.append(cfg_dir / name)
    env = os.environ.get("REDIFINE_TOKENIZER_DIR")
    if env:
        places += [Path(env) / name, Path(env)]
    comfy_root = Path(os.environ.get("COMFYUI_ROOT", "~/ComfyUI")).expanduser()
    places.append(comfy_root / "comfy" / "sd1_tokenizer")
    try:  # the installed ComfyUI's own copy, located without importing ComfyUI
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        places += [Path(p) / "sd1_tokenizer" for p in spec.submodule_search_locations]
    seen: list[Path] = []
    for p in places:
        if p not in seen:
            seen.append(p)
    return seen


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


def _load_tokenizer(name: str, text_encoder: Any, cfg_dir: Path, tokenizer_dir: Optional[PathLike], path: Path) -> Any:
    """A CLIPTokenizer from the first folder with BPE files, with the configured special tokens and max length 77."""
    from transformers import CLIPTokenizer

    places = _tokenizer_sources(name, cfg_dir, tokenizer_dir)
    found = next((p for p in places if _has_tokenizer_files(p)), None)
    if found is None:
        raise FileNotFoundError(
            f"{path}: the {name} vocabulary was not found: need vocab.json and merges.txt (or tokenizer.json) in one "
            f"of: {', '.join(str(p) for p in places)}. Pass tokenizer_dir= a folder with those files, for example "
            "ComfyUI's comfy/sd1_tokenizer or the tokenizer/ folder of a diffusers Stable Diffusion model"
        )
    max_length = int(text_encoder.config.max_position_embeddings)
    tok_config: dict[str, Any] = {}
    for candidate in (cfg_dir / name / "tokenizer_config.json", found / "tokenizer_config.json"):
        if candidate.is_file():
            tok_config = _read_json(candidate)
            break
    tok_config.update(tokenizer_class="CLIPTokenizer", model_max_length=max_length)
    tok_config.setdefault("pad_token", "<|endoftext|>")
    with tempfile.TemporaryDirectory(prefix="redifine_tok_") as tmp:
        for fname in ("vocab.json", "merges.txt", "tokenizer.json"):
            if (found / fname).is_file():
                shutil.copyfile(found / fname, Path(tmp) / fname)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(tok_config))
        try:
            tokenizer = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
        except Exception as exc:
            raise ValueError(f"{found}: could not build a CLIP tokenizer from its files ({exc})") from exc
    _check_tokenizer(tokenizer, text_encoder, found)
    return tokenizer


def _check_tokenizer(tokenizer: Any, text_encoder: Any, folder: Path) -> None:
    """Refuse a tokenizer that cannot drive this text encoder (wrong vocabulary size, no special tokens)."""
    vocab = int(text_encoder.config.vocab_size)
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    if len(tokenizer) > vocab or max(ids) >= vocab or tokenizer.bos_token_id is None or ids[0] != tokenizer.bos_token_id:
        raise ValueError(
            f"{folder}: the tokenizer (size {len(tokenizer)}) does not match the text encoder (vocabulary {vocab}); "
            "expected the CLIP BPE vocabulary of this model"
        )
