"""Tiny Stable Diffusion / SDXL pipelines built from configs with random weights, for tests and benchmarks.

They have the real SD module layout (so LoRA key names, single-file conversion and ComfyUI key maps are exercised)
but a few hundred thousand parameters, and build offline in well under a second.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

TINY_WORDS = (
    "a an the photo of red green blue yellow white black purple orange circle square triangle star on in with "
    "background cat dog bird house tree car small big painting drawing pokemon butterfly"
).split()

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


def _tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    from .toy.word_tokenizer import write_word_tokenizer

    with tempfile.TemporaryDirectory(prefix="redifine_tiny_tok_") as folder:  # the tokenizer keeps no file open
        write_word_tokenizer(TINY_WORDS, folder, max_length=max_length)
        return CLIPTokenizer.from_pretrained(folder)


def _text_encoder(tokenizer, hidden: int = 32, projection: bool = False, projection_dim: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    return model.eval()


def _vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    ).eval()


def tiny_sd_components(prediction_type: str = "epsilon", seed: int = 0) -> dict:
    """Components of a tiny SD1.x-layout pipeline (2x VAE, 32-px default size)."""
    from diffusers import PNDMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()
    tok = _tokenizer()
    sched = PNDMScheduler(**{**SD_SCHEDULER, "prediction_type": prediction_type})
    return dict(
        unet=unet,
        vae=_vae(seed),
        text_encoder=_text_encoder(tok, seed=seed),
        tokenizer=tok,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
    )


def tiny_sd_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A diffusers ``StableDiffusionPipeline`` with tiny random weights."""
    from diffusers import StableDiffusionPipeline

    comps = tiny_sd_components(prediction_type, seed)
    pipe = StableDiffusionPipeline(**comps, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """A diffusers ``StableDiffusionXLPipeline`` with tiny random weights (two text encoders, text_time embedding)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled
        cross_attention_dim=64,
        norm_num_groups=32,
    ).eval()
    tok = _tokenizer()
    tok2 = _tokenizer()
    sched = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
        interpolation_type="linear",
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(seed),
        text_encoder=_text_encoder(tok, seed=seed),
        text_encoder_2=_text_encoder(tok2, projection=True, seed=seed + 1),
        tokenizer=tok,
        tokenizer_2=tok2,
        scheduler=sched,
        force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a tiny SD pipeline as a diffusers folder and return it."""
    folder = Path(folder)
    tiny_sd_pipeline(prediction_type, seed).save_pretrained(folder, safe_serialization=True)
    return folder
