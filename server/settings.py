"""The server's settings, from Flower's flat ``run_config`` (``[tool.flwr.app.config]`` + ``--run-config``).

Flower run configs are flat scalars, so the gem3d config is named by ``config`` (a bundled name
such as ``tiny`` or a TOML path) and changed by ``set`` (``"federation.local_steps=2 train.lr=1e-3"``,
space separated, values parsed as TOML) or by dotted keys (``train.lr``) where the app declares them.
The server sends the resolved config to the sites with every message, so there is one source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.configs import parse_overrides, resolve_config_path
from gem3d.config import Config, load_config
from gem3d.errors import ConfigError

# Keys the app itself understands; any other key containing a dot is a gem3d config override.
APP_KEYS = {
    "config": "tiny",
    "set": "",
    "data-root": "runs/federated_data",
    "demo-data": True,
    "state-root": "",
    "out-dir": "runs/federated",
    "init": "",
    "server-data": "",
    "resume": True,
    "val-cases": 1,
    "eval-batches": 2,
    "fraction-evaluate": 1.0,
    "round-timeout": 3600.0,
    "fedadam-eta": 1e-3,
    "fedadam-eta-l": 1e-3,
    "fedadam-tau": 1e-6,
    "krum-malicious": 0,
    "server-dp-noise": 0.0,
    "server-dp-clip": 1.0,
    "server-dp-delta": 1e-5,
    "server-dp-budget": 0.0,
    "torch-threads": 1,
    "tracking-dir": "",
    # an audit round instead of training (server/audit.py): candidates .npz in, verdicts JSON out
    "audit-candidates": "",
    "audit-verdicts": "",
    "audit-settings": "",
}


def parse_set(text: str) -> dict[str, Any]:
    """The run config's ``set``: space-separated ``SECTION.FIELD=VALUE`` (``experiments.configs.parse_overrides``)."""
    return parse_overrides(text.split(), "run config 'set':")


PATH_KEYS = ("out-dir", "data-root", "state-root", "server-data", "init")


def _path(value: Any) -> Path | None:
    text = str(value).strip()
    return Path(text).expanduser().resolve() if text else None


def relative_paths(run_config: dict[str, Any]) -> dict[str, str]:
    """The run config's path keys given as relative paths (key -> the text given).

    Flower runs the ServerApp in the working folder of the process that executes it (the local
    SuperLink in a simulation or deployment), not the folder of ``flwr run``: a SuperLink left
    running from another checkout resolves ``data-root = "runs/federated_data"`` against *its* folder.
    """
    merged = {**APP_KEYS, **run_config}
    return {key: str(merged[key]).strip() for key in PATH_KEYS if str(merged[key]).strip()
            and not Path(str(merged[key]).strip()).expanduser().is_absolute()}  # fmt: skip


def describe_paths(settings: ServerSettings, relative: dict[str, str]) -> list[str]:
    """Log lines for the start of a run: every resolved path, and how relative ones were resolved."""
    paths = {"out-dir": settings.out_dir, "data-root": settings.data_root, "state-root": settings.state_root,
             "server-data": settings.server_data, "init": settings.init}  # fmt: skip
    lines = [f"run config {key} = {path}" for key, path in paths.items() if path is not None]
    if relative:
        given = ", ".join(f"{key}={text!r}" for key, text in relative.items())
        lines.append(
            f"run config paths {given} are relative: resolved against this ServerApp's working folder {Path.cwd()} "
            "(the SuperLink's, not necessarily where `flwr run` was typed); to be sure, pass absolute ones, "
            'e.g. flwr run . --run-config \'data-root="/abs/path/data" out-dir="/abs/path/run"\''
        )
    return lines


@dataclass(frozen=True)
class ServerSettings:
    """Everything the ServerApp needs, with paths made absolute (the app may run in another cwd)."""

    cfg: Config
    out_dir: Path
    data_root: Path | None
    state_root: Path | None
    server_data: Path | None
    resume: bool
    init: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> ServerSettings:
        """Merge ``run_config`` over the app defaults and load the gem3d config it names."""
        merged = {**APP_KEYS, **run_config}
        overrides = {key: value for key, value in merged.items() if "." in key}
        overrides.update(parse_set(str(merged["set"])))
        cfg = load_config(resolve_config_path(str(merged["config"]), "run config 'config':"), overrides)
        out_dir = _path(merged["out-dir"])
        if out_dir is None:
            raise ConfigError("run config 'out-dir' is empty")
        data_root = _path(merged["data-root"])
        # Unset, each simulated site keeps its private state beside its data (<site>/.gem3d-site), so
        # its key, policy and ledger outlive this run folder: the next run over the same data spends
        # from the same ledger.
        state_root = _path(merged["state-root"])
        return cls(
            cfg=cfg,
            out_dir=out_dir,
            data_root=data_root,
            state_root=state_root,
            server_data=_path(merged["server-data"]),
            resume=bool(merged["resume"]),
            init=_path(merged["init"]),
            options={key: merged[key] for key in APP_KEYS if key not in ("config", "set")},
        )
