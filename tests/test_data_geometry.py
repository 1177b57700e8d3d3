"""Geometry: prepare, then invert, restores the original grid (checked with nibabel on the written files)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from experiments.cli import main
from gem3d.config import DataConfig
from gem3d.data.geometry import CaseGeometry, mask_to_model_grid, to_model_grid, to_original_grid
from gem3d.data.nifti import save_nifti
from gem3d.data.prepare import case_geometry, load_prepared, read_manifest, typical_intensity
from gem3d.errors import DataError

# An oblique-free but awkward affine: axes permuted (file x is world -y), flipped, anisotropic.
AFFINE = np.array([[0.0, 0.0, -2.0, 40.0], [-1.25, 0.0, 0.0, 25.0], [0.0, 1.5, 0.0, -30.0], [0.0, 0.0, 0.0, 1.0]])


def _case(shape: tuple[int, int, int] = (24, 20, 14)) -> tuple[np.ndarray, np.ndarray]:
    """A body with two organs, background 0: ``[X, Y, Z]`` image and labels 0, 1, 3 (non-contiguous)."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
    label = np.zeros(shape, dtype=np.uint8)
    label[((grid / 0.8) ** 2).sum(axis=0) < 1] = 1
    label[(((grid - 0.15) / 0.35) ** 2).sum(axis=0) < 1] = 3
    image = np.where(label > 0, 200.0 + 80 * label + rng.normal(0, 4, shape), 0.0).astype(np.float32)
    return image, label


def _write_dataset(root: Path, image: np.ndarray, label: np.ndarray) -> None:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(image, AFFINE), root / "imagesTr" / "body_0000.nii.gz")
    nib.save(nib.Nifti1Image(label, AFFINE), root / "labelsTr" / "body.nii.gz")
    meta = {"channel_names": {"0": "CT"}, "labels": {"bg": 0, "body": 1, "organ": 3}, "numTraining": 1}
    (root / "dataset.json").write_text(json.dumps(meta))


def test_prepare_then_invert_restores_affine_spacing_shape_and_labels(tmp_path: Path) -> None:
    # prepare: a cached case, inverted and written with the geometry's affine
    image, label = _case()
    _write_dataset(tmp_path / "raw", image, label)
    config = tmp_path / "cfg.toml"
    config.write_text(
        '[data]\nimage_size = 16\nwindow = 4\nnum_labels = 3\nmodality = "ct"\nct_window = [0.0, 600.0]\n'
    )
    code = main(
        [
            "prepare",
            "--layout",
            "nnunet",
            "--input",
            str(tmp_path / "raw"),
            "--output",
            str(tmp_path / "p"),
            "--config",
            str(config),
        ]
    )
    assert code == 0
    cfg = DataConfig(image_size=16, window=4, num_labels=3, modality="ct", ct_window=(0.0, 600.0))
    geometry = case_geometry(read_manifest(tmp_path / "p"), "body")
    assert typical_intensity(read_manifest(tmp_path / "p")) == (0.0, 600.0)  # the CT window
    volume = load_prepared(tmp_path / "p", cfg)[0]
    # execute
    back_image, back_label = to_original_grid(geometry, image=np.asarray(volume.image), label=np.asarray(volume.label))
    assert back_image is not None and back_label is not None
    save_nifti(tmp_path / "image.nii.gz", back_image, geometry.affine_array)
    save_nifti(tmp_path / "label.nii.gz", back_label, geometry.affine_array)
    # assert: nibabel, reading the written files on its own, sees the original geometry
    original = nib.load(tmp_path / "raw" / "imagesTr" / "body_0000.nii.gz")
    for name in ("image.nii.gz", "label.nii.gz"):
        written = nib.load(tmp_path / name)
        np.testing.assert_allclose(written.affine, original.affine, atol=1e-6)
        np.testing.assert_allclose(written.header.get_zooms(), original.header.get_zooms(), atol=1e-6)
        assert written.shape == original.shape
        assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(original.affine)
    restored = np.asarray(nib.load(tmp_path / "label.nii.gz").dataobj)
    assert set(np.unique(restored)) == {0, 1, 3}  # original label values, not contiguous ids
    assert (restored == label).mean() > 0.95
    restored_image = np.asarray(nib.load(tmp_path / "image.nii.gz").dataobj)
    assert np.abs(restored_image - image)[label > 0].mean() < 40.0  # HU-scale, resampled twice
    assert geometry.spacing == pytest.approx((1.25, 1.5, 2.0))


def test_round_trip_is_exact_when_the_grid_needs_no_resampling() -> None:
    # prepare: a box the model grid takes as it is (no crop, square in-plane, image_size = in-plane size)
    image, label = _case((16, 16, 9))
    affine = np.diag([-1.5, 1.5, 3.0, 1.0])
    cfg = DataConfig(image_size=16, num_labels=3, modality="ct", ct_window=(-10.0, 600.0), crop_foreground=False)
    # execute
    grid = to_model_grid(image, label, affine, cfg, label_values=(0, 1, 3))
    back_image, back_label = to_original_grid(grid.geometry, grid.image, grid.label)
    # assert
    assert grid.image is not None and grid.image.shape == (9, 16, 16)
    np.testing.assert_array_equal(back_label, label)
    np.testing.assert_allclose(back_image, image, atol=1e-3)


def test_geometry_is_json_serialisable_and_model_affine_places_voxels(tmp_path: Path) -> None:
    # prepare
    image, label = _case()
    cfg = DataConfig(image_size=16, num_labels=3)
    grid = to_model_grid(image, label, AFFINE, cfg, label_values=(0, 1, 3))
    # execute
    again = CaseGeometry.model_validate_json(grid.geometry.model_dump_json())
    # assert: the label's centre of mass sits at the same world position on both grids
    assert again == grid.geometry
    assert grid.label is not None
    original_com = AFFINE @ np.append(np.argwhere(label == 3).mean(axis=0), 1.0)
    model_com = again.model_affine @ np.append(np.argwhere(grid.label == 2).mean(axis=0), 1.0)
    np.testing.assert_allclose(model_com[:3], original_com[:3], atol=2.0)


def test_lone_mask_goes_to_the_model_grid_and_back_into_its_exact_geometry(tmp_path: Path) -> None:
    # prepare: a user's mask with its own affine, in original BraTS-like values 0, 1, 4
    _, label = _case((20, 18, 12))
    label[label == 3] = 4
    affine = np.array([[1.2, 0.0, 0.0, -11.0], [0.0, -0.9, 0.0, 8.0], [0.0, 0.0, 2.5, 3.0], [0.0, 0.0, 0.0, 1.0]])
    save_nifti(tmp_path / "mask.nii.gz", label, affine)
    cfg = DataConfig(image_size=16, window=4, num_labels=3)
    # execute: the sampler's path: mask -> model grid -> a synthetic image -> the mask's grid
    grid = mask_to_model_grid(tmp_path / "mask.nii.gz", cfg, label_values=(0, 1, 4), intensity=(0.0, 800.0))
    assert grid.label is not None and grid.image is None
    synthetic = np.where(grid.label > 0, 0.5, -1.0).astype(np.float32)
    back, _ = to_original_grid(grid.geometry, image=synthetic)
    assert back is not None
    save_nifti(tmp_path / "synthetic.nii.gz", back, grid.geometry.affine_array)
    # assert
    mask, written = nib.load(tmp_path / "mask.nii.gz"), nib.load(tmp_path / "synthetic.nii.gz")
    assert grid.label.shape[1:] == (16, 16) and set(np.unique(grid.label)) == {0, 1, 2}
    assert written.shape == mask.shape
    np.testing.assert_allclose(written.affine, mask.affine, atol=1e-6)
    np.testing.assert_allclose(written.header.get_zooms(), mask.header.get_zooms(), atol=1e-6)
    values = np.asarray(written.dataobj)
    assert values.min() >= 0.0 and values.max() == pytest.approx(600.0, abs=1.0)  # 0.5 in [-1, 1] -> 600
    assert ((values > 300.0) == (label > 0)).mean() > 0.95
    with pytest.raises(DataError, match=r"unexpected label values \[4\]"):
        mask_to_model_grid(tmp_path / "mask.nii.gz", cfg)


def test_to_original_grid_rejects_arrays_of_the_wrong_shape() -> None:
    # prepare
    image, label = _case((16, 16, 9))
    grid = to_model_grid(image, label, np.eye(4), DataConfig(image_size=16, num_labels=4), label_values=(0, 1, 3))
    # execute / assert
    with pytest.raises(DataError, match="does not match the model grid"):
        to_original_grid(grid.geometry, image=np.zeros((3, 16, 16), dtype=np.float32))


def test_ct_crop_keeps_the_body_not_the_air_or_scan_padding() -> None:
    # prepare: air (-1024 HU) and scan padding (-3024 HU) around a body of soft tissue
    image = np.full((40, 40, 20), -1024.0, dtype=np.float32)
    image[:2] = -3024.0
    image[10:30, 12:28, 5:15] = 40.0
    label = np.zeros(image.shape, dtype=np.uint8)
    label[15:20, 15:20, 8:10] = 1
    cfg = DataConfig(modality="ct", image_size=16, num_labels=2)
    # execute
    geometry = to_model_grid(image, label, np.eye(4), cfg, label_values=(0, 1), square=False).geometry
    # assert: the body's box plus the 2-voxel margin
    assert geometry.box_lo == (8, 10, 3) and geometry.box_hi == (32, 30, 17)


def test_a_lone_mask_is_cropped_like_its_noisy_mri_case() -> None:
    # prepare: MRI with a Rician-like noise floor around the anatomy the labels outline
    image, label = _case()
    image = image + np.abs(np.random.default_rng(1).normal(0.0, 12.0, image.shape)).astype(np.float32)
    cfg = DataConfig(image_size=16, num_labels=4)
    # execute
    with_image = to_model_grid(image, label, AFFINE, cfg, label_values=(0, 1, 3)).geometry
    mask_only = to_model_grid(None, label, AFFINE, cfg, label_values=(0, 1, 3)).geometry
    # assert: the noise is not anatomy, so both boxes outline the same anatomy (to a voxel)
    np.testing.assert_allclose(with_image.box_lo, mask_only.box_lo, atol=1)
    np.testing.assert_allclose(with_image.box_hi, mask_only.box_hi, atol=1)
