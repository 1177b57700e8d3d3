"""Downstream segmentation utility and JSON reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.evaluation import (
    evaluate_dice,
    json_ready,
    t_interval,
    train_segmenter,
    write_report,
)
from gem3d.data.phantoms import make_phantom

# A segmenter small enough to learn the spheres below in about a second.
TINY = {"patch": 16, "channels": (4, 8, 8), "lr": 1e-2}


def _pairs(seeds: range, size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    for seed in seeds:
        image, label = make_phantom((size, size, size), 4, seed)
        pairs.append((image / np.abs(image).max(), label))
    return pairs


def _spheres(seeds: range, size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """Easy cases: one bright noisy sphere (label 1) on a dark background, random centre and radius."""
    pairs = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        grid = np.stack(np.meshgrid(*(np.arange(size),) * 3, indexing="ij"), axis=-1)
        label = (np.linalg.norm(grid - rng.uniform(5, size - 5, 3), axis=-1) < rng.uniform(3, 5)).astype(np.uint8)
        image = -0.8 + 1.6 * label + rng.normal(0.0, 0.1, label.shape)
        pairs.append((image.astype(np.float32), label))
    return pairs


def test_t_interval_matches_the_textbook_value() -> None:
    # prepare: mean 2, sd 1, n 3 -> half width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051
    values = [1.0, 2.0, 3.0]

    # execute
    low, high = t_interval(values)

    # assert
    assert low == pytest.approx(2.0 - 2.484138, abs=1e-5)
    assert high == pytest.approx(2.0 + 2.484138, abs=1e-5)
    assert t_interval([0.5]) == (None, None)


def test_the_segmenter_stops_on_a_plateau_and_keeps_its_best_weights() -> None:
    # prepare
    train, val = _spheres(range(3)), _spheres(range(10, 11))

    # execute
    net, record = train_segmenter(train, val, 2, 0, max_steps=400, eval_every=10, patience=3, min_delta=0.01, **TINY)

    # assert
    assert not record.capped and record.steps < 400
    assert [step for step, _ in record.curve] == list(range(0, record.steps + 1, 10))
    dice = [d for _, d in record.curve]
    assert dice[0] < 0.5 < record.best_dice  # it learned the spheres
    assert record.best_dice == max(dice) and record.best_step == record.curve[dice.index(max(dice))][0]
    gains = [i for i in range(1, len(dice)) if dice[i] > max(dice[:i]) + 0.01]
    assert gains and gains[-1] == len(dice) - 1 - 3  # then 3 evaluations without a gain of 0.01: a plateau
    assert evaluate_dice(net, val, 2, patch=16) == pytest.approx(record.best_dice, abs=1e-6)


def test_the_best_weights_are_restored_when_training_makes_validation_worse() -> None:
    # prepare: the validation label is the background of its sphere, so learning the spheres hurts it
    train = _spheres(range(3))
    image, label = _spheres(range(10, 11))[0]
    val = [(image, 1 - label)]

    # execute
    net, record = train_segmenter(train, val, 2, 0, max_steps=100, eval_every=5, patience=2, min_delta=0.0, **TINY)

    # assert
    assert record.steps == 10 and not record.capped  # stopped by patience after 2 evaluations
    assert record.best_step == 0 and record.curve[-1][1] < record.best_dice - 0.1  # the last weights are worse
    assert evaluate_dice(net, val, 2, patch=16) == pytest.approx(record.best_dice, abs=1e-6)


def test_a_tiny_cap_is_reported_as_capped() -> None:
    # prepare
    train, val = _spheres(range(2)), _spheres(range(10, 11))

    # execute
    _, record = train_segmenter(train, val, 2, 0, max_steps=5, eval_every=25, **TINY)

    # assert
    assert record.capped and record.steps == 5
    assert [step for step, _ in record.curve] == [0, 5]  # the cap is evaluated too
    assert record.as_dict()["capped"] is True


def test_same_seed_same_record_and_predictions() -> None:
    # prepare
    train, val = _spheres(range(3)), _spheres(range(10, 11))
    volume = torch.as_tensor(val[0][0])[None, None]

    # execute
    runs = [train_segmenter(train, val, 2, 7, max_steps=40, eval_every=10, **TINY) for _ in range(2)]
    other, _ = train_segmenter(train, val, 2, 8, max_steps=40, eval_every=10, **TINY)

    # assert
    (net_a, record_a), (net_b, record_b) = runs
    assert record_a == record_b
    with torch.no_grad():
        assert torch.equal(net_a(volume), net_b(volume))
        assert not torch.equal(net_a(volume), other(volume))  # the seed matters: the check can fail


def test_reports_are_strict_json_with_named_non_finite_values(tmp_path: Path) -> None:
    # prepare
    report = {"psnr": math.inf, "ms_ssim": math.nan, "per_label": {1: np.float32(0.5)}, "shape": (2, 3)}

    # execute
    path = write_report(tmp_path / "out" / "report.json", report)

    # assert
    assert json.loads(path.read_text()) == {"psnr": "inf", "ms_ssim": "nan", "per_label": {"1": 0.5}, "shape": [2, 3]}
    assert json_ready(-math.inf) == "-inf"
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]
