"""The memorization audit plays the copier: planted copies of every kind a person would call one are
caught, different patients of the same site pass; the reference size, the published report and the
membership-inference statistics; ``gem3d audit``."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from experiments.cli import main
from gem3d.config import Config, DataConfig
from gem3d.data.dataset import load_volumes
from gem3d.data.demo_cohort import write_demo_cohort
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.data.volume import Volume
from gem3d.errors import DataError
from gem3d.runs import build_model
from privacy.audit import (
    AuditReferenceError,
    AuditSettings,
    auc_interval,
    membership_inference,
    memorization_audit,
    planted_copy,
    rank_auc,
    settings_from_json,
    settings_to_json,
    timestep_losses,
    tpr_at_fpr,
)

DATA = DataConfig(image_size=32, window=4, num_labels=4)
SETTINGS = AuditSettings(quantile=0.1)  # ten holdout patients: enough for the 0.1 quantile
PLANTED = ("exact", "flip_lr", "flip_ap", "shift_2", "scale", "gamma", "noise_15", "slice")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One demo site: 12 training patients; 14 held-out patients of the same site (10 reference, 4 new)."""
    root = write_demo_cohort(tmp_path_factory.mktemp("audit") / "cohort", sites=1, cases_per_site=12, test_per_site=14)
    held_out = load_volumes(root / "test", DATA)
    return {"root": root, "train": load_volumes(root / "site_0", DATA), "holdout": held_out[:10], "new": held_out[10:]}


def _planted(cohort: dict[str, Any], kinds: tuple[str, ...] = PLANTED) -> list[Volume]:
    """One copy of each kind, each of a different training patient (the copied slice goes into a new patient)."""
    rng = np.random.default_rng(0)
    train, new = cohort["train"], cohort["new"]
    return [
        replace(train[i], case_id=f"copy_{kind}", image=planted_copy(kind, train[i].image, new[0].image, rng))
        for i, kind in enumerate(kinds)
    ]


def test_planted_copies_of_every_kind_are_caught_and_new_patients_pass(cohort: dict[str, Any]) -> None:
    # prepare: four patients the model never saw, and the planted copies
    synthetic = [*cohort["new"], *_planted(cohort)]

    # execute
    result = memorization_audit(synthetic, cohort["train"], cohort["holdout"], SETTINGS)

    # assert: every copy caught, by the volume check or the slice check; no new patient flagged
    missed = [kind for kind in PLANTED if f"copy_{kind}" not in result.copies]
    false_alarms = [case.case_id for case in cohort["new"] if case.case_id in result.copies]
    assert missed == [] and false_alarms == []
    slice_copy = result.synthetic_ids.index("copy_slice")
    assert result.slice_flags[slice_copy] and not result.volume_flags[slice_copy]  # invisible to whole volumes
    assert result.copied_slices[slice_copy] == 1
    flipped = result.synthetic_ids.index("copy_flip_lr")
    assert result.train_ids[result.synthetic_nearest["image"][flipped]] == cohort["train"][1].case_id


def test_different_patients_of_the_same_site_pass(cohort: dict[str, Any]) -> None:
    result = memorization_audit(cohort["new"], cohort["train"], cohort["holdout"], SETTINGS)

    assert result.passed and result.copies == []
    assert result.verdict() == {
        "passed": True,
        "synthetic": 4,
        "copies": 0,
        "volume_copies": 0,
        "slice_copies": 0,
        "reference": "holdout",
        "reference_cases": 10,
    }
    assert set(result.thresholds) == {"image", "feature", "slice"}


def test_leave_one_out_catches_a_noisy_copy_and_interpolates_the_quantile(cohort: dict[str, Any]) -> None:
    synthetic = [*cohort["new"], *_planted(cohort, ("noise_15",))]

    result = memorization_audit(synthetic, cohort["train"], None, SETTINGS)

    assert result.copies == ["copy_noise_15"]
    assert result.reference.startswith("train-to-train") and result.verdict()["reference_cases"] == 12
    reference = np.sort(result.reference_nn["image"])
    assert result.thresholds["image"] == pytest.approx(SETTINGS.margin * np.quantile(reference, SETTINGS.quantile))
    assert result.thresholds["image"] > SETTINGS.margin * reference[0]  # not the minimum


def test_too_few_reference_cases_are_refused_with_what_to_do(cohort: dict[str, Any]) -> None:
    synthetic, train, holdout = cohort["new"], cohort["train"], cohort["holdout"][:3]

    with pytest.raises(AuditReferenceError, match=r"3 holdout cases .* 0\.05 quantile needs at least 20; add holdout"):
        memorization_audit(synthetic, train, holdout)
    with pytest.raises(AuditReferenceError, match=r"12 training cases \(leave-one-out.* needs at least 20"):
        memorization_audit(synthetic, train, None)
    with pytest.raises(AuditReferenceError, match="--min-reference asks at least 4"):
        memorization_audit(synthetic, train, holdout, AuditSettings(quantile=0.5, min_reference=4))
    assert memorization_audit(synthetic, train, holdout, AuditSettings(quantile=0.4)).reference_cases == 3
    assert issubclass(AuditReferenceError, DataError)


def test_holdout_that_overlaps_the_training_set_is_refused(cohort: dict[str, Any]) -> None:
    train = cohort["train"]

    shared = f"2 of 2 holdout cases are training cases \\({train[1].case_id} = training {train[1].case_id}, "
    with pytest.raises(DataError, match=shared):
        memorization_audit(train[:2], train, train[1:3], AuditSettings(quantile=0.5))


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_the_published_report_and_the_verdict_hold_no_distance_or_id(cohort: dict[str, Any]) -> None:
    synthetic = [*cohort["new"], *_planted(cohort, ("exact",))]
    result = memorization_audit(synthetic, cohort["train"], cohort["holdout"], SETTINGS)

    public, private = result.report(include_ids=False), result.report()

    text = json.dumps(public)
    assert public["format"] == "gem3d-audit/2" and public["copies"] == 1 and public["per_case"] == []
    assert not _keys(public) & {"nn_distance", "nearest_train", "case", "min", "max"}
    assert all(case.case_id not in text for case in [*synthetic, *cohort["train"], *cohort["holdout"]])
    assert private["per_case"][-1]["image"]["nearest_train"] == cohort["train"][0].case_id
    verdict = result.verdict()
    assert set(verdict) == {"passed", "synthetic", "copies", "volume_copies", "slice_copies", "reference"} | {
        "reference_cases"
    }
    assert all(isinstance(value, bool | int | str) for value in verdict.values()) and verdict["passed"] is False


def test_settings_travel_as_json_and_bad_ones_are_refused() -> None:
    settings = AuditSettings(quantile=0.2, min_reference=6, grid=(16, 16, 16))

    assert settings_from_json(settings_to_json(settings)) == settings
    with pytest.raises(DataError, match="unknown field"):
        settings_from_json('{"quantile": 0.2, "secret": 1}')
    with pytest.raises(DataError, match="quantile must be strictly between 0 and 1"):
        settings_from_json('{"quantile": 0}')


def test_rank_auc_is_the_mann_whitney_statistic() -> None:
    assert rank_auc([3, 4], [1, 2]) == 1.0
    assert rank_auc([1, 2], [3, 4]) == 0.0
    assert rank_auc([1, 1], [1, 1]) == 0.5
    assert rank_auc([2, 4], [1, 3]) == pytest.approx(0.75)


def test_auc_interval_is_seeded_and_tpr_at_fpr_counts_false_positives() -> None:
    rng = np.random.default_rng(1)
    members, non_members = rng.normal(0.5, 1.0, 30), rng.normal(0.0, 1.0, 200)

    first, second = auc_interval(members, non_members, seed=3), auc_interval(members, non_members, seed=3)

    assert first == second and first != auc_interval(members, non_members, seed=4)
    assert first[0] < rank_auc(members, non_members) < first[1]
    assert auc_interval(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == (1.0, 1.0)
    # 200 non-members: 1% allows the 2 highest above the threshold; the members above the third pass
    scores = np.arange(200.0)
    assert tpr_at_fpr(np.array([196.5, 197.5, 198.5]), scores) == (2 / 3, 0.01)
    assert tpr_at_fpr(np.array([5.0]), np.array([1.0, 9.0])) == (0.0, 0.0)  # 2 non-members: zero FP only


def test_membership_inference_reports_an_interval_and_tpr_and_is_seeded(micro_cfg: Config, tmp_path: Path) -> None:
    train = load_volumes(
        write_phantom_dataset(tmp_path / "train", num_cases=3, shape=(16, 16, 12), seed=5), micro_cfg.data
    )
    holdout = load_volumes(
        write_phantom_dataset(tmp_path / "ho", num_cases=2, shape=(16, 16, 12), seed=6), micro_cfg.data
    )
    model = _random_denoiser(micro_cfg)

    first = membership_inference(model, "slice", micro_cfg, train, holdout, draws=1, seed=5, resamples=200)
    second = membership_inference(model, "slice", micro_cfg, train, holdout, draws=1, seed=5, resamples=200)

    assert first == second
    low, high = first["auc_ci95"]
    assert 0.0 <= low <= first["auc"] <= high <= 1.0 and 0.0 <= first["auc_loss"] <= 1.0
    assert 0.0 <= first["tpr_at_1pct_fpr"] <= 1.0 and first["nonmembers_needed_for_1pct_fpr"] == 100
    assert "zero false positives" in first["tpr_note"] and first["fpr_resolution"] == 0.5
    assert first["auc_null_sd"] == pytest.approx(np.sqrt(6 / 72))
    with pytest.raises(ValueError, match="draws must be >= 1"):
        membership_inference(model, "slice", micro_cfg, train, holdout, draws=0)


def _random_denoiser(cfg: Config) -> torch.nn.Module:
    """The micro slice denoiser with every weight perturbed (seeded): its error depends on the case.

    A fresh one predicts zero (MONAI zero-initialises the output conv), so every case's error
    would be the noise's own energy, the same for all.
    """
    model = build_model("slice", cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def test_every_case_sees_the_same_windows_and_noise(micro_cfg: Config, phantom_dir: Path) -> None:
    volumes = load_volumes(phantom_dir, micro_cfg.data)
    model = _random_denoiser(micro_cfg)

    losses = timestep_losses(model, "slice", micro_cfg, [volumes[0], volumes[1], volumes[0]], [20, 500], draws=2)

    assert losses.shape == (3, 2)
    np.testing.assert_array_equal(losses[0], losses[2])  # the same case, anywhere in the batch
    assert not np.array_equal(losses[0], losses[1])


def _subset(src: Path, dst: Path, volumes: list[Volume], planted: Volume | None = None) -> Path:
    """A raw dataset folder of some of ``src``'s cases (and one planted copy, written like its source)."""
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    for case in volumes:
        shutil.copy(src / "imagesTr" / f"{case.case_id}_0000.nii.gz", dst / "imagesTr")
        shutil.copy(src / "labelsTr" / f"{case.case_id}.nii.gz", dst / "labelsTr")
    if planted is not None:  # the training case's files under a synthetic name: an exact copy
        shutil.copy(
            src.parent / "site_0" / "imagesTr" / f"{planted.case_id}_0000.nii.gz", dst / "imagesTr" / "syn_0000.nii.gz"
        )
        shutil.copy(src.parent / "site_0" / "labelsTr" / f"{planted.case_id}.nii.gz", dst / "labelsTr" / "syn.nii.gz")
    dataset = json.loads((src / "dataset.json").read_text())
    dataset["numTraining"] = len(volumes) + (planted is not None)
    (dst / "dataset.json").write_text(json.dumps(dataset))
    return dst


def test_gem3d_audit_exit_codes_outputs_and_refusals(
    cohort: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # prepare
    test = cohort["root"] / "test"
    holdout = _subset(test, tmp_path / "holdout", cohort["holdout"])
    clean = _subset(test, tmp_path / "clean", cohort["new"])
    planted = _subset(test, tmp_path / "planted", cohort["new"][:3], planted=cohort["train"][4])
    common = ["--train", str(cohort["root"] / "site_0"), "--holdout", str(holdout), "--track", "off"]

    # execute
    clean_code = main(
        ["audit", *common, "--quantile", "0.1", "--synthetic", str(clean), "--out", str(tmp_path / "c.json")]
    )
    copy_code = main(
        ["audit", *common, "--quantile", "0.1", "--synthetic", str(planted), "--out", str(tmp_path / "p.json")]
    )
    copy_err = capsys.readouterr().err
    few_code = main(["audit", *common, "--synthetic", str(clean), "--out", str(tmp_path / "few.json")])
    few_err = capsys.readouterr().err

    # assert
    assert clean_code == 0 and copy_code == 3 and few_code == 2
    assert copy_err.count("\n") == 1 and "1 of 4 synthetic volumes copy training volumes (syn)" in copy_err
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["format"] == "gem3d-audit/2" and report["copies"] == 1 and report["passed"] is False
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "c.json").read_text())["passed"] is True
    assert (
        few_err.count("\n") == 1
        and "10 holdout cases" in few_err
        and "add holdout cases or raise --quantile" in few_err
    )
    assert not (tmp_path / "few.json").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--mia-draws", "0", "expected an integer >= 1"),
        ("--grid", "4", "expected 8..128"),
        ("--quantile", "1", "strictly between 0 and 1"),
        ("--margin", "0", "expected a number > 0"),
        ("--min-reference", "0", "expected an integer >= 1"),
    ],
)
def test_gem3d_audit_refuses_out_of_range_options(
    option: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["audit", "--synthetic", "s", "--train", "t", "--holdout", "h", "--out", str(tmp_path / "r.json")]

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, option, value])

    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and option in err and message in err
