"""ReDiFineDataset: a captioned image set from an input sub-folder, an IMAGE batch + captions, or the toy set."""

from __future__ import annotations

import os

from . import _comfy
from .common import (CATEGORY, ComfyCancel, bound_error, comfy_cancellation, first_error, lines, path_inside,
                     pils_to_tensor, run_checks, widget)

SOURCES = ("toy", "folder", "images")
NO_FOLDER = "(none)"
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def input_subfolders() -> list[str]:
    """Sub-folders of ComfyUI's input directory that hold at least one image."""
    base = _comfy.input_directory()
    out = []
    if os.path.isdir(base):
        for root, dirs, files in os.walk(base, followlinks=True):
            dirs.sort()
            if root != base and any(f.lower().endswith(_IMAGE_EXT) for f in files):
                out.append(os.path.relpath(root, base).replace(os.sep, "/"))
    return sorted(out)


class ReDiFineDataset:
    DESCRIPTION = ("A captioned image set (D0 of the chain, or LoRA training data): a sub-folder of ComfyUI's input "
                   "folder with images and same-name .txt captions, an IMAGE batch with one caption per line, or the "
                   "synthetic toy set (coloured shapes with exact captions) that goes with the toy model.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("REDIFINE_DATASET", "IMAGE", "INT")
    RETURN_NAMES = ("dataset", "images", "count")
    OUTPUT_TOOLTIPS = (
        "The captioned image set for the Train LoRA and Chain of Diffusion nodes.",
        "The images as one batch (resized to the first image's size), e.g. as the reference for Collapse Metrics.",
        "How many images the set holds.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "source": (list(SOURCES), {"default": "toy", "tooltip":
                           "toy = the synthetic set for the toy model; folder = a sub-folder of ComfyUI's input folder; "
                           "images = the IMAGE input with the captions below (one per line)."}),
                "folder": ([NO_FOLDER] + input_subfolders(), {"default": NO_FOLDER, "tooltip":
                           "For source=folder: a sub-folder of ComfyUI's input folder with images and same-name .txt "
                           "captions (e.g. cat_01.png + cat_01.txt)."}),
                "toy_count": ("INT", widget("images", 8, "For source=toy: how many toy images to draw.")),
                "toy_seed": ("INT", widget("seed", 0, "For source=toy: the seed that fixes which toy images are drawn.")),
                "default_caption": ("STRING", {"default": "", "tooltip":
                                    "For source=folder: the caption used for images without a .txt file "
                                    "(empty = such images are an error)."}),
                "captions": ("STRING", {"default": "", "multiline": True, "tooltip":
                             "For source=images: one caption per line, in image order (a single line is used for "
                             "every image)."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "For source=images: the images (ComfyUI IMAGE batch)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, source, folder, toy_count, toy_seed, default_caption, captions):
        if source not in SOURCES:
            return f"source={source!r} must be one of {SOURCES}"
        if source == "folder":
            if folder in (None, NO_FOLDER):
                return "source=folder needs a folder: put images + .txt captions in a sub-folder of ComfyUI's input folder"
            try:
                target = path_inside(_comfy.input_directory(), folder)
            except ValueError as e:
                return f"folder={folder!r}: {e}"
            if not os.path.isdir(target):
                return f"folder={folder!r} is not a folder in ComfyUI's input folder; refresh the page to list them"
        if source == "images" and captions is not None and not lines(captions):
            return "source=images needs captions: one caption per line (or one line for all images)"
        return first_error(bound_error("images", toy_count, "toy_count"), bound_error("seed", toy_seed, "toy_seed"))

    def build(self, source, folder, toy_count, toy_seed, default_caption, captions, images=None):
        import torch

        from redifine_core.data import CaptionedImages

        run_checks(self.VALIDATE_INPUTS(source, folder, toy_count, toy_seed, default_caption, captions))
        with torch.inference_mode(False):
            if source == "toy":
                from redifine_core.toy.dataset import make_toy_dataset

                with comfy_cancellation():
                    ds = make_toy_dataset(int(toy_count), seed=int(toy_seed), cancel=ComfyCancel())
            elif source == "folder":
                path = path_inside(_comfy.input_directory(), folder)
                with comfy_cancellation():  # Cancel stops between two images of a large folder
                    ds = CaptionedImages.from_folder(path, default_caption=default_caption or None,
                                                     cancel=ComfyCancel())
            else:
                if images is None:
                    raise ValueError("source=images needs the images input connected")
                caps = lines(captions)
                if len(caps) == 1:
                    caps = caps * int(images.shape[0])
                if len(caps) != int(images.shape[0]):
                    raise ValueError(f"captions: got {len(caps)} lines for {int(images.shape[0])} images; "
                                     "give one caption per image or a single line for all")
                ds = CaptionedImages.from_images(images.detach().clone(), caps)
        batch = pils_to_tensor(list(ds.images))
        return (ds, batch, len(ds))
