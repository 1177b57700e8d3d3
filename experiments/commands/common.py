"""Arguments and loading shared by several subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from experiments.tracking import Tracker
from gem3d.config import Config, flatten_config, load_config
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


def add_track_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--track DIR|off``: the MLflow store folder of this command's run (``default`` names it)."""
    parser.add_argument(
        "--track",
        help=f"MLflow store folder (default: {default}; MLFLOW_TRACKING_URI wins); 'off' disables tracking",
    )


def open_tracker(
    args: argparse.Namespace, default_store: Path, command: str, run_name: str, cfg: Config | None = None
) -> Tracker | None:
    """The MLflow run of one command, or None with ``--track off``.

    The run goes to experiment ``gem3d-<command>`` in ``--track`` (else ``default_store``), with the
    flattened config as params. Use it as a context manager: the run ends FAILED if the command raised.
    Tracking never breaks the command: an unreachable store warns once and the tracker turns no-op.
    """
    if args.track == "off":
        return None
    tracker = Tracker(Path(args.track) if args.track else default_store, f"gem3d-{command}", run_name)
    if cfg is not None:
        tracker.log_params(flatten_config(cfg))
    return tracker
