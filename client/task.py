"""What one hospital does in a round: load its data, train the current stage locally, evaluate.

Plain functions over gem3d; ``client/app.py`` only unpacks Flower messages and calls them.

What the run is arrives in the message's ``config`` record from the server (the gem3d config
as JSON, the stage, local steps, the round seed); where its data lives comes from the node
config (``data-dir``, deployment) or from its partition of a data root (simulation). How
private its patients are is the site's own decision: its privacy policy (``privacy.policy``)
comes from its state folder or node config, and a request weaker than it is refused. A site's
own state (key, policy, privacy ledger, the frozen stage-2 base) lives in its state folder:
node config ``state-dir``, else the ``state-root`` named in simulation, else
``<data-dir>/.gem3d-site``.

A DP-SGD site replies with its noised weights and only figures that do not depend on its
patients (``dp_reply``): no loss, no exact case count, no timings.

Local training state (AdamW moments, EMA, generator) is recreated every round from the global
weights and a seed derived from the round and the site: rounds are then reproducible and a
restarted site needs nothing but its ledger. The cost is that AdamW restarts its moment
estimates each round, as in plain FedAvg with a stateless client.

A process that serves several rounds (a simulation's Ray worker) keeps each site's loaded
volumes between rounds (``site_volumes``), so the data is read and mapped to the model grid
once, not twice per round. A deployed SuperNode starts one ClientApp process per message, so
there the cache lives only for one message; a prepared (memory-mapped) data folder is the way
to make its loading cheap.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gem3d import distributed
from gem3d.accel import accelerate
from gem3d.checkpoint import load_checkpoint, load_weights, save_checkpoint, subset
from gem3d.config import Config, PrivacyConfig, config_from_dict
from gem3d.data.dataset import load_volumes
from gem3d.data.volume import Volume
from gem3d.data.windows import WindowSource
from gem3d.diffusion import noise_process
from gem3d.errors import CheckpointError, ConfigError, DataError
from gem3d.networks import SliceDenoiser
from gem3d.runs import build_model, frozen_part
from gem3d.training import STAGES, Stage, TrainFn, freeze_for_stage, held_out_loss, new_state, train, travelling_names

logger = logging.getLogger("flwr").getChild("gem3d.client")

# Offsets that keep the generators of different sites and of evaluation apart.
_SITE_SEED_STRIDE = 7919
_EVAL_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class Site:
    """Where one site's data and private state live.

    Attributes:
        name: for messages, e.g. ``site_1``.
        data_dir: nnU-Net v2 raw dataset folder of this site.
        state_dir: this site's private state (privacy ledger, stage-2 base weights).
        index: distinguishes the sites' random streams (partition id in simulation).
        policy_file: the site's privacy policy named by node config ``privacy-policy``
            (default: ``privacy_policy.toml`` in ``state_dir``; see ``privacy.policy``).
        processes: node config ``train-processes``: how many local processes train each round
            together (one per GPU, ``cuda:0`` .. ``cuda:N-1``; ``gem3d.distributed.run_local``).
    """

    name: str
    data_dir: Path
    state_dir: Path
    index: int
    policy_file: Path | None = None
    processes: int = 1


def locate_site(node_config: dict[str, Any], job: dict[str, Any]) -> Site:
    """The site of this node: ``data-dir`` from node config, else partition ``site_<id>`` of the data root.

    Args:
        node_config: Flower node config (``data-dir``, ``state-dir``, ``site-index``, or in
            simulation ``partition-id``).
        job: the message config from the server (``data-root``, ``state-root`` in simulation).
    """
    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"])).expanduser()
        index = int(node_config.get("site-index", 0))
        name = str(node_config.get("site-name", data_dir.name))
    elif "partition-id" in node_config and job.get("data-root"):
        index = int(node_config["partition-id"])
        name = f"site_{index}"
        data_dir = Path(str(job["data-root"])).expanduser() / name
        if not data_dir.exists() and job.get("demo-data"):
            build_demo_partition(data_dir, index, int(node_config.get("num-partitions", index + 1)))
    else:
        raise ConfigError(
            "this SuperNode has no data: start it with --node-config \"data-dir='/path/to/site'\" "
            "(or run a simulation with the run config data-root set)"
        )
    if "state-dir" in node_config:
        state_dir = Path(str(node_config["state-dir"])).expanduser()
    elif "data-dir" not in node_config and job.get("state-root"):
        state_dir = Path(str(job["state-root"])).expanduser() / name  # simulation: one machine, server names it
    else:
        state_dir = data_dir / ".gem3d-site"
    policy = node_config.get("privacy-policy")
    policy_file = Path(str(policy)).expanduser() if policy else None
    try:
        processes = int(node_config.get("train-processes", 1))
    except ValueError:
        processes = 0
    if processes < 1:
        raise ConfigError(
            f"node config train-processes={node_config.get('train-processes')!r}: expected a whole number >= 1 "
            "(processes training each round together, one per GPU)"
        )
    return Site(
        name=name, data_dir=data_dir, state_dir=state_dir, index=index, policy_file=policy_file, processes=processes
    )


def build_demo_partition(data_dir: Path, index: int, sites: int) -> None:
    """A simulated site with nothing prepared builds its demo partition (``flwr run .`` from a fresh clone).

    Only where the data root is missing or was itself built this way (it holds
    ``DEMO_ROOT_MARKER``): a data root of real sites with one site folder missing is an error
    the site reports, never silently filled with demo data.
    """
    from gem3d.data.demo_cohort import DEMO_ROOT_MARKER, write_demo_site

    root = data_dir.parent
    prepared = root.exists() and any(p.name != DEMO_ROOT_MARKER for p in root.iterdir())
    if prepared and not (root / DEMO_ROOT_MARKER).exists():
        return  # real data: site_volumes reports the missing folder
    logger.warning(
        "%s: no data at %s; building this site's partition of the demo cohort (MNI152 anatomy, deformed; "
        "run config demo-data=false turns this off)",
        data_dir.name,
        data_dir,
    )
    write_demo_site(root, index, sites)


@dataclass(frozen=True)
class RoundJob:
    """One round's instructions from the server (the message's config record)."""

    cfg: Config
    stage: Stage
    local_steps: int
    seed: int
    val_cases: int
    eval_batches: int
    proximal_mu: float
    base_id: str

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RoundJob:
        stage = str(record.get("stage", ""))
        if stage not in STAGES:
            raise ConfigError(f"server sent an unknown stage '{stage}'")
        cfg = config_from_dict(json.loads(str(record["gem3d-config"])), "gem3d-config from the server")
        return cls(
            cfg=cfg,
            stage=stage,  # type: ignore[arg-type]
            local_steps=int(record.get("local-steps", cfg.federation.local_steps)),
            seed=int(record.get("seed", cfg.train.seed)),
            val_cases=int(record.get("val-cases", 0)),
            eval_batches=int(record.get("eval-batches", 2)),
            proximal_mu=float(record.get("proximal-mu", 0.0)),
            base_id=str(record.get("base-id", "")),
        )


# Loaded volumes per (data folder, data config): at most this many sites' data stay in memory.
_VOLUME_CACHE_SITES = 4
_volume_cache: OrderedDict[tuple[str, str], tuple[tuple[tuple[str, int, int], ...], list[Volume]]] = OrderedDict()


def folder_signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """``(relative path, size, mtime_ns)`` of every file under ``folder``, hidden folders left out.

    Hidden folders hold the site's own state (``.gem3d-site``: ledger, stage-2 base), which
    changes every round without changing the data.
    """
    entries = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(root) / name
            stat = path.stat()
            entries.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


def site_volumes(site: Site, cfg: Config) -> list[Volume]:
    """The site's volumes on the model grid, loaded once per process while its files stay the same.

    The cache key is the data folder and the data config; any added, removed or rewritten file
    (size or modification time) reloads it. The volumes are shared between rounds and only read.
    """
    if not site.data_dir.is_dir():
        raise DataError(f"{site.name}: data folder {site.data_dir} does not exist")
    key = (str(site.data_dir.resolve()), cfg.data.model_dump_json())
    signature = folder_signature(site.data_dir)
    cached = _volume_cache.get(key)
    if cached is not None and cached[0] == signature:
        _volume_cache.move_to_end(key)
        return cached[1]
    volumes = load_volumes(site.data_dir, cfg.data)
    _volume_cache[key] = (signature, volumes)
    _volume_cache.move_to_end(key)
    while len(_volume_cache) > _VOLUME_CACHE_SITES:
        _volume_cache.popitem(last=False)
    return volumes


def split_volumes(site: Site, job: RoundJob) -> tuple[list[Volume], list[Volume]]:
    """``(train, held_out)``: the last ``val-cases`` cases (by id) are held out for evaluation.

    A site with too few cases to hold any out evaluates on its training cases (``held-out`` 0).
    """
    volumes = site_volumes(site, job.cfg)
    keep = len(volumes) - job.val_cases
    if job.val_cases <= 0 or keep < 1:
        return volumes, []
    return volumes[:keep], volumes[keep:]


def base_path(site: Site, base_id: str) -> Path:
    """Where a site keeps a frozen base the server installed (``gem3d.runs.frozen_part``)."""
    return site.state_dir / f"base-{base_id}.safetensors"


def install_base(site: Site, base_id: str, weights: dict[str, torch.Tensor]) -> Path:
    """Store a stage's frozen base: the global slice weights a frozen stage 2 trains on top of, or a
    latent network's autoencoder (atomic; idempotent)."""
    if not base_id or any(not ch.isalnum() for ch in base_id):
        raise ConfigError(f"server sent an invalid base-id '{base_id}'")
    path = base_path(site, base_id)
    if not path.exists():
        save_checkpoint(path, weights, {"stage": "base", "base_id": base_id})
    return path


# Built networks per (stage, stage-2 base, config): one process's rounds reuse them (weights reloaded each time).
_MODEL_CACHE_SIZE = 2
_model_cache: OrderedDict[tuple[str, str, str], nn.Module] = OrderedDict()


def _network(site: Site, job: RoundJob) -> nn.Module:
    """The stage's network on the config's device, its frozen part (``frozen_part``) from the installed
    base: a frozen stage 2 inflated from the base's slice model, a latent network's codec loaded.

    Reused across rounds in one process: only the travelling weights change between rounds and
    ``site_model`` reloads all of them, while a stage-2 base is fixed by its id. With DP on, a
    fresh network every time, so that nothing Opacus leaves on a module can carry over.
    """
    cfg, stage = job.cfg, job.stage
    frozen = frozen_part(stage, cfg)
    path = base_path(site, job.base_id)
    if frozen is not None and not path.exists():
        raise CheckpointError(f"{site.name}: the {stage} stage's base {job.base_id} was never installed at {path}")
    key = (stage, job.base_id if frozen is not None else "", cfg.model_dump_json())
    cacheable = not cfg.privacy.enabled
    if cacheable and key in _model_cache:
        _model_cache.move_to_end(key)
        return _model_cache[key]
    if frozen == "slice":
        base, _ = load_checkpoint(path)
        model = build_model("slice", cfg)
        load_weights(model, base, f"{site.name}: stage-2 base {path}")
        assert isinstance(model, SliceDenoiser)
        model.inflate(cfg.train.seed)  # the slice-axis weights then come from the server
    else:
        model = build_model(stage, cfg)
    if frozen == "codec":
        base, _ = load_checkpoint(path)
        load_weights(model.codec, subset(base, "codec"), f"{site.name}: autoencoder base {path}")
    model = accelerate(model, cfg.accel, distributed.rank_device(torch.device(cfg.train.device)))
    if cacheable:
        _model_cache[key] = model
        while len(_model_cache) > _MODEL_CACHE_SIZE:
            _model_cache.popitem(last=False)
    return model


def clear_caches() -> None:
    """Forget every cached site dataset and network (the next round loads and builds afresh)."""
    _volume_cache.clear()
    _model_cache.clear()


def site_model(site: Site, job: RoundJob, arrays: dict[str, torch.Tensor]) -> nn.Module:
    """The stage's network with the server's global weights, frozen for the stage.

    A frozen stage 2 receives only the slice-axis weights; its base comes from the state folder.
    """
    model = _network(site, job)
    model.zero_grad(set_to_none=True)
    model.train()
    freeze_for_stage(model, job.stage, job.cfg.train.volume_train_all)
    expected = set(travelling_names(model))
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise CheckpointError(
            f"{site.name}: global weights do not fit the {job.stage} network (missing {missing[:3]}, extra {extra[:3]})"
        )
    model.load_state_dict(arrays, strict=False)
    return model


def _proximal_hooks(model: nn.Module, mu: float) -> list[torch.utils.hooks.RemovableHandle]:
    """FedProx without touching the training loop: add ``mu * (w - w_global)`` to each gradient.

    That is the gradient of the proximal term ``mu / 2 * ||w - w_global||^2`` (Li et al., 2020),
    added before clipping, as if the term were part of the loss.
    """
    handles = []
    for parameter in model.parameters():
        if parameter.requires_grad:
            anchor = parameter.detach().clone()
            handles.append(parameter.register_hook(functools.partial(_add_proximal, parameter, anchor, mu)))
    return handles


def _add_proximal(parameter: nn.Parameter, anchor: torch.Tensor, mu: float, grad: torch.Tensor) -> torch.Tensor:
    return grad + mu * (parameter.detach() - anchor)


def site_privacy(site: Site, job: RoundJob, num_cases: int) -> PrivacyConfig:
    """The privacy this site trains under: the server's request, checked against the site's own policy.

    The site's policy (``privacy.policy``) is read from its own state folder or node config,
    never from the message. A request weaker than the policy, or a DP request at a site with no
    policy, raises ``PolicyRefusedError``: the site replies with that one line and trains nothing.
    """
    from privacy.policy import enforce_policy

    return enforce_policy(
        site_policy(site),
        job.cfg.privacy,
        batch_size=job.cfg.train.batch_size,
        num_cases=num_cases,
        planned_steps=planned_steps(job),
        site=site.name,
    )


def site_policy(site: Site) -> PrivacyConfig | None:
    """The site's own privacy policy (node config ``privacy-policy``, else its state folder's), if any."""
    from privacy.policy import load_policy
    from privacy.site_state import SiteState

    node = {"privacy-policy": str(site.policy_file)} if site.policy_file is not None else {}
    return load_policy(SiteState(site.state_dir), node)


def planned_steps(job: RoundJob) -> int:
    """The steps a target ε is spread over: all of the stage's federated steps, not one round's."""
    return job.local_steps * max(int(getattr(job.cfg.federation, f"rounds_{job.stage}")), 1)


def train_fn_for(site: Site, job: RoundJob, privacy_cfg: PrivacyConfig) -> TrainFn:
    """``gem3d.training.train``, or DP-SGD bound to this site's persistent privacy ledger."""
    if not privacy_cfg.enabled:
        return train
    if job.proximal_mu > 0:
        raise ConfigError("FedProx is not combined with DP-SGD here: use fedavg, fedadam, fedmedian or krum")
    # privacy/ (Opacus) is imported only when DP is on, so non-DP sites do not pay for it.
    from privacy.dp_sgd import train_private
    from privacy.site_state import SiteState

    # several processes: rank 0 alone spends from the ledger (privacy.dp_sgd.train_private)
    ledger = None
    if distributed.world().leader:
        ledger = SiteState(site.state_dir).ledger(privacy_cfg, terms=site_policy(site))
    return functools.partial(train_private, privacy_cfg=privacy_cfg, ledger=ledger, planned_steps=planned_steps(job))


def train_round(
    site: Site, job: RoundJob, arrays: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Run this round's local steps on the global weights (on ``site.processes`` local processes).

    Returns:
        ``(trainable weights, metrics)``; metrics hold ``num-examples`` (training cases), ``loss``,
        ``steps``, ``epsilon``/``delta`` when DP is on, and where the site's time went:
        ``setup-seconds`` (data, network, optimizer), ``train-seconds`` (the local steps alone),
        ``pack-seconds`` (copying out the weights that travel).
    """
    if site.processes > 1:
        # A SuperNode starts one ClientApp process per message: it starts the site's GPUs' processes
        # for the round, as torchrun would, and replies with rank 0's weights (every rank's are equal).
        return distributed.run_local(site.processes, _train_round, site, job, arrays)
    return _train_round(site, job, arrays)


def _train_round(
    site: Site, job: RoundJob, arrays: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    started = time.perf_counter()

    def setup() -> tuple[list[Volume], PrivacyConfig, nn.Module, TrainFn]:
        volumes, _ = split_volumes(site, job)
        privacy_cfg = site_privacy(site, job, len(volumes))  # refused before anything is built or trained
        if not privacy_cfg.enabled:
            distributed.check_batch(job.cfg.train.batch_size)
        return volumes, privacy_cfg, site_model(site, job, arrays), train_fn_for(site, job, privacy_cfg)

    # under several processes: a refusal on any one ends them all, before the first collective step
    volumes, privacy_cfg, model, train_fn = distributed.agreed(setup)
    state = new_state(model, job.cfg.train, seed=job.seed + _SITE_SEED_STRIDE * site.index)
    hooks = _proximal_hooks(model, job.proximal_mu) if job.proximal_mu > 0 else []
    source = WindowSource(volumes, job.cfg.data.window, job.cfg.train.informed_from)
    process = noise_process(job.cfg.diffusion)
    trained = time.perf_counter()
    try:
        metrics = train_fn(state, process, source, job.stage, job.local_steps, job.cfg.train, None)
    finally:
        for hook in hooks:
            hook.remove()
    packed = time.perf_counter()
    trained_state = state.model.state_dict()
    # A copy: the network is reused by the process's next round, these weights are the reply.
    weights = {name: trained_state[name].detach().cpu().clone() for name in travelling_names(state.model)}
    reply = {
        "num-examples": float(len(volumes)),
        "loss": float(metrics["loss"]),
        "steps": float(metrics["steps"]),
        "site-index": float(site.index),  # the server names the site's nested MLflow run by it
        "setup-seconds": trained - started,
        "train-seconds": packed - trained,
        "pack-seconds": time.perf_counter() - packed,
        "dp": 0.0,
    }
    if privacy_cfg.enabled:
        reply = dp_reply(reply, metrics)
    return weights, reply


# What a DP site may send besides the noised weights: figures that do not depend on its patients.
_DP_PUBLIC_KEYS = ("steps", "site-index", "pack-seconds")


def dp_reply(reply: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
    """The reply of a DP-SGD site: only what the accounted mechanism covers or what is public.

    Left out: the training loss (computed on patients, outside the mechanism), the exact number
    of cases (``num-examples`` is 1: the server weights DP sites uniformly) and the setup and
    training times (they grow with the Poisson batch sizes and the number of cases). Sent: the
    steps (fixed by the server), the site's cumulative ε and δ from its ledger, and
    ``telemetry-withheld`` so the server's logs say that the figures were withheld, not lost. ε
    depends on the sample rate, batch / cases; so, as in Opacus's accounting, the site's number
    of patients is treated as public.
    """
    kept = {key: reply[key] for key in _DP_PUBLIC_KEYS}
    return {
        **kept,
        "num-examples": 1.0,
        "dp": 1.0,
        "epsilon": float(metrics["epsilon"]),
        "delta": float(metrics["delta"]),
        "telemetry-withheld": 1.0,
    }


def evaluate_round(site: Site, job: RoundJob, arrays: dict[str, torch.Tensor]) -> dict[str, float]:
    """Validation loss of the global weights on this site's held-out cases (and the seconds it took)."""
    started = time.perf_counter()
    train_volumes, held_out = split_volumes(site, job)
    if site_privacy(site, job, len(train_volumes)).enabled:
        # A held-out loss is a figure computed on patients outside the DP mechanism: withheld.
        return {"num-examples": 1.0, "dp": 1.0, "telemetry-withheld": 1.0}
    volumes = held_out or train_volumes
    model = site_model(site, job, arrays)
    loss = held_out_loss(model, job.stage, volumes, job.cfg, job.eval_batches, job.cfg.train.seed + _EVAL_SEED_OFFSET)
    return {
        "num-examples": float(len(volumes)),
        "eval-loss": loss,
        "held-out": float(bool(held_out)),
        "eval-seconds": time.perf_counter() - started,
    }


# What a site's audit verdict may say (``server/audit.py``): counts and its reference's kind and size.
_VERDICT_KEYS = ("passed", "synthetic", "copies", "slice_copies", "reference", "reference_cases")


def audit_round(site: Site, record: dict[str, Any], candidates: list[torch.Tensor]) -> dict[str, Any]:
    """Audit a release's candidates against all of this site's patients; return only the verdict.

    Args:
        record: the audit query's config (``server.audit.audit_record``).
        candidates: ``[D, H, W]`` float32 synthetic volumes in [-1, 1].
    Returns:
        ``{"site": "site_<index>", "passed": bool, copy counts, reference kind and size}``; no
        distance, threshold or case id. A site with too few patients to certify fails, and its
        log (not the reply) says how many it would need.
    """
    from privacy.audit import AuditReferenceError, memorization_audit, settings_from_json

    cfg = config_from_dict(json.loads(str(record["gem3d-config"])), "gem3d-config from the server")
    settings = settings_from_json(str(record["audit-settings"]))
    patients = site_volumes(site, cfg)
    synthetic = [
        Volume(f"candidate_{i}", image.numpy().astype(np.float32), np.zeros(tuple(image.shape), dtype=np.uint8))
        for i, image in enumerate(candidates)
    ]
    name = f"site_{site.index}"
    try:
        result = memorization_audit(synthetic, patients, None, settings)
    except AuditReferenceError as error:
        logger.error("%s: cannot certify the release candidates: %s", site.name, error)
        return {"site": name, "passed": False, "reason": "too few patients at this site to certify (see its log)"}
    verdict = result.verdict()
    logger.info("%s: audit of %d release candidates: %s", site.name, len(candidates), verdict)
    return {"site": name, **{key: verdict[key] for key in _VERDICT_KEYS if key in verdict}}
