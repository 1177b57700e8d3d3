"""Downstream segmentation utility and JSON reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.evaluation import (
    downstream,
    downstream_utility,
    evaluate_dice,
    json_ready,
    segmentation_dice,
    t_interval,
    train_segmenter,
    write_report,
)
from experiments.evaluation.downstream import validation_split
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


def test_downstream_utility_trains_per_seed_and_reports_dice_with_intervals() -> None:
    # prepare
    real, synthetic, test = _pairs(range(2)), _pairs(range(10, 12)), _pairs(range(20, 22))
    rng_before = torch.random.get_rng_state()

    # execute
    report = downstream_utility(real, synthetic, test, seeds=(0, 1), max_steps=3, patch=16)

    # assert
    for arm in ("real_only", "real_plus_synthetic"):
        result = report[arm]
        assert len(result["per_seed"]) == 2
        assert all(0.0 <= dice <= 1.0 for dice in result["per_seed"])
        assert result["ci_low"] <= result["mean"] <= result["ci_high"]
        assert result["validation"] == "train"  # 2 real cases: too few to hold one out
        assert [entry["seed"] for entry in result["training"]] == [0, 1]
        for entry in result["training"]:  # 3 steps < one evaluation interval: capped, and it says so
            assert entry["capped"] and entry["steps"] == 3 and [s for s, _ in entry["curve"]] == [0, 3]
    assert report["real_only"]["num_train"] == 2 and report["real_plus_synthetic"]["num_train"] == 4
    gains = [
        b - a for a, b in zip(report["real_only"]["per_seed"], report["real_plus_synthetic"]["per_seed"], strict=True)
    ]
    assert report["gain"]["per_seed"] == pytest.approx(gains)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # seeded locally, caller's RNG untouched


def test_a_reused_real_only_arm_must_be_paired() -> None:
    # prepare
    pairs = _pairs(range(3))
    real_only = segmentation_dice(pairs[:1], pairs[2:], seeds=(0,), max_steps=1, patch=16)
    other_seeds = {**real_only, "seeds": [5]}

    # execute / assert
    with pytest.raises(ValueError, match="paired"):
        downstream_utility(pairs[:1], pairs[1:2], pairs[2:], seeds=(0,), max_steps=1, real_only=other_seeds)
    with pytest.raises(ValueError, match="paired"):  # another stopping rule
        downstream_utility(pairs[:1], pairs[1:2], pairs[2:], seeds=(0,), max_steps=1, real_only=real_only, patience=2)
    with pytest.raises(ValueError, match="paired"):  # other real cases, hence other validation cases
        downstream_utility(pairs[:2], pairs[1:2], pairs[2:], seeds=(0,), max_steps=1, real_only=real_only)
    paired = downstream_utility(
        pairs[:1], pairs[1:2], pairs[2:], seeds=(0,), max_steps=1, real_only=real_only, patch=16
    )
    assert paired["real_only"] is real_only


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


@pytest.mark.parametrize("num_real", range(1, 13))
def test_validation_cases_are_a_deterministic_part_of_the_real_training_cases(num_real: int) -> None:
    for seed in range(5):
        # execute
        fit, validation, kind = validation_split(num_real, seed)

        # assert
        assert (fit, validation, kind) == validation_split(num_real, seed)
        if num_real < 3:
            assert fit == validation == list(range(num_real)) and kind == "train"
        else:
            assert kind == "held-out split" and len(validation) == max(1, num_real // 5)
            assert not set(fit) & set(validation) and sorted(fit + validation) == list(range(num_real))


def test_every_arm_validates_on_the_same_real_cases_and_never_trains_on_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # prepare: 4 real cases (one held out per seed), 2 synthetic per real case, made from its mask
    real, test, synthetic = _spheres(range(4)), _spheres(range(20, 21)), _spheres(range(30, 38))
    sources = [k % 4 for k in range(8)]
    everything = [*real, *synthetic]  # ids 0-3 real, 4-11 synthetic
    calls: list[tuple[int, list[int], list[int]]] = []  # (seed, ids trained on, ids validated on)

    def spy(fit, val, num_labels, seed, *args, **kwargs):  # type: ignore[no-untyped-def]
        fit_ids, val_ids = (
            [next(i for i, p in enumerate(everything) if p is q) for q in pairs] for pairs in (fit, val)
        )
        calls.append((seed, fit_ids, val_ids))
        return train_segmenter(fit, val, num_labels, seed, *args, **kwargs)

    monkeypatch.setattr(downstream, "train_segmenter", spy)

    # execute
    report = downstream_utility(real, synthetic, test, (0, 1, 2), 2, synthetic_sources=sources, **TINY)

    # assert
    assert len(calls) == 6  # 3 seeds x (real-only, real + synthetic)
    for _, fit, val in calls:
        assert len(val) == 1 and val[0] < 4  # a real case, never a synthetic one
        assert val[0] not in fit  # nor trained on
        assert not {4 + k for k in range(8) if sources[k] == val[0]} & set(fit)  # nor its synthetic copies
    for seed in (0, 1, 2):
        (real_fit, real_val), (mixed_fit, mixed_val) = [(f, v) for s, f, v in calls if s == seed]
        assert real_val == mixed_val  # the same validation case for both arms
        assert sorted(real_fit) == [i for i in range(4) if i != real_val[0]]
        assert len(mixed_fit) == 3 + 6  # the 3 other real cases and their 6 synthetic ones
    assert len({tuple(v) for _, _, v in calls}) > 1  # the seed chooses the validation case
    arms = [report[arm] for arm in ("real_only", "real_plus_synthetic")]
    assert [e["validation_cases"] for e in arms[0]["training"]] == [e["validation_cases"] for e in arms[1]["training"]]
    assert arms[0]["validation"] == arms[1]["validation"] == "held-out split"
    assert [e["trained_on"] for e in arms[1]["training"]] == [9, 9, 9]


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
