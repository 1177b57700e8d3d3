"""The three GEM-3D applications, composed from the sampler, informed-slice sources and mask edits.

* ``sample_from_mask``: one volume from a mask file and an informed-slice source (``gem3d sample``,
  and ``gem3d counterfactual`` with another patient's appearance or an edited mask).
* ``enhance``: N new image/label pairs per case, from copied or generated informed slices, random
  start positions and edited masks.
* ``deenhance``: every case regenerated from its own mask with one reference informed slice, so the
  appearance of a multi-site dataset is harmonised; reports intensity spread before and after.

Every output is written in the geometry of the mask it came from (affine, spacing, orientation),
with a provenance record: config, checkpoint hashes, seed, informed-slice source, start, edits.
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
from gem3d.data.geometry import CaseGeometry, ModelGridCase, mask_to_model_grid, to_model_grid, to_original_grid
from gem3d.data.nifti import read_image, save_nifti
from gem3d.data.nnunet_raw import DatasetWriter, Preview, read_grid_cases
from gem3d.data.volume import Volume
from gem3d.diffusion import Sampler, make_sampler
from gem3d.errors import CheckpointError, DataError
from gem3d.files import write_json
from gem3d.informed import (
    SourceKind,
    SourceSpec,
    generated_slices,
    model_slice_index,
    proportional_index,
    read_slice_file,
    real_slice,
)
from gem3d.networks import InformedSliceGenerator, SliceDenoiser
from gem3d.runs import STAGE_FILES, load_model, resolve_device
from gem3d.sampler import InformedSlice, OnProgress, SampleRequest, default_start, sample_volumes

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
    chunks = [jobs[first : first + batch] for first in range(0, len(jobs), batch)]
    if synth.sample_chunks is not None:
        results = synth.sample_chunks(_requests(chunk) for chunk in chunks)
        for number, (chunk, volumes) in enumerate(zip(chunks, results, strict=True)):
            if on_progress is not None:
                for offset in range(len(chunk)):
                    on_progress(number * batch + offset, 1, 1)
            yield from zip(chunk, volumes, strict=True)
        return
    for number, chunk in enumerate(chunks):
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


def informed_batch(cfg: Config) -> int:
    """Slices per call of the informed-slice generator: a volume batch's first window round.

    ``sampler.batch_volumes`` volumes of ``data.window`` slices each: no more slices than the
    volume sampler already puts through the network at once, whatever the cohort's size.
    """
    return cfg.sampler.batch_volumes * cfg.data.window


def generated_informed(
    synth: Synthesiser, masks: list[np.ndarray], starts: list[int], seeds: list[int]
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


def _same_grid(path: Path, geometry: CaseGeometry) -> bool:
    from gem3d.data.nifti import read_header

    header = read_header(path)
    return header.spatial_shape == tuple(geometry.shape) and np.allclose(
        header.affine, geometry.affine_array, atol=1e-3
    )


def _informed_for(
    synth: Synthesiser, source: SourceSpec, target: ModelGridCase, start: int | None, seed: int
) -> tuple[InformedSlice, tuple[float, float], int]:
    """The informed slice for one target, the intensity range to write in, and its natural start.

    ``real`` on the target's own grid (the same patient) takes slice Z of that image; ``real`` on
    another grid (another patient's appearance) takes its slice Z and starts at the same relative
    position of the target.
    """
    assert target.label is not None
    cfg = synth.cfg.data
    depth = target.label.shape[0]
    if source.kind == "real":
        assert source.path is not None
        record = {"kind": "real", "file": source.path.name, "index": source.index}
        if target.image is not None:
            z = (
                model_slice_index(source.index, target.geometry, f"--informed {source.path}@{source.index}")
                if source.index is not None
                else default_start(target.label)
            )
            geometry = target.geometry
            return real_slice(target, z, record), (geometry.intensity_low, geometry.intensity_high), z
        image, header = read_image(source.path)
        other = to_model_grid(image, None, header.affine, cfg, source=str(source.path))
        assert other.image is not None
        d_other = other.image.shape[0]
        z_other = (
            model_slice_index(source.index, other.geometry, f"--informed {source.path}@{source.index}")
            if source.index is not None
            else d_other // 2
        )
        informed = InformedSlice(other.image[z_other], None, "real", record)
        intensity = (other.geometry.intensity_low, other.geometry.intensity_high)
        return informed, intensity, proportional_index(z_other, d_other, depth)
    if source.kind == "file":
        assert source.path is not None
        informed, intensity = read_slice_file(source.path, cfg)
        return informed, intensity, default_start(target.label)
    if source.kind == "generate":
        z = start if start is not None else default_start(target.label)
        (informed,) = generated_informed(synth, [target.label], [z], [seed])
        return informed, default_intensity(synth), z
    raise DataError(f"--informed {source.kind}: not available for a single mask (use real:, file: or generate)")


def mask_job(
    synth: Synthesiser,
    mask_path: Path,
    source: SourceSpec,
    start: int | None,
    seed: int,
    edit: Callable[[np.ndarray], tuple[np.ndarray, list[dict[str, Any]]]] | None = None,
) -> Job:
    """The job for ``gem3d sample`` / ``counterfactual``: a mask file and an informed source.

    Args:
        start: the start slice as a canonical voxel index along the slice axis; None takes the
            informed slice's own position (``real``) or the middle of the labelled slices.
        edit: maps the model-grid mask ``[D, H, W]`` to (edited mask, provenance of the edits).
    """
    cfg = synth.cfg.data
    target = mask_to_model_grid(mask_path, cfg)
    if source.kind == "real" and source.path is not None and _same_grid(source.path, target.geometry):
        # The same patient's image: map image and mask onto one model grid, so slice z matches.
        from gem3d.data.nifti import read_label

        image, _ = read_image(source.path)
        label, _ = read_label(mask_path)
        target = to_model_grid(image, label, target.geometry.affine_array, cfg, source=str(mask_path))
    assert target.label is not None
    applied: list[dict[str, Any]] = []
    if edit is not None:
        label, applied = edit(target.label)
        target = ModelGridCase(target.image, label, target.geometry)
    z = model_slice_index(start, target.geometry, f"--start {start} of {mask_path}") if start is not None else None
    informed, intensity, natural = _informed_for(synth, source, target, z, seed)
    start_model = z if z is not None else natural
    provenance = synth.provenance(
        mask=mask_path.name,
        informed=informed.provenance | {"kind": informed.source},
        start=start_model,
        seed=seed,
        mask_edits=applied,
    )
    return Job(mask_path.name, target, informed, start_model, seed, intensity, provenance)


def write_volume(path: Path, image: np.ndarray, geometry: CaseGeometry, provenance: dict[str, Any]) -> Path:
    """Write a synthetic NIfTI in ``geometry`` and its provenance JSON beside it (both atomic)."""
    save_nifti(path, image, geometry.affine_array)
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    write_json(path.with_name(f"{stem}.provenance.json"), provenance)
    return path


# ---------------------------------------------------------------------------------------------
# Datasets in, datasets out (nnU-Net v2 raw layout).


def _channel_name(cfg: Config) -> str:
    return "CT" if cfg.data.modality == "ct" else "MRI"


def enhance(
    synth: Synthesiser,
    data: Path,
    out: Path,
    per_case: int,
    informed_kind: str,
    edits: Sequence[Any] = (),
    seed: int = 0,
    on_progress: OnProgress | None = None,
    preview: Preview | None = None,
) -> Path:
    """N new image/label pairs per case: edited masks, random starts, copied or generated informed slices.

    Args:
        informed_kind: ``copy`` (another case's real slice at the proportional position) or ``generate``.
        edits: parsed mask edits (``gem3d.masks.parse_edits``), applied to each new pair's mask.
    Returns:
        the output dataset folder (nnU-Net v2 raw + provenance/).
    """
    jobs = enhancement_jobs(synth, data, per_case, informed_kind, edits, seed)
    return _write_jobs(synth, jobs, out, on_progress, preview)


@dataclass(frozen=True)
class PlannedPair:
    """One new image/label pair planned by ``plan_enhancement``, before sampling.

    Attributes:
        source: index of the case (in the list given) whose mask it starts from.
        number: which of that case's new pairs it is (0..per_case-1).
        label: the edited mask ``[D, H, W]`` uint8 (model grid).
        start: the start slice (drawn uniformly over the labelled slices).
        seed: the sampler's seed for this pair.
        informed: its informed slice (``[H, W]``): generated, copied from another case, or the
            source case's own real slice at ``start``.
        mask_edits: one record per edit (``gem3d.masks.apply_edits``).
    """

    source: int
    number: int
    label: np.ndarray
    start: int
    seed: int
    informed: InformedSlice
    mask_edits: list[dict[str, Any]]


INFORMED_KINDS = ("copy", "generate", "own")


def plan_enhancement(
    synth: Synthesiser,
    cases: Sequence[Volume],
    per_case: int,
    informed_kind: str,
    edits: Sequence[Any] = (),
    seed: int = 0,
) -> list[PlannedPair]:
    """Plan ``per_case`` new pairs per case: edited masks, random starts and informed slices.

    The one planning step of dataset enhancement (``enhance``, the privacy release and the
    downstream evaluation's arms): every random draw comes from ``numpy.random.default_rng(seed)``
    in case order, so a seed gives the same plan.

    Args:
        cases: model-grid cases (``image``, ``label`` ``[D, H, W]``); donors for ``copy`` and for
            the ``transplant`` edit are the other cases of this list only.
        informed_kind: ``copy`` (another case's real slice at the proportional position),
            ``generate`` (the run's informed-slice generator, drawn here) or ``own`` (the source
            case's own real slice at the start).
        edits: parsed mask edits (``gem3d.masks.parse_edits``), applied to each new pair's mask.
    """
    from gem3d.masks import apply_edits

    if informed_kind not in INFORMED_KINDS:
        raise DataError(f"--informed {informed_kind}: enhance takes {', '.join(INFORMED_KINDS)}")
    if informed_kind == "copy" and len(cases) < 2:
        raise DataError("--informed copy needs at least two cases")
    rng = np.random.default_rng(seed)
    plans: list[tuple[int, int, np.ndarray, int, list[dict[str, Any]], int | None]] = []
    for index, case in enumerate(cases):
        donors = [c.label for c in cases if c is not case]
        for n in range(per_case):
            label, applied = apply_edits(case.label, list(edits), synth.cfg.data.num_labels, rng, donors=donors)
            labelled = np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))
            start = int(rng.integers(labelled[0], labelled[-1] + 1)) if labelled.size else label.shape[0] // 2
            donor = int(rng.choice([i for i in range(len(cases)) if i != index])) if informed_kind == "copy" else None
            plans.append((index, n, label, start, applied, donor))
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=len(plans))]
    if informed_kind == "generate":
        informed = generated_informed(synth, [p[2] for p in plans], [p[3] for p in plans], seeds)
    else:
        informed = []
        for index, _, label, start, _, donor in plans:
            source = cases[donor if donor is not None else index]
            z = proportional_index(start, label.shape[0], source.image.shape[0]) if donor is not None else start
            kind: SourceKind = "copy" if donor is not None else "real"
            informed.append(real_slice(source, z, {"case": source.case_id}, source=kind))
    return [
        PlannedPair(index, n, label, start, job_seed, slice_, applied)
        for (index, n, label, start, applied, _), slice_, job_seed in zip(plans, informed, seeds, strict=True)
    ]


def enhancement_jobs(
    synth: Synthesiser, data: Path, per_case: int, informed_kind: str, edits: Sequence[Any] = (), seed: int = 0
) -> list[Job]:
    """The jobs of ``enhance``: ``plan_enhancement`` over every case of ``data``, with their geometry.

    Generated informed slices are drawn here (on the model grid, ``job.informed.image`` ``[H, W]``),
    so a caller such as the release gate can check their pixels before anything is written.
    """
    if informed_kind not in ("copy", "generate"):
        raise DataError(f"--informed {informed_kind}: enhance takes copy or generate")
    cases = read_grid_cases(data, synth.cfg)
    if informed_kind == "copy" and len(cases) < 2:
        raise DataError(f"{data}: --informed copy needs at least two cases")
    grids = []
    for case in cases:
        assert case.grid.image is not None and case.grid.label is not None
        grids.append(Volume(case.case_id, case.grid.image, case.grid.label))
    jobs = []
    for plan in plan_enhancement(synth, grids, per_case, informed_kind, edits, seed):
        case = cases[plan.source]
        geometry = case.grid.geometry
        intensity = (geometry.intensity_low, geometry.intensity_high)
        provenance = synth.provenance(
            source_case=case.case_id,
            site=case.site,
            informed=plan.informed.provenance | {"kind": plan.informed.source},
            start=plan.start,
            seed=plan.seed,
            mask_edits=plan.mask_edits,
        )
        # the source case's real image rides along for the preview; the sampler reads only the mask
        target = ModelGridCase(case.grid.image, plan.label, geometry)
        new_id = f"{case.case_id}_syn{plan.number:03d}"
        jobs.append(Job(new_id, target, plan.informed, plan.start, plan.seed, intensity, provenance))
    return jobs


def real_original(job: Job) -> np.ndarray | None:
    """The real image of a job's target in its original grid, if the job has one."""
    if job.target.image is None:
        return None
    return to_original_grid(job.target.geometry, image=job.target.image)[0]


def _write_jobs(
    synth: Synthesiser, jobs: Sequence[Job], out: Path, on_progress: OnProgress | None, preview: Preview | None
) -> Path:
    # each batch is written into the writer's work folder as it ends; the folder is renamed into
    # place only when every case is there (``DatasetWriter.finish``): never a half-written dataset
    with DatasetWriter(out, preview=preview) as writer:
        for job, volume in iter_jobs(synth, jobs, on_progress):
            _write_job(writer, job, volume, preview is not None)
        return writer.finish(synth.cfg.data.num_labels, _channel_name(synth.cfg))


def _write_job(writer: DatasetWriter, job: Job, volume: np.ndarray, with_real: bool) -> None:
    """``job``'s sampled model-grid volume ``[D, H, W]``, back on its case's own grid, as one case of ``writer``."""
    image, label, geometry = to_original(volume, job)
    real = real_original(job) if with_real else None
    writer.add(job.case_id, image, label, geometry, job.provenance, real)


def label_means(image: np.ndarray, label: np.ndarray, num_labels: int) -> list[float | None]:
    """Mean intensity of each label id (None where absent); ``image``, ``label`` ``[D, H, W]``."""
    return [float(image[label == k].mean()) if (label == k).any() else None for k in range(num_labels)]


def site_spread(per_case: list[dict[str, Any]], key: str, num_labels: int) -> dict[str, Any]:
    """Across sites: the std of site-mean per-label intensities, per foreground label and averaged."""
    sites = sorted({c["site"] for c in per_case})
    spread = {}
    for k in range(1, num_labels):
        site_means = []
        for site in sites:
            values = [c[key][k] for c in per_case if c["site"] == site and c[key][k] is not None]
            if values:
                site_means.append(float(np.mean(values)))
        spread[str(k)] = float(np.std(site_means)) if len(site_means) > 1 else 0.0
    return {"per_label": spread, "mean": float(np.mean(list(spread.values()))) if spread else 0.0, "sites": sites}


def deenhance(
    synth: Synthesiser,
    data: Path,
    out: Path,
    reference: SourceSpec,
    seed: int = 0,
    on_progress: OnProgress | None = None,
    preview: Preview | None = None,
) -> dict[str, Any]:
    """Regenerate every case from its own mask with one reference informed slice.

    Per-label mean intensities are measured on the model grid (normalised [-1, 1] units) for
    every case before (real) and after (synthetic); the report gives the spread of site means
    before and after, and the relative reduction.

    Returns:
        the report (also written to ``out/deenhance_report.json``).
    """
    if reference.kind != "real" or reference.path is None:
        raise DataError("--reference must be IMAGE.nii.gz[@Z]")
    cfg = synth.cfg
    cases = read_grid_cases(data, cfg)
    base, z_ref, depth, intensity = _reference_slice(reference, cfg)
    rng = np.random.default_rng(seed)
    jobs = []
    for case in cases:
        assert case.grid.label is not None
        start = proportional_index(z_ref, depth, case.grid.label.shape[0])
        job_seed = int(rng.integers(0, 2**31 - 1))
        provenance = synth.provenance(
            source_case=case.case_id,
            site=case.site,
            informed=base.provenance,
            start=start,
            seed=job_seed,
            mask_edits=[],
        )
        jobs.append(Job(case.case_id, case.grid, base, start, job_seed, intensity, provenance))
    num_labels = cfg.data.num_labels
    with DatasetWriter(out, preview=preview) as writer:
        per_case = []
        for (job, volume), case in zip(iter_jobs(synth, jobs, on_progress), cases, strict=True):
            assert case.grid.image is not None and case.grid.label is not None
            per_case.append(
                {
                    "case": case.case_id,
                    "site": case.site,
                    "before": label_means(case.grid.image, case.grid.label, num_labels),
                    "after": label_means(volume, case.grid.label, num_labels),
                }
            )
            _write_job(writer, job, volume, preview is not None)
        report = _deenhance_report(base, per_case, num_labels)
        writer.add_file("deenhance_report.json", report)
        writer.finish(num_labels, _channel_name(cfg))
    return report


def _reference_slice(reference: SourceSpec, cfg: Config) -> tuple[InformedSlice, int, int, tuple[float, float]]:
    """``deenhance``'s one informed slice: the reference image's slice ``reference.index`` (default its middle).

    Returns:
        the slice on the model grid, its index and the reference's depth there, and its intensity range.
    """
    assert reference.path is not None
    image, header = read_image(reference.path)
    ref = to_model_grid(image, None, header.affine, cfg.data, source=str(reference.path))
    assert ref.image is not None
    where = f"--reference {reference.path}@{reference.index}"
    z_ref = (
        model_slice_index(reference.index, ref.geometry, where)
        if reference.index is not None
        else ref.image.shape[0] // 2
    )
    base = InformedSlice(
        ref.image[z_ref], None, "real", {"kind": "reference", "file": reference.path.name, "index": reference.index}
    )
    return base, z_ref, ref.image.shape[0], (ref.geometry.intensity_low, ref.geometry.intensity_high)


def _deenhance_report(base: InformedSlice, per_case: list[dict[str, Any]], num_labels: int) -> dict[str, Any]:
    """The spread of site-mean label intensities before and after, and its relative reduction."""
    before = site_spread(per_case, "before", num_labels)
    after = site_spread(per_case, "after", num_labels)
    return {
        "units": "model grid, intensities normalised to [-1, 1]",
        "reference": base.provenance,
        "cases": per_case,
        "site_spread_before": before,
        "site_spread_after": after,
        "spread_reduction": 1.0 - after["mean"] / before["mean"] if before["mean"] > 0 else 0.0,
    }
