"""Config cross-checks: every field MONAI or the sampler would die on is refused at load, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.cli import main
from experiments.configs import CONFIG_DIR
from gem3d.config import TrainConfig, load_config
from gem3d.errors import ConfigError


def _train(phantom_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(phantom_dir), "--stage", "slice", "--out", str(tmp_path / "run"),
        "--public-data", "--track", "off", "--steps", "1", *extra,
    ]  # fmt: skip


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("model.channels=''", "model.channels"),
        ("model.channels='16,0,32'", "model.channels.1"),
        ("model.channels='16,32'", "model.attention_levels"),  # tiny has three attention levels
        ("informed.attention_levels='true'", "informed.attention_levels"),
        ("model.norm_num_groups=5", "model.norm_num_groups"),
        ("model.num_head_channels=24", "model.num_head_channels"),
        ("informed.num_head_channels=64", "informed.num_head_channels"),
        ("data.image_size=33", "data.image_size"),
        ("sampler.overlap=8", "sampler.overlap"),
        ("diffusion.inference_steps=2000", "diffusion.inference_steps"),
        ("diffusion.beta_end=0.001", "diffusion.beta_end"),
        ("diffusion.prediction_type=epsilon", "diffusion.prediction_type"),  # tiny is rflow
        ("data.mri_percentiles=[99.0, 1.0]", "data.mri_percentiles"),
    ],
)
def test_bad_set_is_one_line_naming_the_option_and_field(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, field: str
) -> None:
    code = main(_train(phantom_dir, tmp_path, "--set", setting))

    line = _one_line(capsys)
    assert code == 2
    assert f"--set {setting.split('=')[0]}=" in line
    assert f"field '{field}'" in line
    assert "tiny.toml" not in line  # the file is fine: the option is to blame
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("setting", "valid"),
    [
        ("model.norm_num_groups=5", "valid: a divisor of 16: 1, 2, 4, 8, 16"),
        ("model.num_head_channels=24", "valid: a divisor of 32"),
        ("data.image_size=33", "valid: a multiple of 4"),
        ("sampler.overlap=8", "valid: 0..7"),
    ],
)
def test_cross_check_states_the_valid_range(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, valid: str
) -> None:
    main(_train(phantom_dir, tmp_path, "--set", setting))

    assert valid in _one_line(capsys)


def test_bad_file_is_blamed_on_the_file_not_on_an_unrelated_set(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nchannels = [16, 32]\nattention_levels = [false, false, true]\n")

    code = main(_train(phantom_dir, tmp_path, "--config", str(path), "--set", "train.lr=0.001"))

    line = _one_line(capsys)
    assert code == 2
    assert f"{path}: field 'model.attention_levels'" in line
    assert "--set" not in line


def test_set_can_repair_what_it_changes_together() -> None:
    cfg = load_config(CONFIG_DIR / "tiny.toml", {"model.channels": "16,32", "model.attention_levels": "false,true"})

    assert cfg.model.channels == (16, 32)


def test_flower_overrides_are_blamed_as_overrides() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(CONFIG_DIR / "tiny.toml", {"data.image-size": 33})

    assert str(error.value).startswith("override data.image-size=33: field 'data.image_size'")


@pytest.mark.parametrize("name", ["tiny", "brats", "abdomenct1k"])
def test_bundled_configs_checkpoint_periodically(name: str) -> None:
    train = load_config(CONFIG_DIR / f"{name}.toml").train

    assert 0 < train.checkpoint_every < min(train.steps_slice, train.steps_volume, train.steps_informed)


def test_default_training_checkpoints_periodically() -> None:
    assert TrainConfig().checkpoint_every > 0
