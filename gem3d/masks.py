"""Mask edits: new, still valid label maps from existing ones (issue 4, "Mask edits").

GEM-3D synthesises an image from a mask, so editing the mask is how the applications ask for
anatomy that no case has: a slightly rotated or deformed organ, a mirrored one, a lesion moved
toward the organ centre, a lesion transplanted from another patient, or a lesion removed
("the same patient without the tumour").

All edits work on label maps in the model grid: ``[D, H, W]`` uint8 contiguous ids
``0..num_labels-1``, slices along D, 0 = background. Every edit returns a label map of the same
shape and dtype with values in ``0..num_labels-1``.

Geometric edits (rotate, flip, elastic) resample the whole label map with one warp and
nearest-neighbour interpolation (MONAI ``Rotate``, ``Flip``, ``Resample``). An output voxel
takes the label of the point it comes from, so a lesion stays inside the warped foreground
exactly: ``{lesion} = warp^-1(lesion) ⊆ warp^-1(foreground) = {foreground}``. Lesion edits
(shift-lesion, transplant, remove) place lesion voxels only on foreground voxels and fill a
vacated lesion with the nearest surrounding tissue, so no background appears inside the anatomy.

Distances (elastic magnitude, lesion shifts, nearest-tissue fills) are in voxels of the model
grid; the grid's in-plane pixels are square (``gem3d.data.geometry`` crops a square field of
view), the slice spacing may differ.

Spec syntax (``parse_edits``), comma-separated and applied in order::

    rotate:DEG          in-plane rotation (H-W plane, around the slice axis D) by an angle drawn
                        uniformly from [-DEG, DEG] degrees
    flip[:AXIS]         mirror along model axis AXIS (0 = D, 1 = H, 2 = W); without AXIS the
                        left-right axis (``left_right_axis``)
    elastic:MAG         smooth random 3D deformation whose largest displacement is MAG voxels
    shift-lesion:FRAC   move the lesion toward the foreground centroid by FRAC (0..1) of the way
    transplant          paste a donor case's lesion at a random place where it fits in the foreground
    remove:L            label L becomes the nearest other tissue label (background if none)
    relabel:A=B         label A becomes B

Skipped edits: ``shift-lesion`` on a mask without a lesion is recorded as skipped (``"skipped"``
gives the reason, ``"changed"`` is False) rather than raised, so a batch over many cases, some
without a lesion, does not stop. ``transplant`` without a usable donor raises ``DataError``: the
caller asked for something it did not provide. Every provenance record carries ``"changed"`` so
a release that demands a minimum number of real edits can count them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import Flip, Resample, Rotate
from monai.transforms.utils import create_grid
from monai.utils import convert_to_numpy
from scipy import ndimage, signal

from gem3d.errors import ConfigError, DataError

# Smoothness of the elastic field: the spacing of its random control points, a quarter of the
# smallest array side (at least 4 voxels), so it bends the organ rather than roughening its border.
ELASTIC_CONTROL_FRACTION = 1.0 / 4.0
ELASTIC_MIN_CONTROL_SPACING = 4.0
# shift-lesion backs off from the requested shift in this many steps until the lesion fits.
SHIFT_BACKOFF_STEPS = 20


@dataclass(frozen=True)
class MaskEdit:
    """One parsed edit.

    Attributes:
        name: one of ``EDIT_NAMES``.
        args: its numeric arguments: ``rotate (deg,)``, ``flip (axis,)`` or ``()``,
            ``elastic (mag,)``, ``shift-lesion (frac,)``, ``transplant ()``, ``remove (label,)``,
            ``relabel (a, b)``.
    """

    name: str
    args: tuple[float | int, ...]


def left_right_axis(slice_axis: int) -> int:
    """The model-grid axis of canonical x (left-right) for a given ``DataConfig.slice_axis``.

    The model grid is ``[D, H, W]`` = the canonical RAS+ axes with ``slice_axis`` moved first and
    the other two in order (``gem3d.data.geometry.model_axes``): axial (2) and coronal (1)
    slicing put x on H; sagittal (0) slicing puts x on D.
    """
    if slice_axis not in (0, 1, 2):
        raise ConfigError(f"slice_axis {slice_axis}: must be 0, 1 or 2")
    return 0 if slice_axis == 0 else 1


def parse_edits(spec: str, slice_axis: int = 2, option: str = "--mask-edit") -> list[MaskEdit]:
    """Parse ``"rotate:10,flip,elastic:2,shift-lesion:0.5,transplant,remove:3,relabel:3=1"``.

    Args:
        spec: comma-separated edits (see the module docstring); empty or blank gives no edits.
        slice_axis: the data's canonical slice axis, which decides the axis of a plain ``flip``.
        option: where ``spec`` came from, for the message (a command's option).
    Raises:
        ConfigError: one line naming ``option``, the bad token and what is wrong with it.
    """
    if not spec.strip():
        return []
    return [_parse_token(token.strip(), slice_axis, f"{option} {spec}") for token in spec.split(",")]


def _parse_token(token: str, slice_axis: int, where: str) -> MaskEdit:
    name, has_arg, arg = (part.strip() for part in token.partition(":"))

    def bad(problem: str) -> ConfigError:
        return ConfigError(f"{where}: mask edit {token!r}: {problem}")

    if not token:
        raise bad("empty edit (two commas in a row, or a trailing comma?)")
    kind = EDITS.get(name)
    if kind is None:
        raise bad(f"unknown edit {name!r}; known: {', '.join(EDITS)}")
    if kind.argument == "required" and not arg:
        raise bad(f"needs an argument: {kind.usage}")
    if kind.argument == "none" and has_arg:
        raise bad("takes no argument")
    return MaskEdit(name, kind.parse(arg if has_arg else None, bad, slice_axis))


Bad = Callable[[str], ConfigError]


def _bounded(what: str, low: float, high: float, kind: type[int] | type[float] = float) -> Callable[..., tuple]:
    """A parser of one number ``what`` within ``low..high``."""

    def parse(arg: str | None, bad: Bad, slice_axis: int) -> tuple[float | int, ...]:
        value = (_parse_int if kind is int else _parse_float)(str(arg), bad, what)
        if not low <= value <= high:
            bounds = f">= {low:g}" if high == math.inf else f"within {low:g}..{high:g}"
            raise bad(f"{what} must be {bounds}")
        return (value,)

    return parse


def _parse_flip(arg: str | None, bad: Bad, slice_axis: int) -> tuple[int, ...]:
    if arg is None:
        return (left_right_axis(slice_axis),)
    axis = _parse_int(arg, bad, "AXIS")
    if axis not in (0, 1, 2):
        raise bad("AXIS must be 0 (D), 1 (H) or 2 (W)")
    return (axis,)


def _parse_relabel(arg: str | None, bad: Bad, slice_axis: int) -> tuple[int, ...]:
    source, equals, target = str(arg).partition("=")
    if not equals:
        raise bad("expected relabel:A=B")
    a, b = _parse_int(source.strip(), bad, "A"), _parse_int(target.strip(), bad, "B")
    if a < 0 or b < 0:
        raise bad("label ids must be >= 0")
    return (a, b)


def _no_args(arg: str | None, bad: Bad, slice_axis: int) -> tuple[()]:
    return ()


def _parse_float(text: str, bad: Callable[[str], ConfigError], what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise bad(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise bad(f"{what} must be finite")
    return value


def _parse_int(text: str, bad: Callable[[str], ConfigError], what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise bad(f"{what} must be an integer, got {text!r}") from None


def is_valid_label_map(label: np.ndarray, num_labels: int) -> bool:
    """True for a ``[D, H, W]`` uint8 array with values in ``0..num_labels-1``."""
    return (
        isinstance(label, np.ndarray)
        and label.ndim == 3
        and label.dtype == np.uint8
        and label.size > 0
        and int(label.max()) < num_labels
    )


def apply_edits(
    label: np.ndarray,
    edits: Sequence[MaskEdit],
    num_labels: int,
    rng: np.random.Generator,
    lesion_label: int | None = None,
    donors: Sequence[np.ndarray] = (),
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Apply ``edits`` in order.

    Args:
        label: ``[D, H, W]`` integer label map with values in ``0..num_labels-1`` (not modified).
        edits: from ``parse_edits`` (or built directly).
        num_labels: L, including background.
        rng: the only source of randomness; the same generator state gives the same output.
        lesion_label: the lesion id for shift-lesion and transplant; default ``num_labels - 1``.
        donors: ``[D', H', W']`` label maps of other cases (any shape) for transplant; their lesion
            is the voxels equal to ``lesion_label``.
    Returns:
        the edited ``[D, H, W]`` uint8 label map, and one JSON-serialisable record per edit:
        ``name``, ``args``, ``changed`` (whether the map differs from before this edit), the
        drawn parameters, and ``skipped`` (a reason) when the edit did not apply.
    Raises:
        DataError: the label map or a donor is invalid, or transplant has no usable donor.
        ConfigError: an edit's label ids do not exist for ``num_labels``.
    """
    if not 1 <= num_labels <= 256:
        raise ConfigError(f"num_labels {num_labels}: must be within 1..256")
    current = _checked_label(label, num_labels, "label map")
    lesion = num_labels - 1 if lesion_label is None else int(lesion_label)
    context = EditContext(num_labels, rng, lesion, donors)
    records: list[dict[str, Any]] = []
    for edit in edits:
        before = current
        current, params = _apply_one(current, edit, context)
        if not is_valid_label_map(current, num_labels) or current.shape != before.shape:
            raise AssertionError(f"mask edit {edit.name} produced an invalid label map")
        record: dict[str, Any] = {"name": edit.name, "args": [_plain(a) for a in edit.args]}
        record.update({key: _plain(value) for key, value in params.items()})
        record["changed"] = not np.array_equal(before, current)
        records.append(record)
    return np.ascontiguousarray(current), records


def _checked_label(label: np.ndarray, num_labels: int, what: str) -> np.ndarray:
    """A uint8 copy of an integer ``[D, H, W]`` label map, or a DataError."""
    array = np.asarray(label)
    if array.ndim != 3 or array.size == 0:
        raise DataError(f"{what}: expected a non-empty [D, H, W] array, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise DataError(f"{what}: expected integer label ids, got dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= num_labels:
        raise DataError(f"{what}: label ids must be within 0..{num_labels - 1}, found {low}..{high}")
    return np.ascontiguousarray(array, dtype=np.uint8).copy()


def _plain(value: Any) -> Any:
    """numpy scalars/arrays -> JSON-serialisable Python values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class EditContext:
    """What an edit may use besides the label map: the label count, the randomness, the lesion id, donors."""

    num_labels: int
    rng: np.random.Generator
    lesion: int
    donors: Sequence[np.ndarray]


def _apply_one(label: np.ndarray, edit: MaskEdit, context: EditContext) -> tuple[np.ndarray, dict[str, Any]]:
    kind = EDITS.get(edit.name)
    if kind is None:
        raise ConfigError(f"mask edit {edit.name!r}: unknown; known: {', '.join(EDITS)}")
    return kind.apply(label, edit, context)


def _apply_flip(label: np.ndarray, edit: MaskEdit, context: EditContext) -> tuple[np.ndarray, dict[str, Any]]:
    axis = int(edit.args[0]) if edit.args else 1
    if axis not in (0, 1, 2):
        raise ConfigError(f"mask edit flip:{axis}: axis must be 0, 1 or 2")
    return flip(label, axis), {"axis": axis}


def _apply_remove(label: np.ndarray, edit: MaskEdit, context: EditContext) -> tuple[np.ndarray, dict[str, Any]]:
    target = int(_arg(edit, 0))
    if not 1 <= target < context.num_labels:
        raise ConfigError(f"mask edit remove:{target}: label must be within 1..{context.num_labels - 1}")
    return remove_label(label, target), {"label": target}


def _apply_relabel(label: np.ndarray, edit: MaskEdit, context: EditContext) -> tuple[np.ndarray, dict[str, Any]]:
    a, b = int(_arg(edit, 0)), int(_arg(edit, 1))
    for value in (a, b):
        if not 0 <= value < context.num_labels:
            raise ConfigError(f"mask edit relabel:{a}={b}: label {value} is outside 0..{context.num_labels - 1}")
    out = label.copy()
    out[label == a] = b
    return out, {"from": a, "to": b}


def _arg(edit: MaskEdit, index: int) -> float | int:
    if len(edit.args) <= index:
        raise ConfigError(f"mask edit {edit.name}: missing argument {index + 1} in {edit.args}")
    return edit.args[index]


def _lesion_id(lesion: int, num_labels: int, edit: MaskEdit) -> int:
    if not 1 <= lesion < num_labels:
        raise ConfigError(f"mask edit {edit.name}: lesion label {lesion} must be within 1..{num_labels - 1}")
    return lesion


# --- geometric edits (MONAI transforms, nearest neighbour) ---------------------------------------


def _warp(label: np.ndarray, transform: Callable[[torch.Tensor], Any]) -> np.ndarray:
    """Run a MONAI spatial transform on ``[D, H, W]`` labels as a ``[1, D, H, W]`` float tensor.

    Nearest-neighbour sampling copies values, so rounding back to uint8 is exact; padding is 0
    (background) where the warp reaches outside the array.
    """
    image = torch.from_numpy(label.astype(np.float32))[None]
    out = convert_to_numpy(transform(image))[0]
    return np.ascontiguousarray(np.rint(out).astype(np.uint8))


def rotate(label: np.ndarray, max_degrees: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Rotate every slice by one angle drawn uniformly from ``[-max_degrees, max_degrees]``.

    MONAI ``Rotate`` on a 3D array takes angles per plane; the first rotates in the plane of
    the second and third spatial axes, i.e. the H-W (slice) plane, around the slice axis D.
    """
    degrees = float(rng.uniform(-max_degrees, max_degrees))
    transform = Rotate(angle=(math.radians(degrees), 0.0, 0.0), keep_size=True, mode="nearest", padding_mode="zeros")
    return _warp(label, transform), {"angle_deg": degrees}


def flip(label: np.ndarray, axis: int) -> np.ndarray:
    """Mirror along model axis ``axis`` (0 = D, 1 = H, 2 = W); see ``left_right_axis``."""
    return _warp(label, Flip(spatial_axis=axis))


def elastic(label: np.ndarray, magnitude: float, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A smooth random 3D deformation whose largest displacement is ``magnitude`` voxels.

    One 3D field for the whole volume (not one per slice), so neighbouring slices bend together.
    The field is what MONAI ``Rand3DElastic`` builds (uniform random offsets, Gaussian-smoothed,
    added to the identity grid, resampled by MONAI ``Resample``), but drawn on a coarse control
    grid and upsampled: ``Rand3DElastic`` smooths a full-resolution noise field with a wide
    Gaussian, about 10 s for a 96x128x128 mask on CPU, where this takes milliseconds. The field is
    normalised so ``magnitude`` means the largest displacement, not an amplitude before smoothing.
    """
    spacing = max(ELASTIC_MIN_CONTROL_SPACING, min(label.shape) * ELASTIC_CONTROL_FRACTION)
    coarse_shape = tuple(max(2, math.ceil(n / spacing) + 1) for n in label.shape)
    offsets = rng.uniform(-1.0, 1.0, size=(3, *coarse_shape))
    offsets = np.stack([ndimage.gaussian_filter(channel, sigma=1.0, mode="nearest") for channel in offsets])
    field = torch.nn.functional.interpolate(
        torch.from_numpy(offsets)[None], size=label.shape, mode="trilinear", align_corners=True
    )[0]
    largest = float(field.norm(dim=0).max())
    field = field * (magnitude / largest if largest > 0.0 else 0.0)
    grid = torch.as_tensor(create_grid(spatial_size=label.shape, backend="torch", dtype=torch.float64))
    grid[:3] += field
    resample = Resample(mode="nearest", padding_mode="zeros")
    out = _warp(label, lambda image: resample(image, grid))
    return out, {"control_spacing": spacing, "max_displacement": magnitude}


# --- lesion edits ---------------------------------------------------------------------------------


def fill_from_neighbours(label: np.ndarray, region: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """``label`` with the voxels of ``region`` set to the label of their nearest ``sources`` voxel.

    Args:
        label: ``[D, H, W]`` uint8.
        region: ``[D, H, W]`` bool, the voxels to fill.
        sources: ``[D, H, W]`` bool, the voxels whose labels may be copied; if empty, ``region``
            becomes background.
    """
    out = label.copy()
    if not region.any():
        return out
    if not sources.any():
        out[region] = 0
        return out
    # The EDT of ~sources gives, for every voxel, the index of its nearest sources voxel.
    indices = ndimage.distance_transform_edt(~sources, return_distances=False, return_indices=True)
    nearest = tuple(axis_index[region] for axis_index in indices)
    out[region] = label[nearest]
    return out


def remove_label(label: np.ndarray, target: int) -> np.ndarray:
    """Label ``target`` becomes the nearest other tissue (non-background, non-``target``) label.

    So a lesion becomes the tissue around it ("the same patient without the lesion") and no
    background hole opens inside the anatomy; background only if there is no other tissue.
    """
    region = label == target
    return fill_from_neighbours(label, region, (label != 0) & ~region)


def shift_lesion(label: np.ndarray, fraction: float, lesion: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Move the lesion toward the foreground centroid by ``fraction`` of the distance.

    The shift is rounded to whole voxels, so the lesion keeps its exact shape. Where the shifted
    lesion would leave the foreground (or the array), the shift is shortened in steps until it
    fits; the unshifted lesion always fits. The vacated voxels take the nearest tissue label.
    """
    region = label == lesion
    if not region.any():
        return label.copy(), {"skipped": f"no lesion (label {lesion}) in this mask", "shift_voxels": [0, 0, 0]}
    foreground = label != 0
    points = np.argwhere(region)
    lesion_centre = points.mean(axis=0)
    organ_centre = np.argwhere(foreground).mean(axis=0)
    requested = fraction * (organ_centre - lesion_centre)
    base = remove_label(label, lesion)
    shape = np.array(label.shape)
    applied = np.zeros(3, dtype=np.int64)
    for scale in np.linspace(1.0, 0.0, SHIFT_BACKOFF_STEPS + 1):
        shift = np.rint(scale * requested).astype(np.int64)
        moved = points + shift
        inside = bool(((moved >= 0) & (moved < shape)).all())
        if inside and bool(foreground[tuple(moved.T)].all()):
            applied = shift
            break
    out = base
    out[tuple((points + applied).T)] = lesion
    return out, {
        "requested_shift": requested.round(3),
        "shift_voxels": applied,
        "distance_before": float(np.linalg.norm(organ_centre - lesion_centre)),
        "distance_after": float(np.linalg.norm(organ_centre - lesion_centre - applied)),
    }


def transplant(
    label: np.ndarray, donors: Sequence[np.ndarray], lesion: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """Paste a donor's lesion at a random position where every lesion voxel lands on foreground.

    Donors are tried in a random order; the first whose lesion fits somewhere is used, and the
    position is drawn uniformly among all positions where it fits.
    """
    if not donors:
        raise DataError("mask edit transplant: no donor masks were given")
    foreground = label != 0
    if not foreground.any():
        raise DataError("mask edit transplant: the mask has no foreground to place a lesion in")
    # Offsets where the number of lesion voxels on background is zero: a cross-correlation of
    # the background indicator with the lesion (FFT, so large masks stay fast).
    background = (~foreground).astype(np.float64)
    tried: list[str] = []
    for donor_index in rng.permutation(len(donors)):
        donor = np.asarray(donors[int(donor_index)])
        if donor.ndim != 3 or not np.issubdtype(donor.dtype, np.integer):
            raise DataError(f"mask edit transplant: donor {donor_index} is not a [D, H, W] integer label map")
        piece = _crop_to_content(donor == lesion)
        if piece is None:
            tried.append(f"donor {donor_index} has no lesion")
            continue
        if any(p > s for p, s in zip(piece.shape, label.shape, strict=True)):
            tried.append(f"donor {donor_index}'s lesion {piece.shape} is larger than the mask")
            continue
        misses = signal.correlate(background, piece.astype(np.float64), mode="valid", method="auto")
        valid = np.argwhere(misses < 0.5)
        if len(valid) == 0:
            tried.append(f"donor {donor_index}'s lesion fits nowhere inside the foreground")
            continue
        corner = valid[int(rng.integers(len(valid)))]
        out = label.copy()
        window = tuple(slice(c, c + p) for c, p in zip(corner, piece.shape, strict=True))
        out[window][piece] = lesion
        centre = corner + (np.argwhere(piece).mean(axis=0))
        return out, {
            "donor_index": int(donor_index),
            "offset": corner,
            "centre": centre.round(2),
            "voxels": int(piece.sum()),
        }
    raise DataError(f"mask edit transplant: no usable donor lesion (label {lesion}): {'; '.join(tried)}")


def _crop_to_content(mask: np.ndarray) -> np.ndarray | None:
    """The bounding box of a bool ``[D, H, W]`` mask, or None if it is empty."""
    points = np.argwhere(mask)
    if len(points) == 0:
        return None
    lo, hi = points.min(axis=0), points.max(axis=0) + 1
    return mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]


@dataclass(frozen=True)
class EditKind:
    """One registered mask edit: its spec syntax, its argument parser and what it does.

    Attributes:
        usage: the spec syntax, e.g. ``rotate:DEG`` (``flip`` takes an optional axis).
        argument: whether ``NAME:ARG`` is ``required``, ``optional`` or takes ``none``.
        parse: ``(arg or None, bad, slice_axis) -> args`` for ``MaskEdit.args``.
        apply: ``(label, edit, context) -> (edited label, drawn parameters)``.
    """

    usage: str
    argument: Literal["required", "optional", "none"]
    parse: Callable[[str | None, Bad, int], tuple[float | int, ...]]
    apply: Callable[[np.ndarray, MaskEdit, EditContext], tuple[np.ndarray, dict[str, Any]]]


EDITS: dict[str, EditKind] = {
    "rotate": EditKind(
        "rotate:DEG", "required", _bounded("DEG", 0.0, 180.0), lambda m, e, c: rotate(m, float(_arg(e, 0)), c.rng)
    ),
    "flip": EditKind("flip[:AXIS]", "optional", _parse_flip, _apply_flip),
    "elastic": EditKind(
        "elastic:MAG",
        "required",
        _bounded("MAG (largest displacement in voxels)", 0.0, math.inf),
        lambda m, e, c: elastic(m, float(_arg(e, 0)), c.rng),
    ),
    "shift-lesion": EditKind(
        "shift-lesion:FRAC",
        "required",
        _bounded("FRAC", 0.0, 1.0),
        lambda m, e, c: shift_lesion(m, float(_arg(e, 0)), _lesion_id(c.lesion, c.num_labels, e)),
    ),
    "transplant": EditKind(
        "transplant",
        "none",
        _no_args,
        lambda m, e, c: transplant(m, c.donors, _lesion_id(c.lesion, c.num_labels, e), c.rng),
    ),
    "remove": EditKind(
        "remove:LABEL", "required", _bounded("LABEL (a foreground label id)", 1, math.inf, int), _apply_remove
    ),
    "relabel": EditKind("relabel:A=B", "required", _parse_relabel, _apply_relabel),
}
"""The mask edits by spec name (``parse_edits``); an unknown name is refused with the known ones."""

EDIT_NAMES = tuple(EDITS)
