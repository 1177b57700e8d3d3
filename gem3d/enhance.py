"""Dataset enhancement: N new image/label pairs per case, from copied or generated informed slices,
random start positions and edited masks, written as one nnU-Net v2 raw dataset.

``plan_enhancement`` is the one planning step, shared by ``enhance``, the privacy release and
the downstream evaluation's arms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from gem3d.data.geometry import ModelGridCase
from gem3d.data.nnunet_raw import DatasetWriter, Preview, read_grid_cases
from gem3d.data.spill import InMemory, LazySequence, Spill, SpilledCase, Stored, spilled_volumes
from gem3d.data.volume import Volume
from gem3d.errors import DataError
from gem3d.informed import proportional_index, real_slice
from gem3d.sampler import InformedSlice, OnProgress
from gem3d.synthesis import Job, Synthesiser, add_job, channel_name, generated_informed, iter_jobs


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

    The cases and the planned masks wait in a temporary ``Spill`` while the volumes are sampled,
    so memory holds a sampler batch, whatever the number of cases (issue 16).

    Args:
        informed_kind: ``copy`` (another case's real slice at the proportional position) or ``generate``.
        edits: parsed mask edits (``gem3d.masks.parse_edits``), applied to each new pair's mask.
    Returns:
        the output dataset folder (nnU-Net v2 raw + provenance/).
    """
    if informed_kind not in ("copy", "generate"):
        raise DataError(f"--informed {informed_kind}: enhance takes copy or generate")
    with Spill.temporary() as spill:
        cases = read_grid_cases(data, synth.cfg, spill)
        if informed_kind == "copy" and len(cases) < 2:
            raise DataError(f"{data}: --informed copy needs at least two cases")
        jobs = enhancement_jobs(synth, cases, per_case, informed_kind, edits, seed, spill, preview is not None)
        return _write_jobs(synth, jobs, out, on_progress, preview)


@dataclass(frozen=True)
class PlannedPair:
    """One new image/label pair planned by ``plan_enhancement``, before sampling.

    Attributes:
        source: index of the case (in the sequence given) whose mask it starts from.
        number: which of that case's new pairs it is (0..per_case-1).
        label: the edited mask ``[D, H, W]`` uint8 (model grid): ``label.load()``; in memory, or
            in the planner's ``Spill``.
        start: the start slice (drawn uniformly over the labelled slices).
        seed: the sampler's seed for this pair.
        informed: its informed slice (``[H, W]``): generated, copied from another case, or the
            source case's own real slice at ``start``.
        mask_edits: one record per edit (``gem3d.masks.apply_edits``).
    """

    source: int
    number: int
    label: Stored
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
    spill: Spill | None = None,
) -> list[PlannedPair]:
    """Plan ``per_case`` new pairs per case: edited masks, random starts and informed slices.

    The one planning step of dataset enhancement (``enhance``, the privacy release and the
    downstream evaluation's arms): every random draw comes from ``numpy.random.default_rng(seed)``
    in case order, so a seed gives the same plan.

    Args:
        cases: model-grid cases (``image``, ``label`` ``[D, H, W]``): a list, or a sequence that
            loads a case when indexed (``gem3d.data.spill.spilled_volumes``); each case is indexed
            once for its own pairs and again only as a donor, and none is kept. Donors for
            ``copy`` and for the ``transplant`` edit are the other cases of this sequence only.
        informed_kind: ``copy`` (another case's real slice at the proportional position),
            ``generate`` (the run's informed-slice generator, drawn here) or ``own`` (the source
            case's own real slice at the start).
        edits: parsed mask edits (``gem3d.masks.parse_edits``), applied to each new pair's mask.
        spill: where the edited masks wait (``PlannedPair.label`` on disk); None keeps them in memory.
    """
    from gem3d.masks import apply_edits

    if informed_kind not in INFORMED_KINDS:
        raise DataError(f"--informed {informed_kind}: enhance takes {', '.join(INFORMED_KINDS)}")
    if informed_kind == "copy" and len(cases) < 2:
        raise DataError("--informed copy needs at least two cases")
    rng = np.random.default_rng(seed)
    drafts: list[_Draft] = []
    for index in range(len(cases)):
        case = cases[index]
        donors = _other_labels(cases, index)
        for n in range(per_case):
            label, applied = apply_edits(case.label, list(edits), synth.cfg.data.num_labels, rng, donors=donors)
            labelled = np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))
            start = int(rng.integers(labelled[0], labelled[-1] + 1)) if labelled.size else label.shape[0] // 2
            informed = None
            if informed_kind == "copy":
                donor = cases[int(rng.choice([i for i in range(len(cases)) if i != index]))]
                z = proportional_index(start, label.shape[0], donor.image.shape[0])
                informed = real_slice(donor, z, {"case": donor.case_id}, source="copy")
            elif informed_kind == "own":
                informed = real_slice(case, start, {"case": case.case_id}, source="real")
            kept: Stored = spill.put(label) if spill is not None else InMemory(label)
            drafts.append(_Draft(index, n, kept, start, applied, informed))
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=len(drafts))]
    if informed_kind == "generate":
        masks = LazySequence(len(drafts), lambda i: drafts[i].label.load())
        generated = generated_informed(synth, masks, [d.start for d in drafts], seeds)
        drafts = [replace(d, informed=slice_) for d, slice_ in zip(drafts, generated, strict=True)]
    pairs = []
    for draft, job_seed in zip(drafts, seeds, strict=True):
        assert draft.informed is not None
        pairs.append(
            PlannedPair(draft.source, draft.number, draft.label, draft.start, job_seed, draft.informed, draft.edits)
        )
    return pairs


@dataclass(frozen=True)
class _Draft:
    """A ``PlannedPair`` before its seed is drawn (and, for ``generate``, its informed slice)."""

    source: int
    number: int
    label: Stored
    start: int
    edits: list[dict[str, Any]]
    informed: InformedSlice | None


def _other_labels(cases: Sequence[Volume], skip: int) -> LazySequence[np.ndarray]:
    """The labels of every case but ``cases[skip]``, each read when indexed (the ``transplant`` donors)."""
    return LazySequence(len(cases) - 1, lambda i: cases[i if i < skip else i + 1].label)


def enhancement_jobs(
    synth: Synthesiser,
    cases: Sequence[SpilledCase],
    per_case: int,
    informed_kind: str,
    edits: Sequence[Any],
    seed: int,
    spill: Spill,
    with_images: bool = False,
) -> LazySequence[Job]:
    """The jobs of ``enhance``: ``plan_enhancement`` over ``cases`` (``read_grid_cases``), with their geometry.

    Every mask is edited before this returns; the edited masks wait in ``spill`` beside the
    cases, and each job's arrays are loaded when it is indexed, so ``spill`` must outlive the
    jobs (``with Spill.temporary() as spill: ...``). Generated informed slices are drawn here (on
    the model grid, ``job.informed.image`` ``[H, W]``, in memory), so a caller such as the release
    gate can check their pixels before anything is written. ``with_images`` loads each source
    case's real image into its job too (``job.target.image``, for a preview); the sampler does not
    need it.
    """
    plans = plan_enhancement(synth, spilled_volumes(cases), per_case, informed_kind, edits, seed, spill)
    return LazySequence(len(plans), lambda index: _enhancement_job(synth, cases, plans[index], with_images))


def _enhancement_job(synth: Synthesiser, cases: Sequence[SpilledCase], plan: PlannedPair, with_image: bool) -> Job:
    """The job of one planned pair, its mask (and with ``with_image`` its source's image) loaded from the spill."""
    case = cases[plan.source]
    geometry = case.geometry
    intensity = (geometry.intensity_low, geometry.intensity_high)
    provenance = synth.provenance(
        source_case=case.case_id,
        site=case.site,
        informed=plan.informed.provenance | {"kind": plan.informed.source},
        start=plan.start,
        seed=plan.seed,
        mask_edits=plan.mask_edits,
    )
    # the source case's real image rides along only for the preview; the sampler reads only the mask
    target = ModelGridCase(case.image.load() if with_image else None, plan.label.load(), geometry)
    new_id = f"{case.case_id}_syn{plan.number:03d}"
    return Job(new_id, target, plan.informed, plan.start, plan.seed, intensity, provenance)


def _write_jobs(
    synth: Synthesiser, jobs: Sequence[Job], out: Path, on_progress: OnProgress | None, preview: Preview | None
) -> Path:
    # each batch is written into the writer's work folder as it ends; the folder is renamed into
    # place only when every case is there (``DatasetWriter.finish``): never a half-written dataset
    with DatasetWriter(out, preview=preview) as writer:
        for job, volume in iter_jobs(synth, jobs, on_progress):
            add_job(writer, job, volume, preview is not None)
        return writer.finish(synth.cfg.data.num_labels, channel_name(synth.cfg))
