"""nnU-Net v2 as the downstream judge: ``gem3d evaluate --segmenter nnunet`` (issue 15).

The field's reference segmenter decides whether synthetic data helps. For every training set of the
downstream design (real cases, or real plus synthetic ones), ``nnunet_segmenter`` writes an nnU-Net
v2 raw dataset (``gem3d.data.nnunet_raw.DatasetWriter``: ``imagesTr``, ``labelsTr``, the test
images in ``imagesTs``), runs nnU-Net's own fingerprint, planning (3d_fullres), preprocessing,
training (fold ``all``) and prediction in a separate process (``nnunet_worker``), and scores the
predictions with the protocol's Dice (``downstream.case_dice``), so the small UNet and nnU-Net are
read on one scale.

Budgets: ``full`` is nnU-Net's own schedule (``nnUNetTrainer``: 1000 epochs of 250 iterations, a
GPU job); ``short`` (``nnUNetTrainer_1epoch`` cut to 10 iterations) only shows that the pipeline
runs, on a CPU, and its records say ``capped``. nnU-Net is an optional extra:
``pip install '.[nnunet]'``.

Privacy: the real training cases are written to the work folder for nnU-Net to read; each run's
datasets, preprocessed data and weights are deleted once it is scored, and only its log is kept.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments.evaluation.downstream import Pair, case_dice, mean_dice
from experiments.evaluation.utility import Segmenter
from gem3d.data.nifti import read_label
from gem3d.data.nnunet_raw import DatasetWriter
from gem3d.errors import ConfigError, Gem3dError

DATASET_ID = 999  # every run has its own nnUNet_raw, so one id serves all
CHANNEL = "image"  # not "CT": the model-grid images are in [-1, 1], so nnU-Net z-scores them


@dataclass(frozen=True)
class NnunetBudget:
    """How long nnU-Net trains. ``epochs`` None: the trainer's own schedule (the real judge)."""

    trainer: str
    epochs: int | None = None
    iterations: int | None = None
    val_iterations: int | None = None

    @property
    def full(self) -> bool:
        return self.epochs is None


BUDGETS = {
    "full": NnunetBudget("nnUNetTrainer"),
    "short": NnunetBudget("nnUNetTrainer_1epoch", epochs=1, iterations=10, val_iterations=2),
}


def require_nnunet() -> None:
    """A ConfigError with the install line when nnU-Net v2 is not installed."""
    if importlib.util.find_spec("nnunetv2") is None:
        raise ConfigError("--segmenter nnunet: nnU-Net v2 is not installed; run: pip install '.[nnunet]'")


def nnunet_segmenter(
    test: Sequence[Pair],
    num_labels: int,
    work: Path,
    budget: NnunetBudget,
    device: str = "cpu",
    log: Callable[[str], None] = lambda message: None,
) -> Segmenter:
    """A ``utility.Segmenter`` that trains nnU-Net on each training set and scores it on ``test``.

    Args:
        test: the real test pairs (``[D, H, W]``), predicted by every run.
        work: a folder for the runs (``run_NNN/``); their logs stay in ``work/logs``.
        device: ``cpu`` or ``cuda`` (nnU-Net's trainer and predictor).
    The validation pairs the design hands over are not used: nnU-Net trains on fold ``all`` with
    its own schedule, and the cases the design holds out for validation stay out of its training.
    """
    require_nnunet()
    counter = itertools.count()
    labels = {0: "background", **{k: f"label_{k}" for k in range(1, num_labels)}}

    def fit_and_score(fit: list[Pair], val: list[Pair], seed: int) -> tuple[float, dict[str, Any]]:
        index = next(counter)
        root = work / f"run_{index:03d}"
        if root.exists():
            shutil.rmtree(root)
        raw = root / "raw"
        writer = DatasetWriter(raw / f"Dataset{DATASET_ID:03d}_gem3d", label_names=labels)
        for k, (image, label) in enumerate(fit):
            writer.add_arrays(f"case_{k:03d}", np.asarray(image, np.float32), np.asarray(label), np.eye(4))
        for k, (image, _) in enumerate(test):
            writer.add_arrays(f"test_{k:03d}", np.asarray(image, np.float32), None, np.eye(4), folder="Ts")
        writer.finish(num_labels, CHANNEL)
        job = {
            "dataset_id": DATASET_ID,
            "trainer": budget.trainer,
            "epochs": budget.epochs,
            "iterations": budget.iterations,
            "val_iterations": budget.val_iterations,
            "device": device,
            "seed": seed,
            "preprocessed": str(root / "preprocessed"),
            "test_images": str(raw / f"Dataset{DATASET_ID:03d}_gem3d" / "imagesTs"),
            "predictions": str(root / "predictions"),
            "summary": str(root / "summary.json"),
        }
        (root / "job.json").write_text(json.dumps(job))
        env = {
            **os.environ,
            "nnUNet_raw": str(raw),
            "nnUNet_preprocessed": str(root / "preprocessed"),
            "nnUNet_results": str(root / "results"),
        }
        if device == "cpu":  # a small CPU job: no torch.compile, no augmentation worker pool
            env.update({"nnUNet_compile": "false", "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"})
        logs = work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"run_{index:03d}.log"
        log(f"nnU-Net run {index}: {len(fit)} training cases, seed {seed}, {budget.trainer} (log: {log_path})")
        with log_path.open("w") as stream:
            done = subprocess.run(
                [sys.executable, "-m", "experiments.evaluation.nnunet_worker", str(root / "job.json")],
                env=env,
                stdout=stream,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode != 0:
            raise Gem3dError(f"nnU-Net run {index} failed (exit {done.returncode}); its log: {log_path}")
        summary = json.loads((root / "summary.json").read_text())
        scores = []
        for k, (_, label) in enumerate(test):
            prediction, _ = read_label(root / "predictions" / f"test_{k:03d}.nii.gz")
            scores.append(case_dice(prediction, label, num_labels))
        shutil.rmtree(root)  # the real cases' copies, preprocessed data and weights go
        record = {
            "segmenter": "nnunet",
            **summary,
            "steps": summary["epochs"] * summary["iterations_per_epoch"],
            "capped": not budget.full,  # a cut schedule: not a converged nnU-Net
            "log": str(log_path),
        }
        return mean_dice(scores), record

    return fit_and_score


__all__ = ["BUDGETS", "NnunetBudget", "nnunet_segmenter", "require_nnunet"]
