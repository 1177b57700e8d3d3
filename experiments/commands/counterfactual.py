"""Counterfactual synthesis: one patient's anatomy with another's appearance, or an edited mask.

``--informed real:OTHER.nii.gz@Z`` gives the mask's anatomy another patient's appearance;
``--remove-label L`` (or ``--mask-edit``) changes the anatomy, e.g. the same patient without the lesion.
The run is logged to MLflow (``--track``; default: ``mlflow/`` beside OUT).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.commands.common import add_track_option, tracked
from experiments.commands.sample import check_output
from experiments.commands.sampling import (
    SamplingOptions,
    add_sampling_arguments,
    mask_editor,
    open_synthesiser,
    single_output_bytes,
    single_outputs,
    write_single,
)
from gem3d.from_mask import mask_job
from gem3d.informed import parse_source

NAME = "counterfactual"
HELP = "one patient's anatomy with another's appearance, or with a label removed"


@dataclass(frozen=True, kw_only=True)
class CounterfactualOptions(SamplingOptions):
    """``gem3d counterfactual``'s options (``add_arguments``)."""

    mask: Path
    informed: str
    remove_label: int | None = None
    mask_edit: str | None = None
    start: int | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser)
    parser.add_argument("--mask", required=True, type=Path, help="the anatomy: a mask NIfTI")
    parser.add_argument(
        "--informed", required=True, help="the appearance: real:IMAGE.nii.gz[@Z] | file:SLICE | generate"
    )
    parser.add_argument("--remove-label", type=int, help="remove this label (its voxels become the nearest tissue)")
    parser.add_argument("--mask-edit", help="further mask edits, e.g. 'shift-lesion:0.5,flip'")
    parser.add_argument("--start", type=int, help="start slice (voxel index along the slice axis)")
    parser.add_argument("--out", required=True, type=Path, help="output NIfTI (.nii.gz)")
    add_track_option(parser)


def edited_mask_path(out: Path) -> Path:
    """Where the edited mask goes: ``X_mask.nii.gz`` beside ``X.nii.gz``."""
    return out.with_name(out.name.replace(".nii", "_mask.nii", 1))


def run(args: argparse.Namespace) -> int:
    run_counterfactual(CounterfactualOptions.from_args(args))
    return 0


def run_counterfactual(options: CounterfactualOptions) -> Path:
    """``gem3d counterfactual``: one volume from an edited mask or another's appearance; returns ``options.out``."""
    started = time.perf_counter()
    edited = options.remove_label is not None or bool(options.mask_edit)
    needed = single_output_bytes(options.mask, edited, options.track != "off")
    check_output(options.out, *([edited_mask_path(options.out)] if edited else []), needed_bytes=needed)
    source = parse_source(options.informed, ("real", "file", "generate"))
    synth = open_synthesiser(options)
    removal = f"remove:{options.remove_label}" if options.remove_label is not None else ""
    spec = ",".join(s for s in (removal, options.mask_edit) if s)
    edit = mask_editor(spec, synth.cfg.data.num_labels, options.seed)
    with tracked(options, NAME, synth.cfg, started, synth.checkpoints, {"mask_edits": spec or "none"}) as run_log:
        job = mask_job(synth, options.mask, source, options.start, options.seed, edit)
        label, geometry = write_single(synth, job, options.out)
        if edit is not None:
            from gem3d.data.nifti import save_nifti

            mask_out = edited_mask_path(options.out)
            save_nifti(mask_out, label.astype("int16"), geometry.affine_array)
            print(f"wrote {mask_out} (the edited mask)")
        provenance, preview = single_outputs(options.out)
        run_log.finish(1, artifacts=[(provenance, None), (preview, "previews")])
    print(f"wrote {options.out}")
    return options.out
