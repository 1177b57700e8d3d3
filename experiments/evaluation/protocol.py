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
import torch

from experiments.evaluation.appearance import background_noise, label_intensity_error
from experiments.evaluation.arrays import as_volume
from experiments.evaluation.consistency import seam_ratio, view_check_of, view_differences
from experiments.evaluation.distribution import (
    FeatureExtractor,
    SeededRandomFeatures,
    distribution_distance_of,
    view_features,
)
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
    scorer = MethodScorer(extractor, views, data_range)
    for case in cases:
        scorer.add(case)
    return scorer.report()


class MethodScorer:
    """``method_report`` one case at a time, for a cohort generated in batches (``gem3d evaluate``).

    ``add`` scores a case and keeps its figures and what the cohort metrics need of its volumes
    (each view's adjacent-slice differences and slice features), never the volumes themselves,
    so a caller can drop each batch of generated volumes once it is added (issue 16). The
    report is the same as ``method_report`` over the same cases.
    """

    def __init__(
        self,
        extractor: FeatureExtractor | None = None,
        views: Mapping[str, int] | None = None,
        data_range: float = DATA_RANGE,
    ) -> None:
        self.extractor = extractor if extractor is not None else SeededRandomFeatures(0)
        self.views = dict(views) if views is not None else {"axis0": 0, "axis1": 1, "axis2": 2}
        self.data_range = data_range
        self.per_case: dict[str, Any] = {}
        self.seams: list[float] = []
        self.real_seams: list[float] = []
        self.diversity_means: list[float] = []
        self.pairs = self.nan_pairs = 0
        self.differences: dict[str, list[dict[str, torch.Tensor]]] = {"synthetic": [], "real": []}
        self.features: dict[str, dict[str, list[torch.Tensor]]] = {
            "synthetic": {name: [] for name in self.views},
            "real": {name: [] for name in self.views},
        }

    def add(self, case: CaseResult) -> None:
        """Score one case (its ``generated`` and ``samples`` may be dropped afterwards)."""
        image, generated = as_volume(case.image, "image"), as_volume(case.generated, "generated")
        data_range = self.data_range
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
            self.seams.append(entry["seam_ratio"])
            self.real_seams.append(entry["seam_ratio_real"])
        if case.samples:
            diversity = pairwise_similarity([generated, *case.samples], data_range=data_range)
            entry["diversity"] = diversity["mean"]
            self.diversity_means.append(diversity["mean"])
            self.pairs += diversity["pairs"]
            self.nan_pairs += diversity["nan_pairs"]
        self.per_case[case.case_id] = entry
        for kind, volume in (("synthetic", case.generated), ("real", case.image)):
            self.differences[kind].append(view_differences(volume, self.views))
            for name, axis in self.views.items():
                self.features[kind][name].append(view_features([volume], axis, self.extractor))

    def report(self) -> dict[str, Any]:
        """The ``method_report`` of every case added so far."""
        if not self.per_case:
            raise ValueError("method_report needs at least one case")
        cases = list(self.per_case.values())
        features = {
            kind: {name: torch.cat(parts) for name, parts in views.items()} for kind, views in self.features.items()
        }
        return {
            "fidelity": {key: _mean([c["fidelity"][key] for c in cases]) for key in FIDELITY_KEYS},
            "appearance": {
                "foreground_mean": _mean([c["appearance"]["foreground_mean"] for c in cases]),
                "background": _mean([c["appearance"]["background"] for c in cases]),
            },
            "background_noise": {
                key: _mean([c["background_noise"][key] for c in cases]) for key in ("std_ratio", "hf_std_ratio")
            },
            "seam_ratio": {"mean": _mean(self.seams), "real_mean": _mean(self.real_seams)} if self.seams else None,
            "view_check": view_check_of(self.differences["synthetic"], self.differences["real"]),
            "distribution": distribution_distance_of(features["synthetic"], features["real"], self.extractor.name),
            "diversity": {"mean": _mean(self.diversity_means), "pairs": self.pairs, "nan_pairs": self.nan_pairs}
            if self.diversity_means
            else None,
            "per_case": self.per_case,
        }
