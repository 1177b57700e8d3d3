"""One volume from a mask file and an informed-slice source: ``gem3d sample`` and ``gem3d counterfactual``.

A counterfactual is the same job with another patient's appearance (``real:`` on another grid)
or an edited mask (``edit``). ``mask_job`` plans it; ``gem3d.synthesis`` samples and writes it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gem3d.data.geometry import CaseGeometry, ModelGridCase, mask_to_model_grid, to_model_grid
from gem3d.data.nifti import read_image
from gem3d.errors import DataError
from gem3d.informed import SourceSpec, model_slice_index, proportional_index, read_slice_file, real_slice
from gem3d.sampler import InformedSlice, default_start
from gem3d.synthesis import Job, Synthesiser, default_intensity, generated_informed


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
