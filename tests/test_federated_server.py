"""Server pieces without a simulation: strategies from config, and the run folder's resume rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    Krum,
)
from flwr.supercore.privacy_accounting import SamplingMethod

from gem3d.config import Config
from gem3d.data.dataset import load_volumes
from gem3d.errors import CheckpointError, ConfigError
from gem3d.runs import build_model, load_model, train_stage
from gem3d.training import ema_copy
from server.federation import initial_global
from server.settings import APP_KEYS, ServerSettings
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
    # assert
    assert type(strategy) is kind


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_client_level_dp_wraps_fedavg_aggregation_with_an_accountant(micro_cfg: Config, name: str) -> None:
    # prepare
    cfg = micro_cfg.model_copy(update={"federation": micro_cfg.federation.model_copy(update={"strategy": name})})
    # execute
    wrapped = build_strategy(cfg, {**APP_KEYS, "server-dp-noise": 0.5}, num_nodes=3)
    # assert: Flower's accounted wrapper, without sampling amplification, over all connected nodes
    assert isinstance(wrapped, DifferentialPrivacyServerSideFixedClipping) and wrapped.accountant is not None
    assert wrapped.accountant.config.sampling_method is SamplingMethod.NO_AMPLIFICATION
    assert wrapped.accountant.config.population_size == 3 and wrapped.num_sampled_clients == 3
    assert wrapped.accountant.config.max_epsilon is None  # server-dp-budget = 0: no limit


@pytest.mark.parametrize("name", ["fedadam", "fedmedian", "krum"])
def test_client_level_dp_refuses_aggregations_the_noise_does_not_bound(micro_cfg: Config, name: str) -> None:
    # prepare
    cfg = micro_cfg.model_copy(update={"federation": micro_cfg.federation.model_copy(update={"strategy": name})})
    # execute / assert: one line naming both settings
    with pytest.raises(ConfigError, match=rf"federation.strategy = '{name}' .* server-dp-noise = 0.5") as caught:
        build_strategy(cfg, {**APP_KEYS, "server-dp-noise": 0.5}, num_nodes=3)
    assert "\n" not in str(caught.value)


def test_a_resume_keeps_the_model_but_may_change_the_federation(micro_cfg: Config, tmp_path: Path) -> None:
    # prepare: a run folder with one completed slice round
    store = RunStore(tmp_path / "run", micro_cfg)
    completed = store.prepare(resume=False)
    model = build_model("slice", micro_cfg)
    store.save_round(model, ema_copy(model, 0.9), "slice", 1, completed, steps=2, sites=2)
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


def test_stages_start_from_the_init_run_when_it_has_their_weights(
    micro_cfg: Config, phantom_dir: Path, tmp_path: Path
) -> None:
    # prepare: a "public" run with slice weights only
    public = tmp_path / "public"
    train_stage(micro_cfg, load_volumes(phantom_dir, micro_cfg.data), "slice", public, steps=1)
    pretrained, _, _ = load_model(public / "slice.safetensors")
    settings = ServerSettings(micro_cfg, tmp_path / "run", None, None, None, resume=False, init=public)
    store = RunStore(settings.out_dir, micro_cfg)
    store.prepare(resume=False)
    # execute
    first = initial_global(settings, store, "slice", done=0)
    volume = initial_global(settings, store, "volume", done=0)
    informed = initial_global(settings, store, "informed", done=0)
    # assert: the slice stage and (with no global slice model yet) stage 2 start from the public
    # weights; the informed stage, absent from init, starts from the seeded initialisation
    expected = pretrained.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in first.state_dict().items())
    assert getattr(volume, "inflated", False)
    assert torch.equal(volume.state_dict()["unet.conv_in.conv.weight"], expected["unet.conv_in.conv.weight"])
    fresh = build_model("informed", micro_cfg).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in informed.state_dict().items())


def test_every_configurable_strategy_has_a_builder_and_no_other() -> None:
    # the registry and the config's Literal name the same strategies: a new name cannot be half-added
    from typing import get_args

    from gem3d.config import FederationConfig
    from server.strategy import STRATEGIES

    assert set(STRATEGIES) == set(get_args(FederationConfig.model_fields["strategy"].annotation))


def test_stage_two_without_a_trained_base_is_refused(micro_cfg: Config, tmp_path: Path) -> None:
    # prepare: no init, no global slice model in the run folder
    settings = ServerSettings(micro_cfg, tmp_path / "run", None, None, None, resume=False, init=None)
    store = RunStore(settings.out_dir, micro_cfg)
    store.prepare(resume=False)
    # execute / assert: MONAI zero-initialises the output conv, so stage 2 would train nothing
    with pytest.raises(ConfigError, match="stage 2 needs a trained slice model") as caught:
        initial_global(settings, store, "volume", done=0)
    assert "rounds-slice" in str(caught.value) and "init" in str(caught.value)


def test_a_second_server_on_the_same_run_folder_is_refused_before_any_round(micro_cfg: Config, tmp_path: Path) -> None:
    import subprocess
    import sys

    from server.federation import run_federation

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gem3d.files import writer_lock\n"
         "with writer_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        settings = ServerSettings(micro_cfg, run, None, None, None, resume=False, init=None)
        # no grid is needed: the lock is taken before the server looks at any node
        with pytest.raises(ConfigError, match=r"run config 'out-dir'.*another gem3d process is writing it"):
            run_federation(None, settings)  # type: ignore[arg-type]
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "config.json").exists()  # the refused server wrote nothing
