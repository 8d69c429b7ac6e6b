"""Collapse metrics: weight-free image statistics, FID/KID on a documented feature set, CLIP score, verdicts.

    statistics   per-image blur and over-guidance statistics (spectrum, Laplacian, saturation, colour)
    features     handcrafted-v1 features, the features-spec grammar (check_features), FID and KID
    inception    Inception-v3 features from a local safetensors file
    clip         CLIP score with a local CLIP folder
    summary      SetSummary (a set's statistics and features, gathered batch by batch), image_statistics, set_metrics
    intervals    bootstrap intervals of each change the verdict reads (over the images of both sets)
    verdict      Verdict, the labels and their thresholds

Every definition, its direction under each collapse mode and the thresholds are documented in docs/metrics.md.
"""

from .clip import CLIP_MEAN, CLIP_STD, ClipScorer, clip_score
from .features import (
    COLOUR_BINS,
    FEATURES_HANDCRAFTED,
    INCEPTION_ENV,
    INCEPTION_KEYS,
    KID_SEED,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    OCTAVE_EDGES,
    ORIENTATION_BINS,
    PAIRWISE_BLOCK,
    SATURATION_BINS,
    THUMBNAIL,
    FeatureExtractor,
    FeaturesDependencyError,
    FeaturesFileNotFoundError,
    FeatureSpec,
    _mmd2_unbiased,
    check_features,
    describe_feature_set,
    feature_set_name,
    fid_from_features,
    handcrafted_features,
    handcrafted_features_one,
    kid_from_features,
    mean_pairwise_distance,
)
from .inception import InceptionFeatures, get_feature_extractor
from .intervals import INTERVAL_LEVEL, RESAMPLES, change_intervals, interval_keys, read_interval
from .statistics import (
    CLIP_HIGH,
    CLIP_LOW,
    HF_CUTOFF,
    LUMA,
    MIN_SIDE,
    PER_IMAGE,
    SLOPE_MIN_BIN,
    ImagesLike,
    as_image_array,
    colourfulness_one,
    hf_share_one,
    laplacian_var_one,
    luminance,
    per_image_statistics,
    power_spectrum,
    saturation_map,
    spectral_slope_one,
)
from .summary import SetSummary, image_statistics, set_metrics
from .verdict import (
    BLUR_DROP,
    CLIPPED_RISE,
    COLOURFULNESS_RISE,
    MIN_SIGNS,
    SATURATION_RISE,
    SHARP_RISE,
    SLOPE_FLATTER,
    SLOPE_STEEPER,
    VERDICTS,
    Verdict,
    verdict,
)

__all__ = [
    "BLUR_DROP", "CLIPPED_RISE", "CLIP_HIGH", "CLIP_LOW", "CLIP_MEAN", "CLIP_STD", "COLOURFULNESS_RISE", "COLOUR_BINS",
    "ClipScorer", "FEATURES_HANDCRAFTED", "FeatureExtractor", "FeatureSpec", "FeaturesDependencyError",
    "FeaturesFileNotFoundError", "HF_CUTOFF", "INTERVAL_LEVEL", "RESAMPLES", "change_intervals", "interval_keys",
    "read_interval", "INCEPTION_ENV", "INCEPTION_KEYS", "ImagesLike", "InceptionFeatures",
    "KID_SEED", "KID_SUBSETS", "KID_SUBSET_SIZE", "LUMA", "MIN_SIDE", "MIN_SIGNS", "OCTAVE_EDGES", "ORIENTATION_BINS",
    "PAIRWISE_BLOCK", "PER_IMAGE", "SATURATION_BINS", "SATURATION_RISE", "SHARP_RISE", "SLOPE_FLATTER",
    "SLOPE_MIN_BIN", "SLOPE_STEEPER", "SetSummary", "THUMBNAIL", "VERDICTS", "Verdict", "as_image_array",
    "check_features", "clip_score", "describe_feature_set", "colourfulness_one", "feature_set_name", "fid_from_features",
    "get_feature_extractor", "handcrafted_features", "handcrafted_features_one", "hf_share_one", "image_statistics",
    "kid_from_features", "laplacian_var_one", "luminance", "mean_pairwise_distance", "per_image_statistics",
    "power_spectrum", "saturation_map", "set_metrics", "spectral_slope_one", "verdict",
]
