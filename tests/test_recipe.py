"""read_recipe: the training recipe of a LoRA from sd-scripts' ss_* metadata, with every assumption listed, and the
round trip of our own LoRAs (trained -> saved -> read back to the same TrainConfig)."""

from __future__ import annotations

import json

import pytest
import torch

from redifine_core.data import CaptionedImages
from redifine_core.lora import LoraWeights, save_lora
from redifine_core.models import Pipeline
from redifine_core.recipe import read_recipe
from redifine_core.training import TrainConfig, finetune_lora

UNET_MODULES = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
                "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
                "down_blocks.0.attentions.0.proj_in"]
TE_MODULES = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.self_attn.out_proj"]


def _weights(modules, rank):
    g = torch.Generator().manual_seed(0)
    out = {}
    for m in modules:
        out[f"{m}.lora_A.weight"] = torch.randn(rank, 8, generator=g)
        out[f"{m}.lora_B.weight"] = torch.randn(8, rank, generator=g)
    return out


def _sd_scripts_lora(path, metadata, rank=8, alpha=4.0, te=True, te2=False):
    """A LoRA as sd-scripts writes it: kohya keys, one .alpha per module, every ss_* value a str()."""
    lora = LoraWeights(unet=_weights(UNET_MODULES, rank), text_encoder=_weights(TE_MODULES, rank) if te else {},
                       text_encoder_2=_weights(TE_MODULES, rank) if te2 else {}, rank=rank, alpha=alpha,
                       metadata=metadata)
    return save_lora(lora, path)


SD_SCRIPTS = {
    "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
    "ss_base_model_version": "sd_v1", "ss_learning_rate": "0.0001", "ss_unet_lr": "0.0002",
    "ss_text_encoder_lr": "5e-05", "ss_resolution": "(512, 512)", "ss_noise_offset": "0.0357",
    "ss_min_snr_gamma": "5.0", "ss_caption_dropout_rate": "0.1", "ss_optimizer": "torch.optim.adamw.AdamW",
    "ss_lr_scheduler": "cosine", "ss_lr_warmup_steps": "100", "ss_clip_skip": "2", "ss_enable_bucket": "False",
    "ss_max_train_steps": "1600", "ss_seed": "42", "ss_batch_size_per_device": "2",
    "ss_gradient_accumulation_steps": "1", "ss_flip_aug": "True", "ss_random_crop": "False",
    "ss_mixed_precision": "fp16", "ss_max_grad_norm": "1.0", "ss_gradient_checkpointing": "True",
}


def test_sd_scripts_recipe_is_read(tmp_path):
    kwargs, read, assumed = read_recipe(_sd_scripts_lora(tmp_path / "artist.safetensors", SD_SCRIPTS))
    expected = dict(learning_rate=1e-4, unet_lr=2e-4, text_encoder_lr=5e-5, rank=8, alpha=4.0, resolution=512,
                    noise_offset=0.0357, min_snr_gamma=5.0, cond_drop=0.1, optimizer="adamw", weight_decay=0.01,
                    lr_scheduler="cosine", warmup_steps=100, clip_skip=2, steps=1600, seed=42, batch_size=2,
                    grad_accum=1, random_flip=True, center_crop=True, max_grad_norm=1.0,
                    target=("attention", "feedforward", "text_encoder"), mixed_precision="auto",
                    gradient_checkpointing=None, cache_latents=True)
    assert {k: kwargs[k] for k in expected} == expected
    assert TrainConfig(**kwargs).lr_scheduler == "cosine"
    assert read["ss_learning_rate"] == "0.0001" and read["ss_resolution"] == "(512, 512)"
    assert read["ss_optimizer"] == "torch.optim.adamw.AdamW" and "ss_mixed_precision" not in read
    # what the file does not say, or we do not take, is listed with the value used
    assert assumed["weight_decay"].startswith("0.01: the default of AdamW")
    assert assumed["mixed_precision"].startswith("'auto': follows the weights")
    assert assumed["target"].endswith("the file also has proj_in modules, which no target trains")
    assert set(assumed) == {"weight_decay", "mixed_precision", "gradient_checkpointing", "cache_latents", "target",
                            "bucket_step"}  # ss_enable_bucket is False: the step is not read


def test_none_strings_unsupported_values_and_dataset_config(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    md = {**SD_SCRIPTS, "ss_unet_lr": "None", "ss_min_snr_gamma": "None", "ss_clip_skip": "None",
          "ss_noise_offset": "None", "ss_lr_scheduler": "cosine_with_restarts", "ss_lr_warmup_steps": "0.1",
          "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1,betas=(0.9, 0.99))",
          "ss_text_encoder_lr": "0", "ss_network_alpha": "1", "ss_max_train_steps": "1000",
          "ss_learning_rate": "5"}
    for key in ("ss_resolution", "ss_batch_size_per_device", "ss_flip_aug", "ss_random_crop", "ss_enable_bucket"):
        del md[key]
    md["ss_datasets"] = json.dumps([{"resolution": [768, 512], "batch_size_per_device": 4, "enable_bucket": True,
                                     "subsets": [{"flip_aug": False, "random_crop": True}]}])
    kwargs, read, assumed = read_recipe(_sd_scripts_lora(tmp_path / "x.safetensors", md, te=False))
    assert kwargs["unet_lr"] is None and kwargs["min_snr_gamma"] is None and kwargs["clip_skip"] is None
    assert kwargs["noise_offset"] == 0.0 and kwargs["text_encoder_lr"] is None
    assert kwargs["target"] == ("attention", "feedforward")
    assert kwargs["optimizer"] == "adamw" and kwargs["weight_decay"] == 0.1
    assert assumed["optimizer"] == ("'adamw': optimizer 'adamw8bit' needs the bitsandbytes package, which is not "
                                    "installed: pip install bitsandbytes (AdamW8bit is AdamW with 8-bit state)")
    assert kwargs["lr_scheduler"] == "constant_with_warmup" and "'cosine_with_restarts' is not supported" in \
        assumed["lr_scheduler"]
    assert kwargs["learning_rate"] == 1e-4 and assumed["learning_rate"].startswith(
        "0.0001: the file's value is refused (TrainConfig.learning_rate = 5.0 is invalid: must be a finite number > 0")
    assert kwargs["warmup_steps"] == 100 and assumed["warmup_steps"] == "100: 0.1 of 1000 steps"
    assert kwargs["alpha"] == 4.0 and assumed["alpha"] == "4.0: from the weights (ss_network_alpha says 1)"
    assert kwargs["batch_size"] == 4 and kwargs["random_flip"] is False and kwargs["center_crop"] is False
    assert assumed["resolution"] == "624: the square with the area of [768, 512]"
    assert kwargs["enable_bucket"] is True and kwargs["bucket_step"] == 64
    assert assumed["bucket_step"] == "64: ss_bucket_reso_steps is missing: sd-scripts' default"
    assert read["ss_resolution"] == "[768, 512]" and read["ss_enable_bucket"] == "True"
    TrainConfig(**kwargs)


def test_sdxl_clip_skip_and_missing_metadata(tmp_path):
    md = {**SD_SCRIPTS, "ss_base_model_version": "sdxl_base_v1-0", "ss_clip_skip": "1",
          "ss_text_encoder_lr": "[1e-05, 2e-05]"}
    kwargs, _, assumed = read_recipe(_sd_scripts_lora(tmp_path / "xl.safetensors", md, te2=True))
    assert kwargs["clip_skip"] is None and "does not apply to SDXL" in assumed["clip_skip"]
    assert kwargs["text_encoder_lr"] == 1e-5 and "the first of [1e-05, 2e-05]" in assumed["text_encoder_lr"]
    bare, read, assumed = read_recipe(_sd_scripts_lora(tmp_path / "bare.safetensors", {}, te=False))
    assert bare == {**TrainConfig(rank=8, alpha=4.0, target=("attention", "feedforward")).to_dict(),
                    "target": ("attention", "feedforward")}
    assert set(read) == {"weights", "ss_network_dim", "ss_network_alpha"}  # save_lora writes dim and alpha
    assert set(assumed) == set(bare) - {"rank", "alpha"}
    assert assumed["steps"] == "200: ss_max_train_steps is missing or unset"


def test_prodigy_recipe(tmp_path, monkeypatch):
    pytest.importorskip("prodigyopt", reason="the test extra installs prodigyopt")
    md = {**SD_SCRIPTS, "ss_optimizer": "prodigyopt.prodigy.Prodigy", "ss_learning_rate": "1.0"}
    path = _sd_scripts_lora(tmp_path / "p.safetensors", md)
    kwargs, _, assumed = read_recipe(path)
    assert kwargs["optimizer"] == "prodigy" and kwargs["weight_decay"] == 0.0 and kwargs["learning_rate"] == 1.0
    assert assumed["weight_decay"].startswith("0.0: the default of Prodigy")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "prodigyopt" else real(n, *a))
    with pytest.raises(ValueError, match=r"^the LoRA was trained with Prodigy: .*: pip install prodigyopt$"):
        read_recipe(path)


def test_our_lora_round_trips(tiny_sd, tmp_path):
    pipe = Pipeline.from_diffusers(tiny_sd)
    data = CaptionedImages.from_images(torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0)),
                                       ["a cat", "a dog"])
    cfg = TrainConfig(steps=2, learning_rate=3e-4, rank=2, alpha=3.0, cond_drop=0.2, batch_size=2, grad_accum=2,
                      warmup_steps=1, resolution=32, random_flip=True, target=("attention", "resnet", "text_encoder"),
                      noise_offset=0.05, seed=9, weight_decay=0.05, max_grad_norm=0.5, unet_lr=2e-4,
                      text_encoder_lr=1e-5, lr_scheduler="cosine", min_snr_gamma=5.0, clip_skip=2, enable_bucket=True,
                      bucket_step=16)
    res = finetune_lora(pipe, data, cfg)
    for layout in ("kohya", "diffusers"):
        kwargs, read, _ = read_recipe(save_lora(res.lora, tmp_path / f"ours_{layout}.safetensors", layout))
        assert TrainConfig(**kwargs) == cfg, layout
        assert read["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.05)"


def test_bucket_recipe(tmp_path):
    md = {**SD_SCRIPTS, "ss_enable_bucket": "True", "ss_min_bucket_reso": "256", "ss_max_bucket_reso": "1024"}
    kwargs, read, assumed = read_recipe(_sd_scripts_lora(tmp_path / "b.safetensors", md))
    assert kwargs["enable_bucket"] is True and read["ss_enable_bucket"] == "True" and "enable_bucket" not in assumed
    md.update(ss_max_bucket_reso="2048", ss_bucket_reso_steps="32")
    kwargs, _, assumed = read_recipe(_sd_scripts_lora(tmp_path / "c.safetensors", md))
    assert kwargs["bucket_step"] == 32
    assert assumed["enable_bucket"] == "True: bucket sides 256 to 1024 (the file's: 256 to 2048)"
