"""Memorization audit of a synthetic cohort against the training set (issues 6 and 12).

A synthetic volume is a copy when it is closer to a training volume than ``--margin`` x the
``--quantile`` quantile of the holdout-to-train distances, whole volumes compared after
smoothing, histogram standardisation and centring under every flip and small shifts (so flipped,
shifted, re-contrasted and noisy copies count), or when any of its slices is that close to a
training slice (``privacy.audit``). The quantile needs ``--min-reference`` holdout cases (default
``ceil(1 / quantile)``); fewer are refused. With ``--checkpoint`` a membership-inference attack
on the model (denoising error at fixed timesteps) reports its AUC with a bootstrap 95% interval
and its TPR at 1% FPR.

Writes ``--out`` (JSON) and a PNG histogram next to it. Exit code 0 when no copy is found,
3 when copies are found (the report is still written), 2 on bad input. The run is logged to MLflow
(``--track``; default: ``mlflow/`` beside REPORT.json): the copies found, the nearest-neighbour
figures and the membership-inference figures as metrics, the report and histogram as artifacts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.commands.common import (
    PROVENANCE_BYTES,
    CommandOptions,
    ConfigOptions,
    TrackedOptions,
    add_config_argument,
    add_track_option,
    check_new_outputs,
    fraction,
    grid_size,
    load_cli_config,
    png_bytes,
    positive_float,
    positive_int,
    seed_int,
    tracked,
)
from gem3d.checkpoint import file_sha256
from gem3d.data.dataset import RawVolumes, load_volumes
from gem3d.data.prepare import MANIFEST
from gem3d.data.volume import Volume
from gem3d.errors import CheckpointError, DataError
from gem3d.runs import load_model, stage_path
from gem3d.training import DENOISING_STAGES, Stage
from privacy.audit import (
    AuditResult,
    AuditSettings,
    check_holdout_disjoint,
    check_reference,
    membership_inference,
    memorization_audit,
    write_report,
)

NAME = "audit"
HELP = "memorization audit: flag synthetic volumes (or slices) that copy training data; membership inference"
EXIT_COPIES = 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class CopyRuleOptions(CommandOptions):
    """The copy rule (``add_copy_rule_arguments``), as ``AuditSettings`` takes it (``copy_rule_settings``)."""

    quantile: float = 0.05
    margin: float = 0.5
    min_reference: int | None = None
    grid: int = 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuditOptions(ConfigOptions, CopyRuleOptions, TrackedOptions):
    """``gem3d audit``'s options (``add_arguments``); ``out`` is REPORT.json."""

    synthetic: Path
    train: Path
    holdout: Path
    checkpoint: Path | None = None
    mia_stage: Stage = "volume"
    mia_draws: int = 8
    seed: int = 0


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
        "--mia-stage",
        choices=DENOISING_STAGES,
        default=AuditOptions.mia_stage,
        help="which stage of a run folder the MIA attacks",
    )
    parser.add_argument(
        "--mia-draws",
        type=positive_int,
        default=AuditOptions.mia_draws,
        help="seeded noisings per case and timestep for the MIA (>= 1)",
    )
    add_copy_rule_arguments(parser)
    parser.add_argument(
        "--seed",
        type=seed_int,
        default=AuditOptions.seed,
        help="seed of the feature network, MIA noise and bootstrap",
    )
    add_track_option(parser)


def add_copy_rule_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The copy rule's options (``--quantile``, ``--margin``, ``--min-reference``, ``--grid``): audit and release."""
    parser.add_argument(
        "--quantile",
        type=fraction,
        default=CopyRuleOptions.quantile,
        help=f"{prefix}low quantile of reference NN distances (0..1)",
    )
    parser.add_argument(
        "--margin",
        type=positive_float,
        default=CopyRuleOptions.margin,
        help=f"{prefix}copy threshold = margin x that quantile (> 0)",
    )
    parser.add_argument(
        "--min-reference",
        type=positive_int,
        help=f"{prefix}reference cases needed to certify (default: enough for the quantile, ceil(1 / quantile))",
    )
    parser.add_argument(
        "--grid",
        type=grid_size,
        default=CopyRuleOptions.grid,
        help=f"{prefix}volumes are compared on a GRID^3 grid (8..128)",
    )


def copy_rule_settings(rule: CopyRuleOptions, seed: int = 0) -> AuditSettings:
    """``AuditSettings`` from the options of ``add_copy_rule_arguments``."""
    return AuditSettings(
        grid=(rule.grid,) * 3,
        quantile=rule.quantile,
        margin=rule.margin,
        min_reference=rule.min_reference,
        feature_seed=seed,
    )


def audit_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's figures as MLflow metrics: copies, thresholds, NN-distance summaries (where it has them), MIA.

    Keys: ``copies``, ``volume_copies``, ``slice_copies``, ``copy_fraction``, ``volumes.<set>``,
    ``threshold.<space>``, ``nn_synthetic.<space>.<stat>``, ``nn_reference.<space>.<stat>`` (the
    stats the report holds: the quantile and median; min and max in an unpublished report) and
    ``mia.<figure>`` (its scalar figures).
    """
    metrics: dict[str, float] = {"copies": report["copies"], "copy_fraction": report["copy_fraction"]}
    for key in ("volume_copies", "slice_copies", "volumes_with_copied_slices"):
        if key in report:
            metrics[key] = report[key]
    metrics.update({f"volumes.{k}": v for k, v in report["counts"].items()})
    metrics.update({f"threshold.{space}": v for space, v in report.get("thresholds", {}).items()})
    for which in ("synthetic", "reference"):
        for space, summary in report.get(f"{which}_nn", {}).items():
            metrics.update({f"nn_{which}.{space}.{stat}": v for stat, v in (summary or {}).items()})
    mia = report["membership_inference"] or {}
    metrics.update({f"mia.{k}": v for k, v in mia.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    return metrics


def audit_bytes(tracked: bool) -> int:
    """About what the audit writes: the report JSON and its histogram PNG (``privacy.audit.write_report``),
    copied once more into the MLflow run when tracked."""
    return (PROVENANCE_BYTES + png_bytes(15, 3.6, 100)) * (2 if tracked else 1)


def run(args: argparse.Namespace) -> int:
    return EXIT_COPIES if run_audit(AuditOptions.from_args(args)).copies else 0


def run_audit(options: AuditOptions) -> AuditResult:
    """``gem3d audit``: the memorization audit (and the MIA with a checkpoint), its report written to ``options.out``.

    Returns the result; copies found are reported on stderr (the CLI then exits ``EXIT_COPIES``).
    """
    started = time.perf_counter()
    if options.out.suffix != ".json":
        raise DataError(f"--out {options.out}: the report must be a .json file")
    check_new_outputs([options.out, options.out.with_suffix(".png")], needed_bytes=audit_bytes(options.track != "off"))
    settings = copy_rule_settings(options, options.seed)
    model = None
    checkpoints: dict[str, str] = {}
    if options.checkpoint is not None:
        path = stage_path(options.checkpoint, options.mia_stage)
        if not path.exists():
            raise CheckpointError(f"{path}: no {options.mia_stage}-stage checkpoint for the membership-inference test")
        model, cfg, _ = load_model(path, "ema")
        checkpoints[options.mia_stage] = file_sha256(path)
    else:
        cfg = load_cli_config(options.config, options.set)
    # the audit never samples a mask on its own: the training field-of-view warning is not its concern
    holdout = load_volumes(options.holdout, cfg.data, warn_partial=False)
    check_reference(settings, len(holdout), "holdout")  # before the expensive part
    # the candidates are read by the audit a chunk at a time: from a raw folder case by case, or a
    # prepared cache memory-mapped (issue 16); the training and holdout sets are its reference
    synthetic: Sequence[Volume] = (
        load_volumes(options.synthetic, cfg.data, warn_partial=False)
        if (options.synthetic / MANIFEST).exists()
        else RawVolumes(options.synthetic, cfg.data)
    )
    train = load_volumes(options.train, cfg.data, warn_partial=False)
    check_holdout_disjoint(train, holdout, f"--holdout {options.holdout}")
    with tracked(options, NAME, cfg, started, checkpoints) as run_log:
        result = memorization_audit(synthetic, train, holdout, settings)
        if model is not None:
            mia = membership_inference(model, options.mia_stage, cfg, train, holdout, options.mia_draws, options.seed)
            result = dataclasses.replace(result, mia=mia)
        report, png = write_report(result, options.out)
        figures = audit_metrics(result.report())
        run_log.finish(None, figures, [(report, None), (png, None)], {"audit.passed": result.passed})
    mia = result.mia
    mia_text = (
        f", membership-inference AUC {mia['auc']:.3f} (95% CI {mia['auc_ci95'][0]:.2f}-{mia['auc_ci95'][1]:.2f})"
        if mia
        else ""
    )
    if result.copies:
        verdict = result.verdict()
        print(
            f"gem3d audit: {len(result.copies)} of {len(synthetic)} synthetic volumes copy training volumes "
            f"({', '.join(result.copies[:5])}{' ...' if len(result.copies) > 5 else ''}): "
            f"{verdict['volume_copies']} as whole volumes, {verdict['slice_copies']} copied slices; report: {report}",
            file=sys.stderr,
        )
        return result
    print(f"audit passed: no copies among {len(synthetic)} synthetic volumes{mia_text}; report: {report}, {png}")
    return result
