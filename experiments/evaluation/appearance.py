"""Appearance transfer: does each labelled structure get the right brightness?

The informed slice exists to carry a subject's appearance (contrast, enhancement) into the
generated volume (issue 7). PSNR hides this: a sample's texture noise dominates it. The per-label
mean-intensity error measures it directly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from experiments.evaluation.arrays import as_label, as_pair


def label_intensity_error(prediction: Any, target: Any, label: Any) -> dict[str, Any]:
    """Per-label absolute error of the mean intensity, generated vs true.

    For each label l present in ``label``: ``|mean(prediction[label == l]) - mean(target[label == l])|``.

    Args:
        prediction, target: ``[D, H, W]`` volumes (same intensity scale, [-1, 1] in gem3d).
        label: ``[D, H, W]`` integer label map shared by both (the mask the sample was generated from).

    Returns:
        ``{"per_label": {"0": e0, "1": e1, ...}, "foreground_mean": mean of e_l over l > 0
        (nan if there is no foreground), "background": e0 (nan if no background)}``.
        Label keys are strings so the dict is JSON-ready.
    """
    pred, real = as_pair(prediction, target)
    labels = as_label(label, real.shape)
    per_label: dict[str, float] = {}
    for value in sorted(int(v) for v in labels.unique()):
        inside = labels == value
        per_label[str(value)] = float((pred[inside].double().mean() - real[inside].double().mean()).abs())
    foreground = [error for key, error in per_label.items() if int(key) > 0]
    return {
        "per_label": per_label,
        "foreground_mean": sum(foreground) / len(foreground) if foreground else float("nan"),
        "background": per_label.get("0", float("nan")),
    }


def high_frequency(volume: torch.Tensor) -> torch.Tensor:
    """``[D, H, W]`` minus its 3x3x3 mean (edges replicated): the part salt-and-pepper noise raises."""
    x = volume.double()[None, None]
    smooth = F.avg_pool3d(F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (x - smooth)[0, 0]


def background_noise(prediction: Any, target: Any, label: Any) -> dict[str, float]:
    """How noisy the generated background (label 0) is, relative to the real one.

    Returns:
        ``{"std_ratio": std of the generated background / std of the real background,
        "hf_std_ratio": the same for ``high_frequency`` of each volume, over background voxels
        whose 3x3x3 neighbourhood is all background}``; 1 is the real level, nan when the mask has
        no (such) background or the real background is constant.
    """
    pred, real = as_pair(prediction, target)
    background = as_label(label, real.shape) == 0
    # the high-frequency part only where the whole 3x3x3 neighbourhood is background: edges are not noise
    neighbourhood = F.avg_pool3d(F.pad(background.double()[None, None], (1,) * 6, mode="replicate"), 3, stride=1)
    interior = background & (neighbourhood[0, 0] > 1 - 1e-9)

    def ratio(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
        if not where.any():
            return float("nan")
        reference = float(b[where].double().std())
        return float(a[where].double().std()) / reference if reference > 0 else float("nan")

    return {
        "std_ratio": ratio(pred, real, background),
        "hf_std_ratio": ratio(high_frequency(pred), high_frequency(real), interior),
    }
