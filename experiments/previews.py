"""Tri-planar PNG previews: a synthetic volume, its mask overlay, and the real case where there is one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gem3d.data.geometry import CaseGeometry
from gem3d.files import atomic_write


def _centre(label: np.ndarray) -> tuple[int, int, int]:
    """The voxel at the centre of the labelled region (the volume's centre if it is empty)."""
    points = np.argwhere(label > 0)
    if points.size == 0:
        return tuple(int(n // 2) for n in label.shape)  # type: ignore[return-value]
    return tuple(int(v) for v in np.round(points.mean(axis=0)))  # type: ignore[return-value]


def _views(volume: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Slices through ``centre`` across each axis of a ``[X, Y, Z]`` volume, shown with the first axis across."""
    x, y, z = centre
    return [volume[:, :, z].T, volume[:, y, :].T, volume[x, :, :].T]


def triplanar_png(
    path: Path,
    image: np.ndarray,
    label: np.ndarray,
    spacing: tuple[float, float, float],
    real: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Write ``path``: rows synthetic, synthetic with label overlay, (real); columns the three planes.

    Args:
        image, label, real: ``[X, Y, Z]`` arrays in one voxel grid (the mask's).
        spacing: voxel sizes, so each plane is drawn with its true aspect ratio.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = _centre(label)
    rows = [("synthetic", image, None), ("synthetic + mask", image, label)]
    if real is not None:
        rows.append(("real", real, None))
    aspects = [spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1]]
    figure, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    for row, (name, volume, overlay) in enumerate(rows):
        low, high = np.percentile(volume, (1, 99))  # each row on its own range: real and synthetic scales differ
        masks = _views(overlay, centre) if overlay is not None else [None] * 3
        for col, (plane, mask, aspect) in enumerate(zip(_views(volume, centre), masks, aspects, strict=True)):
            ax = axes[row][col]
            ax.imshow(plane, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect)
            if mask is not None:
                ax.imshow(
                    np.ma.masked_equal(mask, 0), cmap="tab10", alpha=0.4, origin="lower", aspect=aspect, vmin=0, vmax=9
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
    figure.suptitle(title or path.stem)
    figure.tight_layout()
    save_figure(figure, path, dpi=80)
    return path


def case_preview(
    path: Path, image: np.ndarray, label: np.ndarray, geometry: CaseGeometry, real: np.ndarray | None
) -> None:
    """The ``gem3d.data.nnunet_raw.Preview`` hook: one PNG per written case."""
    triplanar_png(path, image, label, geometry.spacing, real)


def save_figure(figure: Any, path: Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(figure)


def loss_curve_png(path: Path, rounds: list[dict[str, Any]]) -> Path:
    """Training and evaluation loss per federated round (``metrics.jsonl`` records), one colour per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 3.5))
    for stage in dict.fromkeys(r.get("stage") for r in rounds):
        points = [(i + 1, r) for i, r in enumerate(rounds) if r.get("stage") == stage]
        xs = [x for x, _ in points]
        ax.plot(xs, [r.get("train", {}).get("loss") for _, r in points], "o-", label=f"{stage}: train")
        evaluation = [r.get("server-eval-loss", r.get("evaluate", {}).get("eval-loss")) for _, r in points]
        ax.plot(xs, evaluation, "s--", label=f"{stage}: eval")
    ax.set_xlabel("federated round")
    ax.set_ylabel("denoising loss (MSE)")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path, dpi=100)
