"""The few-real-case utility curves: draws, pairing, nesting, TSTR and the verdict (issue 15)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest

from experiments.evaluation import json_ready
from experiments.evaluation.arms import ARMS, resolve_arms
from experiments.evaluation.utility import REAL_ONLY, UtilityDesign, _verdict, case_draw, utility_curves
from gem3d.errors import ConfigError

# A segmenter small enough to learn the spheres below in about a second.
TINY = {"patch": 16, "channels": (4, 8, 8), "lr": 1e-2}
Pair = tuple[np.ndarray, np.ndarray]


def _sphere(seed: int, size: int = 16, label: np.ndarray | None = None) -> Pair:
    """One bright noisy sphere (label 1) on a dark background; ``label`` given: that mask, new noise."""
    rng = np.random.default_rng(seed)
    if label is None:
        grid = np.stack(np.meshgrid(*(np.arange(size),) * 3, indexing="ij"), axis=-1)
        label = (np.linalg.norm(grid - rng.uniform(5, size - 5, 3), axis=-1) < rng.uniform(3, 5)).astype(np.uint8)
    image = -0.8 + 1.6 * label + rng.normal(0.0, 0.1, label.shape)
    return image.astype(np.float32), label


class Renderer:
    """A synthetic-data source for the tests: new noise on each pool case's own mask; records its calls."""

    def __init__(self, pool: list[Pair], wrong_labels: bool = False) -> None:
        self.pool, self.wrong_labels = pool, wrong_labels
        self.calls: list[tuple[str, int, list[int], int]] = []

    def __call__(self, arm: str, seed: int, indices: Sequence[int], replicates: int) -> list[list[Pair]]:
        self.calls.append((arm, seed, list(indices), replicates))
        out = []
        for i in indices:
            label = self.pool[i][1]
            pairs = [_sphere(1000 * seed + 10 * i + k, label=label) for k in range(replicates)]
            out.append([(image, 1 - label) if self.wrong_labels else (image, label) for image, label in pairs])
        return out


@pytest.mark.parametrize("pool", range(1, 13))
def test_each_seed_holds_out_real_validation_cases_and_orders_the_rest(pool: int) -> None:
    for seed in range(5):
        # execute
        validation, order, kind = case_draw(pool, seed, 4)

        # assert
        assert (validation, order, kind) == case_draw(pool, seed, 4)
        assert sorted(validation + order) == list(range(pool)) and not set(validation) & set(order)
        if pool < 3:
            assert validation == [] and kind == "train"
        else:
            assert len(validation) == min(4, pool // 2) and kind == "held-out split"
    if pool >= 6:
        assert len({tuple(case_draw(pool, seed, 4)[0]) for seed in range(5)}) > 1  # the seed chooses


def test_the_curves_are_nested_paired_and_never_train_on_validation_cases() -> None:
    # prepare
    pool, test = [_sphere(s) for s in range(8)], [_sphere(s) for s in range(20, 22)]
    render = Renderer(pool)
    design = UtilityDesign(real_counts=(1, 2, 4), multipliers=(0, 1, 2), few_real=2, multiplier=1,
                           validation_cases=2, seeds=(0, 1), tstr=True)  # fmt: skip

    # execute
    report = utility_curves(pool, test, render, ["gem3d"], design, max_steps=4, eval_every=2, **TINY)

    # assert: every segmenter's cases
    runs = report["runs"]
    for seed in (0, 1):
        validation, order, _ = case_draw(8, seed, 2)
        mine = [r for r in runs if r["seed"] == seed]
        for run in mine:
            assert run["validation_cases"] == validation
            assert not set(run["real_cases"]) & set(validation)
            if not run["arm"].endswith(":tstr"):
                assert run["real_cases"] == order[: run["real"]]  # nested: the first n of the seed's order
                assert run["synthetic"] == run["real"] * run["multiplier"]
        tstr = [r for r in mine if r["arm"] == "gem3d:tstr"]
        assert len(tstr) == 1 and tstr[0]["real_cases"] == [] and tstr[0]["synthetic"] == 4 * 1
        calls = [c for c in render.calls if c[1] == seed]
        assert [(c[2], c[3]) for c in calls] == [(order[:1], 1), (order[:2], 2), (order[:4], 1)]
    # every point once per seed: real-only at 1, 2, 4; gem3d at (1, x1), (2, x1), (2, x2), (4, x1); TSTR
    assert len(runs) == 2 * (3 + 4 + 1)

    # assert: the curves are the runs' test Dice, and the gains are paired per seed
    def dice(arm: str, n: int, m: int) -> list[float]:
        return [r["test_dice"] for r in runs if (r["arm"], r["real"], r["multiplier"]) == (arm, n, m)]

    for point in report["curves"]["real_count"]["gem3d"]:
        n = point["real"]
        assert point["multiplier"] == 1 and point["dice"]["per_seed"] == dice("gem3d", n, 1)
        expected = [b - a for a, b in zip(dice(REAL_ONLY, n, 0), dice("gem3d", n, 1), strict=True)]
        assert point["gain"]["per_seed"] == pytest.approx(expected)
    by_m = {p["multiplier"]: p for p in report["curves"]["multiplier"]["gem3d"]}
    assert sorted(by_m) == [0, 1, 2] and by_m[0]["gain"]["per_seed"] == [0.0, 0.0]
    assert by_m[0]["dice"]["per_seed"] == dice(REAL_ONLY, 2, 0)
    assert report["tstr"]["gem3d"]["synthetic_only"]["per_seed"] == dice("gem3d:tstr", 4, 1)
    head = report["headline"]
    assert (head["arm"], head["real"], head["multiplier"]) == ("gem3d", 2, 1)
    assert head["gain"] == report["curves"]["multiplier"]["gem3d"][1]["gain"]
    assert head["gain"]["ci_low"] is not None and isinstance(head["target_met"], bool)
    assert head["versus"] == {}  # one arm: nothing to compare it with
    assert report["validation"] == "held-out split" and report["pool"] == 8 and report["test"] == 2
    json.dumps(json_ready(report), allow_nan=False)


def test_counts_beyond_the_pool_are_dropped_and_said() -> None:
    # prepare: 5 pool cases, 2 validate: 3 left to train on
    pool, test = [_sphere(s) for s in range(5)], [_sphere(20)]
    design = UtilityDesign(real_counts=(1, 8), multipliers=(1,), few_real=1, multiplier=1, validation_cases=2,
                           seeds=(0,), tstr=False)  # fmt: skip

    # execute
    report = utility_curves(pool, test, Renderer(pool), ["gem3d"], design, max_steps=2, **TINY)

    # assert
    assert report["design"]["real_counts"] == [1]
    assert report["notes"] == ["real count 8 dropped: the pool leaves 3 training cases per seed"]
    assert report["headline"]["verdict"].startswith("one seed")


def test_a_pool_smaller_than_every_count_uses_all_its_cases() -> None:
    # prepare: 1 pool case (it validates itself), the protocol asks for 2
    pool, test = [_sphere(0)], [_sphere(20)]
    design = UtilityDesign(real_counts=(2,), multipliers=(1,), multiplier=1, seeds=(0,), tstr=False)

    # execute
    report = utility_curves(pool, test, Renderer(pool), ["gem3d"], design, max_steps=2, **TINY)

    # assert
    assert report["design"]["real_counts"] == [1] and report["headline"]["real"] == 1
    assert report["validation"] == "train"
    assert any("uses all 1 training cases" in note for note in report["notes"])


def test_synthetic_data_with_wrong_labels_shows_as_a_loss() -> None:
    # prepare: the measurement must be able to say no: inverted labels must cost Dice
    pool, test = [_sphere(s) for s in range(6)], [_sphere(s) for s in range(20, 23)]
    design = UtilityDesign(real_counts=(1,), multipliers=(2,), few_real=1, multiplier=2, validation_cases=2,
                           seeds=(0, 1), tstr=False)  # fmt: skip

    # execute
    renderers = {"bad": Renderer(pool, wrong_labels=True), "good": Renderer(pool)}

    def synthesise(arm: str, seed: int, indices: Sequence[int], replicates: int) -> list[list[Pair]]:
        return renderers[arm](arm, seed, indices, replicates)

    report = utility_curves(pool, test, synthesise, ["bad", "good"], design, max_steps=200, eval_every=10,
                            patience=3, **TINY)  # fmt: skip

    # assert
    head = report["headline"]
    assert all(difference < 0 for difference in head["versus"]["good"]["per_seed"])  # bad minus good
    assert head["real_only"]["mean"] > 0.5  # the real-only segmenter learned the spheres
    assert all(gain < -0.1 for gain in head["gain"]["per_seed"])
    assert not head["target_met"]


def test_the_verdict_reads_the_interval() -> None:
    def gain(low: float | None, high: float | None) -> dict[str, float | None]:
        return {"mean": 0.0, "ci_low": low, "ci_high": high}

    assert _verdict(gain(0.01, 0.05)).startswith("synthetic data helped")
    assert _verdict(gain(-0.05, -0.01)).startswith("synthetic data hurt")
    assert _verdict(gain(-0.01, 0.05)).startswith("no difference")
    assert _verdict(gain(None, None)).startswith("one seed")


def test_arms_name_their_informed_source_and_mask_edits() -> None:
    # execute / assert
    default = ARMS["gem3d"].as_dict()
    assert default["informed"] == "generate" and default["mask_edits"] and default["start"].startswith("random")
    assert {arm.informed for arm in ARMS.values()} == {"generate", "copy", "own", "none"}
    assert [a.name for a in resolve_arms(["mask-only", "gem3d"])] == ["mask-only", "gem3d"]
    with pytest.raises(ConfigError, match=r"unknown arm 'gem3D'.*known: gem3d"):
        resolve_arms(["gem3D"])


def test_a_design_without_counts_or_seeds_is_refused() -> None:
    with pytest.raises(ValueError, match="real_counts"):
        UtilityDesign(real_counts=())
    with pytest.raises(ValueError, match="multipliers"):
        UtilityDesign(multipliers=(-1,))
    with pytest.raises(ValueError, match="seed"):
        UtilityDesign(seeds=())
