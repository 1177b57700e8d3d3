"""Server pieces without a simulation: strategies from config, and the run folder's resume rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    Krum,
)

from gem3d.config import Config
from gem3d.errors import CheckpointError
from gem3d.runs import build_model
from server.settings import APP_KEYS
from server.store import RunStore
from server.strategy import build_strategy


@pytest.mark.parametrize(
    ("name", "kind"),
    [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedmedian", FedMedian), ("krum", Krum)],
)
def test_the_strategy_comes_from_config(micro_cfg: Config, name: str, kind: type) -> None:
    # prepare
    cfg = micro_cfg.model_copy(update={"federation": micro_cfg.federation.model_copy(update={"strategy": name})})
    # execute
    strategy = build_strategy(cfg, APP_KEYS, num_nodes=3)
    wrapped = build_strategy(cfg, {**APP_KEYS, "server-dp-noise": 0.5}, num_nodes=3)
    # assert
    assert type(strategy) is kind
    assert isinstance(wrapped, DifferentialPrivacyServerSideFixedClipping)


def test_a_resume_keeps_the_model_but_may_change_the_federation(micro_cfg: Config, tmp_path: Path) -> None:
    # prepare: a run folder with one completed slice round
    store = RunStore(tmp_path / "run", micro_cfg)
    completed = store.prepare(resume=False)
    store.save_round(build_model("slice", micro_cfg), "slice", 1, completed, steps=2, sites=2)
    more_rounds = micro_cfg.model_copy(
        update={"federation": micro_cfg.federation.model_copy(update={"rounds_slice": 5})}
    )
    other_model = micro_cfg.model_copy(update={"model": micro_cfg.model.model_copy(update={"channels": (8, 8)})})
    # execute / assert
    assert RunStore(tmp_path / "run", more_rounds).prepare(resume=True)["slice"] == 1
    with pytest.raises(CheckpointError, match="model"):
        RunStore(tmp_path / "run", other_model).prepare(resume=True)
    with pytest.raises(CheckpointError, match="resume=true"):
        RunStore(tmp_path / "run", micro_cfg).prepare(resume=False)
