"""Client-level DP on the server: Flower's fixed-clipping wrapper with its RDP accountant (issue 11, point 5).

The unit tests drive the real Flower strategies with real messages; only the grid is a stand-in
that lists connected nodes (nothing is sent). The simulation runs one scenario for the module:

1. Two sites, server-dp-noise > 0: two slice rounds and one informed-generator round.
2. The same run with site 1's data missing: the round fails and the run stops, spending nothing.
3. The run resumed with one more informed round: ε continues from the three released rounds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.simulation import run_simulation
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent
from flwr.supercore.task_identity import TaskIdentity
from mlflow import MlflowClient
from opacus.accountants import RDPAccountant

from client.app import app as client_app
from experiments.tracking import read_runs, tracking_uri
from gem3d.config import Config
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.errors import ConfigError
from gem3d.runs import build_model
from gem3d.training import ema_copy
from privacy.model_privacy import model_statement
from server.app import create_app
from server.federation import run_accountant
from server.settings import APP_KEYS
from server.store import CLIENT_DP_KEY, RunStore
from server.strategy import ObservedStrategy, RoundFailed, build_strategy, client_dp_accountant
from tests.test_federated_simulation import BACKEND, MICRO_SET, read_rounds

NOISE = 1.5
DELTA = 1e-5
# One local step, clipped hard so that the noise (std NOISE * clip / sites) leaves the micro
# networks trainable: the accountant's figures do not depend on the clip.
DP_SET = MICRO_SET + " federation.local_steps=1 federation.rounds_slice=2 federation.rounds_volume=0"
DP_OPTIONS = {"server-dp-noise": NOISE, "server-dp-clip": 1e-3, "server-dp-delta": DELTA}


def expected_epsilon(releases: int, noise: float = NOISE, delta: float = DELTA) -> float:
    """ε of ``releases`` Gaussian releases without sampling amplification, by Opacus's own RDP accountant."""
    accountant = RDPAccountant()
    accountant.history = [(noise, 1.0, releases)]
    return accountant.get_epsilon(delta)


def dp_accounting_epsilon(releases: int, noise: float = NOISE, delta: float = DELTA) -> float:
    """The same by Google's dp-accounting directly (Flower's backend, with its default orders)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise), releases)
    return accountant.get_epsilon(delta)


# -- unit tests: real strategies and messages ---------------------------------------------------


class ConnectedNodes(Grid):
    """A grid that only answers which nodes are connected: strategies sample from it, nothing is sent."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise NotImplementedError


@pytest.fixture
def server_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity a ServerApp process has (Flower's runtime sets it): messages need a run and node id."""
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def reply(message: Message, value: float, num_examples: float) -> Message:
    """A site's train reply: every weight set to ``value``, claiming ``num_examples`` cases."""
    arrays = ArrayRecord({"w": Array(np.full(4, value, dtype=np.float32))})
    metrics = MetricRecord({"num-examples": num_examples, "loss": value})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)


def observed_dp(micro_cfg: Config, options: dict[str, Any], nodes: int = 2) -> ObservedStrategy:
    strategy = build_strategy(micro_cfg, {**APP_KEYS, **options}, num_nodes=nodes)
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping) and strategy.accountant is not None
    return ObservedStrategy(strategy, min_replies=1, label="stage slice")


def configure(observed: ObservedStrategy, server_round: int = 1, nodes: int = 2) -> list[Message]:
    initial = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    return list(
        observed.configure_train(server_round, initial, ConfigRecord(), ConnectedNodes(list(range(1, nodes + 1))))
    )


@pytest.mark.usefixtures("server_task")
def test_the_server_weights_replies_uniformly_whatever_the_sites_claim(micro_cfg: Config) -> None:
    # prepare: two sites whose updates (norms 0.2 and 0.6) stay under the clip; noise std 5e-5
    observed = observed_dp(micro_cfg, {"server-dp-noise": 1e-4, "server-dp-clip": 1.0})
    first, second = sorted(configure(observed), key=lambda m: m.metadata.dst_node_id)
    # execute: site 2 claims nine times the cases of site 1
    arrays, _ = observed.aggregate_train(1, [reply(first, 0.1, 1.0), reply(second, 0.3, 9.0)])
    # assert: the uniform mean (0.2), not the claimed weighting (0.28); the site's claim stays on record
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), 0.2, atol=1e-3)
    assert observed.round["per-site"]["2"]["num-examples"] == 9.0
    assert observed.round["client-dp-rounds"] == 1
    assert observed.round["client-dp-delta"] == APP_KEYS["server-dp-delta"]


@pytest.mark.usefixtures("server_task")
def test_a_failed_site_stops_the_round_before_anything_is_released_or_spent(micro_cfg: Config) -> None:
    # prepare: one site answers, the other fails
    observed = observed_dp(micro_cfg, DP_OPTIONS)
    first, second = configure(observed)
    replies = [reply(first, 0.1, 1.0), Message(Error(code=0, reason="no data"), reply_to=second)]
    # execute / assert: with one answer Flower's strict check returns no model (Strategy.start would
    # then carry on as if the round had trained); the observed strategy stops the run instead
    flower_alone = observed_dp(micro_cfg, DP_OPTIONS)
    configure(flower_alone)
    assert flower_alone.inner.aggregate_train(1, replies[:1]) == (None, None)
    with pytest.raises(RoundFailed, match="every sampled site's reply, 1 of 2 answered"):
        observed.aggregate_train(1, replies)
    assert observed.client_dp is not None and observed.client_dp.accountant is not None
    assert observed.client_dp.accountant.num_releases == 0


@pytest.mark.usefixtures("server_task")
def test_the_budget_stops_the_run_before_the_release_that_would_exceed_it(micro_cfg: Config) -> None:
    # prepare: a budget between the ε of one and of two releases
    budget = (expected_epsilon(1) + expected_epsilon(2)) / 2
    observed = observed_dp(micro_cfg, {**DP_OPTIONS, "server-dp-budget": budget})
    first, second = configure(observed, 1)
    observed.aggregate_train(1, [reply(first, 0.1, 1.0), reply(second, 0.3, 1.0)])
    # execute / assert
    with pytest.raises(RoundFailed, match=r"round 2: the next release would exceed .* server-dp-budget"):
        configure(observed, 2)
    assert observed.client_dp is not None and observed.client_dp.accountant is not None
    assert observed.client_dp.accountant.num_releases == 1


def test_a_saved_accountant_continues_under_a_new_delta_and_population() -> None:
    # prepare: three releases by two sites, saved
    saved = client_dp_accountant({**APP_KEYS, **DP_OPTIONS}, population=2)
    saved.compose(GaussianPrivacyEvent(noise_multiplier=NOISE, sample_size=2, population_size=2), count=3)
    # execute: a resume with a third site connected and δ = 1e-6
    resumed = client_dp_accountant({**APP_KEYS, **DP_OPTIONS, "server-dp-delta": 1e-6}, 3, saved.state_dict())
    # assert: the same three releases, read off at the new δ
    assert resumed.num_releases == 3 and resumed.config.population_size == 3
    assert resumed.get_privacy_spent().epsilon == pytest.approx(dp_accounting_epsilon(3, delta=1e-6), rel=1e-9)


def test_client_level_dp_is_refused_on_a_run_that_released_rounds_without_it(micro_cfg: Config, tmp_path: Path) -> None:
    # prepare: a run folder with one slice round completed without client-level DP
    store = RunStore(tmp_path / "run", micro_cfg)
    completed = store.prepare(resume=False)
    model = build_model("slice", micro_cfg)
    store.save_round(model, ema_copy(model, 0.9), "slice", 1, completed, steps=1, sites=2)
    resumed = RunStore(tmp_path / "run", micro_cfg)
    completed = resumed.prepare(resume=True)
    # execute / assert: that round has no finite ε; continuing it under DP would report a false one
    with pytest.raises(ConfigError, match=r"1 of the 1 rounds completed .* were released without client-level DP"):
        run_accountant(resumed, {**APP_KEYS, **DP_OPTIONS}, nodes=2, completed=completed)


# -- the simulation ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # prepare: two phantom sites
    root = tmp_path_factory.mktemp("dp_sites")
    for index in range(2):
        write_phantom_dataset(root / f"site_{index}", num_cases=2, shape=(16, 16, 12), seed=index)
    out = tmp_path_factory.mktemp("dp_federated") / "run"
    run_config = {"data-root": str(root), "out-dir": str(out), "set": DP_SET, "val-cases": 0, **DP_OPTIONS}
    more = {**run_config, "set": DP_SET + " federation.rounds_informed=2"}
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run folder's own store, not a developer's server
        # execute 1: two slice rounds and one informed round
        run_simulation(create_app(run_config), client_app, num_supernodes=2, backend_config=BACKEND)
        first = {"rounds": read_rounds(out), "state": json.loads((out / "server_state.json").read_text())}
        # execute 2: a second informed round while site 1 has no data: the round fails, the run stops
        (root / "site_1").rename(root / "site_1.away")
        with pytest.raises(RuntimeError, match="gem3d federated run stopped") as stopped:
            run_simulation(create_app(more), client_app, num_supernodes=2, backend_config=BACKEND)
        failed = {
            "error": str(stopped.value),
            "rounds": read_rounds(out),
            "state": json.loads((out / "server_state.json").read_text()),
        }
        # execute 3: the data is back; the resumed run does the second informed round
        (root / "site_1.away").rename(root / "site_1")
        run_simulation(create_app(more), client_app, num_supernodes=2, backend_config=BACKEND)
    return {"out": out, "first": first, "failed": failed}


def test_epsilon_per_round_composes_over_rounds_and_stages(scenario: dict[str, Any]) -> None:
    # assert: slice 1, slice 2, informed 1; ε is the run's, monotone across the stage boundary
    rounds = scenario["first"]["rounds"]
    assert [(r["stage"], r["round"]) for r in rounds] == [("slice", 1), ("slice", 2), ("informed", 1)]
    assert [r["client-dp-rounds"] for r in rounds] == [1, 2, 3]
    epsilons = [r["client-dp-epsilon"] for r in rounds]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 3
    assert all(r["client-dp-delta"] == DELTA for r in rounds)
    # the sites' patient-level ε (none here) is never mixed with the client-level one
    assert all("epsilon" not in r["train"] for r in rounds)


def test_epsilon_matches_independent_accountants(scenario: dict[str, Any]) -> None:
    # execute
    measured = [r["client-dp-epsilon"] for r in scenario["first"]["rounds"]]
    opacus = [expected_epsilon(k) for k in (1, 2, 3)]
    direct = [dp_accounting_epsilon(k) for k in (1, 2, 3)]
    # assert: Opacus's orders stop at 63, dp-accounting's go on to 1024; at this noise both pick an order
    # below 63 (measured: equal to 2e-16 relative)
    for ours, theirs, same_backend in zip(measured, opacus, direct, strict=True):
        assert ours == pytest.approx(theirs, rel=0.03)
        assert ours == pytest.approx(same_backend, rel=1e-9)


def test_the_accountant_state_is_persisted_in_server_state(scenario: dict[str, Any]) -> None:
    # assert: Flower's state_dict, no amplification, one composition per released round
    state = scenario["first"]["state"][CLIENT_DP_KEY]
    assert state["config"]["sampling_method"] == "no-amplification"
    assert state["config"]["population_size"] == 2 and state["config"]["target_delta"] == DELTA
    assert sum(item["count"] for item in state["compositions"]) == 3
    assert {item["event"]["noise_multiplier"] for item in state["compositions"]} == {NOISE}


def test_a_failed_round_under_client_dp_stops_the_run_and_spends_nothing(scenario: dict[str, Any]) -> None:
    # assert: one line says why; the failed run added no round, no release, nothing to the state
    error = scenario["failed"]["error"]
    assert "stage informed round 1: client-level DP (server-dp-noise > 0) needs every sampled site's reply" in error
    assert "1 of 2 answered; nothing was aggregated or spent" in error and "\n" not in error
    assert scenario["failed"]["rounds"] == scenario["first"]["rounds"]
    assert scenario["failed"]["state"] == scenario["first"]["state"]


def test_a_resumed_run_continues_epsilon_from_the_persisted_state(scenario: dict[str, Any]) -> None:
    # execute
    rounds = read_rounds(scenario["out"])
    state = json.loads((scenario["out"] / "server_state.json").read_text())
    # assert: the fourth release, not a first one
    assert [(r["stage"], r["round"]) for r in rounds[3:]] == [("informed", 2)]
    assert rounds[3]["client-dp-rounds"] == 4
    assert rounds[3]["client-dp-epsilon"] == pytest.approx(expected_epsilon(4), rel=0.03)
    assert rounds[3]["client-dp-epsilon"] > rounds[2]["client-dp-epsilon"]
    assert sum(item["count"] for item in state[CLIENT_DP_KEY]["compositions"]) == 4
    assert state["completed"] == {"autoencoder": 0, "slice": 2, "volume": 0, "informed": 2}
    # assert: the checkpoints' privacy records carry it, apart from the (absent) patient-level ε
    statement = model_statement(scenario["out"])
    assert statement["client_level"]["epsilon"] == pytest.approx(rounds[3]["client-dp-epsilon"])
    assert statement["client_level"]["rounds"] == 4
    assert statement["patient_level"]["epsilon"] is None
    assert any("without DP-SGD" in item for item in statement["non_dp_private"])  # the sites ran no DP-SGD


def test_mlflow_has_the_client_level_epsilon_of_every_round(
    scenario: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = scenario["out"] / "mlflow"
    client = MlflowClient(tracking_uri=tracking_uri(store))
    parents = [r for r in read_runs(store, "gem3d-federated") if r["parent_run_id"] is None]
    # execute: the first process's parent run (its start time is the earliest)
    first = min(parents, key=lambda r: client.get_run(r["run_id"]).info.start_time)
    history = sorted((m.step, m.value) for m in client.get_metric_history(first["run_id"], "client-dp-epsilon"))
    # assert
    expected = [r["client-dp-epsilon"] for r in scenario["first"]["rounds"]]
    assert [value for _, value in history] == pytest.approx(expected)
    assert first["metrics"]["client-dp-rounds"] == 3.0 and first["metrics"]["client-dp-delta"] == DELTA
    assert not any(name.endswith(".client-dp-epsilon") for name in first["metrics"])  # one run-wide curve


@pytest.mark.usefixtures("server_task")
def test_the_round_reports_the_sites_largest_patient_level_epsilon(micro_cfg: Config) -> None:
    # prepare: two DP sites with different ε, without client-level DP
    observed = ObservedStrategy(build_strategy(micro_cfg, dict(APP_KEYS), num_nodes=2), min_replies=1, label="s")
    first, second = sorted(configure(observed), key=lambda m: m.metadata.dst_node_id)
    replies = []
    for message, epsilon, weight in ((first, 1.0, 1.0), (second, 3.0, 3.0)):
        answer = reply(message, 0.1, weight)
        answer.content["metrics"]["epsilon"] = epsilon
        replies.append(answer)
    # execute
    observed.aggregate_train(1, replies)
    # assert: the maximum over sites (FedAvg's weighted mean would say 2.5)
    assert observed.round["train"]["epsilon"] == 3.0
