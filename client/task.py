"""What one hospital does in a round: load its data, train the current stage locally, evaluate.

Plain functions over gem3d; ``client/app.py`` only unpacks Flower messages and calls them.

Everything a site needs to know about the run arrives in the message's ``config`` record from
the server (the gem3d config as JSON, the stage, local steps, the round seed); where its data
lives comes from the node config (``data-dir``, deployment) or from its partition of a data
root (simulation). A site's own state (its privacy ledger, the frozen stage-2 base) lives in
its state folder: node config ``state-dir``, else the ``state-root`` the server names in
simulation, else ``<data-dir>/.gem3d-site``.

Local training state (AdamW moments, EMA, generator) is recreated every round from the global
weights and a seed derived from the round and the site: rounds are then reproducible and a
restarted site needs nothing but its ledger. The cost is that AdamW restarts its moment
estimates each round, as in plain FedAvg with a stateless client.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gem3d.checkpoint import load_checkpoint, save_checkpoint
from gem3d.config import Config, config_from_dict
from gem3d.data.dataset import load_volumes
from gem3d.data.volume import Volume
from gem3d.data.windows import WindowSource
from gem3d.diffusion import train_scheduler
from gem3d.errors import CheckpointError, ConfigError, DataError
from gem3d.networks import SliceDenoiser
from gem3d.runs import build_model
from gem3d.training import STAGES, Stage, TrainFn, freeze_for_stage, new_state, train
from gem3d.training import validation_loss as fixed_draw_loss

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
    """

    name: str
    data_dir: Path
    state_dir: Path
    index: int


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
    return Site(name=name, data_dir=data_dir, state_dir=state_dir, index=index)


@dataclass(frozen=True)
class Job:
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
    def from_record(cls, record: dict[str, Any]) -> Job:
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


def split_volumes(site: Site, job: Job) -> tuple[list[Volume], list[Volume]]:
    """``(train, held_out)``: the last ``val-cases`` cases (by id) are held out for evaluation.

    A site with too few cases to hold any out evaluates on its training cases (``held-out`` 0).
    """
    if not site.data_dir.is_dir():
        raise DataError(f"{site.name}: data folder {site.data_dir} does not exist")
    volumes = load_volumes(site.data_dir, job.cfg.data)
    keep = len(volumes) - job.val_cases
    if job.val_cases <= 0 or keep < 1:
        return volumes, []
    return volumes[:keep], volumes[keep:]


def base_path(site: Site, base_id: str) -> Path:
    """Where a site keeps the frozen stage-2 base (the global slice model) the server installed."""
    return site.state_dir / f"base-{base_id}.safetensors"


def install_base(site: Site, base_id: str, weights: dict[str, torch.Tensor]) -> Path:
    """Store the global slice weights a frozen stage 2 trains on top of (atomic; idempotent)."""
    if not base_id or any(not ch.isalnum() for ch in base_id):
        raise ConfigError(f"server sent an invalid base-id '{base_id}'")
    path = base_path(site, base_id)
    if not path.exists():
        save_checkpoint(path, weights, {"stage": "slice", "base_id": base_id})
    return path


def travelling_names(model: nn.Module) -> list[str]:
    """Names of the tensors that cross the network: the trainable parameters, in state-dict order."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return [name for name in model.state_dict() if name in trainable]


def site_model(site: Site, job: Job, arrays: dict[str, torch.Tensor]) -> nn.Module:
    """The stage's network with the server's global weights, frozen for the stage.

    A frozen stage 2 receives only the slice-axis weights; its base comes from the state folder.
    """
    cfg, stage = job.cfg, job.stage
    partial_volume = stage == "volume" and not cfg.train.volume_train_all
    if partial_volume:
        path = base_path(site, job.base_id)
        if not path.exists():
            raise CheckpointError(f"{site.name}: stage-2 base {job.base_id} was never installed at {path}")
        base, _ = load_checkpoint(path)
        model = build_model("slice", cfg)
        model.load_state_dict(base)
        assert isinstance(model, SliceDenoiser)
        model.inflate()
    else:
        model = build_model(stage, cfg)
    freeze_for_stage(model, stage, cfg.train.volume_train_all)
    expected = set(travelling_names(model))
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise CheckpointError(
            f"{site.name}: global weights do not fit the {stage} network (missing {missing[:3]}, extra {extra[:3]})"
        )
    model.load_state_dict(arrays, strict=False)
    return model.to(torch.device(cfg.train.device))


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


def train_fn_for(site: Site, job: Job) -> TrainFn:
    """``gem3d.training.train``, or DP-SGD bound to this site's persistent privacy ledger."""
    if not job.cfg.privacy.enabled:
        return train
    if job.proximal_mu > 0:
        raise ConfigError("FedProx is not combined with DP-SGD here: use fedavg, fedadam, fedmedian or krum")
    # privacy/ (Opacus) is imported only when DP is on, so non-DP sites do not pay for it.
    from privacy.dp_sgd import train_private
    from privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger.open(site.state_dir / "privacy_ledger.json", job.cfg.privacy)
    # A target epsilon is spread over all of the stage's federated steps, not one round's.
    planned = job.local_steps * max(int(getattr(job.cfg.federation, f"rounds_{job.stage}")), 1)
    return functools.partial(train_private, privacy_cfg=job.cfg.privacy, ledger=ledger, planned_steps=planned)


def train_round(
    site: Site, job: Job, arrays: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Run this round's local steps on the global weights.

    Returns:
        ``(trainable weights, metrics)``; metrics hold ``num-examples`` (training cases), ``loss``,
        ``steps``, and ``epsilon``/``delta`` when DP is on.
    """
    volumes, _ = split_volumes(site, job)
    model = site_model(site, job, arrays)
    state = new_state(model, job.cfg.train, seed=job.seed + _SITE_SEED_STRIDE * site.index)
    hooks = _proximal_hooks(model, job.proximal_mu) if job.proximal_mu > 0 else []
    source = WindowSource(volumes, job.cfg.data.window, job.cfg.train.informed_from)
    train_fn = train_fn_for(site, job)
    try:
        metrics = train_fn(
            state, train_scheduler(job.cfg.diffusion), source, job.stage, job.local_steps, job.cfg.train, None
        )
    finally:
        for hook in hooks:
            hook.remove()
    weights = {name: state.model.state_dict()[name].detach().cpu() for name in travelling_names(state.model)}
    reply = {
        "num-examples": float(len(volumes)),
        "loss": float(metrics["loss"]),
        "steps": float(metrics["steps"]),
        "site-index": float(site.index),  # the server names the site's nested MLflow run by it
    }
    for key in ("epsilon", "delta"):
        if key in metrics:
            reply[key] = float(metrics[key])
    return weights, reply


def validation_loss(
    model: nn.Module, stage: Stage, volumes: list[Volume], cfg: Config, batches: int, seed: int
) -> float:
    """Mean denoising loss of ``model`` on fixed draws from ``volumes`` (same seed, same draws)."""
    source = WindowSource(volumes, cfg.data.window, cfg.train.informed_from)
    return fixed_draw_loss(model, train_scheduler(cfg.diffusion), source, stage, cfg.train, batches, seed)


def evaluate_round(site: Site, job: Job, arrays: dict[str, torch.Tensor]) -> dict[str, float]:
    """Validation loss of the global weights on this site's held-out cases."""
    train_volumes, held_out = split_volumes(site, job)
    volumes = held_out or train_volumes
    model = site_model(site, job, arrays)
    loss = validation_loss(model, job.stage, volumes, job.cfg, job.eval_batches, job.cfg.train.seed + _EVAL_SEED_OFFSET)
    return {"num-examples": float(len(volumes)), "eval-loss": loss, "held-out": float(bool(held_out))}
