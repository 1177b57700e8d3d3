"""The noising processes and samplers: every state the network sees sits at the level it is told.

An oracle knows the clean sample x0 and returns the exact prediction (ε, v, x0 or the flow's
velocity) for whatever state it is handed. Each state handed to it is then standardised with the
noise level of the timestep it is called with, (x - a_t x0) / b_t: for a right sampler this is
the initial noise itself (deterministic samplers) or unit Gaussian noise (DDIM with eta > 0).
MONAI 1.6.1's ``DDIMScheduler`` fails this at 10 steps (its update lands on t - T // N, not on
the next timestep it hands the network).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from torch import nn

from gem3d.config import DiffusionConfig, InformedModelConfig
from gem3d.diffusion import Sampler, make_sampler, noise_process
from gem3d.networks import InformedSliceGenerator, WindowDenoiser
from gem3d.sampler import InformedSlice, SampleRequest, generate_informed_slices, sample_volumes

SHAPE = (4, 1, 24, 24)  # [N, 1, H, W]

CONFIGS = {
    "ddpm-epsilon": DiffusionConfig(),
    "ddpm-v": DiffusionConfig(prediction_type="v_prediction"),
    "ddpm-sample": DiffusionConfig(prediction_type="sample"),
    "ddpm-cosine-v": DiffusionConfig(schedule="cosine", prediction_type="v_prediction"),
    "rflow": DiffusionConfig(process="rflow", prediction_type="v_prediction"),
}


def _levels(cfg: DiffusionConfig, t: int) -> tuple[float, float]:
    """(a_t, b_t) with x_t = a_t x0 + b_t ε, computed from MONAI's own schedules."""
    if cfg.process == "rflow":
        s = t / cfg.num_train_timesteps
        return 1 - s, s
    args = {} if cfg.schedule == "cosine" else {"beta_start": cfg.beta_start, "beta_end": cfg.beta_end}
    abar = float(
        DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule, **args).alphas_cumprod[t]
    )
    return abar**0.5, (1 - abar) ** 0.5


class Oracle:
    """The exact prediction for clean ``x0`` at any state; records what it was handed."""

    def __init__(self, cfg: DiffusionConfig, x0: torch.Tensor) -> None:
        self.cfg, self.x0 = cfg, x0
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        self.calls.append((t, x.clone()))
        a, b = _levels(self.cfg, t)
        eps = (x - a * self.x0) / b
        if self.cfg.process == "rflow":
            return self.x0 - eps
        if self.cfg.prediction_type == "epsilon":
            return eps
        if self.cfg.prediction_type == "sample":
            return self.x0
        return a * eps - b * self.x0


def _x0() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(SHAPE, generator=g) * 1.6 - 0.8


def _run(sampler: Sampler, oracle: Oracle, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    for index, t in enumerate(sampler.timesteps):
        noise = torch.randn(SHAPE, generator=g) if sampler.stochastic else None
        x = sampler.step(oracle(x, t), index, x, noise)
    return x


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("steps", [1, 3, 7, 10, 50])
def test_every_state_has_the_noise_level_of_its_timestep(name: str, steps: int) -> None:
    cfg = CONFIGS[name]
    sampler = make_sampler(cfg, steps)
    x0 = _x0()
    oracle = Oracle(cfg, x0)

    out = _run(sampler, oracle)

    assert [t for t, _ in oracle.calls] == list(sampler.timesteps)
    assert len(set(sampler.timesteps)) == steps and list(sampler.timesteps) == sorted(sampler.timesteps, reverse=True)
    standardised = [(x - _levels(cfg, t)[0] * x0) / _levels(cfg, t)[1] for t, x in oracle.calls]
    for z in standardised[1:]:  # the noise implied at the first step is carried, unchanged, to every level
        torch.testing.assert_close(z, standardised[0], atol=2e-4, rtol=0)
    torch.testing.assert_close(out, x0, atol=2e-4, rtol=0)  # the last update lands on the clean level


@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_with_eta_keeps_unit_noise_at_every_level(steps: int) -> None:
    cfg = DiffusionConfig(eta=1.0)
    sampler = make_sampler(cfg, steps)
    x0 = _x0().repeat(8, 1, 1, 1)  # enough pixels for the standard deviation to be tight
    oracle = Oracle(cfg, x0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x0.shape, generator=g)
    for index, t in enumerate(sampler.timesteps):
        x = sampler.step(oracle(x, t), index, x, torch.randn(x0.shape, generator=g))

    for t, state in oracle.calls[1:]:
        a, b = _levels(cfg, t)
        z = (state - a * x0) / b
        assert abs(float(z.mean())) < 0.03 and 0.97 < float(z.std()) < 1.03, t
    assert sampler.stochastic
    torch.testing.assert_close(x, x0, atol=2e-4, rtol=0)


def test_monai_ddim_at_ten_steps_misses_the_next_level() -> None:
    """The bug this module exists for; if a MONAI release fixes it, this test says so."""
    cfg = DiffusionConfig()
    monai = DDIMScheduler(
        num_train_timesteps=1000, schedule=cfg.schedule, beta_start=cfg.beta_start, beta_end=cfg.beta_end
    )
    monai.set_timesteps(10)
    x0 = _x0()
    oracle = Oracle(cfg, x0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in monai.timesteps:
        x, _ = monai.step(oracle(x, int(t)), int(t), x)
    standardised = [(x - _levels(cfg, t)[0] * x0) / _levels(cfg, t)[1] for t, x in oracle.calls]
    worst = max(float((z - standardised[0]).abs().max()) for z in standardised[1:])
    assert worst > 0.01


def test_noising_matches_monai_for_both_processes() -> None:
    x0, noise = _x0(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 17, 500, 999])
    ddpm_cfg = DiffusionConfig(prediction_type="v_prediction")
    monai = DDPMScheduler(
        num_train_timesteps=1000,
        schedule=ddpm_cfg.schedule,
        beta_start=ddpm_cfg.beta_start,
        beta_end=ddpm_cfg.beta_end,
        prediction_type="v_prediction",
    )
    ours = noise_process(ddpm_cfg)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), monai.add_noise(x0, noise, t))
    torch.testing.assert_close(ours.target(x0, noise, t), monai.get_velocity(x0, noise, t))

    flow = noise_process(CONFIGS["rflow"])
    reference = RFlowScheduler(num_train_timesteps=1000)
    torch.testing.assert_close(flow.add_noise(x0, noise, t), reference.add_noise(x0, noise, t))
    reference.set_timesteps(8)
    sampler = make_sampler(CONFIGS["rflow"], 8)
    assert list(sampler.timesteps) == [int(t) for t in reference.timesteps]
    v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    nexts = [*sampler.timesteps[1:], 0]
    for index, (t_now, t_next) in enumerate(zip(sampler.timesteps, nexts, strict=True)):
        expected, _ = reference.step(v, t_now, x0, t_next)
        torch.testing.assert_close(sampler.step(v, index, x0), expected)


def test_per_timestep_timesteps_broadcast_over_leading_dims() -> None:
    process = noise_process(DiffusionConfig())
    x0 = _x0().reshape(2, 2, 1, 24, 24)  # [B, D, 1, H, W] with a timestep per slice
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([[0, 999], [400, 7]])
    noisy = process.add_noise(x0, noise, t)
    for b in range(2):
        for d in range(2):
            a, s = _levels(DiffusionConfig(), int(t[b, d]))
            torch.testing.assert_close(noisy[b, d], a * x0[b, d] + s * noise[b, d])


def test_min_snr_weights_follow_the_prediction_type() -> None:
    t = torch.tensor([0, 100, 500, 999])
    for kind, expected in [
        ("epsilon", lambda snr: np.minimum(snr, 5) / snr),
        ("v_prediction", lambda snr: np.minimum(snr, 5) / (snr + 1)),
        ("sample", lambda snr: np.minimum(snr, 5)),
    ]:
        cfg = DiffusionConfig(prediction_type=kind, loss_weighting="min_snr")
        a, b = zip(*[_levels(cfg, int(s)) for s in t], strict=True)
        snr = np.array(a) ** 2 / np.array(b) ** 2
        weight = noise_process(cfg).loss_weight(t)
        assert weight is not None
        np.testing.assert_allclose(weight.numpy(), expected(snr), rtol=1e-4)
    assert noise_process(DiffusionConfig()).loss_weight(t) is None


class _Echo(WindowDenoiser):
    """A window denoiser whose output depends on its state only: noise passes straight through."""

    num_labels = 2
    codec, image_channels, factor = None, 1, 1  # a pixel-space denoiser

    def __init__(self) -> None:
        super().__init__()
        from gem3d.config import ModelConfig

        self.cfg = ModelConfig(mask_encoding="onehot", informed_mask=False)
        self.anchor = nn.Parameter(torch.zeros(1))

    def condition(self, mask: torch.Tensor, informed: torch.Tensor, informed_mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros(mask.shape[0], 1, *mask.shape[1:])  # [B, 1, D, H, W], unused

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return 0.5 * x


def test_stochastic_volumes_do_not_depend_on_their_batch_mates() -> None:
    sampler = make_sampler(DiffusionConfig(eta=1.0), 6)
    mask = np.ones((6, 8, 8), np.uint8)
    informed = InformedSlice(np.zeros((8, 8), np.float32), None, "file")
    requests = [SampleRequest(mask, informed, 2, seed) for seed in (11, 12, 13)]
    model = _Echo()

    together = sample_volumes(model, sampler, requests, 4, 1, batch_volumes=3)  # type: ignore[arg-type]
    alone = [sample_volumes(model, sampler, [r], 4, 1)[0] for r in requests]  # type: ignore[arg-type]
    deterministic = sample_volumes(model, make_sampler(DiffusionConfig(), 6), requests[:1], 4, 1)  # type: ignore[arg-type]

    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(together[0], together[1])
    assert not np.allclose(alone[0], deterministic[0])  # eta > 0 did add noise


def test_the_informed_slice_generator_honours_eta() -> None:
    torch.manual_seed(0)
    model = InformedSliceGenerator(
        InformedModelConfig(channels=(8, 16), attention_levels=(False, False), norm_num_groups=4, num_head_channels=8),
        3,
        "onehot",
    ).eval()
    masks = [np.zeros((8, 8), np.int64), np.ones((8, 8), np.int64)]
    deterministic = generate_informed_slices(
        model, make_sampler(DiffusionConfig(), 4), [0.2, 0.7], masks, [1, 2], (8, 8)
    )
    stochastic = make_sampler(DiffusionConfig(eta=1.0), 4)
    both = generate_informed_slices(model, stochastic, [0.2, 0.7], masks, [1, 2], (8, 8))
    second_alone = generate_informed_slices(model, stochastic, [0.7], masks[1:], [2], (8, 8))

    assert not np.allclose(deterministic[0], both[0])
    np.testing.assert_allclose(both[1], second_alone[0], atol=1e-5)
