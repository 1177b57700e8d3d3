"""nnU-Net v2 raw datasets in and out: cases read onto the model grid, and the one dataset writer.

``read_grid_cases`` reads every case of a dataset (or of each site dataset of a cohort root) onto
the model grid, into a ``gem3d.data.spill.Spill``.
``DatasetWriter`` writes ``imagesTr``, ``labelsTr`` and ``dataset.json``
(``dataset_json``) atomically: cases go into a work folder beside the target
(``gem3d.files.AtomicFolder``), renamed into place by ``finish``; an existing target is never
overwritten, and ``abort`` (or leaving its ``with`` block unfinished) leaves nothing behind.
``case_files`` names a case's files, for the writers that choose their own bytes (the demo
cohort's labels stay uint8; a release scrubs its headers).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gem3d.config import Config
from gem3d.data.geometry import CaseGeometry, to_model_grid
from gem3d.data.layouts import check_case_headers, discover, read_case
from gem3d.data.nifti import save_nifti
from gem3d.data.spill import Spill, SpilledCase
from gem3d.errors import DataError
from gem3d.files import AtomicFolder, write_json


def dataset_json(channel: str, labels: dict[int, str], num_training: int, **meta: Any) -> dict[str, Any]:
    """The ``dataset.json`` of an nnU-Net v2 raw dataset: ``meta`` (e.g. name, description) first.

    Args:
        channel: the one input channel's name (``CT`` makes nnU-Net use CT normalisation).
        labels: label id -> name; every id ``0..L-1`` is named (missing ones as ``label_<id>``,
            0 as ``background``).
    """
    count = max(labels, default=0) + 1
    names = {i: labels.get(i, "background" if i == 0 else f"label_{i}") for i in range(count)}
    return {
        **meta,
        "channel_names": {"0": channel},
        "labels": {name: i for i, name in names.items()},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }


def case_files(folder: Path, case_id: str, split: str = "Tr") -> tuple[Path, Path]:
    """A case's image and label files in an nnU-Net v2 raw dataset: ``images{split}/{case_id}_0000.nii.gz``
    (one input channel) and ``labels{split}/{case_id}.nii.gz``; ``split`` ``Ts`` for a test case."""
    return folder / f"images{split}" / f"{case_id}_0000.nii.gz", folder / f"labels{split}" / f"{case_id}.nii.gz"


Preview = Callable[[Path, np.ndarray, np.ndarray, CaseGeometry, "np.ndarray | None"], Any]
"""``preview(png_path, image, label, geometry, real)``: draws one written case (the CLI passes a plotter)."""


class DatasetWriter:
    """Writes an nnU-Net v2 raw dataset into a work folder and renames it into place at the end.

    Use it as ``with DatasetWriter(out) as writer: ...; writer.finish(...)``: leaving the block
    without ``finish`` (an exception, Ctrl-C) removes the work folder; or call ``abort`` yourself.
    """

    def __init__(self, out: Path, label_names: dict[int, str] | None = None, preview: Preview | None = None) -> None:
        if out.exists():
            raise DataError(f"{out}: already exists; choose a new --out (nothing is overwritten)")
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise DataError(f"{out.parent}: output folder is not writable")
        self.out = out
        self.folder = AtomicFolder(out)
        self.tmp = self.folder.path
        self.label_names = label_names or {}
        self.preview = preview
        self.count = 0

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> None:
        if kind is None:
            self.abort()  # after ``finish`` there is nothing left to remove
        else:
            self.folder.__exit__(kind, error, trace)  # removed, and a full disk named by the output

    def add(
        self,
        case_id: str,
        image: np.ndarray,
        label: np.ndarray,
        geometry: CaseGeometry,
        provenance: dict[str, Any],
        real: np.ndarray | None = None,
    ) -> None:
        """Write one case (``[X, Y, Z]`` arrays in ``geometry``); ``real`` is shown beside it in the preview."""
        self.add_arrays(case_id, image, label, geometry.affine_array, provenance)
        if self.preview is not None:
            self.preview(self.tmp / "previews" / f"{case_id}.png", image, label, geometry, real)

    def add_arrays(
        self,
        case_id: str,
        image: np.ndarray,
        label: np.ndarray | None,
        affine: np.ndarray,
        provenance: dict[str, Any] | None = None,
        folder: str = "Tr",
    ) -> None:
        """Write ``images{folder}/{case_id}_0000.nii.gz`` (and ``labels{folder}/{case_id}.nii.gz``).

        ``image`` and ``label`` are ``[X, Y, Z]`` arrays with a 4x4 ``affine``; ``folder`` ``Ts``
        writes a test case (``imagesTs``, not counted in ``numTraining``).
        """
        image_file, label_file = case_files(self.tmp, case_id, folder)
        save_nifti(image_file, image, affine)
        if label is not None:
            save_nifti(label_file, label.astype(np.int16), affine)
        if provenance is not None:
            write_json(self.tmp / "provenance" / f"{case_id}.json", provenance)
        self.count += int(folder == "Tr")

    def add_file(self, name: str, payload: dict[str, Any]) -> None:
        write_json(self.tmp / name, payload)

    def finish(self, num_labels: int, channel_name: str) -> Path:
        labels = {i: self.label_names.get(i, "background" if i == 0 else f"label_{i}") for i in range(num_labels)}
        write_json(self.tmp / "dataset.json", dataset_json(channel_name, labels, self.count))
        return self.folder.commit()

    def abort(self) -> None:
        self.folder.discard()


def dataset_folders(data: Path) -> list[tuple[str, Path]]:
    """``[(site, folder)]``: the folder itself, or its ``site_*`` sub-datasets (any sub-datasets if none)."""
    if not data.is_dir():
        raise DataError(f"{data}: dataset folder not found")
    if (data / "labelsTr").is_dir() or (data / "dataset.json").is_file():
        return [(data.name, data)]
    datasets = sorted(p for p in data.iterdir() if p.is_dir() and (p / "labelsTr").is_dir())
    # a cohort root (gem3d demo-data) also holds test/: the sites are its site_* folders
    sites = [p for p in datasets if p.name.startswith("site_")] or datasets
    if not sites:
        raise DataError(f"{data}: neither an nnU-Net raw dataset (labelsTr/) nor a folder of site datasets")
    return [(p.name, p) for p in sites]


def read_grid_cases(data: Path, synth_cfg: Config, spill: Spill) -> list[SpilledCase]:
    """Every case of a dataset (or of each site dataset in ``data``), on the model grid, into ``spill``.

    Every case is read, checked and mapped here, before any work starts; its arrays then wait on
    disk (``gem3d.data.spill``), so memory holds one case at a time whatever the dataset's size.
    """
    cfg = synth_cfg.data
    cases = []
    for site, folder in dataset_folders(data):
        listing = discover("nnunet", folder, cfg.channel)
        for files in listing.cases:
            problem = check_case_headers(files)
            if problem is not None:
                raise DataError(problem)
        values = listing.declared_labels or tuple(range(cfg.num_labels))
        if len(values) > cfg.num_labels:
            raise DataError(f"{folder}: declares {len(values)} labels but data.num_labels is {cfg.num_labels}")
        for files in listing.cases:
            case = read_case(files, listing.declared_labels)
            grid = to_model_grid(case.image, case.label, case.affine, cfg, values, source=str(files.label))
            assert grid.image is not None and grid.label is not None
            cases.append(SpilledCase(case.case_id, site, grid.geometry, spill.put(grid.image), spill.put(grid.label)))
    if not cases:
        raise DataError(f"{data}: no cases found")
    return cases
