"""Previews: every row is windowed on its own intensities, so a real image on another scale is not saturated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.image import imread

from experiments.previews import triplanar_png


def test_the_real_row_is_windowed_on_its_own_range(tmp_path: Path) -> None:
    # prepare: a synthetic volume in [-1, 1] and a "real" one that is the same picture in scanner units
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(0, 0.5, (12, 12, 10)), -1, 1).astype(np.float32)
    label = (image > 0).astype(np.uint8)
    scanner = image * 400.0 + 1000.0
    # execute
    same = imread(triplanar_png(tmp_path / "same.png", image, label, (1.0, 1.0, 1.0), real=image.copy(), title="t"))
    other = imread(triplanar_png(tmp_path / "other.png", image, label, (1.0, 1.0, 1.0), real=scanner, title="t"))
    # assert: an affine change of the real image's scale does not change its picture
    assert same.shape == other.shape
    assert float(np.abs(same - other).mean()) < 1e-3
