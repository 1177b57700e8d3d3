"""The gem3d ServerApp (Flower Message API): federated training of all three GEM-3D stages.

Thin on purpose: settings come from the run config (``server/settings.py``), the schedule is
``server/federation.py``. ``create_app`` builds the app with extra run-config values, for
in-process simulations (``flwr.simulation.run_simulation`` passes no run config).
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from gem3d.errors import Gem3dError
from server.federation import OnRound, run_federation
from server.settings import ServerSettings

logger = logging.getLogger("flwr").getChild("gem3d.server")


def create_app(run_config: dict[str, Any] | None = None, on_round: OnRound | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's merged with ``run_config``.

    Args:
        on_round: called with every completed round's metrics (the experiment-tracking hook).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            settings = ServerSettings.from_run_config({**dict(context.run_config), **(run_config or {})})
            summary = run_federation(grid, settings, on_round)
        except Gem3dError as error:
            # One clear line in the run's log; re-raised as an ordinary exception so that Flower
            # marks the run failed with this reason (`flwr list` shows it).
            logger.error("gem3d federated run stopped: %s", error)
            raise RuntimeError(f"gem3d federated run stopped: {error}") from None
        message = f"final model: {summary['run']} (use it as: gem3d sample --checkpoint {summary['run']} ...)"
        logger.info(message)
        print(message, flush=True)

    return app


app = create_app()
