"""The model grid and the way back: every case remembers how it was cut, so outputs keep their geometry.

Forward (``to_model_grid``), for a volume ``[X, Y, Z]`` with affine ``A``:

1. reorient to the closest canonical (RAS+) voxel order (nibabel ``io_orientation``);
2. take a box: the foreground (image signal, see ``signal_threshold``, or labels) plus a margin,
   grown in-plane to a square field of view in mm (so anatomy keeps its aspect ratio); the box may
   reach past the volume, which is then padded with the background value. With
   ``data.field_of_view_mm`` the in-plane box is that many mm, centred on the foreground, for
   every case and for a mask on its own alike: a liver or tumour mask then lands at the in-plane
   scale of the training data (a mask's own box would stretch the structure to fill the slice);
3. move ``slice_axis`` first and resize the box to ``[D, image_size, image_size]`` (MONAI
   ``Resize``: trilinear with anti-aliasing for images, nearest for labels). D is the box's depth,
   or its depth resampled to ``target_spacing[slice_axis]`` when a target spacing is set; in-plane
   the spacing follows from the square field of view and ``image_size``;
4. map intensities to [-1, 1]: MRI by the case's (low, high) percentiles, CT by the HU window;
5. map label values to contiguous ids 0..L-1 with a label table (``label_values[id] = value``).

Inverse (``to_original_grid``): undo 5..1 and return arrays in the original voxel order, shape and
intensity scale, to be written with ``CaseGeometry.affine``. The reference implementation wrote
every output with an identity affine and lost the spacing; this is the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Resize, ScaleIntensityRange
from monai.transforms.utils import generate_spatial_bounding_box
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from pydantic import BaseModel, ConfigDict

from gem3d.config import DataConfig
from gem3d.data.nifti import read_label, spacing_of
from gem3d.errors import DataError

Triple = tuple[int, int, int]
CT_BODY_HU = -500.0
MRI_SIGNAL_FRACTION = 0.1


class CaseGeometry(BaseModel):
    """How one case maps between its original grid and the model grid (JSON-serialisable).

    Attributes:
        affine: the original ``[4, 4]`` voxel -> world affine (mm, RAS+).
        shape: the original spatial shape ``(X, Y, Z)``.
        spacing: the original voxel sizes in mm.
        box_lo, box_hi: the box in the canonical voxel grid, ``[lo, hi)`` per axis; may extend past
            the volume (padding).
        slice_axis: the canonical axis that became D.
        model_shape: ``(D, H, W)`` of the model-grid arrays.
        modality: ``mri`` or ``ct``.
        intensity_low, intensity_high: the original intensities mapped to -1 and 1.
        background: the original intensity written outside the box when mapping back.
        label_values: the original label value of each contiguous id (``label_values[0]`` is 0).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    affine: tuple[tuple[float, float, float, float], ...]
    shape: Triple
    spacing: tuple[float, float, float]
    box_lo: Triple
    box_hi: Triple
    slice_axis: int
    model_shape: Triple
    modality: str
    intensity_low: float
    intensity_high: float
    background: float
    label_values: tuple[int, ...]

    @property
    def affine_array(self) -> np.ndarray:
        return np.array(self.affine, dtype=np.float64)

    @property
    def canonical_affine(self) -> np.ndarray:
        """``[4, 4]`` affine of the canonical (RAS+) voxel grid."""
        ornt = io_orientation(self.affine_array)
        return self.affine_array @ inv_ornt_aff(ornt, self.shape)

    @property
    def model_affine(self) -> np.ndarray:
        """``[4, 4]`` voxel -> world affine of a model-grid array ``[D, H, W]``.

        Resizing uses half-pixel centres (``align_corners=False``): model index i sits at box
        coordinate ``(i + 0.5) * n_box / n_model - 0.5``.
        """
        axes = model_axes(self.slice_axis)
        to_canonical = np.zeros((4, 4))
        for model_axis, axis in enumerate(axes):
            scale = (self.box_hi[axis] - self.box_lo[axis]) / self.model_shape[model_axis]
            to_canonical[axis, model_axis] = scale
            to_canonical[axis, 3] = self.box_lo[axis] + 0.5 * scale - 0.5
        to_canonical[3, 3] = 1.0
        return self.canonical_affine @ to_canonical


@dataclass(frozen=True)
class ModelGridCase:
    """A case on the model grid.

    Attributes:
        image: ``[D, H, W]`` float32 in [-1, 1], or None when only a mask was given.
        label: ``[D, H, W]`` uint8 contiguous ids, or int64 original values before a label table is known.
    """

    image: np.ndarray | None
    label: np.ndarray | None
    geometry: CaseGeometry


def model_axes(slice_axis: int) -> tuple[int, int, int]:
    """Canonical axes in model order: the slice axis, then the other two in order."""
    first, second = (a for a in range(3) if a != slice_axis)
    return (slice_axis, first, second)


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder ``[X, Y, Z]`` voxels to the closest RAS+ order; returns the array and its affine."""
    ornt = io_orientation(affine)
    return apply_orientation(data, ornt), affine @ inv_ornt_aff(ornt, data.shape[:3])


def from_canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of ``to_canonical``: a canonical-order array back to the voxel order of ``affine``."""
    ornt = io_orientation(affine)
    back = ornt_transform(np.array([[0, 1], [1, 1], [2, 1]], dtype=float), ornt)
    return apply_orientation(data, back)


def _extract(data: np.ndarray, lo: Sequence[int], hi: Sequence[int], fill: float) -> np.ndarray:
    """``data[lo:hi]`` where the box may reach past the array, padded with ``fill``."""
    out = np.full(tuple(h - low for low, h in zip(lo, hi, strict=True)), fill, dtype=data.dtype)
    src = tuple(slice(max(low, 0), min(h, n)) for low, h, n in zip(lo, hi, data.shape, strict=True))
    dst = tuple(slice(s.start - low, s.stop - low) for s, low in zip(src, lo, strict=True))
    out[dst] = data[src]
    return out


def _paste(box: np.ndarray, lo: Sequence[int], shape: Sequence[int], fill: float) -> np.ndarray:
    """Inverse of ``_extract``: a full array of ``shape`` holding ``box`` at ``lo``."""
    out = np.full(tuple(shape), fill, dtype=box.dtype)
    dst = tuple(slice(max(low, 0), min(low + b, n)) for low, b, n in zip(lo, box.shape, shape, strict=True))
    src = tuple(slice(d.start - low, d.stop - low) for d, low in zip(dst, lo, strict=True))
    out[dst] = box[src]
    return out


def foreground_box(
    image: np.ndarray | None, label: np.ndarray | None, margin: int, threshold: float | None = None
) -> tuple[list[int], list[int]]:
    """``[lo, hi)`` of voxels with image signal or a label, plus ``margin``.

    Signal is ``image > threshold``, or above the image minimum when ``threshold`` is None (MRI:
    zero background, as nnU-Net's non-zero crop).
    """
    reference = image if image is not None else label
    assert reference is not None
    mask = np.zeros(reference.shape, dtype=bool)
    if image is not None:
        mask |= image > (image.min() if threshold is None else threshold)
    if label is not None:
        mask |= label > 0
    if not mask.any():
        return [0, 0, 0], list(reference.shape)
    lo, hi = generate_spatial_bounding_box(mask[None], margin=margin)
    return [int(v) for v in lo], [int(v) for v in hi]


def signal_threshold(image: np.ndarray | None, cfg: DataConfig) -> float | None:
    """Intensity above which a voxel is signal, for the foreground crop.

    CT: -500 HU (air is about -1000 HU and scan padding lower still). MRI: 10 % of the way from the
    minimum to the 99th percentile, so a noise floor is not taken for anatomy; a mask on its own
    (the sampler's input) is then cropped like the training case whose anatomy it outlines.
    """
    if image is None:
        return None
    if cfg.modality == "ct":
        return CT_BODY_HU
    low = float(image.min())
    return low + MRI_SIGNAL_FRACTION * (float(np.percentile(image, 99)) - low)


def square_box(lo: list[int], hi: list[int], spacing: Sequence[float], slice_axis: int) -> tuple[list[int], list[int]]:
    """Grow the in-plane axes of a box, centred, so both span the same extent in mm."""
    lo, hi = list(lo), list(hi)
    inplane = [a for a in range(3) if a != slice_axis]
    extent = max((hi[a] - lo[a]) * spacing[a] for a in inplane)
    for a in inplane:
        need = int(np.ceil(extent / spacing[a] - 1e-6)) - (hi[a] - lo[a])
        if need > 0:
            lo[a] -= need // 2
            hi[a] += need - need // 2
    return lo, hi


def fixed_box(
    lo: list[int], hi: list[int], spacing: Sequence[float], slice_axis: int, extent_mm: float
) -> tuple[list[int], list[int]]:
    """The in-plane axes of a box replaced by ``extent_mm`` (rounded to whole voxels), centred on the box."""
    lo, hi = list(lo), list(hi)
    for a in range(3):
        if a == slice_axis:
            continue
        size = max(1, round(extent_mm / spacing[a]))
        lo[a] = int(np.floor((lo[a] + hi[a] - size) / 2))
        hi[a] = lo[a] + size
    return lo, hi


def _labels_inside(
    label: np.ndarray | None, lo: Sequence[int], hi: Sequence[int], cfg: DataConfig, source: str
) -> None:
    """Refuse a fixed field of view that would cut labelled voxels off (they would be lost in the output)."""
    if label is None or not (label > 0).any():
        return
    points = np.argwhere(label > 0)
    first, last = points.min(axis=0), points.max(axis=0)
    for a in range(3):
        if a != cfg.slice_axis and (first[a] < lo[a] or last[a] >= hi[a]):
            raise DataError(
                f"{source}: its labels reach outside data.field_of_view_mm = {cfg.field_of_view_mm:g} "
                f"(canonical axis {a}: voxels {first[a]}..{last[a]}, field of view {lo[a]}..{hi[a] - 1}); "
                "set a larger field of view"
            )


def intensity_range(box: np.ndarray, cfg: DataConfig) -> tuple[float, float]:
    """The original intensities mapped to -1 and 1: MRI percentiles of the box, or the CT window."""
    if cfg.modality == "ct":
        low, high = cfg.ct_window
    else:
        low, high = (float(v) for v in np.percentile(box, cfg.mri_percentiles))
    if high <= low:  # a constant image: any positive range keeps the map invertible
        high = low + 1.0
    return float(low), float(high)


def _resize(data: np.ndarray, shape: Sequence[int], label: bool) -> np.ndarray:
    """``[a, b, c]`` -> ``shape``; labels by nearest neighbour, images trilinear with anti-aliasing."""
    if tuple(data.shape) == tuple(shape):
        return data
    if label:
        resize = Resize(tuple(shape), mode="nearest-exact")
        values = torch.from_numpy(data.astype(np.float32))[None]
        return np.asarray(resize(values))[0].round().astype(data.dtype)
    resize = Resize(tuple(shape), mode="trilinear", anti_aliasing=True, align_corners=False)
    return np.asarray(resize(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None]))[0]


def map_labels(label: np.ndarray, label_values: Sequence[int], source: str) -> np.ndarray:
    """Original label values -> contiguous ids 0..L-1 (uint8); unexpected values raise ``DataError``."""
    lookup = {int(v): i for i, v in enumerate(label_values)}
    present = np.unique(label)
    unexpected = [int(v) for v in present if int(v) not in lookup]
    if unexpected:
        raise DataError(f"{source}: unexpected label values {unexpected} (expected {sorted(lookup)})")
    table = np.zeros(int(present.max()) + 1, dtype=np.uint8)
    for value in present:
        table[int(value)] = lookup[int(value)]
    return table[label]


def to_model_grid(
    image: np.ndarray | None,
    label: np.ndarray | None,
    affine: np.ndarray,
    cfg: DataConfig,
    label_values: Sequence[int] | None = None,
    margin: int = 2,
    square: bool = True,
    source: str = "<case>",
    intensity: tuple[float, float] | None = None,
) -> ModelGridCase:
    """Bring a case (or a lone mask) from its original grid to the model grid.

    Args:
        image: ``[X, Y, Z]`` original intensities, or None (a mask on its own, e.g. the sampler's).
        label: ``[X, Y, Z]`` integer label values, or None.
        affine: ``[4, 4]`` the arrays' voxel -> world affine.
        label_values: the label table (original value of each id); None means the identity
            ``0..cfg.num_labels-1``. Pass ``()`` to keep original values (int64) for a table built later.
        margin: voxels added around the foreground box.
        square: grow the box in-plane to a square field of view in mm.
        intensity: without an image, the original (low, high) that [-1, 1] maps back to; default
            the CT window for CT, and (0, 1) arbitrary units for MRI.
    Returns:
        image ``[D, H, W]`` float32 in [-1, 1] (or None), label ``[D, H, W]`` uint8 ids (or None),
        and the ``CaseGeometry`` that ``to_original_grid`` inverts.
    """
    reference = image if image is not None else label
    if reference is None:
        raise ValueError("to_model_grid needs an image or a label")
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(n) for n in reference.shape)
    canon_reference, canon_affine = to_canonical(reference, affine)
    canon_image = to_canonical(image, affine)[0] if image is not None else None
    canon_label = to_canonical(label, affine)[0] if label is not None else None
    canon_spacing = spacing_of(canon_affine)
    axis = cfg.slice_axis

    if cfg.crop_foreground:
        lo, hi = foreground_box(canon_image, canon_label, margin, signal_threshold(canon_image, cfg))
    else:
        lo, hi = [0, 0, 0], [int(n) for n in canon_reference.shape]
    if cfg.field_of_view_mm is not None:
        lo, hi = fixed_box(lo, hi, canon_spacing, axis, cfg.field_of_view_mm)
        _labels_inside(canon_label, lo, hi, cfg, source)
    elif square:
        lo, hi = square_box(lo, hi, canon_spacing, axis)
    depth = hi[axis] - lo[axis]
    if cfg.target_spacing is not None:
        depth = max(1, round(depth * canon_spacing[axis] / cfg.target_spacing[axis]))
    model_shape = (depth, cfg.image_size, cfg.image_size)
    axes = model_axes(axis)

    low, high = intensity or (cfg.ct_window if cfg.modality == "ct" else (0.0, 1.0))
    background = low
    model_image = None
    if canon_image is not None:
        background = float(canon_image.min())
        box = _extract(canon_image, lo, hi, background)
        low, high = intensity_range(box, cfg)
        box = _resize(np.ascontiguousarray(np.transpose(box, axes)), model_shape, label=False)
        scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=-1.0, b_max=1.0, clip=True)
        model_image = np.asarray(scale(box), dtype=np.float32)
    model_label = None
    values: tuple[int, ...] = tuple(label_values) if label_values is not None else tuple(range(cfg.num_labels))
    if canon_label is not None:
        box = _extract(canon_label, lo, hi, 0)
        model_label = _resize(np.ascontiguousarray(np.transpose(box, axes)), model_shape, label=True)
        if values:
            model_label = map_labels(model_label, values, source)
    geometry = CaseGeometry.model_validate(
        {
            "affine": affine.tolist(),
            "shape": shape,
            "spacing": spacing_of(affine),
            "box_lo": lo,
            "box_hi": hi,
            "slice_axis": axis,
            "model_shape": model_shape,
            "modality": cfg.modality,
            "intensity_low": low,
            "intensity_high": high,
            "background": background,
            "label_values": values,
        }
    )
    return ModelGridCase(image=model_image, label=model_label, geometry=geometry)


def denormalise(image: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
    """[-1, 1] -> the case's original intensity scale (MRI percentile range or CT HU window)."""
    low, high = geometry.intensity_low, geometry.intensity_high
    return (low + (np.clip(image, -1.0, 1.0) + 1.0) * 0.5 * (high - low)).astype(np.float32)


def to_original_grid(
    geometry: CaseGeometry, image: np.ndarray | None = None, label: np.ndarray | None = None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Bring model-grid arrays back to the case's original grid; write them with ``geometry.affine``.

    Args:
        image: ``[D, H, W]`` in [-1, 1] (e.g. a synthetic volume), ``geometry.model_shape``.
        label: ``[D, H, W]`` contiguous ids.
    Returns:
        image ``[X, Y, Z]`` float32 in the original intensity scale (background outside the box),
        label ``[X, Y, Z]`` original label values (int16, 0 outside the box); None where not given.
    """
    axes = model_axes(geometry.slice_axis)
    inverse_axes = tuple(int(i) for i in np.argsort(axes))
    lo, hi = geometry.box_lo, geometry.box_hi
    box_shape = [hi[a] - lo[a] for a in axes]
    ornt = io_orientation(geometry.affine_array)
    canonical_shape = [geometry.shape[int(axis)] for axis in np.argsort(ornt[:, 0])]
    out_image = out_label = None
    for name, array in (("image", image), ("label", label)):
        if array is not None and tuple(array.shape) != tuple(geometry.model_shape):
            raise DataError(
                f"{name} of shape {tuple(array.shape)} does not match the model grid {geometry.model_shape}"
            )
    if image is not None:
        box = _resize(denormalise(np.asarray(image, dtype=np.float32), geometry), box_shape, label=False)
        canon = _paste(np.transpose(box, inverse_axes), lo, canonical_shape, geometry.background)
        out_image = np.ascontiguousarray(from_canonical(canon, geometry.affine_array), dtype=np.float32)
    if label is not None:
        table = np.asarray(geometry.label_values, dtype=np.int16)
        if int(label.max(initial=0)) >= len(table):
            raise DataError(f"label ids up to {int(label.max())} but the case has {len(table)} labels")
        box = _resize(table[np.asarray(label, dtype=np.int64)], box_shape, label=True)
        canon = _paste(np.transpose(box, inverse_axes), lo, canonical_shape, 0)
        out_label = np.ascontiguousarray(from_canonical(canon, geometry.affine_array))
    return out_image, out_label


def mask_to_model_grid(
    path: str | Path,
    cfg: DataConfig,
    label_values: Sequence[int] | None = None,
    margin: int = 2,
    intensity: tuple[float, float] | None = None,
) -> ModelGridCase:
    """A user's mask NIfTI on the model grid, remembering its geometry.

    The sampler brings ``MASK.nii.gz`` here, generates an image ``[D, H, W]`` in [-1, 1] on
    ``result.label``'s grid, and writes ``to_original_grid(result.geometry, image=synthetic)[0]``
    with ``save_nifti(out, array, result.geometry.affine_array)``: the mask's exact shape, affine and
    spacing. The crop matches a training case's (see ``signal_threshold``).

    Args:
        label_values: the training data's label table (``read_manifest(cache)["label_values"]``),
            so a mask in original values (e.g. BraTS 0, 1, 2, 4) maps to the same ids; None means
            the mask already holds ids 0..num_labels-1.
        intensity: the original (low, high) that [-1, 1] maps back to, e.g. the informed slice's
            source case's range or ``typical_intensity(manifest)``; default the CT window for CT
            and (0, 1) for MRI.
    Returns:
        ``ModelGridCase`` with ``image=None`` and ``label`` ``[D, H, W]`` uint8 ids.
    Raises:
        DataError: unreadable or invalid mask, empty, or values outside the label table.
    """
    label, header = read_label(path)
    if not (label > 0).any():
        raise DataError(f"{path}: empty label map (no foreground voxels)")
    return to_model_grid(
        None, label, header.affine, cfg, label_values, margin=margin, source=str(path), intensity=intensity
    )
