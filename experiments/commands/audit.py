"""Memorization audit of a synthetic cohort against the training set (issue 6).

For every synthetic volume: its nearest-neighbour distance to the training set in image space
and in a feature space (an untrained, seeded random 3D conv net), compared with the holdout's
distances to the training set. A synthetic volume closer to a training volume than
``--margin`` x the ``--quantile`` quantile of the holdout-to-train distances is flagged as a
copy. With ``--checkpoint`` a loss-based membership-inference test (AUC) is run on the model.

Writes ``--out`` (JSON) and a PNG histogram next to it. Exit code 0 when no copy is found,
3 when copies are found (the report is still written), 2 on bad input. The run is logged to MLflow
(``--track``; default: ``mlflow/`` beside REPORT.json): the copies found, the nearest-neighbour
figures and the membership-inference AUC as metrics, the report and histogram as artifacts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from experiments.commands.common import add_config_argument, add_track_option, load_cli_config, tracked
from gem3d.checkpoint import file_sha256
from gem3d.data.dataset import load_volumes
from gem3d.errors import CheckpointError
from gem3d.runs import load_model, stage_path
from gem3d.training import STAGES
from privacy.audit import AuditSettings, membership_inference, memorization_audit, write_report

NAME = "audit"
HELP = "memorization audit: flag synthetic volumes that copy training volumes; membership-inference AUC"
EXIT_COPIES = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--synthetic", required=True, type=Path, help="synthetic cohort (nnU-Net raw layout)")
    parser.add_argument("--train", required=True, type=Path, help="the model's training set (nnU-Net raw layout)")
    parser.add_argument("--holdout", required=True, type=Path, help="real cases the model never saw (same layout)")
    parser.add_argument("--out", required=True, type=Path, help="REPORT.json (a REPORT.png histogram goes next to it)")
    parser.add_argument(
        "--checkpoint", type=Path, help="run folder or stage checkpoint: its data config is used, and the MIA runs"
    )
    parser.add_argument(
        "--mia-stage", choices=STAGES, default="volume", help="which stage of a run folder the MIA attacks"
    )
    parser.add_argument("--mia-draws", type=int, default=8, help="seeded noisings per case for the MIA loss")
    parser.add_argument("--quantile", type=float, default=0.05, help="low quantile of holdout NN distances")
    parser.add_argument("--margin", type=float, default=0.5, help="threshold = margin x that quantile")
    parser.add_argument("--grid", type=int, default=32, help="volumes are compared on a GRID^3 grid")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random feature network and MIA noise")
    add_track_option(parser)


def audit_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's figures as MLflow metrics: copies, thresholds, NN-distance summaries, MIA.

    Keys: ``copies``, ``copy_fraction``, ``threshold.<space>``, ``nn_synthetic.<space>.<stat>``,
    ``nn_reference.<space>.<stat>`` (stat: min, the quantile, median, max) and ``mia.<figure>``.
    """
    metrics: dict[str, float] = {"copies": report["copies"], "copy_fraction": report["copy_fraction"]}
    metrics.update({f"volumes.{k}": v for k, v in report["counts"].items()})
    metrics.update({f"threshold.{space}": v for space, v in report["thresholds"].items()})
    for which in ("synthetic", "reference"):
        for space, summary in report[f"{which}_nn"].items():
            metrics.update({f"nn_{which}.{space}.{stat}": v for stat, v in summary.items()})
    mia = report["membership_inference"] or {}
    metrics.update({f"mia.{k}": v for k, v in mia.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    return metrics


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    model = None
    checkpoints = {}
    if args.checkpoint is not None:
        path = stage_path(args.checkpoint, args.mia_stage)
        if not path.exists():
            raise CheckpointError(f"{path}: no {args.mia_stage}-stage checkpoint for the membership-inference test")
        model, cfg, _ = load_model(path, "ema")
        checkpoints[args.mia_stage] = file_sha256(path)
    else:
        cfg = load_cli_config(args)
    settings = AuditSettings(grid=(args.grid,) * 3, quantile=args.quantile, margin=args.margin, feature_seed=args.seed)
    synthetic = load_volumes(args.synthetic, cfg.data)
    train = load_volumes(args.train, cfg.data)
    holdout = load_volumes(args.holdout, cfg.data)
    with tracked(args, NAME, cfg, started, checkpoints) as run_log:
        result = memorization_audit(synthetic, train, holdout, settings)
        if model is not None:
            mia = membership_inference(model, args.mia_stage, cfg, train, holdout, args.mia_draws, args.seed)
            result = dataclasses.replace(result, mia=mia)
        report, png = write_report(result, args.out)
        figures = audit_metrics(result.report())
        run_log.finish(None, figures, [(report, None), (png, None)], {"audit.passed": result.passed})
    mia_text = f", membership-inference AUC {result.mia['auc']:.3f}" if result.mia else ""
    if result.copies:
        print(
            f"gem3d audit: {len(result.copies)} of {len(synthetic)} synthetic volumes copy training volumes "
            f"({', '.join(result.copies[:5])}{' ...' if len(result.copies) > 5 else ''}); report: {report}",
            file=sys.stderr,
        )
        return EXIT_COPIES
    print(f"audit passed: no copies among {len(synthetic)} synthetic volumes{mia_text}; report: {report}, {png}")
    return 0
