"""Training samples drawn from preprocessed volumes: windows of W slices, or single slices.

One draw per volume index: a privacy-accounting sampler (Poisson over volumes) can choose the
indices, and each patient then contributes at most one window to a step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from gem3d.data.volume import Volume
from gem3d.errors import DataError


@dataclass(frozen=True)
class WindowBatch:
    """B windows of W consecutive slices with their informed slices.

    Attributes:
        image: ``[B, 1, W, H, W']`` clean intensities in [-1, 1].
        mask: ``[B, W, H, W']`` uint8 label ids.
        informed: ``[B, H, W']`` the informed slice.
        informed_mask: ``[B, H, W']`` its uint8 label ids.
        start: ``[B]`` first slice index of each window.
        informed_index: ``[B]`` slice index of each informed slice.
    """

    image: torch.Tensor
    mask: torch.Tensor
    informed: torch.Tensor
    informed_mask: torch.Tensor
    start: torch.Tensor
    informed_index: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> WindowBatch:
        return WindowBatch(*(getattr(self, f).to(device, non_blocking=non_blocking) for f in self.__dataclass_fields__))

    def pin_memory(self) -> WindowBatch:
        """The batch in page-locked memory (``torch.utils.data``'s ``pin_memory`` calls this)."""
        return WindowBatch(*(getattr(self, f).pin_memory() for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return int(self.image.shape[0])


@dataclass(frozen=True)
class SliceBatch:
    """B single slices for the informed-slice generator.

    Attributes:
        image: ``[B, 1, H, W]``; mask: ``[B, H, W]`` uint8; position: ``[B]`` z / (D - 1) in [0, 1].
    """

    image: torch.Tensor
    mask: torch.Tensor
    position: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SliceBatch:
        return SliceBatch(*(getattr(self, f).to(device, non_blocking=non_blocking) for f in self.__dataclass_fields__))

    def pin_memory(self) -> SliceBatch:
        """The batch in page-locked memory (``torch.utils.data``'s ``pin_memory`` calls this)."""
        return SliceBatch(*(getattr(self, f).pin_memory() for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return int(self.image.shape[0])


def with_contrast_curves(batch: WindowBatch, log_gamma: float, generator: torch.Generator) -> WindowBatch:
    """Appearance augmentation: one random contrast curve per window, shared with its informed slice.

    Each window and its informed slice get ``x -> 2 * ((x + 1) / 2) ** g - 1`` with
    ``log g ~ U(-log_gamma, log_gamma)``, drawn from ``generator`` (one draw per window): a scanner's
    contrast curve on the [-1, 1] scale, so -1 (background) and 1 stay where they are. Because the
    curve is the same in the window and its informed slice and differs between draws, the only way
    to predict a window's intensities is to read them off the informed slice, which is what GEM-3D
    asks the informed slice to carry. The curve is a fixed function of intensity, not MONAI's
    ``AdjustContrast`` (which rescales by each image's own min and max, so the same intensity would
    map differently in a window and in its informed slice).

    Args:
        batch: ``image`` ``[B, 1, W, H, W']`` and ``informed`` ``[B, H, W']`` in [-1, 1].
    Returns:
        the batch with ``image`` and ``informed`` mapped; masks and indices unchanged.
    """
    gamma = torch.exp((2 * torch.rand(len(batch), generator=generator) - 1) * log_gamma)

    def curve(x: torch.Tensor) -> torch.Tensor:
        g = gamma.to(x.device).reshape(-1, *[1] * (x.ndim - 1))
        return 2 * ((x + 1) / 2).clamp(0, 1) ** g - 1

    return replace(batch, image=curve(batch.image), informed=curve(batch.informed))


class WindowSource:
    """Draws windows and slices from a fixed list of volumes with an explicit generator."""

    def __init__(
        self, volumes: list[Volume], window: int, informed_from: Literal["window", "volume"] = "window"
    ) -> None:
        if not volumes:
            raise DataError("no training volumes were given")
        short = [v.case_id for v in volumes if v.depth < window]
        if short:
            raise DataError(
                f"cases {', '.join(short[:5])} have fewer slices than the training window W={window}; "
                "lower data.window or drop these cases"
            )
        self.window = window
        self.informed_from = informed_from
        # Views of the volumes' arrays (memory-mapped from a prepared cache): nothing is copied here,
        # and labels stay uint8 (a byte per voxel) until the one-hot encoding on the device.
        self.images = [torch.from_numpy(np.asarray(v.image, dtype=np.float32)) for v in volumes]  # each [D, H, W]
        self.labels = [torch.from_numpy(np.asarray(v.label, dtype=np.uint8)) for v in volumes]
        self.case_ids = [v.case_id for v in volumes]

    def __len__(self) -> int:
        return len(self.images)

    def _randint(self, high: int, generator: torch.Generator) -> int:
        return int(torch.randint(high, (1,), generator=generator))

    def windows(self, indices: list[int], generator: torch.Generator) -> WindowBatch:
        """One random window (and informed slice) from each volume in ``indices``."""
        images, masks, informed, informed_masks, starts, informed_ids = [], [], [], [], [], []
        for index in indices:
            image, label = self.images[index], self.labels[index]
            start = self._randint(image.shape[0] - self.window + 1, generator)
            if self.informed_from == "window":
                z = start + self._randint(self.window, generator)
            else:
                z = self._randint(image.shape[0], generator)
            images.append(image[start : start + self.window])
            masks.append(label[start : start + self.window])
            informed.append(image[z])
            informed_masks.append(label[z])
            starts.append(start)
            informed_ids.append(z)
        return WindowBatch(
            image=torch.stack(images).unsqueeze(1),
            mask=torch.stack(masks),
            informed=torch.stack(informed),
            informed_mask=torch.stack(informed_masks),
            start=torch.tensor(starts),
            informed_index=torch.tensor(informed_ids),
        )

    def draw(
        self, indices: list[int], generator: torch.Generator, windows: bool, contrast_log_gamma: float = 0.0
    ) -> WindowBatch | SliceBatch:
        """A training sample from each volume in ``indices``: a window (with its contrast curve when
        ``contrast_log_gamma`` > 0, ``with_contrast_curves``) or, for the informed generator, a slice."""
        if not windows:
            return self.slices(indices, generator)
        batch = self.windows(indices, generator)
        return with_contrast_curves(batch, contrast_log_gamma, generator) if contrast_log_gamma > 0 else batch

    def slices(self, indices: list[int], generator: torch.Generator) -> SliceBatch:
        """One random slice from each volume in ``indices``, with its normalised position."""
        images, masks, positions = [], [], []
        for index in indices:
            depth = self.images[index].shape[0]
            z = self._randint(depth, generator)
            images.append(self.images[index][z])
            masks.append(self.labels[index][z])
            positions.append(z / max(depth - 1, 1))
        return SliceBatch(
            image=torch.stack(images).unsqueeze(1),
            mask=torch.stack(masks),
            position=torch.tensor(positions, dtype=torch.float32),
        )
