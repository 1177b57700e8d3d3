"""A run's models and the volumes they make: load a run, turn jobs into volumes, write them back.

* ``load_synthesiser``: the volume model and the informed-slice generator of a run folder, on
  their device, with the checkpoints' hashes for provenance (``Synthesiser``).
* ``Job``: one synthetic volume to make (a model-grid target mask, its informed slice, start,
  seed); ``iter_jobs`` samples a cohort ``sampler.batch_volumes`` at a time (or on workers), so
  memory is one batch whatever the cohort's size.
* ``to_original`` / ``write_volume`` / ``add_job``: every output goes back to the geometry of the
  mask it came from (affine, spacing, orientation), with a provenance record: config, checkpoint
  hashes, seed, informed-slice source, start, edits.

The applications compose these: ``gem3d.from_mask`` (sample, counterfactual), ``gem3d.enhance``
and ``gem3d.deenhance``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gem3d.accel import accelerate
from gem3d.checkpoint import file_sha256, library_versions
from gem3d.config import Config
from gem3d.data.geometry import CaseGeometry, ModelGridCase, to_original_grid
from gem3d.data.nifti import save_nifti
from gem3d.data.nnunet_raw import DatasetWriter
from gem3d.diffusion import Sampler, make_sampler
from gem3d.errors import CheckpointError
from gem3d.files import write_json
from gem3d.informed import generated_slices
from gem3d.networks import InformedSliceGenerator, SliceDenoiser
from gem3d.runs import STAGE_FILES, load_model, resolve_device
from gem3d.sampler import InformedSlice, OnProgress, SampleRequest, sample_volumes

SampleChunks = Callable[[Iterable[list[SampleRequest]]], Iterator[list[np.ndarray]]]
"""Chunks of requests -> each chunk's volumes, in order (``experiments.cohort_workers.RayChunks``)."""


@dataclass(frozen=True)
class Synthesiser:
    """The models of a run folder, ready to sample.

    Attributes:
        informed_model: None when the run has no informed-slice generator (``generate`` unavailable).
        checkpoints: stage -> sha256 of the checkpoint file, for provenance.
        sample_chunks: who samples a cohort's chunks of volumes (``iter_jobs``): None, this
            process; else workers that sample each chunk exactly as this process would.
    """

    volume_model: SliceDenoiser
    informed_model: InformedSliceGenerator | None
    cfg: Config
    sampler: Sampler
    checkpoints: dict[str, str]
    sample_chunks: SampleChunks | None = None

    def provenance(self, **fields: Any) -> dict[str, Any]:
        """A provenance record: the given fields plus config, checkpoint hashes and versions."""
        return {
            **fields,
            "checkpoints": self.checkpoints,
            "config": self.cfg.model_dump(mode="json"),
            "sampler": {"steps": len(self.sampler.timesteps), "overlap": self.cfg.sampler.overlap},
            # the in-plane field of view every mask was cut with: mm, or each case's own foreground box
            "field_of_view_mm": self.cfg.data.field_of_view_mm or "per-case foreground box",
            "versions": library_versions(),
        }


def load_synthesiser(checkpoint: str | Path, device: str | None = None, steps: int | None = None) -> Synthesiser:
    """Load the volume model (and the informed-slice generator when present) of a run folder.

    Args:
        checkpoint: a run folder (``gem3d train --out`` or the federated server's output), or a
            single volume-stage checkpoint file.
        device: overrides the config's ``train.device``.
        steps: sampler steps (default ``diffusion.inference_steps``).
    """
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        volume_path = checkpoint / STAGE_FILES["volume"]
        informed_path: Path | None = checkpoint / STAGE_FILES["informed"]
    else:
        volume_path, informed_path = checkpoint, None
    if not volume_path.exists():
        hint = " (train --stage volume into this folder first)" if checkpoint.is_dir() else ""
        raise CheckpointError(f"{volume_path}: no volume-stage checkpoint{hint}")
    model, cfg, metadata = load_model(volume_path)
    if metadata["stage"] != "volume" or not isinstance(model, SliceDenoiser):
        raise CheckpointError(f"{volume_path}: is a '{metadata['stage']}' checkpoint, sampling needs the volume stage")
    target = resolve_device(device or cfg.train.device)
    checkpoints = {"volume": file_sha256(volume_path)}
    informed_model = None
    if informed_path is not None and informed_path.exists():
        generator, _, _ = load_model(informed_path)
        assert isinstance(generator, InformedSliceGenerator)
        informed_model = accelerate(generator, cfg.accel, target)
        checkpoints["informed"] = file_sha256(informed_path)
    sampler = make_sampler(cfg.diffusion, steps)
    return Synthesiser(accelerate(model, cfg.accel, target), informed_model, cfg, sampler, checkpoints)


@dataclass(frozen=True)
class Job:
    """One synthetic volume to make: a target mask (model grid), its informed slice and where to write it."""

    case_id: str
    target: ModelGridCase
    informed: InformedSlice
    start: int
    seed: int
    intensity: tuple[float, float]
    provenance: dict[str, Any] = field(default_factory=dict)


def run_jobs(synth: Synthesiser, jobs: Sequence[Job], on_progress: OnProgress | None = None) -> list[np.ndarray]:
    """Sample every job's volume, all held in memory: for a few jobs (``gem3d sample``); a cohort uses ``iter_jobs``.

    Returns:
        ``[D, H, W]`` volumes in [-1, 1], in the order of ``jobs``.
    """
    return [volume for _, volume in iter_jobs(synth, jobs, on_progress)]


def iter_jobs(
    synth: Synthesiser, jobs: Sequence[Job], on_progress: OnProgress | None = None
) -> Iterator[tuple[Job, np.ndarray]]:
    """Sample the jobs ``cfg.sampler.batch_volumes`` at a time, yielding each ``(job, volume)`` as its batch ends.

    The windows of one batch's volumes share the network's batch (``sample_volumes``); only that
    batch's volumes are in memory, so a caller that writes each volume and drops it holds one
    batch whatever the cohort's size (issue 16). ``on_progress`` receives the job's index in ``jobs``.

    With ``synth.sample_chunks`` (workers), the same chunks are sampled there, and
    ``on_progress`` hears of each volume once, when its chunk comes back.

    Yields:
        each job with its ``[D, H, W]`` float32 volume in [-1, 1], in the order of ``jobs``.
    """
    cfg = synth.cfg
    batch = cfg.sampler.batch_volumes
    # chunks are sliced from ``jobs`` as they are needed: a lazy sequence
    # (``gem3d.data.spill.LazySequence``) then builds one chunk's arrays at a time
    firsts = range(0, len(jobs), batch)
    if synth.sample_chunks is not None:
        # the workers get a chunk's requests ahead of time; its jobs are sliced again to yield them
        results = synth.sample_chunks(_requests(jobs[first : first + batch]) for first in firsts)
        for number, (first, volumes) in enumerate(zip(firsts, results, strict=True)):
            chunk = jobs[first : first + batch]
            if on_progress is not None:
                for offset in range(len(chunk)):
                    on_progress(number * batch + offset, 1, 1)
            yield from zip(chunk, volumes, strict=True)
        return
    for number, first in enumerate(firsts):
        chunk = jobs[first : first + batch]
        progress = None if on_progress is None else _shifted_progress(on_progress, number * batch)
        volumes = sample_volumes(
            synth.volume_model, synth.sampler, _requests(chunk), cfg.data.window, cfg.sampler.overlap, batch, progress
        )
        yield from zip(chunk, volumes, strict=True)


def _requests(jobs: Sequence[Job]) -> list[SampleRequest]:
    """The sampler's requests for ``jobs`` (their model-grid masks, informed slices, starts, seeds)."""
    requests = []
    for job in jobs:
        assert job.target.label is not None
        requests.append(SampleRequest(job.target.label, job.informed, job.start, job.seed))
    return requests


def _shifted_progress(on_progress: OnProgress, offset: int) -> OnProgress:
    """``on_progress`` for a batch whose first volume is volume ``offset`` of the cohort."""

    def report(index: int, done: int, total: int) -> None:
        on_progress(offset + index, done, total)

    return report


def to_original(volume: np.ndarray, job: Job) -> tuple[np.ndarray, np.ndarray, CaseGeometry]:
    """A model-grid volume back in its mask's geometry and the informed source's intensity scale.

    Returns:
        image ``[X, Y, Z]`` float32, label ``[X, Y, Z]`` original values, and the geometry (affine).
    """
    low, high = job.intensity
    geometry = job.target.geometry.model_copy(update={"intensity_low": low, "intensity_high": high})
    image, label = to_original_grid(geometry, image=volume, label=job.target.label)
    assert image is not None and label is not None
    return image, label, geometry


def real_original(job: Job) -> np.ndarray | None:
    """The real image of a job's target in its original grid, if the job has one."""
    if job.target.image is None:
        return None
    return to_original_grid(job.target.geometry, image=job.target.image)[0]


def write_volume(path: Path, image: np.ndarray, geometry: CaseGeometry, provenance: dict[str, Any]) -> Path:
    """Write a synthetic NIfTI in ``geometry`` and its provenance JSON beside it (both atomic)."""
    save_nifti(path, image, geometry.affine_array)
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    write_json(path.with_name(f"{stem}.provenance.json"), provenance)
    return path


def add_job(writer: DatasetWriter, job: Job, volume: np.ndarray, with_real: bool) -> None:
    """``job``'s sampled model-grid volume ``[D, H, W]``, back on its case's own grid, as one case of ``writer``."""
    image, label, geometry = to_original(volume, job)
    real = real_original(job) if with_real else None
    writer.add(job.case_id, image, label, geometry, job.provenance, real)


def channel_name(cfg: Config) -> str:
    return "CT" if cfg.data.modality == "ct" else "MRI"


def informed_batch(cfg: Config) -> int:
    """Slices per call of the informed-slice generator: a volume batch's first window round.

    ``sampler.batch_volumes`` volumes of ``data.window`` slices each: no more slices than the
    volume sampler already puts through the network at once, whatever the cohort's size.
    """
    return cfg.sampler.batch_volumes * cfg.data.window


def generated_informed(
    synth: Synthesiser, masks: Sequence[np.ndarray], starts: Sequence[int], seeds: Sequence[int]
) -> list[InformedSlice]:
    """Informed slices from the run's generator, ``informed_batch`` per call; a clear error if the run has none."""
    if synth.informed_model is None:
        raise CheckpointError("this checkpoint has no informed-slice generator (train --stage informed first)")
    return generated_slices(synth.informed_model, synth.sampler, masks, starts, seeds, batch=informed_batch(synth.cfg))


def default_intensity(synth: Synthesiser) -> tuple[float, float]:
    """The intensity range to write generated appearance in when no real image gives one.

    CT: the HU window. MRI has no absolute scale, so [-1, 1] maps to [0, 1] (normalised units).
    """
    if synth.cfg.data.modality == "ct":
        return synth.cfg.data.ct_window
    return (0.0, 1.0)
