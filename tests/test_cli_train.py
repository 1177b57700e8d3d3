"""The gem3d command: help on every subcommand, train end to end, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.cli import COMMANDS, main
from experiments.tracking import read_runs
from gem3d.errors import CheckpointError
from gem3d.runs import initial_model, load_model


@pytest.mark.parametrize("name", [module.NAME for module in COMMANDS])
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])

    assert exit_info.value.code == 0
    assert "usage: gem3d" in capsys.readouterr().out


def test_train_three_stages_into_one_run_folder(phantom_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    micro = ["--set", "data.image_size=16", "--set", "data.window=4", "--set", "model.channels='8,16'"]
    micro += ["--set", "model.attention_levels='false,true'", "--set", "model.norm_num_groups=4"]
    micro += ["--set", "model.num_head_channels=8", "--set", "informed.channels='8,16'"]
    micro += ["--set", "informed.attention_levels='false,true'", "--set", "informed.norm_num_groups=4"]
    micro += ["--set", "informed.num_head_channels=8", "--site-state", str(tmp_path / "site")]

    for stage in ("slice", "volume", "informed"):
        code = main(["train", *micro, "--data", str(phantom_dir), "--stage", stage, "--out", str(run), "--steps", "2"])
        assert code == 0

    model, cfg, _ = load_model(run / "volume.safetensors")
    assert getattr(model, "inflated", False)
    assert cfg.data.image_size == 16
    assert (run / "informed.safetensors").exists() and (run / "config.json").exists()
    runs = read_runs(run / "mlflow", "gem3d-train")
    assert {r["run_name"] for r in runs} == {"run-slice", "run-volume", "run-informed"}
    assert all(r["status"] == "FINISHED" and "loss" in r["metrics"] for r in runs)


def _train_argv(phantom_dir: Path, tmp_path: Path, args: list[str]) -> list[str]:
    base = {"--data": str(phantom_dir), "--stage": "slice", "--out": str(tmp_path / "run"), "--steps": "1"}
    base["--site-state"] = str(tmp_path / "site")
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = [arg for pair in base.items() for arg in pair]
    if "--set" in args:
        argv = [*argv[: argv.index("--set")], *argv[argv.index("--set") + 2 :], "--set", args[1]]
    return ["train", *argv]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--config", "nope"], "--config nope: neither a TOML file nor a bundled config"),
        (["--set", "train.lr=-1"], "field 'train.lr'"),
        (["--data", "/nonexistent/data"], "/nonexistent/data"),
    ],
)
def test_bad_input_is_one_line_without_traceback(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    code = main(_train_argv(phantom_dir, tmp_path, args))

    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_bad_input_ends_the_whole_process_in_one_line(phantom_dir: Path, tmp_path: Path) -> None:
    # the same through the interpreter: exit status 2, nothing else on stderr (no warning, no traceback)
    argv = _train_argv(phantom_dir, tmp_path, ["--set", "train.lr=-1"])

    result = subprocess.run([sys.executable, "-m", "experiments.cli", *argv], capture_output=True, text=True)

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert len(lines) == 1 and "field 'train.lr'" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_init_starts_a_stage_from_another_runs_weights(phantom_dir: Path, tmp_path: Path) -> None:
    micro = ["--set", "data.image_size=16", "--set", "data.window=4", "--set", "model.channels='8,16'"]
    micro += ["--set", "model.attention_levels='false,true'", "--set", "model.norm_num_groups=4"]
    micro += ["--set", "model.num_head_channels=8", "--track", "off", "--public-data"]
    public = tmp_path / "public"
    main(["train", *micro, "--data", str(phantom_dir), "--stage", "slice", "--out", str(public), "--steps", "2"])
    pretrained, cfg, _ = load_model(public / "slice.safetensors")

    started = initial_model("slice", cfg, None, public, torch.device("cpu"))
    inflated = initial_model("volume", cfg, None, public, torch.device("cpu"))
    code = main(
        ["train", *micro, "--data", str(phantom_dir), "--stage", "informed", "--out", str(tmp_path / "b"),
         "--steps", "1", "--init", str(public)]
    )  # fmt: skip

    expected = pretrained.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in started.state_dict().items())
    assert getattr(inflated, "inflated", False)
    assert code == 2  # public has no informed-stage checkpoint: one clear error


def test_sampling_only_fields_may_differ_from_the_checkpoint_but_the_schedule_may_not(micro_run: Path) -> None:
    _, cfg, _ = load_model(micro_run / "slice.safetensors")
    fewer_steps = cfg.model_copy(update={"diffusion": cfg.diffusion.model_copy(update={"inference_steps": 3})})
    other_schedule = cfg.model_copy(update={"diffusion": cfg.diffusion.model_copy(update={"beta_end": 0.03})})

    model = initial_model("slice", fewer_steps, None, micro_run, torch.device("cpu"))

    assert model is not None
    with pytest.raises(CheckpointError, match=r"different \[diffusion\]"):
        initial_model("slice", other_schedule, None, micro_run, torch.device("cpu"))


def test_a_training_that_fails_before_its_first_checkpoint_leaves_no_run_folder(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # prepare: a start checkpoint that is not one (found only once training sets up its model)
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    micro = ["--set", "data.image_size=16", "--set", "data.window=4", "--set", "model.channels='8,16'"]
    micro += ["--set", "model.attention_levels='false,true'", "--set", "model.norm_num_groups=4"]
    micro += ["--set", "model.num_head_channels=8", "--site-state", str(tmp_path / "site")]

    code = main(["train", *micro, "--data", str(phantom_dir), "--stage", "slice", "--init", str(bogus),
                 "--out", str(tmp_path / "run"), "--steps", "2"])  # fmt: skip

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(bogus) in err
    assert not (tmp_path / "run").exists()
