"""The dataset decides its labels and modality (issue 13); a --set that contradicts it is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.cli import main
from gem3d.data.layouts import declared_data
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.data.prepare import read_manifest


@pytest.fixture(scope="module")
def five_labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_dataset(
        tmp_path_factory.mktemp("five") / "data", num_cases=2, shape=(16, 16, 12), num_labels=5
    )


def test_prepare_takes_the_number_of_labels_from_dataset_json(five_labels: Path, tmp_path: Path) -> None:
    # tiny.toml says 4 labels; the dataset declares 5 (a lesion label)
    code = main(["prepare", "--layout", "nnunet", "--input", str(five_labels), "--output", str(tmp_path / "p"),
                 "--config", "tiny"])  # fmt: skip

    assert code == 0
    manifest = read_manifest(tmp_path / "p")
    assert manifest["label_values"] == [0, 1, 2, 3, 4]
    assert declared_data(tmp_path / "p") == {"data.num_labels": 5, "data.modality": "mri"}


def test_a_set_that_contradicts_the_dataset_is_one_line_naming_it(
    five_labels: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["prepare", "--layout", "nnunet", "--input", str(five_labels), "--output", str(tmp_path / "p"),
                 "--config", "tiny", "--set", "data.num_labels=4"])  # fmt: skip

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--set data.num_labels=4" in err and "num_labels = 5" in err
    assert not (tmp_path / "p").exists()


def test_a_ct_dataset_declares_ct(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"bg": 0, "liver": 1}}))

    assert declared_data(tmp_path) == {"data.num_labels": 2, "data.modality": "ct"}
    assert declared_data(tmp_path / "nothing") == {}
