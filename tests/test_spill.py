"""The spill (``gem3d.data.spill``): a cohort's arrays wait on disk in a private folder that never outlives the run."""

from __future__ import annotations

import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest

from experiments.cli import main
from gem3d.data.spill import Spill
from gem3d.errors import DataError


@pytest.fixture
def spill_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder that ``tempfile`` (so ``Spill.temporary``) uses as its temporary directory."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_arrays_come_back_as_they_went_in_and_the_folder_is_private_and_removed(spill_root: Path) -> None:
    # prepare
    rng = np.random.default_rng(0)
    image = rng.standard_normal((5, 8, 8)).astype(np.float32)
    label = rng.integers(0, 4, (5, 8, 8)).astype(np.uint8)

    # execute
    with Spill.temporary() as spill:
        stored = [spill.put(image), spill.put(label[:, ::2])]  # a non-contiguous view too
        loaded = [s.load() for s in stored]
        mode = stat.S_IMODE(spill.folder.stat().st_mode)
        on_disk = sum(p.stat().st_size for p in spill.folder.iterdir())

    # assert
    assert loaded[0].dtype == np.float32 and loaded[0].tobytes() == image.tobytes()
    assert loaded[1].dtype == np.uint8 and np.array_equal(loaded[1], label[:, ::2])
    assert mode == 0o700  # patient-derived arrays: readable by this user only
    assert on_disk >= image.nbytes + label[:, ::2].nbytes
    assert list(spill_root.iterdir()) == []


def test_the_spill_is_removed_when_the_work_fails(spill_root: Path) -> None:
    # execute
    with pytest.raises(RuntimeError), Spill.temporary() as spill:
        spill.put(np.zeros((2, 2, 2), np.float32))
        raise RuntimeError("a failure half-way")

    # assert
    assert list(spill_root.iterdir()) == []


def test_a_missing_temporary_folder_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no_such_folder"))

    # execute / assert
    with pytest.raises(DataError, match="no_such_folder: cannot make a temporary folder"), Spill.temporary():
        pass


def test_gem3d_enhance_leaves_no_spill_behind_and_names_a_bad_tmpdir(
    micro_run: Path, phantom_dir: Path, tmp_path: Path, spill_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # prepare
    args = ["enhance", "--checkpoint", str(micro_run), "--data", str(phantom_dir), "--steps", "1", "--track", "off"]

    # execute: a run that works, one whose mask edit fails while planning, one with no temporary folder
    done = main([*args, "--out", str(tmp_path / "enhanced")])
    failed = main([*args, "--mask-edit", "remove:9", "--out", str(tmp_path / "failed")])
    left = list(spill_root.iterdir())
    capsys.readouterr()
    spill_root.rmdir()
    missing = main([*args, "--out", str(tmp_path / "no_tmp")])

    # assert
    assert done == 0 and len(list((tmp_path / "enhanced" / "imagesTr").glob("*.nii.gz"))) == 4
    assert failed == 2 and not (tmp_path / "failed").exists()
    assert left == []
    error = capsys.readouterr().err.strip()
    assert missing == 2 and error.endswith("cannot make a temporary folder (No such file or directory)")
    assert len(error.splitlines()) == 1 and not (tmp_path / "no_tmp").exists()
