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
from collections.abc import Sequence
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
from gem3d.data.windows import WindowSource
from gem3d.diffusion import make_sampler, noise_process
from gem3d.errors import CheckpointError
from gem3d.files import atomic_write
from gem3d.networks import WindowDenoiser
from gem3d.runs import resolve_device, train_stage
from gem3d.sampler import seeded_noise
from gem3d.training import OnStep, new_state, train

FULL3D_CHANNELS = (16, 32, 32)  # the largest width that trains 32^3 volumes in minutes on 2 CPU cores
FULL3D_FILE = "full_3d.safetensors"
_DIVISOR = 4  # two downsamplings in the 3-level UNet


def train_mask_only(
    cfg: Config,
    volumes: list[Volume],
    run: str | Path,
    steps: dict[str, int],
    codec: SliceAutoencoder | None = None,
) -> Path:
    """Train the ``mask_only`` baseline: the main run's config with ``model.informed_slice = false``
    (and ``train.ema_warmup = true``, so a short run's EMA is trained weights).

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
    # A warming-up EMA: at --quick's 50 steps per stage the plain one is still mostly its random
    # start (tiny, 50 + 50 steps, held-out loss of the volume stage: 1.055 plain, 0.382 warm-up).
    payload["train"]["ema_warmup"] = True
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


def _padded_volumes(volumes: Sequence[Volume]) -> list[Volume]:
    """``volumes`` padded at their far ends (images with -1, labels with 0) to one shape the UNet
    divides: each is then a single window of ``gem3d.training``'s window source."""
    shape = _padded_shape(np.max([v.image.shape for v in volumes], axis=0))
    return [
        Volume(
            v.case_id,
            _pad(torch.from_numpy(np.asarray(v.image, dtype=np.float32)), shape, -1.0).numpy(),
            _pad(torch.from_numpy(np.asarray(v.label, dtype=np.uint8)), shape, 0).numpy(),
        )
        for v in volumes
    ]


class VolumeUNet(WindowDenoiser):
    """``DiffusionModelUNet(spatial_dims=3)`` on whole volumes, conditioned on the one-hot mask.

    Attributes:
        net: input ``[B, 1 + L, D', H', W']`` (noisy image then one-hot mask), output
            ``[B, 1, D', H', W']`` (the prediction type of the run); its state dict is the checkpoint's.
    """

    def __init__(self, num_labels: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.codec = None  # pixel space
        self.net = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=1 + num_labels,
            out_channels=1,
            channels=tuple(channels),
            attention_levels=(False,) * len(channels),
            num_res_blocks=1,
            norm_num_groups=8,
        )

    def condition(self, mask: torch.Tensor, informed: torch.Tensor, informed_mask: torch.Tensor) -> torch.Tensor:
        """``[B, L, D, H, W]``: the one-hot ``mask`` ``[B, D, H, W]`` in [-1, 1]; no informed slice."""
        return _one_hot(mask, self.num_labels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, 1, D, H, W]`` noisy volumes at ``t`` (``[B]``, or ``[B, D]`` all equal along D)."""
        return self.net(torch.cat([x, cond], dim=1), t[:, 0] if t.ndim == 2 else t)


class Full3D:
    """A whole-volume conditional diffusion model (the ``full_3d`` baseline).

    It trains through ``gem3d.training.train`` as the ``volume`` stage on windows that are whole
    padded volumes (one timestep per volume, drawn uniformly): the same batches, AdamW, clipping,
    EMA, seeding, loader workers and device as GEM-3D's own stages, the EMA warming up (``ema_copy``).
    It samples with the EMA weights.

    Attributes:
        model: the trained ``VolumeUNet``, on ``device`` (default: the config's ``train.device``);
            ``ema``: its exponential average (what ``sample`` uses).
        cfg: the main run's config (schedule, labels, seed, training settings).
    """

    def __init__(self, cfg: Config, channels: Sequence[int] = FULL3D_CHANNELS, device: str | None = None) -> None:
        self.cfg = cfg
        self.channels = tuple(channels)
        torch.manual_seed(cfg.train.seed)
        self.model = VolumeUNet(cfg.data.num_labels, self.channels).to(resolve_device(device or cfg.train.device))
        # One timestep per volume, drawn uniformly (stage 2's skew to small t is for tuning, not from
        # scratch), and a warming-up EMA: a short run (evaluate --quick, 100 steps) samples trained
        # weights, not an average still 37% its random start (0.99 ** 100). At tiny, 100 steps,
        # held-out denoising loss: plain EMA 0.71, warm-up EMA 0.195, raw weights 0.20.
        self.train_cfg = cfg.train.model_copy(update={"volume_t_power": 1.0, "ema_warmup": True})
        self.state = new_state(self.model, self.train_cfg)
        self.ema = self.state.ema.module

    @property
    def net(self) -> DiffusionModelUNet:
        """The sampled network (the EMA's ``DiffusionModelUNet``)."""
        net = self.ema.net
        assert isinstance(net, DiffusionModelUNet)
        return net

    @property
    def step(self) -> int:
        return self.state.step

    def train(self, volumes: Sequence[Volume], steps: int, on_step: OnStep | None = None) -> float:
        """Train for ``steps`` more steps on ``volumes`` (``gem3d.training.train``); returns their mean loss.

        Each step draws ``train.batch_size`` volumes (with replacement) and a timestep each from
        ``(train.seed, step)`` and regresses the run's prediction target (epsilon, v or sample).
        """
        padded = _padded_volumes(volumes)
        source = WindowSource(padded, padded[0].depth)  # each window a whole volume
        process = noise_process(self.cfg.diffusion)
        result = train(self.state, process, source, "volume", self.state.step + steps, self.train_cfg, on_step)
        self.model.eval()
        return result["loss"]

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
        model = self.ema.eval()
        device = next(model.parameters()).device
        outputs: list[np.ndarray | None] = [None] * len(masks)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for index, mask in enumerate(masks):
            groups.setdefault(_padded_shape(mask.shape), []).append(index)
        batch = self.cfg.sampler.batch_volumes
        chunks = [(shape, m[i : i + batch]) for shape, m in groups.items() for i in range(0, len(m), batch)]
        for shape, members in chunks:
            labels = torch.stack([_pad(torch.from_numpy(masks[i].astype(np.int64)), shape, 0) for i in members])
            cond = model.condition(labels.to(device), torch.empty(0), torch.empty(0))
            generators = [torch.Generator().manual_seed(int(seeds[i])) for i in members]
            x = seeded_noise(generators, (1, *shape), device)
            for step, t in enumerate(sampler.timesteps):
                timesteps = torch.full((len(members),), t, dtype=torch.long, device=device)
                noise = seeded_noise(generators, (1, *shape), device) if sampler.stochastic else None
                x = sampler.step(model(x, timesteps, cond), step, x, noise)
            for row, i in enumerate(members):
                d, h, w = masks[i].shape
                outputs[i] = x[row, 0, :d, :h, :w].clamp(-1, 1).cpu().numpy().astype(np.float32)
        return [volume for volume in outputs if volume is not None]

    def save(self, path: str | Path, volumes: Sequence[Volume]) -> Path:
        """Checkpoint the sampled (EMA) network (safetensors + JSON metadata: config, steps, channels,
        data fingerprint)."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        metadata: dict[str, Any] = {
            "stage": "full_3d",
            "step": self.step,
            "channels": list(self.channels),
            "config": self.cfg.model_dump(mode="json"),
            "data_fingerprint": fingerprint(list(volumes)),
        }
        return save_checkpoint(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> Full3D:
        """A model saved by ``save`` (its sampled weights), on ``device`` (default: its config's
        ``train.device``); a clear ``CheckpointError`` for anything else."""
        tensors, metadata = load_checkpoint(path)
        if metadata.get("stage") != "full_3d":
            raise CheckpointError(f"{path}: is not a full-3D baseline checkpoint")
        model = cls(config_from_dict(metadata["config"], f"{path} (embedded config)"), metadata["channels"], device)
        for net in (model.model.net, model.net):
            net.load_state_dict(tensors)
        model.state.step = int(metadata["step"])
        model.model.eval()
        return model
