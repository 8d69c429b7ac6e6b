"""Load a text-to-image pipeline offline: a diffusers folder, a single-file SD1.x/SD2.x/SDXL checkpoint, or the toy model.

The API:

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
        dtype: torch.dtype                  # the UNet's and text encoders' dtype (the VAE: see vae.vae_dtype)
        vae_scale_factor: int   (property: 2 ** (len(vae.config.block_out_channels) - 1))
        default_size: int       (property: the resolution the model was trained at, e.g. 512, 1024, 32 for toy)
        prediction_type: str    (property: "epsilon" | "v_prediction")
        is_sdxl: bool           (property)
        def to(self, device=None, dtype=None) -> "Pipeline"
        @classmethod from_diffusers(cls, pipe, kind=None, source="") -> "Pipeline"   # wrap a diffusers pipeline object

    def load_pipeline(source: str | os.PathLike, device=None, dtype=None, tokenizer_dir=None) -> Pipeline
    def default_device() -> torch.device      # cuda if available else cpu

Also: ``load_pipeline(..., config_dir=None, prediction_type=None)``,
``Pipeline.force_zeros_for_empty_prompt`` (SDXL), ``Pipeline.to_diffusers()``, ``resolve_device``, ``resolve_dtype``,
``TOY_MODEL_DIR`` and ``CONFIG_ROOT``; ``detect_architecture`` and ``checkpoint_shapes`` come from
:mod:`redifine_core.single_file`, which loads single files (layout detection, configs, tokenizers, bounded memory).

Precision and device: ``dtype`` is a ``torch.dtype`` or one of ``PRECISIONS`` ("auto", "fp32", "fp16", "bf16").
"auto" is float16 on CUDA and float32 everywhere else (bf16 only when asked for). Combinations a device cannot run
are refused before any file is read: a CUDA device on a torch without CUDA or an index past the visible GPUs, fp16 on
a CPU (fp16 matrix multiplies there are about 3000x slower than bf16), bf16 on a GPU without bf16 support.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .single_file import CONFIG_ROOT, PACKAGE_DIR, checkpoint_shapes, detect_architecture, single_file_components
from .vae import cast_inputs_to_weights, vae_dtype

PathLike = Union[str, os.PathLike]

TOY_MODEL_DIR = PACKAGE_DIR / "toy" / "model"
TOY_MODELS = {"toy": TOY_MODEL_DIR, "toy:bed": PACKAGE_DIR / "toy" / "model_bed"}
"""The shipped toy models by source name: the shapes model and the texture / patterned-shape model (docs/toy-lab.md)."""
KINDS = ("sd1", "sd2", "sdxl", "toy")
PREDICTION_TYPES = ("epsilon", "v_prediction")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
__all__ = ["Pipeline", "load_pipeline", "default_device", "resolve_device", "resolve_dtype", "checkpoint_shapes",
           "detect_architecture", "CONFIG_ROOT", "TOY_MODEL_DIR", "TOY_MODELS", "KINDS", "PRECISIONS", "PREDICTION_TYPES"]


def default_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: Any = None) -> torch.device:
    """``device`` (None or "auto" = :func:`default_device`, a string or a ``torch.device``) checked against this machine.

    Raises a one-line ``ValueError`` for an unknown device string, CUDA on a torch without CUDA or without a visible
    GPU, a CUDA index past the visible GPUs, and any other backend this torch cannot use.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return default_device()
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={device!r} is not a device; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check the NVIDIA driver and CUDA_VISIBLE_DEVICES)")
            raise ValueError(f"device={device!r} but {why}; use device='cpu', or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device={device!r} but {count} CUDA device(s) are visible; use cuda:0 to cuda:{count - 1}")
        return dev
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise ValueError(f"device={device!r}: {dev.type} is not available in this torch; use 'cpu' or 'cuda'")
    return dev


def resolve_dtype(precision: Any = None, device: Any = None) -> torch.dtype:
    """The weights' dtype for ``precision`` (None, one of ``PRECISIONS``, or a torch float dtype) on ``device``.

    "auto" (and None) is float16 on CUDA and float32 elsewhere. Raises a one-line ``ValueError`` for an unknown
    precision, fp16 on a CPU, and bf16 on a CUDA GPU without bf16 support; ``device`` is checked as by
    :func:`resolve_device`.
    """
    dev = resolve_device(device)
    if precision is None or (isinstance(precision, str) and precision.strip().lower() == "auto"):
        return torch.float16 if dev.type == "cuda" else torch.float32
    dtype = None
    if isinstance(precision, str):
        name = precision.strip().lower()
        dtype = _PRECISION_DTYPES.get(name) or {"float32": torch.float32, "float16": torch.float16,
                                                "bfloat16": torch.bfloat16}.get(name)
    elif isinstance(precision, torch.dtype) and precision in (torch.float32, torch.float16, torch.bfloat16,
                                                              torch.float64):
        dtype = precision
    if dtype is None:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS} or a float32/float16/bfloat16 torch.dtype")
    if dtype == torch.float16 and dev.type == "cpu":
        raise ValueError(
            f"precision={precision!r} on device {str(dev)!r}: on CPUs float16 matrix multiplies are about 3000x slower "
            "than bf16; use 'bf16' or 'fp32' on a CPU"
        )
    if dtype == torch.bfloat16 and dev.type == "cuda" and not _cuda_bf16_supported():
        raise ValueError(
            f"precision={precision!r} on device {str(dev)!r}: this GPU has no bf16 support; use 'fp16' (or 'fp32')"
        )
    return dtype


def _cuda_bf16_supported() -> bool:
    """``torch.cuda.is_bf16_supported`` without counting slow emulation as support (where torch can tell)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch: no including_emulation argument
        return bool(torch.cuda.is_bf16_supported())


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
        """Move (and cast) every module in place; returns self. The VAE goes to :func:`vae.vae_dtype` (float32 for a
        ``force_upcast`` VAE under fp16, kept so permanently: decoding then costs no per-call cast)."""
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype if dtype is not None else self.dtype
        for module, want in ((self.unet, self.dtype), (self.text_encoder, self.dtype),
                             (self.text_encoder_2, self.dtype), (self.vae, vae_dtype(self))):
            if module is not None:
                _move(module, self.device, want)
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
        """A diffusers pipeline object sharing these modules (for comparisons; its scheduler is a copy).

        It runs in any precision: a VAE kept in float32 under fp16 (:func:`vae.vae_dtype`) casts what diffusers hands
        it (:func:`vae.cast_inputs_to_weights`)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cast_inputs_to_weights(self.vae)

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
    dtype: Union[torch.dtype, str, None] = None,
    tokenizer_dir: Optional[PathLike] = None,
    config_dir: Optional[PathLike] = None,
    prediction_type: Optional[str] = None,
) -> Pipeline:
    """Load ``source`` offline: ``"toy"``, a diffusers folder (``model_index.json``) or a single-file ``.safetensors``.

    ``device`` goes through :func:`resolve_device` and ``dtype`` (a torch dtype or one of ``PRECISIONS``; None is
    "auto") through :func:`resolve_dtype`, before anything is read. ``tokenizer_dir`` and ``config_dir`` only matter
    for single files (see :mod:`redifine_core.single_file`); ``prediction_type`` ("epsilon" | "v_prediction")
    overrides the scheduler's, e.g. for SD2.x base models. Nothing is ever fetched from a model hub.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)

    if str(source) in TOY_MODELS:
        folder = TOY_MODEL_DIR if str(source) == "toy" else TOY_MODELS[str(source)]
        if not (folder / "model_index.json").is_file():
            arch = "" if str(source) == "toy" else " --arch bed"
            raise FileNotFoundError(
                f"the toy model weights are missing ({folder / 'model_index.json'} does not exist); "
                f"build them with `python -m redifine_core.toy.train{arch}`"
            )
        pipe = _load_diffusers_folder(folder, kind="toy", source=str(source), dtype=dtype)
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
            pipe = _load_diffusers_folder(path, kind=None, source=str(path), dtype=dtype)
        else:
            pipe = Pipeline(**single_file_components(path, dtype, device, tokenizer_dir, config_dir, prediction_type))
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


def _load_diffusers_folder(folder: Path, kind: Optional[str], source: str, dtype: torch.dtype) -> Pipeline:
    """A diffusers folder through ``from_pretrained(local_files_only=True, use_safetensors=True)``.

    Components load straight into ``dtype`` (a ``force_upcast`` VAE into float32 under fp16), so host memory never
    holds a float32 copy of half-precision weights.
    """
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from packaging.version import Version

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder / 'model_index.json'} is not readable JSON: {exc}") from exc
    class_name = index.get("_class_name")
    upcast = False
    if dtype == torch.float16 and (folder / "vae" / "config.json").is_file():
        try:
            upcast = bool(json.loads((folder / "vae" / "config.json").read_text()).get("force_upcast", False))
        except (OSError, ValueError):
            pass  # from_pretrained reports the broken config
    dtypes = {"default": dtype, "vae": torch.float32 if upcast else dtype}
    # diffusers renamed torch_dtype to dtype (0.42 warns on the old name; 0.35 only knows it)
    dtype_kwarg = "dtype" if Version(diffusers.__version__) >= Version("0.42.0") else "torch_dtype"
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, dtype_kwarg: dtypes}
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
