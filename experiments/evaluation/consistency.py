"""Volumetric consistency: do the windows of the sampler join without seams?

GEM-3D generates a volume as overlapping windows of slices. A seam shows up as a jump between the
two slices on either side of a window boundary. The seam ratio compares that jump to the ordinary
change between neighbouring slices inside windows; on real data, with the same boundaries, it is
close to 1.0 (issue 7). The view check compares, per axis, how much neighbouring slices differ in
synthetic vs real volumes: seams or slice-wise flicker raise the slice-axis value only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from experiments.evaluation.arrays import as_volume


def adjacent_slice_differences(volume: Any, axis: int = 0) -> torch.Tensor:
    """Mean absolute difference between neighbouring slices along ``axis``.

    Args:
        volume: ``[D, H, W]``.
        axis: the array axis to step along (0 = the slice axis).

    Returns:
        ``[N - 1]`` float64 tensor: entry z is ``mean |x[z + 1] - x[z]|`` along ``axis``.
    """
    tensor = as_volume(volume).movedim(axis, 0).double()
    return (tensor[1:] - tensor[:-1]).abs().flatten(1).mean(dim=1)


def seam_ratio(volume: Any, boundaries: Sequence[int]) -> float:
    """Mean adjacent-slice difference across window boundaries / the same within windows.

    Args:
        volume: ``[D, H, W]``, windows stacked along axis 0.
        boundaries: slice indices b where a new window's freshly generated slices start, i.e.
            slices b - 1 and b come from different windows (0 < b < D). For windows of length W
            without overlap: ``[W, 2W, ...]``.

    Returns:
        The ratio (1.0 = no seam). ``nan`` if there are no valid boundaries or no pairs inside windows.
    """
    diffs = adjacent_slice_differences(volume, 0)
    crossing = sorted({int(b) - 1 for b in boundaries if 0 < int(b) < diffs.numel() + 1})
    if not crossing:
        return float("nan")
    across = torch.zeros(diffs.numel(), dtype=torch.bool)
    across[crossing] = True
    if across.all():
        return float("nan")
    within = diffs[~across].mean()
    if within == 0:
        return float("inf") if diffs[across].mean() > 0 else 1.0
    return float(diffs[across].mean() / within)


def view_differences(volume: Any, views: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Each view's ``adjacent_slice_differences`` of one ``[D, H, W]`` volume: all ``view_check`` needs of it."""
    return {name: adjacent_slice_differences(volume, axis) for name, axis in views.items()}


def view_check(synthetic: Sequence[Any], real: Sequence[Any], views: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Per view: mean adjacent-slice difference of synthetic vs real volumes, and their ratio.

    Args:
        synthetic, real: lists of ``[D, H, W]`` volumes (sizes may differ between volumes).
        views: view name -> array axis, e.g. ``arrays.anatomical_views(slice_axis)``;
            default ``{"axis0": 0, "axis1": 1, "axis2": 2}``.

    Returns:
        ``{view: {"synthetic": s, "real": r, "ratio": s / r}}``; a ratio near 1 on every view means
        the synthetic volumes change from slice to slice like real ones in all three directions.
    """
    views = dict(views) if views is not None else {"axis0": 0, "axis1": 1, "axis2": 2}
    return view_check_of([view_differences(v, views) for v in synthetic], [view_differences(v, views) for v in real])


def view_check_of(
    synthetic: Sequence[Mapping[str, torch.Tensor]], real: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, Any]:
    """``view_check`` from each volume's ``view_differences`` (a caller that streams volumes keeps only these)."""
    if not synthetic or not real:
        raise ValueError("view_check needs at least one synthetic and one real volume")
    result: dict[str, Any] = {}
    for name in synthetic[0]:
        synth = float(torch.cat([v[name] for v in synthetic]).mean())
        true = float(torch.cat([v[name] for v in real]).mean())
        result[name] = {"synthetic": synth, "real": true, "ratio": synth / true if true > 0 else float("nan")}
    return result
