"""ReDiFineCheck: "will my LoRA degrade?" The artist's LoRA, images and CFG in; the answer and a grid out.

Everything is the core's (redifine_core.check): the node maps ComfyUI's choices to paths and calls it. A check lives
in ``<ComfyUI output>/redifine/<check.out_name(...)>`` and is resumed when run again with the same inputs.
"""

from __future__ import annotations

import os

from . import _comfy
from .chain import RUNS_SUBDIR, ChainProgress, _load_images
from .common import CATEGORY, ComfyCancel, comfy_cancellation, path_inside, pils_to_tensor
from .dataset import input_subfolders
from .pipeline import model_choices, resolve_source

TOY_LORA = "toy (trained here)"
TOY_IMAGES = "toy (made here)"


def _lora_path(choice: str) -> str:
    if choice == TOY_LORA:
        return "toy"
    path = _comfy.full_path("loras", choice)
    if path is None:
        raise ValueError(f"lora={choice!r}: no such file in ComfyUI's loras folders")
    return path


def _images_path(choice: str) -> str:
    return "toy" if choice == TOY_IMAGES else path_inside(_comfy.input_directory(), choice)


class ReDiFineCheck:
    DESCRIPTION = ("Will my LoRA degrade if I train it on the images it makes? Reads your recipe from the LoRA's "
                   "metadata, then over a few rounds generates from your captions, finetunes your LoRA on those "
                   "images with your recipe, and repeats: once at your CFG and once with ReDiFine. Answers in plain "
                   "words: the direction (blur, over-guidance, drift from your images, stable or inconclusive), from "
                   "which round and how large, and whether ReDiFine holds it. Resumes when run again with the same "
                   "inputs. With 'toy' lora and images and the toy model it runs in minutes on a CPU.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("answer", "grid")
    OUTPUT_TOOLTIPS = (
        "The answer in plain words with its evidence (each change with its 95 % interval), then the recipe read "
        "from your LoRA and what was assumed.",
        "Your captions across the rounds: your image, then each round at your CFG, then each round with ReDiFine.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": ([TOY_LORA] + _comfy.filename_list("loras"), {"tooltip":
                     "Your LoRA from ComfyUI's loras folder (sd-scripts, OneTrainer, ComfyUI's trainer, diffusers or "
                     "ours). Its ss_* metadata gives the recipe. 'toy' trains a small toy LoRA first (toy model)."}),
            "images": ([TOY_IMAGES] + input_subfolders(), {"tooltip":
                       "Your training images: a sub-folder of ComfyUI's input folder, each image with a same-name .txt "
                       "caption. 'toy' makes a toy folder (toy model)."}),
            "model": (model_choices(), {"tooltip": "The base model your LoRA was trained on."}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 1.0, "max": 30.0, "step": 0.5, "tooltip":
                    "The CFG you generate with. ReDiFine's schedule starts at it and decays to 1."}),
            "rounds": ("INT", {"default": 3, "min": 2, "max": 50, "tooltip":
                       "Rounds, round 0 being your LoRA as it is; each later round trains on the last one's images."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def run(self, lora, images, model, cfg, rounds, unique_id=None):
        import torch

        from redifine_core.check import has_run, out_name, run_check

        lora_path, images_path = _lora_path(lora), _images_path(images)
        source, tokenizer_dir = resolve_source(model)
        out = path_inside(_comfy.output_directory(), RUNS_SUBDIR, out_name(lora, images, cfg, rounds))
        lines = []
        with torch.inference_mode(False), comfy_cancellation():
            result = run_check(lora_path, images_path, source, float(cfg), int(rounds), out,
                               progress=ChainProgress(unique_id, os.path.join(out, "chain")), cancel=ComfyCancel(),
                               resume=has_run(out), echo=lines.append, tokenizer_dir=tokenizer_dir)
        grid = (pils_to_tensor(_load_images([result.grid])) if result.grid is not None
                else torch.zeros(1, 64, 64, 3))
        text = result.answer + "\n\n" + "\n".join(lines) + f"\n\nCheck folder: {out}"
        return {"ui": {"text": [text]}, "result": (text, grid)}
