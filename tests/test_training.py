"""Training loops, checkpoints and bit-exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gem3d.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from gem3d.config import Config
from gem3d.data.dataset import load_volumes
from gem3d.errors import CheckpointError
from gem3d.runs import build_model, load_model, train_stage


@pytest.fixture
def volumes(phantom_dir: Path, micro_cfg: Config):
    return load_volumes(phantom_dir, micro_cfg.data)


@pytest.mark.parametrize("stage", ["slice", "informed"])
def test_loss_falls_on_a_small_fixed_dataset(volumes, micro_cfg: Config, tmp_path: Path, stage: str) -> None:
    cfg = micro_cfg.model_copy(update={"train": micro_cfg.train.model_copy(update={"batch_size": 4})})
    losses: list[float] = []

    train_stage(cfg, volumes, stage, tmp_path / "run", steps=200, on_step=lambda m: losses.append(m["loss"]))

    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)


def test_volume_stage_starts_from_slice_stage_and_trains_only_slice_axis_layers(
    volumes, micro_cfg: Config, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    train_stage(micro_cfg, volumes, "slice", run, steps=3)
    slice_ema = {k[4:]: v for k, v in load_file(run / "slice.safetensors").items() if k.startswith("ema.")}

    train_stage(micro_cfg, volumes, "volume", run, steps=3)

    volume_model = {k[6:]: v for k, v in load_file(run / "volume.safetensors").items() if k.startswith("model.")}
    base = {k.replace(".spatial.", "."): v for k, v in volume_model.items() if ".slice_" not in k}
    assert base.keys() == slice_ema.keys()
    assert all(torch.equal(base[k], slice_ema[k]) for k in base)  # frozen base, still the stage-1 weights
    assert read_metadata(run / "volume.safetensors")["stage"] == "volume"


def test_volume_stage_without_slice_checkpoint_is_refused(volumes, micro_cfg: Config, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="slice-stage checkpoint"):
        train_stage(micro_cfg, volumes, "volume", tmp_path / "run", steps=1)


@pytest.mark.parametrize("stage", ["slice", "informed"])
def test_resume_is_bit_exact(volumes, micro_cfg: Config, tmp_path: Path, stage: str) -> None:
    train_stage(micro_cfg, volumes, stage, tmp_path / "split", steps=3)
    train_stage(micro_cfg, volumes, stage, tmp_path / "split", steps=6, resume=True)
    train_stage(micro_cfg, volumes, stage, tmp_path / "whole", steps=6)

    split = load_file(tmp_path / "split" / f"{stage}.safetensors")
    whole = load_file(tmp_path / "whole" / f"{stage}.safetensors")

    assert split.keys() == whole.keys()
    assert [k for k in split if not torch.equal(split[k], whole[k])] == []
    assert read_metadata(tmp_path / "split" / f"{stage}.safetensors")["step"] == 6


def test_resume_refuses_a_different_model_config(volumes, micro_cfg: Config, tmp_path: Path) -> None:
    train_stage(micro_cfg, volumes, "slice", tmp_path / "run", steps=1)
    other = micro_cfg.model_copy(update={"model": micro_cfg.model.model_copy(update={"informed_mask": False})})

    with pytest.raises(CheckpointError, match=r"\[model\]"):
        train_stage(other, volumes, "slice", tmp_path / "run", steps=2, resume=True)


def test_existing_checkpoint_is_not_overwritten(volumes, micro_cfg: Config, tmp_path: Path) -> None:
    train_stage(micro_cfg, volumes, "slice", tmp_path / "run", steps=1)
    before = (tmp_path / "run" / "slice.safetensors").read_bytes()

    with pytest.raises(CheckpointError, match="already exists"):
        train_stage(micro_cfg, volumes, "slice", tmp_path / "run", steps=2)

    assert (tmp_path / "run" / "slice.safetensors").read_bytes() == before


def test_seeded_training_gives_identical_bytes(volumes, micro_cfg: Config, tmp_path: Path) -> None:
    train_stage(micro_cfg, volumes, "slice", tmp_path / "a", steps=2)
    train_stage(micro_cfg, volumes, "slice", tmp_path / "b", steps=2)
    other_seed = micro_cfg.model_copy(update={"train": micro_cfg.train.model_copy(update={"seed": 1})})
    train_stage(other_seed, volumes, "slice", tmp_path / "c", steps=2)

    a, b, c = (load_file(tmp_path / d / "slice.safetensors") for d in "abc")

    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if k.startswith("model."))


@pytest.mark.parametrize("stage", ["slice", "volume", "informed"])
def test_checkpoint_round_trip(micro_cfg: Config, tmp_path: Path, stage: str) -> None:
    model = build_model(stage, micro_cfg)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    weights = {f"ema.{k}": v for k, v in model.state_dict().items()}
    path = save_checkpoint(
        tmp_path / "c.safetensors", weights, {"stage": stage, "config": micro_cfg.model_dump(mode="json")}
    )

    loaded, cfg, metadata = load_model(path)

    assert cfg == micro_cfg
    assert metadata["stage"] == stage
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_corrupt_or_pickled_checkpoints_are_refused(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.safetensors"
    save_checkpoint(truncated, {"ema.w": torch.ones(100)}, {"stage": "slice"})
    truncated.write_bytes(truncated.read_bytes()[:-50])
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"w": torch.ones(3)}, pickled)

    for path in (truncated, pickled, tmp_path / "missing.safetensors"):
        with pytest.raises(CheckpointError, match=path.name):
            load_checkpoint(path)


@pytest.mark.parametrize("warmup", [False, True])
def test_the_ema_follows_its_formula_and_keeps_its_count_on_the_host(warmup: bool) -> None:
    from gem3d.training import ema_copy

    model = torch.nn.Linear(3, 2)
    ema = ema_copy(model, 0.9, warmup=warmup)
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0 + n)
        ema.update_parameters(model)
        # by hand: the first update copies, update n >= 1 is d ema + (1 - d) model
        d = (min(0.9, (1 + n) / (10 + n)) if warmup else 0.9) if n else 0.0
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters(), strict=True)]
    for got, want in zip(ema.module.parameters(), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    assert int(ema.n_averaged) == 4 and ema.n_averaged.device.type == "cpu"
