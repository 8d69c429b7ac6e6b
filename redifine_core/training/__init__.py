"""Condition-drop LoRA finetuning with peft: settings, caches, precision recipe and the training loop.

    TrainConfig, TrainResult, TARGETS, MIXED_PRECISION     config.py
    PrecisionRecipe, resolve_precision                    precision.py   (autocast dtype and loss scaling)
    LatentCache, TextCache, ResizedImages                 caches.py      (what a step reads, prepared once)
    BorrowedPipeline                                      borrow.py      (what training changes on the pipeline, put back)
    LoraTrainer, finetune_lora, noisy_and_target          trainer.py     (the step loop)

    finetune_lora(pipeline, dataset, config, progress=None, cancel=None, init_lora=None) -> TrainResult
"""

from .borrow import BorrowedPipeline
from .caches import LatentCache, ResizedImages, TextCache, _resize_short_side, _to_pixels
from .config import MIXED_PRECISION, TARGETS, TrainConfig, TrainResult
from .precision import PrecisionRecipe, resolve_precision
from .trainer import LoraTrainer, finetune_lora, noisy_and_target

__all__ = [
    "MIXED_PRECISION", "TARGETS", "TrainConfig", "TrainResult", "PrecisionRecipe", "resolve_precision",
    "LatentCache", "BorrowedPipeline", "ResizedImages", "TextCache", "LoraTrainer", "finetune_lora", "noisy_and_target",
    "_resize_short_side", "_to_pixels",
]
