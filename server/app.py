"""The gem3d ServerApp (Flower Message API): federated training of all three GEM-3D stages.

Thin on purpose: settings come from the run config (``server/settings.py``), the schedule is
``server/federation.py``. ``create_app`` builds the app with extra run-config values, for
in-process simulations (``flwr.simulation.run_simulation`` passes no run config).
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from experiments.tracking import Tracker
from gem3d.errors import ConfigError, Gem3dError
from server.federation import OnRound, run_federation
from server.round_log import RoundLogger
from server.settings import ServerSettings, describe_paths, relative_paths

logger = logging.getLogger("flwr").getChild("gem3d.server")

# torch, MONAI and Flower leave ~500k long-lived objects after import; every full garbage
# collection walked them all (0.4 s here, in the middle of a round). Frozen, they are skipped.
gc.freeze()


def create_app(run_config: dict[str, Any] | None = None, on_round: OnRound | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's merged with ``run_config``.

    Args:
        on_round: called with every completed round's metrics (the experiment-tracking hook).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            merged_config = {**dict(context.run_config), **(run_config or {})}
            settings = ServerSettings.from_run_config(merged_config)
            relative = relative_paths(merged_config)
            for line in describe_paths(settings, relative):  # a SuperLink from another checkout shows here
                (logger.warning if relative and line.startswith("run config paths") else logger.info)(line)
            if settings.options["audit-candidates"]:
                _audit(grid, settings)
                return
            summary = _tracked_federation(grid, settings, on_round)
        except Gem3dError as error:
            # One clear line in the run's log; re-raised as an ordinary exception so that Flower
            # marks the run failed with this reason (`flwr list` shows it).
            logger.error("gem3d federated run stopped: %s", error)
            raise RuntimeError(f"gem3d federated run stopped: {error}") from None
        message = f"final model: {summary['run']} (use it as: gem3d sample --checkpoint {summary['run']} ...)"
        logger.info(message)
        print(message, flush=True)

    return app


def _audit(grid: Grid, settings: ServerSettings) -> None:
    """A deployment's audit round (``server/audit.py``): the sites' verdicts on the candidates, as JSON."""
    from privacy.audit import AuditSettings, settings_from_json
    from server.audit import audit_record, audit_round, load_candidates

    options = settings.options
    out = Path(str(options["audit-verdicts"]) or "audit_verdicts.json").expanduser()
    if out.exists():
        raise ConfigError(f"run config 'audit-verdicts': {out} already exists (nothing is overwritten)")
    text = str(options["audit-settings"])
    audit_settings = settings_from_json(text) if text else AuditSettings()
    candidates = load_candidates(Path(str(options["audit-candidates"])).expanduser())
    record = audit_record(settings.cfg, audit_settings, settings.data_root)
    verdicts = audit_round(grid, candidates, record, settings.cfg.federation.min_clients)
    out.write_text(json.dumps({"passed": all(v["passed"] for v in verdicts), "sites": verdicts}, indent=2) + "\n")
    logger.info("audit round: %d site(s), verdicts in %s", len(verdicts), out)
    print(f"audit verdicts: {out}", flush=True)


def _tracked_federation(grid: Grid, settings: ServerSettings, on_round: OnRound | None) -> dict[str, Any]:
    """Run the federation inside an MLflow parent run (unless ``tracking-dir = "off"``)."""
    where = str(settings.options.get("tracking-dir", ""))
    if where == "off":
        return run_federation(grid, settings, on_round)
    store = Path(where) if where else settings.out_dir / "mlflow"
    with Tracker(store, "gem3d-federated", settings.out_dir.name, tags={"gem3d.kind": "federated"}) as tracker:
        rounds = RoundLogger(tracker, settings.cfg)

        def log_round(metrics: dict[str, Any]) -> None:
            rounds(metrics)
            if on_round is not None:
                on_round(metrics)

        summary = run_federation(grid, settings, log_round)
        rounds.finish(settings.out_dir)
    return summary


app = create_app()
