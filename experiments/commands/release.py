"""Dataset enhancement under the privacy policy: the release gate (issue 6).

Generates ``--per-case`` new image/label pairs per case with *generated* informed slices and
edited masks (``--mask-edit``, at least ``--min-mask-edits`` edits that change each mask), then
releases them only if the site's privacy ledger is within budget and the memorization audit
finds no copy of a training volume. Released files have scrubbed NIfTI headers, random
pseudonymous ids, provenance without source ids, paths or dates, and a ``privacy_report.json``.
On refusal nothing is written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from experiments.commands.sampling import ProgressBars, add_sampling_arguments, open_synthesiser
from gem3d.apps import dataset_folders, enhance
from gem3d.checkpoint import library_versions
from gem3d.config import Config
from gem3d.data.dataset import load_volumes
from gem3d.data.volume import Volume
from gem3d.errors import ConfigError
from privacy.audit import AuditSettings
from privacy.ledger import PrivacyLedger
from privacy.release import GeneratedCase, ReleasePolicy, check_ledger, release_cohort

NAME = "release"
HELP = "enhance a dataset under the privacy policy: generated informed slices, edited masks, audit, ledger"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser)
    parser.add_argument("--data", required=True, type=Path, help="the site's training data (nnU-Net v2 raw)")
    parser.add_argument("--per-case", type=int, default=1, help="new pairs per case (default 1)")
    parser.add_argument(
        "--mask-edit", default="rotate:15,elastic:3", help="mask edits for every mask (default rotate:15,elastic:3)"
    )
    parser.add_argument("--min-mask-edits", type=int, default=1, help="edits that must change each mask")
    parser.add_argument("--holdout", type=Path, help="real cases the model never saw, for the audit's reference")
    parser.add_argument(
        "--ledger", type=Path, help="the site's privacy ledger (default: CHECKPOINT/privacy_ledger.json)"
    )
    parser.add_argument("--allow-non-dp", action="store_true", help="release from a model trained without DP-SGD")
    parser.add_argument("--quantile", type=float, default=0.05, help="audit: low quantile of reference NN distances")
    parser.add_argument("--margin", type=float, default=0.5, help="audit: copy threshold = margin x that quantile")
    parser.add_argument("--grid", type=int, default=32, help="audit: volumes are compared on a GRID^3 grid")
    parser.add_argument("--out", required=True, type=Path, help="output dataset folder (must not exist)")


def _load_all(data: Path, cfg: Config) -> list[Volume]:
    """Every case of a dataset, or of each site dataset inside ``data``."""
    volumes: list[Volume] = []
    for _, folder in dataset_folders(data):
        volumes.extend(load_volumes(folder, cfg.data))
    return volumes


def _read_generated(folder: Path) -> list[GeneratedCase]:
    """The cases ``gem3d.apps.enhance`` wrote, with their provenance, back in memory."""
    cases = []
    for provenance_path in sorted((folder / "provenance").glob("*.json")):
        case_id = provenance_path.stem
        image = nib.load(folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        label = nib.load(folder / "labelsTr" / f"{case_id}.nii.gz")
        cases.append(
            GeneratedCase(
                image=np.asarray(image.dataobj, dtype=np.float32),
                label=np.asarray(label.dataobj),
                affine=image.affine,
                provenance=json.loads(provenance_path.read_text()),
            )
        )
    return cases


def run(args: argparse.Namespace) -> int:
    from gem3d.masks import parse_edits

    synth = open_synthesiser(args)
    policy = ReleasePolicy(min_mask_edits=args.min_mask_edits, require_dp=not args.allow_non_dp)
    edits = parse_edits(args.mask_edit) if args.mask_edit else []
    if len(edits) < policy.min_mask_edits:
        raise ConfigError(
            f"--mask-edit {args.mask_edit!r}: {len(edits)} edit(s), the policy needs at least {policy.min_mask_edits}"
        )
    ledger_path = args.ledger or (args.checkpoint / "privacy_ledger.json" if args.checkpoint.is_dir() else None)
    ledger = None
    if ledger_path is not None and ledger_path.exists():
        ledger = PrivacyLedger.open(ledger_path, synth.cfg.privacy)
    check_ledger(ledger, policy)  # refuse before spending time on generation
    train = _load_all(args.data, synth.cfg)
    holdout = _load_all(args.holdout, synth.cfg) if args.holdout else None

    bars = ProgressBars([])
    with tempfile.TemporaryDirectory(prefix="gem3d-release-") as tmp:
        try:
            generated = enhance(
                synth, args.data, Path(tmp) / "generated", args.per_case, "generate", edits, args.seed, bars
            )
        finally:
            bars.close()
        cases = _read_generated(generated)
    out = release_cohort(
        cases,
        args.out,
        train=train,
        data_cfg=synth.cfg.data,
        ledger=ledger,
        holdout=holdout,
        policy=policy,
        audit_settings=AuditSettings(grid=(args.grid,) * 3, quantile=args.quantile, margin=args.margin),
        generator={"checkpoint_sha256": synth.checkpoints, "versions": library_versions()},
    )
    report = json.loads((out / "privacy_report.json").read_text())
    epsilon = report["differential_privacy"]["epsilon"]
    privacy_text = f"ε = {epsilon:.3f}" if epsilon is not None else "no DP guarantee (--allow-non-dp)"
    print(f"released {len(cases)} cases to {out} ({privacy_text}; audit passed)")
    return 0
