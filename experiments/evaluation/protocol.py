"""The fixed parts of the evaluation protocol (``PROTOCOL.md``) that need no model.

``gem3d evaluate`` generates volumes (sampler, baselines) and hands them here as ``CaseResult``s;
``method_report`` turns one method's cases into the report section the protocol defines. The
case split and the informed-slice position are functions too, so every caller uses the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from experiments.evaluation.appearance import background_noise, label_intensity_error
from experiments.evaluation.arrays import as_volume
from experiments.evaluation.consistency import seam_ratio, view_check
from experiments.evaluation.distribution import FeatureExtractor, SeededRandomFeatures, distribution_distance
from experiments.evaluation.diversity import pairwise_similarity
from experiments.evaluation.fidelity import DATA_RANGE, fidelity

PROTOCOL_VERSION = "gem3d-eval-v2"
METHODS = ("gem3d", "mask_only", "independent_windows", "full_3d")
MAIN_SEED = 0  # the sample every per-case metric uses
DIVERSITY_SAMPLES = 4  # samples per mask for diversity: seeds 0..3
SYNTHETIC_SEED_BASE = 100  # downstream: enhancement plans use seed 100 + 1000 * seed + real count
DOWNSTREAM_SEEDS = (0, 1, 2)
DOWNSTREAM_STEPS = 2000  # a cap, not a budget: training stops when validation Dice plateaus
FIDELITY_KEYS = ("psnr", "ssim", "ms_ssim", "psnr_foreground", "ssim_foreground", "ms_ssim_foreground")


@dataclass(frozen=True)
class CaseResult:
    """One held-out case and what a method generated for it.

    Attributes:
        case_id: the case's id in the evaluation dataset.
        image: the real ``[D, H, W]`` volume in [-1, 1].
        label: its ``[D, H, W]`` label map (the mask the method was conditioned on).
        generated: the method's ``[D, H, W]`` volume for this mask (seed 0).
        boundaries: slice indices where a new window's fresh slices start (``seam_ratio``);
            empty for a method without windows (full 3D), whose seam ratio is then not reported.
        samples: extra samples of the same mask for diversity (seeds 1..K-1); may be empty.
    """

    case_id: str
    image: Any
    label: Any
    generated: Any
    boundaries: Sequence[int] = ()
    samples: Sequence[Any] = field(default_factory=tuple)


def seam_boundaries(windows: Iterable[Any], depth: int) -> list[int]:
    """Where ``seam_ratio`` looks for seams: the edges of each window's freshly generated block.

    Args:
        windows: the sampler's windows (``gem3d.sampler.plan_windows`` rounds, flattened, or any
            objects with ``start``, ``stop`` and ``carried``: absolute indices already generated).
        depth: D.

    Returns:
        Sorted slice indices b (0 < b < D) where slices b - 1 and b were generated in different
        windows: each window's fresh range ``[start, stop) - carried`` contributes its two ends.
        Works alike for overlapped windows and for independent ones (no carried slices).
    """
    edges: set[int] = set()
    for window in windows:
        fresh = sorted(set(range(window.start, window.stop)) - set(window.carried))
        if fresh:
            edges.update((fresh[0], fresh[-1] + 1))
    return sorted(b for b in edges if 0 < b < depth)


def split_cases(case_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split the evaluation cohort for the downstream task: (few real training cases, test cases).

    Sorted by id; the first half (rounded up, at least 1) trains, the rest tests. With one case
    there is nothing to test on and ``ValueError`` is raised.
    """
    ordered = sorted(case_ids)
    if len(ordered) < 2:
        raise ValueError(f"the downstream task needs at least 2 evaluation cases, got {len(ordered)}")
    cut = max(1, math.ceil(len(ordered) / 2))
    cut = min(cut, len(ordered) - 1)
    return ordered[:cut], ordered[cut:]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def method_report(
    cases: Sequence[CaseResult],
    extractor: FeatureExtractor | None = None,
    views: Mapping[str, int] | None = None,
    data_range: float = DATA_RANGE,
) -> dict[str, Any]:
    """Every per-method metric of the protocol, over the held-out cases.

    Args:
        cases: one ``CaseResult`` per held-out case.
        extractor: FID/MMD features; default ``SeededRandomFeatures(0)``.
        views: view name -> array axis (``arrays.anatomical_views(cfg.data.slice_axis)``).

    Returns:
        ``{"fidelity": {key: mean over cases (finite values; PSNR inf excluded)},
        "appearance": {"foreground_mean", "background"}, "background_noise": {"std_ratio",
        "hf_std_ratio"} (generated / real background, ``appearance.background_noise``),
        "seam_ratio": {"mean", "real_mean"},
        "view_check": view_check(...), "distribution": distribution_distance(...),
        "diversity": {"mean", "pairs", "nan_pairs"} or None, "per_case": {case_id: {...}}}``.
        ``seam_ratio.real_mean`` is the real volumes' ratio at the same boundaries: the value a
        seamless method should match (about 1.0).
    """
    if not cases:
        raise ValueError("method_report needs at least one case")
    extractor = extractor if extractor is not None else SeededRandomFeatures(0)
    per_case: dict[str, Any] = {}
    seams, real_seams, diversity_means, pairs, nan_pairs = [], [], [], 0, 0
    for case in cases:
        image, generated = as_volume(case.image, "image"), as_volume(case.generated, "generated")
        entry: dict[str, Any] = {
            "fidelity": {
                k: v for k, v in fidelity(generated, image, case.label, data_range).items() if k in FIDELITY_KEYS
            },
            "appearance": label_intensity_error(generated, image, case.label),
            "background_noise": background_noise(generated, image, case.label),
        }
        if case.boundaries:
            entry["seam_ratio"] = seam_ratio(generated, case.boundaries)
            entry["seam_ratio_real"] = seam_ratio(image, case.boundaries)
            seams.append(entry["seam_ratio"])
            real_seams.append(entry["seam_ratio_real"])
        if case.samples:
            diversity = pairwise_similarity([generated, *case.samples], data_range=data_range)
            entry["diversity"] = diversity["mean"]
            diversity_means.append(diversity["mean"])
            pairs += diversity["pairs"]
            nan_pairs += diversity["nan_pairs"]
        per_case[case.case_id] = entry
    synthetic = [case.generated for case in cases]
    real = [case.image for case in cases]
    return {
        "fidelity": {key: _mean([per_case[c.case_id]["fidelity"][key] for c in cases]) for key in FIDELITY_KEYS},
        "appearance": {
            "foreground_mean": _mean([per_case[c.case_id]["appearance"]["foreground_mean"] for c in cases]),
            "background": _mean([per_case[c.case_id]["appearance"]["background"] for c in cases]),
        },
        "background_noise": {
            key: _mean([per_case[c.case_id]["background_noise"][key] for c in cases])
            for key in ("std_ratio", "hf_std_ratio")
        },
        "seam_ratio": {"mean": _mean(seams), "real_mean": _mean(real_seams)} if seams else None,
        "view_check": view_check(synthetic, real, views),
        "distribution": distribution_distance(synthetic, real, extractor, views),
        "diversity": {"mean": _mean(diversity_means), "pairs": pairs, "nan_pairs": nan_pairs}
        if diversity_means
        else None,
        "per_case": per_case,
    }
