"""Score a run with the fixed evaluation protocol (experiments/evaluation/PROTOCOL.md).

On held-out cases (DATA: an nnU-Net raw dataset, a prepared cache, or a cohort root with test/)
each case's real informed slice at the protocol's position conditions the run's sampler. The report
holds fidelity (PSNR, SSIM, MS-SSIM, whole and foreground), appearance transfer with and without
the informed slice, the seam ratio and view check, FID/MMD per view (with the named feature
extractor), diversity, and downstream segmentation Dice with 95% intervals over seeds, for GEM-3D
and the baselines:

  mask-only    a run trained with model.informed_slice=false (--baseline-checkpoint
               mask-only=RUN, or trained here from --train-data at the run's steps)
  no-overlap   the same run, sampled on independent windows with no overlap
  full-3d      a MONAI 3D DiffusionModelUNet (--baseline-checkpoint full-3d=FILE, or trained
               here from --train-data for the run's slice + volume steps)

Downstream (PROTOCOL.md section 4): a small 3D UNet, trained until its validation Dice stops
improving, on n real cases alone and with m synthetic volumes per real case from each arm (gem3d:
generated informed slices, random starts, edited masks; gem3d-copy, gem3d-own, mask-only,
full-3d), for n in --real-counts and m in --multipliers, and on synthetic volumes only (TSTR);
paired per seed, with 95% intervals. --downstream-data DIR is the real pool (e.g. a site's own
data), tested on --data; the curves go to <stem>_utility.png. --segmenter nnunet lets nnU-Net v2
judge the few-real point (pip install '.[nnunet]').

Baselines trained here go to REPORT's folder, <stem>.baselines/, for reuse. --quick reduces
steps, seeds and samples for a CPU smoke run; every reduction is listed under "deviations".
The run is logged to MLflow (--track; default: mlflow/ beside REPORT.json; 'off' disables): the
run's config and these options as params, the fidelity of every method as metrics, the report
and the montage as artifacts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch

from experiments.commands.common import (
    PROVENANCE_BYTES,
    CommandRun,
    TrackedOptions,
    add_track_option,
    check_new_outputs,
    check_writable,
    device_name,
    png_bytes,
    positive_int,
    tracked,
)
from experiments.evaluation.arms import ARMS, resolve_arms
from experiments.evaluation.baselines import VolumeUNet
from experiments.evaluation.distribution import load_feature_extractor
from experiments.evaluation.nnunet_judge import BUDGETS, require_nnunet
from experiments.evaluation.protocol import DOWNSTREAM_STEPS
from experiments.evaluation.report import write_report
from experiments.evaluation.run import (
    BASELINE_NAMES,
    BASELINES,
    DEFAULT_ARMS,
    MONTAGE_CASES,
    Settings,
    evaluate,
    montage,
    quick_settings,
)
from experiments.evaluation.utility import UtilityDesign, plot_curves
from gem3d.config import Config, config_from_dict
from gem3d.errors import CheckpointError, ConfigError, DataError
from gem3d.runs import checkpoint_bytes, stage_metadata

NAME = "evaluate"
HELP = "score a run against held-out cases and baselines (PROTOCOL.md)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateOptions(TrackedOptions):
    """``gem3d evaluate``'s options (``add_arguments``); ``out`` is REPORT.json. Lists are comma-separated text."""

    checkpoint: Path
    data: Path
    baselines: str = "mask-only,no-overlap,full-3d"
    baseline_checkpoint: tuple[str, ...] = ()
    """``NAME=PATH`` items, each as one ``--baseline-checkpoint``."""
    train_data: Path | None = None
    feature_extractor: str = "random"
    seeds: str | None = None
    downstream_data: Path | None = None
    arms: str | None = None
    real_counts: str | None = None
    multipliers: str | None = None
    segmenter: Literal["unet", "nnunet"] = "unet"
    nnunet_budget: str = "full"
    tstr: bool = False
    downstream_steps: int | None = None
    quick: bool = False
    no_downstream: bool = False
    device: str | None = None
    threads: int | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="the run folder to evaluate")
    parser.add_argument("--data", required=True, type=Path, help="held-out cases (dataset, or cohort root with test/)")
    parser.add_argument("--out", required=True, type=Path, help="REPORT.json (a montage PNG is written beside it)")
    parser.add_argument(
        "--baselines",
        default=EvaluateOptions.baselines,
        help="comma-separated: mask-only, no-overlap, full-3d, or 'none' (default: all three)",
    )
    parser.add_argument(
        "--baseline-checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a trained baseline: mask-only=RUN_FOLDER or full-3d=FILE.safetensors (repeatable)",
    )
    parser.add_argument(
        "--train-data", type=Path, help="the run's training data: trains the baselines not given as checkpoints"
    )
    parser.add_argument(
        "--feature-extractor",
        "--features",
        default=EvaluateOptions.feature_extractor,
        help="FID/MMD features: random[:SEED] (offline, labelled), export:PATH, torchscript:PATH, resnet50:PATH",
    )
    parser.add_argument(
        "--seeds", help="downstream segmentation seeds, comma-separated (default: the protocol's 0,1,2)"
    )
    parser.add_argument(
        "--downstream-data",
        type=Path,
        help="the downstream task's real pool (validation and training cases; e.g. a site's training data), "
        "tested on every case of --data (default: a split of --data)",
    )
    parser.add_argument(
        "--arms", help=f"downstream arms, comma-separated, from {', '.join(ARMS)} (default: {','.join(DEFAULT_ARMS)})"
    )
    parser.add_argument("--real-counts", help="real training cases of the curve, comma-separated (default 1,2,4,8)")
    parser.add_argument("--multipliers", help="synthetic volumes per real case, comma-separated (default 0,1,2,4)")
    parser.add_argument(
        "--segmenter",
        choices=("unet", "nnunet"),
        default=EvaluateOptions.segmenter,
        help="the downstream judge: the protocol's small UNet (default) or nnU-Net v2 (pip install '.[nnunet]'; "
        "the headline point only)",
    )
    parser.add_argument(
        "--nnunet-budget",
        choices=tuple(BUDGETS),
        default=EvaluateOptions.nnunet_budget,
        help="nnU-Net's schedule: full (its own 1000 epochs, a GPU job) or short (a CPU smoke run; not converged)",
    )
    parser.add_argument(
        "--tstr", action="store_true", help="also train on synthetic only (on by default; --quick turns it off)"
    )
    parser.add_argument(
        "--downstream-steps", type=positive_int, help=f"cap on each segmenter's steps (default {DOWNSTREAM_STEPS})"
    )
    parser.add_argument("--quick", action="store_true", help="CPU smoke setting (reported as deviations)")
    parser.add_argument("--no-downstream", action="store_true", help="skip the segmentation task (a deviation)")
    parser.add_argument("--device", type=device_name, help="override train.device for sampling (cpu, cuda)")
    parser.add_argument(
        "--threads", type=positive_int, help="torch intra-op threads (1 is fastest on a shared small CPU)"
    )
    add_track_option(parser)


def _parse_baselines(text: str) -> list[str]:
    if text.strip().lower() == "none":
        return []
    chosen = []
    for name in filter(None, (part.strip() for part in text.split(","))):
        if name not in BASELINE_NAMES:
            raise ConfigError(f"--baselines: unknown baseline '{name}' (use mask-only, no-overlap, full-3d or none)")
        chosen.append(BASELINE_NAMES[name])
    return chosen


def _parse_checkpoints(items: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        key = BASELINE_NAMES.get(name.strip())
        if not sep or key not in ("mask_only", "full_3d"):
            raise ConfigError(f"--baseline-checkpoint {item}: expected mask-only=RUN_FOLDER or full-3d=FILE")
        if not Path(path).exists():
            raise DataError(f"{path}: baseline checkpoint not found")
        out[key] = Path(path)
    return out


def _integers(option: str, text: str, low: int) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{option} {text}: expected comma-separated integers") from None
    if not values or min(values) < low:
        raise ConfigError(f"{option} {text}: expected comma-separated integers >= {low}")
    return values


def _settings(options: EvaluateOptions) -> Settings:
    """The protocol's settings (``--quick``'s when asked), then each downstream option as a deviation."""
    settings = quick_settings() if options.quick else Settings()
    design, changes, deviations = settings.utility, {}, list(settings.deviations)
    protocol = UtilityDesign()  # a given count or multiplier list is read against the protocol's points
    if options.seeds is not None:
        changes["seeds"] = _integers("--seeds", options.seeds, 0)
    if options.real_counts:
        counts = _integers("--real-counts", options.real_counts, 1)
        changes.update(real_counts=counts, few_real=min(counts, key=lambda n: abs(n - protocol.few_real)))
    if options.multipliers:
        multipliers = _integers("--multipliers", options.multipliers, 0)
        positive = [m for m in multipliers if m > 0] or [protocol.multiplier]
        changes.update(multipliers=multipliers, multiplier=min(positive, key=lambda m: abs(m - protocol.multiplier)))
    if options.tstr and not design.tstr:
        changes["tstr"] = True
    deviations += [f"--{key.replace('_', '-')}: {value}" for key, value in changes.items()]
    steps = settings.downstream_steps
    if options.downstream_steps is not None:
        steps = options.downstream_steps
        deviations.append(f"--downstream-steps: a cap of {steps} steps instead of {settings.downstream_steps}")
    arms = settings.arms
    if options.arms:
        arms = tuple(part.strip() for part in options.arms.split(",") if part.strip())
        resolve_arms(arms)
        deviations.append(f"--arms: {','.join(arms)}")
    if options.segmenter == "nnunet":
        deviations.append(
            f"--segmenter nnunet ({options.nnunet_budget} budget): nnU-Net judges the few-real point only, no TSTR"
            + ("; the short budget does not converge" if options.nnunet_budget == "short" else "")
        )
    return dataclasses.replace(
        settings,
        utility=dataclasses.replace(design, **changes),
        downstream_steps=steps,
        arms=arms,
        segmenter=options.segmenter,
        nnunet_budget=options.nnunet_budget,
        deviations=tuple(deviations),
    )


def _check_inputs(options: EvaluateOptions) -> None:
    if not options.checkpoint.exists():
        raise DataError(f"{options.checkpoint}: checkpoint not found")
    if not options.data.is_dir():
        raise DataError(f"{options.data}: evaluation data folder not found")
    if options.out.suffix != ".json":
        raise DataError(f"--out {options.out}: the report must be a .json file")
    check_new_outputs([options.out, options.out.with_suffix(".png"), _curves_path(options.out)])
    if options.train_data is not None and not options.train_data.is_dir():
        raise DataError(f"{options.train_data}: training data folder not found")
    if options.downstream_data is not None and not options.downstream_data.is_dir():
        raise DataError(f"--downstream-data {options.downstream_data}: folder not found")
    if options.segmenter == "nnunet" and not options.no_downstream:
        require_nnunet()
        check_new_outputs([_nnunet_dir(options.out)])
    if options.threads is not None and options.threads < 1:
        raise ConfigError(f"--threads {options.threads}: must be at least 1")


def _run_config(checkpoint: Path) -> Config | None:
    """The evaluated run's config, for the MLflow params; None if unreadable (``evaluate`` then says why)."""
    try:
        return config_from_dict(stage_metadata(checkpoint, "volume")["config"], f"{checkpoint} (embedded config)")
    except (CheckpointError, ConfigError, KeyError):
        return None


def _needed_bytes(
    options: EvaluateOptions, methods: list[str], checkpoints: dict[str, Path], settings: Settings
) -> int:
    """About what ``evaluate`` writes: the report, the montage (at most ``MONTAGE_CASES`` rows of
    four methods) and the curves (uncompressed PNGs: an upper bound), copied into the MLflow run
    when tracked, and the baselines it trains (``--train-data``) at the run's network size, as
    ``runs.checkpoint_bytes`` counts a checkpoint. Nothing is allocated: networks are built on the meta device."""
    pictures = png_bytes(2.2 * 4, 2.2 * MONTAGE_CASES, 100) + png_bytes(4.2 * 4, 3.4, 100)
    needed = (PROVENANCE_BYTES + pictures) * (2 if options.track != "off" else 1)
    cfg = _run_config(options.checkpoint)
    if options.train_data is None or cfg is None:
        return needed
    if "mask_only" in methods and "mask_only" not in checkpoints:
        needed += checkpoint_bytes("slice", cfg) + checkpoint_bytes("volume", cfg)
    if "full_3d" in methods and "full_3d" not in checkpoints:
        with torch.device("meta"):
            net = VolumeUNet(cfg.data.num_labels, settings.full3d_channels)
        needed += 2 * 4 * 4 * sum(p.numel() for p in net.parameters())
    return needed


def _nnunet_dir(out: Path) -> Path:
    return out.parent / f"{out.stem}.nnunet"


def _curves_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_utility.png")


def _track(run_log: CommandRun, report_path: Path, pictures: list[Path], report: dict[str, Any]) -> None:
    """Log the fidelity per method, the downstream headline, the protocol and checkpoint hashes, report and pictures."""
    gem3d = report["methods"]["gem3d"]
    metrics = {f"gem3d.{k}": v for k, v in gem3d["fidelity"].items()}
    for key in BASELINES:
        if "fidelity" in report["methods"][key]:
            metrics.update({f"{key}.{k}": v for k, v in report["methods"][key]["fidelity"].items()})
    head = report["downstream"].get("headline")
    if head:  # the downstream answer: Dice at the few-real point and the paired gain with its interval
        for name, summary in (("real_only", head["real_only"]), ("with_synthetic", head["with_synthetic"]),
                              ("gain", head["gain"])):  # fmt: skip
            metrics.update({f"downstream.{name}.{k}": summary[k] for k in ("mean", "ci_low", "ci_high")})
    hashes = {f"checkpoint_sha256.{stage}": digest for stage, digest in report["checkpoint"]["sha256"].items()}
    run_log.finish(
        None,
        {k: v for k, v in metrics.items() if isinstance(v, float)},
        [(report_path, "evaluation"), *((picture, "evaluation") for picture in pictures)],
        {"protocol": report["protocol"], **hashes},
    )


def run(args: argparse.Namespace) -> int:
    run_evaluate(EvaluateOptions.from_args(args))
    return 0


def run_evaluate(options: EvaluateOptions) -> dict[str, Any]:
    """``gem3d evaluate``: the protocol's report on ``options.checkpoint``, written to ``options.out``; returns it."""
    started = time.perf_counter()
    _check_inputs(options)
    methods = ["gem3d", *_parse_baselines(options.baselines)]
    checkpoints = _parse_checkpoints(options.baseline_checkpoint)
    settings = _settings(options)
    # the disk before the work: the report, its pictures and the baselines trained here
    check_writable(options.out, "--out", _needed_bytes(options, methods, checkpoints, settings))
    try:
        extractor = load_feature_extractor(options.feature_extractor)
    except (ValueError, OSError) as error:
        raise ConfigError(f"--feature-extractor: {error}") from None
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    with tracked(options, NAME, _run_config(options.checkpoint), started) as run_log:
        report, scored = evaluate(
            options.checkpoint,
            options.data,
            methods=methods,
            baseline_checkpoints=checkpoints,
            train_data=options.train_data,
            baselines_dir=options.out.parent / f"{options.out.stem}.baselines",
            extractor=extractor,
            settings=settings,
            device=options.device,
            downstream=not options.no_downstream,
            downstream_data=options.downstream_data,
            nnunet_dir=_nnunet_dir(options.out),
        )
        write_report(options.out, report)
        picture = montage(scored, options.out.with_suffix(".png"))
        pictures = [picture]
        if "curves" in report["downstream"]:
            pictures.append(plot_curves(report["downstream"], _curves_path(options.out)))
        _track(run_log, options.out, pictures, report)
    _summary(report, options.out, pictures)
    return report


def _number(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _interval(summary: dict[str, Any]) -> str:
    """``0.512 [0.431, 0.593]`` (no brackets with one seed)."""
    low, high = summary["ci_low"], summary["ci_high"]
    bounds = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
    return f"{summary['mean']:.3f}{bounds}"


def _summary(report: dict, out: Path, pictures: list[Path]) -> None:
    print(f"protocol {report['protocol']}, features: {report['settings']['feature_extractor']}")
    print(f"{'method':<20} {'psnr':>7} {'psnr_fg':>7} {'ssim':>6} {'app_err':>7} {'seam':>6} {'fid_mean':>9}")
    for key, section in report["methods"].items():
        if "skipped" in section:
            print(f"{key:<20} skipped: {section['skipped']}")
            continue
        fid, seam = section["fidelity"], section["seam_ratio"]
        print(
            f"{key:<20} {_number(fid['psnr']):>7} {_number(fid['psnr_foreground']):>7} {_number(fid['ssim']):>6} "
            f"{_number(section['appearance']['foreground_mean']):>7} "
            f"{_number(seam['mean']) if seam else '-':>6} {_number(section['distribution']['fid_mean']):>9}"
        )
    head = report["downstream"].get("headline")
    if head:
        print(
            f"downstream Dice at {head['real']} real cases: real-only {_interval(head['real_only'])}, "
            f"+ {head['arm']} x{head['multiplier']} {_interval(head['with_synthetic'])}, "
            f"gain {_interval(head['gain'])}: {head['verdict']}"
        )
    if report["deviations"]:
        print("deviations: " + json.dumps(report["deviations"]), file=sys.stderr)
    print(f"wrote {out} and {', '.join(str(p) for p in pictures)}")
