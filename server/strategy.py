"""Aggregation strategies from config, and a wrapper that watches every round.

``federation.strategy`` picks one of Flower's message-API strategies. Robust aggregation
(FedMedian, Krum) bounds the influence of one bad site; FedProx adds a proximal term at the
sites; FedAdam applies a server-side Adam step to the averaged update. Optionally Flower's
server-side client-level DP wrapper (fixed clipping) goes around it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    Krum,
    Strategy,
)

from gem3d.config import Config
from gem3d.errors import Gem3dError

logger = logging.getLogger("flwr").getChild("gem3d.server")


class RoundFailed(Gem3dError):
    """Too few sites answered a round; the run stops and resumes from the last completed round."""


def build_strategy(cfg: Config, options: dict[str, Any], num_nodes: int) -> Strategy:
    """The strategy named by ``cfg.federation.strategy``, sampling at least ``federation.min_clients`` sites.

    Args:
        options: the app's run-config options (``fraction-evaluate``, ``fedadam-*``, ``krum-malicious``,
            ``server-dp-noise``/``server-dp-clip``).
        num_nodes: connected nodes, for the DP wrapper's sampled-clients count.
    """
    fed = cfg.federation
    common: dict[str, Any] = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": float(options.get("fraction-evaluate", 1.0)),
        "min_train_nodes": fed.min_clients,
        "min_evaluate_nodes": fed.min_clients,
        "min_available_nodes": fed.min_clients,
    }
    strategy: Strategy
    if fed.strategy == "fedavg":
        strategy = FedAvg(**common)
    elif fed.strategy == "fedprox":
        strategy = FedProx(**common, proximal_mu=fed.proximal_mu)
    elif fed.strategy == "fedadam":
        # Flower's defaults (eta = 0.1) are sized for small classifiers; a diffusion UNet needs
        # server steps on the scale of its own learning rate.
        strategy = FedAdam(
            **common,
            eta=float(options.get("fedadam-eta", 1e-3)),
            eta_l=float(options.get("fedadam-eta-l", 1e-3)),
            tau=float(options.get("fedadam-tau", 1e-6)),
        )
    elif fed.strategy == "fedmedian":
        strategy = FedMedian(**common)
    elif fed.strategy == "krum":
        strategy = Krum(**common, num_malicious_nodes=int(options.get("krum-malicious", 0)))
    else:  # the config's Literal makes this unreachable; kept so a new name fails loudly
        raise Gem3dError(f"federation.strategy: unknown strategy '{fed.strategy}'")
    noise = float(options.get("server-dp-noise", 0.0))
    if noise > 0:
        sampled = max(int(num_nodes * fed.fraction_train), fed.min_clients)
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=noise,
            clipping_norm=float(options.get("server-dp-clip", 1.0)),
            num_sampled_clients=sampled,
        )
    return strategy


class ObservedStrategy(Strategy):
    """Delegates to a strategy and records what each round sent, received and lost.

    A failed site (an error reply, or a node the SuperLink reports unavailable) is logged with
    its reason; the round is aggregated from the others as long as at least ``min_replies``
    answered, else ``RoundFailed`` stops the run at the last completed round.

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

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        phase_started = time.perf_counter()
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
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
        arrays, metrics = self.inner.aggregate_train(server_round, valid)
        self.round["train"] = dict(metrics) if metrics is not None else {}
        self.round["aggregate-seconds"] = time.perf_counter() - aggregating
        return arrays, metrics

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
