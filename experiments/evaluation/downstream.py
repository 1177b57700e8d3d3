"""Downstream utility, the paper's point: does synthetic data help a segmentation network?

Train a small MONAI 3D UNet on (image, label) pairs and report its Dice on held-out real cases,
once per seed, with a confidence interval over seeds. ``downstream_utility`` runs the comparison
the protocol asks for: few real cases alone vs the same real cases plus synthetic ones, with the
same seeds, so the per-seed differences are paired.

Confidence intervals are two-sided 95% Student-t intervals over seeds:
``mean ± t(0.975, n - 1) · sd / sqrt(n)`` (sd with n - 1). With one seed there is no interval
(``ci_low`` = ``ci_high`` = None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from scipy import stats

from experiments.evaluation.arrays import as_label, as_volume

Pair = tuple[Any, Any]  # (image [D, H, W] in [-1, 1], label [D, H, W] ints)
_DIVISOR = 4  # two stride-2 levels in the UNet


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Two-sided Student-t confidence interval of the mean; (None, None) for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None, None
    mean = float(np.mean(values))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return mean - half, mean + half


def _summary(per_seed: list[float]) -> dict[str, Any]:
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


def train_segmenter(
    train_pairs: Sequence[Pair],
    num_labels: int,
    seed: int,
    steps: int,
    device: str | torch.device = "cpu",
    batch_size: int = 2,
    patch: int = 32,
    channels: tuple[int, ...] = (8, 16, 32),
    lr: float = 1e-3,
) -> UNet:
    """Train a small 3D MONAI UNet (Dice + cross-entropy, Adam) on random patches.

    Args:
        train_pairs: (image ``[D, H, W]``, label ``[D, H, W]``) pairs.
        num_labels: classes including background.
        seed: seeds the weights and the batch order.
        steps: optimiser steps.
        patch: patch side (capped by the smallest training volume, floored to a multiple of 4).
        channels: UNet widths; len(channels) - 1 stride-2 levels.

    Returns:
        The trained network (eval mode) on ``device``.
    """
    cases = _tensors(train_pairs, "train_pairs")
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
    net.train()
    for _ in range(steps):
        images, labels = _random_patches(cases, shape, batch_size, generator)
        loss = loss_fn(net(images.to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def evaluate_dice(net: torch.nn.Module, test_pairs: Sequence[Pair], num_labels: int, patch: int = 32) -> float:
    """Mean foreground Dice of ``net`` over test cases (sliding-window inference).

    Per case: the mean over foreground labels present in the case's ground truth or prediction
    (MONAI ``DiceMetric``, ``include_background=False``, ``ignore_empty=True``); then the mean
    over cases. A label absent from both counts as nothing, not as a perfect 1.
    """
    cases = _tensors(test_pairs, "test_pairs")
    device = next(net.parameters()).device
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    scores = []
    for image, label in cases:
        roi = tuple(max(_DIVISOR, min(patch, int(s)) - min(patch, int(s)) % _DIVISOR) for s in image.shape)
        logits = torch.as_tensor(
            sliding_window_inference(image[None, None].to(device), roi, 4, net, overlap=0.25, mode="gaussian")
        )
        prediction = logits.argmax(dim=1, keepdim=True).cpu()
        onehot = torch.nn.functional.one_hot
        pred = onehot(prediction[:, 0], num_labels).movedim(-1, 1).float()
        true = onehot(label[None].clamp(0, num_labels - 1), num_labels).movedim(-1, 1).float()
        per_label = torch.as_tensor(metric(pred, true))[0]
        present = per_label[~per_label.isnan()]
        scores.append(float(present.mean()) if present.numel() else float("nan"))
    finite = [s for s in scores if not math.isnan(s)]
    return float(np.mean(finite)) if finite else float("nan")


def segmentation_dice(
    train_pairs: Sequence[Pair],
    test_pairs: Sequence[Pair],
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 200,
    device: str | torch.device = "cpu",
    num_labels: int | None = None,
    **train_options: Any,
) -> dict[str, Any]:
    """Train once per seed and report test Dice with a 95% t-interval over seeds.

    Args:
        train_pairs, test_pairs: (image, label) ``[D, H, W]`` pairs; test pairs are real, held out.
        seeds, steps, device: as in ``train_segmenter``; ``train_options`` go there too.
        num_labels: classes incl. background; default: 1 + the largest label in any pair.

    Returns:
        ``{"mean", "ci_low", "ci_high", "per_seed": [dice per seed], "seeds", "steps",
        "num_train", "num_test"}`` (Dice in [0, 1]).
    """
    if num_labels is None:
        num_labels = 1 + max(
            int(as_label(label, as_volume(image).shape).max()) for image, label in [*train_pairs, *test_pairs]
        )
    per_seed = []
    for seed in seeds:
        net = train_segmenter(train_pairs, num_labels, seed, steps, device, **train_options)
        per_seed.append(evaluate_dice(net, test_pairs, num_labels, train_options.get("patch", 32)))
    return {
        **_summary(per_seed),
        "seeds": list(seeds),
        "steps": steps,
        "num_train": len(train_pairs),
        "num_test": len(test_pairs),
    }


def downstream_utility(
    real_train: Sequence[Pair],
    synthetic: Sequence[Pair],
    test_pairs: Sequence[Pair],
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 200,
    device: str | torch.device = "cpu",
    num_labels: int | None = None,
    real_only: dict[str, Any] | None = None,
    **train_options: Any,
) -> dict[str, Any]:
    """Dice of real-only vs real + synthetic training, same seeds, and their paired difference.

    Args:
        real_only: a ``segmentation_dice`` result for ``real_train`` with the same seeds, steps and
            test pairs, to reuse across methods instead of training the real-only arm again.

    Returns:
        ``{"real_only": segmentation_dice(...), "real_plus_synthetic": segmentation_dice(...),
        "gain": {"mean", "ci_low", "ci_high", "per_seed"}}`` where gain = (real + synthetic) - real
        per seed, with a paired t-interval.
    """
    if num_labels is None:
        everything = [*real_train, *synthetic, *test_pairs]
        num_labels = 1 + max(int(as_label(label, as_volume(image).shape).max()) for image, label in everything)
    if real_only is None:
        real_only = segmentation_dice(real_train, test_pairs, seeds, steps, device, num_labels, **train_options)
    elif list(real_only["seeds"]) != list(seeds) or real_only["steps"] != steps:
        raise ValueError("real_only was computed with other seeds or steps; the gain must be paired")
    mixed = segmentation_dice([*real_train, *synthetic], test_pairs, seeds, steps, device, num_labels, **train_options)
    gain = [b - a for a, b in zip(real_only["per_seed"], mixed["per_seed"], strict=True)]
    return {"real_only": real_only, "real_plus_synthetic": mixed, "gain": _summary(gain)}
