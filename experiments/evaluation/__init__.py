"""The evaluation metrics of gem3d's fixed protocol (``PROTOCOL.md`` in this folder).

Every metric takes plain ``[D, H, W]`` numpy arrays or torch tensors (gem3d's slice-first volumes,
intensities in [-1, 1]) and returns floats or JSON-ready dicts; nothing here knows about models,
samplers or MLflow. ``gem3d evaluate`` composes them.
"""

from __future__ import annotations

from experiments.evaluation.appearance import label_intensity_error
from experiments.evaluation.arrays import anatomical_views, foreground_box, view_slices
from experiments.evaluation.consistency import adjacent_slice_differences, seam_ratio, view_check
from experiments.evaluation.distribution import (
    RANDOM_FEATURES_LABEL,
    ExportedFeatures,
    FeatureExtractor,
    ResNetFeatures,
    SeededRandomFeatures,
    distribution_distance,
    fid,
    load_feature_extractor,
    mmd,
    view_features,
)
from experiments.evaluation.diversity import pairwise_similarity
from experiments.evaluation.downstream import (
    evaluate_dice,
    t_interval,
    train_segmenter,
)
from experiments.evaluation.fidelity import DATA_RANGE, fidelity, ms_ssim, ms_ssim_settings, psnr, ssim
from experiments.evaluation.protocol import (
    DIVERSITY_SAMPLES,
    DOWNSTREAM_SEEDS,
    DOWNSTREAM_STEPS,
    FIDELITY_KEYS,
    MAIN_SEED,
    METHODS,
    PROTOCOL_VERSION,
    SYNTHETIC_SEED_BASE,
    CaseResult,
    method_report,
    seam_boundaries,
    split_cases,
)
from experiments.evaluation.report import json_ready, write_report

__all__ = [
    "DATA_RANGE",
    "DIVERSITY_SAMPLES",
    "DOWNSTREAM_SEEDS",
    "DOWNSTREAM_STEPS",
    "FIDELITY_KEYS",
    "MAIN_SEED",
    "METHODS",
    "PROTOCOL_VERSION",
    "RANDOM_FEATURES_LABEL",
    "SYNTHETIC_SEED_BASE",
    "CaseResult",
    "ExportedFeatures",
    "FeatureExtractor",
    "ResNetFeatures",
    "SeededRandomFeatures",
    "adjacent_slice_differences",
    "anatomical_views",
    "distribution_distance",
    "evaluate_dice",
    "fid",
    "fidelity",
    "foreground_box",
    "json_ready",
    "label_intensity_error",
    "load_feature_extractor",
    "method_report",
    "mmd",
    "ms_ssim",
    "ms_ssim_settings",
    "pairwise_similarity",
    "psnr",
    "seam_boundaries",
    "seam_ratio",
    "split_cases",
    "ssim",
    "t_interval",
    "train_segmenter",
    "view_check",
    "view_features",
    "view_slices",
    "write_report",
]
