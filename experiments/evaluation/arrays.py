"""Array conventions shared by the metrics: volumes, masks, views.

A volume is ``[D, H, W]`` (slice-first, as ``gem3d.data.volume.Volume`` stores it: D runs along the
data's ``slice_axis``), a numpy array or a torch tensor, intensities in [-1, 1] unless a metric
says otherwise. Metrics move it to ``[1, 1, D, H, W]`` float32 CPU tensors for ``monai.metrics``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Canonical (RAS) axis -> the name of the view obtained by slicing along it.
_CANONICAL_VIEW = {0: "sagittal", 1: "coronal", 2: "axial"}


def as_volume(array: Any, name: str = "volume") -> torch.Tensor:
    """``[D, H, W]`` numpy/torch -> float32 CPU tensor ``[D, H, W]``; raises on any other rank."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach().to("cpu", torch.float32)
    else:  # a copy: read-only or strided numpy views (broadcasts, flips) must not alias
        tensor = torch.from_numpy(np.array(array, dtype=np.float32))
    if tensor.ndim != 3:
        raise ValueError(f"{name}: expected a [D, H, W] volume, got shape {tuple(tensor.shape)}")
    return tensor


def as_pair(prediction: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``[D, H, W]`` volumes of the same shape, as float32 tensors."""
    pred, real = as_volume(prediction, "prediction"), as_volume(target, "target")
    if pred.shape != real.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(real.shape)}")
    return pred, real


def as_label(array: Any, shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
    """A ``[D, H, W]`` integer label map (int64), checked against ``shape`` when given."""
    if isinstance(array, torch.Tensor):
        label = array.detach().cpu()
    else:
        label = torch.from_numpy(np.array(array, dtype=np.int64))
    if label.ndim != 3:
        raise ValueError(f"label: expected a [D, H, W] label map, got shape {tuple(label.shape)}")
    if shape is not None and tuple(label.shape) != tuple(shape):
        raise ValueError(f"label shape {tuple(label.shape)} differs from volume shape {tuple(shape)}")
    return label.to(torch.int64)


def foreground_box(mask: torch.Tensor, min_size: int = 1) -> tuple[slice, slice, slice] | None:
    """The bounding box of ``mask > 0`` (``[D, H, W]``), grown symmetrically to at least ``min_size``
    per axis where the volume allows it (SSIM windows need room). None for an empty mask."""
    hits = torch.nonzero(mask > 0)
    if hits.numel() == 0:
        return None
    box = []
    for axis, size in enumerate(mask.shape):
        low, high = int(hits[:, axis].min()), int(hits[:, axis].max()) + 1
        target = min(max(high - low, min_size), size)
        low = min(max(0, low - (target - (high - low)) // 2), size - target)
        box.append(slice(low, low + target))
    return box[0], box[1], box[2]


def anatomical_views(slice_axis: int = 2) -> dict[str, int]:
    """View name -> array axis of a ``[D, H, W]`` volume whose D runs along canonical ``slice_axis``.

    ``gem3d.data.dataset.load_case`` moves canonical axis ``slice_axis`` to the front and keeps the
    other two in order, so with the default axial slicing (2): axial = 0, sagittal = 1, coronal = 2.
    """
    canonical = [slice_axis] + [axis for axis in range(3) if axis != slice_axis]
    return {_CANONICAL_VIEW[axis]: array_axis for array_axis, axis in enumerate(canonical)}


def view_slices(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """All 2D slices of ``[D, H, W]`` taken along array ``axis``, as ``[N, 1, h, w]``."""
    return volume.movedim(axis, 0).unsqueeze(1).contiguous()
