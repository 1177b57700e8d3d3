"""The downstream segmenter: does synthetic data help a segmentation network? (the building blocks)

``train_segmenter`` trains a small MONAI 3D UNet on (image, label) pairs until it converges: early
stopping on validation Dice (real cases only; ``utility.case_draw`` picks them), with the best
weights restored (issue 15). ``evaluate_dice`` scores it on held-out real cases. The experiment
design, the curves and the paired gains live in ``experiments.evaluation.utility``.

Confidence intervals are two-sided 95% Student-t intervals over seeds:
``mean ± t(0.975, n - 1) · sd / sqrt(n)`` (sd with n - 1). With one seed there is no interval
(``ci_low`` = ``ci_high`` = None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from scipy import stats

from experiments.evaluation.arrays import as_label, as_volume
from experiments.evaluation.protocol import DOWNSTREAM_STEPS

Pair = tuple[Any, Any]  # (image [D, H, W] in [-1, 1], label [D, H, W] ints)
_DIVISOR = 4  # two stride-2 levels in the UNet

# The early-stopping rule of protocol gem3d-eval-v2 (PROTOCOL.md section 4; issue 15): a fixed step
# count left the real-only arm untrained, so every arm now trains until its validation Dice stops
# improving, up to the protocol's cap DOWNSTREAM_STEPS.
EVAL_EVERY = 25  # optimiser steps between validation evaluations
PATIENCE = 4  # evaluations in a row without improvement before stopping
MIN_DELTA = 1e-3  # an improvement must beat the best validation Dice by more than this
MIN_CASES_FOR_SPLIT = 3  # fewer real training cases: validate on the training cases themselves


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Two-sided Student-t confidence interval of the mean; (None, None) for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None, None
    mean = float(np.mean(values))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return mean - half, mean + half


def interval_summary(per_seed: list[float]) -> dict[str, Any]:
    low, high = t_interval(per_seed)
    return {"mean": float(np.mean(per_seed)), "ci_low": low, "ci_high": high, "per_seed": per_seed}


def _tensors(pairs: Sequence[Pair], name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if not pairs:
        raise ValueError(f"{name}: no (image, label) pairs")
    out = []
    for image, label in pairs:
        volume = as_volume(image, f"{name} image")
        out.append((volume, as_label(label, volume.shape)))
    return out


def _patch_shape(cases: list[tuple[torch.Tensor, torch.Tensor]], patch: int) -> tuple[int, int, int]:
    """Largest multiple-of-4 patch (<= ``patch`` per side) that fits every training volume."""
    sides = []
    for axis in range(3):
        side = min(patch, *(int(image.shape[axis]) for image, _ in cases))
        if side < _DIVISOR:
            raise ValueError(f"training volumes need >= {_DIVISOR} voxels per side, got {side}")
        sides.append(side - side % _DIVISOR)
    return sides[0], sides[1], sides[2]


def _random_patches(
    cases: list[tuple[torch.Tensor, torch.Tensor]], shape: tuple[int, int, int], batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, 1, *shape]`` images and ``[B, 1, *shape]`` labels from random cases and corners."""
    images, labels = [], []
    for index in torch.randint(len(cases), (batch,), generator=generator).tolist():
        image, label = cases[index]
        corner = [
            int(torch.randint(int(size) - side + 1, (1,), generator=generator))
            for size, side in zip(image.shape, shape, strict=True)
        ]
        box = tuple(slice(c, c + s) for c, s in zip(corner, shape, strict=True))
        images.append(image[box])
        labels.append(label[box])
    return torch.stack(images)[:, None], torch.stack(labels)[:, None]


@dataclass(frozen=True)
class TrainingRecord:
    """How one segmenter's training went (``train_segmenter``).

    Attributes:
        steps: optimiser steps taken.
        curve: (step, validation Dice) at step 0 and every ``eval_every`` steps, and at the last step.
        best_step: the step of the highest validation Dice, whose weights the returned network
            has (0: the initial weights).
        best_dice: that Dice, the curve's maximum (NaN if no evaluation gave a finite Dice).
        capped: True when ``max_steps`` ended training before the patience ran out: the network
            may not have converged.
    """

    steps: int
    curve: tuple[tuple[int, float], ...]
    best_step: int
    best_dice: float
    capped: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "curve": [list(point) for point in self.curve],
            "best_step": self.best_step,
            "best_dice": self.best_dice,
            "capped": self.capped,
        }


def _beats(dice: float, other: float, margin: float) -> bool:
    # NaN (no label in the truth or prediction of any validation case) never counts as a gain.
    return not math.isnan(dice) and (math.isnan(other) or dice > other + margin)


def _check_rules(max_steps: int, eval_every: int, patience: int, min_delta: float) -> None:
    for name, value in (("max_steps", max_steps), ("eval_every", eval_every), ("patience", patience)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not min_delta >= 0:
        raise ValueError(f"min_delta must be >= 0, got {min_delta}")


def train_segmenter(
    train_pairs: Sequence[Pair],
    val_pairs: Sequence[Pair],
    num_labels: int,
    seed: int,
    max_steps: int = DOWNSTREAM_STEPS,
    device: str | torch.device = "cpu",
    eval_every: int = EVAL_EVERY,
    patience: int = PATIENCE,
    min_delta: float = MIN_DELTA,
    batch_size: int = 2,
    patch: int = 32,
    channels: tuple[int, ...] = (8, 16, 32),
    lr: float = 1e-3,
) -> tuple[UNet, TrainingRecord]:
    """Train a small 3D MONAI UNet (Dice + cross-entropy, Adam) on random patches until it converges.

    Early stopping on validation Dice (``evaluate_dice``): evaluated before the first step, every
    ``eval_every`` steps and at the last step. An evaluation is an improvement when it beats the
    last improvement (at first, step 0) by more than ``min_delta``; training stops after
    ``patience`` evaluations in a row without one, or at ``max_steps``. The weights of the highest
    validation Dice (the first such step) are restored at the end, so the returned network's
    validation Dice is ``record.best_dice``. Evaluation draws nothing from the batch generator:
    the batches, hence the bytes, depend on ``seed`` only.

    Args:
        train_pairs: (image ``[D, H, W]``, label ``[D, H, W]``) pairs to train on.
        val_pairs: pairs to stop on: real cases, never test cases nor synthetic ones
            (``utility.case_draw`` draws them from the real pool).
        num_labels: classes including background.
        seed: seeds the weights and the batch order.
        max_steps: the cap on optimiser steps (``DOWNSTREAM_STEPS`` by default).
        eval_every, patience, min_delta: the early-stopping rule above.
        patch: patch side (capped by the smallest training volume, floored to a multiple of 4).
        channels: UNet widths; len(channels) - 1 stride-2 levels.

    Returns:
        (the network with its best weights, eval mode, on ``device``; its ``TrainingRecord``).
    """
    _check_rules(max_steps, eval_every, patience, min_delta)
    cases = _tensors(train_pairs, "train_pairs")
    validation = _tensors(val_pairs, "val_pairs")
    shape = _patch_shape(cases, patch)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        torch.manual_seed(seed)
        net = UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=num_labels,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=1,
        ).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)

    def validate() -> float:
        dice = evaluate_dice(net.eval(), validation, num_labels, patch)
        net.train()
        return dice

    def snapshot() -> dict[str, torch.Tensor]:
        return {key: value.detach().clone() for key, value in net.state_dict().items()}

    best_dice, best_step, best_weights = validate(), 0, snapshot()
    reference = best_dice  # the Dice of the last improvement, which the next must beat by min_delta
    curve = [(0, best_dice)]
    step, stale = 0, 0
    while step < max_steps and stale < patience:
        images, labels = _random_patches(cases, shape, batch_size, generator)
        loss = loss_fn(net(images.to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % eval_every and step < max_steps:
            continue
        dice = validate()
        curve.append((step, dice))
        if _beats(dice, best_dice, 0.0):
            best_dice, best_step, best_weights = dice, step, snapshot()
        if _beats(dice, reference, min_delta):
            reference, stale = dice, 0
        else:
            stale += 1
    net.load_state_dict(best_weights)
    record = TrainingRecord(step, tuple(curve), best_step, best_dice, capped=stale < patience)
    return net.eval(), record


def case_dice(prediction: Any, truth: Any, num_labels: int) -> float:
    """The protocol's Dice of one case: the mean over foreground labels present in truth or prediction.

    ``prediction`` and ``truth`` are ``[D, H, W]`` label maps. MONAI ``DiceMetric``
    (``include_background=False``, ``ignore_empty=True``); a label absent from both counts as
    nothing, not as a perfect 1; NaN when no foreground label is in either.
    """
    truth_t = as_label(truth)
    pred_t = as_label(prediction, tuple(truth_t.shape))
    onehot = torch.nn.functional.one_hot
    pred = onehot(pred_t[None].clamp(0, num_labels - 1), num_labels).movedim(-1, 1).float()
    true = onehot(truth_t[None].clamp(0, num_labels - 1), num_labels).movedim(-1, 1).float()
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    per_label = torch.as_tensor(metric(pred, true))[0]
    present = per_label[~per_label.isnan()]
    return float(present.mean()) if present.numel() else float("nan")


def mean_dice(scores: Sequence[float]) -> float:
    """The mean of per-case Dice over the cases where it is defined (NaN if none is)."""
    finite = [s for s in scores if not math.isnan(s)]
    return float(np.mean(finite)) if finite else float("nan")


@torch.no_grad()
def evaluate_dice(net: torch.nn.Module, test_pairs: Sequence[Pair], num_labels: int, patch: int = 32) -> float:
    """Mean foreground Dice (``case_dice``) of ``net`` over test cases (sliding-window inference)."""
    cases = _tensors(test_pairs, "test_pairs")
    device = next(net.parameters()).device
    scores = []
    for image, label in cases:
        roi = tuple(max(_DIVISOR, min(patch, int(s)) - min(patch, int(s)) % _DIVISOR) for s in image.shape)
        logits = torch.as_tensor(
            sliding_window_inference(image[None, None].to(device), roi, 4, net, overlap=0.25, mode="gaussian")
        )
        scores.append(case_dice(logits.argmax(dim=1)[0].cpu(), label, num_labels))
    return mean_dice(scores)


def label_count(pairs: Sequence[Pair]) -> int:
    return 1 + max(int(as_label(label, as_volume(image).shape).max()) for image, label in pairs)


def stopping_rule(max_steps: int, train_options: dict[str, Any]) -> dict[str, Any]:
    """The early-stopping rule a run uses: what a paired comparison must share."""
    return {
        "max_steps": max_steps,
        "eval_every": train_options.get("eval_every", EVAL_EVERY),
        "patience": train_options.get("patience", PATIENCE),
        "min_delta": train_options.get("min_delta", MIN_DELTA),
    }
