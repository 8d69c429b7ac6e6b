"""What training reads every step, prepared once: images at the training size, VAE latents, text embeddings.

Memory does not grow with pixels: the resized images are kept as uint8 (a quarter of float32) and only when a
step needs them (random crop, or ``cache_latents=False``); with center crop the VAE sees a few images at a time and
only their latent distribution (mean, std: 2 x 4 x (R/8)^2 floats per image and orientation) is kept. Encoding goes
through :mod:`redifine_core.vae` (sliced batches, ``force_upcast``, tiling).

Once the caches are built, the modules a step no longer needs (text encoders that are not trained, the VAE when
latents are cached) leave the GPU until training closes (:meth:`redifine_core.training.borrow.BorrowedPipeline.park`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..prompt_encoding import text_conditioning
from ..vae import encode_moments

ENCODE_BATCH = 4  # images per VAE encode call while caching


# ---------------------------------------------------------------------------------------------------- images


def _resize_to_cover(img: Any, height: int, width: int) -> Any:
    """PIL image resized (Lanczos), aspect kept, to the smallest size that covers ``height`` x ``width``."""
    from PIL import Image

    w, h = img.size
    s = max(width / w, height / h)
    nw, nh = max(width, round(w * s)), max(height, round(h * s))
    return img.resize((nw, nh), Image.Resampling.LANCZOS) if (nw, nh) != (w, h) else img


def _resize_short_side(img: Any, size: int) -> Any:
    """PIL image resized (Lanczos) so that its shorter side is ``size``."""
    return _resize_to_cover(img, size, size)


def _to_uint8(img: Any) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor [3, H, W]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def uint8_to_pixels(u8: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 in [-1, 1] (the VAE's input range)."""
    return u8.float().div_(127.5).sub_(1.0)


def _to_pixels(img: Any) -> torch.Tensor:
    """PIL RGB image -> float32 [3, H, W] in [-1, 1]."""
    return uint8_to_pixels(_to_uint8(img))


def mirrored_left(width: int, left: int, crop: int) -> int:
    """The crop's left offset after a horizontal flip of the resized image: ``width - left - crop``.

    Flipping a crop is the same as cropping the flipped image at the mirrored offset, which is what SDXL's
    ``crops_coords_top_left`` conditioning must then say. diffusers' ``train_text_to_image_sdxl.py`` writes
    ``x1 = image.width - x1`` after cropping (``image.width`` is then the crop width): for a square image that
    reports an offset of a whole crop width although nothing was cropped, so we use the geometric mirror instead.
    """
    return width - left - crop


@dataclass
class ResizedImages:
    """The data set at the training size, uncropped, uint8 [3, H, W]: each image just covers its crop size
    ``targets[i]`` (height, width): the square ``resolution`` (shorter side = resolution), or its aspect bucket."""

    images: list
    orig_sizes: list  # (height, width) before resizing: SDXL's original-size conditioning
    resolution: int
    targets: list

    @classmethod
    def build(cls, pil_images: Sequence[Any], resolution: int,
              targets: Optional[Sequence[tuple[int, int]]] = None) -> "ResizedImages":
        targets = list(targets) if targets is not None else [(resolution, resolution)] * len(pil_images)
        images, sizes = [], []
        for im, (th, tw) in zip(pil_images, targets):
            sizes.append((im.height, im.width))
            images.append(_to_uint8(_resize_to_cover(im, th, tw)))
        return cls(images, sizes, resolution, targets)

    def size(self, i: int) -> tuple[int, int]:
        h, w = self.images[i].shape[-2:]
        return int(h), int(w)

    def center_offsets(self, i: int) -> tuple[int, int]:
        (h, w), (th, tw) = self.size(i), self.targets[i]
        return (h - th) // 2, (w - tw) // 2

    def crop(self, i: int, top: int, left: int) -> torch.Tensor:
        th, tw = self.targets[i]
        return self.images[i][:, top:top + th, left:left + tw]


# ---------------------------------------------------------------------------------------------------- latents


class LatentCache:
    """Latent distribution (raw VAE space, float32, on the pipeline's device) of every image's center crop (to
    ``targets[i]``, default the square ``resolution``), and of its mirror image when ``flip``. Pixels are resized,
    cropped and encoded ``ENCODE_BATCH`` images at a time (one encode per crop size among them)."""

    def __init__(self, pipeline: Any, pil_images: Sequence[Any], resolution: int, flip: bool,
                 targets: Optional[Sequence[tuple[int, int]]] = None) -> None:
        self.resolution = resolution
        self.targets = list(targets) if targets is not None else [(resolution, resolution)] * len(pil_images)
        self.orig_sizes: list[tuple[int, int]] = []
        self.sizes: list[tuple[int, int]] = []  # after resizing
        self.offsets: list[tuple[int, int]] = []  # center-crop (top, left)
        self.flip = flip
        self.moment_list: list[tuple[torch.Tensor, ...]] = []  # per image: (mean, std[, mean_f, std_f]), [C, h, w]
        for start in range(0, len(pil_images), ENCODE_BATCH):
            chunk = ResizedImages.build(pil_images[start:start + ENCODE_BATCH], resolution,
                                        self.targets[start:start + ENCODE_BATCH])
            crops = []
            for j in range(len(chunk.images)):
                top, left = chunk.center_offsets(j)
                self.offsets.append((top, left))
                self.sizes.append(chunk.size(j))
                crops.append(chunk.crop(j, top, left))
            self.orig_sizes.extend(chunk.orig_sizes)
            per_image: list = [None] * len(crops)
            for size in dict.fromkeys(tuple(c.shape[-2:]) for c in crops):  # one encode per crop size
                js = [j for j, c in enumerate(crops) if tuple(c.shape[-2:]) == size]
                batch = uint8_to_pixels(torch.stack([crops[j] for j in js]))
                parts = list(encode_moments(pipeline, batch, batch_size=ENCODE_BATCH))
                if flip:
                    parts += encode_moments(pipeline, torch.flip(batch, dims=[-1]), batch_size=ENCODE_BATCH)
                for k, j in enumerate(js):
                    per_image[j] = tuple(x[k] for x in parts)
            self.moment_list.extend(per_image)

    def _stacked(self, part: int, idx: Optional[list[int]] = None) -> torch.Tensor:
        rows = range(len(self.moment_list)) if idx is None else idx
        return torch.stack([self.moment_list[i][part] for i in rows])

    @property
    def mean(self) -> torch.Tensor:
        return self._stacked(0)

    @property
    def mean_f(self) -> Optional[torch.Tensor]:
        return self._stacked(2) if self.flip else None

    def moments(self, idx: list[int], flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the samples ``idx`` (one crop size); the mirrored image's where ``flip`` is True."""
        mean, std = self._stacked(0, idx), self._stacked(1, idx)
        if self.flip and bool(flip.any()):
            f = flip.to(mean.device).view(-1, 1, 1, 1)
            mean = torch.where(f, self._stacked(2, idx), mean)
            std = torch.where(f, self._stacked(3, idx), std)
        return mean, std

    def crop_top_left(self, i: int, flipped: bool) -> tuple[int, int]:
        """The (top, left) crop offset SDXL is conditioned on for image ``i``."""
        top, left = self.offsets[i]
        return (top, mirrored_left(self.sizes[i][1], left, self.targets[i][1])) if flipped else (top, left)


# ------------------------------------------------------------------------------------------------------- text


class TextEncoder:
    """Prompt embeddings [B, 77, D] (and SDXL pooled embeddings [B, P]) from the pipeline's text encoder(s), through
    :func:`redifine_core.prompt_encoding.text_conditioning`, the encoder sampling uses (``clip_skip`` included)."""

    def __init__(self, pipeline: Any, sdxl: bool, clip_skip: Optional[int] = None) -> None:
        self.pipeline = pipeline
        self.sdxl = sdxl
        self.clip_skip = clip_skip

    def parts(self) -> list[tuple[str, Any, Any]]:
        """(name, encoder, tokenizer) of every text encoder."""
        p = self.pipeline
        parts = [("text_encoder", p.text_encoder, p.tokenizer)]
        if self.sdxl:
            parts.append(("text_encoder_2", p.text_encoder_2, p.tokenizer_2))
        return parts

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return text_conditioning(self.pipeline, list(texts), self.sdxl, self.clip_skip)


class TextCache:
    """Embeddings of every distinct caption and of ``""`` (in ``dtype``, on the encoder's device), encoded once.

    SDXL checkpoints flagged ``force_zeros_for_empty_prompt`` use a zero embedding as the unconditional input at
    sampling time; with ``zero_uncond`` the cached ``""`` embedding is that zero, so condition drop trains towards it.
    """

    def __init__(self, encoder: TextEncoder, captions: Sequence[str], dtype: torch.dtype, zero_uncond: bool,
                 chunk: int = 16) -> None:
        self.unique = list(dict.fromkeys(list(captions) + [""]))
        self.empty_id = self.unique.index("")
        self.ids = [self.unique.index(c) for c in captions]
        with torch.no_grad():
            parts = [encoder(self.unique[i:i + chunk]) for i in range(0, len(self.unique), chunk)]
        self.embeds = torch.cat([e for e, _ in parts]).to(dtype)
        self.pooled = torch.cat([p for _, p in parts]).to(dtype) if encoder.sdxl else None
        if zero_uncond:
            self.embeds[self.empty_id] = 0
            self.pooled[self.empty_id] = 0  # type: ignore[index]

    def lookup(self, idx: list[int], drop: list[bool]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        tid = torch.tensor([self.empty_id if d else self.ids[i] for d, i in zip(drop, idx)],
                           device=self.embeds.device)
        return self.embeds[tid], (self.pooled[tid] if self.pooled is not None else None)
