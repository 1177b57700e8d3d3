"""Aggregation strategies from config, and a wrapper that watches every round.

``federation.strategy`` picks one of Flower's message-API strategies. Robust aggregation
(FedMedian, Krum) bounds the influence of one bad site; FedProx adds a proximal term at the
sites; FedAdam applies a server-side Adam step to the averaged update. Optionally Flower's
server-side client-level DP wrapper (fixed clipping) goes around FedAvg or FedProx, with
Flower's RDP accountant composing every released round of every stage of the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    Krum,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from gem3d.config import Config
from gem3d.errors import ConfigError, Gem3dError

logger = logging.getLogger("flwr").getChild("gem3d.server")

# The strategies whose aggregation is FedAvg's uniform mean of clipped updates, the only one whose
# sensitivity (clip / sampled sites) the server's noise is calibrated to. FedMedian's median and
# Krum's pick of one update move by up to a whole clipped update when one site changes; FedAdam's
# noise would land after its Adam step, whose output is not bounded by the clip (issue 11, point 5).
CLIENT_DP_STRATEGIES = ("fedavg", "fedprox")


class RoundFailed(Gem3dError):
    """A round cannot be run or aggregated; the run stops and resumes from the last completed round.

    Too few sites answered, a sampled site failed under client-level DP, or the next release
    would exceed the client-level DP budget.
    """


def check_client_dp(cfg: Config, options: dict[str, Any]) -> None:
    """Refuse server-side client-level DP settings under which the reported ε would not hold.

    Raises:
        ConfigError: one line naming the run-config option (and ``federation.strategy``).
    """
    noise = float(options.get("server-dp-noise", 0.0))
    if noise < 0:
        raise ConfigError(f"run config 'server-dp-noise' must be >= 0 (0 = no client-level DP), got {noise}")
    if noise == 0:
        return
    strategy = cfg.federation.strategy
    if strategy not in CLIENT_DP_STRATEGIES:
        raise ConfigError(
            f"federation.strategy = '{strategy}' cannot be combined with server-dp-noise = {noise}: "
            f"the client-level DP noise bounds only FedAvg's uniform mean of clipped updates "
            f"({', '.join(CLIENT_DP_STRATEGIES)}); choose one of them or set server-dp-noise = 0"
        )
    clip = float(options.get("server-dp-clip", 1.0))
    if clip <= 0:
        raise ConfigError(f"run config 'server-dp-clip' must be > 0 with server-dp-noise > 0, got {clip}")
    delta = float(options.get("server-dp-delta", 1e-5))
    if not 0 < delta < 1:
        raise ConfigError(f"run config 'server-dp-delta' must be strictly between 0 and 1, got {delta}")
    budget = float(options.get("server-dp-budget", 0.0))
    if budget < 0:
        raise ConfigError(f"run config 'server-dp-budget' must be >= 0 (0 = no limit), got {budget}")


def client_dp_accountant(
    options: dict[str, Any], population: int, saved: dict[str, Any] | None = None
) -> RdpAccountant:
    """Flower's RDP accountant for the run's client-level DP, continuing the releases in ``saved``.

    One accountant covers the whole run: every round of every stage releases a model computed from
    the same sites, so the releases compose. ``saved`` is a previous accountant's ``state_dict()``
    (from ``server_state.json``); it is re-expressed for the current δ, budget and population (a
    resume may change them, and more sites may have connected) before Flower restores it.

    Args:
        options: run-config options (``server-dp-delta``, ``server-dp-budget``).
        population: connected nodes; the population the accountant records (at least the saved one).
        saved: the accountant state to continue from, or None for a new run.

    Raises:
        ValueError: ``saved`` is not a Flower RDP accountant state without amplification.
    """
    saved_population = int(saved["config"]["population_size"]) if saved is not None else 0
    budget = float(options.get("server-dp-budget", 0.0))
    config = PrivacyConfig(
        target_delta=float(options.get("server-dp-delta", 1e-5)),
        population_size=max(population, saved_population),
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        # No amplification by sampling is claimed: Flower samples the sites with Python's `random`
        # (not a secret), at a fixed size, and the coordinator knows who took part in each round.
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=budget if budget > 0 else None,
    )
    accountant = RdpAccountant(config)
    if saved is not None:
        if saved["config"].get("sampling_method") != SamplingMethod.NO_AMPLIFICATION.value:
            raise ValueError(f"sampling_method is {saved['config'].get('sampling_method')!r}, not no-amplification")
        # Sound only without amplification: each release then costs what its noise multiplier
        # alone says (Flower composes a bare Gaussian event); population and sample size are just
        # recorded, δ is where ε is read off and max_epsilon is the limit, none of them a past cost.
        compositions = [
            {**item, "event": {**item["event"], "population_size": config.population_size}}
            for item in saved["compositions"]
        ]
        accountant.load_state_dict({**saved, "config": accountant.state_dict()["config"], "compositions": compositions})
    return accountant


StrategyBuilder = Callable[[dict[str, Any], Config, dict[str, Any]], Strategy]
"""``(common Flower arguments, gem3d config, run-config options) -> strategy``."""


def _fedadam(common: dict[str, Any], cfg: Config, options: dict[str, Any]) -> Strategy:
    # Flower's defaults (eta = 0.1) are sized for small classifiers; a diffusion UNet needs
    # server steps on the scale of its own learning rate.
    return FedAdam(
        **common,
        eta=float(options.get("fedadam-eta", 1e-3)),
        eta_l=float(options.get("fedadam-eta-l", 1e-3)),
        tau=float(options.get("fedadam-tau", 1e-6)),
    )


STRATEGIES: dict[str, StrategyBuilder] = {
    "fedavg": lambda common, cfg, options: FedAvg(**common),
    "fedprox": lambda common, cfg, options: FedProx(**common, proximal_mu=cfg.federation.proximal_mu),
    "fedadam": _fedadam,
    "fedmedian": lambda common, cfg, options: FedMedian(**common),
    "krum": lambda common, cfg, options: Krum(**common, num_malicious_nodes=int(options.get("krum-malicious", 0))),
}
"""``federation.strategy`` names -> how the strategy is built (the config's Literal lists the same names)."""


def build_strategy(
    cfg: Config, options: dict[str, Any], num_nodes: int, accountant: RdpAccountant | None = None
) -> Strategy:
    """The strategy named by ``cfg.federation.strategy``, sampling at least ``federation.min_clients`` sites.

    Args:
        options: the app's run-config options (``fraction-evaluate``, ``fedadam-*``, ``krum-malicious``,
            ``server-dp-noise``/``server-dp-clip``/``server-dp-delta``/``server-dp-budget``).
        num_nodes: connected nodes, for the DP wrapper's sampled-clients count.
        accountant: with ``server-dp-noise > 0``, the run's client-level accountant (a new one if None).

    Raises:
        ConfigError: client-level DP with a strategy whose aggregation the noise does not bound.
    """
    check_client_dp(cfg, options)
    fed = cfg.federation
    common: dict[str, Any] = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": float(options.get("fraction-evaluate", 1.0)),
        "min_train_nodes": fed.min_clients,
        "min_evaluate_nodes": fed.min_clients,
        "min_available_nodes": fed.min_clients,
    }
    builder = STRATEGIES.get(fed.strategy)
    if builder is None:  # the config's Literal makes this unreachable; kept so a new name fails loudly
        raise Gem3dError(f"federation.strategy: unknown strategy '{fed.strategy}' (known: {', '.join(STRATEGIES)})")
    strategy = builder(common, cfg, options)
    noise = float(options.get("server-dp-noise", 0.0))
    if noise > 0:
        # FedAvg.configure_train's sample size: Flower's accounting requires the exact count.
        sampled = max(int(num_nodes * fed.fraction_train), fed.min_clients)
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=noise,
            clipping_norm=float(options.get("server-dp-clip", 1.0)),
            num_sampled_clients=sampled,
            accountant=accountant if accountant is not None else client_dp_accountant(options, num_nodes),
        )
    return strategy


class ObservedStrategy(Strategy):
    """Delegates to a strategy and records what each round sent, received and lost.

    A failed site (an error reply, or a node the SuperLink reports unavailable) is logged with
    its reason; the round is aggregated from the others as long as at least ``min_replies``
    answered, else ``RoundFailed`` stops the run at the last completed round.

    Under client-level DP (``inner`` is Flower's accounted DP wrapper) the server, not the sites,
    sets every reply's weight to 1.0 (the noise is calibrated to a uniform mean), and a round in
    which any sampled site failed stops the run before anything is aggregated or spent: the noise
    is sized for the sampled count, and a mean of fewer clipped updates moves further than it
    covers. (Flower's strict check would instead return no model, and ``Strategy.start`` would go
    on as if the round had trained.) Each round then records ``client-dp-epsilon``,
    ``client-dp-delta`` and ``client-dp-rounds``: the run's cumulative client-level ε so far.

    It also times the phases of a round, for the overhead accounting of
    ``experiments/benchmarks/federation.py``: ``train-phase-seconds`` (from building the train
    messages to having every reply), ``aggregate-seconds``, ``evaluate-phase-seconds`` (the
    sites' evaluation, messages included) and ``sites-eval-seconds`` (the sites' own evaluation time).
    """

    def __init__(self, inner: Strategy, min_replies: int, label: str) -> None:
        self.inner = inner
        self.min_replies = min_replies
        self.label = label
        self.round: dict[str, Any] = {}
        self.sampled: set[int] = set()
        self._phase_started = time.perf_counter()
        self.client_dp: DifferentialPrivacyServerSideFixedClipping | None = None  # Flower's accounted DP wrapper
        if isinstance(inner, DifferentialPrivacyServerSideFixedClipping) and inner.accountant is not None:
            self.client_dp = inner

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        phase_started = time.perf_counter()
        try:
            messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        except PrivacyBudgetExhausted:
            assert self.client_dp is not None and self.client_dp.accountant is not None
            accountant = self.client_dp.accountant
            spent = accountant.get_privacy_spent()
            raise RoundFailed(
                f"{self.label} round {server_round}: the next release would exceed the client-level DP budget "
                f"server-dp-budget = {accountant.config.max_epsilon:g} (client-dp-epsilon {spent.epsilon:.4f} "
                f"at delta {spent.delta:g} after {spent.num_releases} released round(s)); "
                "stopping before any site trains"
            ) from None
        except ValueError as error:
            if self.client_dp is None:
                raise
            # Flower's accounting refuses a sample size other than the one the noise is sized for
            # (a site connected or left since the stage started).
            raise RoundFailed(
                f"{self.label} round {server_round}: client-level DP: {error}; stopping; "
                "rerun to resume after the last completed round"
            ) from None
        sent = messages[0].content["arrays"] if messages else arrays
        self.sampled = {message.metadata.dst_node_id for message in messages}
        self._phase_started = phase_started
        self.round = {
            "sent-arrays": len(sent),
            "sent-bytes": sent.count_bytes(),
            "sent-keys": sorted(sent.keys()),
            "sites-sampled": len(messages),
        }
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        aggregating = time.perf_counter()
        self.round["train-phase-seconds"] = aggregating - self._phase_started
        replies = list(replies)
        valid = [reply for reply in replies if not reply.has_error()]
        failed = [reply for reply in replies if reply.has_error()]
        # The SuperLink answers for a dead node (Node Unavailable) under its own id: name the silent nodes.
        silent = sorted(self.sampled - {reply.metadata.src_node_id for reply in valid})
        failures = []
        for reply in failed:
            source = reply.metadata.src_node_id
            who = f"node {source}" if source in self.sampled else f"node(s) {', '.join(map(str, silent))}"
            failures.append(f"{who}: {reply.error.reason}")
            logger.error("%s round %d: %s failed and is left out", self.label, server_round, failures[-1])
        self.round["sites-ok"] = len(valid)
        self.round["sites-failed"] = len(failed)
        self.round["failures"] = failures
        self.round["received-bytes"] = sum(r.content["arrays"].count_bytes() for r in valid)
        self.round["per-site"] = {
            str(r.metadata.src_node_id): dict(next(iter(r.content.metric_records.values()))) for r in valid
        }
        if len(valid) < self.min_replies:
            raise RoundFailed(
                f"{self.label} round {server_round}: {len(valid)} site(s) answered, fewer than "
                f"federation.min_clients={self.min_replies}; stopping; rerun to resume after the last completed round"
            )
        if self.client_dp is not None:
            if len(valid) != len(self.sampled):
                raise RoundFailed(
                    f"{self.label} round {server_round}: client-level DP (server-dp-noise > 0) needs every sampled "
                    f"site's reply, {len(valid)} of {len(self.sampled)} answered; nothing was aggregated or spent; "
                    "stopping; rerun to resume after the last completed round"
                )
            self._weigh_uniformly(valid)
        arrays, metrics = self.inner.aggregate_train(server_round, valid)
        if self.client_dp is not None:
            self._record_client_dp(server_round, arrays)
        self.round["train"] = dict(metrics) if metrics is not None else {}
        # FedAvg averages every reply metric; a weighted mean of the sites' patient-level ε means
        # nothing. The model's patient-level ε is the maximum over sites (each site's own patients).
        site_epsilons = [float(m["epsilon"]) for m in self.round["per-site"].values() if "epsilon" in m]
        if site_epsilons:
            self.round["train"]["epsilon"] = max(site_epsilons)
        self.round["aggregate-seconds"] = time.perf_counter() - aggregating
        return arrays, metrics

    def _weigh_uniformly(self, valid: list[Message]) -> None:
        """Set every reply's weight to 1.0: the server's weighting, whatever ``num-examples`` a site claims."""
        assert self.client_dp is not None
        key = cast(FedAvg, self.client_dp.strategy).weighted_by_key  # FedAvg or FedProx, by check_client_dp
        for reply in valid:
            for record in reply.content.metric_records.values():
                record[key] = 1.0

    def _record_client_dp(self, server_round: int, arrays: ArrayRecord | None) -> None:
        """Put the run's cumulative client-level ε into this round's metrics."""
        assert self.client_dp is not None and self.client_dp.accountant is not None
        if arrays is None:  # Flower's wrapper refused the replies: no release, and no round either
            raise RoundFailed(
                f"{self.label} round {server_round}: Flower's client-level DP wrapper refused the replies "
                "(see its log above); nothing was released; stopping; rerun to resume after the last completed round"
            )
        spent = self.client_dp.accountant.get_privacy_spent()
        self.round["client-dp-epsilon"] = spent.epsilon
        self.round["client-dp-delta"] = spent.delta
        self.round["client-dp-rounds"] = spent.num_releases
        logger.info(
            "%s round %d: client-level DP epsilon %.4f at delta %g after %d released round(s) of the run",
            self.label,
            server_round,
            spent.epsilon,
            spent.delta,
            spent.num_releases,
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._phase_started = time.perf_counter()
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.round["sites-eval-seconds"] = sum(
            float(next(iter(r.content.metric_records.values())).get("eval-seconds", 0.0))
            for r in replies
            if not r.has_error()
        )
        for reply in replies:
            if reply.has_error():
                logger.error(
                    "%s round %d: evaluation on node %d failed: %s",
                    self.label,
                    server_round,
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
        metrics = self.inner.aggregate_evaluate(server_round, [r for r in replies if not r.has_error()])
        self.round["evaluate"] = dict(metrics) if metrics is not None else {}
        self.round["evaluate-phase-seconds"] = time.perf_counter() - self._phase_started
        return metrics
