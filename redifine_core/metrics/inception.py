"""Inception-v3 pool3 features from a local safetensors file (torchvision's or the FID Inception), for FID/KID, and
``get_feature_extractor``, which turns a features spec into the extractor it names (Inception or handcrafted-v1).

Loaded only when a features spec names such a file; the file is validated first (header only) by
``features.check_features``'s checks, so a bad file fails before its weights are read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..progress import CancelFlag, check_cancel
from .features import FeatureExtractor, FeatureSpec, _check_weights, _inception_name, _spec_label, _weights_path
from .statistics import ImagesLike, as_image_array


class InceptionFeatures(FeatureExtractor):
    """2048-d pool3 features of Inception-v3 from a local safetensors state dict (needs torchvision).

    Accepts a torchvision ``inception_v3`` state dict (1000 classes; inputs ImageNet-normalised) or the FID Inception
    of pytorch-fid / torchmetrics (``pt_inception-2015-12-05``, 1008 classes; FID-specific pooling blocks; inputs
    scaled to [-1, 1]), converted to safetensors. Images are resized to 299x299 bilinearly.
    """

    def __init__(self, weights: Union[str, os.PathLike], batch_size: int = 16, device: Optional[str] = None,
                 label: Optional[str] = None):
        path = Path(weights)
        num_classes = _check_weights(path, label or _spec_label(path))
        import torch
        from safetensors.torch import load_file

        sd = load_file(str(path))
        self.fid_layout = num_classes == 1008
        self.model = _build_inception(num_classes, self.fid_layout)
        sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(
                f"features: {path.name} is not an Inception-v3 state dict "
                f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {list(unexpected)[:5]})"
            )
        self.model.fc = torch.nn.Identity()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.eval().to(self.device)
        self.batch_size = batch_size
        self.name = _inception_name(path, self.fid_layout)

    def __call__(self, images: ImagesLike, cancel: Optional[CancelFlag] = None) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        arr = as_image_array(images)
        out = []
        with torch.no_grad():
            for i in range(0, arr.shape[0], self.batch_size):
                check_cancel(cancel)
                x = torch.from_numpy(arr[i : i + self.batch_size]).permute(0, 3, 1, 2).to(self.device)
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
                if self.fid_layout:
                    x = 2.0 * x - 1.0
                else:
                    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
                    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
                    x = (x - mean) / std
                out.append(self.model(x).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64)


def _build_inception(num_classes: int, fid_layout: bool):  # pragma: no cover - needs torchvision
    """torchvision inception_v3 (no aux head); with ``fid_layout`` the pooling blocks of the 2015 TF FID Inception."""
    import torch
    import torch.nn.functional as F
    from torchvision.models import inception as tvi

    model = tvi.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=num_classes, transform_input=False
    )
    if not fid_layout:
        return model

    class FIDInceptionA(tvi.InceptionA):
        def forward(self, x):
            b1 = self.branch1x1(x)
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
            return torch.cat([b1, b5, b3, bp], 1)

    class FIDInceptionC(tvi.InceptionC):
        def forward(self, x):
            b1 = self.branch1x1(x)
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                          self.branch7x7dbl_5):
                bd = layer(bd)
            bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
            return torch.cat([b1, b7, bd, bp], 1)

    class FIDInceptionE(tvi.InceptionE):
        def __init__(self, in_channels: int, max_pool: bool):
            super().__init__(in_channels)
            self.max_pool = max_pool

        def forward(self, x):
            b1 = self.branch1x1(x)
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            if self.max_pool:
                bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            else:
                bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            bp = self.branch_pool(bp)
            return torch.cat([b1, b3, bd, bp], 1)

    model.Mixed_5b = FIDInceptionA(192, pool_features=32)
    model.Mixed_5c = FIDInceptionA(256, pool_features=64)
    model.Mixed_5d = FIDInceptionA(288, pool_features=64)
    model.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    model.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    model.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    model.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    model.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    model.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    return model


def get_feature_extractor(features: FeatureSpec = "auto") -> FeatureExtractor:
    """Resolve ``features``: "auto", "handcrafted", "inception:<path>", a path to a .safetensors file, or an extractor.

    "auto" uses the Inception weights named by $REDIFINE_INCEPTION_WEIGHTS when it is set, else handcrafted-v1.
    """
    if isinstance(features, FeatureExtractor):
        return features
    path, label = _weights_path(features)
    if path is None:
        return FeatureExtractor()
    return InceptionFeatures(path, label=label)
