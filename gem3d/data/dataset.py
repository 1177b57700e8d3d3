"""Load a dataset folder into training volumes: a prepared cache, or a raw dataset read on the fly.

A prepared cache (``manifest.json``, from ``gem3d prepare``) is memory-mapped. A raw folder
(nnU-Net v2 raw, or MSD when its ``dataset.json`` lists ``training`` pairs) goes through the same
validation and model-grid mapping as ``gem3d prepare`` (``gem3d.data.geometry.to_model_grid``), in
memory, with the label table that ``dataset.json`` declares (or the identity 0..num_labels-1):
all at once (``load_raw``), or one case each time it is indexed (``RawVolumes``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import overload

import numpy as np

from gem3d.config import DataConfig
from gem3d.data.geometry import to_model_grid
from gem3d.data.layouts import Layout, check_case_headers, discover, read_case
from gem3d.data.prepare import MANIFEST, load_prepared
from gem3d.data.volume import Volume
from gem3d.errors import DataError

LOG = logging.getLogger(__name__)
PARTIAL_COVERAGE = 0.6  # labels spanning less of the slice than this (median case) cover part of the body


def label_coverage(volume: Volume) -> float:
    """The in-plane extent of ``volume``'s labels as a fraction of its slice (the larger of H and W)."""
    points = np.argwhere(volume.label > 0)
    if points.size == 0:
        return 0.0
    extent = points.max(axis=0) - points.min(axis=0) + 1  # [D, H, W]
    return float(max(extent[1] / volume.label.shape[1], extent[2] / volume.label.shape[2]))


def warn_if_partial(volumes: Sequence[Volume], cfg: DataConfig, source: Path) -> None:
    """Log a warning when the labels cover only part of the imaged anatomy and no fixed field of view is set.

    A mask on its own (``gem3d sample``) is then cropped to its labels, a field of view the
    network never saw in training; ``data.field_of_view_mm`` makes both the same.
    """
    if cfg.field_of_view_mm is not None or not volumes:
        return
    coverage = float(np.median([label_coverage(v) for v in volumes]))
    if coverage < PARTIAL_COVERAGE:
        LOG.warning(
            "%s: the labels span %.0f%% of the slice (median case): they cover part of the anatomy; set "
            "data.field_of_view_mm (e.g. the scans' in-plane field of view in mm) so that masks on their own "
            "are sampled at the field of view of training",
            source,
            100 * coverage,
        )


def detect_layout(data_dir: Path) -> Layout:
    """``msd`` when ``dataset.json`` lists ``training`` pairs, else ``nnunet``."""
    meta = data_dir / "dataset.json"
    if meta.is_file():
        try:
            if "training" in json.loads(meta.read_text()):
                return "msd"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{meta}: unreadable dataset.json ({error})") from None
    return "nnunet"


class RawVolumes(Sequence[Volume]):
    """The cases of a raw dataset, sorted by case id, each read, checked and mapped to the model grid when indexed.

    What ``load_raw`` returns, without holding the dataset: a caller that goes through the cases a
    few at a time (the release's audit of its candidates) holds a few cases, whatever their number
    (issue 16). The listing, every case's header and the label table are checked here, up front.
    """

    def __init__(self, data_dir: str | Path, cfg: DataConfig, layout: Layout | None = None) -> None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: dataset folder not found")
        listing = discover(layout or detect_layout(data_dir), data_dir, cfg.channel)
        for files in listing.cases:
            problem = check_case_headers(files)
            if problem is not None:
                raise DataError(problem)
        self.label_values = listing.declared_labels or tuple(range(cfg.num_labels))
        if len(self.label_values) > cfg.num_labels:
            raise DataError(
                f"{data_dir}: declares {len(self.label_values)} labels but data.num_labels is {cfg.num_labels}"
            )
        self.cfg = cfg
        self.declared_labels = listing.declared_labels
        self.files = sorted(listing.cases, key=lambda files: files.case_id)

    def __len__(self) -> int:
        return len(self.files)

    @overload
    def __getitem__(self, index: int) -> Volume: ...

    @overload
    def __getitem__(self, index: slice) -> list[Volume]: ...

    def __getitem__(self, index: int | slice) -> Volume | list[Volume]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        files = self.files[index]
        case = read_case(files, self.declared_labels)
        grid = to_model_grid(case.image, case.label, case.affine, self.cfg, self.label_values, source=str(files.label))
        assert grid.image is not None and grid.label is not None
        return Volume(case_id=case.case_id, image=grid.image, label=grid.label)


def load_raw(data_dir: str | Path, cfg: DataConfig, layout: Layout | None = None) -> list[Volume]:
    """Read, check and map every case of a raw dataset to the model grid (nothing is cached).

    Returns:
        one ``Volume`` per case (``[D, H, W]``), sorted by case id.
    """
    return list(RawVolumes(data_dir, cfg, layout))


def load_volumes(
    data_dir: str | Path, cfg: DataConfig, case_ids: list[str] | None = None, warn_partial: bool = True
) -> list[Volume]:
    """Load every case of a prepared cache (``manifest.json``) or a raw nnU-Net v2 / MSD folder.

    Args:
        case_ids: only these cases of a prepared cache (e.g. one simulated site's partition).
        warn_partial: warn when the labels cover part of the anatomy (``warn_if_partial``): for
            training data; a reader that never samples a mask on its own (the audit) turns it off.
    Returns:
        one ``Volume`` per case, ``image`` ``[D, H, W]`` float32 in [-1, 1], ``label`` uint8, sorted by id.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: dataset folder not found")
    if (data_dir / MANIFEST).exists():
        volumes = load_prepared(data_dir, cfg, case_ids)
    else:
        volumes = load_raw(data_dir, cfg)
        if case_ids is not None:
            wanted = set(case_ids)
            volumes = [v for v in volumes if v.case_id in wanted]
    if warn_partial:
        warn_if_partial(volumes, cfg, data_dir)
    return volumes
