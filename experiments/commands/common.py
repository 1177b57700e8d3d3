"""Arguments and loading shared by several subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gem3d.config import Config, load_config
from gem3d.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def add_config_argument(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--config",
        required=required,
        default=None if required else "tiny",
        help="a TOML config file, or the name of a bundled one: tiny, brats, abdomenct1k (default: tiny)",
    )
    parser.add_argument(
        "--set",
        metavar="SECTION.FIELD=VALUE",
        action="append",
        default=[],
        help="override one config field, e.g. --set train.device=cuda (repeatable; VALUE is parsed as TOML)",
    )


def resolve_config_path(name: str) -> Path:
    """A path as given, or ``experiments/configs/<name>.toml`` for a bundled config name."""
    path = Path(name)
    if path.suffix != ".toml" and not path.exists():
        bundled = CONFIG_DIR / f"{name}.toml"
        if bundled.exists():
            return bundled
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
        raise ConfigError(f"{name}: no such config file, and not a bundled config ({known})")
    return path


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-3"]`` -> ``{"train.lr": 0.001}``, values parsed as TOML scalars."""
    import tomllib

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected SECTION.FIELD=VALUE")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value  # a bare string such as cuda
    return overrides


def load_cli_config(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    """The config named by ``--config`` with ``--set`` and command-specific overrides applied."""
    overrides = parse_set(args.set)
    overrides.update(extra or {})
    return load_config(resolve_config_path(args.config), overrides)
