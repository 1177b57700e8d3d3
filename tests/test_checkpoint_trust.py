"""Checkpoints are verified, not trusted: schema, stage, checksums, shapes; and training resumes after a kill."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from experiments.cli import main
from gem3d.checkpoint import load_checkpoint, prefixed, read_metadata, save_checkpoint
from gem3d.config import Config
from gem3d.errors import CheckpointError
from gem3d.runs import build_model, load_model
from gem3d.training import train as real_train

MICRO_SET = [
    "data.image_size=16", "data.window=4", "model.channels='8,16'", "model.attention_levels='false,true'",
    "model.norm_num_groups=4", "model.num_head_channels=8", "train.batch_size=2", "train.lr=2e-3",
    "train.checkpoint_every=2",
]  # fmt: skip
MICRO_ARGS = [arg for setting in MICRO_SET for arg in ("--set", setting)]


@pytest.fixture
def run(micro_run: Path, tmp_path: Path) -> Path:
    """A writable copy of the session's micro run folder."""
    return Path(shutil.copytree(micro_run, tmp_path / "run"))


def _edit_metadata(path: Path, edit: Callable[[dict[str, Any]], dict[str, Any] | str]) -> None:
    """Rewrite a checkpoint's gem3d header by hand, as a user or an attacker would, tensors untouched."""
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["gem3d"])
    edited = edit(metadata)
    save_file(tensors, path, metadata={"gem3d": edited if isinstance(edited, str) else json.dumps(edited)})


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the end of the file is tensor payload: the header comes first
    path.write_bytes(bytes(data))


def _without_stage(metadata: dict[str, Any]) -> dict[str, Any]:
    del metadata["stage"]
    return metadata


def _other_image_size(metadata: dict[str, Any]) -> dict[str, Any]:
    metadata["config"]["data"]["image_size"] = 32
    return metadata


def _sample(run: Path, phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    out = tmp_path / "out.nii.gz"
    code = main(
        ["sample", "--checkpoint", str(run), "--mask", str(phantom_dir / "labelsTr" / "phantom_000.nii.gz"),
         "--informed", "generate", "--out", str(out), "--steps", "2", "--track", "off"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not out.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return code, lines[0]


@pytest.mark.parametrize(
    ("damage", "stage", "fragment"),
    [
        (
            lambda p: _edit_metadata(p, lambda m: '{"format": "gem3d-checkpoint/2", "stage": '),
            "volume",
            "not valid JSON",
        ),
        (lambda p: _edit_metadata(p, _without_stage), "volume", "metadata: field 'stage': Field required"),
        (lambda p: _edit_metadata(p, _other_image_size), "volume", "metadata does not match its checksum"),
        (_flip_last_byte, "volume", "tensors do not match their checksum"),
        (_flip_last_byte, "informed", "tensors do not match their checksum"),
        (lambda p: shutil.copy(p.parent / "slice.safetensors", p), "informed", "holds a 'slice'-stage checkpoint"),
    ],
    ids=[
        "corrupt-json",
        "missing-stage",
        "edited-image-size",
        "flipped-volume-byte",
        "flipped-informed-byte",
        "renamed-stage-file",
    ],
)
def test_damaged_checkpoint_is_refused_in_one_line_naming_the_file(
    run: Path,
    phantom_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Callable[[Path], None],
    stage: str,
    fragment: str,
) -> None:
    path = run / f"{stage}.safetensors"
    damage(path)

    code, line = _sample(run, phantom_dir, tmp_path, capsys)

    assert code == 2
    assert str(path) in line
    assert fragment in line


def test_state_dict_mismatch_is_counts_and_a_few_names(
    run: Path, phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], micro_cfg: Config
) -> None:
    path = run / "volume.safetensors"
    flat = build_model("slice", micro_cfg)  # the stage-1 network: none of the inflated layers, other names
    save_checkpoint(
        path, prefixed(flat.state_dict(), "ema"), {"stage": "volume", "config": micro_cfg.model_dump(mode="json")}
    )

    code, line = _sample(run, phantom_dir, tmp_path, capsys)

    assert code == 2
    assert f"{path} (ema weights): weights do not fit the network of its config" in line
    assert " missing (" in line and " unexpected (" in line and "more" in line
    assert len(line) < 1000


def test_wrong_shapes_are_named_with_both_shapes(micro_cfg: Config, tmp_path: Path) -> None:
    other = micro_cfg.model_copy(update={"model": micro_cfg.model.model_copy(update={"channels": (16, 16)})})
    path = save_checkpoint(
        tmp_path / "c.safetensors",
        prefixed(build_model("slice", other).state_dict(), "ema"),
        {"stage": "slice", "config": micro_cfg.model_dump(mode="json")},
    )

    with pytest.raises(CheckpointError, match=r"with another shape \(unet\.conv_in\.conv\.weight \[16, ") as error:
        load_model(path)

    assert "\n" not in str(error.value)


def test_metadata_schema_is_checked_before_the_checksum(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.safetensors", {"ema.w": torch.ones(2)}, {"stage": "slice", "step": 1})
    _edit_metadata(path, lambda m: {**m, "step": -3})

    with pytest.raises(CheckpointError, match=r"metadata: field 'step': Input should be greater than or equal to 0"):
        read_metadata(path)


def test_saved_checksums_round_trip_every_dtype(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 2).to(torch.bfloat16),
        "b": torch.tensor(True),
        "c": torch.zeros(0),
        "d": torch.arange(4),
    }
    path = save_checkpoint(tmp_path / "c.safetensors", tensors, {"stage": "slice", "keys": {2: "x", 10: "y"}})

    loaded, metadata = load_checkpoint(path)

    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    assert metadata["keys"] == {"2": "x", "10": "y"}
    assert len(metadata["tensors_sha256"]) == len(metadata["metadata_sha256"]) == 64


def test_checkpoint_from_before_checksums_loads_with_a_warning(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = run / "slice.safetensors"

    def legacy(metadata: dict[str, Any]) -> dict[str, Any]:
        return {
            **{k: v for k, v in metadata.items() if not k.endswith("sha256")},
            "format": "gem3d-checkpoint/1",
        }

    _edit_metadata(path, legacy)

    with caplog.at_level(logging.WARNING, logger="gem3d.checkpoint"):
        model, _, metadata = load_model(path)

    assert metadata["stage"] == "slice" and model is not None
    assert "without checksums" in caplog.text
    assert str(path) in caplog.text


def test_checkpoint_of_the_current_format_without_checksums_is_refused(run: Path) -> None:
    path = run / "slice.safetensors"
    _edit_metadata(path, lambda m: {k: v for k, v in m.items() if not k.endswith("sha256")})

    with pytest.raises(CheckpointError, match="must carry tensors_sha256"):
        load_model(path)


def _kill_at(step: int) -> Callable[..., dict[str, float]]:
    """A step loop that is killed (Ctrl-C) once training reaches ``step``."""

    def train(state: Any, scheduler: Any, source: Any, stage: Any, until: int, cfg: Any, on_step: Any = None):
        metrics = real_train(state, scheduler, source, stage, min(until, step), cfg, on_step)
        if state.step >= step:
            raise KeyboardInterrupt
        return metrics

    return train


def _train(phantom_dir: Path, out: Path, *extra: str) -> int:
    argv = ["train", "--data", str(phantom_dir), "--stage", "slice", "--out", str(out), "--public-data"]
    return main([*argv, "--track", "off", *MICRO_ARGS, *extra])


def test_killed_training_resumes_from_its_last_periodic_checkpoint(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    with monkeypatch.context() as patch:
        patch.setattr("experiments.commands.train.train", _kill_at(5))
        interrupted = _train(phantom_dir, killed, "--steps", "6")
    saved_step = read_metadata(killed / "slice.safetensors")["step"]

    resumed = _train(phantom_dir, killed, "--steps", "6", "--resume")
    _train(phantom_dir, whole, "--steps", "6")

    assert interrupted == 130
    assert saved_step == 4  # checkpoint_every = 2: the kill at step 5 lost one step
    assert resumed == 0
    split, reference = load_file(killed / "slice.safetensors"), load_file(whole / "slice.safetensors")
    assert [name for name in reference if not torch.equal(split[name], reference[name])] == []
    assert read_metadata(killed / "slice.safetensors")["step"] == 6


@pytest.mark.parametrize(
    ("setting", "now", "before"),
    [
        ("train.lr=0.01", "train.lr = 0.01", "train.lr = 0.002"),
        ("train.batch_size=3", "train.batch_size = 3", "train.batch_size = 2"),
        ("train.weight_decay=0.1", "train.weight_decay = 0.1", "train.weight_decay = 0.0"),
    ],
)
def test_resume_with_other_optimiser_settings_is_refused(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, now: str, before: str
) -> None:
    out = tmp_path / "run"
    _train(phantom_dir, out, "--steps", "2")
    checkpoint = (out / "slice.safetensors").read_bytes()
    capsys.readouterr()

    code = _train(phantom_dir, out, "--steps", "4", "--resume", "--set", setting)

    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert now in err and before in err
    assert (out / "slice.safetensors").read_bytes() == checkpoint
