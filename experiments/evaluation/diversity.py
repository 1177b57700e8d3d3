"""Diversity: how different are samples generated from the same mask?

A generator that ignores its noise (or memorises) produces near-identical samples for one mask;
their mutual MS-SSIM is then near 1. Lower mean pairwise MS-SSIM = more diverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

from experiments.evaluation.fidelity import DATA_RANGE, ms_ssim, ssim


def pairwise_similarity(
    samples: Sequence[Any], metric: str = "ms_ssim", data_range: float = DATA_RANGE
) -> dict[str, Any]:
    """Mean MS-SSIM (or SSIM) over all pairs of samples generated from one mask.

    Args:
        samples: K >= 2 ``[D, H, W]`` volumes generated from the same mask (different seeds).
        metric: ``"ms_ssim"`` (default, scales fitted as in ``fidelity.ms_ssim_settings``) or ``"ssim"``.

    Returns:
        ``{"metric", "mean", "min", "max", "pairs"}``: statistics over the K (K - 1) / 2 pairs;
        NaN pairs (see ``fidelity.ms_ssim``) are left out of the statistics and counted in
        ``"nan_pairs"``.
    """
    if len(samples) < 2:
        raise ValueError("diversity needs at least 2 samples of the same mask")
    functions = {"ms_ssim": ms_ssim, "ssim": ssim}
    if metric not in functions:
        raise ValueError(f"metric must be one of {sorted(functions)}, got '{metric}'")
    values = [functions[metric](a, b, data_range=data_range) for a, b in combinations(samples, 2)]
    finite = [v for v in values if v == v]
    return {
        "metric": metric,
        "mean": sum(finite) / len(finite) if finite else float("nan"),
        "min": min(finite, default=float("nan")),
        "max": max(finite, default=float("nan")),
        "pairs": len(values),
        "nan_pairs": len(values) - len(finite),
    }
