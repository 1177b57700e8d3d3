"""Prepare a dataset: validate every case, bring it to the model grid, cache it with a manifest.

The cache is a folder::

    manifest.json            format, data config, label table, and per case: files, geometry, stats
    cases/00000.image.npy    [D, H, W] float32 in [-1, 1]
    cases/00000.label.npy    [D, H, W] uint8 contiguous ids

Arrays are plain ``.npy`` files loaded memory-mapped, so a training process touches only the
windows it draws. The manifest's ``CaseGeometry`` records let ``to_original_grid`` write outputs
back in each case's original geometry and intensity scale.

Nothing partial is written: the cache is built in a temporary sibling folder and renamed into
place at the end; any error removes it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gem3d.config import DataConfig
from gem3d.data.geometry import CaseGeometry, map_labels, to_model_grid
from gem3d.data.layouts import SEQUENCES, Layout, Listing, Sequence_, check_case_headers, discover, read_case
from gem3d.data.volume import Volume
from gem3d.errors import DataError
from gem3d.files import AtomicFolder

MANIFEST = "manifest.json"
FORMAT = "gem3d-prepared-v1"
# DataConfig fields that change the cached arrays: a cache only serves configs that agree on them.
GRID_FIELDS = (
    "image_size",
    "slice_axis",
    "modality",
    "mri_percentiles",
    "ct_window",
    "target_spacing",
    "crop_foreground",
    "field_of_view_mm",
)


class PrepareOptions(BaseModel):
    """Options of ``gem3d prepare`` beyond ``DataConfig``.

    Attributes:
        layout: the input layout.
        sequence: the BraTS sequence (MRI contrast) to read; FLAIR as in the paper.
        skip_invalid: report bad cases and go on with the rest, instead of stopping at the first.
        margin: voxels kept around the foreground box.
        square: grow the box in-plane to a square field of view in mm, keeping the aspect ratio.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    layout: Layout = "nnunet"
    sequence: Sequence_ = "flair"
    skip_invalid: bool = False
    margin: int = Field(2, ge=0)
    square: bool = True


@dataclass
class PrepareReport:
    """What ``prepare_dataset`` did: case ids written, and ``(case id, problem)`` for cases skipped."""

    output: Path
    cases: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    label_values: tuple[int, ...] = ()
    short: list[str] = field(default_factory=list)


def _check_output(output: Path) -> None:
    if output.exists():
        raise DataError(f"{output}: output already exists; choose a new folder")
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"{output}: output folder not writable ({parent} does not allow writing)")


def _case_stats(image: np.ndarray, label: np.ndarray, geometry: CaseGeometry) -> dict[str, Any]:
    """Per-case fields for partitioning by a manifest field (all JSON scalars)."""
    return {
        "depth": int(label.shape[0]),
        "foreground_fraction": float((label > 0).mean()),
        "spacing_x": geometry.spacing[0],
        "spacing_y": geometry.spacing[1],
        "spacing_z": geometry.spacing[2],
        "intensity_low": geometry.intensity_low,
        "intensity_high": geometry.intensity_high,
        "image_mean": float(image.mean()),
    }


def _save_npy(path: Path, array: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)


def prepare_dataset(
    input_dir: str | Path,
    output: str | Path,
    cfg: DataConfig,
    options: PrepareOptions,
    on_case: Callable[[str, str | None], None] | None = None,
) -> PrepareReport:
    """Validate and cache a dataset for training.

    Args:
        input_dir: the dataset in ``options.layout``.
        output: the cache folder to create (must not exist).
        on_case: called with ``(case_id, problem or None)`` as each case is done.
    Returns:
        a ``PrepareReport``.
    Raises:
        DataError: the first bad input (or, with ``skip_invalid``, a dataset-level problem or no valid case).
    """
    input_dir, output = Path(input_dir), Path(output)
    _check_output(output)
    listing = discover(options.layout, input_dir, cfg.channel, options.sequence)
    report = PrepareReport(output=output)

    # Cheap header checks over the whole dataset first, so most bad inputs stop us before voxels are read.
    valid = []
    for files in listing.cases:
        problem = check_case_headers(files)
        if problem is None:
            valid.append(files)
            continue
        if not options.skip_invalid:
            others = sum(check_case_headers(f) is not None for f in listing.cases) - 1
            raise DataError(problem + (f" (and {others} more bad cases)" if others > 0 else ""))
        report.skipped.append((files.case_id, problem))
        if on_case:
            on_case(files.case_id, problem)

    # folders made only to hold the output go too on a failure: nothing is left behind
    with AtomicFolder(output, remove_created_parents=True) as tmp:
        (tmp / "cases").mkdir()
        records = _process_cases(listing, valid, cfg, options, tmp, report, on_case)
        label_values = _label_table(listing, records, cfg, input_dir)
        report.label_values = label_values
        entries = []
        for record in records:
            label_path = tmp / record["label"]
            raw = np.load(label_path)
            mapped = map_labels(raw, label_values, str(record["source"]["label"]))
            _save_npy(label_path, mapped)
            geometry = record.pop("geometry_raw").model_copy(update={"label_values": label_values})
            record["geometry"] = geometry.model_dump(mode="json")
            entries.append(record)
            if record["stats"]["depth"] < cfg.window:
                report.short.append(record["id"])
        manifest = {
            "format": FORMAT,
            "layout": options.layout,
            "source": str(input_dir.resolve()),
            "data": cfg.model_dump(mode="json"),
            "options": options.model_dump(mode="json"),
            "label_values": list(label_values),
            "label_names": {str(i): listing.label_names.get(v, f"label {v}") for i, v in enumerate(label_values)},
            "skipped": [{"id": case_id, "problem": problem} for case_id, problem in report.skipped],
            "cases": entries,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return report


def _process_cases(
    listing: Listing,
    valid: list[Any],
    cfg: DataConfig,
    options: PrepareOptions,
    tmp: Path,
    report: PrepareReport,
    on_case: Callable[[str, str | None], None] | None,
) -> list[dict[str, Any]]:
    """Read, check and cache each case with its original label values (mapped once all are known)."""
    records: list[dict[str, Any]] = []
    for files in valid:
        try:
            case = read_case(files, listing.declared_labels)
            grid = to_model_grid(
                case.image,
                case.label,
                case.affine,
                cfg,
                label_values=(),
                margin=options.margin,
                square=options.square,
                source=str(files.label),
            )
        except DataError as error:
            if not options.skip_invalid:
                raise
            report.skipped.append((files.case_id, str(error)))
            if on_case:
                on_case(files.case_id, str(error))
            continue
        assert grid.image is not None and grid.label is not None
        if not (grid.label > 0).any():
            problem = f"{files.label}: the foreground vanishes at the model grid's resolution"
            if not options.skip_invalid:
                raise DataError(problem)
            report.skipped.append((files.case_id, problem))
            continue
        stem = f"{len(records):05d}"
        _save_npy(tmp / "cases" / f"{stem}.image.npy", grid.image.astype(np.float32))
        _save_npy(tmp / "cases" / f"{stem}.label.npy", grid.label.astype(np.int64))
        records.append(
            {
                "id": files.case_id,
                "image": f"cases/{stem}.image.npy",
                "label": f"cases/{stem}.label.npy",
                "source": {"image": str(files.image), "label": str(files.label), "channel": files.channel},
                "geometry_raw": grid.geometry,
                "stats": _case_stats(grid.image, grid.label, grid.geometry),
                "present": [int(v) for v in np.unique(case.label)],
            }
        )
        report.cases.append(files.case_id)
        if on_case:
            on_case(files.case_id, None)
    if not records:
        raise DataError(f"{listing.root}: no valid cases ({len(report.skipped)} skipped)")
    return records


def _label_table(listing: Listing, records: list[dict[str, Any]], cfg: DataConfig, input_dir: Path) -> tuple[int, ...]:
    """Original label values in id order: declared by ``dataset.json``, else those present."""
    if listing.declared_labels is not None:
        values = listing.declared_labels
    else:
        present: set[int] = {0}
        for record in records:
            present.update(record["present"])
        values = tuple(sorted(present))
    if len(values) > cfg.num_labels:
        raise DataError(
            f"{input_dir}: {len(values)} label values {list(values)} but data.num_labels is {cfg.num_labels}; "
            "raise data.num_labels"
        )
    return tuple(int(v) for v in values)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a prepared cache folder. Raises ``DataError`` if it is missing or malformed."""
    path = Path(path)
    manifest_path = path / MANIFEST if path.is_dir() else path
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{manifest_path}: not a prepared dataset (no manifest.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{manifest_path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "cases" not in manifest:
        raise DataError(f"{manifest_path}: not a {FORMAT} manifest")
    return manifest


def case_geometry(manifest: dict[str, Any], case_id: str) -> CaseGeometry:
    """The ``CaseGeometry`` of one case of a manifest."""
    for case in manifest["cases"]:
        if case["id"] == case_id:
            try:
                return CaseGeometry.model_validate(case["geometry"])
            except ValidationError as error:
                raise DataError(f"manifest: case '{case_id}' has an invalid geometry record ({error})") from None
    raise DataError(f"manifest: no case '{case_id}'")


def typical_intensity(manifest: dict[str, Any]) -> tuple[float, float]:
    """The median (low, high) original intensity range over a prepared dataset's cases: what a
    synthetic image with no source case of its own is mapped back to."""
    ranges = np.array([[c["geometry"]["intensity_low"], c["geometry"]["intensity_high"]] for c in manifest["cases"]])
    low, high = np.median(ranges, axis=0)
    return float(low), float(high)


def check_compatible(manifest: dict[str, Any], cfg: DataConfig, where: Path) -> None:
    """A cache serves a config only if the grid-defining fields agree and the labels fit."""
    prepared = manifest.get("data", {})
    current = cfg.model_dump(mode="json")
    for name in GRID_FIELDS:
        if prepared.get(name) != current[name]:
            raise DataError(
                f"{where}: prepared with data.{name}={prepared.get(name)} but the config has {current[name]}; "
                "run gem3d prepare again with this config"
            )
    if len(manifest.get("label_values", [])) > cfg.num_labels:
        raise DataError(f"{where}: has {len(manifest['label_values'])} labels but data.num_labels is {cfg.num_labels}")


def load_prepared(path: str | Path, cfg: DataConfig, case_ids: list[str] | None = None) -> list[Volume]:
    """Volumes of a prepared cache, memory-mapped (copy-on-write, so nothing writes back to disk).

    Args:
        case_ids: load only these cases (e.g. one simulated site's); None loads all.
    Returns:
        one ``Volume`` per case, ``image`` ``[D, H, W]`` float32 and ``label`` ``[D, H, W]`` uint8, sorted by id.
    """
    path = Path(path)
    manifest = read_manifest(path)
    check_compatible(manifest, cfg, path)
    wanted = set(case_ids) if case_ids is not None else None
    volumes = []
    for case in manifest["cases"]:
        if wanted is not None and case["id"] not in wanted:
            continue
        try:
            image = np.load(path / case["image"], mmap_mode="c", allow_pickle=False)
            label = np.load(path / case["label"], mmap_mode="c", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DataError(f"{path / case['image']}: unreadable cache array ({error})") from None
        if image.shape != label.shape or image.ndim != 3 or image.dtype != np.float32 or label.dtype != np.uint8:
            raise DataError(f"{path / case['image']}: cache arrays do not match the manifest (shape or dtype)")
        volumes.append(Volume(case_id=case["id"], image=image, label=label))
    if wanted is not None and len(volumes) != len(wanted):
        missing = sorted(wanted - {v.case_id for v in volumes})
        raise DataError(f"{path}: no cases {missing[:5]}")
    if not volumes:
        raise DataError(f"{path}: the prepared dataset has no cases")
    return sorted(volumes, key=lambda v: v.case_id)


__all__ = [
    "MANIFEST",
    "SEQUENCES",
    "PrepareOptions",
    "PrepareReport",
    "case_geometry",
    "check_compatible",
    "load_prepared",
    "prepare_dataset",
    "read_manifest",
    "typical_intensity",
]
