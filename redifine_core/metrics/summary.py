"""What the metrics need from one image set, gathered batch by batch (SetSummary), and the metrics built on it.

A SetSummary keeps per-image statistics, running colour sums and one small feature vector per image (handcrafted-v1,
plus the rows of an external extractor such as Inception, plus CLIP scores when asked), never the images, so memory
is O(number of images x feature size). ``image_statistics`` and ``set_metrics`` accept image arrays or summaries and
give identical numbers either way: an array is summarised exactly as a stream of batches would be.

Streaming use, e.g. one chain iteration (each image is read or generated once, then only its summary is kept)::

    extractor = get_feature_extractor(spec)                    # once per run: Inception weights load once
    ref = SetSummary.from_pngs(reference_folder, features=extractor)
    gen = SetSummary(features=extractor)
    for batch in batches:                                      # uint8 or float [b, H, W, 3]
        gen.add(batch, cancel=cancel)
    metrics = set_metrics(gen, ref, previous=prev_summary, features=extractor)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from ..progress import CancelFlag, ProgressCallback, ProgressEvent, check_cancel, report
from .clip import ClipScorer
from .features import (
    FeatureExtractor,
    FeatureSpec,
    feature_set_name,
    fid_from_features,
    handcrafted_features_one,
    kid_from_features,
    mean_pairwise_distance,
)
from .inception import get_feature_extractor
from .statistics import (
    CLIP_HIGH,
    CLIP_LOW,
    PER_IMAGE,
    ImagesLike,
    as_image_array,
    luminance,
    per_image_statistics,
    power_spectrum,
    saturation_map,
)

PathLike = Union[str, os.PathLike]


class SetSummary:
    """Per-image statistics and feature vectors of one image set, accumulated batch by batch.

    ``features`` (a features spec or a FeatureExtractor; resolved once, here) picks the feature set used for FID/KID;
    pass one extractor to every summary of a run so Inception loads once. handcrafted-v1 rows are always kept (they
    give ``diversity``). With ``clip_model`` (a local CLIP folder or a ClipScorer), every ``add`` needs the batch's
    captions and the per-image CLIP scores are kept too. Images of different sizes may be mixed across batches.
    """

    def __init__(self, features: FeatureSpec = "auto", clip_model: Optional[Union[PathLike, ClipScorer]] = None):
        self.extractor: FeatureExtractor = get_feature_extractor(features)
        self.clip: Optional[ClipScorer] = None
        if clip_model is not None:
            self.clip = clip_model if isinstance(clip_model, ClipScorer) else ClipScorer(clip_model)
        self._n = 0
        self._per: dict[str, list[float]] = {k: [] for k in PER_IMAGE}
        self._clipped = 0
        self._n_pix = 0
        self._clipped_per: list[int] = []  # clipped channel values of each image (for the bootstrap of intervals)
        self._values_per: list[int] = []  # channel values of each image (3 x its pixels)
        self._csum = np.zeros(3)
        self._csq = np.zeros(3)
        self._handcrafted: list[np.ndarray] = []  # one [b, 135] array per batch
        self._external: list[np.ndarray] = []  # one [b, D] array per batch, for an extractor other than handcrafted
        self._clip_scores: list[np.ndarray] = []

    # ---- building
    def add(self, images: ImagesLike, cancel: Optional[CancelFlag] = None, *,
            captions: Optional[Sequence[str]] = None, name: str = "images") -> None:
        """Add one batch (anything ``as_image_array`` accepts). On any error or cancel the summary is unchanged.

        ``captions`` (aligned with the batch) are needed, and used, only when the summary computes CLIP scores.
        """
        arr = as_image_array(images, name)
        if self.clip is not None:
            if captions is None:
                raise ValueError("captions: this SetSummary computes CLIP scores, so add() needs the batch's captions")
            if len(captions) != arr.shape[0]:
                raise ValueError(f"captions: {len(captions)} captions for {arr.shape[0]} images; they must be "
                                 "aligned one to one")
        # accumulate into copies in image order, so any batching sums exactly as one whole-set pass would
        per = {k: list(v) for k, v in self._per.items()}
        clipped, csum, csq = self._clipped, self._csum.copy(), self._csq.copy()
        clipped_per, values_per = list(self._clipped_per), list(self._values_per)
        rows = []
        for img in arr:
            check_cancel(cancel)
            img64 = img.astype(np.float64)
            lum = luminance(img64)
            p = power_spectrum(lum)
            sat = saturation_map(img64)
            for k, v in per_image_statistics(img64, lum, p, sat).items():
                per[k].append(v)
            clipped_per.append(int(np.count_nonzero((img <= CLIP_LOW) | (img >= CLIP_HIGH))))
            values_per.append(int(img.size))
            clipped += clipped_per[-1]
            flat = img64.reshape(-1, 3)
            csum += flat.sum(axis=0)
            csq += np.einsum("ij,ij->j", flat, flat)
            rows.append(handcrafted_features_one(img64, lum=lum, p=p, sat=sat))
        external = None
        if type(self.extractor) is not FeatureExtractor:
            external = np.asarray(self.extractor(arr, cancel=cancel), dtype=np.float64)
            if external.ndim != 2 or external.shape[0] != arr.shape[0]:
                raise ValueError(f"features: extractor {self.extractor.name!r} returned shape "
                                 f"{tuple(external.shape)} for {arr.shape[0]} images; expected [N, D]")
        scores = self.clip.scores(arr, list(captions or []), cancel=cancel) if self.clip is not None else None
        # commit
        self._per, self._clipped, self._csum, self._csq = per, clipped, csum, csq
        self._clipped_per, self._values_per = clipped_per, values_per
        self._n_pix += arr.shape[0] * arr.shape[1] * arr.shape[2]
        self._n += arr.shape[0]
        self._handcrafted.append(np.stack(rows))
        if external is not None:
            self._external.append(external)
        if scores is not None:
            self._clip_scores.append(scores)

    @classmethod
    def from_images(cls, images: ImagesLike, cancel: Optional[CancelFlag] = None, *, features: FeatureSpec = "auto",
                    clip_model: Optional[Union[PathLike, ClipScorer]] = None,
                    captions: Optional[Sequence[str]] = None, name: str = "images") -> "SetSummary":
        """A summary of one image array [N, H, W, 3], added as a single batch."""
        out = cls(features=features, clip_model=clip_model)
        out.add(images, cancel=cancel, captions=captions, name=name)
        return out

    @classmethod
    def from_pngs(cls, paths: Union[PathLike, Iterable[PathLike]], batch_size: int = 16,
                  cancel: Optional[CancelFlag] = None, *, features: FeatureSpec = "auto",
                  clip_model: Optional[Union[PathLike, ClipScorer]] = None,
                  captions: Optional[Sequence[str]] = None) -> "SetSummary":
        """A summary of image files (a list of paths, or a folder: its *.png, sorted), read batch_size at a time.

        Only one batch of decoded images is in memory at once. Images are read as 8-bit RGB, as the chain stores them.
        """
        from PIL import Image

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
        if isinstance(paths, (str, os.PathLike)):
            folder = Path(paths)
            if not folder.is_dir():
                raise FileNotFoundError(f"images: {str(folder)!r} is not a folder (expected a folder of .png files or a "
                                        "list of image paths)")
            files = sorted(folder.glob("*.png"))
            if not files:
                raise ValueError(f"images: no .png files in {str(folder)!r}")
        else:
            files = [Path(p) for p in paths]
            if not files:
                raise ValueError("images: empty list of image files; at least one is needed")
        if captions is not None and len(captions) != len(files):
            raise ValueError(f"captions: {len(captions)} captions for {len(files)} images; they must be aligned "
                             "one to one")
        out = cls(features=features, clip_model=clip_model)
        for start in range(0, len(files), batch_size):
            check_cancel(cancel)
            chunk = files[start : start + batch_size]
            arrays = []
            for f in chunk:
                if not f.is_file():
                    raise FileNotFoundError(f"images: {str(f)!r} does not exist or is not a file")
                try:
                    with Image.open(f) as im:
                        arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
                except OSError as e:
                    raise ValueError(f"images: cannot read {str(f)!r} as an image ({e})") from None
            # consecutive images of one size go in together (one batch may mix sizes)
            i = 0
            while i < len(arrays):
                j = i + 1
                while j < len(arrays) and arrays[j].shape == arrays[i].shape:
                    j += 1
                caps = None if captions is None else list(captions[start + i : start + j])
                out.add(np.stack(arrays[i:j]), cancel=cancel, captions=caps, name=str(chunk[i]))
                i = j
        return out

    # ---- reading
    def __len__(self) -> int:
        return self._n

    @property
    def features_name(self) -> str:
        """The name of the feature set whose rows ``feature_rows`` holds (what set_metrics reports as "features")."""
        return self.extractor.name

    @property
    def handcrafted(self) -> np.ndarray:
        """handcrafted-v1 rows [N, 135], float64."""
        self._require_images()
        return np.concatenate(self._handcrafted)

    @property
    def feature_rows(self) -> np.ndarray:
        """Rows of this summary's feature set [N, D] (handcrafted-v1 or the external extractor's), float64."""
        self._require_images()
        return np.concatenate(self._external) if self._external else np.concatenate(self._handcrafted)

    def per_image(self) -> dict[str, np.ndarray]:
        """Each image's value of every PER_IMAGE statistic, plus "clipped" (its clipped channel values) and
        "values" (its channel values, 3 x pixels), so clipped_fraction = sum(clipped) / sum(values): arrays [N]."""
        self._require_images()
        out = {k: np.asarray(v, dtype=np.float64) for k, v in self._per.items()}
        out["clipped"] = np.asarray(self._clipped_per, dtype=np.float64)
        out["values"] = np.asarray(self._values_per, dtype=np.float64)
        return out

    @property
    def clip_scores(self) -> Optional[np.ndarray]:
        """Per-image CLIP scores [N] (float32), or None when the summary was built without a CLIP model."""
        if self.clip is None or not self._clip_scores:
            return None
        return np.concatenate(self._clip_scores)

    def statistics(self) -> dict[str, float]:
        """image_statistics of the set: per-image values averaged, colour and clipping pooled over every pixel."""
        self._require_images()
        out = {k: float(np.mean(v)) for k, v in self._per.items()}
        out["clipped_fraction"] = self._clipped / (self._n_pix * 3)
        mean = self._csum / self._n_pix
        std = np.sqrt(np.maximum(self._csq / self._n_pix - mean * mean, 0.0))
        for i, c in enumerate("rgb"):
            out[f"mean_{c}"] = float(mean[i])
        for i, c in enumerate("rgb"):
            out[f"std_{c}"] = float(std[i])
        out["std_rgb"] = float(std.mean())
        out["diversity"] = mean_pairwise_distance(self.handcrafted)
        return out

    def _require_images(self) -> None:
        if self._n == 0:
            raise ValueError("images: empty set (N = 0); at least one image is needed")

    def __repr__(self) -> str:
        return f"SetSummary({self._n} images, features={self.features_name!r})"


def image_statistics(images: Union[ImagesLike, SetSummary], cancel: Optional[CancelFlag] = None) -> dict[str, float]:
    """Weight-free statistics of one image set [N, H, W, 3] in [0, 1] (torch or numpy) or a SetSummary.

    Per-image values (hf_share, spectral_slope, laplacian_var, saturation, colourfulness, contrast) are averaged
    over the set; clipped_fraction and the colour means/stds pool every pixel of the set; diversity is the mean
    pairwise distance between the images' handcrafted-v1 feature vectors. See docs/metrics.md.
    """
    if isinstance(images, SetSummary):
        return images.statistics()
    return SetSummary.from_images(images, cancel=cancel, features=FeatureExtractor()).statistics()


def set_metrics(
    generated: Union[ImagesLike, SetSummary],
    reference: Union[ImagesLike, SetSummary],
    previous: Optional[Union[ImagesLike, SetSummary]] = None,
    features: FeatureSpec = "auto",
    captions: Optional[Sequence[str]] = None,
    clip_model: Optional[PathLike] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFlag] = None,
) -> dict[str, Union[float, str]]:
    """image_statistics(generated) + fid_ref/kid_ref (vs ``reference`` = D0) + fid_prev/kid_prev (vs ``previous``).

    Each set is an image array or a SetSummary (identical numbers either way). A summary must carry the feature set
    ``features`` names (checked from the file header; nothing is loaded when every set is a summary). fid_prev/
    kid_prev are present only when ``previous`` is given; clip_score only when ``clip_model`` (a local CLIP folder)
    is given, with ``captions`` aligned with an array ``generated``, or a ``generated`` summary built with CLIP scores.
    "features" names the feature set used. FID/KID need at least 2 images in every set compared (ValueError otherwise).
    """
    sets = {"generated": generated, "reference": reference, "previous": previous}
    summaries = [x for x in sets.values() if isinstance(x, SetSummary)]
    extractor: Optional[FeatureExtractor] = None
    if isinstance(features, FeatureExtractor) or not summaries:
        extractor = get_feature_extractor(features)
        name = extractor.name
    else:
        name = feature_set_name(features)
        extractor = next((s.extractor for s in summaries if s.features_name == name), None)
    arrays: dict[str, np.ndarray] = {}
    for key, x in sets.items():
        if x is not None and not isinstance(x, SetSummary):
            arrays[key] = as_image_array(x, key)
    for key, x in sets.items():
        if x is None:
            continue
        if isinstance(x, SetSummary) and x.features_name != name:
            raise ValueError(f"{key}: this SetSummary holds {x.features_name!r} features but features={features!r} "
                             f"means {name!r}; build every summary with the same features spec")
        n = len(x) if isinstance(x, SetSummary) else arrays[key].shape[0]
        if n < 2:
            raise ValueError(f"{key}: FID/KID need at least 2 images per set, got {n}")
    scorer: Optional[ClipScorer] = None
    if clip_model is not None:
        if isinstance(generated, SetSummary):
            if generated.clip_scores is None:
                raise ValueError("generated: a CLIP score needs a SetSummary built with clip_model=... and captions")
        elif captions is None:
            raise ValueError("captions: a CLIP score needs the captions aligned with the generated images")
        elif len(captions) != arrays["generated"].shape[0]:
            raise ValueError(f"captions: {len(captions)} captions for {arrays['generated'].shape[0]} images; they "
                             "must be aligned one to one")
        else:
            scorer = ClipScorer(clip_model)
    if arrays and extractor is None:
        extractor = get_feature_extractor(features)
    total = 4 + (previous is not None) + (clip_model is not None)
    step = 0

    def tick(msg: str) -> None:
        nonlocal step
        step += 1
        report(progress, ProgressEvent(phase="metrics", step=step, total=total, message=msg))

    done: dict[int, SetSummary] = {}  # id(input) -> its summary, so a set passed twice is summarised once

    def summary(key: str) -> SetSummary:
        x = sets[key]
        if isinstance(x, SetSummary):
            return x
        if id(x) not in done:
            done[id(x)] = SetSummary.from_images(arrays[key], cancel=cancel, features=extractor, name=key)
        return done[id(x)]

    gen = summary("generated")
    out: dict[str, Union[float, str]] = dict(gen.statistics())
    tick("image statistics")
    fg = gen.feature_rows
    tick("features of the generated set")
    fr = summary("reference").feature_rows
    tick("features of the reference set")
    out["fid_ref"] = fid_from_features(fg, fr)
    out["kid_ref"] = kid_from_features(fg, fr)
    tick("FID/KID vs reference")
    if previous is not None:
        fp = summary("previous").feature_rows
        out["fid_prev"] = fid_from_features(fg, fp)
        out["kid_prev"] = kid_from_features(fg, fp)
        tick("FID/KID vs previous")
    if clip_model is not None:
        scores = gen.clip_scores if scorer is None else scorer.scores(arrays["generated"], captions or [], cancel)
        out["clip_score"] = float(np.asarray(scores).mean())
        tick("CLIP score")
    out["features"] = name
    return out
