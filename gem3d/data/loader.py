"""Training batches drawn ahead of the GPU: one batch per step, in worker processes, pinned.

A step's batch is a pure function of ``(seed, step)``: the volume indices, window positions,
informed slices and contrast curves of step n come from a generator seeded with
``step_seed(seed, n, "data")``. So the batches can be drawn in any order, by any number of
``torch.utils.data`` workers, ahead of the step that uses them, and a run resumed at step n
draws exactly what an uninterrupted run draws there: no generator state needs saving. The
diffusion noise and timesteps of step n come from ``step_seed(seed, n, "noise")`` on the
training device (``gem3d.training``).

Labels stay uint8 from the memory-mapped cache to the batch (one byte per voxel); they become
int64 only inside the one-hot encoding, on the device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gem3d.config import TrainConfig
from gem3d.data.windows import SliceBatch, WindowBatch, WindowSource

Stream = Literal["data", "noise"]
_STREAMS: dict[Stream, int] = {"data": 0, "noise": 1}


def step_seed(seed: int, step: int, stream: Stream) -> int:
    """A 63-bit seed for ``stream`` at training ``step`` of a run seeded ``seed`` (numpy's ``SeedSequence``).

    Distinct (seed, step, stream) give independent streams; the same give the same seed everywhere.
    """
    entropy = [seed % 2**64, step, _STREAMS[stream]]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class StepBatches(Dataset[WindowBatch | SliceBatch]):
    """Item n is the batch of training step n: ``batch_size`` volumes drawn uniformly with replacement.

    Args:
        source: the training volumes.
        windows: windows of W slices (stages 1 and 2) or single slices (the informed generator).
        contrast_log_gamma: the appearance augmentation of windows (``WindowSource.draw``; 0: off).
    """

    def __init__(
        self, source: WindowSource, windows: bool, batch_size: int, seed: int, contrast_log_gamma: float = 0.0
    ) -> None:
        self.source = source
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self.contrast_log_gamma = contrast_log_gamma

    def __len__(self) -> int:
        return 2**62  # indexed by step; the sampler says which steps

    def __getitem__(self, step: int) -> WindowBatch | SliceBatch:
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, "data"))
        indices = torch.randint(len(self.source), (self.batch_size,), generator=generator).tolist()
        return self.source.draw(indices, generator, self.windows, self.contrast_log_gamma)


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """``cfg.loader_workers``, or for ``None``: none on a CPU (drawing competes with training for
    the same cores), up to 4 on a GPU (leaving a core to the training process)."""
    if cfg.loader_workers is not None:
        return cfg.loader_workers
    if device.type == "cpu":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def step_batches(
    dataset: StepBatches, first_step: int, until_step: int, cfg: TrainConfig, device: torch.device
) -> Iterator[WindowBatch | SliceBatch]:
    """The batches of steps ``first_step .. until_step - 1``, in order, drawn ahead by the loader's workers.

    With workers, each keeps ``cfg.prefetch_batches`` batches ready; on CUDA batches arrive in
    pinned memory, so the copy to the device can overlap the step (``non_blocking``).
    """
    workers = loader_workers(cfg, device)
    loader = DataLoader(
        dataset,
        batch_size=None,  # each item is already a step's batch
        sampler=range(first_step, until_step),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=cfg.prefetch_batches if workers else None,
        persistent_workers=False,
    )
    return iter(loader)
