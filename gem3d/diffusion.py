"""The forward noising process (training) and the samplers that reverse it, built from config.

Two processes are offered (``diffusion.process``):

* ``ddpm``: x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, with ᾱ from MONAI's ``DDPMScheduler`` for the
  configured beta schedule; the network predicts ε, v or x0 (``prediction_type``); sampled
  with DDIM (``eta`` 0 is deterministic).
* ``rflow``: rectified flow in MONAI's ``RFlowScheduler`` convention, x_t = (1 - t/T) x0 + (t/T) ε;
  the network predicts the velocity v = x0 - ε; sampled with Euler steps.

The sampler is right by construction: the update at step i lands exactly on the noise level of
the timestep the network is called with at step i+1 (and on the clean level after the last),
for any number of steps. MONAI 1.6.1's ``DDIMScheduler`` does not: it spaces timesteps with
``linspace(T-1, 0, N)`` but steps to ``t - T // N``, up to 11 indices off at 10 steps, and the
last update leaves noise of ᾱ[11] while the network is told t = 0 (issue 18). The DDIM update
here is improved-diffusion's (``respace.py`` + ``ddim_sample``): the chosen timesteps define the
respaced chain, x0 is clipped to [-1, 1] and ε is recomputed from the clipped x0.

The schedule lives here, never in a network's state: a federated average or DP noise must not
touch betas (STYLE.md, convention 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import DDPMScheduler

from gem3d.config import DiffusionConfig
from gem3d.errors import ConfigError


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (shape of the timesteps, the leading dims of ``like``) with singleton trailing dims."""
    return values.to(like.device, like.dtype).reshape(*values.shape, *([1] * (like.ndim - values.ndim)))


def alphas_cumprod(cfg: DiffusionConfig) -> torch.Tensor:
    """``[T]`` ᾱ_t of the configured beta schedule (MONAI's ``DDPMScheduler``), float64."""
    args: dict[str, Any] = {} if cfg.schedule == "cosine" else {"beta_start": cfg.beta_start, "beta_end": cfg.beta_end}
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule, **args)
    return scheduler.alphas_cumprod.to(torch.float64)


@dataclass(frozen=True)
class NoiseProcess:
    """The forward process: how training noises a clean sample and what the network must predict.

    Timesteps ``t`` are integers 0..T-1 with the shape of the leading dims of the samples
    (``[B]`` for ``[B, ...]``, or ``[B, D]`` for ``[B, D, ...]``).
    """

    cfg: DiffusionConfig
    alphas_cumprod: torch.Tensor  # [T] (ddpm); unused by rflow
    # the schedule on each device it was asked on: copied once, so a step never waits for a copy
    _on_device: dict[torch.device, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at timesteps ``t`` (same shape, float64, on ``t``'s device)."""
        table = self._on_device.get(t.device)
        if table is None:
            table = self._on_device[t.device] = self.alphas_cumprod.to(t.device)
        return table[t]

    @property
    def num_train_timesteps(self) -> int:
        return self.cfg.num_train_timesteps

    def draw_timesteps(self, shape: tuple[int, ...], generator: torch.Generator, power: float = 1.0) -> torch.Tensor:
        """Timesteps ``T * u**power``, u ~ U[0, 1) on ``generator``'s device; power 1 is uniform over 0..T-1."""
        steps = self.num_train_timesteps
        u = torch.rand(shape, generator=generator, device=generator.device)
        return (steps * u**power).long().clamp(max=steps - 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t for clean ``x0`` and unit Gaussian ``noise`` (same shape) at timesteps ``t``."""
        if self.cfg.process == "rflow":
            s = _expand(t.double() / self.num_train_timesteps, x0)
            return (1 - s) * x0 + s * noise
        abar = _expand(self.abar(t), x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to predict at x_t = ``add_noise(x0, noise, t)``."""
        if self.cfg.process == "rflow":
            return x0 - noise
        kind = self.cfg.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "sample":
            return x0
        abar = _expand(self.abar(t), x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0  # v

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-timestep loss weights (the shape of ``t``), or None for the plain mean squared error.

        ``min_snr``: Hang et al. 2023, weight min(SNR, γ) / SNR for ε, min(SNR, γ) / (SNR + 1) for v,
        min(SNR, γ) for x0, with SNR = ᾱ / (1 - ᾱ).
        """
        if self.cfg.loss_weighting == "uniform":
            return None
        abar = self.abar(t)
        snr = abar / (1 - abar)
        clipped = snr.clamp(max=self.cfg.min_snr_gamma)
        kind = self.cfg.prediction_type
        weight = clipped / snr if kind == "epsilon" else clipped / (snr + 1) if kind == "v_prediction" else clipped
        return weight.float()


def noise_process(cfg: DiffusionConfig) -> NoiseProcess:
    """The configured forward process."""
    return NoiseProcess(cfg, alphas_cumprod(cfg))


def sample_timesteps(cfg: DiffusionConfig, steps: int) -> tuple[int, ...]:
    """The ``steps`` timesteps the network is called at, descending.

    ddpm: ``linspace(T-1, 0, N)`` rounded (the spacing of MONAI 1.6's DDIM); rflow: MONAI's
    ``RFlowScheduler`` spacing ``(1 - i/N) T`` for i = 0..N-1.
    """
    total = cfg.num_train_timesteps
    if cfg.process == "rflow":
        return tuple(round((1.0 - i / steps) * total) for i in range(steps))
    spaced = np.round(np.linspace(total - 1, 0, steps)).astype(int)
    return tuple(int(t) for t in spaced)


@dataclass(frozen=True)
class Sampler:
    """A reverse process over fixed timesteps: ``x = noisy(...)`` or pure noise, then ``step`` per timestep.

    Attributes:
        process: the forward process the network was trained with.
        timesteps: where the network is called, descending; step i moves the state from the noise
            level of ``timesteps[i]`` to that of ``timesteps[i+1]`` (the clean level after the last).
        eta: DDIM stochasticity (ddpm only): 0 is deterministic, 1 is DDPM-like.
    """

    process: NoiseProcess
    timesteps: tuple[int, ...]
    eta: float = 0.0

    @property
    def stochastic(self) -> bool:
        """Whether ``step`` needs fresh noise."""
        return self.process.cfg.process == "ddpm" and self.eta > 0

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """``x0`` noised to the level of ``timesteps[index]`` (replacement inpainting)."""
        t = torch.full(x0.shape[:1], self.timesteps[index], dtype=torch.long, device=x0.device)
        return self.process.add_noise(x0, noise, t)

    def _abar(self, index: int) -> float:
        if index >= len(self.timesteps):
            return 1.0
        return float(self.process.alphas_cumprod[self.timesteps[index]])

    def step(
        self, output: torch.Tensor, index: int, x: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The state at the noise level of ``timesteps[index + 1]`` (clean after the last step).

        Args:
            output: the network's prediction at ``x`` and ``timesteps[index]``; x: the current state.
            noise: unit Gaussian like ``x``, required when ``stochastic`` (drawn by the caller from
                each volume's own generator, so a volume's output does not depend on its batch-mates).
        """
        if self.process.cfg.process == "rflow":
            total = self.process.num_train_timesteps
            following = self.timesteps[index + 1] if index + 1 < len(self.timesteps) else 0
            return x + output * ((self.timesteps[index] - following) / total)
        abar, abar_next = self._abar(index), self._abar(index + 1)
        x0, _ = self._split(output, x, abar)
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x - abar**0.5 * x0) / (1 - abar) ** 0.5
        sigma = self.eta * ((1 - abar_next) / (1 - abar) * (1 - abar / abar_next)) ** 0.5
        out = abar_next**0.5 * x0 + max(1 - abar_next - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            if noise is None:
                raise ValueError("a stochastic DDIM step (eta > 0) needs noise")
            out = out + sigma * noise
        return out

    def _split(self, output: torch.Tensor, x: torch.Tensor, abar: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, ε) predicted from the network's output at a state of level ``abar``."""
        kind = self.process.cfg.prediction_type
        a, b = abar**0.5, (1 - abar) ** 0.5
        if kind == "epsilon":
            return (x - b * output) / a, output
        if kind == "sample":
            return output, (x - a * output) / b
        return a * x - b * output, a * output + b * x  # v


def make_sampler(cfg: DiffusionConfig, steps: int | None = None) -> Sampler:
    """The configured sampler over ``steps`` (default ``cfg.inference_steps``)."""
    count = cfg.inference_steps if steps is None else steps
    if not 1 <= count <= cfg.num_train_timesteps:
        raise ConfigError(
            f"--steps {count}: expected 1..{cfg.num_train_timesteps} (the run's diffusion.num_train_timesteps)"
        )
    return Sampler(noise_process(cfg), sample_timesteps(cfg, count), cfg.eta)
