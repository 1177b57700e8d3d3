"""Dataset-level de-enhancement: regenerate every case from its own mask with one reference slice.

Harmonises appearance across sites. Prints and saves per-case and per-site intensity statistics
before and after, and by how much the spread across sites shrank. The run is logged to MLflow
(``--track``; default: ``mlflow/`` beside OUT, never inside the dataset) with the spreads as metrics.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.commands.common import add_track_option, check_new_outputs, check_outside, dataset_bytes, tracked
from experiments.commands.sampling import (
    CohortOptions,
    ProgressBars,
    add_sampling_arguments,
    add_worker_arguments,
    cohort_synthesiser,
)
from experiments.previews import case_preview
from gem3d.deenhance import deenhance
from gem3d.errors import DataError
from gem3d.informed import parse_source

NAME = "deenhance"
HELP = "regenerate a dataset from its masks with one reference informed slice"


@dataclass(frozen=True, kw_only=True)
class DeenhanceOptions(CohortOptions):
    """``gem3d deenhance``'s options (``add_arguments``)."""

    data: Path
    reference: str
    """``IMAGE.nii.gz[@Z]``: the reference informed slice."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser)
    add_worker_arguments(parser)
    parser.add_argument("--data", required=True, type=Path, help="dataset folder, or a folder of site datasets")
    parser.add_argument("--reference", required=True, help="IMAGE.nii.gz[@Z]: the reference informed slice")
    parser.add_argument("--out", required=True, type=Path, help="output dataset folder (must not exist)")
    add_track_option(parser)


def spread_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's spread of site means before/after (mean and per label) and its reduction."""
    metrics = {"spread_reduction": report["spread_reduction"]}
    for when in ("before", "after"):
        spread = report[f"site_spread_{when}"]
        metrics[f"spread_{when}"] = spread["mean"]
        metrics.update({f"spread_{when}.label_{label}": value for label, value in spread["per_label"].items()})
    return metrics


def run(args: argparse.Namespace) -> int:
    run_deenhance(DeenhanceOptions.from_args(args))
    return 0


def run_deenhance(options: DeenhanceOptions) -> dict[str, Any]:
    """``gem3d deenhance``: every case of ``options.data`` regenerated with one reference slice; returns the report."""
    started = time.perf_counter()
    # the output and the disk first: a full disk is found before the model is loaded
    check_outside(options.out, "--out", {"--data": options.data})
    check_new_outputs([options.out], needed_bytes=1 * dataset_bytes(options.data))
    text = options.reference.removeprefix("real:")
    if not text or options.reference.startswith(("file:", "generate", "copy")):
        raise DataError(f"--reference {options.reference!r}: expects IMAGE.nii.gz[@Z]")
    reference = parse_source(f"real:{text}", option="--reference")
    with cohort_synthesiser(options) as synth:
        with tracked(options, NAME, synth.cfg, started, synth.checkpoints) as run_log:
            bars = ProgressBars([])
            try:
                report = deenhance(synth, options.data, options.out, reference, options.seed, bars, case_preview)
            finally:
                bars.close()
            artifacts = [
                (options.out / "deenhance_report.json", None),
                (options.out / "provenance", "provenance"),
                (options.out / "previews", "previews"),
            ]
            run_log.finish(
                len(report["cases"]),
                spread_metrics(report),
                artifacts,
                {"sites": ",".join(report["site_spread_before"]["sites"])},
            )
        before, after = report["site_spread_before"], report["site_spread_after"]
        print(f"sites: {', '.join(before['sites'])}")
        for label in before["per_label"]:
            print(
                f"  label {label}: spread of site means "
                f"{before['per_label'][label]:.4f} -> {after['per_label'][label]:.4f}"
            )
        print(f"mean spread {before['mean']:.4f} -> {after['mean']:.4f} ({100 * report['spread_reduction']:.0f}% less)")
        print(f"wrote {options.out} (report: {options.out / 'deenhance_report.json'})")
    return report
