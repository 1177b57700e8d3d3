"""The federated memorisation audit (issue 12): every site audits a release's candidates against its own patients.

A model trained at several sites can copy any site's patient, and only that site can tell. So
before a release is written, the releasing site's candidate volumes (synthetic, on the release's
canonical grid, in the secret pseudonym order, no source ids) are sent to every site in one
query round (``query.audit``). Each site runs ``privacy.audit.memorization_audit`` against all
its patients locally (``client.task.audit_round``) and replies only its verdict: passed or not,
copy counts and the kind and size of its reference (``AuditResult.verdict``). No patient data, no
per-case distance and no threshold leaves a site. The release is written only if every site that
trained the model passes (``privacy.release.release_cohort``).

What the other sites learn: the candidates themselves, which are meant for release anyway; a
refused release has shown its candidates to the federation's sites (not to anyone else).

Deployment: a ServerApp run with run config ``audit-candidates`` (an ``.npz`` of ``[D, H, W]``
float32 arrays) runs this round instead of training and writes the verdicts to ``audit-verdicts``
(``server/app.py``). On one machine, ``experiments.simulation.simulate_audit_round`` runs it as a
Flower simulation, one SuperNode per site folder (``gem3d release --audit-sites``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from gem3d.config import Config
from gem3d.errors import ConfigError
from privacy.audit import AuditSettings, settings_to_json

logger = logging.getLogger("flwr").getChild("gem3d.server")

AUDIT_QUERY = f"{MessageType.QUERY}.audit"
NODE_TIMEOUT_S = 120.0  # how long to wait for the sites' SuperNodes to connect


def audit_record(cfg: Config, settings: AuditSettings, data_root: Path | None = None) -> dict[str, Any]:
    """The config record of an audit query: the data config the sites load their patients with, the audit's settings."""
    record: dict[str, Any] = {
        "gem3d-config": json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
        "audit-settings": settings_to_json(settings),
        "torch-threads": 1,
    }
    if data_root is not None:  # simulation: each site finds its partition under the data root
        record["data-root"] = str(data_root)
    return record


def audit_round(
    grid: Grid, candidates: Sequence[np.ndarray], record: dict[str, Any], sites: int, timeout: float = 3600.0
) -> list[dict[str, Any]]:
    """Send ``candidates`` (``[D, H, W]`` float32 in [-1, 1]) to every node; return each site's verdict.

    A site that replies with an error or not at all fails: it could not certify that the
    candidates hold none of its patients.
    """
    from server.federation import wait_for_nodes

    wait_for_nodes(grid, sites, NODE_TIMEOUT_S)
    arrays = {f"{i:05d}": torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)) for i, c in enumerate(candidates)}
    content = RecordDict({"candidates": ArrayRecord(arrays), "config": ConfigRecord(record)})
    nodes = list(grid.get_node_ids())
    messages = [Message(content=content, dst_node_id=node, message_type=AUDIT_QUERY) for node in nodes]
    verdicts, answered = [], set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            logger.error("node %d could not audit the release candidates: %s", node, reply.error.reason)
            verdicts.append({"site": f"node_{node}", "passed": False, "reason": reply.error.reason})
        else:
            verdicts.append(dict(reply.content["verdict"]))
    for node in set(nodes) - answered:
        verdicts.append({"site": f"node_{node}", "passed": False, "reason": f"no reply within {timeout:.0f} s"})
    return sorted(verdicts, key=lambda v: str(v["site"]))


def create_audit_app(
    candidates: Sequence[np.ndarray], record: dict[str, Any], sites: int, verdicts: list[dict[str, Any]]
) -> ServerApp:
    """A ServerApp that runs one audit round and appends the sites' verdicts to ``verdicts``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        verdicts.extend(audit_round(grid, candidates, record, sites))

    return app


def site_folders(data_root: Path) -> list[Path]:
    """The ``site_*`` dataset folders of a simulation's data root, in site order."""
    if not data_root.is_dir():
        raise ConfigError(f"--audit-sites {data_root}: not a folder")
    folders = sorted((p for p in data_root.glob("site_*") if p.is_dir()), key=lambda p: _site_number(p.name))
    if not folders:
        raise ConfigError(f"--audit-sites {data_root}: no site_* dataset folders inside")
    return folders


def _site_number(name: str) -> int:
    suffix = name.removeprefix("site_")
    return int(suffix) if suffix.isdigit() else 1 << 30


def load_candidates(path: Path) -> list[np.ndarray]:
    """The candidates of a deployment audit round: the arrays of an ``.npz`` file, in name order."""
    if not path.is_file():
        raise ConfigError(f"run config 'audit-candidates': {path} is not a file")
    with np.load(path) as data:
        return [np.asarray(data[name], dtype=np.float32) for name in sorted(data.files)]
