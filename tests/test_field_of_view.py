"""Masks that cover part of the anatomy: training and mask-only sampling share one field of view.

A "body" (an ellipse of signal 60 x 48 mm) holds an "organ" label of 16 x 12 mm: under a third
of the body in each in-plane direction. With each case's own box, the organ alone is stretched
to fill the slice; with ``data.field_of_view_mm`` it keeps the in-plane scale of training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from experiments.cli import main
from gem3d.config import Config, DataConfig
from gem3d.data.dataset import load_volumes
from gem3d.data.geometry import mask_to_model_grid, to_model_grid
from gem3d.errors import DataError
from gem3d.runs import train_stage

SPACING = (1.5, 1.5, 2.0)
AFFINE = np.diag([*SPACING, 1.0])
SHAPE = (48, 40, 8)


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    body = ((x - 24) / 20) ** 2 + ((y - 20) / 16) ** 2 <= 1  # 60 x 48 mm
    organ = (np.abs(x - 18 - seed % 3) < 5.5) & (np.abs(y - 22) < 4)  # 16.5 x 12 mm, off the body's centre
    image = np.where(body, 100.0, 0.0)[..., None].repeat(SHAPE[2], 2) + rng.normal(0, 2, SHAPE)
    image[organ[..., None].repeat(SHAPE[2], 2)] += 80.0
    label = np.zeros(SHAPE, np.uint8)
    label[..., 2:6][organ] = 1
    return image.astype(np.float32), label


def _dataset(root: Path, cases: int = 3) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(cases):
        image, label = _case(i)
        nib.save(nib.Nifti1Image(image, AFFINE), root / "imagesTr" / f"body_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), root / "labelsTr" / f"body_{i:03d}.nii.gz")
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1}, "numTraining": cases,
            "file_ending": ".nii.gz"}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _pixel_mm(cfg: DataConfig, image: np.ndarray | None, label: np.ndarray) -> float:
    geometry = to_model_grid(image, label, AFFINE, cfg, label_values=(0, 1)).geometry
    return (geometry.box_hi[0] - geometry.box_lo[0]) * SPACING[0] / cfg.image_size


def test_the_labels_cover_under_a_third_of_the_body() -> None:
    image, label = _case(0)
    body, organ = np.argwhere(image[..., 4] > 50), np.argwhere(label[..., 4] > 0)
    for axis in (0, 1):
        assert np.ptp(organ[:, axis]) + 1 < (np.ptp(body[:, axis]) + 1) / 3


def test_a_mask_on_its_own_gets_the_training_scale_only_with_a_fixed_field_of_view() -> None:
    image, label = _case(0)
    own_box = DataConfig(image_size=16, num_labels=2)
    fixed = DataConfig(image_size=16, num_labels=2, field_of_view_mm=90.0)

    # each case's own box: training sees 60+ mm across the slice, the lone mask ~20 mm (the problem)
    assert _pixel_mm(own_box, None, label) < 0.5 * _pixel_mm(own_box, image, label)
    # one field of view: the same mm per model pixel, and the organ covers the same model pixels
    assert (
        _pixel_mm(fixed, None, label) == pytest.approx(_pixel_mm(fixed, image, label)) == pytest.approx(90 / 16, 0.05)
    )
    trained = to_model_grid(image, label, AFFINE, fixed, label_values=(0, 1)).label
    alone = to_model_grid(None, label, AFFINE, fixed, label_values=(0, 1)).label
    assert trained is not None and alone is not None
    assert abs(int((alone > 0).sum()) - int((trained > 0).sum())) <= 0.1 * int((trained > 0).sum())


def test_labels_outside_the_field_of_view_are_refused_naming_the_file(tmp_path: Path) -> None:
    _, label = _case(0)
    path = tmp_path / "organ.nii.gz"
    nib.save(nib.Nifti1Image(label, AFFINE), path)

    with pytest.raises(DataError, match=r"organ.nii.gz: its labels reach outside data.field_of_view_mm = 9") as caught:
        mask_to_model_grid(path, DataConfig(image_size=16, num_labels=2, field_of_view_mm=9.0))
    assert "\n" not in str(caught.value)


def test_training_on_partial_labels_without_a_field_of_view_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _dataset(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="gem3d.data.dataset"):
        load_volumes(data, DataConfig(image_size=16, num_labels=2))
    assert "data.field_of_view_mm" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gem3d.data.dataset"):
        load_volumes(data, DataConfig(image_size=16, num_labels=2, field_of_view_mm=90.0))
    assert caplog.text == ""


def test_sample_from_an_organ_mask_at_the_training_field_of_view(micro_cfg: Config, tmp_path: Path) -> None:
    # prepare: a micro run trained with a 90 mm field of view on the partial-label dataset
    data = _dataset(tmp_path / "data")
    cfg = micro_cfg.model_copy(
        update={"data": micro_cfg.data.model_copy(update={"num_labels": 2, "field_of_view_mm": 90.0})}
    )
    volumes = load_volumes(data, cfg.data)
    for stage, steps in (("slice", 2), ("volume", 1)):
        train_stage(cfg, volumes, stage, tmp_path / "run", steps=steps)  # type: ignore[arg-type]
    mask = data / "labelsTr" / "body_001.nii.gz"
    image = data / "imagesTr" / "body_001_0000.nii.gz"
    # execute
    code = main(["sample", "--checkpoint", str(tmp_path / "run"), "--mask", str(mask), "--informed",
                 f"real:{image}", "--out", str(tmp_path / "out.nii.gz"), "--track", "off"])  # fmt: skip
    # assert: the mask's own geometry on disk; the field of view recorded with the output
    assert code == 0
    out = nib.load(tmp_path / "out.nii.gz")
    assert out.shape == SHAPE
    np.testing.assert_allclose(out.affine, AFFINE)
    provenance = json.loads((tmp_path / "out.provenance.json").read_text())
    assert provenance["field_of_view_mm"] == 90.0
    assert provenance["config"]["data"]["field_of_view_mm"] == 90.0
