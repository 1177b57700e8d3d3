"""Dataset enhancement under the privacy policy: the release gate (issue 6).

Generates ``--per-case`` new image/label pairs per case with *generated* informed slices and
edited masks (``--mask-edit``, at least ``--min-mask-edits`` edits that change each mask), then
releases them only if every stage of the model trained on private data did so under DP-SGD
(its checkpoints' privacy records, ``privacy.model_privacy``) and the memorization audit
finds no copy of a training volume. Released files have scrubbed NIfTI headers, random
pseudonymous ids, provenance without source ids, paths or dates, and a ``privacy_report.json``.
On refusal nothing is written to ``--out``. The work is ``privacy.release.release_dataset``.

The release is tracked in MLflow (experiment ``gem3d-release``, default store ``OUT/../mlflow``):
ε, δ and the audit figures as metrics, the accountant and policy as params, the privacy report
and a preview PNG of released cases (synthetic only, pseudonymous names) as artifacts. A refused
release is not tracked: it writes nothing anywhere.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from experiments.commands.audit import CopyRuleOptions, add_copy_rule_arguments, audit_metrics, copy_rule_settings
from experiments.commands.common import (
    add_track_argument,
    check_new_outputs,
    check_outside,
    dataset_bytes,
    default_store,
    nonnegative_int,
    open_tracker,
    positive_int,
)
from experiments.commands.sampling import (
    CohortOptions,
    ProgressBars,
    add_sampling_arguments,
    add_worker_arguments,
    cohort_synthesiser,
)
from experiments.previews import triplanar_png
from experiments.tracking import Tracker
from gem3d.errors import ConfigError
from privacy.model_privacy import model_statement
from privacy.release import ReleasePolicy, ReleaseResult, release_dataset

NAME = "release"
HELP = "enhance a dataset under the privacy policy: generated informed slices, edited masks, DP check, audit"
MAX_PREVIEWS = 8  # previews logged to MLflow: enough to eyeball a release, few enough to stay light


@dataclass(frozen=True, kw_only=True)
class ReleaseOptions(CohortOptions, CopyRuleOptions):
    """``gem3d release``'s options (``add_arguments``); the copy rule is the audit's."""

    data: Path
    per_case: int = 1
    mask_edit: str = "rotate:45,elastic:10"
    max_linkage_rate: float = 0.5
    min_mask_edits: int = 1
    holdout: Path | None = None
    allow_non_dp: bool = False
    audit_sites: Path | None = None
    allow_single_site_audit: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser)
    add_worker_arguments(parser)
    parser.add_argument("--data", required=True, type=Path, help="the site's training data (nnU-Net v2 raw)")
    parser.add_argument(
        "--per-case", type=positive_int, default=ReleaseOptions.per_case, help="new pairs per case (default 1)"
    )
    parser.add_argument(
        "--mask-edit",
        default=ReleaseOptions.mask_edit,
        help="mask edits for every mask (default rotate:45,elastic:10: milder edits let the linkage attack find "
        "the source patient of most masks; experiments/benchmarks/mask_linkage.py measures recipes)",
    )
    parser.add_argument(
        "--max-linkage-rate",
        type=float,
        default=ReleaseOptions.max_linkage_rate,
        help="refuse when more than this fraction of released masks link back to their source (default 0.5)",
    )
    parser.add_argument(
        "--min-mask-edits",
        type=nonnegative_int,
        default=ReleaseOptions.min_mask_edits,
        help="edits that must change each mask",
    )
    parser.add_argument("--holdout", type=Path, help="real cases the model never saw, for the audit's reference")
    parser.add_argument(
        "--allow-non-dp",
        action="store_true",
        help="release from a model with a stage trained on private data without DP-SGD (no formal guarantee)",
    )
    parser.add_argument(
        "--audit-sites",
        type=Path,
        help="federated audit: the data root of the sites that trained the model (site_0, site_1, ...); every "
        "site audits the candidates against its own patients in a Flower audit round (simulated on this machine)",
    )
    parser.add_argument(
        "--allow-single-site-audit",
        action="store_true",
        help="release a model trained at several sites after auditing only --data's patients (no check of the others)",
    )
    add_copy_rule_arguments(parser, "audit: ")
    parser.add_argument("--out", required=True, type=Path, help="output dataset folder (must not exist)")
    add_track_argument(parser, "OUT/../mlflow")


def run(args: argparse.Namespace) -> int:
    run_release(ReleaseOptions.from_args(args))
    return 0


def run_release(options: ReleaseOptions) -> ReleaseResult:
    """``gem3d release``: an enhanced cohort of ``options.data`` through the release gate, or nothing written."""
    # the output and the disk first: a full disk is found before the model is loaded
    inputs = {"--data": options.data, "--holdout": options.holdout, "--audit-sites": options.audit_sites}
    check_outside(options.out, "--out", inputs)
    check_new_outputs([options.out], needed_bytes=options.per_case * dataset_bytes(options.data))
    if not 0.0 <= options.max_linkage_rate <= 1.0:
        raise ConfigError(f"--max-linkage-rate {options.max_linkage_rate:g}: expected a fraction within 0..1")
    with cohort_synthesiser(options) as synth:
        policy = ReleasePolicy(
            min_mask_edits=options.min_mask_edits,
            require_dp=not options.allow_non_dp,
            max_linkage_rate=options.max_linkage_rate,
            audit_every_site=not options.allow_single_site_audit,
        )
        settings = copy_rule_settings(options)
        site_audit = None
        if options.audit_sites is not None:
            from experiments.simulation import simulate_audit_round
            from server.audit import site_folders

            site_folders(options.audit_sites)  # checked before any work
            root, cfg = options.audit_sites, synth.cfg

            def site_audit(candidates: list[np.ndarray]) -> list[dict[str, Any]]:
                return simulate_audit_round(candidates, root, cfg, settings)

        bars = ProgressBars([])
        try:
            result = release_dataset(
                synth,
                options.data,
                options.out,
                per_case=options.per_case,
                mask_edit=options.mask_edit,
                policy=policy,
                privacy_statement=model_statement(options.checkpoint),
                holdout=options.holdout,
                audit_settings=settings,
                seed=options.seed,
                on_progress=bars,
                site_audit=site_audit,
            )
        finally:
            bars.close()
        # opened only after a release: a refusal writes nothing anywhere, tracking store included
        tracker = open_tracker(options.track, default_store(options.out), NAME, options.out.name, synth.cfg)
        if tracker is not None:
            with tracker:
                _track(tracker, options, result)
        epsilon = result.report["differential_privacy"]["epsilon"]
        privacy_text = f"ε = {epsilon:.3f}" if epsilon is not None else "no DP guarantee (--allow-non-dp)"
        federated = result.report.get("federated_audit", {})
        audited = f"audit passed at {len(federated['sites'])} sites" if federated.get("run") else "audit passed"
        print(f"released {result.cases} cases to {result.out} ({privacy_text}; {audited})")
    return result


def release_figures(report: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """MLflow metrics and params from a privacy report.

    Metrics: ε, δ, steps, budget and the audit's figures named as ``gem3d audit`` logs them,
    prefixed ``audit.``. Params: the DP level, accountant, audit reference and policy.
    """
    dp, audit = report["differential_privacy"], report["audit"]
    metrics: dict[str, float] = {"cases": float(report["cases"])}
    for key in ("epsilon", "delta"):
        if dp.get(key) is not None:
            metrics[key] = float(dp[key])
    for key, value in (dp.get("client_level") or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[f"client_level.{key}"] = float(value)
    metrics.update({f"audit.{key}": value for key, value in audit_metrics(audit).items()})
    params = {
        "release.dp_level": dp["level"],
        "release.accountant": dp["accountant"] or "none",
        "release.audit_reference": audit["reference"],
        **{f"release.policy.{key}": value for key, value in report["policy"].items()},
    }
    return metrics, params


def _track(tracker: Tracker, options: ReleaseOptions, result: ReleaseResult) -> None:
    """ε, δ, accountant and audit figures; the privacy report and previews of released cases."""
    metrics, params = release_figures(result.report)
    tracker.log_params({**params, "release.per_case": options.per_case, "release.mask_edit": options.mask_edit})
    tracker.log_metrics(metrics)
    tracker.log_artifact(result.report_path)
    with tempfile.TemporaryDirectory(prefix="gem3d-release-previews-") as tmp:
        # drawn from the released files: pseudonymous names, synthetic pixels only (no real row)
        for image_path in sorted((result.out / "imagesTr").glob("*_0000.nii.gz"))[:MAX_PREVIEWS]:
            case_id = image_path.name.removesuffix("_0000.nii.gz")
            image = nib.load(image_path)
            label = nib.load(result.out / "labelsTr" / f"{case_id}.nii.gz")
            x, y, z = (float(v) for v in image.header.get_zooms()[:3])
            triplanar_png(
                Path(tmp) / f"{case_id}.png",
                np.asarray(image.dataobj, dtype=np.float32),
                np.asarray(label.dataobj),
                (x, y, z),
            )
        tracker.log_artifact(tmp, "previews")
