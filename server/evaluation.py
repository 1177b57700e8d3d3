"""Server-side evaluation of the global model on a split the server holds (run config ``server-data``)."""

from __future__ import annotations

import torch
from torch import nn

from gem3d.config import Config
from gem3d.data.volume import Volume
from gem3d.data.windows import WindowSource
from gem3d.diffusion import train_scheduler
from gem3d.training import Stage, draw_inputs, per_sample_loss

# Fixed so every round's global model is scored on the same noise and windows.
_EVAL_SEED_OFFSET = 2_000_003


@torch.no_grad()
def validation_loss(model: nn.Module, stage: Stage, volumes: list[Volume], cfg: Config, batches: int) -> float:
    """Mean denoising loss of ``model`` on ``batches`` fixed draws of ``cfg.train.batch_size`` samples."""
    source = WindowSource(volumes, cfg.data.window, cfg.train.informed_from)
    generator = torch.Generator().manual_seed(cfg.train.seed + _EVAL_SEED_OFFSET)
    scheduler = train_scheduler(cfg.diffusion)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(max(batches, 1)):
        indices = torch.randint(len(source), (cfg.train.batch_size,), generator=generator).tolist()
        inputs = draw_inputs(model, scheduler, source, indices, stage, generator, cfg.train, device)
        total += float(per_sample_loss(model, inputs).mean())
    model.train(was_training)
    return total / max(batches, 1)
