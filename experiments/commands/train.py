"""Train one GEM-3D stage into a run folder.

Stages share the run folder: ``--stage volume`` starts from the slice stage's checkpoint found
in ``--out``. ``--init`` starts any stage from another run's weights instead (fine-tuning a model
pre-trained elsewhere, e.g. on public data), with a fresh optimizer. The folder is then a valid
``--checkpoint`` for every later command.
"""

from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path

from tqdm import tqdm

from experiments.commands.common import add_config_argument, add_track_argument, load_cli_config, open_tracker
from gem3d.data.dataset import load_volumes
from gem3d.runs import STAGE_FILES, train_stage
from gem3d.training import STAGES, train
from privacy.dp_sgd import train_private
from privacy.ledger import PrivacyLedger

NAME = "train"
HELP = "train the slice, volume or informed-slice stage"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--data", required=True, type=Path, help="dataset folder (nnU-Net v2 raw layout or prepared)")
    parser.add_argument("--stage", required=True, choices=STAGES, help="slice (stage 1), volume (stage 2), informed")
    parser.add_argument("--out", required=True, type=Path, help="run folder shared by the stages")
    parser.add_argument("--steps", type=int, help="total steps for this stage (default: train.steps_<stage>)")
    parser.add_argument("--resume", action="store_true", help="continue this stage's checkpoint up to --steps")
    parser.add_argument(
        "--init",
        type=Path,
        help="start from these weights (a run folder or checkpoint file, e.g. a model pre-trained on public "
        "data): the same stage, or for --stage volume a slice checkpoint (default: --out's slice stage)",
    )
    parser.add_argument("--device", help="override train.device (cpu, cuda, cuda:1)")
    parser.add_argument("--seed", type=int, help="override train.seed")
    add_track_argument(parser, "OUT/mlflow")


def run(args: argparse.Namespace) -> int:
    extra = {}
    if args.device:
        extra["train.device"] = args.device
    if args.seed is not None:
        extra["train.seed"] = args.seed
    cfg = load_cli_config(args, extra)
    volumes = load_volumes(args.data, cfg.data)
    total = args.steps if args.steps is not None else getattr(cfg.train, f"steps_{args.stage}")
    bars: list[tqdm] = []
    tracker = open_tracker(args, args.out / "mlflow", "train", f"{args.out.name}-{args.stage}", cfg)

    def on_step(metrics: dict[str, float]) -> None:
        if not bars:  # opened on the first step, so input errors print without a bar
            start = int(metrics["step"]) - 1
            bars.append(tqdm(total=total, initial=start, desc=args.stage, unit="step", dynamic_ncols=True))
        if math.isnan(metrics["loss"]):  # a DP step whose Poisson sample drew no volume: nothing to show
            bars[0].set_postfix(loss="(empty sample)")
        else:
            bars[0].set_postfix(loss=f"{metrics['loss']:.4f}")
        bars[0].update(1)
        if tracker is not None and not math.isnan(metrics["loss"]):
            tracker.log_metrics({"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}, step=int(metrics["step"]))

    train_fn = train
    if cfg.privacy.enabled:  # DP-SGD; the site's ledger lives in the run folder, shared by its stages
        ledger = PrivacyLedger.open(args.out / "privacy_ledger.json", cfg.privacy)
        train_fn = functools.partial(train_private, privacy_cfg=cfg.privacy, ledger=ledger, planned_steps=total)
    try:
        metrics = train_stage(
            cfg, volumes, args.stage, args.out, args.steps, args.resume, args.init, on_step, train_fn=train_fn
        )
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    finally:
        for bar in bars:
            bar.close()
    if tracker is not None:
        if cfg.privacy.enabled:
            tracker.log_metrics({"epsilon": ledger.epsilon})
        tracker.log_artifact(args.out / "config.json")
        tracker.end()
    print(
        f"{args.stage}: step {int(metrics['step'])}, mean loss {metrics.get('loss', float('nan')):.4f} "
        f"-> {args.out / STAGE_FILES[args.stage]}"
    )
    if cfg.privacy.enabled:
        print(f"privacy: site total ε = {ledger.epsilon:.3f} at δ = {ledger.delta:g} ({ledger.accountant_name})")
    return 0
