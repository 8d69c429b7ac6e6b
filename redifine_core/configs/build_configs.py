"""Regenerate the bundled architecture configs (no weights, no tokenizer vocabulary) for SD1.x, SD2.x and SDXL.

The JSON files under ``redifine_core/configs/{sd1,sd2,sdxl}/`` are diffusers-folder configs (``model_index.json``,
``unet/config.json``, ``vae/config.json``, ``text_encoder*/config.json``, ``scheduler/scheduler_config.json``,
``tokenizer*/tokenizer_config.json``). They are written by instantiating each class on the meta device, so every key
is the one the installed diffusers/transformers expect. Run ``python -m redifine_core.configs.build_configs``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

_SD_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

_CLIP_L: dict[str, Any] = dict(  # openai/clip-vit-large-patch14 text tower (SD1.x, SDXL text_encoder)
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

_OPEN_CLIP_H: dict[str, Any] = dict(  # SD2.x: OpenCLIP ViT-H/14, penultimate layer (23 of 24 layers)
    _CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    hidden_act="gelu", projection_dim=512,
)

_OPEN_CLIP_BIGG: dict[str, Any] = dict(  # SDXL text_encoder_2: OpenCLIP ViT-bigG/14 with projection
    _CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    hidden_act="gelu", projection_dim=1280,
)

_UNET_SD1: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

_UNET_SD2: dict[str, Any] = dict(
    _UNET_SD1, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True, upcast_attention=True,
)

_UNET_SDXL: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)


def _tokenizer_config(pad_token: str) -> dict[str, Any]:
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }


ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd1": dict(
        pipeline="StableDiffusionPipeline",
        unet=_UNET_SD1,
        vae=_SD_VAE,
        text_encoder=("CLIPTextModel", _CLIP_L),
        tokenizer=_tokenizer_config("<|endoftext|>"),
        scheduler=("PNDMScheduler", dict(_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                                         timestep_spacing="leading", prediction_type="epsilon")),
    ),
    "sd2": dict(
        pipeline="StableDiffusionPipeline",
        unet=_UNET_SD2,
        vae=dict(_SD_VAE, sample_size=768),
        text_encoder=("CLIPTextModel", _OPEN_CLIP_H),
        tokenizer=_tokenizer_config("!"),
        scheduler=("DDIMScheduler", dict(_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                         timestep_spacing="leading", prediction_type="v_prediction")),
    ),
    "sdxl": dict(
        pipeline="StableDiffusionXLPipeline",
        unet=_UNET_SDXL,
        vae=dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_encoder=("CLIPTextModel", _CLIP_L),
        text_encoder_2=("CLIPTextModelWithProjection", _OPEN_CLIP_BIGG),
        tokenizer=_tokenizer_config("<|endoftext|>"),
        tokenizer_2=_tokenizer_config("!"),
        scheduler=("EulerDiscreteScheduler", dict(_SCHEDULE, steps_offset=1, timestep_spacing="leading",
                                                  interpolation_type="linear", use_karras_sigmas=False,
                                                  prediction_type="epsilon")),
    ),
}


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def build(kind: str, out: Path) -> None:
    """Write the config folder of architecture ``kind`` into ``out``."""
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    arch = ARCHITECTURES[kind]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
    _write(out / "unet" / "config.json", json.loads(unet.to_json_string()))
    _write(out / "vae" / "config.json", json.loads(vae.to_json_string()))
    sched_cls, sched_kw = arch["scheduler"]
    scheduler = getattr(diffusers, sched_cls)(**sched_kw)
    _write(out / "scheduler" / "scheduler_config.json", json.loads(scheduler.to_json_string()))
    index: dict[str, Any] = {
        "_class_name": arch["pipeline"],
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", sched_cls],
    }
    for name in ("text_encoder", "text_encoder_2"):
        if name in arch:
            cls_name, kw = arch[name]
            cfg = transformers.CLIPTextConfig(**kw, architectures=[cls_name])
            _write(out / name / "config.json", cfg.to_dict())
            index[name] = ["transformers", cls_name]
    for name in ("tokenizer", "tokenizer_2"):
        if name in arch:
            _write(out / name / "tokenizer_config.json", arch[name])
            index[name] = ["transformers", "CLIPTokenizer"]
    if arch["pipeline"] == "StableDiffusionPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                     requires_safety_checker=False)
    else:
        index.update(feature_extractor=[None, None], image_encoder=[None, None], force_zeros_for_empty_prompt=True)
    _write(out / "model_index.json", index)


def main() -> None:
    for kind in ARCHITECTURES:
        build(kind, HERE / kind)
        print(f"wrote {HERE / kind}")


if __name__ == "__main__":
    main()
