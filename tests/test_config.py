"""Config loading: bundled configs, overrides and one clear error per bad config."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.configs import CONFIG_DIR
from gem3d.config import flatten_config, load_config
from gem3d.errors import ConfigError


@pytest.mark.parametrize(
    "name",
    ["tiny", "brats", "abdomenct1k", "tiny_latent", "brats_latent", "abdomenct1k_latent", "abdomenct1k_latent_256"],
)
def test_bundled_configs_load(name: str) -> None:
    cfg = load_config(CONFIG_DIR / f"{name}.toml")

    assert len(cfg.model.channels) == len(cfg.model.attention_levels)
    assert cfg.data.image_size % 2 ** (len(cfg.model.channels) - 1) == 0


def test_tiny_is_32_pixels_window_8() -> None:
    cfg = load_config(CONFIG_DIR / "tiny.toml")

    assert (cfg.data.image_size, cfg.data.window) == (32, 8)


def test_overrides_accept_flower_style_keys_and_list_strings(tmp_path: Path) -> None:
    cfg = load_config(CONFIG_DIR / "tiny.toml", {"train.steps-slice": 7, "model.channels": "8,16,16"})

    assert cfg.train.steps_slice == 7
    assert cfg.model.channels == (8, 16, 16)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[model]\nchannels = 'a,b'\n", "model.channels"),
        ("[train]\nlr = -1.0\n", "train.lr"),
        ("[train]\nlearning_rate = 0.1\n", "train.learning_rate"),
        ("[sampler]\noverlap = -1\n", "sampler.overlap"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("[diffusion]\nprediction_type = 'noise'\n", "diffusion.prediction_type"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)

    with pytest.raises(ConfigError) as error:
        load_config(path)

    message = str(error.value)
    assert str(path) in message
    assert f"field '{expected}" in message
    assert "\n" not in message


def test_unparsable_and_missing_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nlr = ")

    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_config_is_frozen_and_flattens() -> None:
    cfg = load_config(CONFIG_DIR / "tiny.toml")

    with pytest.raises(ValueError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    flat = flatten_config(cfg)
    assert flat["data.window"] == 8
    assert all("." in key for key in flat)
