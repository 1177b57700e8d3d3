"""Every bad input to ``gem3d prepare``: one line naming the file and problem, exit 2, nothing written."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from experiments.cli import main
from gem3d.data.prepare import read_manifest
from tests.conftest import copy_dataset

CASE = "phantom_001"


def _image(root: Path) -> Path:
    return root / "imagesTr" / f"{CASE}_0000.nii.gz"


def _label(root: Path) -> Path:
    return root / "labelsTr" / f"{CASE}.nii.gz"


def _rewrite(path: Path, change: Callable[[np.ndarray], np.ndarray], affine: np.ndarray | None = None) -> None:
    image = nib.load(path)
    data = change(np.asarray(image.dataobj))
    nib.save(nib.Nifti1Image(data, image.affine if affine is None else affine), path)


def _dataset_json(root: Path, **changes: object) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta))


def corrupt(root: Path) -> None:
    _image(root).write_bytes(b"this is not a NIfTI file at all" * 20)


def truncated(root: Path) -> None:
    raw = gzip.decompress(_image(root).read_bytes())
    _image(root).write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])


def two_dimensional(root: Path) -> None:
    _rewrite(_image(root), lambda a: a[:, :, 0])


def four_dimensional(root: Path) -> None:
    _rewrite(_image(root), lambda a: np.stack([a, a], axis=-1))


def nan_voxels(root: Path) -> None:
    _rewrite(_image(root), lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, np.nan, a).astype(np.float32))


def inf_voxels(root: Path) -> None:
    _rewrite(_image(root), lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, np.inf, a).astype(np.float32))


def shape_mismatch(root: Path) -> None:
    _rewrite(_label(root), lambda a: a[:-2])


def affine_mismatch(root: Path) -> None:
    _rewrite(_label(root), lambda a: a, affine=np.diag([1.0, 1.0, 3.0, 1.0]))


def non_integer_labels(root: Path) -> None:
    _rewrite(_label(root), lambda a: a.astype(np.float32) * 0.5)


def negative_labels(root: Path) -> None:
    _rewrite(_label(root), lambda a: a.astype(np.int16) - 1)


def unexpected_labels(root: Path) -> None:
    _rewrite(_label(root), lambda a: np.where(a == 3, 7, a).astype(np.uint8))


def empty_labels(root: Path) -> None:
    _rewrite(_label(root), np.zeros_like)


def missing_label(root: Path) -> None:
    _label(root).unlink()


def missing_image(root: Path) -> None:
    _image(root).unlink()


def duplicate_id(root: Path) -> None:
    shutil.copy(_label(root), root / "labelsTr" / f"{CASE}.nii")


def num_training_disagrees(root: Path) -> None:
    _dataset_json(root, numTraining=9)


def channels_disagree(root: Path) -> None:
    _dataset_json(root, channel_names={"0": "T1", "1": "T2"})


def no_dataset_json(root: Path) -> None:
    (root / "dataset.json").unlink()


def no_labels_declared(root: Path) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    del meta["labels"]
    (root / "dataset.json").write_text(json.dumps(meta))


def header_claims_4000_cubed(root: Path) -> None:
    # a truncated download whose header still claims a huge volume: the image, not the label, is named
    image = nib.load(_image(root))
    header = image.header.copy()
    header.set_data_shape((4000, 4000, 4000))
    raw = gzip.decompress(_image(root).read_bytes())
    _image(root).write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + raw[352:][:1000]))


BAD_INPUTS = [
    (no_dataset_json, "no dataset.json", "data"),
    (no_labels_declared, "no 'labels'", "dataset.json"),
    (header_claims_4000_cubed, "cannot hold them", "imagesTr"),
    (corrupt, "unreadable or corrupt", "imagesTr"),
    (truncated, "truncated or corrupt", "imagesTr"),
    (two_dimensional, "expected a 3D volume", "imagesTr"),
    (four_dimensional, "4D image", "imagesTr"),
    (nan_voxels, "NaN or Inf", "imagesTr"),
    (inf_voxels, "NaN or Inf", "imagesTr"),
    (shape_mismatch, "differs from image shape", "labelsTr"),
    (affine_mismatch, "affine differs", "labelsTr"),
    (non_integer_labels, "non-integer", "labelsTr"),
    (negative_labels, "negative", "labelsTr"),
    (unexpected_labels, "unexpected label values [7]", "labelsTr"),
    (empty_labels, "empty label map", "labelsTr"),
    (missing_label, "missing label", "labelsTr"),
    (missing_image, "missing image", "imagesTr"),
    (duplicate_id, "duplicate case id", "labelsTr"),
    (num_training_disagrees, "numTraining is 9", "dataset.json"),
    (channels_disagree, "has channels [0]", "imagesTr"),
]


def _run_prepare(root: Path, out: Path, *extra: str) -> int:
    return main(["prepare", "--layout", "nnunet", "--input", str(root), "--output", str(out), *extra])


@pytest.mark.parametrize(("make_bad", "problem", "where"), BAD_INPUTS, ids=[b[0].__name__ for b in BAD_INPUTS])
def test_bad_input_gives_one_line_and_writes_nothing(
    phantom_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_bad: Callable[[Path], None],
    problem: str,
    where: str,
) -> None:
    # prepare
    root = tmp_path / "data"
    copy_dataset(phantom_dir, root)
    make_bad(root)
    out = tmp_path / "out" / "prepared"
    # execute
    code = _run_prepare(root, out)
    # assert
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert problem in err and where in err, err
    assert not (tmp_path / "out").exists()


def test_skip_invalid_reports_bad_cases_and_keeps_the_rest(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # prepare: one case with NaNs, one with a missing label
    root = tmp_path / "data"
    copy_dataset(phantom_dir, root)
    nan_voxels(root)
    (root / "labelsTr" / "phantom_002.nii.gz").unlink()
    out = tmp_path / "prepared"
    # execute
    code = _run_prepare(root, out, "--skip-invalid")
    # assert
    err = capsys.readouterr().err
    assert code == 0
    assert "skipped phantom_001" in err and "skipped phantom_002" in err
    manifest = read_manifest(out)
    assert [c["id"] for c in manifest["cases"]] == ["phantom_000", "phantom_003"]
    assert {s["id"] for s in manifest["skipped"]} == {"phantom_001", "phantom_002"}


def test_unknown_layout_and_unwritable_output(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # prepare: an output whose parent is a file, so nothing can be created there
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    # execute
    unknown = main(["prepare", "--layout", "dicom", "--input", str(phantom_dir), "--output", str(tmp_path / "o")])
    unknown_err = capsys.readouterr().err.strip()
    unwritable = _run_prepare(phantom_dir, blocker / "prepared")
    unwritable_err = capsys.readouterr().err.strip()
    exists = _run_prepare(phantom_dir, blocker)
    exists_err = capsys.readouterr().err.strip()
    # assert
    assert unknown == 2 and "unknown layout 'dicom'" in unknown_err and len(unknown_err.splitlines()) == 1
    assert unwritable == 2 and "not writable" in unwritable_err and str(blocker) in unwritable_err
    assert exists == 2 and "already exists" in exists_err
    assert not (tmp_path / "o").exists()


def test_other_layouts_report_missing_pairs_and_duplicates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # prepare: AbdomenCT-1K with a case in two part folders; BraTS subject without a segmentation
    image = nib.Nifti1Image(np.ones((8, 8, 8), dtype=np.float32), np.eye(4))
    for part in ("Part1", "Part2"):
        (tmp_path / "ct" / part).mkdir(parents=True)
        nib.save(image, tmp_path / "ct" / part / "Case_00001_0000.nii.gz")
    (tmp_path / "ct" / "Mask").mkdir()
    nib.save(image, tmp_path / "ct" / "Mask" / "Case_00001.nii.gz")
    (tmp_path / "brats" / "S1").mkdir(parents=True)
    nib.save(image, tmp_path / "brats" / "S1" / "S1_flair.nii.gz")
    # execute
    ct = main(["prepare", "--layout", "abdomenct1k", "--input", str(tmp_path / "ct"), "--output", str(tmp_path / "o1")])
    ct_err = capsys.readouterr().err
    brats = main(["prepare", "--layout", "brats", "--input", str(tmp_path / "brats"), "--output", str(tmp_path / "o2")])
    brats_err = capsys.readouterr().err
    # assert
    assert ct == 2 and "duplicate case id 'Case_00001'" in ct_err
    assert brats == 2 and "missing the segmentation" in brats_err and "S1" in brats_err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
