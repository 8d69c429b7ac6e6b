"""Bad-input table: TrainConfig fields, dataset construction, LoRA files and runtime checks fail early and clearly."""

from __future__ import annotations

import math

import pytest
import torch

from redifine_core.data import CaptionedImages
from redifine_core.lora import LoraWeights, load_lora, save_lora
from redifine_core.training import TrainConfig, finetune_lora

# (overrides, field named in the message, a fragment of what is allowed)
BAD_TRAIN_CONFIGS = [
    ({"rank": 0}, "rank", ">= 1"),
    ({"rank": -3}, "rank", ">= 1"),
    ({"rank": 2.5}, "rank", "integer"),
    ({"alpha": 0.0}, "alpha", "> 0"),
    ({"alpha": -1.0}, "alpha", "> 0"),
    ({"alpha": math.inf}, "alpha", "finite"),
    ({"learning_rate": 0.0}, "learning_rate", "> 0"),
    ({"learning_rate": -1e-4}, "learning_rate", "> 0"),
    ({"learning_rate": math.nan}, "learning_rate", "finite"),
    ({"learning_rate": math.inf}, "learning_rate", "finite"),
    ({"learning_rate": "1e-4"}, "learning_rate", "number"),
    ({"cond_drop": -0.1}, "cond_drop", "[0, 1]"),
    ({"cond_drop": 1.5}, "cond_drop", "[0, 1]"),
    ({"cond_drop": math.nan}, "cond_drop", "[0, 1]"),
    ({"steps": 0}, "steps", ">= 1"),
    ({"steps": True}, "steps", "integer"),
    ({"batch_size": 0}, "batch_size", ">= 1"),
    ({"grad_accum": 0}, "grad_accum", ">= 1"),
    ({"warmup_steps": -1}, "warmup_steps", ">= 0"),
    ({"target": ("attention", "mlp")}, "target", "'feedforward'"),
    ({"target": ()}, "target", "non-empty"),
    ({"target": ("text_encoder",)}, "target", "UNet must be trained"),
    ({"mixed_precision": "fp8"}, "mixed_precision", "'bf16'"),
    ({"mixed_precision": None}, "mixed_precision", "'fp16'"),
    ({"resolution": 0}, "resolution", "positive multiple of 8"),
    ({"resolution": -64}, "resolution", "positive multiple of 8"),
    ({"resolution": 100}, "resolution", "positive multiple of 8"),
    ({"resolution": 64.0}, "resolution", "positive multiple of 8"),
    ({"noise_offset": -0.1}, "noise_offset", ">= 0"),
    ({"weight_decay": math.inf}, "weight_decay", "finite"),
    ({"max_grad_norm": -1.0}, "max_grad_norm", ">= 0"),
    ({"seed": -1}, "seed", "2**63"),
    ({"center_crop": "yes"}, "center_crop", "True or False"),
    ({"random_flip": 1}, "random_flip", "True or False"),
]


@pytest.mark.parametrize("overrides, field, allowed", BAD_TRAIN_CONFIGS,
                         ids=[f"{f}={o[f]!r}" for o, f, _ in BAD_TRAIN_CONFIGS])
def test_bad_train_config_names_field_value_and_allowed(overrides, field, allowed):
    with pytest.raises(ValueError) as err:
        TrainConfig(**overrides)
    msg = str(err.value)
    assert f"TrainConfig.{field}" in msg
    assert repr(overrides[field]) in msg
    assert allowed in msg


def test_good_train_config_normalises_target():
    cfg = TrainConfig(target="resnet", resolution=64, alpha=8, cond_drop=1)
    assert cfg.target == ("resnet",)
    assert cfg.unet_target_modules == ("conv1", "conv2", "time_emb_proj")
    cfg2 = TrainConfig(target=("attention", "attention", "text_encoder"))
    assert cfg2.target == ("attention", "text_encoder") and cfg2.trains_text_encoder


def test_dataset_errors():
    with pytest.raises(ValueError, match="empty"):
        CaptionedImages.from_images([], [])
    with pytest.raises(ValueError, match=r"3 captions for 2 images"):
        CaptionedImages.from_images(torch.rand(2, 4, 4, 3), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"1 captions for 2 images"):
        CaptionedImages.from_images(torch.rand(2, 4, 4, 3), ["a"])
    with pytest.raises(ValueError, match=r"captions\[1\] must be a str"):
        CaptionedImages.from_images(torch.rand(2, 4, 4, 3), ["a", 3])


def test_runtime_checks_before_any_work(tiny_sd):
    ds = CaptionedImages.from_images(torch.rand(2, 32, 32, 3), "a cat")
    with pytest.raises(ValueError, match=r"mixed_precision = 'fp16' needs a CUDA device.*cpu"):
        finetune_lora(tiny_sd, ds, TrainConfig(steps=1, mixed_precision="fp16"))
    with pytest.raises(ValueError, match="config must be a TrainConfig"):
        finetune_lora(tiny_sd, ds, {"steps": 1})
    with pytest.raises(ValueError, match="dataset must be a CaptionedImages"):
        finetune_lora(tiny_sd, [1, 2], TrainConfig(steps=1))
    init = LoraWeights(unet={}, rank=8, alpha=8.0)
    with pytest.raises(ValueError, match=r"init_lora has rank 8 but TrainConfig.rank = 4"):
        finetune_lora(tiny_sd, ds, TrainConfig(steps=1), init_lora=init)
    assert not hasattr(tiny_sd.unet, "peft_config")


def test_lora_file_errors(tmp_path):
    lora = LoraWeights(unet={"a.to_q.lora_A.weight": torch.zeros(2, 4), "a.to_q.lora_B.weight": torch.zeros(4, 2)},
                       rank=2, alpha=2.0)
    with pytest.raises(ValueError, match=r"layout must be one of \('kohya', 'diffusers'\), got 'comfy'"):
        save_lora(lora, tmp_path / "x.safetensors", layout="comfy")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_lora(lora, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())  # nothing written before the checks
    with pytest.raises(ValueError, match="not found"):
        load_lora(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_lora(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LoraWeights(unet={}, rank=0)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        LoraWeights(unet={}, alpha=0.0)
    with pytest.raises(ValueError, match="not in peft layout"):
        LoraWeights(unet={"a.to_q.lora_down.weight": torch.zeros(2, 4)})
