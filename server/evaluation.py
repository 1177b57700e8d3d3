"""Server-side evaluation of the global model on a split the server holds (run config ``server-data``)."""

from __future__ import annotations

from torch import nn

from gem3d.config import Config
from gem3d.data.volume import Volume
from gem3d.data.windows import WindowSource
from gem3d.diffusion import train_scheduler
from gem3d.training import Stage
from gem3d.training import validation_loss as fixed_draw_loss

# Fixed so every round's global model is scored on the same noise and windows.
_EVAL_SEED_OFFSET = 2_000_003


def validation_loss(model: nn.Module, stage: Stage, volumes: list[Volume], cfg: Config, batches: int) -> float:
    """Mean denoising loss of ``model`` on ``batches`` fixed draws of ``cfg.train.batch_size`` samples."""
    source = WindowSource(volumes, cfg.data.window, cfg.train.informed_from)
    scheduler = train_scheduler(cfg.diffusion)
    return fixed_draw_loss(model, scheduler, source, stage, cfg.train, batches, cfg.train.seed + _EVAL_SEED_OFFSET)
