"""Fidelity, appearance and diversity metrics on volumes whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from experiments.evaluation import (
    fidelity,
    foreground_box,
    label_intensity_error,
    ms_ssim,
    ms_ssim_settings,
    pairwise_similarity,
    psnr,
    ssim,
)
from gem3d.data.phantoms import make_phantom


def _phantom(shape: tuple[int, int, int] = (32, 32, 32), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    image, label = make_phantom(shape, 4, seed)
    return (image / np.abs(image).max()).astype(np.float32), label


@pytest.mark.parametrize("shape", [(16, 32, 32), (32, 32, 32)])
def test_identical_volumes_are_perfect(shape: tuple[int, int, int]) -> None:
    # prepare
    image, label = _phantom(shape)

    # execute
    report = fidelity(image, torch.from_numpy(image.copy()), label)

    # assert
    assert report["psnr"] == math.inf and report["psnr_foreground"] == math.inf
    for key in ("ssim", "ms_ssim", "ssim_foreground", "ms_ssim_foreground"):
        assert report[key] == pytest.approx(1.0, abs=1e-5), key


def test_psnr_matches_its_definition_and_restricts_to_the_foreground() -> None:
    # prepare: error 0.2 everywhere in the background, none in the foreground
    target = np.zeros((16, 16, 16), np.float32)
    label = np.zeros((16, 16, 16), np.uint8)
    label[4:12, 4:12, 4:12] = 1
    prediction = np.where(label > 0, 0.0, 0.2).astype(np.float32)
    expected = 20 * math.log10(2.0) - 10 * math.log10(0.04 * (1 - 8**3 / 16**3))

    # execute
    whole = psnr(prediction, target)
    foreground = psnr(prediction, target, label)

    # assert
    assert whole == pytest.approx(expected, abs=1e-3)
    assert foreground == math.inf
    assert math.isnan(psnr(prediction, target, np.zeros_like(label)))


def test_ssim_and_ms_ssim_fall_with_noise() -> None:
    # prepare
    image, label = _phantom()
    generator = np.random.default_rng(0)
    slightly = image + 0.05 * generator.standard_normal(image.shape).astype(np.float32)
    very = image + 0.5 * generator.standard_normal(image.shape).astype(np.float32)

    # execute
    ssims = [ssim(slightly, image), ssim(very, image)]
    ms_ssims = [ms_ssim(slightly, image), ms_ssim(very, image)]
    foreground = [ssim(slightly, image, label), ssim(very, image, label)]

    # assert
    assert 1.0 > ssims[0] > ssims[1]
    assert 1.0 > ms_ssims[0] > ms_ssims[1]
    assert 1.0 > foreground[0] > foreground[1]


@pytest.mark.parametrize(
    ("shape", "kernel", "scales"),
    [((256, 256, 256), 11, 5), ((32, 32, 32), 7, 3), ((16, 32, 32), 7, 2), ((12, 64, 64), 5, 2)],
)
def test_ms_ssim_scales_fit_small_volumes(shape: tuple[int, int, int], kernel: int, scales: int) -> None:
    # execute
    chosen_kernel, weights = ms_ssim_settings(shape)

    # assert
    assert (chosen_kernel, len(weights)) == (kernel, scales)
    assert sum(weights) == pytest.approx(1.0)


def test_ms_ssim_refuses_volumes_too_small_for_two_scales() -> None:
    # execute / assert
    with pytest.raises(ValueError, match="MS-SSIM"):
        ms_ssim_settings((8, 32, 32))


def test_foreground_box_grows_to_the_window_inside_the_volume() -> None:
    # prepare
    mask = torch.zeros(20, 20, 20)
    mask[0:2, 9:11, 18:20] = 1

    # execute
    box = foreground_box(mask, min_size=11)

    # assert
    assert box == (slice(0, 11), slice(5, 16), slice(9, 20))
    assert foreground_box(torch.zeros(4, 4, 4)) is None


def test_shape_mismatch_is_refused() -> None:
    # execute / assert
    with pytest.raises(ValueError, match="differs"):
        psnr(np.zeros((8, 8, 8)), np.zeros((8, 8, 9)))


def test_per_label_mean_intensity_error_is_exact() -> None:
    # prepare: label 1 is 0.1 too bright, label 2 is 0.3 too dark, background right; add
    # zero-mean texture inside each label so only the means agree, not the voxels
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:6, 2:6, 2:6] = 1
    label[3:5, 3:5, 3:5] = 2
    target = np.choose(label, [-1.0, 0.2, 0.6]).astype(np.float64)
    texture = np.where(np.indices(label.shape).sum(axis=0) % 2 == 0, 0.05, -0.05)
    prediction = target + np.choose(label, [0.0, 0.1, -0.3]) + texture

    # execute
    report = label_intensity_error(prediction, target, label)

    # assert
    assert report["per_label"] == pytest.approx({"0": 0.0, "1": 0.1, "2": 0.3}, abs=1e-6)
    assert report["foreground_mean"] == pytest.approx(0.2, abs=1e-6)
    assert report["background"] == pytest.approx(0.0, abs=1e-6)


def test_diversity_of_copies_is_one_and_of_independent_samples_lower() -> None:
    # prepare
    image, _ = _phantom((16, 24, 24))
    generator = np.random.default_rng(1)
    samples = [image + 0.3 * generator.standard_normal(image.shape).astype(np.float32) for _ in range(3)]

    # execute
    copies = pairwise_similarity([image, image.copy(), image.copy()])
    different = pairwise_similarity(samples)

    # assert
    assert copies["pairs"] == 3
    assert copies["mean"] == pytest.approx(1.0, abs=1e-5)
    assert different["mean"] < copies["mean"]
    assert different["nan_pairs"] == 0


def test_volumes_too_thin_for_ms_ssim_report_nan_and_no_settings() -> None:
    # prepare: 8 slices, fewer than MS-SSIM's minimum of 10
    image, label = _phantom((8, 32, 32))

    # execute
    report = fidelity(image, image * 0.9, label)

    # assert
    assert math.isnan(report["ms_ssim"]) and math.isnan(report["ms_ssim_foreground"])
    assert report["ms_ssim_scales"] is None
    assert 0 < report["ssim"] < 1
