"""The mask linkage test: can a recipient tell which real patient a released label map came from?

GEM-3D's released labels are *edited real segmentations*: differential privacy covers the
generated images, not the masks. The attack this module plays is the simplest one a recipient
holding the training masks (or a leaked subset) would try: for each released mask, find the
training mask with the highest foreground Dice, allowing for the isometries an edit may have
applied (flips along every axis) and small shifts; if that nearest mask is the released mask's
source, the case is *linked*.

Two figures come out, both measured, neither asserted:

* the **hit rate**: the fraction of released masks whose nearest training mask is their source
  (chance is 1 / number of training cases);
* each released mask's **source Dice** against the **inter-patient Dice** of the training set
  (every training mask against its nearest *other* training mask, same flips and shifts): a
  released mask closer to its source than real patients are to one another is still that
  patient's anatomy.

All masks are compared on one coarse grid (``grid``, nearest-neighbour), foreground only
(label > 0), so label renaming changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

FLIPS: tuple[tuple[int, ...], ...] = ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))


def foreground_grid(masks: Sequence[np.ndarray], grid: tuple[int, int, int]) -> torch.Tensor:
    """``[N, *grid]`` float foreground (label > 0) of ``[D, H, W]`` label maps of any shape (nearest)."""
    out = []
    for mask in masks:
        fg = torch.as_tensor(np.asarray(mask) > 0, dtype=torch.float32)[None, None]
        out.append(F.interpolate(fg, size=grid, mode="nearest")[0, 0])
    return torch.stack(out)


def best_dice(a: torch.Tensor, b: torch.Tensor, max_shift: int) -> torch.Tensor:
    """``[Na, Nb]``: the highest foreground Dice of each ``a`` against each ``b`` over flips and shifts.

    Every flip of ``b`` (8: each subset of the three axes) and every shift of up to ``max_shift``
    voxels per axis (cyclic, on a grid with empty borders) is tried: ``8 (2s+1)^3`` overlap
    matrices of ``Na x Nb`` over the grid's voxels.

    Args:
        a, b: ``[N, D, H, W]`` binary foregrounds on one grid.
    """
    sizes = (a.flatten(1).sum(1)[:, None] + b.flatten(1).sum(1)[None, :]).clamp(min=1)  # [Na, Nb]
    flat_a = a.flatten(1)
    best = torch.zeros(a.shape[0], b.shape[0])
    shifts = range(-max_shift, max_shift + 1)
    for flip in FLIPS:
        flipped = torch.flip(b, dims=[d + 1 for d in flip]) if flip else b
        for dz in shifts:
            for dy in shifts:
                for dx in shifts:
                    moved = torch.roll(flipped, shifts=(dz, dy, dx), dims=(1, 2, 3))
                    best = torch.maximum(best, 2 * (flat_a @ moved.flatten(1).T) / sizes)
    return best


@dataclass(frozen=True)
class LinkageResult:
    """What the linkage attack achieved on a set of released masks."""

    hits: int
    released: int
    chance: float
    source_dice: np.ndarray
    inter_patient_dice: np.ndarray
    too_close: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.released if self.released else 0.0

    def report(self) -> dict[str, Any]:
        """Publishable aggregates only: rates and quantiles, no per-case figure."""
        return {
            "attack": "nearest training mask by foreground Dice, under flips and shifts",
            "hit_rate": self.hit_rate,
            "hits": self.hits,
            "released": self.released,
            "chance": self.chance,
            "source_dice_median": float(np.median(self.source_dice)) if self.released else None,
            "inter_patient_dice_median": float(np.median(self.inter_patient_dice)),
            "inter_patient_dice_max": float(self.inter_patient_dice.max()),
            "closer_to_source_than_any_two_patients": self.too_close,
        }


def linkage_test(
    released: Sequence[np.ndarray],
    sources: Sequence[int],
    train: Sequence[np.ndarray],
    grid: tuple[int, int, int] = (32, 32, 32),
    max_shift: int = 2,
) -> LinkageResult:
    """Run the linkage attack on released masks whose true sources are known (to the gate only).

    Args:
        released: ``[D, H, W]`` released label maps (model grid or any shape).
        sources: for each released mask, the index of its source in ``train``.
        train: the training label maps.
    """
    if len(train) < 2:
        raise ValueError("the linkage test needs at least two training masks")
    a, b = foreground_grid(released, grid), foreground_grid(train, grid)
    dice = best_dice(a, b, max_shift)  # [released, train]
    nearest = dice.argmax(dim=1).numpy()
    source_index = np.asarray(sources, dtype=np.int64)
    source_dice = dice[torch.arange(len(released)), torch.as_tensor(source_index)].numpy()
    inter = best_dice(b, b, max_shift)
    inter.fill_diagonal_(-1.0)
    inter_patient = inter.max(dim=1).values.numpy()
    return LinkageResult(
        hits=int((nearest == source_index).sum()),
        released=len(released),
        chance=1.0 / len(train),
        source_dice=source_dice,
        inter_patient_dice=inter_patient,
        too_close=int((source_dice > inter_patient.max()).sum()),
    )
