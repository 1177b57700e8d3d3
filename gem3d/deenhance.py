"""Dataset-level de-enhancement: every case regenerated from its own mask with one reference
informed slice, so the appearance of a multi-site dataset is harmonised; the report gives the
spread of site-mean label intensities before and after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gem3d.config import Config
from gem3d.data.geometry import to_model_grid
from gem3d.data.nifti import read_image
from gem3d.data.nnunet_raw import DatasetWriter, Preview, read_grid_cases
from gem3d.data.spill import LazySequence, Spill
from gem3d.errors import DataError
from gem3d.informed import SourceSpec, model_slice_index, proportional_index
from gem3d.sampler import InformedSlice, OnProgress
from gem3d.synthesis import Job, Synthesiser, add_job, channel_name, iter_jobs


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
    with Spill.temporary() as spill:
        # the cases wait on disk: memory holds a sampler batch, whatever their number (issue 16)
        cases = read_grid_cases(data, cfg, spill)
        base, z_ref, depth, intensity = _reference_slice(reference, cfg)
        rng = np.random.default_rng(seed)
        starts, seeds = [], []
        for case in cases:
            # the depth is the model-grid label's first axis, recorded in the geometry
            starts.append(proportional_index(z_ref, depth, case.geometry.model_shape[0]))
            seeds.append(int(rng.integers(0, 2**31 - 1)))

        def build(index: int) -> Job:
            case = cases[index]
            provenance = synth.provenance(
                source_case=case.case_id,
                site=case.site,
                informed=base.provenance,
                start=starts[index],
                seed=seeds[index],
                mask_edits=[],
            )
            return Job(case.case_id, case.grid(), base, starts[index], seeds[index], intensity, provenance)

        jobs = LazySequence(len(cases), build)
        num_labels = cfg.data.num_labels
        with DatasetWriter(out, preview=preview) as writer:
            per_case = []
            for (job, volume), case in zip(iter_jobs(synth, jobs, on_progress), cases, strict=True):
                assert job.target.image is not None and job.target.label is not None
                per_case.append(
                    {
                        "case": case.case_id,
                        "site": case.site,
                        "before": label_means(job.target.image, job.target.label, num_labels),
                        "after": label_means(volume, job.target.label, num_labels),
                    }
                )
                add_job(writer, job, volume, preview is not None)
            report = _deenhance_report(base, per_case, num_labels)
            writer.add_file("deenhance_report.json", report)
            writer.finish(num_labels, channel_name(cfg))
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
