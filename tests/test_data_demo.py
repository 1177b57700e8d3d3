"""The demo cohort (valid labels, sites that differ, deterministic) and site partitioning."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from experiments.cli import main
from gem3d.config import DataConfig
from gem3d.data.demo_cohort import write_demo_cohort
from gem3d.data.partition import partition_cases, partition_prepared
from gem3d.data.prepare import PrepareOptions, prepare_dataset
from gem3d.errors import DataError


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 sites x 3 cases + 1 test case per site, 16 px, with a lesion label."""
    return write_demo_cohort(
        tmp_path_factory.mktemp("demo") / "cohort", sites=3, cases_per_site=3, size=16, lesion=True
    )


def _cases(folder: Path) -> list[tuple[np.ndarray, np.ndarray, nib.Nifti1Image]]:
    out = []
    for path in sorted((folder / "imagesTr").glob("*.nii.gz")):
        image = nib.load(path)
        label = nib.load(folder / "labelsTr" / path.name.replace("_0000.nii.gz", ".nii.gz"))
        out.append((np.asarray(image.dataobj, dtype=np.float32), np.asarray(label.dataobj), image))
    return out


def test_demo_cohort_is_nnunet_raw_per_site_with_valid_labels(cohort: Path) -> None:
    # execute
    folders = sorted(p.name for p in cohort.iterdir() if p.is_dir())
    meta = json.loads((cohort / "site_0" / "dataset.json").read_text())
    # assert
    assert folders == ["site_0", "site_1", "site_2", "test"]
    assert meta["labels"] == {"background": 0, "CSF": 1, "GM": 2, "WM": 3, "lesion": 4}
    assert len(_cases(cohort / "test")) == 3
    for site in ("site_0", "site_1", "site_2"):
        cases = _cases(cohort / site)
        assert len(cases) == 3
        for image, label, nifti in cases:
            assert image.shape == label.shape and np.isfinite(image).all()
            assert set(np.unique(label)) <= {0, 1, 2, 3, 4}
            assert {2, 3} <= set(np.unique(label))  # grey and white matter in every case
            assert max(nifti.shape[:2]) == 16
    assert "one template" in json.loads((cohort / "cohort.json").read_text())["what"]


def test_demo_sites_differ_in_intensity_statistics(cohort: Path) -> None:
    # prepare: per site, the mean intensity of each tissue relative to white matter (scale-free), and noise
    stats = {}
    for site in ("site_0", "site_1", "site_2"):
        ratios = []
        for image, label, _ in _cases(cohort / site):
            wm = image[label == 3].mean()
            ratios.append([image[label == k].mean() / wm for k in (1, 2)] + [image[label == 0].std() / wm])
        stats[site] = np.array(ratios)
    # execute: the spread between sites against the spread within a site
    means = np.stack([s.mean(axis=0) for s in stats.values()])
    within = np.stack([s.std(axis=0) for s in stats.values()]).mean(axis=0)
    between = means.std(axis=0)
    # assert
    assert (between > 2 * within).any(), (between, within)
    raw_scale = [np.mean([c[0].max() for c in _cases(cohort / s)]) for s in stats]
    assert max(raw_scale) > 1.5 * min(raw_scale)


def test_demo_cohort_is_deterministic_and_cases_differ(tmp_path: Path) -> None:
    # execute
    a = write_demo_cohort(tmp_path / "a", sites=1, cases_per_site=2, size=12, seed=3, test_per_site=0)
    b = write_demo_cohort(tmp_path / "b", sites=1, cases_per_site=2, size=12, seed=3, test_per_site=0)
    # assert
    (image_a0, label_a0, _), (_, label_a1, _) = _cases(a / "site_0")
    (image_b0, label_b0, _), _ = _cases(b / "site_0")
    np.testing.assert_array_equal(image_a0, image_b0)
    np.testing.assert_array_equal(label_a0, label_b0)
    assert (label_a0 != label_a1).mean() > 0.01  # each case is its own deformation
    with pytest.raises(DataError, match="already exists"):
        write_demo_cohort(tmp_path / "a", sites=1, cases_per_site=1, size=12)


def test_a_pooled_cohort_holds_the_same_cases_in_one_folder(tmp_path: Path) -> None:
    # execute
    sites = write_demo_cohort(tmp_path / "sites", sites=2, cases_per_site=2, size=12, seed=4, test_per_site=1)
    pooled = write_demo_cohort(tmp_path / "pooled", sites=2, cases_per_site=2, size=12, seed=4, pooled=True)
    # assert: one training folder with every site's cases, byte for byte; the test split unchanged
    assert sorted(p.name for p in pooled.iterdir() if p.is_dir()) == ["pooled", "test"]
    names = sorted(p.name for p in (pooled / "pooled" / "imagesTr").iterdir())
    assert names == sorted(p.name for s in ("site_0", "site_1") for p in (sites / s / "imagesTr").iterdir())
    for name in names:
        site = "site_0" if name.startswith("site_0_") else "site_1"
        assert (pooled / "pooled" / "imagesTr" / name).read_bytes() == (sites / site / "imagesTr" / name).read_bytes()
    assert json.loads((pooled / "pooled" / "dataset.json").read_text())["numTraining"] == 4
    assert json.loads((pooled / "cohort.json").read_text())["pooled"] is True


def test_demo_data_prepare_train_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # execute: the commands a user runs, on a small cohort and a micro model
    assert (
        main(["demo-data", "--out", str(tmp_path / "x"), "--sites", "2", "--cases-per-site", "2", "--size", "16"]) == 0
    )
    config = tmp_path / "micro.toml"
    config.write_text(
        "[data]\nimage_size = 16\nwindow = 4\nnum_labels = 4\n"
        "[model]\nchannels = [8, 16]\nattention_levels = [false, true]\nnorm_num_groups = 4\nnum_head_channels = 8\n"
        "[train]\nbatch_size = 2\n"
    )
    prepared = main(
        [
            "prepare",
            "--layout",
            "nnunet",
            "--input",
            str(tmp_path / "x" / "site_1"),
            "--output",
            str(tmp_path / "p"),
            "--config",
            str(config),
        ]
    )
    trained = main(
        [
            "train",
            "--config",
            str(config),
            "--data",
            str(tmp_path / "p"),
            "--stage",
            "slice",
            "--out",
            str(tmp_path / "r"),
            "--steps",
            "2",
        ]
    )
    # assert
    assert prepared == 0 and trained == 0
    assert (tmp_path / "r" / "slice.safetensors").exists()


def _records(n: int) -> list[dict[str, object]]:
    return [{"id": f"c{i:02d}", "stats": {"foreground_fraction": i / n, "spacing_z": 1.0 + (i % 3)}} for i in range(n)]


@pytest.mark.parametrize("scheme", ["iid", "field", "dirichlet"])
def test_partition_covers_every_case_once_with_no_empty_site(scheme: str) -> None:
    # execute
    sites = partition_cases(
        _records(20), 4, scheme, field="spacing_z" if scheme == "field" else None, alpha=0.1, seed=1
    )  # type: ignore[arg-type]
    # assert
    flat = [case for site in sites for case in site]
    assert len(sites) == 4 and all(sites)
    assert sorted(flat) == [f"c{i:02d}" for i in range(20)]
    assert (
        partition_cases(_records(20), 4, scheme, field="spacing_z" if scheme == "field" else None, alpha=0.1, seed=1)
        == sites
    )  # type: ignore[arg-type]


def test_non_iid_partitions_skew_the_field() -> None:
    # execute
    by_field = partition_cases(_records(30), 3, "field", field="foreground_fraction")
    iid = partition_cases(_records(30), 3, "iid", seed=0)
    # assert: sorted blocks by the field vs a shuffle
    index = {f"c{i:02d}": i for i in range(30)}
    field_means = [np.mean([index[c] for c in site]) for site in by_field]
    iid_means = [np.mean([index[c] for c in site]) for site in iid]
    assert np.std(field_means) > 3 * np.std(iid_means)
    with pytest.raises(DataError, match="no field 'scanner'"):
        partition_cases(_records(6), 2, "field", field="scanner")
    with pytest.raises(DataError, match="cannot split 2 cases into 3 sites"):
        partition_cases(_records(2), 3)


def test_partition_prepared_reads_the_manifest(phantom_dir: Path, tmp_path: Path) -> None:
    # prepare
    prepare_dataset(phantom_dir, tmp_path / "p", DataConfig(image_size=16, window=4), PrepareOptions())
    # execute
    sites = partition_prepared(tmp_path / "p", 2, "dirichlet", alpha=1.0)
    # assert
    assert sorted(c for s in sites for c in s) == ["phantom_000", "phantom_001", "phantom_002", "phantom_003"]
