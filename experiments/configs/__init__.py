"""The bundled configs (``tiny``, ``brats``, ``abdomenct1k`` ... as TOML files here) and the one override parser.

``gem3d train --config NAME --set SECTION.FIELD=VALUE`` and the Flower run config (``config``,
``set``) both name a config and override it; both resolve and parse here, so they accept the
same things and say the same thing when they cannot.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gem3d.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent


def bundled_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def resolve_config_path(name: str, option: str = "--config") -> Path:
    """A TOML path as given, or ``experiments/configs/<name>.toml`` for a bundled name."""
    path = Path(name).expanduser()
    if path.suffix == ".toml" or path.exists():
        return path
    bundled = CONFIG_DIR / f"{name}.toml"
    if bundled.exists():
        return bundled
    raise ConfigError(f"{option} {name}: neither a TOML file nor a bundled config ({', '.join(bundled_names())})")


def parse_overrides(items: Iterable[str], option: str = "--set") -> dict[str, Any]:
    """``["train.lr=1e-3", "model.channels=16,32"]`` -> ``{"train.lr": 0.001, "model.channels": "16,32"}``.

    Values are parsed as TOML scalars; what TOML cannot read stays a string (``cuda``, ``fedprox``,
    the ``"1,2,4"`` lists that Flower's scalar-only run config carries).
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {item}: expected SECTION.FIELD=VALUE")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value
    return overrides
