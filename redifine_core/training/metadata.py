"""The ``ss_*`` metadata a trained LoRA carries: our recipe under the keys kohya's sd-scripts writes, so that other
tools (and :func:`redifine_core.recipe.read_recipe`) read it back.

Values are strings as sd-scripts writes them (``str()`` of the value: ``"None"`` for an unset option, ``"(512, 512)"``
for the resolution, ``module.Class(args)`` for the optimizer). ``redifine_train_config`` keeps the whole
:class:`~.config.TrainConfig` as JSON.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from .borrow import base_model_version
from .buckets import side_range
from .optim import optimizer_description


def _bucket_metadata(trainer: Any) -> dict[str, str]:
    """sd-scripts' bucket keys: smallest and largest side, step, and how many images each (width, height) holds."""
    c, R = trainer.config, trainer.resolution
    counts = Counter(trainer.targets)
    info = {"buckets": {str(k): {"resolution": [w, h], "count": counts[(h, w)]}
                        for k, (h, w) in enumerate(sorted(counts))}}
    lo, hi = side_range(R, c.bucket_step)
    return {"ss_min_bucket_reso": str(lo), "ss_max_bucket_reso": str(hi), "ss_bucket_reso_steps": str(c.bucket_step),
            "ss_bucket_info": json.dumps(info)}


def training_metadata(trainer: Any) -> dict[str, str]:
    """The ``ss_*`` (and ``redifine_*``) metadata of ``trainer``'s LoRA (a :class:`~.trainer.LoraTrainer`)."""
    c = trainer.config
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(c.rank),
        "ss_network_alpha": str(c.alpha),
        "ss_network_args": json.dumps({"target": list(c.target)}),
        "ss_base_model_version": base_model_version(trainer.pipeline),
        "ss_v2": str(getattr(trainer.pipeline, "kind", "") == "sd2"),
        "ss_caption_dropout_rate": str(c.cond_drop),
        "ss_steps": str(trainer.step_count),
        "ss_max_train_steps": str(c.steps),
        "ss_learning_rate": str(c.learning_rate),
        "ss_unet_lr": str(c.unet_lr),
        "ss_text_encoder_lr": str(c.text_encoder_lr),
        "ss_lr_warmup_steps": str(c.warmup_steps),
        "ss_lr_scheduler": str(c.lr_scheduler),
        "ss_optimizer": optimizer_description(trainer.optimizer, c.weight_decay),
        "ss_min_snr_gamma": str(c.min_snr_gamma),
        "ss_clip_skip": str(c.clip_skip),
        "ss_resolution": f"({trainer.resolution}, {trainer.resolution})",
        "ss_enable_bucket": str(c.enable_bucket),
        **(_bucket_metadata(trainer) if c.enable_bucket else {}),
        "ss_batch_size_per_device": str(c.batch_size),
        "ss_gradient_accumulation_steps": str(c.grad_accum),
        "ss_gradient_checkpointing": str(trainer.checkpointing),
        "ss_mixed_precision": trainer.precision.name,
        "ss_noise_offset": str(c.noise_offset),
        "ss_flip_aug": str(c.random_flip),
        "ss_random_crop": str(not c.center_crop),
        "ss_cache_latents": str(trainer.cache_latents),
        "ss_num_train_images": str(len(trainer.dataset)),
        "ss_seed": str(c.seed),
        "ss_max_grad_norm": str(c.max_grad_norm),
        "ss_training_comment": "trained by ComfyUI-ReDiFine (condition-drop LoRA finetuning)",
        "redifine_train_config": json.dumps(c.to_dict(), sort_keys=True),
        "redifine_prediction_type": trainer.prediction_type,
        "redifine_weight_dtype": str(trainer.unet_dtype).replace("torch.", ""),
    }
