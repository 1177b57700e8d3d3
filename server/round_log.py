"""Round metrics into MLflow: the server run is the parent, each site a nested run.

Sites never talk to MLflow: they report metrics in their replies and the server logs them here.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from experiments.tracking import Tracker
from gem3d.config import Config, flatten_config
from gem3d.runs import STAGE_FILES

CLIENT_DP_PREFIX = "client-dp-"  # the server's client-level DP (never the sites' patient-level epsilon)


def _numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested metrics dict, with dotted names."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


class RoundLogger:
    """Logs each completed round (``on_round``) to a parent run, and per-site metrics to nested runs.

    Round metrics are named ``<stage>.<metric>``, except the run-wide ``client-dp-*`` ones.
    """

    def __init__(self, tracker: Tracker, cfg: Config) -> None:
        self.tracker = tracker
        self.sites: dict[str, Tracker] = {}
        self.step = 0
        tracker.log_params(flatten_config(cfg))

    def __call__(self, metrics: dict[str, Any]) -> None:
        self.step += 1
        stage = str(metrics.get("stage", "round"))
        summary = {k: v for k, v in metrics.items() if k not in ("per-site", "stage", "checkpoint", "failures")}
        # The client-level ε is the run's, composed over all stages: one curve, without a stage prefix.
        self.tracker.log_metrics(
            {k if k.startswith(CLIENT_DP_PREFIX) else f"{stage}.{k}": v for k, v in _numbers(summary).items()},
            step=self.step,
        )
        for node, site_metrics in (metrics.get("per-site") or {}).items():
            index = site_metrics.get("site-index")
            name = f"site_{int(index)}" if isinstance(index, int | float) else f"node_{node}"
            if name not in self.sites:
                self.sites[name] = self.tracker.nested(name, tags={"gem3d.site": name})
            self.sites[name].log_metrics({f"{stage}.{k}": v for k, v in _numbers(site_metrics).items()}, step=self.step)

    def finish(self, run_dir: Path) -> None:
        """End the site runs and register the final global model as ``gem3d-global@current``.

        MLflow reserves the alias ``latest``. Only the checkpoints and config travel to the registry.
        """
        for site in self.sites.values():
            site.end()
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "model"
            model.mkdir()
            for name in (*STAGE_FILES.values(), "config.json"):
                if (run_dir / name).exists():
                    shutil.copy2(run_dir / name, model / name)
            self.tracker.register_model(model, name="gem3d-global", alias="current")
