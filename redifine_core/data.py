"""Captioned image sets: a folder of images + same-name .txt captions (kohya), or images/tensors + a caption list.

The API:

    @dataclass(frozen=True)
    class CaptionedImages:
        images: tuple[PIL.Image.Image, ...]   # RGB, 8-bit
        captions: tuple[str, ...]
        names: tuple[str, ...]                # file stems (or "000000", ...) for naming outputs
        def __len__(self) -> int
        @classmethod from_folder(cls, folder, default_caption: str | None = None, limit: int | None = None)
        read_caption(image_path, default_caption=None) -> str     # <stem>.txt as UTF-8, one line naming a bad file
        @classmethod from_images(cls, images: Sequence[PIL.Image | np.ndarray | torch.Tensor] | torch.Tensor,
                                 captions: Sequence[str] | str) -> "CaptionedImages"
            # torch.Tensor batches in ComfyUI IMAGE layout [N, H, W, C] in [0, 1]
        def to_tensor(self) -> torch.Tensor   # [N, H, W, 3] float in [0, 1] (all images must share a size)

Conversions: every image becomes 8-bit RGB. Transparent images (RGBA, LA, palette with transparency) are
composited on white, the usual choice for training sets with cut-out subjects; grayscale is replicated to three
channels; 16-bit and float images are scaled to 8 bits. Arrays/tensors may be HWC or CHW (3 or 4 channels, or 2-D
grayscale), uint8 in [0, 255] or float in [0, 1].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL image (RGBA, LA, P, L, I;16, I, F, CMYK, ...) -> 8-bit RGB; transparency composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 65535.0 * 255.0
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _array_to_image(arr: np.ndarray, what: str) -> Image.Image:
    # CHW -> HWC. HWC (the ComfyUI layout) wins when ambiguous, except that a leading 3 is read as RGB channels.
    if arr.ndim == 3 and arr.shape[-1] != 3 and (
        arr.shape[0] == 3 or (arr.shape[0] in (1, 4) and arr.shape[-1] not in (1, 4))
    ):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ValueError(f"{what}: expected an image array [H, W], [H, W, 3|4] or [3|4, H, W], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        a8 = arr
    elif arr.dtype == np.uint16:
        a8 = np.rint(arr.astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.bool_:
        f = arr.astype(np.float64)
        if not np.isfinite(f).all():
            raise ValueError(f"{what}: image values must be finite")
        lo, hi = (float(f.min()), float(f.max())) if f.size else (0.0, 0.0)
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"{what}: float images must be in [0, 1] (ComfyUI IMAGE), got values in [{lo:.3g}, {hi:.3g}]")
        a8 = np.rint(np.clip(f, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
            raise ValueError(f"{what}: integer images must be in [0, 255], got dtype {arr.dtype}")
        a8 = arr.astype(np.uint8)
    else:
        raise ValueError(f"{what}: unsupported image dtype {arr.dtype}")
    if a8.ndim == 2:
        return Image.fromarray(a8, mode="L").convert("RGB")
    return to_rgb8(Image.fromarray(np.ascontiguousarray(a8), mode="RGBA" if a8.shape[-1] == 4 else "RGB"))


def _as_image(x: Any, what: str) -> Image.Image:
    if isinstance(x, Image.Image):
        return to_rgb8(x)
    if isinstance(x, torch.Tensor):
        return _array_to_image(x.detach().to("cpu", torch.float32 if x.is_floating_point() else x.dtype).numpy(), what)
    if isinstance(x, np.ndarray):
        return _array_to_image(x, what)
    raise ValueError(f"{what}: expected a PIL image, numpy array or torch tensor, got {type(x).__name__}")


def read_caption(image_path: Union[str, os.PathLike], default_caption: Optional[str] = None) -> str:
    """The caption of ``image_path``: its ``<stem>.txt`` (UTF-8 text, stripped), else ``default_caption``.

    A caption file that is not UTF-8 (Latin-1, UTF-16, binary) raises one line naming the file.
    """
    p = Path(image_path)
    cap_path = p.with_suffix(".txt")
    if not cap_path.is_file():
        if default_caption is not None:
            return default_caption
        raise ValueError(f"image {str(p)!r} has no caption file {cap_path.name!r} (give default_caption to use one "
                         "caption for images without a .txt)")
    try:
        return cap_path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"caption file {str(cap_path)!r} is not UTF-8 text (byte {exc.start} cannot be decoded); "
                         "save it as UTF-8") from None
    except OSError as exc:
        raise ValueError(f"caption file {str(cap_path)!r} cannot be read: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class CaptionedImages:
    """Images (8-bit RGB PIL) with one caption and one output name each."""

    images: tuple
    captions: tuple
    names: tuple

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "captions", tuple(self.captions))
        object.__setattr__(self, "names", tuple(self.names))
        if len(self.images) == 0:
            raise ValueError("CaptionedImages.images is empty: a dataset needs at least one image")
        if len(self.captions) != len(self.images):
            raise ValueError(
                f"CaptionedImages: {len(self.captions)} captions for {len(self.images)} images; "
                "give one caption per image (or a single string for all)"
            )
        if len(self.names) != len(self.images):
            raise ValueError(f"CaptionedImages: {len(self.names)} names for {len(self.images)} images; one name per image")
        for i, c in enumerate(self.captions):
            if not isinstance(c, str):
                raise ValueError(f"CaptionedImages.captions[{i}] must be a str, got {type(c).__name__}")
        for i, im in enumerate(self.images):
            if not isinstance(im, Image.Image) or im.mode != "RGB":
                raise ValueError(
                    f"CaptionedImages.images[{i}] must be an RGB PIL image (use from_images to convert), got "
                    f"{getattr(im, 'mode', type(im).__name__)}"
                )
        if len(set(self.names)) != len(self.names):
            raise ValueError("CaptionedImages.names must be unique")

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_folder(cls, folder: Union[str, os.PathLike], default_caption: Optional[str] = None,
                    limit: Optional[int] = None, cancel: Optional[Any] = None) -> "CaptionedImages":
        """Images in ``folder`` (not recursive, sorted by name) with captions from ``<stem>.txt`` beside each.

        ``limit`` reads only the first N images. Every caption is read (and must be UTF-8 text) before any image is
        decoded, so a bad caption file is reported at once. ``cancel`` (anything with ``is_set()``) is checked
        before each image: ``progress.Cancelled`` is raised when it is set.
        """
        from .progress import check_cancel

        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ValueError(f"dataset folder {str(folder)!r} does not exist or is not a folder")
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(
                f"dataset folder {str(folder)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        stems = [p.stem for p in files]
        dup = sorted({s for s in stems if stems.count(s) > 1})
        if dup:
            raise ValueError(f"dataset folder {str(folder)!r}: several images share the name {dup[0]!r}; "
                             "each image needs its own <name>.txt caption")
        if limit is not None:
            files, stems = files[:limit], stems[:limit]
        captions = [read_caption(p, default_caption) for p in files]
        images = []
        for p in files:
            check_cancel(cancel)
            try:
                with Image.open(p) as im:
                    im.load()
                    images.append(to_rgb8(im).copy())
            except Exception as exc:  # PIL raises many types for broken files
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ValueError(f"cannot read image {str(p)!r}: {first}") from exc
        return cls(tuple(images), tuple(captions), tuple(stems))

    @classmethod
    def from_images(cls, images: Union[Sequence[Any], torch.Tensor, np.ndarray],
                    captions: Union[Sequence[str], str]) -> "CaptionedImages":
        """From PIL images, arrays, tensors, or one batch tensor in ComfyUI IMAGE layout [N, H, W, C] in [0, 1]."""
        if isinstance(images, (torch.Tensor, np.ndarray)):
            if images.ndim != 4:
                raise ValueError(
                    f"images: a batch tensor must be [N, H, W, C] (ComfyUI IMAGE), got shape {tuple(images.shape)}"
                )
            items = [images[i] for i in range(images.shape[0])]
        elif isinstance(images, (Image.Image,)):
            items = [images]
        else:
            items = list(images)
        if len(items) == 0:
            raise ValueError("images is empty: a dataset needs at least one image")
        if isinstance(captions, str):
            caps = [captions] * len(items)
        else:
            caps = list(captions)
            if len(caps) != len(items):
                raise ValueError(
                    f"{len(caps)} captions for {len(items)} images: give one caption per image, or a single string"
                )
        pil = tuple(_as_image(x, f"images[{i}]") for i, x in enumerate(items))
        names = tuple(f"{i:06d}" for i in range(len(pil)))
        return cls(pil, tuple(caps), names)

    def to_tensor(self) -> torch.Tensor:
        """All images as a float tensor [N, H, W, 3] in [0, 1] (ComfyUI IMAGE layout)."""
        sizes = sorted({im.size for im in self.images})
        if len(sizes) > 1:
            raise ValueError(f"to_tensor needs images of one size, got sizes (w, h) {sizes[:4]}")
        arr = np.stack([np.asarray(im, dtype=np.uint8) for im in self.images])
        return torch.from_numpy(arr).float().div_(255.0)
