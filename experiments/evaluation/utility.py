"""Few-real-case utility curves: does synthetic data make a converged segmenter better? (issue 15)

``utility_curves`` answers the question of GEM-3D's dataset enhancement the way the field measures
it: a small 3D segmenter is trained, until its validation Dice stops improving
(``downstream.train_segmenter``), on

* ``n`` real cases alone (the real-only baseline), for each ``n`` of ``design.real_counts``;
* the same ``n`` real cases plus ``m`` synthetic volumes per real case, for every arm (a source of
  synthetic data, ``experiments.evaluation.arms``): the real-count curve at ``m =
  design.multiplier`` and the multiplier curve at ``n = design.few_real``;
* synthetic volumes only (train on synthetic, test on real: TSTR), made from the masks of the
  largest ``n``, against the real-only arm of the same cases;

and tested on real held-out cases. Per seed, ``case_draw`` shuffles the real pool with
``numpy.random.default_rng(seed)``: the first cases are the validation cases (real, from the pool
only, the same for every arm of that seed), the next ``n`` the training cases, so the curves are
nested and every gain is paired per seed. Intervals are two-sided 95% Student-t intervals over
seeds (``downstream.t_interval``); with one seed there is none.

The pool, the test cases and the synthetic volumes are ``(image, label)`` pairs ``[D, H, W]`` (image
in [-1, 1], label ints); ``synthesise`` is the only link to a generator, so this module trains and
scores but generates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.evaluation.downstream import (
    MIN_CASES_FOR_SPLIT,
    Pair,
    evaluate_dice,
    interval_summary,
    label_count,
    stopping_rule,
    train_segmenter,
)
from experiments.evaluation.protocol import DOWNSTREAM_SEEDS, DOWNSTREAM_STEPS

# (arm, seed, pool indices of the real training cases, replicates) -> for each of those cases,
# ``replicates`` synthetic (image, label) pairs made from its mask.
Synthesise = Callable[[str, int, Sequence[int], int], list[list[Pair]]]
# (training pairs, validation pairs, seed) -> (test Dice, the training record: at least "steps" and
# "capped"). The default is the protocol's small UNet with early stopping; ``nnunet_judge`` is the other.
Segmenter = Callable[[list[Pair], list[Pair], int], tuple[float, dict[str, Any]]]
Log = Callable[[str], None]

REAL_ONLY = "real_only"
TARGET_GAIN = 0.02  # issue 15: + 2 Dice points at the few-real point, with the interval above 0


@dataclass(frozen=True)
class UtilityDesign:
    """Which points of the curves are trained (PROTOCOL.md section 4).

    Attributes:
        real_counts: numbers of real training cases (the real-count curve); counts the pool cannot
            hold next to its validation cases are dropped, and the report says so.
        multipliers: synthetic volumes per real case (the multiplier curve; 0 is real-only).
        few_real: the real count of the multiplier curve and of the headline gain.
        multiplier: the multiplier of the real-count curve, of TSTR and of the headline gain.
        validation_cases: real pool cases held out per seed for early stopping (fewer if the pool
            is small; with fewer than 3 pool cases the segmenter validates on its training cases).
        seeds: paired seeds; each draws its own validation and training cases.
        tstr: also train on synthetic only.
    """

    real_counts: tuple[int, ...] = (1, 2, 4, 8)
    multipliers: tuple[int, ...] = (0, 1, 2, 4)
    few_real: int = 2
    multiplier: int = 2
    validation_cases: int = 4
    seeds: tuple[int, ...] = DOWNSTREAM_SEEDS
    tstr: bool = True

    def __post_init__(self) -> None:
        if not self.real_counts or min(self.real_counts) < 1:
            raise ValueError(f"real_counts {list(self.real_counts)}: need at least one count, each >= 1")
        if not self.multipliers or min(self.multipliers) < 0:
            raise ValueError(f"multipliers {list(self.multipliers)}: need at least one, each >= 0")
        if self.few_real < 1 or self.multiplier < 1:
            raise ValueError("few_real and multiplier must be >= 1")
        if self.validation_cases < 0:
            raise ValueError(f"validation_cases {self.validation_cases}: must be >= 0")
        if not self.seeds:
            raise ValueError("the utility curves need at least one seed")


def case_draw(pool: int, seed: int, validation_cases: int) -> tuple[list[int], list[int], str]:
    """(validation indices, training order, kind) for one seed over a real pool of ``pool`` cases.

    ``numpy.random.default_rng(seed).permutation(pool)``: its first ``v = min(validation_cases,
    pool // 2)`` entries validate (kind ``"held-out split"``), the rest is the training order, whose
    first ``n`` cases are the ``n``-case training set. With fewer than 3 pool cases (or
    ``validation_cases = 0``) nothing is held out and the training cases validate (kind ``"train"``).
    """
    if pool < 1:
        raise ValueError("the downstream task needs at least 1 real case")
    order = [int(i) for i in np.random.default_rng(seed).permutation(pool)]
    held = min(validation_cases, pool // 2) if pool >= MIN_CASES_FOR_SPLIT else 0
    if held == 0:
        return [], order, "train"
    return sorted(order[:held]), order[held:], "held-out split"


def _verdict(gain: dict[str, Any]) -> str:
    low, high = gain["ci_low"], gain["ci_high"]
    if low is None or high is None:
        return "one seed: no interval, so no verdict"
    if low > 0:
        return "synthetic data helped (95% interval of the paired gain above 0)"
    if high < 0:
        return "synthetic data hurt (95% interval of the paired gain below 0)"
    return "no difference the 95% interval can resolve (it contains 0)"


def _reachable(design: UtilityDesign, available: int) -> tuple[list[int], list[str]]:
    """The real counts the pool can hold next to its validation cases, and a note per dropped one.

    When none fits, the curve has one point: every training case the pool leaves.
    """
    counts = sorted({*design.real_counts, design.few_real})
    kept = [n for n in counts if n <= available]
    notes = [
        f"real count {n} dropped: the pool leaves {available} training cases per seed" for n in counts if n > available
    ]
    if not kept and available > 0:
        kept = [available]
        notes.append(f"no requested real count fits: the curve uses all {available} training cases")
    return kept, notes


def utility_curves(
    pool: Sequence[Pair],
    test: Sequence[Pair],
    synthesise: Synthesise,
    arms: Sequence[str],
    design: UtilityDesign = UtilityDesign(),
    max_steps: int = DOWNSTREAM_STEPS,
    device: str | torch.device = "cpu",
    num_labels: int | None = None,
    log: Log = lambda message: None,
    segmenter: Segmenter | None = None,
    **train_options: Any,
) -> dict[str, Any]:
    """Train every point of the design once per seed and report the curves, TSTR and the headline gain.

    Args:
        pool: the real training pool (validation and training cases are drawn from it per seed).
        test: real held-out pairs, never trained or stopped on.
        synthesise: makes each arm's synthetic pairs from the masks of the given pool cases.
        arms: arm names handed to ``synthesise``; the first is the headline arm.
        max_steps, device, train_options: as ``train_segmenter`` (the cap and the stopping rule).
        num_labels: classes incl. background; default: 1 + the largest label of pool and test.
        segmenter: trains on (training, validation) pairs with a seed and scores on ``test``;
            default: ``train_segmenter`` (early stopping) and ``evaluate_dice``.

    Returns:
        ``{"design", "early_stopping", "validation", "pool", "test", "notes",
        "curves": {"real_count": {arm: [point]}, "multiplier": {arm: [point]}},
        "tstr": {arm: {"real": n, "multiplier": m, "synthetic_only": summary, "real_only": summary,
        "difference": summary}}, "headline": {...}, "runs": [per trained segmenter]}``, where a
        point is ``{"real", "multiplier", "dice": summary, "gain": summary vs real-only at the
        same real count, "capped": seeds that hit the cap}`` and a summary is ``{"mean",
        "ci_low", "ci_high", "per_seed"}`` (Dice in [0, 1]).
    """
    if not arms:
        raise ValueError("utility_curves needs at least one arm")
    if not test:
        raise ValueError("utility_curves needs real test cases")
    if num_labels is None:
        num_labels = label_count([*pool, *test])
    draws = {seed: case_draw(len(pool), seed, design.validation_cases) for seed in design.seeds}
    available = min(len(order) for _, order, _ in draws.values())
    counts, notes = _reachable(design, available)
    if not counts:
        raise ValueError(f"the real pool ({len(pool)} cases) leaves no training case next to its validation cases")
    few = design.few_real if design.few_real in counts else counts[0]
    if few != design.few_real:
        notes.append(f"few_real {design.few_real} is beyond the pool: the multiplier curve uses {few} real cases")
    multipliers = sorted({*design.multipliers, design.multiplier} - {0})
    largest = counts[-1]
    patch = train_options.get("patch", 32)

    def small_unet(fit: list[Pair], val: list[Pair], seed: int) -> tuple[float, dict[str, Any]]:
        net, record = train_segmenter(fit, val, num_labels, seed, max_steps, device, **train_options)
        return evaluate_dice(net, test, num_labels, patch), record.as_dict()

    runs = _Runs(pool, segmenter or small_unet, log)
    for seed in design.seeds:
        validation, order, _ = draws[seed]
        for n in counts:
            ids = order[:n]
            val = validation or ids  # too small a pool: the training cases validate
            runs.train((REAL_ONLY, n, 0), seed, ids, [], val)
            for arm in arms:
                replicates = max(multipliers) if n == few else design.multiplier
                synthetic = synthesise(arm, seed, ids, replicates)
                for m in multipliers if n == few else [design.multiplier]:
                    runs.train((arm, n, m), seed, ids, [pair for per_case in synthetic for pair in per_case[:m]], val)
                if design.tstr and n == largest:
                    only = [pair for per_case in synthetic for pair in per_case[: design.multiplier]]
                    runs.train((f"{arm}:tstr", n, design.multiplier), seed, [], only, val)
    kinds = {kind for _, _, kind in draws.values()}
    return {
        "design": {**asdict(design), "real_counts": counts, "multipliers": [0, *multipliers], "few_real": few},
        "early_stopping": stopping_rule(max_steps, train_options),
        "validation": kinds.pop() if len(kinds) == 1 else "mixed",
        "pool": len(pool),
        "test": len(test),
        "notes": notes,
        **runs.report(arms, design, counts, multipliers, few),
        "runs": runs.records,
    }


class _Runs:
    """The segmenters ``utility_curves`` trains: their test Dice by ``(arm, real count, multiplier)``,
    one per seed in seed order, and the curves, TSTR and headline read from them."""

    def __init__(self, pool: Sequence[Pair], fit_and_score: Segmenter, log: Log) -> None:
        self.pool, self.fit_and_score, self.log = pool, fit_and_score, log
        self.dice: dict[tuple[str, int, int], list[float]] = {}
        self.capped: dict[tuple[str, int, int], int] = {}
        self.records: list[dict[str, Any]] = []

    def train(self, key: tuple[str, int, int], seed: int, real: list[int], extra: list[Pair], val: list[int]) -> None:
        """One segmenter: ``real`` pool cases plus ``extra`` synthetic pairs, stopped on ``val``."""
        fit = [self.pool[i] for i in real] + extra
        score, record = self.fit_and_score(fit, [self.pool[i] for i in val], seed)
        self.dice.setdefault(key, []).append(score)
        self.capped[key] = self.capped.get(key, 0) + int(bool(record["capped"]))
        arm, n, m = key
        self.records.append({"arm": arm, "seed": seed, "real": n, "multiplier": m, "real_cases": real,
                             "synthetic": len(extra), "validation_cases": val, "test_dice": score,
                             **record})  # fmt: skip
        self.log(f"downstream seed {seed}: {arm}, {len(real)} real + {len(extra)} synthetic: {record['steps']} "
                 f"steps, Dice {score:.3f}")  # fmt: skip

    def paired(self, first: str, second: str, n: int, m: int) -> dict[str, Any]:
        """``first`` minus ``second`` per seed at (n, m), with its interval."""
        differences = [a - b for a, b in zip(self.dice[(first, n, m)], self.dice[(second, n, m)], strict=True)]
        return interval_summary(differences)

    def point(self, arm: str, n: int, m: int) -> dict[str, Any]:
        """A curve's point: Dice at (n, m) and its gain over real-only at n, paired per seed."""
        key = (arm, n, m) if m else (REAL_ONLY, n, 0)
        gain = [b - a for a, b in zip(self.dice[(REAL_ONLY, n, 0)], self.dice[key], strict=True)]
        return {"real": n, "multiplier": m, "dice": interval_summary(self.dice[key]), "gain": interval_summary(gain),
                "capped": self.capped[key]}  # fmt: skip

    def report(
        self, arms: Sequence[str], design: UtilityDesign, counts: list[int], multipliers: list[int], few: int
    ) -> dict[str, Any]:
        """``{"curves", "tstr", "headline"}`` of ``utility_curves``."""
        curves: dict[str, dict[str, list[dict[str, Any]]]] = {"real_count": {}, "multiplier": {}}
        curves["real_count"][REAL_ONLY] = [self.point(REAL_ONLY, n, 0) for n in counts]
        for arm in arms:
            curves["real_count"][arm] = [self.point(arm, n, design.multiplier) for n in counts]
            curves["multiplier"][arm] = [self.point(arm, few, m) for m in [0, *multipliers]]
        tstr = {}
        largest = counts[-1]
        if design.tstr:
            for arm in arms:
                only, real = self.dice[(f"{arm}:tstr", largest, design.multiplier)], self.dice[(REAL_ONLY, largest, 0)]
                tstr[arm] = {
                    "real": largest,
                    "multiplier": design.multiplier,
                    "synthetic_only": interval_summary(only),
                    "real_only": interval_summary(real),
                    "difference": interval_summary([b - a for a, b in zip(real, only, strict=True)]),
                }
        head = self.point(arms[0], few, design.multiplier)
        gain = head["gain"]
        headline = {
            "arm": arms[0],
            "real": few,
            "multiplier": design.multiplier,
            "real_only": interval_summary(self.dice[(REAL_ONLY, few, 0)]),
            "with_synthetic": head["dice"],
            "gain": gain,
            "verdict": _verdict(gain),
            # the headline arm against each other arm at the same point, paired per seed: is it the
            # generator (e.g. the informed slice) that helps, or any extra masks?
            "versus": {arm: self.paired(arms[0], arm, few, design.multiplier) for arm in arms[1:]},
            "target": f"gain >= {TARGET_GAIN} with the 95% interval above 0 (issue 15)",
            "target_met": bool(gain["ci_low"] is not None and gain["ci_low"] > 0 and gain["mean"] >= TARGET_GAIN),
        }
        return {"curves": curves, "tstr": tstr, "headline": headline}


def plot_curves(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG of the curves: Dice vs real cases, Dice vs multiplier, and TSTR (mean and 95% interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.previews import save_figure

    curves, tstr = report["curves"], report["tstr"]
    panels = 3 if tstr else 2
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)

    colours = {arm: f"C{i}" for i, arm in enumerate(curves["real_count"])}  # one colour per arm, every panel

    def draw(ax: Any, points: list[dict[str, Any]], x_key: str, name: str) -> None:
        xs = [p[x_key] for p in points]
        means = [p["dice"]["mean"] for p in points]
        lows = [p["dice"]["ci_low"] if p["dice"]["ci_low"] is not None else p["dice"]["mean"] for p in points]
        highs = [p["dice"]["ci_high"] if p["dice"]["ci_high"] is not None else p["dice"]["mean"] for p in points]
        errors = [
            [m - lo for m, lo in zip(means, lows, strict=True)],
            [h - m for m, h in zip(means, highs, strict=True)],
        ]
        ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=name.replace("_", "-"), color=colours[name])

    ax = axes[0][0]
    for arm, points in curves["real_count"].items():
        draw(ax, points, "real", arm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("real training cases")
    ax.set_ylabel("test Dice")
    ax.set_title(f"x{report['design']['multiplier']} synthetic per real case", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for arm, points in curves["multiplier"].items():
        draw(ax, points, "multiplier", arm)
    ax.set_xlabel("synthetic volumes per real case")
    ax.set_title(f"{report['design']['few_real']} real cases", fontsize=9)
    ax.legend(fontsize=7)
    if tstr:
        ax = axes[0][2]
        names = ["real only", *(f"{arm}\nsynthetic only" for arm in tstr)]
        first = next(iter(tstr.values()))
        entries = [first["real_only"], *(t["synthetic_only"] for t in tstr.values())]
        means = [e["mean"] for e in entries]
        errors = [
            [m - (e["ci_low"] if e["ci_low"] is not None else m) for m, e in zip(means, entries, strict=True)],
            [(e["ci_high"] if e["ci_high"] is not None else m) - m for m, e in zip(means, entries, strict=True)],
        ]
        ax.bar(range(len(names)), means, yerr=errors, capsize=3, color=[colours[REAL_ONLY], *map(colours.get, tstr)])
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"TSTR: masks of {first['real']} real cases", fontsize=9)
    # one Dice scale for every panel, fitted to the intervals (differences of a few points must show)
    values = [v for row in axes for a in row for line in a.get_lines() for v in line.get_ydata()]
    values += [bar.get_height() for a in axes[0] for bar in a.patches]
    low, high = max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.05)
    for row in axes:
        for a in row:
            a.set_ylim(low, high)
            a.grid(alpha=0.3)
    head = report["headline"]
    figure.suptitle(
        f"{head['arm']} at {head['real']} real cases: gain {head['gain']['mean']:+.3f} - {head['verdict']}",
        fontsize=8,
    )
    figure.tight_layout()
    return save_figure(figure, Path(path), dpi=100)


__all__ = ["REAL_ONLY", "TARGET_GAIN", "UtilityDesign", "case_draw", "plot_curves", "utility_curves"]
