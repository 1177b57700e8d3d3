"""Dataset enhancement: N new image/label pairs per case.

Each pair has a random start position, an informed slice copied from another case at the
proportional position (``copy``) or generated (``generate``), and optional mask edits. The output
is an nnU-Net v2 raw dataset with a provenance JSON and a PNG preview per case, in each source
case's geometry. The run is logged to MLflow (``--track``; default: ``mlflow/`` beside OUT, never
inside the dataset), with the checkpoint's config, these options, the time taken and the outputs.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from experiments.commands.common import (
    add_track_option,
    check_new_outputs,
    check_outside,
    dataset_bytes,
    positive_int,
    tracked,
)
from experiments.commands.sampling import (
    CohortOptions,
    ProgressBars,
    add_sampling_arguments,
    add_worker_arguments,
    cohort_synthesiser,
)
from experiments.previews import case_preview
from gem3d.enhance import enhance

NAME = "enhance"
HELP = "generate new image/label pairs for every case of a dataset"


@dataclass(frozen=True, kw_only=True)
class EnhanceOptions(CohortOptions):
    """``gem3d enhance``'s options (``add_arguments``)."""

    data: Path
    per_case: int = 1
    informed: Literal["copy", "generate"] = "copy"
    mask_edit: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser)
    add_worker_arguments(parser)
    parser.add_argument(
        "--data", required=True, type=Path, help="nnU-Net v2 raw dataset (or a folder of site datasets)"
    )
    parser.add_argument(
        "--per-case", type=positive_int, default=EnhanceOptions.per_case, help="new pairs per case (default 1)"
    )
    parser.add_argument(
        "--informed", choices=("copy", "generate"), default=EnhanceOptions.informed, help="informed-slice source"
    )
    parser.add_argument("--mask-edit", help="mask edits, e.g. 'rotate:10,flip,elastic:2,shift-lesion:0.5'")
    parser.add_argument("--out", required=True, type=Path, help="output dataset folder (must not exist)")
    add_track_option(parser)


def run(args: argparse.Namespace) -> int:
    run_enhance(EnhanceOptions.from_args(args))
    return 0


def run_enhance(options: EnhanceOptions) -> Path:
    """``gem3d enhance``: ``options.per_case`` new pairs per case of ``options.data``; returns the written dataset."""
    started = time.perf_counter()
    # the output and the disk first: a full disk is found before the model is loaded
    check_outside(options.out, "--out", {"--data": options.data, "--checkpoint": options.checkpoint})
    check_new_outputs([options.out], needed_bytes=options.per_case * dataset_bytes(options.data))
    edits = []
    if options.mask_edit:  # a bad edit is refused before any model loads or worker starts
        from gem3d.masks import parse_edits

        edits = parse_edits(options.mask_edit)
    with (
        cohort_synthesiser(options) as synth,
        tracked(options, NAME, synth.cfg, started, synth.checkpoints) as run_log,
    ):
        bars = ProgressBars([])
        try:
            out = enhance(
                synth,
                options.data,
                options.out,
                options.per_case,
                options.informed,
                edits,
                options.seed,
                bars,
                case_preview,
            )
        finally:
            bars.close()
        cases = json.loads((out / "dataset.json").read_text())["numTraining"]
        artifacts = [(out / "dataset.json", None), (out / "provenance", "provenance"), (out / "previews", "previews")]
        run_log.finish(cases, artifacts=artifacts)
    print(f"wrote {out}")
    return out
