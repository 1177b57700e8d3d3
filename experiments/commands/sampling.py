"""Shared pieces of the sampling commands: options, progress bars, mask edits, writing one volume."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from experiments.commands.common import (
    PROVENANCE_BYTES,
    CommandOptions,
    TrackedOptions,
    device_name,
    png_bytes,
    positive_int,
    seed_int,
)
from experiments.previews import case_preview
from experiments.progress import progress_bar
from gem3d.data.geometry import CaseGeometry
from gem3d.synthesis import Job, Synthesiser, load_synthesiser, real_original, run_jobs, to_original, write_volume


@dataclass(frozen=True, kw_only=True)
class SamplingOptions(TrackedOptions):
    """The options of every sampling command (``add_sampling_arguments``): the run, the seed, steps, device."""

    checkpoint: Path
    seed: int = 0
    steps: int | None = None
    device: str | None = None


@dataclass(frozen=True, kw_only=True)
class WorkerOptions(CommandOptions):
    """Where a cohort's volumes are sampled (``add_worker_arguments``): this process, or Ray workers."""

    workers: int | None = None
    threads_per_worker: int = 1
    ray_address: str | None = None


@dataclass(frozen=True, kw_only=True)
class CohortOptions(SamplingOptions, WorkerOptions):
    """A command that samples a whole cohort (enhance, deenhance, release)."""


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="run folder (or a volume checkpoint file)")
    parser.add_argument(
        "--seed", type=seed_int, default=SamplingOptions.seed, help="seeds all sampling noise (default 0)"
    )
    parser.add_argument(
        "--steps", type=positive_int, help="sampler steps (default: diffusion.inference_steps of the run)"
    )
    parser.add_argument("--device", type=device_name, help="cpu, cuda, cuda:1 (default: the run's train.device)")


def open_synthesiser(options: SamplingOptions) -> Synthesiser:
    return load_synthesiser(options.checkpoint, options.device, options.steps)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers`` and ``--ray-address`` of the cohort commands (``experiments.cohort_workers``)."""
    parser.add_argument(
        "--workers",
        type=positive_int,
        help="Ray workers that sample the volumes (default: this process alone); any number writes the same bytes",
    )
    parser.add_argument(
        "--threads-per-worker",
        type=positive_int,
        default=WorkerOptions.threads_per_worker,
        help="torch threads of each Ray worker (default 1)",
    )
    parser.add_argument(
        "--ray-address",
        help="a running Ray cluster (the address 'ray start --head' prints): --workers actors (default 1) run there",
    )


@contextmanager
def cohort_synthesiser(options: CohortOptions) -> Iterator[Synthesiser]:
    """The run's models; with ``--workers`` or ``--ray-address``, their volumes sampled by Ray actors."""
    synth = open_synthesiser(options)
    if options.workers is None and options.ray_address is None:
        yield synth
        return
    from experiments.cohort_workers import RayChunks, WorkerSettings

    device = options.device or synth.cfg.train.device
    gpus = 1.0 if device.startswith("cuda") else 0.0
    settings = WorkerSettings(options.workers or 1, options.ray_address, options.threads_per_worker, gpus)
    with RayChunks(settings, options.checkpoint, options.device, options.steps) as chunks:
        yield replace(synth, sample_chunks=chunks)


class ProgressBars:
    """One tqdm bar per volume, with its ETA; used as the sampler's ``on_progress``."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.bars: dict[int, tqdm] = {}

    def __call__(self, index: int, done: int, total: int) -> None:
        if index not in self.bars:
            name = self.names[index] if index < len(self.names) else f"volume {index}"
            self.bars[index] = progress_bar(total, name, "window", leave=False)
        bar = self.bars[index]
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def mask_editor(
    spec: str | None, num_labels: int, seed: int
) -> Callable[[np.ndarray], tuple[np.ndarray, list[dict[str, Any]]]] | None:
    """A function applying ``--mask-edit`` edits to a model-grid mask, or None without edits."""
    if not spec:
        return None
    from gem3d.masks import apply_edits, parse_edits

    edits = parse_edits(spec)

    def edit(label: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
        return apply_edits(label, edits, num_labels, np.random.default_rng(seed))

    return edit


PREVIEW_BYTES = png_bytes(7.5, 2.6 * 3, 80)  # ``case_preview``: a fixed-size figure (three rows at most)


def single_output_bytes(mask: Path, edited_mask: bool, tracked: bool) -> int:
    """About what ``write_single`` writes for ``mask``, from its header alone (no voxel is read).

    The volume is written in the mask's own grid as float32 (gzip ignored: an upper bound), the
    edited mask as int16, plus the provenance JSON and the preview; the MLflow run keeps copies
    of those two. Raises ``DataError`` naming the mask when its header is unreadable.
    """
    from gem3d.data.nifti import read_header

    voxels = math.prod(read_header(mask).spatial_shape)
    sidecars = PROVENANCE_BYTES + PREVIEW_BYTES
    return voxels * 4 + (voxels * 2 if edited_mask else 0) + sidecars * (2 if tracked else 1)


def single_outputs(out: Path) -> tuple[Path, Path]:
    """The provenance JSON and the PNG preview ``write_single`` writes beside ``out`` (``X.nii.gz``)."""
    stem = out.name.removesuffix(".gz").removesuffix(".nii")
    return out.with_name(f"{stem}.provenance.json"), out.with_name(f"{stem}.png")


def write_single(synth: Synthesiser, job: Job, out: Path) -> tuple[np.ndarray, CaseGeometry]:
    """Sample one job with a progress bar, write ``out`` + provenance + a PNG preview (``single_outputs``).

    Returns:
        the written label map ``[X, Y, Z]`` (the job's mask in its original grid) and its geometry.
    """
    bars = ProgressBars([out.name])
    try:
        (volume,) = run_jobs(synth, [job], bars)
    finally:
        bars.close()
    image, label, geometry = to_original(volume, job)
    write_volume(out, image, geometry, job.provenance)
    case_preview(single_outputs(out)[1], image, label, geometry, real_original(job))
    return label, geometry
