"""Generate one volume from a mask and an informed slice.

SRC is ``real:IMAGE.nii.gz[@Z]`` (slice Z of a real volume: the same patient, or another for a
new appearance), ``file:SLICE`` (a 2D NIfTI or PNG) or ``generate`` (the run's informed-slice
generator). The output keeps the mask's affine, spacing and orientation; a provenance JSON and a
PNG preview are written beside it. The run is logged to MLflow (``--track``; default: ``mlflow/``
beside OUT), with the checkpoint's config, these options, the time taken and the outputs.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.commands.common import add_track_option, check_new_outputs, tracked
from experiments.commands.sampling import (
    SamplingOptions,
    add_sampling_arguments,
    open_synthesiser,
    single_output_bytes,
    single_outputs,
    write_single,
)
from gem3d.errors import DataError
from gem3d.from_mask import mask_job
from gem3d.informed import parse_source

NAME = "sample"
HELP = "generate one volume from a mask and an informed slice"


@dataclass(frozen=True, kw_only=True)
class SampleOptions(SamplingOptions):
    """``gem3d sample``'s options (``add_arguments``)."""

    mask: Path
    informed: str
    start: int | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser)
    parser.add_argument("--mask", required=True, type=Path, help="the mask NIfTI the volume is generated from")
    parser.add_argument("--informed", required=True, help="real:IMAGE.nii.gz[@Z] | file:SLICE | generate")
    parser.add_argument(
        "--start", type=int, help="start slice (voxel index along the slice axis; default: informed slice)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output NIfTI (.nii.gz)")
    add_track_option(parser)


def check_output(out: Path, *also: Path, needed_bytes: int = 0) -> None:
    """``--out`` is a new NIfTI path in a writable folder (``needed_bytes`` free); so are its sidecars and ``also``."""
    if not out.name.endswith((".nii.gz", ".nii")):
        raise DataError(f"--out {out}: must end in .nii.gz or .nii")
    check_new_outputs([out, *single_outputs(out), *also], needed_bytes=needed_bytes)


def run(args: argparse.Namespace) -> int:
    run_sample(SampleOptions.from_args(args))
    return 0


def run_sample(options: SampleOptions) -> Path:
    """``gem3d sample``: one volume from ``options.mask`` and its informed slice; returns ``options.out``."""
    started = time.perf_counter()
    # the output and the disk first, from the mask's header: a full disk is found before the model loads
    check_output(options.out, needed_bytes=single_output_bytes(options.mask, False, options.track != "off"))
    source = parse_source(options.informed, ("real", "file", "generate"))
    synth = open_synthesiser(options)
    with tracked(options, NAME, synth.cfg, started, synth.checkpoints) as run_log:
        job = mask_job(synth, options.mask, source, options.start, options.seed)
        label, geometry = write_single(synth, job, options.out)
        provenance, preview = single_outputs(options.out)
        run_log.finish(1, artifacts=[(provenance, None), (preview, "previews")])
    print(f"wrote {options.out} ({'x'.join(map(str, label.shape))}, spacing {geometry.spacing})")
    return options.out
