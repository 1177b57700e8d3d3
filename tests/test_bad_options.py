"""Numeric options are range-checked before any work: one line naming the option and the valid range (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.cli import main

SAMPLE = ["sample", "--checkpoint", "run", "--mask", "m.nii.gz", "--informed", "generate", "--out", "x.nii.gz"]
BAD = [
    ([*SAMPLE, "--steps", "0"], "--steps", ">= 1"),
    ([*SAMPLE, "--steps", "-1"], "--steps", ">= 1"),
    ([*SAMPLE, "--steps", "two"], "--steps", "not an integer"),
    ([*SAMPLE, "--seed", str(2**70)], "--seed", "0..2**63-1"),
    ([*SAMPLE, "--seed", "-3"], "--seed", "0..2**63-1"),
    (["enhance", "--checkpoint", "r", "--data", "d", "--out", "o", "--per-case", "0"], "--per-case", ">= 1"),
    (["release", "--checkpoint", "r", "--data", "d", "--out", "o", "--per-case", "-1"], "--per-case", ">= 1"),
    (["release", "--checkpoint", "r", "--data", "d", "--out", "o", "--quantile", "2"], "--quantile", "between 0 and 1"),
    (["release", "--checkpoint", "r", "--data", "d", "--out", "o", "--grid", "4096"], "--grid", "8..128"),
    (["release", "--checkpoint", "r", "--data", "d", "--out", "o", "--margin", "0"], "--margin", "> 0"),
    (["release", "--checkpoint", "r", "--data", "d", "--out", "o", "--min-reference", "0"], "--min-reference", ">= 1"),
    (["train", "--config", "tiny", "--stage", "slice", "--data", "d", "--out", "o", "--steps", "0"], "--steps", ">= 1"),
    (["demo-data", "--out", "o", "--sites", "0"], "--sites", ">= 1"),
    (["demo-data", "--out", "o", "--test-per-site", "-1"], "--test-per-site", ">= 0"),
    (["evaluate", "--checkpoint", "r", "--data", "d", "--out", "o.json", "--threads", "0"], "--threads", ">= 1"),
]


@pytest.mark.parametrize(("argv", "option", "valid"), BAD, ids=[f"{a[0]} {a[-2]} {a[-1]}" for a, _, _ in BAD])
def test_a_bad_number_is_one_line_naming_the_option_and_range(
    argv: list[str],
    option: str,
    valid: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SystemExit) as exit_info:
        main(argv)

    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert option in err and valid in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("steps", ["5000", "1001"])
def test_more_sampler_steps_than_training_timesteps_is_refused_before_sampling(
    micro_run: Path, phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], steps: str
) -> None:
    mask = phantom_dir / "labelsTr" / "phantom_001.nii.gz"
    argv = ["sample", "--checkpoint", micro_run, "--mask", mask, "--informed", "generate", "--steps", steps]
    code = main([str(a) for a in argv] + ["--out", str(tmp_path / "x.nii.gz"), "--track", "off"])

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"--steps {steps}: expected 1.." in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", ["audit.json", "audit.png"])
def test_gem3d_audit_never_overwrites_its_report_or_histogram(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], existing: str
) -> None:
    (tmp_path / existing).write_text("keep me")
    data = str(phantom_dir)

    out = str(tmp_path / "audit.json")
    code = main(["audit", "--synthetic", data, "--train", data, "--holdout", data, "--out", out, "--track", "off"])

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "already exists" in err
    assert (tmp_path / existing).read_text() == "keep me"


@pytest.mark.parametrize("command", ["enhance", "release", "deenhance"])
def test_a_disk_without_room_for_the_output_is_refused_before_the_model_loads(
    command: str, phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # prepare: more copies of the dataset than any disk holds (deenhance writes one: so a dataset
    # whose files claim more bytes than the disk has, made sparse so that it costs nothing)
    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    for path in (phantom_dir / "labelsTr").iterdir():
        (data / "labelsTr").mkdir(exist_ok=True)
        (data / "labelsTr" / path.name).write_bytes(path.read_bytes())
    import shutil

    huge = data / "imagesTr" / "phantom_000_0000.nii.gz"
    with huge.open("wb") as stream:
        stream.truncate(shutil.disk_usage(tmp_path).free + 2**30)  # sparse: no block is written
    out = tmp_path / "out"
    argv = [command, "--checkpoint", str(tmp_path / "no_run"), "--data", str(data), "--out", str(out)]
    argv += ["--reference", "img.nii.gz"] if command == "deenhance" else ["--per-case", "1"]

    # execute
    code = main([*argv, "--track", "off"])

    # assert: the disk is named before the missing checkpoint is noticed
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--out" in err and "needs about" in err and "free" in err, err
    assert not out.exists()


def test_training_without_room_for_its_checkpoint_is_refused_before_reading_data(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # prepare: a network whose checkpoint (built on the meta device, never allocated) outgrows any disk
    out = tmp_path / "run"
    argv = ["train", "--data", str(phantom_dir), "--stage", "slice", "--out", str(out), "--public-data"]
    argv += ["--set", "model.channels=[32768,32768,32768]", "--track", "off"]
    # execute
    code = main(argv)
    # assert: one line naming --out and the room needed; no run folder left behind
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--out" in err and "needs about" in err and "TiB" in err, err
    assert not out.exists()


def test_an_op_without_a_deterministic_kernel_is_one_line_naming_it_and_the_switch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch

    from experiments.commands.runner import report_errors

    def work() -> int:  # what accel.deterministic does on CUDA, met by an op with no deterministic kernel
        torch.use_deterministic_algorithms(True)
        try:
            torch.zeros(5).put_(torch.tensor([0, 0]), torch.ones(2), accumulate=False)
        finally:
            torch.use_deterministic_algorithms(False)
        return 0

    code = report_errors("train", work)

    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("gem3d train: error: put_ does not have a deterministic implementation")
    assert "--set accel.deterministic=false" in err
    with pytest.raises(RuntimeError, match="boom"):  # any other RuntimeError is not ours to hide
        report_errors("train", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
