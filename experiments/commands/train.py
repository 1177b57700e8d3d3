"""Train one GEM-3D stage into a run folder.

Stages share the run folder: ``--stage volume`` starts from the slice stage's checkpoint found
in ``--out``. ``--init`` starts any stage from another run's weights instead (fine-tuning a model
pre-trained elsewhere, e.g. on public data), with a fresh optimizer. The folder is then a valid
``--checkpoint`` for every later command.

Several GPUs of one site train one stage together under torchrun, with the same options:
``torchrun --standalone --nproc-per-node N -m experiments.cli train ...`` (or ``torchrun --no-python
gem3d train ...``). ``train.batch_size`` is then the global batch, split over the processes; rank 0
alone writes (run folder, ledger, MLflow, progress) and a failure on any rank ends them all with
rank 0's one line (``gem3d.distributed``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from experiments.commands.common import (
    ConfigOptions,
    TrackedOptions,
    add_config_argument,
    add_track_argument,
    check_outside,
    check_writable,
    device_name,
    load_cli_config,
    open_tracker,
    positive_int,
    seed_int,
)
from experiments.progress import progress_bar
from gem3d import distributed
from gem3d.checkpoint import load_checkpoint, read_metadata
from gem3d.config import Config
from gem3d.data.dataset import load_volumes
from gem3d.data.volume import Volume
from gem3d.errors import CheckpointError, ConfigError, Gem3dError
from gem3d.files import writer_lock
from gem3d.runs import STAGE_FILES, checkpoint_bytes, codec_source, init_checkpoint, resolve_device, train_stage
from gem3d.training import STAGES, Stage, train
from privacy.dp_sgd import train_private
from privacy.ledger import PrivacyLedger
from privacy.model_privacy import site_entry, stage_record
from privacy.policy import enforce_policy, load_policy
from privacy.site_state import SiteState, default_state_dir

NAME = "train"
HELP = "train the autoencoder (latent models), slice, volume or informed-slice stage"


@dataclass(frozen=True, kw_only=True)
class TrainOptions(ConfigOptions, TrackedOptions):
    """``gem3d train``'s options (``add_arguments``); ``out`` is the run folder shared by the stages."""

    data: Path
    stage: Stage
    steps: int | None = None
    resume: bool = False
    init: Path | None = None
    site_state: Path | None = None
    public_data: bool = False
    device: str | None = None
    seed: int | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--data", required=True, type=Path, help="dataset folder (nnU-Net v2 raw layout or prepared)")
    parser.add_argument(
        "--stage",
        required=True,
        choices=STAGES,
        help="autoencoder (stage 0, latent models), slice (stage 1), volume (stage 2), informed",
    )
    parser.add_argument("--out", required=True, type=Path, help="run folder shared by the stages")
    parser.add_argument("--steps", type=positive_int, help="total steps for this stage (default: train.steps_<stage>)")
    parser.add_argument("--resume", action="store_true", help="continue this stage's checkpoint up to --steps")
    parser.add_argument(
        "--init",
        type=Path,
        help="start from these weights (a run folder or checkpoint file, e.g. a model pre-trained on public "
        "data): the same stage, or for --stage volume a slice checkpoint (default: --out's slice stage)",
    )
    parser.add_argument(
        "--site-state",
        type=Path,
        help="the site's private state folder: its key, privacy policy and privacy ledger, shared by every run "
        "over this data (default: DATA/.gem3d-site)",
    )
    parser.add_argument(
        "--public-data",
        action="store_true",
        help="declare --data public (e.g. for pre-training): recorded as such in the checkpoint; no site state",
    )
    parser.add_argument("--device", type=device_name, help="override train.device (cpu, cuda, cuda:1)")
    parser.add_argument("--seed", type=seed_int, help="override train.seed")
    add_track_argument(parser, "OUT/mlflow")


def run(args: argparse.Namespace) -> int:
    try:
        run_train(TrainOptions.from_args(args))
    except (Gem3dError, OSError):
        if distributed.launched().rank == 0:
            raise
        return 2  # under torchrun rank 0 prints the one line of every rank's failure (distributed.agreed)
    return 0


def run_train(options: TrainOptions) -> dict[str, float]:
    """``gem3d train``: one stage into the run folder ``options.out``; returns its metrics (``runs.train_stage``).

    Under torchrun each process joins the site's process group here and leaves it on return.
    """
    check_outside(options.out, "--out", {"--data": options.data})  # before the lock writes into --out
    with distributed.session() as current, contextlib.ExitStack() as held:
        fresh = not options.out.exists()
        # held from the first file written (the MLflow store) to the last; by rank 0 for every rank
        distributed.agreed(lambda: held.enter_context(writer_lock(options.out)) if current.leader else None)
        try:
            return _run(options, current)
        except BaseException:
            # a training that fails before its first checkpoint leaves no run folder behind (only
            # the lock's holder gets here: a refused second writer never touches the folder)
            if current.leader and fresh and not any(options.out.glob("*.safetensors")):
                shutil.rmtree(options.out, ignore_errors=True)
            raise


class _Prepared(NamedTuple):
    """What ``_prepare`` checked and loaded."""

    cfg: Config
    site: SiteState | None
    key: bytes | None
    volumes: list[Volume]
    total: int
    ledger: PrivacyLedger | None


def _prepare(args: TrainOptions, leader: bool) -> _Prepared:
    """Every input checked and the data loaded, before any step (on every rank; the ledger on rank 0 only)."""
    extra: dict[str, Any] = {}
    if args.device:
        extra["train.device"] = args.device
    if args.seed is not None:
        extra["train.seed"] = args.seed
    cfg = load_cli_config(args.config, args.set, extra, dataset=args.data)  # the dataset decides labels, modality
    if args.public_data and args.site_state is not None:
        raise ConfigError("--public-data and --site-state: public data has no site state; pass one of them")
    if not cfg.privacy.enabled:  # DP-SGD's batch is a Poisson sample, dealt out over the ranks as it falls
        distributed.check_batch(cfg.train.batch_size)
    site = None if args.public_data else SiteState(args.site_state or default_state_dir(args.data))
    policy = load_policy(site) if site is not None else None
    key = site.key() if site is not None else None
    if _needs_codec(args, cfg.model.latent):
        codec_source(cfg, args.out)  # a latent stage without its autoencoder is refused before any work
    # the disk first: a full one is found before the data is read or a step is taken
    check_writable(args.out, "--out", checkpoint_bytes(args.stage, cfg))
    _check_start(args, cfg)
    volumes = load_volumes(args.data, cfg.data)
    total = args.steps if args.steps is not None else getattr(cfg.train, f"steps_{args.stage}")
    ledger = None
    if site is not None and policy is not None:  # the site's own policy binds its own commands too
        enforce_policy(
            policy,
            cfg.privacy,
            batch_size=cfg.train.batch_size,
            num_cases=len(volumes),
            planned_steps=total,
            site=str(site.folder),
        )
    if cfg.privacy.enabled:
        if site is None:
            raise ConfigError("privacy.enabled=true with --public-data: DP-SGD needs the site's ledger; drop one")
        # The ledger is the site's, not the run's: every run over this data spends from it (rank 0 alone).
        ledger = site.ledger(cfg.privacy, terms=policy) if leader else None
    return _Prepared(cfg=cfg, site=site, key=key, volumes=volumes, total=total, ledger=ledger)


def _run(args: TrainOptions, current: distributed.World) -> dict[str, float]:
    cfg, site, key, volumes, total, ledger = distributed.agreed(lambda: _prepare(args, current.leader))
    privacy_metadata = _privacy_metadata(args, cfg, site, ledger)
    bars: list[tqdm] = []
    tracker = None
    if current.leader:
        tracker = open_tracker(args.track, args.out / "mlflow", "train", f"{args.out.name}-{args.stage}", cfg)

    def on_step(metrics: dict[str, float]) -> None:
        if not bars:  # opened on the first step, so input errors print without a bar
            start = int(metrics["step"]) - 1
            bars.append(progress_bar(total, args.stage, "step", initial=start))
        if math.isnan(metrics["loss"]):  # a DP step whose Poisson sample drew no volume: nothing to show
            bars[0].set_postfix(loss="(empty sample)")
        else:
            bars[0].set_postfix(loss=f"{metrics['loss']:.4f}")
        bars[0].update(1)
        if tracker is not None and not math.isnan(metrics["loss"]):
            tracker.log_metrics({"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}, step=int(metrics["step"]))

    train_fn = train
    if cfg.privacy.enabled:  # the ledger is rank 0's; the other ranks pass None (train_private)
        train_fn = functools.partial(train_private, privacy_cfg=cfg.privacy, ledger=ledger, planned_steps=total)
    try:
        metrics = train_stage(
            cfg,
            volumes,
            args.stage,
            args.out,
            args.steps,
            args.resume,
            args.init,
            on_step if current.leader else None,
            train_fn=train_fn,
            fingerprint_key=key,
            extra_metadata=privacy_metadata,
        )
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    finally:
        for bar in bars:
            bar.close()
    if not current.leader:
        return metrics
    if tracker is not None:
        if ledger is not None:
            tracker.log_metrics({"epsilon": ledger.epsilon})
        tracker.log_artifact(args.out / "config.json")
        tracker.end()
    print(
        f"{args.stage}: step {int(metrics['step'])}, mean loss {metrics.get('loss', float('nan')):.4f} "
        f"-> {args.out / STAGE_FILES[args.stage]}"
    )
    if ledger is not None:
        print(
            f"privacy: site total ε = {ledger.epsilon:.3f} at δ = {ledger.delta:g} ({ledger.accountant_name}), "
            f"ledger {ledger.path}"
        )
    return metrics


def _check_start(args: TrainOptions, cfg: Config) -> None:
    """Before the data is read: the device exists, and what the stage starts from (``--resume``,
    ``--init``, the run's slice stage) is there and verified (``runs.train_stage`` would find the
    same, but only after loading every case)."""
    resolve_device(cfg.train.device)
    path = args.out / STAGE_FILES[args.stage]
    if path.exists() and not args.resume:
        raise CheckpointError(f"{path}: already exists; pass --resume to continue it, or choose another --out")
    if args.resume:
        if not path.exists():
            raise CheckpointError(f"--resume: {path}: nothing to resume (train this stage without --resume first)")
        load_checkpoint(path)  # checksums verified
        return
    if args.init is not None:
        source = init_checkpoint(args.init, args.stage)
        _, metadata = load_checkpoint(source)  # schema and checksums verified
        allowed = ("slice", "volume") if args.stage == "volume" else (args.stage,)
        if metadata.get("stage") not in allowed:
            raise CheckpointError(
                f"--init {args.init}: {source} holds a '{metadata.get('stage')}'-stage checkpoint; "
                f"the {args.stage} stage starts from {' or '.join(allowed)}"
            )
    elif args.stage == "volume":
        slice_path = args.out / STAGE_FILES["slice"]
        if not slice_path.exists():
            raise CheckpointError(
                f"{slice_path}: no slice-stage checkpoint to start the volume stage from; "
                "run --stage slice with this --out first, or pass --init"
            )
        load_checkpoint(slice_path)


def _needs_codec(args: TrainOptions, latent: bool) -> bool:
    """A latent slice or informed stage started afresh takes its frozen autoencoder from ``codec_source``."""
    return latent and args.stage in ("slice", "informed") and args.init is None and not args.resume


def _privacy_metadata(
    args: TrainOptions, cfg: Config, site: SiteState | None, ledger: PrivacyLedger | None
) -> Callable[[], dict[str, Any]]:
    """The checkpoint's ``privacy`` record, computed at each checkpoint (the ledger's ε grows)."""
    path = args.out / STAGE_FILES[args.stage]
    # a resumed checkpoint from before privacy records merges as {}: of unknown origin
    previous = read_metadata(path).get("privacy", {}) if args.resume and path.exists() else None
    start = None
    if not args.resume:
        if args.init is not None:
            start = init_checkpoint(args.init, args.stage)
        elif args.stage == "volume":  # stage 2 carries the stage-1 weights it is inflated from
            start = args.out / STAGE_FILES["slice"]
        elif _needs_codec(args, cfg.model.latent):  # a latent stage carries its autoencoder's record
            start = codec_source(cfg, args.out)

    def record() -> dict[str, Any]:
        sites = {} if site is None else {site.site_id: site_entry(ledger)}
        init = start if start is not None and start.exists() else None
        return {"privacy": stage_record(public=site is None, sites=sites, init=init, previous=previous)}

    return record
