"""Test helper: the diffusers -> original single-file converters, re-exported from ``redifine_core.random_models``."""

from redifine_core.random_models import (  # noqa: F401
    StateDict,
    clip_to_original,
    open_clip_to_original,
    sd1_to_original,
    sdxl_to_original,
    unet_to_original,
    vae_to_original,
)
