"""The one nnU-Net v2 raw dataset writer: ``imagesTr``, ``labelsTr``, ``dataset.json``, written atomically.

Cases go into a temporary folder beside the target, which is renamed into place by ``finish``; an
existing target is never overwritten, and ``abort`` leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gem3d.data.geometry import CaseGeometry
from gem3d.data.nifti import save_nifti
from gem3d.errors import DataError
from gem3d.files import work_folder_beside, write_json


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


Preview = Callable[[Path, np.ndarray, np.ndarray, CaseGeometry, "np.ndarray | None"], Any]
"""``preview(png_path, image, label, geometry, real)``: draws one written case (the CLI passes a plotter)."""


class DatasetWriter:
    """Writes an nnU-Net v2 raw dataset into a temporary folder and renames it into place at the end."""

    def __init__(self, out: Path, label_names: dict[int, str] | None = None, preview: Preview | None = None) -> None:
        if out.exists():
            raise DataError(f"{out}: already exists; choose a new --out (nothing is overwritten)")
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise DataError(f"{out.parent}: output folder is not writable")
        self.out = out
        self.tmp = work_folder_beside(out)
        self.label_names = label_names or {}
        self.preview = preview
        self.count = 0

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
        save_nifti(self.tmp / f"images{folder}" / f"{case_id}_0000.nii.gz", image, affine)
        if label is not None:
            save_nifti(self.tmp / f"labels{folder}" / f"{case_id}.nii.gz", label.astype(np.int16), affine)
        if provenance is not None:
            write_json(self.tmp / "provenance" / f"{case_id}.json", provenance)
        self.count += int(folder == "Tr")

    def add_file(self, name: str, payload: dict[str, Any]) -> None:
        write_json(self.tmp / name, payload)

    def finish(self, num_labels: int, channel_name: str) -> Path:
        labels = {i: self.label_names.get(i, "background" if i == 0 else f"label_{i}") for i in range(num_labels)}
        write_json(self.tmp / "dataset.json", dataset_json(channel_name, labels, self.count))
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
