"""The precision recipe of one training run: which autocast dtype, and whether the loss is scaled.

One rule, decided once before any work by :func:`resolve_precision` from the frozen weights' dtype, the requested
``TrainConfig.mixed_precision`` and the device:

=================  ==========================  =========================================================
frozen weights     ``mixed_precision``         recipe
=================  ==========================  =========================================================
float16            any                         fp16 autocast + gradient scaler (never unscaled fp16)
bfloat16           any                         bf16 autocast, no scaler (bf16 has fp32's range)
float32            "auto" / "no"               plain fp32
float32            "fp16"                      fp16 autocast + scaler on CUDA; an error on CPU
float32            "bf16"                      bf16 autocast (CPU bf16 autocast works, slowly)
=================  ==========================  =========================================================

LoRA parameters and the optimizer state are float32 in every case (the trainer casts the adapter to fp32).
Half weights decide their own recipe because the alternatives are wrong: fp16 weights without loss scaling let small
gradients underflow to zero (the LoRA silently learns little), and autocasting bf16 weights to fp16 would add an
overflow risk for nothing. fp32 weights with ``"fp16"`` on CPU stay an error: CPU fp16 matrix multiplies are about
3000x slower than bf16 (measured on this project's CI CPU, issue 8). fp16 *weights* on CPU (never chosen by
``load_pipeline``'s "auto") are still trained correctly, with CPU autocast and a CPU gradient scaler.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Optional

import torch

from .config import MIXED_PRECISION

_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "no"}


@dataclass(frozen=True)
class PrecisionRecipe:
    """What one run does: ``autocast_dtype`` (None = no autocast) and ``loss_scaling`` (a GradScaler)."""

    device_type: str
    weight_dtype: torch.dtype
    autocast_dtype: Optional[torch.dtype]
    loss_scaling: bool

    def __post_init__(self) -> None:
        if self.loss_scaling and self.autocast_dtype != torch.float16:
            raise ValueError(f"PrecisionRecipe: loss_scaling is for fp16 autocast, got {self.autocast_dtype}")
        if self.weight_dtype == torch.float16 and not self.loss_scaling:
            raise ValueError("PrecisionRecipe: fp16 weights must train with loss scaling")

    @property
    def name(self) -> str:
        """"fp16", "bf16" or "no": what actually runs (written to the LoRA's ss_mixed_precision)."""
        return _NAMES[self.autocast_dtype] if self.autocast_dtype is not None else "no"

    def autocast(self) -> ContextManager[Any]:
        """The autocast context of a forward pass (a no-op context for plain fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def make_scaler(self) -> Optional["torch.amp.GradScaler"]:
        """A fresh gradient scaler when the recipe scales the loss, else None."""
        return torch.amp.GradScaler(self.device_type) if self.loss_scaling else None


def resolve_precision(mixed_precision: str, weight_dtype: torch.dtype, device: Any) -> PrecisionRecipe:
    """The recipe for frozen weights of ``weight_dtype`` on ``device`` (see the module table); ValueError when the
    request cannot run there."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision = {mixed_precision!r} is invalid: must be one of {MIXED_PRECISION}")
    dev = torch.device(device)
    if weight_dtype == torch.float16:
        return PrecisionRecipe(dev.type, weight_dtype, torch.float16, True)
    if weight_dtype == torch.bfloat16:
        return PrecisionRecipe(dev.type, weight_dtype, torch.bfloat16, False)
    if weight_dtype != torch.float32:
        raise ValueError(f"the UNet's weights are {weight_dtype}; training supports float32, float16 or bfloat16")
    if mixed_precision == "fp16":
        if dev.type != "cuda":
            raise ValueError(f"TrainConfig.mixed_precision = 'fp16' needs a CUDA device, but the pipeline is on {dev}; "
                             "use 'no' (or 'bf16') on CPU")
        return PrecisionRecipe(dev.type, weight_dtype, torch.float16, True)
    if mixed_precision == "bf16":
        if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"TrainConfig.mixed_precision = 'bf16' but the GPU on {dev} does not support bfloat16; "
                             "use 'fp16' or 'no'")
        return PrecisionRecipe(dev.type, weight_dtype, torch.bfloat16, False)
    return PrecisionRecipe(dev.type, weight_dtype, None, False)
