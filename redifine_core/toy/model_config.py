"""Architectures of the toy text-to-image models: a small VAE, a small CLIP text encoder, a small conditional UNet.

All three are standard diffusers / transformers classes, so a toy model is an ordinary Stable Diffusion 1.x-layout
diffusers folder and loads through the same code path as a real checkpoint. Two architectures, both 32 px with a 2x VAE
and a 16 x 16 latent: ``shapes`` (the shipped ``toy`` model) and ``bed`` (the model of the texture and
patterned-shape sets: the same networks, the vocabulary of all three sets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGE_SIZE = 32
VAE_FACTOR = 2
LATENT_SIZE = IMAGE_SIZE // VAE_FACTOR
LATENT_CHANNELS = 4
TOKEN_LENGTH = 16  # "a red circle on a blue background" is 7 words + 2 special tokens

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
)

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=LATENT_SIZE,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=32,
)

TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=TOKEN_LENGTH,
    hidden_act="gelu",
    projection_dim=64,
)

# A standard SD-style noise schedule; "trailing" spacing so few-step DDIM starts at the last timestep.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="trailing",
    prediction_type="epsilon",
)



@dataclass(frozen=True)
class ToyArchitecture:
    """One toy model's shapes: image size, VAE factor, the VAE and UNet configs, the tokenizer's words and length."""

    name: str
    image_size: int
    vae_factor: int
    vae: dict
    unet: dict
    vocabulary: tuple[str, ...]
    token_length: int = TOKEN_LENGTH

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_factor


def _architectures() -> dict[str, ToyArchitecture]:
    from .dataset import VOCABULARY
    from .textures import PATTERNED_SHAPES_VOCABULARY, TEXTURE_VOCABULARY

    bed_words = tuple(dict.fromkeys(VOCABULARY + TEXTURE_VOCABULARY + PATTERNED_SHAPES_VOCABULARY))
    return {
        "shapes": ToyArchitecture("shapes", IMAGE_SIZE, VAE_FACTOR, VAE_CONFIG, UNET_CONFIG, VOCABULARY),
        "bed": ToyArchitecture("bed", IMAGE_SIZE, VAE_FACTOR, VAE_CONFIG, UNET_CONFIG, bed_words),
    }


ARCHITECTURES: dict[str, ToyArchitecture] = _architectures()


def build_vae(seed: int = 0, arch: str = "shapes"):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**ARCHITECTURES[arch].vae)


def build_unet(seed: int = 0, arch: str = "shapes"):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**ARCHITECTURES[arch].unet)


def build_text_encoder(tokenizer, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(cfg)


def build_tokenizer(folder, arch: str = "shapes"):
    """Write the toy word-level tokenizer of ``arch`` into ``folder`` and load it."""
    from transformers import CLIPTokenizer

    from .word_tokenizer import write_word_tokenizer

    a = ARCHITECTURES[arch]
    write_word_tokenizer(a.vocabulary, folder, max_length=a.token_length)
    return CLIPTokenizer.from_pretrained(str(folder))


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)
