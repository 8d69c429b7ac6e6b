"""What a training step regresses and how the error is weighted: the DDPM forward process, its target, and the loss.

    noisy_and_target(alphas_cumprod, latents, noise, t, prediction_type) -> (noisy latents, target)
    diffusion_loss(pred, target, t, noise_scheduler, prediction_type, min_snr_gamma) -> scalar loss

The loss is the mean squared error; with ``min_snr_gamma`` each sample's error is weighted by min-SNR-gamma
(Hang et al. 2023) exactly as diffusers' ``train_text_to_image.py`` does it: ``min(snr, gamma) / snr`` for
epsilon prediction and ``min(snr, gamma) / (snr + 1)`` for v-prediction, with ``snr`` from diffusers'
``compute_snr`` (a zero-SNR timestep gets weight 1, as there).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F


def noisy_and_target(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDPM forward process and the regression target: (``add_noise``, noise or ``get_velocity``)."""
    acp = alphas_cumprod[t].view(-1, *([1] * (latents.ndim - 1)))
    sqrt_a, sqrt_1ma = acp.sqrt(), (1.0 - acp).sqrt()
    noisy = sqrt_a * latents + sqrt_1ma * noise
    if prediction_type == "epsilon":
        return noisy, noise
    return noisy, sqrt_a * noise - sqrt_1ma * latents


def min_snr_weights(noise_scheduler: Any, t: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma for timesteps ``t`` (float32, on ``t``'s device)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, t)
    clipped = torch.clamp(snr, max=gamma)
    weights = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
    return torch.where(snr == 0, torch.ones_like(weights), weights)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, noise_scheduler: Any,
                   prediction_type: str, min_snr_gamma: Optional[float] = None) -> torch.Tensor:
    """MSE between prediction and target (float32), per-sample weighted by min-SNR-gamma when it is set."""
    if not min_snr_gamma:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * min_snr_weights(noise_scheduler, t, prediction_type, float(min_snr_gamma))).mean()
