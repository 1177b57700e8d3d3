"""Informed-slice sources: where a synthetic volume's appearance comes from.

* ``real:IMAGE.nii.gz[@Z]``: slice Z of a real volume (Z is the voxel index along the slice axis
  of the canonical, RAS+ volume; default: the middle of its foreground).
* ``copy``: another case's slice at the proportional position (dataset commands).
* ``file:PATH``: a user's 2D image (NIfTI, or PNG/JPEG read as greyscale).
* ``generate``: the informed-slice generator at the start position, given the mask slice.

Only ``generate`` carries no real patient's pixels, so only it is allowed in a privacy release.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from gem3d.config import DataConfig
from gem3d.data.geometry import CaseGeometry, intensity_range
from gem3d.diffusion import Sampler
from gem3d.errors import DataError
from gem3d.networks import InformedSliceGenerator
from gem3d.sampler import InformedSlice, generate_informed_slices

SourceKind = Literal["real", "copy", "file", "generate"]
SOURCE_KINDS: tuple[SourceKind, ...] = ("real", "copy", "file", "generate")


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``--informed`` argument."""

    kind: SourceKind
    path: Path | None = None
    index: int | None = None


def parse_source(spec: str, allowed: tuple[SourceKind, ...] = SOURCE_KINDS, option: str = "--informed") -> SourceSpec:
    """Parse ``real:IMAGE[@Z]``, ``file:PATH``, ``generate`` or ``copy``; else ``DataError`` naming ``option``.

    ``Z`` is a voxel index from 0 (a negative one would silently count from the end: refused).
    """
    kind, _, rest = spec.partition(":")
    if kind not in allowed:
        raise DataError(f"{option} {spec}: unknown source '{kind}' (allowed: {', '.join(allowed)})")
    if kind in ("generate", "copy"):
        if rest:
            raise DataError(f"{option} {spec}: '{kind}' takes no argument")
        return SourceSpec(kind)  # type: ignore[arg-type]
    if not rest:
        raise DataError(f"{option} {spec}: '{kind}' needs a path, e.g. {kind}:IMAGE.nii.gz")
    index = None
    if kind == "real" and "@" in rest:
        rest, _, z = rest.rpartition("@")
        try:
            index = int(z)
        except ValueError:
            raise DataError(f"{option} {spec}: slice index '{z}' is not an integer") from None
        if index < 0:
            raise DataError(f"{option} {spec}: slice index {index}: expected a voxel index >= 0")
    path = Path(rest)
    if path.is_dir():
        raise DataError(f"{option} {spec}: {path} is a folder, an image file was expected")
    if not path.is_file():
        raise DataError(f"{option} {spec}: {path}: informed-slice file not found")
    return SourceSpec(kind, path, index)  # type: ignore[arg-type]


def model_slice_index(z: int, geometry: CaseGeometry, where: str = "slice") -> int:
    """A canonical voxel index along the slice axis -> the model-grid slice that covers it.

    Args:
        where: the option and file the index came from, for the message (``--informed x.nii.gz@9``).
    """
    axis = geometry.slice_axis
    lo, hi = geometry.box_lo[axis], geometry.box_hi[axis]
    if not lo <= z < hi:
        raise DataError(
            f"{where}: slice {z} is outside what the model sees of this volume along the slice axis: slices "
            f"{lo}..{hi - 1} (the anatomy's box with its margin; slices beyond it hold no foreground)"
        )
    return min(int((z - lo) * geometry.model_shape[0] / (hi - lo)), geometry.model_shape[0] - 1)


def proportional_index(z: int, depth_from: int, depth_to: int) -> int:
    """Slice ``z`` of a ``depth_from`` volume -> the slice at the same relative position of ``depth_to``."""
    if depth_from <= 1 or depth_to <= 1:
        return 0 if depth_to <= 1 else depth_to // 2
    return round(z / (depth_from - 1) * (depth_to - 1))


class ImageAndLabel(Protocol):
    """A model-grid case: ``image`` and ``label`` ``[D, H, W]`` (``ModelGridCase`` or ``Volume``)."""

    @property
    def image(self) -> np.ndarray | None: ...

    @property
    def label(self) -> np.ndarray | None: ...


def real_slice(
    case: ImageAndLabel, z: int, provenance: Mapping[str, object], source: SourceKind = "real"
) -> InformedSlice:
    """Slice ``z`` (model grid) of a real case, with its mask slice when the case has labels.

    ``source`` is ``real`` (the same patient or a chosen image) or ``copy`` (another case of a dataset).
    """
    if case.image is None:
        raise ValueError("a real informed slice needs the case's image")
    # copies, not views: a view would keep the whole case alive for as long as the slice lives
    mask = np.array(case.label[z]) if case.label is not None else None
    image = np.array(case.image[z])
    return InformedSlice(image=image, mask=mask, source=source, provenance={**provenance, "model_index": z})


def read_slice_file(path: Path, cfg: DataConfig) -> tuple[InformedSlice, tuple[float, float]]:
    """A user's 2D image as an informed slice, resized to the model's slice size.

    Returns:
        the slice (``[H, W]`` in [-1, 1], no mask), and the (low, high) intensities that map to -1, 1.
    """
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            data = np.asarray(nib.Nifti1Image.from_filename(str(path)).get_fdata(dtype=np.float32))
            data = data.reshape([n for n in data.shape if n > 1] or [1])
        else:
            from PIL import Image

            data = np.asarray(Image.open(path).convert("F"), dtype=np.float32)
    except Exception as error:  # PIL and nibabel raise many types for broken files
        raise DataError(f"{path}: cannot read the informed slice ({type(error).__name__}: {error})") from None
    if data.ndim != 2:
        raise DataError(f"{path}: an informed slice must be 2D, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: contains NaN or Inf pixels")
    low, high = intensity_range(data, cfg)
    scaled = np.clip((data - low) / (high - low), 0.0, 1.0) * 2.0 - 1.0
    resized = F.interpolate(
        torch.from_numpy(scaled)[None, None], size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True
    )[0, 0].numpy()
    return InformedSlice(resized.astype(np.float32), None, "file", {"file": path.name}), (low, high)


def generated_slices(
    model: InformedSliceGenerator,
    sampler: Sampler,
    masks: Sequence[np.ndarray],
    starts: Sequence[int],
    seeds: Sequence[int],
    *,
    batch: int,
) -> list[InformedSlice]:
    """Informed slices from the generator, one per (mask volume ``[D, H, W]``, start, seed).

    The network sees at most ``batch`` slices per call, so memory is flat in the number of slices
    (issue 16). Each slice draws its noise from its own seeded generator, so the chunking changes
    no draw; only the network's float rounding may change with the batch size (about 1e-7: MONAI's
    time-embedding ``Linear`` picks its GEMM kernel by batch rows), as in ``sample_volumes``.

    Returns:
        one slice per mask: ``image`` ``[H, W]`` in [-1, 1], ``mask`` the mask's slice at the start.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    seeds = list(seeds)
    if len(seeds) != len(masks) or len(starts) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(starts)} starts and {len(seeds)} seeds")
    # each mask is indexed once and only its start slice kept (a copy: a view would keep the
    # whole volume alive), so ``masks`` may be a sequence that loads each volume when indexed
    positions, mask_slices = [], []
    for index, start in enumerate(starts):
        mask = masks[index]
        positions.append(start / max(mask.shape[0] - 1, 1))
        mask_slices.append(np.array(mask[start]))
    images: list[np.ndarray] = []
    for first in range(0, len(masks), batch):
        rows = slice(first, first + batch)
        size = (int(mask_slices[first].shape[0]), int(mask_slices[first].shape[1]))
        images += generate_informed_slices(model, sampler, positions[rows], mask_slices[rows], seeds[rows], size)
    return [
        InformedSlice(image, mask_slice, "generate", {"position": round(position, 4), "seed": seed})
        for image, mask_slice, position, seed in zip(images, mask_slices, positions, seeds, strict=True)
    ]
