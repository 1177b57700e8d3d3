"""What every DP-SGD benchmark (``experiments/benchmarks/privacy.py``) shares: data, model, privacy config.

The benchmarks run on the tiny config (``--mid``: also 96x96 slices, window 16) with phantoms
(``write_phantom_dataset`` + ``load_volumes``), for stage 1 (``slice``) and stage 2 (``volume``).
A worker's stage setup has exactly ``batch_size`` phantom volumes (so the Poisson rate is 1 and
every DP batch is full size) and a model frozen as in training, whose all-zero frozen parameters
stand in for a trained base. The privacy section is enabled with a budget no benchmark reaches.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from experiments.configs import resolve_config_path
from gem3d.config import Config, PrivacyConfig, load_config
from gem3d.data.dataset import load_volumes
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.data.volume import Volume
from gem3d.data.windows import WindowSource
from gem3d.diffusion import noise_process
from gem3d.runs import build_model
from gem3d.training import Stage, freeze_for_stage


def phantoms(cfg: Config, num_cases: int, seed: int) -> list[Volume]:
    """``num_cases`` phantom volumes at the config's slice size, depth 2W + 8 (whole windows after cropping)."""
    size, window = cfg.data.image_size, cfg.data.window
    with tempfile.TemporaryDirectory() as tmp:
        data = write_phantom_dataset(
            Path(tmp) / "p", num_cases, (size, size, 2 * window + 8), cfg.data.num_labels, seed
        )
        return load_volumes(data, cfg.data)


def stand_in_base(model: torch.nn.Module, seed: int = 0) -> None:
    """Give a fresh stage-2 model's frozen, all-zero parameters small random values.

    MONAI zero-initialises the U-Net's output conv, so a stage-2 model inflated from an untrained
    base gives its slice-axis layers exactly zero gradients; the real stage 2 starts from a
    trained base. This stands in for one, so clipping and the vmap/loop check see real gradients.
    The values come from a generator seeded with ``seed``: the same model every run.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and not p.any():
                p.normal_(std=0.02, generator=generator)


def privacy_cfg(cfg: Config, **changes: Any) -> PrivacyConfig:
    """The config's privacy section, enabled, with a budget no benchmark reaches."""
    return cfg.privacy.model_copy(update={"enabled": True, "budget_epsilon": 1e6, **changes})


def stage_setup(spec: dict[str, Any]) -> tuple[Config, Stage, WindowSource, Any, torch.nn.Module]:
    """A worker's config, stage, phantom source, noise process and frozen-as-in-training model."""
    torch.set_num_threads(spec["threads"])
    cfg = load_config(resolve_config_path(spec["config"]), spec["overrides"])
    stage = spec["stage"]
    volumes = phantoms(cfg, cfg.train.batch_size, seed=0)
    source = WindowSource(volumes, cfg.data.window, cfg.train.informed_from)
    model = build_model(stage, cfg)
    freeze_for_stage(model, stage, cfg.train.volume_train_all)
    stand_in_base(model)
    return cfg, stage, source, noise_process(cfg.diffusion), model
