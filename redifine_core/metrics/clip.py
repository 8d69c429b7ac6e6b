"""CLIP score of generated images against their captions, with a local CLIP model folder (never downloads)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..progress import CancelFlag, check_cancel
from .statistics import ImagesLike, as_image_array

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """A local CLIP model loaded once; ``scores`` gives each image's CLIPScore, 100 * max(cos(image, caption), 0).

    Images are resized (shorter side, bicubic, antialiased) and centre-cropped to the model's image size and
    normalised with the OpenAI CLIP mean/std, as CLIPImageProcessor does by default.
    """

    def __init__(self, model_dir: Union[str, os.PathLike], batch_size: int = 16):
        folder = Path(model_dir)
        if not folder.is_dir():
            raise ValueError(
                f"clip_model: {str(folder)!r} is not a folder (a local CLIP model saved with save_pretrained)")
        from transformers import AutoTokenizer, CLIPModel

        self.folder = folder
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.size = int(self.model.config.vision_config.image_size)
        self.max_len = min(
            int(getattr(self.tokenizer, "model_max_length", 77) or 77),
            int(self.model.config.text_config.max_position_embeddings),
        )

    def scores(self, images: ImagesLike, captions: Sequence[str], cancel: Optional[CancelFlag] = None) -> np.ndarray:
        """Per-image CLIPScores [N] (float32) of ``images`` against ``captions`` (aligned one to one)."""
        import torch
        import torch.nn.functional as F

        arr = as_image_array(images)
        captions = list(captions)
        if len(captions) != arr.shape[0]:
            raise ValueError(
                f"captions: {len(captions)} captions for {arr.shape[0]} images; they must be aligned one to one"
            )
        size, tok, model = self.size, self.tokenizer, self.model
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

        def _emb(out):
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        scores = []
        with torch.no_grad():
            for i in range(0, arr.shape[0], self.batch_size):
                check_cancel(cancel)
                x = torch.from_numpy(arr[i : i + self.batch_size]).permute(0, 3, 1, 2)
                h, w = x.shape[-2:]
                s = size / min(h, w)
                nh, nw = max(size, round(h * s)), max(size, round(w * s))
                x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
                top, left = (nh - size) // 2, (nw - size) // 2
                x = (x[..., top : top + size, left : left + size] - mean) / std
                t = tok(captions[i : i + self.batch_size], padding=True, truncation=True, max_length=self.max_len,
                        return_tensors="pt")
                ie = _emb(model.get_image_features(pixel_values=x))
                te = _emb(model.get_text_features(input_ids=t["input_ids"], attention_mask=t.get("attention_mask")))
                cos = F.cosine_similarity(ie.float(), te.float(), dim=-1)
                scores.append((100.0 * cos.clamp(min=0)).numpy())
        return np.concatenate(scores)


def clip_score(
    images: ImagesLike, captions: Sequence[str], model_dir: Union[str, os.PathLike], batch_size: int = 16,
    cancel: Optional[CancelFlag] = None,
) -> float:
    """Mean CLIPScore, 100 * max(cos(image, caption), 0), with a local CLIP model folder (see ClipScorer)."""
    arr = as_image_array(images)
    captions = list(captions)
    if len(captions) != arr.shape[0]:
        raise ValueError(
            f"captions: {len(captions)} captions for {arr.shape[0]} images; they must be aligned one to one"
        )
    return float(ClipScorer(model_dir, batch_size=batch_size).scores(arr, captions, cancel=cancel).mean())
