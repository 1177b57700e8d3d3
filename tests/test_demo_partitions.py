"""`flwr run .` from a fresh clone: a simulated site with nothing prepared builds its demo partition (issue 13)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from client.task import locate_site, site_volumes
from gem3d.config import Config
from gem3d.data.demo_cohort import DEMO_ROOT_MARKER, write_demo_cohort
from gem3d.errors import DataError


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.nii.gz"))
    }


def test_a_simulated_site_builds_the_partition_the_demo_cohort_gives_it(tmp_path: Path) -> None:
    # prepare: nothing at the data root; the cohort written by `gem3d demo-data` for comparison
    root = tmp_path / "demo_out" / "data"
    reference = write_demo_cohort(tmp_path / "reference", sites=3, cases_per_site=6, seed=0)

    # execute: site 1 of a 3-site simulation asks for its data
    site = locate_site({"partition-id": 1, "num-partitions": 3}, {"data-root": str(root), "demo-data": True})

    # assert: its folder exists, holds exactly site_1 of the cohort, and only that site was built
    assert site.data_dir == root / "site_1"
    assert _digest(site.data_dir) == _digest(reference / "site_1")
    assert sorted(p.name for p in root.iterdir()) == [DEMO_ROOT_MARKER, "site_1"]


def test_a_real_data_root_missing_a_site_is_an_error_not_demo_data(tmp_path: Path, micro_cfg: Config) -> None:
    # prepare: a data root of real sites, site_1 missing
    root = tmp_path / "hospitals"
    (root / "site_0").mkdir(parents=True)

    site = locate_site({"partition-id": 1, "num-partitions": 2}, {"data-root": str(root), "demo-data": True})

    assert not site.data_dir.exists()
    with pytest.raises(DataError, match=r"site_1: data folder .* does not exist"):
        site_volumes(site, micro_cfg)


def test_demo_data_off_builds_nothing(tmp_path: Path) -> None:
    root = tmp_path / "data"

    site = locate_site({"partition-id": 0, "num-partitions": 2}, {"data-root": str(root), "demo-data": False})

    assert not site.data_dir.exists() and not root.exists()
