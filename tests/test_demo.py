"""The main job's pipeline on the small setting: every step runs and the summary holds its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.demo import SMALL, run_demo
from experiments.tracking import read_runs


def test_small_demo_runs_every_step_and_tracks_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"

    summary = run_demo(out, SMALL)

    printed = capsys.readouterr().out
    assert "gem3d demo: summary" in printed and "mlflow ui" in printed
    assert sorted(summary["epsilon"]) == ["site_0", "site_1"]
    assert all(0 < eps <= 20 for eps in summary["epsilon"].values())  # measured, and within the budget
    privacy = summary["privacy"]  # the model's statement: public pre-training, DP fine-tuning at every site
    assert privacy["non_dp_private"] == [] and privacy["public"]
    assert privacy["patient_level"]["epsilon"] == max(summary["epsilon"].values())
    assert summary["release"]["differential_privacy"]["epsilon"] == pytest.approx(privacy["patient_level"]["epsilon"])
    for site in ("site_0", "site_1"):  # each hospital wrote its own policy; its ledger lives beside its data
        assert (out / "data" / site / ".gem3d-site" / "privacy_policy.toml").exists()
        assert (out / "data" / site / ".gem3d-site" / "privacy_ledger.json").exists()
    assert "epsilon of the model (patient-level, max over sites)" in printed
    assert summary["release"]["cases"] > 0
    assert summary["release"]["policy"]["informed_source"].startswith("generate")
    assert (out / "release" / "privacy_report.json").exists()
    assert "copies" in summary["audit"] and "auc" in summary["audit"]["membership_inference"]
    assert set(summary["deenhance"]["site_spread_before"]["sites"]) == {"site_0", "site_1"}
    assert {"gem3d", "mask_only"} <= set(summary["evaluation"]["methods"])
    assert (out / "pretrained_mask_only" / "volume.safetensors").exists()
    assert (out / "pictures" / "loss.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["timings"]
    federated = read_runs(out / "mlflow", "gem3d-federated")
    assert {r["run_name"] for r in federated if r["parent_run_id"]} == {"site_0", "site_1"}
    assert read_runs(out / "mlflow", "gem3d-demo")[0]["status"] == "FINISHED"
    pretraining = read_runs(out / "mlflow", "gem3d-train")
    assert {r["run_name"] for r in pretraining} == {"pretrained-slice", "pretrained-informed"}
    assert summary["pretraining"]["steps"] == list(SMALL.pretrain_steps)
    assert "public pre-training" in printed
