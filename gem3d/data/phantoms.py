"""Tiny analytic phantoms for unit tests: nested ellipsoids with a lesion, built in milliseconds.

Labels: 0 background, 1 outer shell, 2 middle layer, 3 core; with ``num_labels`` = 5 a
spherical lesion (4) sits inside the core. Each case has its own ellipsoid radii, centre and
per-label intensities, so an informed slice carries information the mask alone does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gem3d.data.nnunet_raw import DatasetWriter


def make_phantom(shape: tuple[int, int, int], num_labels: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One phantom case.

    Args:
        shape: ``(X, Y, Z)`` voxels.
        num_labels: 4 (three nested tissues) or 5 (plus a lesion).
    Returns:
        image ``[X, Y, Z]`` float32 (MRI-like arbitrary units), label ``[X, Y, Z]`` uint8.
    """
    if num_labels not in (4, 5):
        raise ValueError("phantoms have 4 labels, or 5 with a lesion")
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    centre = rng.uniform(-0.08, 0.08, size=3)
    radii = rng.uniform(0.65, 0.85, size=3)
    r = np.sqrt(sum(((g - c) / rad) ** 2 for g, c, rad in zip(grids, centre, radii, strict=True)))
    label = np.zeros(shape, dtype=np.uint8)
    label[r < 1.0] = 1
    label[r < rng.uniform(0.7, 0.8)] = 2
    label[r < rng.uniform(0.4, 0.55)] = 3
    if num_labels == 5:
        lesion_centre = centre + rng.uniform(-0.15, 0.15, size=3) * radii
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, lesion_centre, strict=True)))
        label[dist < rng.uniform(0.12, 0.2)] = 4
    # Per-case appearance: each tissue's mean is drawn, so only an informed slice reveals it.
    means = np.concatenate([[0.0], rng.uniform(0.2, 1.0, size=num_labels - 1)])
    bias = 1.0 + 0.15 * grids[0] * rng.uniform(-1, 1) + 0.15 * grids[2] * rng.uniform(-1, 1)
    image = means[label] * bias + rng.normal(0.0, 0.03, size=shape)
    return (100.0 * image).astype(np.float32), label


def phantom_affine(spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)) -> np.ndarray:
    """A non-trivial RAS affine with the given spacing and an offset origin."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-40.0, -35.0, -20.0)
    return affine


def write_phantom_dataset(
    out: str | Path,
    num_cases: int = 4,
    shape: tuple[int, int, int] = (32, 32, 24),
    num_labels: int = 4,
    seed: int = 0,
) -> Path:
    """Write an nnU-Net v2 raw dataset of phantoms to ``out`` (atomically: ``DatasetWriter``)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists")
    names = ["background", "shell", "middle", "core", "lesion"][:num_labels]
    affine = phantom_affine()
    with DatasetWriter(out, label_names=dict(enumerate(names))) as writer:
        for index in range(num_cases):
            image, label = make_phantom(shape, num_labels, seed=seed * 1000 + index)
            writer.add_arrays(f"phantom_{index:03d}", image, label, affine)
        return writer.finish(num_labels, "MRI")
