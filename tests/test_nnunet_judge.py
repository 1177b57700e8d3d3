"""nnU-Net v2 as the downstream judge (issue 15): its own pipeline end to end, scored with the protocol's Dice.

These need the nnunet extra; ``make test-nnunet`` installs it and runs them (``-m nnunet``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from experiments.evaluation.nnunet_judge import BUDGETS, nnunet_segmenter, require_nnunet
from gem3d.errors import ConfigError

HAS_NNUNET = importlib.util.find_spec("nnunetv2") is not None


def _sphere(seed: int, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.arange(size),) * 3, indexing="ij"), axis=-1)
    label = (np.linalg.norm(grid - rng.uniform(7, size - 7, 3), axis=-1) < rng.uniform(4, 6)).astype(np.uint8)
    image = -0.8 + 1.6 * label + rng.normal(0.0, 0.1, label.shape)
    return image.astype(np.float32), label


@pytest.mark.skipif(HAS_NNUNET, reason="nnU-Net v2 is installed here")
def test_without_the_extra_the_judge_says_how_to_install_it() -> None:
    with pytest.raises(ConfigError, match=r"pip install '\.\[nnunet\]'"):
        require_nnunet()


@pytest.mark.nnunet
def test_nnunet_plans_trains_predicts_and_is_scored_with_the_protocol_dice(tmp_path: Path) -> None:
    # prepare
    pytest.importorskip("nnunetv2")
    train, test = [_sphere(s) for s in range(3)], [_sphere(s) for s in range(10, 12)]
    logs: list[str] = []
    segmenter = nnunet_segmenter(test, 2, tmp_path / "work", BUDGETS["short"], "cpu", logs.append)

    # execute
    dice, record = segmenter(train, [], 0)
    wrong, _ = segmenter([(image, 1 - label) for image, label in train], [], 0)

    # assert
    assert dice > 0.6  # nnU-Net learned the spheres in its 10 iterations
    assert wrong < 0.3  # the Dice reads nnU-Net's predictions: inverted training labels score low
    assert record["segmenter"] == "nnunet" and record["trainer"] == "nnUNetTrainer_1epoch"
    assert record["steps"] == 10 and record["capped"] is True  # the short budget says it is cut
    assert len(record["patch_size"]) == 3
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["logs"]  # real data copies are gone
    assert Path(record["log"]).read_text().count("Epoch 0") >= 1
    assert len(logs) == 2
