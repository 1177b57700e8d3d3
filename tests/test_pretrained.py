"""Shipped pre-trained weights: EMA weights alone, checked by hash, and they fit the demo as it is."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from experiments.demo import SHIPPED_MANIFEST, DemoSettings, shipped_weights
from gem3d.checkpoint import file_sha256, load_checkpoint, subset
from gem3d.errors import CheckpointError, Gem3dError
from gem3d.runs import build_model, export_weights, initial_model, load_model, restore_state
from gem3d.training import new_state


def test_exported_weights_are_the_ema_alone_and_start_a_stage(micro_run: Path, tmp_path: Path) -> None:
    # execute
    path = export_weights(micro_run / "slice.safetensors", tmp_path / "slice.safetensors", recipe={"k": 1})
    # assert: only ema.*, the same values; loadable, a valid --init, not resumable
    tensors, metadata = load_checkpoint(path)
    source, _ = load_checkpoint(micro_run / "slice.safetensors")
    assert tensors and all(name.startswith("ema.") for name in tensors)
    assert all(torch.equal(value, source[name]) for name, value in tensors.items())
    assert metadata["weights_only"] is True and metadata["recipe"] == {"k": 1} and "optimizer" not in metadata
    model, cfg, _ = load_model(path)
    assert all(torch.equal(v, subset(source, "ema")[k]) for k, v in model.state_dict().items())
    started = initial_model("volume", cfg, None, path, torch.device("cpu"))
    assert getattr(started, "inflated", False)
    with pytest.raises(CheckpointError, match="not a resumable training checkpoint"):
        restore_state(new_state(build_model("slice", cfg), cfg.train), tensors, metadata, str(path))


def _shipped(tmp_path: Path, settings: DemoSettings) -> Path:
    folder = tmp_path / "shipped"
    (folder / "pretrained").mkdir(parents=True)
    (folder / "pretrained" / "slice.safetensors").write_bytes(b"weights")
    manifest = {
        "command": "make pretrained",
        "overrides": settings.overrides,
        "data": {"size": settings.size, "cases": 16},
        "steps": {"gem3d": [1, 1], "mask_only": [1, 1]},
        "files": {"pretrained/slice.safetensors": file_sha256(folder / "pretrained" / "slice.safetensors")},
    }
    (folder / SHIPPED_MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_shipped_weights_fit_only_their_own_settings_and_a_changed_file_is_refused(tmp_path: Path) -> None:
    settings = replace(DemoSettings(), shipped=None)
    folder = _shipped(tmp_path, settings)
    mine = replace(settings, shipped=folder)

    assert shipped_weights(mine) is not None
    assert shipped_weights(replace(mine, overrides=mine.overrides + " train.lr=1e-3")) is None
    assert shipped_weights(replace(mine, size=24)) is None
    assert shipped_weights(replace(mine, shipped=None)) is None
    (folder / "pretrained" / "slice.safetensors").write_bytes(b"tampered")
    with pytest.raises(Gem3dError, match="sha256 differs"):
        shipped_weights(mine)


def test_the_shipped_weights_fit_the_demo_as_it_is() -> None:
    # Changing the demo's overrides or slice size without `make pretrained` makes the demo train at
    # run time (minutes longer): this test says so first.
    settings = DemoSettings()
    assert settings.shipped is not None and (settings.shipped / SHIPPED_MANIFEST).exists()
    manifest = shipped_weights(settings)
    assert manifest is not None, "the shipped weights were made for other demo settings: run `make pretrained`"
    total = sum((settings.shipped / name).stat().st_size for name in manifest["files"])
    assert total < 5 * 10**6  # small enough to ship


def test_a_shipped_install_copies_the_files_into_the_demo_folder(tmp_path: Path) -> None:
    from experiments.demo import DemoState, pretrain_public

    settings = replace(DemoSettings(), shipped=None)
    folder = _shipped(tmp_path, settings)
    state = DemoState(out=tmp_path / "demo", settings=replace(settings, shipped=folder))
    pretrain_public(state, tmp_path / "mlflow")
    assert (state.pretrained / "slice.safetensors").read_bytes() == b"weights"
    assert state.summary["pretraining"]["shipped"] is True
    shutil.rmtree(folder)
