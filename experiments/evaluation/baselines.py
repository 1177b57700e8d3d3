"""Baseline models of the evaluation protocol (``PROTOCOL.md`` section 2, ``METHODS``).

* ``train_mask_only``: the ``mask_only`` baseline, a GEM-3D run trained exactly like the main run
  (config, data, steps, seed) but with ``model.informed_slice = false``, so the network's
  informed-slice inputs are zero in training and in sampling.
* ``Full3D``: the ``full_3d`` baseline, a MONAI ``DiffusionModelUNet(spatial_dims=3)`` that denoises
  whole volumes, conditioned on the one-hot mask by channel concatenation. It uses the run's noise
  schedule (DDPM for training, DDIM for sampling) and prediction type.

Nothing here downloads anything; every model is trained on the data it is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from safetensors.torch import save_file

from gem3d.autoencoder import SliceAutoencoder
from gem3d.checkpoint import load_checkpoint, save_checkpoint
from gem3d.config import Config, config_from_dict
from gem3d.data.volume import Volume, fingerprint
from gem3d.diffusion import make_sampler, noise_process
from gem3d.errors import CheckpointError
from gem3d.files import atomic_write
from gem3d.runs import train_stage
from gem3d.training import optimizer_step, weighted_error

FULL3D_CHANNELS = (16, 32, 32)  # the largest width that trains 32^3 volumes in minutes on 2 CPU cores
FULL3D_FILE = "full_3d.safetensors"
_DIVISOR = 4  # two downsamplings in the 3-level UNet

OnStep = Callable[[int, float], None]


def train_mask_only(
    cfg: Config,
    volumes: list[Volume],
    run: str | Path,
    steps: dict[str, int],
    codec: SliceAutoencoder | None = None,
) -> Path:
    """Train the ``mask_only`` baseline: the main run's config with ``model.informed_slice = false``.

    Args:
        cfg: the main run's config (its seed, batch size, learning rate, ... are kept).
        volumes: the main run's training volumes.
        run: a new run folder.
        steps: stage -> steps, the main run's (``slice`` and ``volume``).
        codec: a latent run's autoencoder (required then): the baseline works in the same latent
            space, kept in the run folder as ``codec.safetensors``.
    Returns:
        the run folder, with slice and volume checkpoints.
    """
    payload = cfg.model_dump(mode="json")
    payload["model"]["informed_slice"] = False
    if cfg.model.latent:
        if codec is None:
            raise ValueError("a latent run's mask-only baseline needs the run's autoencoder (codec)")
        path = Path(run) / "codec.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        weights = {name: t.detach().cpu().contiguous() for name, t in codec.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(weights, str(tmp)))  # whole or not at all
        payload["autoencoder"]["checkpoint"] = str(path)
    baseline_cfg = config_from_dict(payload, "mask-only baseline")
    for stage in ("slice", "volume"):
        train_stage(baseline_cfg, volumes, stage, run, steps=steps[stage])
    return Path(run)


def _padded_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``[D, H, W]`` rounded up to multiples of the UNet's divisor."""
    d, h, w = (int(math.ceil(s / _DIVISOR) * _DIVISOR) for s in shape)
    return d, h, w


def _pad(volume: torch.Tensor, shape: tuple[int, int, int], value: float) -> torch.Tensor:
    """Pad the last three dims of ``volume`` at their far ends up to ``shape``."""
    d, h, w = volume.shape[-3:]
    return F.pad(volume, (0, shape[2] - w, 0, shape[1] - h, 0, shape[0] - d), value=value)


def _one_hot(label: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``[B, D, H, W]`` ids -> ``[B, L, D, H, W]`` float one-hot, scaled to [-1, 1] like the images."""
    return F.one_hot(label.long(), num_labels).permute(0, 4, 1, 2, 3).float() * 2.0 - 1.0


class Full3D:
    """A whole-volume conditional diffusion model (the ``full_3d`` baseline).

    Attributes:
        net: ``DiffusionModelUNet(spatial_dims=3)``; input ``[B, 1 + L, D', H', W']`` (noisy image
            then one-hot mask), output ``[B, 1, D', H', W']`` (the prediction type of the run).
        cfg: the main run's config (schedule, labels, seed).
    """

    def __init__(self, cfg: Config, channels: Sequence[int] = FULL3D_CHANNELS) -> None:
        self.cfg = cfg
        self.channels = tuple(channels)
        torch.manual_seed(cfg.train.seed)
        self.net = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=1 + cfg.data.num_labels,
            out_channels=1,
            channels=self.channels,
            attention_levels=(False,) * len(self.channels),
            num_res_blocks=1,
            norm_num_groups=8,
        )
        self.step = 0

    def train(self, volumes: Sequence[Volume], steps: int, on_step: OnStep | None = None) -> float:
        """Train for ``steps`` AdamW steps on random volumes of ``volumes``; returns the last loss.

        Each step draws ``train.batch_size`` volumes (with replacement, seeded), one timestep each,
        and regresses the run's prediction target (epsilon, v or sample) with MSE.
        """
        cfg = self.cfg
        process = noise_process(cfg.diffusion)
        shape = _padded_shape(np.max([v.image.shape for v in volumes], axis=0))
        images = torch.stack([_pad(torch.from_numpy(v.image), shape, -1.0) for v in volumes]).unsqueeze(1)
        labels = torch.stack([_pad(torch.from_numpy(v.label.astype(np.int64)), shape, 0) for v in volumes])
        generator = torch.Generator().manual_seed(cfg.train.seed)
        params = list(self.net.parameters())
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
        self.net.train()
        loss_value = float("nan")
        for _ in range(steps):
            index = torch.randint(len(volumes), (cfg.train.batch_size,), generator=generator)
            clean, cond = images[index], _one_hot(labels[index], cfg.data.num_labels)
            noise = torch.randn(clean.shape, generator=generator)
            t = process.draw_timesteps((len(index),), generator)
            noisy = process.add_noise(clean, noise, t)
            prediction = self.net(torch.cat([noisy, cond], dim=1), t)
            loss = weighted_error(prediction, process.target(clean, noise, t), process.loss_weight(t)).mean()
            optimizer_step(optimizer, loss, params, cfg.train.grad_clip)
            self.step += 1
            loss_value = float(loss.detach())
            if on_step is not None:
                on_step(self.step, loss_value)
        self.net.eval()
        return loss_value

    @torch.no_grad()
    def sample(self, masks: Sequence[np.ndarray], seeds: Sequence[int], steps: int | None = None) -> list[np.ndarray]:
        """One volume per ``[D, H, W]`` mask, each from its own seeded initial noise, with DDIM.

        Masks of one padded shape are denoised together, ``sampler.batch_volumes`` per network
        batch (memory is flat in the number of masks, issue 16); every volume's noise (initial
        and, with ``diffusion.eta > 0``, DDIM's) comes from its own seed's generator.

        Returns:
            ``[D, H, W]`` float32 volumes in [-1, 1], cropped back to each mask's shape.
        """
        sampler = make_sampler(self.cfg.diffusion, steps)
        self.net.eval()
        outputs: list[np.ndarray | None] = [None] * len(masks)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for index, mask in enumerate(masks):
            groups.setdefault(_padded_shape(mask.shape), []).append(index)
        batch = self.cfg.sampler.batch_volumes
        chunks = [(shape, m[i : i + batch]) for shape, m in groups.items() for i in range(0, len(m), batch)]
        for shape, members in chunks:
            cond = _one_hot(
                torch.stack([_pad(torch.from_numpy(masks[i].astype(np.int64)), shape, 0) for i in members]),
                self.cfg.data.num_labels,
            )
            generators = [torch.Generator().manual_seed(int(seeds[i])) for i in members]
            x = torch.stack([torch.randn((1, *shape), generator=g) for g in generators])
            for step, t in enumerate(sampler.timesteps):
                timesteps = torch.full((len(members),), t, dtype=torch.long)
                prediction = self.net(torch.cat([x, cond], dim=1), timesteps)
                noise = None
                if sampler.stochastic:
                    noise = torch.stack([torch.randn((1, *shape), generator=g) for g in generators])
                x = sampler.step(prediction, step, x, noise)
            for row, i in enumerate(members):
                d, h, w = masks[i].shape
                outputs[i] = x[row, 0, :d, :h, :w].clamp(-1, 1).numpy().astype(np.float32)
        return [volume for volume in outputs if volume is not None]

    def save(self, path: str | Path, volumes: Sequence[Volume]) -> Path:
        """Checkpoint the network (safetensors + JSON metadata: config, steps, channels, data fingerprint)."""
        tensors = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        metadata: dict[str, Any] = {
            "stage": "full_3d",
            "step": self.step,
            "channels": list(self.channels),
            "config": self.cfg.model_dump(mode="json"),
            "data_fingerprint": fingerprint(list(volumes)),
        }
        return save_checkpoint(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | Path) -> Full3D:
        """A model saved by ``save``; a clear ``CheckpointError`` for anything else."""
        tensors, metadata = load_checkpoint(path)
        if metadata.get("stage") != "full_3d":
            raise CheckpointError(f"{path}: is not a full-3D baseline checkpoint")
        model = cls(config_from_dict(metadata["config"], f"{path} (embedded config)"), metadata["channels"])
        model.net.load_state_dict(tensors)
        model.step = int(metadata["step"])
        model.net.eval()
        return model
