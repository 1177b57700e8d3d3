"""The evaluation's trained baselines: the full-3D one trains through ``gem3d.training.train`` (seeded,
resumable, it learns), and both sample trained weights after a short run (a warming-up EMA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.evaluation.baselines import Full3D, _padded_volumes
from gem3d.config import Config
from gem3d.data.dataset import load_volumes
from gem3d.data.volume import Volume
from gem3d.data.windows import WindowSource
from gem3d.diffusion import noise_process
from gem3d.errors import CheckpointError
from gem3d.training import validation_loss

CHANNELS = (8, 16)


@pytest.fixture
def volumes(phantom_dir: Path, micro_cfg: Config) -> list[Volume]:
    """The four phantoms, one cut shorter: volumes of different depths, padded by the baseline."""
    loaded = load_volumes(phantom_dir, micro_cfg.data)
    short = loaded[0]
    return [Volume(short.case_id, short.image[:-3], short.label[:-3]), *loaded[1:]]


def _weights(model: Full3D) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.net.state_dict().items()}


def test_training_in_two_calls_gives_the_bytes_of_one(volumes: list[Volume], micro_cfg: Config) -> None:
    # prepare: three seeded baselines
    once, twice = Full3D(micro_cfg, CHANNELS), Full3D(micro_cfg, CHANNELS)
    reseeded = micro_cfg.model_copy(update={"train": micro_cfg.train.model_copy(update={"seed": 7})})
    other_seed = Full3D(reseeded, CHANNELS)

    # execute: 4 steps at once, 2 + 2 (the step counter carries the randomness), 4 with another seed
    once.train(volumes, 4)
    twice.train(volumes, 2)
    twice.train(volumes, 2)
    other_seed.train(volumes, 4)

    # assert: identical EMA weights for the same seed, different for another
    a, b, c = _weights(once), _weights(twice), _weights(other_seed)
    assert once.step == twice.step == 4
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert any(not torch.equal(a[name], c[name]) for name in a)


def test_the_loss_falls_and_the_checkpoint_samples_the_same_bytes(
    volumes: list[Volume], micro_cfg: Config, tmp_path: Path
) -> None:
    # prepare
    # a slow EMA (0.999): without its warm-up the sampled weights would still be ~94% their random start
    train_cfg = micro_cfg.train.model_copy(update={"batch_size": 4, "lr": 5e-3, "ema_decay": 0.999})
    cfg = micro_cfg.model_copy(update={"train": train_cfg})
    model = Full3D(cfg, CHANNELS)
    losses: list[float] = []

    # execute: train, save, load, sample a mask shorter than the padded depth from both
    model.train(volumes, 60, on_step=lambda metrics: losses.append(metrics["loss"]))
    path = model.save(tmp_path / "full_3d.safetensors", volumes)
    loaded = Full3D.load(path)
    mask = volumes[0].label
    ours, theirs = model.sample([mask], [3], steps=2), loaded.sample([mask], [3], steps=2)

    # assert: the loss of the last ten steps well under the first ten, and the sampled (EMA) weights
    # as good as the trained ones on the same draws; same step, same bytes, mask shape
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.7 * first, (first, last)
    padded = _padded_volumes(volumes)
    source = WindowSource(padded, padded[0].depth)
    process = noise_process(cfg.diffusion)
    trained, sampled = (
        validation_loss(m, process, source, "volume", model.train_cfg, 4, 7) for m in (model.model, model.ema)
    )
    assert sampled < 1.5 * trained, (sampled, trained)
    assert loaded.step == 60
    assert ours[0].shape == mask.shape
    assert ours[0].tobytes() == theirs[0].tobytes()


def test_a_mask_only_checkpoint_is_not_loaded_as_a_full_3d_one(micro_cfg: Config, tmp_path: Path) -> None:
    from gem3d.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "x.safetensors", {"w": torch.zeros(1)}, {"stage": "volume"})

    with pytest.raises(CheckpointError, match="not a full-3D baseline checkpoint"):
        Full3D.load(path)


def test_the_mask_only_baseline_samples_trained_weights_after_a_short_run(
    volumes: list[Volume], micro_cfg: Config, tmp_path: Path
) -> None:
    from experiments.evaluation.baselines import train_mask_only
    from gem3d.runs import load_model
    from gem3d.training import held_out_loss

    # prepare: a slow EMA (0.999), which without its warm-up would still be ~97% the random start
    train_cfg = micro_cfg.train.model_copy(update={"batch_size": 4, "lr": 5e-3, "ema_decay": 0.999})
    cfg = micro_cfg.model_copy(update={"train": train_cfg})

    # execute: --quick's kind of budget
    run = train_mask_only(cfg, volumes, tmp_path / "mask_only", {"slice": 30, "volume": 1})

    # assert: the EMA (what sampling uses) scores as well as the trained weights on the same draws
    ema, baseline_cfg, _ = load_model(run / "slice.safetensors", "ema")
    model, _, _ = load_model(run / "slice.safetensors", "model")
    sampled, trained = (held_out_loss(m, "slice", volumes, baseline_cfg, 4, 7) for m in (ema, model))
    assert sampled < 1.5 * trained, (sampled, trained)
