"""Noise schedules and samplers from ``monai.networks.schedulers``, built from config.

The schedule lives here, never in a network's state: a federated average or DP noise must not
touch betas (STYLE.md, convention 2).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from gem3d.config import DiffusionConfig
from gem3d.errors import ConfigError


def _schedule_args(cfg: DiffusionConfig) -> dict[str, Any]:
    # MONAI's cosine schedule takes no beta range.
    if cfg.schedule == "cosine":
        return {}
    return {"beta_start": cfg.beta_start, "beta_end": cfg.beta_end}


def train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The forward process used in training (``add_noise``, ``get_velocity``)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        schedule=cfg.schedule,
        prediction_type=cfg.prediction_type,
        **_schedule_args(cfg),
    )


def sample_scheduler(cfg: DiffusionConfig, steps: int | None = None) -> DDIMScheduler:
    """A DDIM sampler over ``steps`` (default ``cfg.inference_steps``) of the same schedule."""
    scheduler = DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        schedule=cfg.schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=True,
        **_schedule_args(cfg),
    )
    count = cfg.inference_steps if steps is None else steps
    if not 1 <= count <= cfg.num_train_timesteps:
        raise ConfigError(
            f"--steps {count}: expected 1..{cfg.num_train_timesteps} (the run's diffusion.num_train_timesteps)"
        )
    scheduler.set_timesteps(count)
    return scheduler


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network learns to predict for its ``prediction_type``.

    Args:
        x0: ``[N, ...]`` clean samples; noise: same shape; t: ``[N]`` timesteps.
    """
    if scheduler.prediction_type == "epsilon":
        return noise
    if scheduler.prediction_type == "sample":
        return x0
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"unknown prediction_type '{scheduler.prediction_type}'")
