"""The memorization audit: planted copies are flagged, new cases pass; the MIA statistic; gem3d audit."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from experiments.cli import main
from gem3d.config import Config
from gem3d.data.dataset import load_volumes
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.errors import DataError
from gem3d.runs import build_model
from privacy.audit import AuditSettings, membership_inference, memorization_audit, rank_auc

SHAPE = (16, 16, 12)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train, holdout and a clean synthetic set: phantoms from one distribution, different seeds."""
    root = tmp_path_factory.mktemp("audit")
    return {
        "train": write_phantom_dataset(root / "train", num_cases=8, shape=SHAPE, seed=11),
        "holdout": write_phantom_dataset(root / "holdout", num_cases=6, shape=SHAPE, seed=12),
        "clean": write_phantom_dataset(root / "clean", num_cases=6, shape=SHAPE, seed=13),
    }


def _plant_copy(cohorts: dict[str, Path], out: Path, train_case: str = "phantom_003") -> Path:
    """The clean synthetic set with its last case replaced by a training case."""
    shutil.copytree(cohorts["clean"], out)
    train = cohorts["train"]
    shutil.copy(train / "imagesTr" / f"{train_case}_0000.nii.gz", out / "imagesTr" / "phantom_005_0000.nii.gz")
    shutil.copy(train / "labelsTr" / f"{train_case}.nii.gz", out / "labelsTr" / "phantom_005.nii.gz")
    return out


def test_clean_synthetic_set_passes(cohorts: dict[str, Path], micro_cfg: Config) -> None:
    synthetic, train, holdout = (load_volumes(cohorts[k], micro_cfg.data) for k in ("clean", "train", "holdout"))

    result = memorization_audit(synthetic, train, holdout)

    assert result.passed and result.copies == []
    assert result.report()["passed"] is True
    assert set(result.thresholds) == {"image", "feature"}


def test_planted_copy_is_flagged(cohorts: dict[str, Path], micro_cfg: Config, tmp_path: Path) -> None:
    planted = _plant_copy(cohorts, tmp_path / "synthetic")
    folders = (planted, cohorts["train"], cohorts["holdout"])
    synthetic, train, holdout = (load_volumes(folder, micro_cfg.data) for folder in folders)

    result = memorization_audit(synthetic, train, holdout)

    assert result.copies == ["phantom_005"]
    case = result.report()["per_case"][-1]
    assert case["copy"] and case["image"]["nearest_train"] == "phantom_003"
    assert case["image"]["nn_distance"] == pytest.approx(0.0, abs=1e-6)


def test_perturbed_copy_is_flagged_without_holdout(cohorts: dict[str, Path], micro_cfg: Config) -> None:
    train = load_volumes(cohorts["train"], micro_cfg.data)
    synthetic = load_volumes(cohorts["clean"], micro_cfg.data)
    rng = np.random.default_rng(0)
    noisy = (train[2].image + rng.normal(0.0, 0.03, train[2].image.shape)).astype(np.float32)
    synthetic[0] = replace(train[2], case_id="syn_noisy", image=np.clip(noisy, -1, 1))

    result = memorization_audit(synthetic, train, holdout=None)

    assert result.copies == ["syn_noisy"]
    assert result.reference.startswith("train-to-train")


def test_holdout_that_overlaps_the_training_set_is_refused(cohorts: dict[str, Path], micro_cfg: Config) -> None:
    train = load_volumes(cohorts["train"], micro_cfg.data)

    with pytest.raises(DataError, match="holdout case phantom_001 is identical to training case phantom_001"):
        memorization_audit(train[:2], train, train[1:3], AuditSettings())


def test_rank_auc_is_the_mann_whitney_statistic() -> None:
    assert rank_auc([3, 4], [1, 2]) == 1.0
    assert rank_auc([1, 2], [3, 4]) == 0.0
    assert rank_auc([1, 1], [1, 1]) == 0.5
    assert rank_auc([2, 4], [1, 3]) == pytest.approx(0.75)


def test_membership_inference_is_seeded(cohorts: dict[str, Path], micro_cfg: Config) -> None:
    train = load_volumes(cohorts["train"], micro_cfg.data)[:2]
    holdout = load_volumes(cohorts["holdout"], micro_cfg.data)[:2]
    model = build_model("slice", micro_cfg)

    first = membership_inference(model, "slice", micro_cfg, train, holdout, draws=1, seed=5)
    second = membership_inference(model, "slice", micro_cfg, train, holdout, draws=1, seed=5)

    assert first == second
    assert 0.0 <= first["auc"] <= 1.0
    assert first["train_cases"] == 2 and first["holdout_cases"] == 2


def test_gem3d_audit_exit_codes_and_outputs(
    cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    planted = _plant_copy(cohorts, tmp_path / "synthetic")
    common = ["--set", "data.image_size=16", "--train", str(cohorts["train"]), "--holdout", str(cohorts["holdout"])]
    common += ["--track", "off"]  # tracking has its own tests (tests/test_tracking_commands.py)

    clean_code = main(["audit", *common, "--synthetic", str(cohorts["clean"]), "--out", str(tmp_path / "clean.json")])
    copy_code = main(["audit", *common, "--synthetic", str(planted), "--out", str(tmp_path / "copy.json")])

    assert clean_code == 0 and copy_code == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 of 6 synthetic volumes copy training volumes (phantom_005)" in err
    report = json.loads((tmp_path / "copy.json").read_text())
    assert report["copies"] == 1 and report["passed"] is False
    assert (tmp_path / "copy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "clean.json").read_text())["passed"] is True
