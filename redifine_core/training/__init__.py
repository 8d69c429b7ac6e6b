"""Condition-drop LoRA finetuning with peft: settings, caches, precision recipe and the training loop.

    TrainConfig, TrainResult, TARGETS, MIXED_PRECISION     config.py
    PrecisionRecipe, resolve_precision                    precision.py   (autocast dtype and loss scaling)
    LatentCache, TextCache, ResizedImages                 caches.py      (what a step reads, prepared once)
    BatchOrder, bucket_sizes, assign_buckets              buckets.py     (aspect-ratio buckets and the sample order)
    BorrowedPipeline                                      borrow.py      (what training changes on the pipeline, put back)
    noisy_and_target, diffusion_loss                      objective.py   (the target and the min-SNR weighted loss)
    OPTIMIZERS, LR_SCHEDULERS                             optim.py       (optimizers and diffusers' schedules by name)
    training_metadata                                     metadata.py    (the recipe as sd-scripts' ss_* keys)
    LoraTrainer, finetune_lora                            trainer.py     (the step loop)

    finetune_lora(pipeline, dataset, config, progress=None, cancel=None, init_lora=None) -> TrainResult
"""

from .borrow import BorrowedPipeline
from .buckets import BatchOrder, assign_buckets, bucket_sizes
from .caches import LatentCache, ResizedImages, TextCache, _resize_short_side, _to_pixels
from .config import MIXED_PRECISION, TARGETS, TrainConfig, TrainResult
from .metadata import training_metadata
from .objective import diffusion_loss, noisy_and_target
from .optim import LR_SCHEDULERS, OPTIMIZERS
from .precision import PrecisionRecipe, resolve_precision
from .trainer import LoraTrainer, finetune_lora

__all__ = [
    "MIXED_PRECISION", "TARGETS", "TrainConfig", "TrainResult", "PrecisionRecipe", "resolve_precision",
    "LatentCache", "BorrowedPipeline", "ResizedImages", "TextCache", "LoraTrainer", "finetune_lora", "noisy_and_target",
    "diffusion_loss", "OPTIMIZERS", "LR_SCHEDULERS", "training_metadata", "BatchOrder", "assign_buckets",
    "bucket_sizes",
    "_resize_short_side", "_to_pixels",
]
