"""Every sampling and analysis command logs one MLflow run: config, options, figures, outputs.

The commands run for real (``experiments.cli.main``) on a micro run, against MLflow's real local
SQLite store, and the runs are read back. Outputs are written into one project folder so that the
default store (``mlflow/`` beside ``--out``) is shared: creating a store's schema costs seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from mlflow import MlflowClient

from experiments.cli import main
from experiments.tracking import read_runs, tracking_uri
from gem3d.data.phantoms import write_phantom_dataset


@pytest.fixture(autouse=True)
def _no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    # The embedded store is the subject here; a developer's own server must not receive test runs.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def run(micro_run: Path) -> Path:
    return micro_run


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every test writes its outputs into; their default store is ``project/mlflow``."""
    return tmp_path_factory.mktemp("project")


def _gem3d(*args: object) -> int:
    return main([str(a) for a in args])


def _the_run(store: Path, command: str, run_name: str) -> dict[str, Any]:
    runs = [r for r in read_runs(store, f"gem3d-{command}") if r["run_name"] == run_name]
    assert len(runs) == 1, runs
    return runs[0]


def _artifacts(store: Path, run_id: str, folder: str | None = None) -> set[str]:
    client = MlflowClient(tracking_uri=tracking_uri(store))
    return {a.path for a in client.list_artifacts(run_id, folder)}


def test_sample_logs_config_options_time_and_outputs_beside_out(run: Path, phantom_dir: Path, project: Path) -> None:
    # prepare
    mask = phantom_dir / "labelsTr" / "phantom_001.nii.gz"
    image = phantom_dir / "imagesTr" / "phantom_001_0000.nii.gz"

    # execute
    code = _gem3d(
        "sample", "--checkpoint", run, "--mask", mask, "--informed", f"real:{image}@6",
        "--seed", 3, "--steps", 4, "--start", 5, "--out", project / "one.nii.gz",
    )  # fmt: skip

    # assert
    assert code == 0
    store = project / "mlflow"
    logged = _the_run(store, "sample", "one")
    assert logged["status"] == "FINISHED"
    params, metrics, tags = logged["params"], logged["metrics"], logged["tags"]
    assert params["data.image_size"] == "16" and params["model.channels"] == "[8, 16]"  # the run's config
    assert params["args.seed"] == "3" and params["args.steps"] == "4" and params["args.start"] == "5"
    assert params["args.informed"] == f"real:{image}@6" and "args.track" not in params
    provenance = json.loads((project / "one.provenance.json").read_text())
    assert tags["checkpoint_sha256.volume"] == provenance["checkpoints"]["volume"]
    assert tags["checkpoint_sha256.informed"] == provenance["checkpoints"]["informed"]
    assert tags["gem3d.command"] == "sample"
    assert metrics["cases"] == 1 and metrics["seconds_total"] > 0
    assert metrics["seconds_per_volume"] == pytest.approx(metrics["seconds_total"])
    assert _artifacts(store, logged["run_id"]) >= {"one.provenance.json", "config.json", "previews"}
    assert _artifacts(store, logged["run_id"], "previews") == {"previews/one.png"}


def test_counterfactual_logs_its_mask_edits(run: Path, phantom_dir: Path, project: Path) -> None:
    # prepare
    mask = phantom_dir / "labelsTr" / "phantom_001.nii.gz"
    other = phantom_dir / "imagesTr" / "phantom_003_0000.nii.gz"

    # execute
    code = _gem3d(
        "counterfactual", "--checkpoint", run, "--mask", mask, "--informed", f"real:{other}",
        "--remove-label", 3, "--out", project / "cf.nii.gz",
    )  # fmt: skip

    # assert
    assert code == 0
    logged = _the_run(project / "mlflow", "counterfactual", "cf")
    assert logged["status"] == "FINISHED"
    assert logged["params"]["args.remove_label"] == "3" and logged["tags"]["mask_edits"] == "remove:3"
    assert logged["metrics"]["cases"] == 1
    assert _artifacts(project / "mlflow", logged["run_id"], "previews") == {"previews/cf.png"}


def test_enhance_store_lands_beside_the_dataset_never_inside(run: Path, phantom_dir: Path, project: Path) -> None:
    # prepare
    out = project / "enhanced"

    # execute
    code = _gem3d(
        "enhance", "--checkpoint", run, "--data", phantom_dir, "--per-case", 1,
        "--informed", "copy", "--mask-edit", "flip", "--out", out,
    )  # fmt: skip

    # assert
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "labelsTr", "previews", "provenance"]
    store = project / "mlflow"
    logged = _the_run(store, "enhance", "enhanced")
    assert logged["params"]["args.per_case"] == "1" and logged["params"]["args.informed"] == "copy"
    assert logged["params"]["args.mask_edit"] == "flip"
    assert logged["metrics"]["cases"] == 4
    assert logged["metrics"]["seconds_per_volume"] == pytest.approx(logged["metrics"]["seconds_total"] / 4)
    assert len(_artifacts(store, logged["run_id"], "previews")) == 4
    assert len(_artifacts(store, logged["run_id"], "provenance")) == 4


def test_deenhance_logs_the_site_spread_and_its_report(
    run: Path, phantom_dir: Path, two_site_dir: Path, project: Path
) -> None:
    # prepare
    reference = phantom_dir / "imagesTr" / "phantom_000_0000.nii.gz"
    out = project / "deenhanced"

    # execute
    source = f"{reference}@6"
    code = _gem3d("deenhance", "--checkpoint", run, "--data", two_site_dir, "--reference", source, "--out", out)

    # assert
    assert code == 0
    assert not (out / "mlflow").exists()
    report = json.loads((out / "deenhance_report.json").read_text())
    logged = _the_run(project / "mlflow", "deenhance", "deenhanced")
    metrics = logged["metrics"]
    assert metrics["cases"] == 4
    assert metrics["spread_before"] == pytest.approx(report["site_spread_before"]["mean"])
    assert metrics["spread_after"] == pytest.approx(report["site_spread_after"]["mean"])
    assert metrics["spread_reduction"] == pytest.approx(report["spread_reduction"])
    assert metrics["spread_before.label_1"] == pytest.approx(report["site_spread_before"]["per_label"]["1"])
    assert logged["tags"]["sites"] == "site_0,site_1"
    assert "deenhance_report.json" in _artifacts(project / "mlflow", logged["run_id"])


def test_audit_logs_copies_nearest_neighbours_and_mia_auc(run: Path, phantom_dir: Path, project: Path) -> None:
    # prepare
    synthetic = write_phantom_dataset(project / "audit_synthetic", num_cases=3, shape=(16, 16, 12), seed=13)
    holdout = write_phantom_dataset(project / "audit_holdout", num_cases=3, shape=(16, 16, 12), seed=12)

    # execute
    code = _gem3d(
        "audit", "--synthetic", synthetic, "--train", phantom_dir, "--holdout", holdout,
        "--checkpoint", run, "--mia-draws", 1, "--grid", 16, "--out", project / "audit.json",
        "--quantile", 0.34,  # three holdout cases: the lowest quantile they can place
    )  # fmt: skip

    # assert
    report = json.loads((project / "audit.json").read_text())
    assert code == (0 if report["passed"] else 3)
    logged = _the_run(project / "mlflow", "audit", "audit")
    metrics = logged["metrics"]
    assert logged["status"] == "FINISHED" and logged["tags"]["audit.passed"] == str(report["passed"])
    assert metrics["copies"] == report["copies"] and metrics["volumes.synthetic"] == 3
    assert metrics["threshold.image"] == pytest.approx(report["thresholds"]["image"])
    assert metrics["nn_synthetic.feature.min"] == pytest.approx(report["synthetic_nn"]["feature"]["min"])
    assert metrics["nn_reference.image.median"] == pytest.approx(report["reference_nn"]["image"]["median"])
    assert metrics["mia.auc"] == pytest.approx(report["membership_inference"]["auc"])
    assert logged["params"]["args.grid"] == "16" and logged["params"]["data.num_labels"] == "4"
    assert len(logged["tags"]["checkpoint_sha256.volume"]) == 64
    assert _artifacts(project / "mlflow", logged["run_id"]) >= {"audit.json", "audit.png", "config.json"}


def test_evaluate_tracks_by_default_and_keeps_its_report_logging(run: Path, project: Path) -> None:
    # prepare
    held_out = write_phantom_dataset(project / "eval_raw", num_cases=2, shape=(16, 16, 12), seed=7)

    # execute
    code = _gem3d(
        "evaluate", "--checkpoint", run, "--data", held_out, "--out", project / "evaluation.json",
        "--baselines", "none", "--quick", "--threads", 1,
    )  # fmt: skip

    # assert
    assert code == 0
    report = json.loads((project / "evaluation.json").read_text())
    logged = _the_run(project / "mlflow", "evaluate", "evaluation")
    gain = report["downstream"]["headline"]["gain"]["mean"]
    assert logged["metrics"]["downstream.gain.mean"] == pytest.approx(gain)  # the utility answer is tracked
    assert logged["status"] == "FINISHED" and logged["tags"]["protocol"] == report["protocol"]
    assert logged["metrics"]["gem3d.psnr"] == pytest.approx(report["methods"]["gem3d"]["fidelity"]["psnr"])
    assert logged["params"]["data.image_size"] == "16" and logged["params"]["args.quick"] == "True"
    assert logged["tags"]["checkpoint_sha256.volume"] == report["checkpoint"]["sha256"]["volume"]
    assert _artifacts(project / "mlflow", logged["run_id"], "evaluation") == {
        "evaluation/evaluation.json",
        "evaluation/evaluation.png",
        "evaluation/evaluation_utility.png",
    }


def test_a_command_that_raises_ends_its_run_failed(run: Path, phantom_dir: Path, project: Path) -> None:
    # arrange: a gzipped mask whose header reads (the checks before the run pass) but whose
    # compressed voxels are cut short (their size cannot be checked without decompressing them)
    label = nib.load(phantom_dir / "labelsTr" / "phantom_002.nii.gz")
    truncated = project / "truncated_mask.nii.gz"
    noise = np.random.default_rng(0).integers(0, 3, label.shape).astype(np.int16)  # does not compress away
    nib.save(nib.Nifti1Image(noise, label.affine), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])

    # execute: the voxels are read after the run opened
    code = _gem3d(
        "sample", "--checkpoint", run, "--mask", truncated,
        "--informed", "generate", "--out", project / "failed.nii.gz",
    )  # fmt: skip

    # assert
    assert code == 2
    assert _the_run(project / "mlflow", "sample", "failed")["status"] == "FAILED"
    assert not (project / "failed.nii.gz").exists()


def test_track_off_writes_no_store(run: Path, phantom_dir: Path, tmp_path: Path) -> None:
    # execute
    code = _gem3d(
        "sample", "--checkpoint", run, "--mask", phantom_dir / "labelsTr" / "phantom_002.nii.gz",
        "--informed", "generate", "--out", tmp_path / "s.nii.gz", "--track", "off",
    )  # fmt: skip

    # assert
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.nii.gz", "s.png", "s.provenance.json"]


def test_an_unreachable_tracking_server_does_not_break_the_command(
    run: Path, phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # prepare: nothing listens on port 9 (discard) of localhost
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")

    # execute
    code = _gem3d(
        "sample", "--checkpoint", run, "--mask", phantom_dir / "labelsTr" / "phantom_002.nii.gz",
        "--informed", "generate", "--out", tmp_path / "s.nii.gz",
    )  # fmt: skip

    # assert
    assert code == 0 and (tmp_path / "s.nii.gz").exists()
    assert "MLflow tracking disabled" in caplog.text
    assert not (tmp_path / "mlflow").exists()
