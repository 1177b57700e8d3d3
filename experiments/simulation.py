"""Flower simulations on one machine: a gem3d ServerApp and the ClientApp in this process.

The server and the sites share only messages, so neither imports the other; what puts them in
one process (Flower's ``run_simulation``) lives here, above both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gem3d.config import Config
from privacy.audit import AuditSettings
from server.audit import audit_record, create_audit_app, site_folders

BACKEND = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}}


def simulate_audit_round(
    candidates: list[np.ndarray], data_root: Path, cfg: Config, settings: AuditSettings
) -> list[dict[str, Any]]:
    """The audit round as a Flower simulation on this machine: one SuperNode per ``site_*`` folder of ``data_root``.

    Returns:
        one verdict per site (``client.task.audit_round``), ``site`` named ``site_<index>``.
    """
    from flwr.simulation import run_simulation

    from client.app import app as client_app

    sites = len(site_folders(data_root))
    verdicts: list[dict[str, Any]] = []
    server = create_audit_app(candidates, audit_record(cfg, settings, data_root.resolve()), sites, verdicts)
    run_simulation(server_app=server, client_app=client_app, num_supernodes=sites, backend_config=BACKEND)
    if len(verdicts) < sites:  # the server app stopped early: every missing site fails
        verdicts += [{"site": "unknown", "passed": False, "reason": "the audit round stopped"}] * (
            sites - len(verdicts)
        )
    return verdicts
