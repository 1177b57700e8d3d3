"""Validate a dataset and cache it on the model grid, with a manifest of each case's geometry.

Every case is checked (readable, 3D, finite, image/label agree in shape and affine, integer
non-empty labels, pairs complete, ids unique, dataset.json consistent) before the cache appears:
it is built in a temporary folder and renamed into place. The first bad input stops the command
with one line naming the file; ``--skip-invalid`` lists the bad cases and keeps the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.commands.common import add_config_argument, check_outside, load_cli_config, nonnegative_int
from gem3d.data.layouts import LAYOUTS, SEQUENCES
from gem3d.data.prepare import PrepareOptions, prepare_dataset
from gem3d.errors import DataError

NAME = "prepare"
HELP = "validate a dataset and cache it for training (nnunet, msd, brats, abdomenct1k layouts)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Free-form so that an unknown layout is reported as one gem3d error line like every other bad input.
    parser.add_argument("--layout", required=True, metavar="{" + ",".join(LAYOUTS) + "}", help="input layout")
    parser.add_argument("--input", required=True, type=Path, help="the dataset folder")
    parser.add_argument("--output", required=True, type=Path, help="the cache folder to create (must not exist)")
    add_config_argument(parser)
    parser.add_argument(
        "--sequence", default="flair", metavar="{" + ",".join(SEQUENCES) + "}", help="BraTS sequence (default flair)"
    )
    parser.add_argument("--skip-invalid", action="store_true", help="report bad cases and go on with the rest")
    parser.add_argument(
        "--margin", type=nonnegative_int, default=2, help="voxels kept around the foreground box (default 2)"
    )


def run(args: argparse.Namespace) -> int:
    if args.layout not in LAYOUTS:
        raise DataError(f"unknown layout '{args.layout}' (expected one of {', '.join(LAYOUTS)})")
    if args.sequence not in SEQUENCES:
        raise DataError(f"unknown BraTS sequence '{args.sequence}' (expected one of {', '.join(SEQUENCES)})")
    check_outside(args.output, "--output", {"--input": args.input})
    cfg = load_cli_config(args.config, args.set, dataset=args.input)  # the dataset decides its labels and modality
    options = PrepareOptions(
        layout=args.layout, sequence=args.sequence, skip_invalid=args.skip_invalid, margin=max(args.margin, 0)
    )

    def on_case(case_id: str, problem: str | None) -> None:
        if problem is not None:
            print(f"skipped {case_id}: {problem}", file=sys.stderr)

    report = prepare_dataset(args.input, args.output, cfg.data, options, on_case)
    print(
        f"prepared {len(report.cases)} cases ({len(report.skipped)} skipped), "
        f"labels {list(report.label_values)} -> ids 0..{len(report.label_values) - 1} -> {args.output}"
    )
    if report.short:
        print(
            f"note: {len(report.short)} cases have fewer than data.window={cfg.data.window} slices: "
            f"{', '.join(report.short[:5])}",
            file=sys.stderr,
        )
    return 0
