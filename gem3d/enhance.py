"""Dataset enhancement: N new image/label pairs per case, from copied or generated informed slices,
random start positions and edited masks, written as one nnU-Net v2 raw dataset.

``plan_enhancement`` is the one planning step, shared by ``enhance``, the privacy release and
the downstream evaluation's arms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gem3d.data.geometry import ModelGridCase
from gem3d.data.nnunet_raw import DatasetWriter, Preview, read_grid_cases
from gem3d.data.volume import Volume
from gem3d.errors import DataError
from gem3d.informed import SourceKind, proportional_index, real_slice
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


def _write_jobs(
    synth: Synthesiser, jobs: Sequence[Job], out: Path, on_progress: OnProgress | None, preview: Preview | None
) -> Path:
    # each batch is written into the writer's work folder as it ends; the folder is renamed into
    # place only when every case is there (``DatasetWriter.finish``): never a half-written dataset
    with DatasetWriter(out, preview=preview) as writer:
        for job, volume in iter_jobs(synth, jobs, on_progress):
            add_job(writer, job, volume, preview is not None)
        return writer.finish(synth.cfg.data.num_labels, channel_name(synth.cfg))
