"""The bi-directional overlapped sampler, tested with denoisers that know the answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gem3d.config import DiffusionConfig, ModelConfig
from gem3d.diffusion import Sampler, make_sampler
from gem3d.networks import WindowDenoiser, build_condition
from gem3d.sampler import InformedSlice, SampleRequest, plan_windows, sample_volumes

SIZE = 4


class OracleDenoiser(WindowDenoiser):
    """Predicts the noise that leads each window to ``clean + offset(window)``.

    The mask of slice z is the label z + 1 everywhere, so the one-hot condition tells the oracle
    each slice's absolute position. ``offset`` of a window is a function of its first slice, so a
    test can tell which window produced which slice.
    """

    def __init__(self, clean: torch.Tensor, sampler: Sampler, window_offsets: bool = False) -> None:
        super().__init__()
        self.num_labels = clean.shape[0] + 1
        self.cfg = ModelConfig(mask_encoding="onehot", informed_mask=False)
        self.codec, self.image_channels, self.factor = None, 1, 1  # a pixel-space denoiser
        self.clean = clean  # [D, H, W]
        self.alphas = sampler.process.alphas_cumprod.float()
        self.window_offsets = window_offsets
        self.anchor = nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def condition(self, mask: torch.Tensor, informed: torch.Tensor, informed_mask: torch.Tensor) -> torch.Tensor:
        return build_condition(mask, informed, informed_mask, self.num_labels, self.cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        positions = cond[:, : self.num_labels - 1].argmax(dim=1)[:, :, 0, 0]  # [N, L]
        target = self.clean[positions].unsqueeze(1)  # [N, 1, L, H, W]
        if self.window_offsets:
            target = target + 0.01 * positions[:, :1, None, None].unsqueeze(1)
        self.calls.append((int(t[0]), x.clone(), positions.clone()))
        alpha = self.alphas[t].view(-1, 1, 1, 1, 1)
        return (x - alpha.sqrt() * target) / (1 - alpha).sqrt()


def _requests(depth: int, start: int, seed: int = 0) -> list[SampleRequest]:
    mask = np.repeat(np.arange(1, depth + 1, dtype=np.uint8)[:, None, None], SIZE, 1).repeat(SIZE, 2)
    informed = InformedSlice(np.zeros((SIZE, SIZE), np.float32), None, "file")
    return [SampleRequest(mask=mask, informed=informed, start=start, seed=seed)]


def _clean(depth: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(depth)
    return (torch.rand((depth, SIZE, SIZE), generator=g) * 1.6 - 0.8).float()


@pytest.mark.parametrize(
    ("depth", "window", "overlap", "start"),
    [
        (1, 4, 1, 0),
        (3, 4, 1, 1),
        (4, 4, 2, 0),
        (10, 4, 1, 5),
        (11, 4, 2, 0),
        (11, 4, 2, 10),
        (17, 5, 2, 7),
        (9, 3, 1, 4),
    ],
)
def test_oracle_denoiser_reproduces_the_volume(depth: int, window: int, overlap: int, start: int) -> None:
    sampler = make_sampler(DiffusionConfig(), steps=8)
    clean = _clean(depth)
    oracle = OracleDenoiser(clean, sampler)

    (volume,) = sample_volumes(oracle, sampler, _requests(depth, start), window, overlap)  # type: ignore[arg-type]

    np.testing.assert_allclose(volume, clean.numpy(), atol=1e-4)


@pytest.mark.parametrize(
    ("depth", "window", "overlap", "start"), [(10, 4, 1, 5), (13, 5, 2, 0), (12, 4, 3, 11), (7, 4, 2, 3)]
)
def test_every_slice_comes_from_its_first_window_and_carried_slices_are_kept(
    depth: int, window: int, overlap: int, start: int
) -> None:
    sampler = make_sampler(DiffusionConfig(), steps=6)
    clean = _clean(depth)
    oracle = OracleDenoiser(clean, sampler, window_offsets=True)
    expected = clean.clone()
    for round_ in plan_windows(depth, start, window, overlap):
        for w in round_:
            for z in range(w.start, w.stop):
                if z not in w.carried:
                    expected[z] += 0.01 * w.start

    (volume,) = sample_volumes(oracle, sampler, _requests(depth, start), window, overlap)  # type: ignore[arg-type]

    np.testing.assert_allclose(volume, expected.numpy(), atol=1e-4)


def test_carried_slices_are_noised_to_each_steps_own_timestep() -> None:
    depth, window, overlap = 12, 4, 2
    sampler = make_sampler(DiffusionConfig(), steps=10)
    clean = _clean(depth)
    oracle = OracleDenoiser(clean, sampler)
    plan = plan_windows(depth, 0, window, overlap)

    sample_volumes(oracle, sampler, _requests(depth, 0), window, overlap)  # type: ignore[arg-type]

    later_calls = oracle.calls[len(sampler.timesteps) :]  # windows after the first carry slices
    assert len(later_calls) == len(sampler.timesteps) * (len(plan) - 1)
    standardised = []
    for t, x, positions in later_calls:
        alpha = float(sampler.process.alphas_cumprod[t])
        carried = x[0, 0, :overlap]  # upward windows carry their first h slices
        truth = clean[positions[0, :overlap]]
        standardised.append(((carried - math.sqrt(alpha) * truth) / math.sqrt(1 - alpha)).flatten())
    z = torch.cat(standardised)
    assert abs(float(z.mean())) < 0.2
    assert 0.8 < float(z.std()) < 1.2  # N(0, 1): the noise level of this step's timestep


@pytest.mark.parametrize(
    ("depth", "window", "overlap"), [(1, 8, 2), (5, 8, 2), (8, 8, 2), (9, 8, 2), (64, 16, 1), (37, 8, 3)]
)
@pytest.mark.parametrize("start_fraction", [0.0, 0.5, 1.0])
def test_plan_covers_every_slice_once_and_aligns_the_last_windows(
    depth: int, window: int, overlap: int, start_fraction: float
) -> None:
    start = round(start_fraction * (depth - 1))

    rounds = plan_windows(depth, start, window, overlap)

    generated: list[int] = []
    for round_ in rounds:
        for w in round_:
            assert w.start >= 0 and w.stop <= depth and w.length == min(window, depth)
            assert set(w.carried) <= set(generated)
            generated += [z for z in range(w.start, w.stop) if z not in w.carried]
    assert sorted(generated) == list(range(depth))
    first = rounds[0][0]
    assert first.start <= start < first.stop
    later = [w for round_ in rounds[1:] for w in round_]
    assert all(len(w.carried) >= min(overlap, window - 1) for w in later)
    if later:
        assert max(w.stop for w in later) == depth or first.stop == depth
        assert min(w.start for w in later) == 0 or first.start == 0


def test_same_seed_same_bytes_and_batching_many_volumes() -> None:
    from gem3d.networks import SliceDenoiser

    torch.manual_seed(0)
    model = SliceDenoiser(
        ModelConfig(channels=(8, 16), attention_levels=(False, True), norm_num_groups=4, num_head_channels=8), 4
    )
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    model.inflate()
    sampler = make_sampler(DiffusionConfig(), steps=3)
    rng = np.random.default_rng(0)
    requests = [
        SampleRequest(
            mask=rng.integers(0, 4, (depth, 16, 16)).astype(np.uint8),
            informed=InformedSlice(rng.uniform(-1, 1, (16, 16)).astype(np.float32), None, "file"),
            start=depth // 2,
            seed=seed,
        )
        for depth, seed in [(9, 1), (3, 2), (12, 3)]
    ]
    progress: list[tuple[int, int, int]] = []

    first = sample_volumes(
        model.eval(), sampler, requests, 4, 1, batch_volumes=2, on_progress=lambda *a: progress.append(a)
    )
    second = sample_volumes(model.eval(), sampler, requests, 4, 1, batch_volumes=3)
    other_seed = sample_volumes(
        model.eval(), sampler, [requests[0].__class__(**{**requests[0].__dict__, "seed": 9})], 4, 1
    )

    assert [v.shape for v in first] == [(9, 16, 16), (3, 16, 16), (12, 16, 16)]
    assert all(
        a.tobytes() == b.tobytes()
        for a, b in zip(first, sample_volumes(model.eval(), sampler, requests, 4, 1, batch_volumes=2), strict=True)
    )
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(first, second, strict=True))
    assert not np.allclose(first[0], other_seed[0])
    assert {p[0] for p in progress} == {0, 1, 2}
    assert all(done == total for i, done, total in progress if (i, done + 1, total) not in progress)
