"""Training batches drawn ahead by loader workers: same bytes for any worker count, labels kept uint8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gem3d.config import Config
from gem3d.data.dataset import load_volumes
from gem3d.data.loader import StepBatches, step_batches, step_seed
from gem3d.data.prepare import PrepareOptions, prepare_dataset
from gem3d.data.windows import WindowBatch, WindowSource
from gem3d.diffusion import noise_process
from gem3d.runs import build_model
from gem3d.training import freeze_for_stage, new_state, train


def _with_train(cfg: Config, **fields: object) -> Config:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=fields)})


def _trained(cfg: Config, source: WindowSource, stage: str, steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the initial weights
    model = build_model("informed" if stage == "informed" else "slice", cfg)
    freeze_for_stage(model, stage, False)  # type: ignore[arg-type]
    state = new_state(model, cfg.train, seed=seed)
    train(state, noise_process(cfg.diffusion), source, stage, steps, cfg.train)  # type: ignore[arg-type]
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("stage", ["slice", "informed"])
def test_loader_workers_do_not_change_the_trained_weights(phantom_dir: Path, micro_cfg: Config, stage: str) -> None:
    # prepare: the appearance augmentation is on, so the workers also draw contrast curves
    cfg = _with_train(micro_cfg, appearance_log_gamma=0.5)
    source = WindowSource(load_volumes(phantom_dir, cfg.data), cfg.data.window)
    # execute: in-process, then two worker processes each keeping three batches ready
    alone = _trained(_with_train(cfg, loader_workers=0), source, stage, 5)
    workers = _trained(_with_train(cfg, loader_workers=2, prefetch_batches=3), source, stage, 5)
    other_seed = _trained(_with_train(cfg, loader_workers=0), source, stage, 5, seed=1)
    # assert: identical bytes; a different seed does change them (the comparison can fail)
    assert [name for name in alone if not torch.equal(alone[name], workers[name])] == []
    assert any(not torch.equal(alone[name], other_seed[name]) for name in alone)


def test_a_steps_batch_depends_on_the_seed_and_step_only(phantom_dir: Path, micro_cfg: Config) -> None:
    source = WindowSource(load_volumes(phantom_dir, micro_cfg.data), micro_cfg.data.window)
    batches = StepBatches(source, windows=True, batch_size=3, seed=7)
    # execute: steps 0..5 in one pass, and steps 3..5 as a resumed run would draw them
    whole = list(step_batches(batches, 0, 6, micro_cfg.train, torch.device("cpu")))
    resumed = list(step_batches(batches, 3, 6, micro_cfg.train, torch.device("cpu")))
    # assert: the resumed run draws what the whole run drew at the same steps, and steps differ
    assert all(isinstance(b, WindowBatch) for b in whole)
    for a, b in zip(whole[3:], resumed, strict=True):
        assert torch.equal(a.image, b.image) and torch.equal(a.start, b.start)  # type: ignore[union-attr]
    assert not torch.equal(whole[0].image, whole[1].image)
    assert len({step_seed(7, step, stream) for step in range(50) for stream in ("data", "noise")}) == 100


def test_labels_stay_uint8_views_of_the_memory_mapped_cache(
    phantom_dir: Path, micro_cfg: Config, tmp_path: Path
) -> None:
    # prepare: a prepared (memory-mapped) cache, as training reads it
    prepare_dataset(phantom_dir, tmp_path / "prepared", micro_cfg.data, PrepareOptions())
    volumes = load_volumes(tmp_path / "prepared", micro_cfg.data)
    # execute
    source = WindowSource(volumes, micro_cfg.data.window)
    batch = source.windows([0, 1], torch.Generator().manual_seed(0))
    # assert: no label copy at 8 bytes a voxel: the source's labels are the cache's own bytes
    assert isinstance(volumes[0].label, np.memmap)
    for volume, labels in zip(volumes, source.labels, strict=True):
        assert labels.dtype == torch.uint8
        assert np.shares_memory(labels.numpy(), volume.label)
    assert batch.mask.dtype == torch.uint8 and batch.informed_mask.dtype == torch.uint8
