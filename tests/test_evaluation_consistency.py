"""Seam ratio and the tri-planar view check on volumes whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments.evaluation import adjacent_slice_differences, anatomical_views, seam_ratio, view_check

BOUNDARIES = [8, 16, 24]


def _smooth_volume(depth: int = 32, size: int = 24) -> np.ndarray:
    """A real-like volume: smooth anatomy that changes steadily from slice to slice."""
    z, y, x = np.meshgrid(np.arange(depth), np.arange(size), np.arange(size), indexing="ij")
    return (0.5 * np.sin(0.15 * z + 0.2 * y) * np.cos(0.1 * x) + 0.01 * z).astype(np.float32)


def test_a_linear_ramp_has_seam_ratio_exactly_one() -> None:
    # prepare
    ramp = np.broadcast_to(0.05 * np.arange(32, dtype=np.float32)[:, None, None], (32, 8, 8))

    # execute
    ratio = seam_ratio(ramp, BOUNDARIES)

    # assert
    assert ratio == pytest.approx(1.0)


def test_a_smooth_real_like_volume_has_seam_ratio_near_one() -> None:
    # execute
    ratio = seam_ratio(_smooth_volume(), BOUNDARIES)

    # assert
    assert 0.85 < ratio < 1.15


def test_jumps_at_window_boundaries_raise_the_seam_ratio() -> None:
    # prepare: each window gets its own brightness offset, as independent windows would
    volume = _smooth_volume()
    for index, boundary in enumerate(BOUNDARIES):
        volume[boundary:] += 0.3 * (-1) ** index

    # execute
    ratio = seam_ratio(volume, BOUNDARIES)

    # assert
    assert ratio > 2.0


def test_seam_ratio_without_valid_boundaries_is_nan() -> None:
    # execute / assert
    assert math.isnan(seam_ratio(_smooth_volume(), []))
    assert math.isnan(seam_ratio(_smooth_volume(), [0, 32, 99]))


def test_adjacent_slice_differences_along_each_axis() -> None:
    # prepare: values grow by 1 per step along axis 0, 2 along axis 1, 3 along axis 2
    z, y, x = np.indices((4, 5, 6))
    volume = (z + 2 * y + 3 * x).astype(np.float32)

    # execute
    per_axis = [adjacent_slice_differences(volume, axis) for axis in range(3)]

    # assert
    assert [d.numel() for d in per_axis] == [3, 4, 5]
    assert [float(d.mean()) for d in per_axis] == [1.0, 2.0, 3.0]


def test_view_check_flags_slice_flicker_on_the_slice_axis_only() -> None:
    # prepare: every other slice brighter, the signature of slice-wise generation without context
    real = [_smooth_volume(), _smooth_volume()[::-1].copy()]
    flicker = [volume.copy() for volume in real]
    for volume in flicker:
        volume[::2] += 0.2

    # execute
    same = view_check(real, real)
    flickering = view_check(flicker, real, views=anatomical_views(2))

    # assert
    assert all(view["ratio"] == pytest.approx(1.0) for view in same.values())
    assert flickering["axial"]["ratio"] > 2.0
    assert flickering["sagittal"]["ratio"] == pytest.approx(1.0)
    assert flickering["coronal"]["ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("slice_axis", "expected"),
    [(2, {"axial": 0, "sagittal": 1, "coronal": 2}), (0, {"sagittal": 0, "coronal": 1, "axial": 2})],
)
def test_anatomical_views_follow_the_slice_axis(slice_axis: int, expected: dict[str, int]) -> None:
    # execute / assert
    assert anatomical_views(slice_axis) == expected
