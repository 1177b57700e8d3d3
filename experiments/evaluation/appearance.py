"""Appearance transfer: does each labelled structure get the right brightness?

The informed slice exists to carry a subject's appearance (contrast, enhancement) into the
generated volume (issue 7). PSNR hides this: a sample's texture noise dominates it. The per-label
mean-intensity error measures it directly.
"""

from __future__ import annotations

from typing import Any

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
