"""Appearance augmentation (train.appearance_log_gamma): a contrast curve per window, shared with its informed slice."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gem3d.config import Config, TrainConfig
from gem3d.data.dataset import load_volumes
from gem3d.data.windows import WindowSource, with_contrast_curves
from gem3d.diffusion import noise_process
from gem3d.runs import build_model
from gem3d.training import draw_inputs


@pytest.fixture
def source(phantom_dir: Path, micro_cfg: Config) -> WindowSource:
    return WindowSource(load_volumes(phantom_dir, micro_cfg.data), micro_cfg.data.window, "window")


def test_a_window_and_its_informed_slice_get_the_same_curve(source: WindowSource) -> None:
    batch = source.windows([0, 1, 2, 0, 1, 2], torch.Generator().manual_seed(0))

    augmented = with_contrast_curves(batch, 0.7, torch.Generator().manual_seed(1))

    for b in range(len(batch)):
        inside = int(batch.informed_index[b] - batch.start[b])  # informed_from="window": a slice of the window
        assert torch.equal(batch.image[b, 0, inside], batch.informed[b])
        assert torch.allclose(augmented.image[b, 0, inside], augmented.informed[b])
    assert torch.equal(augmented.mask, batch.mask) and torch.equal(augmented.informed_mask, batch.informed_mask)


def test_each_window_gets_its_own_monotone_curve_that_keeps_the_ends(source: WindowSource) -> None:
    ramp = torch.linspace(-1, 1, 101)
    batch = source.windows([0, 1, 2, 0], torch.Generator().manual_seed(0))
    ramped = type(batch)(
        image=ramp.expand(len(batch), 1, 1, 1, 101).clone(),
        mask=batch.mask,
        informed=ramp.expand(len(batch), 1, 101).clone(),
        informed_mask=batch.informed_mask,
        start=batch.start,
        informed_index=batch.informed_index,
    )
    a = 0.5

    out = with_contrast_curves(ramped, a, torch.Generator().manual_seed(3)).image[:, 0, 0, 0]  # [B, 101]

    assert torch.allclose(out[:, 0], torch.full((len(batch),), -1.0))
    assert torch.allclose(out[:, -1], torch.ones(len(batch)))
    assert bool((out.diff(dim=1) >= 0).all())  # monotone: the label order of intensities survives
    # The mid-grey 0 maps to 2 * 0.5 ** g - 1; g = log2(2 / (out + 1)) recovers each window's gamma.
    gammas = torch.log2(2 / (out[:, 50] + 1))
    assert bool((gammas.log().abs() <= a + 1e-6).all())
    assert len({round(float(g), 4) for g in gammas}) == len(batch)


def test_off_by_default_and_only_where_training_asks(source: WindowSource, micro_cfg: Config) -> None:
    model = build_model("slice", micro_cfg)
    process = noise_process(micro_cfg.diffusion)
    on = micro_cfg.train.model_copy(update={"appearance_log_gamma": 0.8})

    def clean(cfg_train: TrainConfig, augment: bool) -> torch.Tensor:
        """The noisy window and its condition (mask and informed slice), flattened side by side."""
        generator = torch.Generator().manual_seed(5)
        inputs = draw_inputs(
            model, process, source, [0, 1], "slice", generator, cfg_train, torch.device("cpu"), augment=augment
        )
        assert inputs.cond is not None
        return torch.cat([inputs.noisy.flatten(), inputs.cond.flatten()])

    assert micro_cfg.train.appearance_log_gamma == 0
    assert torch.equal(
        clean(micro_cfg.train, True), clean(micro_cfg.train, False)
    )  # a = 0: nothing drawn, nothing changed
    assert torch.equal(clean(on, False), clean(micro_cfg.train, False))  # validation and the audit: unaugmented
    assert not torch.equal(clean(on, True), clean(on, False))


def test_the_curve_range_is_validated(micro_cfg: Config) -> None:
    fields = micro_cfg.train.model_dump()
    for bad in (-0.1, 2.5):
        with pytest.raises(ValueError, match="appearance_log_gamma"):
            TrainConfig.model_validate({**fields, "appearance_log_gamma": bad})
    assert math.isclose(TrainConfig.model_validate({**fields, "appearance_log_gamma": 1.0}).appearance_log_gamma, 1.0)


def test_a_mask_only_model_is_not_augmented(source: WindowSource, micro_cfg: Config) -> None:
    cfg = micro_cfg.model_copy(update={"model": micro_cfg.model.model_copy(update={"informed_slice": False})})
    model = build_model("slice", cfg)
    process = noise_process(cfg.diffusion)
    on = cfg.train.model_copy(update={"appearance_log_gamma": 0.8})

    def noisy(augment: bool) -> torch.Tensor:
        generator = torch.Generator().manual_seed(5)
        return draw_inputs(
            model, process, source, [0, 1], "slice", generator, on, torch.device("cpu"), augment=augment
        ).noisy

    assert torch.equal(noisy(True), noisy(False))
