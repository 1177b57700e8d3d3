"""The main job's pipeline on the small setting: every step runs and the summary holds its figures."""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
from pathlib import Path
from types import ModuleType

import pytest

from experiments.commands import audit, counterfactual, deenhance, demo_data, enhance, evaluate, release, sample, train
from experiments.commands.common import CommandOptions
from experiments.commands.runner import Parser, add_command
from experiments.demo import (
    SMALL,
    SMALL_LATENT,
    DemoState,
    _train_in_child,
    build_cohort,
    pretrain_public,
    run_demo,
    summary_lines,
    train_federated,
)
from experiments.tracking import read_runs
from gem3d.checkpoint import load_checkpoint, subset
from gem3d.errors import Gem3dError

# what the demo (and any caller) gives each command's typed function, against what its parser reads
OPTIONS: dict[ModuleType, type[CommandOptions]] = {
    demo_data: demo_data.DemoDataOptions,
    train: train.TrainOptions,
    sample: sample.SampleOptions,
    counterfactual: counterfactual.CounterfactualOptions,
    enhance: enhance.EnhanceOptions,
    deenhance: deenhance.DeenhanceOptions,
    audit: audit.AuditOptions,
    release: release.ReleaseOptions,
    evaluate: evaluate.EvaluateOptions,
}


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
    baseline_log = (out / "pretrained_mask_only.log").read_text()  # the child process's own output
    assert "slice: step" in baseline_log and "volume: step" in baseline_log
    assert (out / "pictures" / "loss.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["timings"]
    federated = read_runs(out / "mlflow", "gem3d-federated")
    assert {r["run_name"] for r in federated if r["parent_run_id"]} == {"site_0", "site_1"}
    assert read_runs(out / "mlflow", "gem3d-demo")[0]["status"] == "FINISHED"
    pretraining = read_runs(out / "mlflow", "gem3d-train")
    assert {r["run_name"] for r in pretraining} == {"pretrained-slice", "pretrained-informed"}
    assert summary["pretraining"]["steps"] == list(SMALL.pretrain_steps)
    assert "public pre-training" in printed
    before = sorted(str(p) for p in out.rglob("*"))
    with pytest.raises(Gem3dError, match=r"holds a demo made with other settings \(config tiny\)"):
        run_demo(out, SMALL_LATENT)  # a latent demo resumed into a pixel one's folder would mix the two
    assert sorted(str(p) for p in out.rglob("*")) == before  # refused before any work


@pytest.mark.parametrize("module", list(OPTIONS), ids=[module.NAME for module in OPTIONS])
def test_a_commands_options_are_field_for_field_what_its_parser_reads(module: ModuleType) -> None:
    subparsers = Parser(prog="gem3d").add_subparsers(dest="command")
    add_command(subparsers, module)
    parser = subparsers.choices[module.NAME]
    fields = {f.name: f for f in dataclasses.fields(OPTIONS[module])}

    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]

    assert {a.dest for a in actions} == set(fields)
    for action in actions:  # the same defaults, and an option the parser requires has none
        default = fields[action.dest].default
        if action.required:
            assert default is dataclasses.MISSING, action.dest
        else:
            expected = tuple(action.default) if isinstance(action.default, list) else action.default
            assert default == expected, action.dest


def test_the_baseline_child_trains_through_the_library_and_logs_a_failure_in_one_line(tmp_path: Path) -> None:
    log, missing = tmp_path / "baseline.log", tmp_path / "no-such-data"
    log.write_text("")
    stages = (train.TrainOptions(data=missing, stage="slice", out=tmp_path / "run", public_data=True, track="off"),)

    child = multiprocessing.get_context("spawn").Process(target=_train_in_child, args=(stages, log))
    child.start()
    child.join(timeout=300)

    text = log.read_text()
    assert child.exitcode == 2  # what `gem3d train` exits on bad input
    assert text.splitlines()[-1].startswith("gem3d train: error: ") and str(missing) in text
    assert "Traceback" not in text


def _codec(path: Path) -> dict[str, object]:
    """A latent checkpoint's autoencoder weights (EMA copy), by name inside the autoencoder."""
    return {n[len("codec.") :]: t for n, t in subset(load_checkpoint(path)[0], "ema").items() if n.startswith("codec.")}


def test_the_small_latent_demo_shares_one_public_autoencoder(tmp_path: Path) -> None:
    # the latent demo's own steps (its release, audit and evaluation are the pixel demo's code, and a
    # latent model's release is tests/test_latent.py's): the public stage 0 and the federated rounds
    state = DemoState(out=tmp_path / "demo", settings=SMALL_LATENT)
    tracking = state.out / "mlflow"

    build_cohort(state)
    pretrain_public(state, tracking)
    train_federated(state, tracking)

    assert any("latent: autoencoder (stage 0) steps" in line for line in summary_lines(state))
    autoencoder = subset(load_checkpoint(state.pretrained / "autoencoder.safetensors")[0], "ema")
    for run in (state.run, state.mask_only):  # the sites and the baseline: one codec
        for stage in ("slice", "volume"):
            codec = _codec(run / f"{stage}.safetensors")
            assert codec.keys() == autoencoder.keys(), (run, stage)
            assert all(bool((codec[n] == autoencoder[n]).all()) for n in codec), (run, stage)  # type: ignore[union-attr]
    privacy = state.summary["privacy"]
    assert privacy["non_dp_private"] == [] and privacy["public"]  # stage 0 is public pre-training
    assert "autoencoder" not in privacy["stages"]  # frozen in the rounds: the sites never trained it
