"""Downstream segmentation utility and JSON reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.evaluation import downstream_utility, json_ready, t_interval, write_report
from gem3d.data.phantoms import make_phantom


def _pairs(seeds: range, size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    for seed in seeds:
        image, label = make_phantom((size, size, size), 4, seed)
        pairs.append((image / np.abs(image).max(), label))
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


def test_downstream_utility_trains_per_seed_and_reports_dice_with_intervals() -> None:
    # prepare
    real, synthetic, test = _pairs(range(2)), _pairs(range(10, 12)), _pairs(range(20, 22))
    rng_before = torch.random.get_rng_state()

    # execute
    report = downstream_utility(real, synthetic, test, seeds=(0, 1), steps=3, patch=16)

    # assert
    for arm in ("real_only", "real_plus_synthetic"):
        result = report[arm]
        assert len(result["per_seed"]) == 2
        assert all(0.0 <= dice <= 1.0 for dice in result["per_seed"])
        assert result["ci_low"] <= result["mean"] <= result["ci_high"]
    assert report["real_only"]["num_train"] == 2 and report["real_plus_synthetic"]["num_train"] == 4
    gains = [
        b - a for a, b in zip(report["real_only"]["per_seed"], report["real_plus_synthetic"]["per_seed"], strict=True)
    ]
    assert report["gain"]["per_seed"] == pytest.approx(gains)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # seeded locally, caller's RNG untouched


def test_a_reused_real_only_arm_must_be_paired() -> None:
    # prepare
    pairs = _pairs(range(3))
    unpaired = {"seeds": [5], "steps": 3, "per_seed": [0.5]}

    # execute / assert
    with pytest.raises(ValueError, match="paired"):
        downstream_utility(pairs[:1], pairs[1:2], pairs[2:], seeds=(0,), steps=3, real_only=unpaired)


def test_reports_are_strict_json_with_named_non_finite_values(tmp_path: Path) -> None:
    # prepare
    report = {"psnr": math.inf, "ms_ssim": math.nan, "per_label": {1: np.float32(0.5)}, "shape": (2, 3)}

    # execute
    path = write_report(tmp_path / "out" / "report.json", report)

    # assert
    assert json.loads(path.read_text()) == {"psnr": "inf", "ms_ssim": "nan", "per_label": {"1": 0.5}, "shape": [2, 3]}
    assert json_ready(-math.inf) == "-inf"
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]
