"""Fidelity of a generated volume to the real one: PSNR, SSIM and MS-SSIM via ``monai.metrics``.

Each is computed over the whole volume and over the foreground (label > 0):
- PSNR over the foreground uses only the foreground voxels' squared error;
- SSIM and MS-SSIM over the foreground use the foreground's bounding box, grown to fit the window.

Intensities are in [-1, 1] (gem3d's model space), so the data range and PSNR's peak are 2.0.
Identical volumes give PSNR = inf (reported as the string "inf" in JSON, see ``report.json_ready``)
and SSIM = MS-SSIM = 1.

MS-SSIM on small volumes: MONAI's default (5 scales, kernel 11) needs every side >= 176 voxels,
far beyond gem3d's 32^3 CPU volumes. ``ms_ssim_settings`` picks the most scales (up to 5) that fit,
then the largest kernel (11, 9, 7 or 5) that still covers the coarsest scale, and renormalises the
first n standard weights (Wang et al. 2003) to sum to one. 32^3 -> 3 scales with kernel 7;
a side of 16 -> 2 scales with kernel 7; 176 and above -> MONAI's standard 5 scales, kernel 11. The
settings used are part of every report (``fidelity`` returns them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

from experiments.evaluation.arrays import as_label, as_pair, foreground_box

DATA_RANGE = 2.0  # gem3d intensities live in [-1, 1]
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_KERNELS = (11, 9, 7, 5)
_SSIM_WINDOW = 11


def _scalar(result: Any) -> float:
    """A MONAI metric's ``[1, 1]`` result as a float (MONAI types it as tensor-or-sequence)."""
    return float(torch.as_tensor(result).item())


def _batch(volume: torch.Tensor) -> torch.Tensor:
    return volume[None, None]  # [D, H, W] -> [1, 1, D, H, W]


def psnr(prediction: Any, target: Any, mask: Any | None = None, data_range: float = DATA_RANGE) -> float:
    """Peak signal-to-noise ratio in dB, ``20 log10(data_range) - 10 log10(MSE)``.

    Args:
        prediction, target: ``[D, H, W]`` volumes.
        mask: optional ``[D, H, W]`` label map; then the MSE runs over ``mask > 0`` voxels only.
        data_range: the peak-to-peak intensity range (2.0 for [-1, 1]).

    Returns:
        PSNR in dB; ``inf`` for identical inputs; ``nan`` for an empty mask.
    """
    pred, real = as_pair(prediction, target)
    if mask is not None:
        keep = as_label(mask, real.shape) > 0
        if not keep.any():
            return math.nan
        pred, real = pred[keep], real[keep]
    metric = PSNRMetric(max_val=data_range)
    # [1, 1, N]: MONAI averages the squared error over all non-batch dimensions.
    return _scalar(metric(pred.reshape(1, 1, -1), real.reshape(1, 1, -1)))


def _crop(pred: torch.Tensor, real: torch.Tensor, mask: Any | None, min_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if mask is None:
        return pred, real
    box = foreground_box(as_label(mask, real.shape), min_size=min_size)
    if box is None:
        raise ValueError("empty foreground mask")
    return pred[box], real[box]


def ssim(prediction: Any, target: Any, mask: Any | None = None, data_range: float = DATA_RANGE) -> float:
    """3D SSIM (Gaussian window 11, sigma 1.5; smaller odd window if a side is shorter).

    Args:
        prediction, target: ``[D, H, W]`` volumes.
        mask: optional ``[D, H, W]`` label map; then SSIM runs on the foreground bounding box.
        data_range: the intensity range (2.0 for [-1, 1]).

    Returns:
        Mean SSIM in [-1, 1]; 1.0 for identical inputs; ``nan`` for an empty mask.
    """
    pred, real = as_pair(prediction, target)
    try:
        pred, real = _crop(pred, real, mask, _SSIM_WINDOW)
    except ValueError:
        return math.nan
    window = min(_SSIM_WINDOW, *(side if side % 2 else side - 1 for side in real.shape))
    if window < 3:
        raise ValueError(f"SSIM needs every side >= 3 voxels, got {tuple(real.shape)}")
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=window)
    return _scalar(metric(_batch(pred), _batch(real)))


def ms_ssim_settings(shape: tuple[int, ...]) -> tuple[int, tuple[float, ...]]:
    """The (kernel size, weights) MS-SSIM uses for volumes of ``shape`` (see the module docstring).

    Raises:
        ValueError: if even 2 scales with kernel 5 do not fit (a side shorter than 10).
    """
    side = min(shape)
    for scales in range(len(_MS_SSIM_WEIGHTS), 1, -1):
        for kernel in _KERNELS:
            coarsest = side // 2 ** (scales - 1)
            # MONAI's own size check (side // (scales - 1)^2 > kernel - 1) must pass as well.
            monai_ok = side // max(1, (scales - 1) ** 2) > kernel - 1
            if coarsest >= kernel and monai_ok:
                weights = _MS_SSIM_WEIGHTS[:scales]
                total = sum(weights)
                return kernel, tuple(w / total for w in weights)
    raise ValueError(f"MS-SSIM needs every side >= 10 voxels, got {tuple(shape)}")


def ms_ssim(prediction: Any, target: Any, mask: Any | None = None, data_range: float = DATA_RANGE) -> float:
    """3D multi-scale SSIM with scales and kernel fitted to the volume (``ms_ssim_settings``).

    Args:
        prediction, target: ``[D, H, W]`` volumes.
        mask: optional ``[D, H, W]`` label map; then MS-SSIM runs on the foreground bounding box
            grown to at least 16 voxels per side (2 scales).
        data_range: the intensity range (2.0 for [-1, 1]).

    Returns:
        MS-SSIM; 1.0 for identical inputs. ``nan`` for an empty mask, and also when a coarse
        scale's contrast-structure term is negative (uncorrelated images): MONAI raises it to a
        fractional power.
    """
    pred, real = as_pair(prediction, target)
    try:
        pred, real = _crop(pred, real, mask, 16)
    except ValueError:
        return math.nan
    kernel, weights = ms_ssim_settings(tuple(real.shape))
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, kernel_size=kernel, weights=weights)
    return _scalar(metric(_batch(pred), _batch(real)))


def fidelity(prediction: Any, target: Any, label: Any, data_range: float = DATA_RANGE) -> dict[str, Any]:
    """All fidelity metrics of one generated volume against its real counterpart.

    Args:
        prediction, target: ``[D, H, W]`` volumes in [-1, 1].
        label: ``[D, H, W]`` label map of the target (foreground = label > 0).

    Returns:
        ``{"psnr", "ssim", "ms_ssim", "psnr_foreground", "ssim_foreground", "ms_ssim_foreground",
        "ms_ssim_kernel", "ms_ssim_scales"}`` (floats; kernel/scales of the whole-volume MS-SSIM).
        A volume with a side under 10 voxels has no MS-SSIM: nan, with kernel/scales None.
    """
    pred, real = as_pair(prediction, target)
    report: dict[str, Any] = {
        "psnr": psnr(pred, real, data_range=data_range),
        "ssim": ssim(pred, real, data_range=data_range),
        "ms_ssim": math.nan,
        "psnr_foreground": psnr(pred, real, label, data_range),
        "ssim_foreground": ssim(pred, real, label, data_range),
        "ms_ssim_foreground": math.nan,
        "ms_ssim_kernel": None,
        "ms_ssim_scales": None,
    }
    try:
        kernel, weights = ms_ssim_settings(tuple(real.shape))
    except ValueError:
        return report  # a side under 10 voxels: MS-SSIM undefined, reported as nan with no settings
    report.update(
        ms_ssim=ms_ssim(pred, real, data_range=data_range),
        ms_ssim_foreground=ms_ssim(pred, real, label, data_range),
        ms_ssim_kernel=kernel,
        ms_ssim_scales=len(weights),
    )
    return report
