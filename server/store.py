"""The server's run folder: the global model per stage, the progress file and the round metrics.

The folder has the layout of ``gem3d train`` (``slice.safetensors``, ``volume.safetensors``,
``informed.safetensors``, ``config.json``; see ``gem3d.runs``), so it is a valid ``--checkpoint``
for ``gem3d sample`` after any completed round. ``model.*`` holds the global weights the sites
train from; ``ema.*`` the server's EMA of them over rounds (``ema_n_averaged`` counts its
updates), which samplers load. ``server_state.json`` records the last completed
(stage, round); a restarted server resumes after it. With client-level DP it also holds the run's
accountant state (``client-dp-accountant``), so the client-level ε of a resumed run continues
from every round already released. ``metrics.jsonl`` has one line per round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from gem3d.checkpoint import load_checkpoint, subset
from gem3d.config import Config
from gem3d.errors import CheckpointError
from gem3d.files import write_json
from gem3d.runs import STAGE_FILES, save_state
from gem3d.training import STAGES, Stage, new_state

STATE_FILE = "server_state.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CLIENT_DP_KEY = "client-dp-accountant"  # Flower's accountant state_dict() in server_state.json
# A resumed run may change these (more rounds, another strategy or minimum of sites); not the model or data.
_RESUMABLE_SECTIONS = ("federation",)


class RunStore:
    """Reads and writes one federated run folder."""

    def __init__(self, out_dir: Path, cfg: Config) -> None:
        self.out_dir = out_dir
        self.cfg = cfg
        # The client-level DP accountant's state as last saved (None: no client-level DP release yet).
        self.client_dp_state: dict[str, Any] | None = None

    @property
    def state_path(self) -> Path:
        return self.out_dir / STATE_FILE

    def prepare(self, resume: bool) -> dict[str, int]:
        """Create the folder (or check it for a resume) and return rounds completed per stage.

        Raises:
            CheckpointError: the folder holds a run and ``resume`` is off, or its config differs.
        """
        config_path = self.out_dir / CONFIG_FILE
        current = self.cfg.model_dump(mode="json")
        if self.state_path.exists():
            if not resume:
                raise CheckpointError(
                    f"{self.state_path}: a federated run already exists here; "
                    "set resume=true to continue it, or choose another out-dir"
                )
            saved = json.loads(config_path.read_text()) if config_path.exists() else {}
            changed = sorted(s for s in current if s not in _RESUMABLE_SECTIONS and saved.get(s) != current[s])
            if changed:
                raise CheckpointError(
                    f"{config_path}: the run in this folder used a different [{', '.join(changed)}] config; "
                    "resume it with the same config (only [federation] may change), or choose another out-dir"
                )
            write_json(config_path, current)
            progress = json.loads(self.state_path.read_text())
            self.client_dp_state = progress.get(CLIENT_DP_KEY)
            return {stage: int(progress.get("completed", {}).get(stage, 0)) for stage in STAGES}
        if any(self.out_dir.glob("*.safetensors")):
            raise CheckpointError(f"{self.out_dir}: holds checkpoints but no {STATE_FILE}; choose another out-dir")
        write_json(config_path, current)
        return dict.fromkeys(STAGES, 0)

    def load_global(self, model: nn.Module, stage: Stage, weights: str = "model") -> None:
        """Load the stage's last global weights (``model.*``) or their EMA (``ema.*``) into ``model``."""
        model.load_state_dict(subset(self._tensors(stage), weights))

    def load_ema(self, ema: AveragedModel, stage: Stage) -> None:
        """Load the stage's EMA (weights and update count) into ``ema``, for a resumed stage."""
        tensors = self._tensors(stage)
        ema.module.load_state_dict(subset(tensors, "ema"))
        ema.n_averaged.copy_(tensors["ema_n_averaged"])

    def _tensors(self, stage: Stage) -> dict[str, torch.Tensor]:
        path = self.out_dir / STAGE_FILES[stage]
        if not path.exists():
            raise CheckpointError(f"{path}: {STATE_FILE} says rounds of '{stage}' completed, but the file is missing")
        tensors, _ = load_checkpoint(path)
        return tensors

    def save_round(
        self,
        model: nn.Module,
        ema: AveragedModel,
        stage: Stage,
        stage_round: int,
        completed: dict[str, int],
        steps: int,
        sites: int,
        client_dp: dict[str, Any] | None = None,
        privacy: dict[str, Any] | None = None,
    ) -> Path:
        """Checkpoint the global model of ``stage`` and its EMA after ``stage_round``, then record the progress.

        The checkpoint goes first: a crash between the two writes repeats a round, never skips one.

        Args:
            client_dp: the client-level DP accountant's ``state_dict()`` after this round; None
                keeps the last saved one (past releases stay on record if a resume turns DP off).
            privacy: the checkpoint's privacy record (``privacy.model_privacy``; ``federation.privacy_record``).
        """
        state = new_state(model, self.cfg.train)
        state.ema.module.load_state_dict(ema.module.state_dict())
        state.ema.n_averaged.copy_(ema.n_averaged)
        state.step = steps
        path = save_state(
            self.out_dir / STAGE_FILES[stage],
            state,
            stage,
            self.cfg,
            "federated",
            federated=True,
            rounds=stage_round,
            sites=sites,
            **({"privacy": privacy} if privacy is not None else {}),
        )
        progress: dict[str, Any] = {
            "stage": stage,
            "round": stage_round,
            "completed": {**completed, stage: stage_round},
        }
        if client_dp is not None:
            self.client_dp_state = client_dp
        if self.client_dp_state is not None:
            progress[CLIENT_DP_KEY] = self.client_dp_state
        write_json(self.state_path, progress)
        return path

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One JSON line per round (appended and flushed; a torn last line is the only possible damage)."""
        with open(self.out_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def global_tensors(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The named entries of ``model``'s state dict, detached on the CPU (what is sent to the sites)."""
    state = model.state_dict()
    return {name: state[name].detach().cpu() for name in names}
