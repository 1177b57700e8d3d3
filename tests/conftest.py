"""Shared fixtures: a very small config and a phantom dataset, so every test runs in seconds on CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gem3d.config import Config, config_from_dict

# The test models are tiny: one intra-op thread is as fast, and it does not collapse when the two
# cores are shared with other processes (OpenMP barriers under oversubscription took 35x longer).
torch.set_num_threads(1)

MICRO = {
    "data": {"image_size": 16, "window": 4, "num_labels": 4},
    "model": {
        "channels": [8, 16],
        "attention_levels": [False, True],
        "num_res_blocks": 1,
        "norm_num_groups": 4,
        "num_head_channels": 8,
    },
    "informed": {
        "channels": [8, 16],
        "attention_levels": [False, True],
        "num_res_blocks": 1,
        "norm_num_groups": 4,
        "num_head_channels": 8,
        "position_bins": 8,
    },
    "diffusion": {"inference_steps": 5},
    "train": {"batch_size": 2, "lr": 2e-3, "ema_decay": 0.9, "steps_slice": 4, "steps_volume": 3, "steps_informed": 3},
}


def copy_dataset(source: Path, target: Path) -> Path:
    """A private copy of a shared dataset fixture (``phantom_dir``), without the site state
    (``.gem3d-site``: key, ledger) that other tests' training runs leave beside the data."""
    return Path(shutil.copytree(source, target, ignore=shutil.ignore_patterns(".gem3d-site")))


def randomise_zero_parameters(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with its all-zero parameters (output convolutions, slice-axis layers) set to 0.2 N(0, 1),
    in place: a fresh network's output is then not identically zero, nor its gradients, so a changed
    computation can show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture
def micro_cfg() -> Config:
    """A config whose networks have a few thousand parameters: 16x16 slices, window 4."""
    return config_from_dict(MICRO, "micro")


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four phantom cases, 16x16x12, in nnU-Net v2 raw layout (read-only: copy before changing)."""
    from gem3d.data.phantoms import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "data", num_cases=4, shape=(16, 16, 12))


@pytest.fixture(scope="session")
def micro_run(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro run folder with all three stages, a few steps each (read-only: copy before changing)."""
    from gem3d.data.dataset import load_volumes
    from gem3d.runs import train_stage

    cfg = config_from_dict(MICRO, "micro")
    volumes = load_volumes(phantom_dir, cfg.data)
    folder = tmp_path_factory.mktemp("run") / "run"
    for stage, steps in (("slice", 3), ("volume", 2), ("informed", 2)):
        train_stage(cfg, volumes, stage, folder, steps=steps)  # type: ignore[arg-type]
    return folder


@pytest.fixture(scope="session")
def two_site_dir(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantoms split into two site datasets, ``site_0`` (cases 000, 001) and ``site_1`` (002, 003)."""
    import shutil

    sites = tmp_path_factory.mktemp("sites") / "sites"
    for site, cases in (("site_0", ("000", "001")), ("site_1", ("002", "003"))):
        (sites / site / "imagesTr").mkdir(parents=True)
        (sites / site / "labelsTr").mkdir()
        for case in cases:
            shutil.copy(phantom_dir / "imagesTr" / f"phantom_{case}_0000.nii.gz", sites / site / "imagesTr")
            shutil.copy(phantom_dir / "labelsTr" / f"phantom_{case}.nii.gz", sites / site / "labelsTr")
        dataset = json.loads((phantom_dir / "dataset.json").read_text())
        (sites / site / "dataset.json").write_text(json.dumps({**dataset, "numTraining": len(cases)}))
    return sites
