"""Load a dataset folder into training volumes: a prepared cache, or a raw dataset read on the fly.

A prepared cache (``manifest.json``, from ``gem3d prepare``) is memory-mapped. A raw folder
(nnU-Net v2 raw, or MSD when its ``dataset.json`` lists ``training`` pairs) goes through the same
validation and model-grid mapping as ``gem3d prepare`` (``gem3d.data.geometry.to_model_grid``), in
memory, with the label table that ``dataset.json`` declares (or the identity 0..num_labels-1).
"""

from __future__ import annotations

import json
from pathlib import Path

from gem3d.config import DataConfig
from gem3d.data.geometry import to_model_grid
from gem3d.data.layouts import Layout, check_case_headers, discover, read_case
from gem3d.data.prepare import MANIFEST, load_prepared
from gem3d.data.volume import Volume
from gem3d.errors import DataError


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


def load_raw(data_dir: str | Path, cfg: DataConfig, layout: Layout | None = None) -> list[Volume]:
    """Read, check and map every case of a raw dataset to the model grid (nothing is cached).

    Returns:
        one ``Volume`` per case (``[D, H, W]``), sorted by case id.
    """
    data_dir = Path(data_dir)
    listing = discover(layout or detect_layout(data_dir), data_dir, cfg.channel)
    for files in listing.cases:
        problem = check_case_headers(files)
        if problem is not None:
            raise DataError(problem)
    label_values = listing.declared_labels or tuple(range(cfg.num_labels))
    if len(label_values) > cfg.num_labels:
        raise DataError(f"{data_dir}: declares {len(label_values)} labels but data.num_labels is {cfg.num_labels}")
    volumes = []
    for files in listing.cases:
        case = read_case(files, listing.declared_labels)
        grid = to_model_grid(case.image, case.label, case.affine, cfg, label_values, source=str(files.label))
        assert grid.image is not None and grid.label is not None
        volumes.append(Volume(case_id=case.case_id, image=grid.image, label=grid.label))
    return sorted(volumes, key=lambda v: v.case_id)


def load_volumes(data_dir: str | Path, cfg: DataConfig, case_ids: list[str] | None = None) -> list[Volume]:
    """Load every case of a prepared cache (``manifest.json``) or a raw nnU-Net v2 / MSD folder.

    Args:
        case_ids: only these cases of a prepared cache (e.g. one simulated site's partition).
    Returns:
        one ``Volume`` per case, ``image`` ``[D, H, W]`` float32 in [-1, 1], ``label`` uint8, sorted by id.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: dataset folder not found")
    if (data_dir / MANIFEST).exists():
        return load_prepared(data_dir, cfg, case_ids)
    volumes = load_raw(data_dir, cfg)
    if case_ids is not None:
        wanted = set(case_ids)
        volumes = [v for v in volumes if v.case_id in wanted]
    return volumes
