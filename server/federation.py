"""The federated GEM-3D schedule: R1 rounds of stage 1, inflate, R2 rounds of stage 2, R3 of the informed generator
(for a latent model first R0 rounds of the stage-0 autoencoder).

Each stage is one ``strategy.start`` over the rounds it still needs; its ``evaluate_fn`` runs
after every round and is where the server evaluates, checkpoints and reports. A stage whose
network has a frozen part (``gem3d.runs.frozen_part``: the global slice model under a frozen
stage 2, a latent network's autoencoder) first installs it at every site (a query message), so
its rounds carry only the weights that train.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from torch import nn
from torch.optim.swa_utils import AveragedModel

from gem3d.checkpoint import read_metadata, tensors_sha256
from gem3d.data.dataset import load_volumes
from gem3d.data.volume import Volume
from gem3d.errors import CheckpointError, ConfigError, DataError
from gem3d.files import writer_lock
from gem3d.networks import SliceDenoiser
from gem3d.runs import STAGE_FILES, build_model, codec_source, frozen_part, init_checkpoint, initial_model
from gem3d.training import STAGES, Stage, ema_copy, freeze_for_stage, held_out_loss, travelling_names
from privacy.model_privacy import site_entry, stage_record
from server.settings import ServerSettings
from server.store import RunStore, global_tensors
from server.strategy import ObservedStrategy, RoundFailed, build_strategy, check_client_dp, client_dp_accountant

logger = logging.getLogger("flwr").getChild("gem3d.server")
OnRound = Callable[[dict[str, Any]], None]
"""Called with each round's metrics; the hook for experiment tracking (MLflow lives in experiments/tracking.py)."""

_STAGE_SEED_STRIDE = 1_000_000
# Each stage's index in the round seeds (the stages before stage 0 existed keep theirs).
_STAGE_SEED_INDEX: dict[Stage, int] = {"slice": 0, "volume": 1, "informed": 2, "autoencoder": 3}
# Server-side evaluation (run config server-data) is scored on the same noise and windows every round.
EVAL_SEED_OFFSET = 2_000_003
_ROUND_SEED_STRIDE = 1_000


def rounds_for(settings: ServerSettings, stage: Stage) -> int:
    return int(getattr(settings.cfg.federation, f"rounds_{stage}"))


def initial_global(settings: ServerSettings, store: RunStore, stage: Stage, done: int) -> nn.Module:
    """The global model a stage starts (or resumes) from.

    A resumed stage loads its last global checkpoint. A new stage starts from the run config's
    ``init`` (a run folder or checkpoint, e.g. a model pre-trained on public data that the sites
    fine-tune) when it holds weights for the stage; stage 2 does so only when this run has no
    global slice model, whose federated training must not be discarded. Otherwise stage 2
    inflates the final global slice model and the other stages start from a seeded random
    initialisation.
    """
    cfg = settings.cfg
    if done > 0:
        model = build_model(stage, cfg)
        store.load_global(model, stage)
        return model
    start = start_checkpoint(settings, store, stage)
    slice_path = store.out_dir / STAGE_FILES["slice"]
    if start is not None and start != slice_path:
        logger.info("stage %s starts from %s", stage, settings.init)
        return initial_model(stage, cfg, None, settings.init, torch.device("cpu"))
    if stage != "volume":  # a seeded initialisation; a latent one with the run's autoencoder
        return initial_model(stage, cfg, store.out_dir, None, torch.device("cpu"))
    if start is None:
        raise ConfigError(
            f"{store.out_dir}: stage 2 needs a trained slice model, and this run has none: train the slice "
            "stage first (rounds-slice > 0) or start from one (run config 'init'); an untrained base would "
            "train nothing (its output layer starts at zero)"
        )
    model = build_model("slice", cfg)
    store.load_global(model, "slice", "ema")  # the base samplers would use: the slice stage's EMA
    assert isinstance(model, SliceDenoiser)
    model.inflate(cfg.train.seed)
    return model


def round_ema_decay(settings: ServerSettings) -> float:
    """The per-round EMA decay: ``federation.ema_decay``, else ``train.ema_decay ** local_steps``."""
    federation = settings.cfg.federation
    if federation.ema_decay is not None:
        return federation.ema_decay
    return float(settings.cfg.train.ema_decay**federation.local_steps)


def global_ema(settings: ServerSettings, store: RunStore, model: nn.Module, stage: Stage, done: int) -> AveragedModel:
    """The server's EMA of the stage's global weights, updated after every round (with warm-up).

    A new stage's EMA starts as a copy of its initial weights, with no update counted (the first
    round's weights replace it); a resumed stage continues the EMA its last checkpoint saved.
    """
    ema = ema_copy(model, round_ema_decay(settings), warmup=True)
    if done > 0:
        store.load_ema(ema, stage)
    return ema


def start_checkpoint(settings: ServerSettings, store: RunStore, stage: Stage) -> Path | None:
    """The checkpoint whose weights a new ``stage`` starts from (``initial_global``'s rule), if any.

    The run config's ``init`` when it has weights for the stage (stage 2 only when this run has no
    global slice model); for stage 2 otherwise the run's own global slice model; else None.
    """
    own_slice = store.out_dir / STAGE_FILES["slice"]
    if settings.init is not None and not (stage == "volume" and own_slice.exists()) and _has_init(settings.init, stage):
        return init_checkpoint(settings.init, stage)
    if stage == "volume" and own_slice.exists():
        return own_slice
    return None


def privacy_record(
    store: RunStore, stage: Stage, start: Path | None, per_site: dict[str, dict[str, Any]], client_dp: dict[str, Any]
) -> dict[str, Any]:
    """The ``privacy`` record of a stage's global checkpoint after a round (``privacy.model_privacy``).

    Each site that trained in the round is named by its ``site-index``; a DP site's entry is the
    cumulative ε and δ of its ledger that it reported, a non-DP site's says so. The record of the
    stage's previous round (or of a resumed run) is merged in, so it covers every round; the
    weights the stage started from bring their own record.
    """
    sites = {}
    for node, reply in per_site.items():
        index = reply.get("site-index")
        name = f"site_{int(index)}" if isinstance(index, int | float) else f"node_{node}"
        if reply.get("dp"):
            sites[name] = {"dp": True, "ledger": None, "epsilon": reply.get("epsilon"), "delta": reply.get("delta"),
                           "accountant": None}  # fmt: skip
        else:
            sites[name] = site_entry(None)
    client_level = None
    if "client-dp-epsilon" in client_dp:
        client_level = {
            "level": "client (one site's participation), server-side DP, no amplification",
            "epsilon": client_dp["client-dp-epsilon"],
            "delta": client_dp["client-dp-delta"],
            "rounds": client_dp["client-dp-rounds"],
        }
    path = store.out_dir / STAGE_FILES[stage]
    previous = read_metadata(path).get("privacy", {}) if path.exists() else None
    return stage_record(public=False, sites=sites, init=start, client_level=client_level, previous=previous)


def _has_init(init: Path, stage: Stage) -> bool:
    """Whether ``init`` holds weights for ``stage`` (for stage 2: volume or slice weights)."""
    stages = ("volume", "slice") if stage == "volume" else (stage,)
    if init.is_file():
        return read_metadata(init)["stage"] in stages
    return any((init / STAGE_FILES[name]).exists() for name in stages)


def job_config(settings: ServerSettings, stage: Stage) -> dict[str, Any]:
    """What every site needs to run a round of ``stage`` (sent in each message's config record)."""
    cfg, options = settings.cfg, settings.options
    record: dict[str, Any] = {
        "stage": stage,
        "gem3d-config": json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
        "local-steps": cfg.federation.local_steps,
        "val-cases": int(options["val-cases"]),
        "eval-batches": int(options["eval-batches"]),
        "torch-threads": int(options["torch-threads"]),
        "proximal-mu": cfg.federation.proximal_mu if cfg.federation.strategy == "fedprox" else 0.0,
    }
    # Simulation only: the sites find their partition under the data root the server was given.
    if settings.data_root is not None:
        record["data-root"] = str(settings.data_root)
        record["demo-data"] = bool(options["demo-data"])
    if settings.state_root is not None:
        record["state-root"] = str(settings.state_root)
    return record


def base_tensors(settings: ServerSettings, store: RunStore, stage: Stage, model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen part of ``stage``'s initial global ``model`` (``frozen_part``) that the sites install.

    ``slice``: the global slice model's EMA weights (the base a frozen stage 2 is inflated from);
    ``codec``: the latent network's autoencoder, as ``codec.*`` state-dict entries.
    """
    if frozen_part(stage, settings.cfg) == "codec":
        codec = getattr(model, "codec", None)
        assert isinstance(codec, nn.Module)
        return {f"codec.{name}": tensor for name, tensor in codec.state_dict().items()}
    base = build_model("slice", settings.cfg)
    if (store.out_dir / STAGE_FILES["slice"]).exists():
        store.load_global(base, "slice", "ema")  # initial_global's base
    return global_tensors(base, list(base.state_dict()))


def install_base(
    grid: Grid, settings: ServerSettings, stage: Stage, base: dict[str, torch.Tensor], timeout: float
) -> str:
    """Send a stage's frozen base (``base_tensors``) to every node once; return its id (a hash of its tensors).

    A node that cannot store it is logged; it will then fail the stage's rounds with a clear error.
    """
    base_id = tensors_sha256(base)[:16]
    content = RecordDict(
        {
            "base": ArrayRecord(base),
            "config": ConfigRecord({**job_config(settings, stage), "base-id": base_id}),
        }
    )
    messages = [
        Message(content=content, dst_node_id=node, message_type=f"{MessageType.QUERY}.install_base")
        for node in grid.get_node_ids()
    ]
    installed = 0
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            node, reason = reply.metadata.src_node_id, reply.error.reason
            logger.error("node %d could not install the %s stage's base: %s", node, stage, reason)
        else:
            installed += 1
    logger.info("%s stage's base %s installed at %d of %d node(s)", stage, base_id, installed, len(messages))
    return base_id


def _server_volumes(settings: ServerSettings) -> list[Volume]:
    if settings.server_data is None:
        return []
    if not settings.server_data.is_dir():
        raise DataError(f"run config 'server-data': {settings.server_data} does not exist")
    return load_volumes(settings.server_data, settings.cfg.data)


def run_federation(grid: Grid, settings: ServerSettings, on_round: OnRound | None = None) -> dict[str, Any]:
    """Run (or resume) all stages; return a summary with the final run folder.

    Args:
        grid: Flower's grid of connected SuperNodes.
        on_round: called with each completed round's metrics (e.g. to log to MLflow).
    """
    check_client_dp(settings.cfg, settings.options)
    # One writer per run folder: a second ServerApp on the same out-dir is refused, not raced.
    with writer_lock(settings.out_dir, "run config 'out-dir'"):
        return _run_all_stages(grid, settings, on_round)


def _run_all_stages(grid: Grid, settings: ServerSettings, on_round: OnRound | None) -> dict[str, Any]:
    store = RunStore(settings.out_dir, settings.cfg)
    completed = store.prepare(settings.resume)
    server_volumes = _server_volumes(settings)
    logger.info("federated run folder: %s (resume from %s)", settings.out_dir, completed)
    _warn_missing_sites(grid, settings)
    needs_base = rounds_for(settings, "volume") > completed["volume"] and not rounds_for(settings, "slice")
    if needs_base and start_checkpoint(settings, store, "volume") is None:
        initial_global(settings, store, "volume", 0)  # raises, naming what is missing, before any round

    for stage in STAGES:
        total, done = rounds_for(settings, stage), completed[stage]
        if done >= total:
            if total:
                logger.info("stage %s: %d/%d rounds already completed", stage, done, total)
            continue
        _run_stage(grid, settings, store, stage, _STAGE_SEED_INDEX[stage], completed, server_volumes, on_round)
    final = {"run": str(settings.out_dir), "completed": completed}
    missing = [s for s in STAGES if rounds_for(settings, s) and not (settings.out_dir / STAGE_FILES[s]).exists()]
    if missing:
        raise CheckpointError(f"{settings.out_dir}: stages {missing} have no checkpoint after the run")
    return final


def _run_stage(
    grid: Grid,
    settings: ServerSettings,
    store: RunStore,
    stage: Stage,
    stage_index: int,
    completed: dict[str, int],
    server_volumes: list[Volume],
    on_round: OnRound | None,
) -> None:
    """The remaining rounds of one stage: one ``strategy.start``, checkpointing after every round."""
    cfg, options = settings.cfg, settings.options
    total, done = rounds_for(settings, stage), completed[stage]
    timeout = float(options["round-timeout"])
    wait_for_nodes(grid, cfg.federation.min_clients, timeout)
    nodes = len(list(grid.get_node_ids()))
    accountant = run_accountant(store, options, nodes, completed)
    start = start_checkpoint(settings, store, stage) if done == 0 else None  # a resumed stage's record has it
    if start is None and done == 0 and frozen_part(stage, cfg) == "codec":
        start = codec_source(cfg, store.out_dir)  # a fresh latent stage carries its autoencoder's record
    model = initial_global(settings, store, stage, done)
    ema = global_ema(settings, store, model, stage, done)
    freeze_for_stage(model, stage, cfg.train.volume_train_all)
    names = travelling_names(model)
    record = job_config(settings, stage)
    if frozen_part(stage, cfg) is not None:
        record["base-id"] = install_base(grid, settings, stage, base_tensors(settings, store, stage, model), timeout)
    observed = ObservedStrategy(
        build_strategy(cfg, options, nodes, accountant), cfg.federation.min_clients, f"stage {stage}"
    )
    seed_base = cfg.train.seed + _STAGE_SEED_STRIDE * stage_index
    train_config = ConfigRecord({**record, "seed": seed_base + _ROUND_SEED_STRIDE * done})
    rounds = _StageRounds(
        settings=settings,
        store=store,
        stage=stage,
        model=model,
        ema=ema,
        observed=observed,
        accountant=accountant,
        start=start,
        completed=completed,
        server_volumes=server_volumes,
        on_round=on_round,
        train_config=train_config,
        seed_base=seed_base,
    )
    observed.start(
        grid=grid,
        initial_arrays=ArrayRecord(global_tensors(model, names)),
        num_rounds=total - done,
        timeout=timeout,
        train_config=train_config,
        evaluate_config=ConfigRecord(record),
        evaluate_fn=rounds.after_round,
    )


@dataclass
class _StageRounds:
    """What the server does after each round of one stage (Flower's ``evaluate_fn``): take in the
    new global model, evaluate it on the server's own split, checkpoint it and report the round.

    A round's clock (``round-seconds``) runs from the end of the previous one, its report
    included, to its checkpoint; the report's own time is in the next round's ``report-seconds``.
    """

    settings: ServerSettings
    store: RunStore
    stage: Stage
    model: nn.Module
    ema: AveragedModel
    observed: ObservedStrategy
    accountant: RdpAccountant | None
    start: Path | None  # the checkpoint the stage started from (its privacy record's source)
    completed: dict[str, int]  # stage -> rounds done, updated after every checkpoint
    server_volumes: list[Volume]
    on_round: OnRound | None
    train_config: ConfigRecord  # the sites' next round's config: its seed is set after every round
    seed_base: int
    started: float = field(default_factory=time.perf_counter)
    reporting: float = 0.0

    def __post_init__(self) -> None:
        self.done, self.total = self.completed[self.stage], rounds_for(self.settings, self.stage)

    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower's evaluate_fn: evaluate, checkpoint and report the new global model."""
        if server_round == 0:  # the initial arrays: nothing trained yet
            return MetricRecord({})
        stage_round = self.done + server_round
        unpacking = time.perf_counter()
        self.model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        self.ema.update_parameters(self.model)
        metrics: dict[str, Any] = {"stage": self.stage, "round": stage_round, **self.observed.round}
        metrics["server-unpack-seconds"] = time.perf_counter() - unpacking
        if self.server_volumes:
            metrics.update(self._server_evaluation())
        self._checkpoint(stage_round, metrics)
        self._report(stage_round, metrics)
        # Round numbers restart with every strategy.start: tell the sites the next round's seed.
        self.train_config["seed"] = self.seed_base + _ROUND_SEED_STRIDE * stage_round
        return MetricRecord(
            {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        )

    def _server_evaluation(self) -> dict[str, float]:
        """The model's and the EMA's held-out loss on the server's split, on the same draws every round."""
        cfg = self.settings.cfg
        evaluating = time.perf_counter()
        batches, seed = int(self.settings.options["eval-batches"]), cfg.train.seed + EVAL_SEED_OFFSET
        return {
            "server-eval-loss": held_out_loss(self.model, self.stage, self.server_volumes, cfg, batches, seed),
            "server-eval-loss-ema": held_out_loss(self.ema.module, self.stage, self.server_volumes, cfg, batches, seed),
            "server-eval-seconds": time.perf_counter() - evaluating,
        }

    def _checkpoint(self, stage_round: int, metrics: dict[str, Any]) -> None:
        """Save the round's global checkpoint (with its privacy record) and append its metrics."""
        saving = time.perf_counter()
        client_dp = self.accountant.state_dict() if self.accountant is not None else None
        round_info = self.observed.round
        privacy = privacy_record(self.store, self.stage, self.start, round_info.get("per-site") or {}, round_info)
        path = self.store.save_round(
            self.model,
            self.ema,
            self.stage,
            stage_round,
            self.completed,
            stage_round * self.settings.cfg.federation.local_steps,
            int(metrics.get("sites-ok", 0)),
            client_dp=client_dp,
            privacy=privacy,
        )
        self.completed[self.stage] = stage_round
        metrics["checkpoint-seconds"] = time.perf_counter() - saving
        metrics["report-seconds"] = self.reporting  # the previous round's report ran inside this round's clock
        metrics["round-seconds"] = time.perf_counter() - self.started
        metrics["checkpoint"] = str(path)
        self.store.append_metrics(metrics)

    def _report(self, stage_round: int, metrics: dict[str, Any]) -> None:
        """Log the round and hand its metrics to ``on_round`` (MLflow), timing the hand-over."""
        logger.info(
            "%s round %d/%d: train loss %.4f, eval loss %s, %d site(s) ok, %d failed -> %s",
            self.stage,
            stage_round,
            self.total,
            metrics.get("train", {}).get("loss", float("nan")),
            metrics.get("evaluate", {}).get("eval-loss", "n/a"),
            metrics.get("sites-ok", 0),
            metrics.get("sites-failed", 0),
            metrics["checkpoint"],
        )
        reported = time.perf_counter()
        self.started = reported
        if self.on_round is not None:
            self.on_round(metrics)
        self.reporting = time.perf_counter() - reported


def run_accountant(
    store: RunStore, options: dict[str, Any], nodes: int, completed: dict[str, int]
) -> RdpAccountant | None:
    """The run's client-level DP accountant for the next stage: the saved one continued, or a new one.

    Every stage continues the state the last round saved, so the stages and a restarted server
    compose onto the same releases. None when ``server-dp-noise`` is 0.

    Raises:
        ConfigError: rounds of this run were released without client-level DP (its ε cannot cover them).
        CheckpointError: the saved accountant state cannot be continued.
    """
    if float(options["server-dp-noise"]) <= 0:
        return None
    try:
        accountant = client_dp_accountant(options, nodes, store.client_dp_state)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{store.state_path}: its client-level DP accountant state cannot be continued ({error}); "
            "choose another out-dir"
        ) from None
    # Every completed round was a release to the sites; one without noise has no finite ε.
    released = sum(completed.values())
    if accountant.num_releases < released:
        raise ConfigError(
            f"run config 'server-dp-noise': {released - accountant.num_releases} of the {released} rounds completed "
            f"in {store.out_dir} were released without client-level DP, which no ε covers; choose another out-dir"
        )
    return accountant


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> None:
    """Block until ``count`` SuperNodes are connected (sites may still be starting)."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RoundFailed(f"fewer than federation.min_clients={count} SuperNodes connected within {timeout:.0f} s")
        time.sleep(1.0)


def _warn_missing_sites(grid: Grid, settings: ServerSettings) -> None:
    """In simulation, say so when the data root has more sites than there are SuperNodes."""
    if settings.data_root is None or not settings.data_root.is_dir():
        return
    sites = sorted(p.name for p in settings.data_root.glob("site_*") if p.is_dir())
    nodes = len(list(grid.get_node_ids()))
    if nodes < len(sites):
        logger.warning(
            "%s has %d sites but only %d SuperNodes run; sites %s take no part. "
            "Run with --federation-config 'num-supernodes=%d'",
            settings.data_root,
            len(sites),
            nodes,
            sites[nodes:],
            len(sites),
        )
