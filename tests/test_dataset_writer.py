"""The one nnU-Net dataset writer: whole or nothing, and the phantoms go through it (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gem3d.data.nnunet_raw import DatasetWriter, case_files
from gem3d.data.phantoms import phantom_affine, write_phantom_dataset


def test_a_finished_dataset_appears_whole_in_the_nnunet_layout(tmp_path: Path) -> None:
    out = tmp_path / "Dataset001_x"

    with DatasetWriter(out, label_names={1: "core"}) as writer:
        writer.add_arrays("a", np.ones((4, 4, 3), np.float32), np.ones((4, 4, 3), np.uint8), phantom_affine())
        writer.add_arrays("t", np.ones((4, 4, 3), np.float32), None, phantom_affine(), folder="Ts")
        writer.finish(2, "MRI")

    assert all(path.is_file() for path in case_files(out, "a"))
    assert case_files(out, "t", "Ts")[0].is_file() and not (out / "labelsTs").exists()
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == 1 and dataset["labels"] == {"background": 0, "core": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset001_x"]


def test_leaving_the_block_unfinished_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), DatasetWriter(tmp_path / "d") as writer:
        writer.add_arrays("a", np.ones((4, 4, 3), np.float32), np.ones((4, 4, 3), np.uint8), np.eye(4))
        raise KeyboardInterrupt

    assert list(tmp_path.iterdir()) == []


def test_phantoms_are_a_dataset_of_the_writer_and_an_existing_one_is_kept(tmp_path: Path) -> None:
    out = write_phantom_dataset(tmp_path / "p", num_cases=2, shape=(8, 8, 6), num_labels=5)

    with pytest.raises(FileExistsError):
        write_phantom_dataset(out, num_cases=1, shape=(8, 8, 6))

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == 2 and dataset["labels"]["lesion"] == 4
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
