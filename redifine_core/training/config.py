"""LoRA training settings (:class:`TrainConfig`) and the result of one run (:class:`TrainResult`).

Every field is checked in ``TrainConfig.__post_init__`` against the project's bounds table
(:mod:`redifine_core.bounds`); a bad value raises one ``ValueError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from ..bounds import BOUNDS
from ..lora import TARGET_GROUPS, LoraWeights
from .optim import LR_SCHEDULERS, OPTIMIZERS, missing_optimizer_package

TARGETS: tuple[str, ...] = ("attention", "feedforward", "resnet", "text_encoder")
# "auto" follows the frozen weights' dtype (see precision.py); "no"/"fp16"/"bf16" choose autocast for fp32 weights.
MIXED_PRECISION: tuple[str, ...] = ("auto", "no", "fp16", "bf16")

# field -> (bounds key, what is allowed below the upper bound, in words)
_INTS = {
    "steps": ("train_steps", "an integer >= 1"),
    "rank": ("rank", "an integer >= 1"),
    "batch_size": ("batch_size", "an integer >= 1"),
    "grad_accum": ("grad_accum", "an integer >= 1"),
    "warmup_steps": ("warmup_steps", "an integer >= 0"),
    "bucket_step": ("bucket_step", "a positive multiple of 8"),
}
# optional fields: None = the documented default
_OPTIONAL = {
    "unet_lr": ("learning_rate", "None (= learning_rate) or a finite number > 0"),
    "text_encoder_lr": ("learning_rate", "None (= learning_rate) or a finite number > 0"),
    "min_snr_gamma": ("min_snr_gamma", "None or 0 (off) or a finite number > 0"),
    "clip_skip": ("clip_skip", "None (the model's own layer) or an integer >= 1 (1 = last layer, 2 = penultimate)"),
}
_FLOATS = {
    "learning_rate": ("learning_rate", "a finite number > 0"),
    "alpha": ("alpha", "a finite number > 0"),
    "noise_offset": ("noise_offset", "a finite number >= 0"),
    "weight_decay": ("weight_decay", "a finite number >= 0"),
    "max_grad_norm": ("max_grad_norm", "a finite number >= 0"),
}


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _at_most(key: str) -> str:
    hi = BOUNDS[key].hi
    return f"at most {hi:g}" if isinstance(hi, float) else f"at most {hi}"


@dataclass(frozen=True)
class TrainConfig:
    """LoRA finetuning settings; every field is checked in ``__post_init__``.

    ``mixed_precision``: "auto" (default) follows the frozen weights (fp16 weights: fp16 autocast + loss scaling; bf16:
    bf16 autocast; fp32: plain fp32); for fp32 weights "fp16"/"bf16" turn on autocast, "no" is plain fp32. Half
    weights always train with their own recipe whatever this says (see :mod:`.precision`).
    ``gradient_checkpointing``: None (default) = on for SDXL, off otherwise.
    ``unet_lr`` / ``text_encoder_lr``: None (default) = ``learning_rate``; ``text_encoder_lr`` needs "text_encoder"
    in ``target``. ``lr_scheduler``: one of :data:`~.optim.LR_SCHEDULERS`; None (default) = "constant_with_warmup"
    when ``warmup_steps`` > 0, else "constant". ``optimizer``: one of :data:`~.optim.OPTIMIZERS` (default "adamw").
    ``min_snr_gamma``: None or 0 (default, off) or gamma of min-SNR loss weighting. ``clip_skip``: None (default, the
    model's own layer), 1 = last CLIP layer, 2 = penultimate (SDXL: None or 2; :mod:`redifine_core.prompt_encoding`).
    ``enable_bucket``: False (default) crops every image to the square ``resolution``; True trains each image at
    its aspect-ratio bucket (sides multiples of ``bucket_step``, default 64, area at most ``resolution`` squared;
    :mod:`.buckets`).
    """

    steps: int = 200
    learning_rate: float = 1e-4
    rank: int = 4
    alpha: float = 4.0
    cond_drop: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 0
    resolution: Optional[int] = None
    center_crop: bool = True
    random_flip: bool = False
    target: tuple = ("attention",)
    mixed_precision: str = "auto"
    gradient_checkpointing: Optional[bool] = None
    noise_offset: float = 0.0
    seed: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0 = no clipping
    cache_latents: bool = True  # False: encode images every step (random crop always does)
    unet_lr: Optional[float] = None
    text_encoder_lr: Optional[float] = None
    lr_scheduler: Optional[str] = None
    optimizer: str = "adamw"
    min_snr_gamma: Optional[float] = None
    clip_skip: Optional[int] = None
    enable_bucket: bool = False
    bucket_step: int = 64

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} = {getattr(self, name)!r} is invalid: must be {allowed}")

        for name, (key, allowed) in _INTS.items():
            v = getattr(self, name)
            if not _is_int(v) or not BOUNDS[key].contains(int(v)):
                raise bad(name, f"{allowed}, {_at_most(key)}")
        if not _is_int(self.seed) or not (0 <= self.seed < 2**63):
            raise bad("seed", "an integer in [0, 2**63)")
        for name, (key, allowed) in _FLOATS.items():
            v = getattr(self, name)
            if not _is_num(v) or not BOUNDS[key].contains(float(v)):
                raise bad(name, f"{allowed}, {_at_most(key)}")
        if not _is_num(self.cond_drop) or not (0.0 <= self.cond_drop <= 1.0):
            raise bad("cond_drop", "a probability in [0, 1]")
        if self.resolution is not None and (not _is_int(self.resolution)
                                            or not BOUNDS["resolution"].contains(int(self.resolution))):
            raise bad("resolution", f"None (the model's default size) or a positive multiple of 8, "
                                    f"{_at_most('resolution')}")
        for name in ("center_crop", "random_flip", "cache_latents", "enable_bucket"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if self.gradient_checkpointing is not None and not isinstance(self.gradient_checkpointing, bool):
            raise bad("gradient_checkpointing", "True, False or None (on for SDXL)")
        if self.mixed_precision not in MIXED_PRECISION:
            raise bad("mixed_precision", f"one of {MIXED_PRECISION}")
        self._check_target()
        self._check_recipe(bad)

    def _check_recipe(self, bad: Any) -> None:
        for name, (key, allowed) in _OPTIONAL.items():
            v = getattr(self, name)
            if v is not None and not ((_is_int(v) if BOUNDS[key].integer else _is_num(v)) and BOUNDS[key].contains(v)):
                raise bad(name, f"{allowed}, {_at_most(key)}")
        if self.min_snr_gamma == 0:
            object.__setattr__(self, "min_snr_gamma", None)
        if self.text_encoder_lr is not None and not self.trains_text_encoder:
            raise bad("text_encoder_lr", "None unless target includes 'text_encoder' (the text encoders train "
                                         "only then)")
        if self.lr_scheduler is None:
            object.__setattr__(self, "lr_scheduler", "constant_with_warmup" if self.warmup_steps else "constant")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise bad("lr_scheduler", f"None or one of {LR_SCHEDULERS}")
        if self.lr_scheduler == "constant" and self.warmup_steps:
            raise bad("lr_scheduler", f"'constant_with_warmup' or 'cosine' when warmup_steps = {self.warmup_steps} "
                                      "(or set warmup_steps = 0)")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"one of {OPTIMIZERS}")
        missing = missing_optimizer_package(self.optimizer)
        if missing:
            raise ValueError(f"TrainConfig.optimizer = {self.optimizer!r}: {missing}")

    def _check_target(self) -> None:
        target = (self.target,) if isinstance(self.target, str) else self.target
        try:
            target = tuple(target)
        except TypeError:
            raise ValueError(f"TrainConfig.target = {self.target!r} is invalid: must be a tuple of names from "
                             f"{TARGETS}") from None
        unknown = [t for t in target if t not in TARGETS]
        if unknown:
            raise ValueError(f"TrainConfig.target = {self.target!r} is invalid: unknown target(s) {unknown} ; must "
                             f"be a non-empty tuple of names from {TARGETS}")
        if not target:
            raise ValueError(f"TrainConfig.target = {self.target!r} is invalid: must be a non-empty tuple of names "
                             f"from {TARGETS}")
        if target == ("text_encoder",):
            raise ValueError(f"TrainConfig.target = {self.target!r} is invalid: the UNet must be trained too; add "
                             f"one of {TARGETS[:3]}")
        object.__setattr__(self, "target", tuple(dict.fromkeys(target)))

    @property
    def unet_target_modules(self) -> tuple[str, ...]:
        return tuple(m for t in self.target if t in TARGET_GROUPS for m in TARGET_GROUPS[t])

    @property
    def trains_text_encoder(self) -> bool:
        return "text_encoder" in self.target

    @property
    def unet_learning_rate(self) -> float:
        return self.unet_lr if self.unet_lr is not None else self.learning_rate

    @property
    def text_encoder_learning_rate(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.learning_rate

    def checkpointing_for(self, sdxl: bool) -> bool:
        """Whether gradient checkpointing runs for this model: the explicit setting, else on for SDXL."""
        return self.gradient_checkpointing if self.gradient_checkpointing is not None else bool(sdxl)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target"] = list(self.target)
        return d


@dataclass
class TrainResult:
    lora: LoraWeights
    losses: list  # one float per optimizer step
    seconds: float
    drop_masks: list = field(default_factory=list)  # per optimizer step: one bool per sample (True = caption dropped)
    sample_indices: list = field(default_factory=list)  # per optimizer step: the dataset index of every sample
