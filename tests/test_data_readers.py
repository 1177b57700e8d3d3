"""Layout readers (nnU-Net, MSD, BraTS 2021/2023/Task01, AbdomenCT-1K) and nibabel's own anatomical.nii."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gem3d.config import DataConfig
from gem3d.data.dataset import load_volumes
from gem3d.data.layouts import discover, iter_cases
from gem3d.data.prepare import PrepareOptions, load_prepared, prepare_dataset, read_manifest

CFG = DataConfig(image_size=16, window=4, num_labels=5)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def _volume(seed: int, shape: tuple[int, ...] = (12, 12, 10)) -> tuple[np.ndarray, np.ndarray]:
    """A blob image ``[X, Y, Z]`` and its label with values 0, 1, 2 (and 4 where BraTS-like)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape[:3]), indexing="ij"))
    radius = np.sqrt((grid**2).sum(axis=0))
    label = np.zeros(shape[:3], dtype=np.uint8)
    label[radius < 0.8] = 1
    label[radius < 0.5] = 2
    image = (100 * label + rng.normal(0, 5, size=shape[:3])).astype(np.float32)
    return image, label


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


def test_nnunet_reader_picks_the_configured_channel(tmp_path: Path) -> None:
    # prepare: two channels; channel 1 is the negated image
    for i in range(2):
        image, label = _volume(i)
        _save(tmp_path / "imagesTr" / f"case{i}_0000.nii.gz", image)
        _save(tmp_path / "imagesTr" / f"case{i}_0001.nii.gz", -image)
        _save(tmp_path / "labelsTr" / f"case{i}.nii.gz", label)
    meta = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"bg": 0, "a": 1, "b": 2}, "numTraining": 2}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    # execute
    listing = discover("nnunet", tmp_path, channel=1)
    cases = list(iter_cases(listing))
    # assert
    assert [c.case_id for c in cases] == ["case0", "case1"]
    assert listing.declared_labels == (0, 1, 2)
    np.testing.assert_allclose(cases[0].image, -_volume(0)[0])
    assert cases[0].spacing == pytest.approx((1.5, 1.5, 2.0))
    assert cases[0].label.max() == 2


def test_msd_reader_reads_a_channel_of_4d_images(tmp_path: Path) -> None:
    # prepare: MSD Task01-like, 4 channels in one 4D file
    image, label = _volume(0)
    stack = np.stack([image + 1000 * c for c in range(4)], axis=-1)
    _save(tmp_path / "imagesTr" / "BRATS_001.nii.gz", stack)
    _save(tmp_path / "labelsTr" / "BRATS_001.nii.gz", label)
    meta = {
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": 1,
        "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    # execute
    msd = next(iter_cases(discover("msd", tmp_path, channel=3)))
    brats_t1ce = next(iter_cases(discover("brats", tmp_path, sequence="t1ce")))
    volumes = load_volumes(tmp_path, DataConfig(image_size=16, window=4, num_labels=4, channel=2))
    # assert
    np.testing.assert_allclose(msd.image, image + 3000)
    np.testing.assert_allclose(brats_t1ce.image, image + 2000)
    assert len(volumes) == 1 and volumes[0].image.shape[1:] == (16, 16)


@pytest.mark.parametrize("naming", ["2021", "2023"])
def test_brats_reader_selects_the_sequence(tmp_path: Path, naming: str) -> None:
    # prepare: two subject folders, BraTS labels 0, 1, 2, 4
    suffix = {
        "2021": {"flair": "_flair", "t1": "_t1", "seg": "_seg"},
        "2023": {"flair": "-t2f", "t1": "-t1n", "seg": "-seg"},
    }
    for i, subject in enumerate(["BraTS2021_00001", "BraTS2021_00002"]):
        image, label = _volume(i)
        label[label == 2] = 4
        folder = tmp_path / "train" / subject
        _save(folder / f"{subject}{suffix[naming]['flair']}.nii.gz", image)
        _save(folder / f"{subject}{suffix[naming]['t1']}.nii.gz", image * 2)
        _save(folder / f"{subject}{suffix[naming]['seg']}.nii.gz", label)
    out = tmp_path / "prepared"
    # execute
    flair = list(iter_cases(discover("brats", tmp_path)))
    t1 = list(iter_cases(discover("brats", tmp_path, sequence="t1")))
    report = prepare_dataset(tmp_path, out, CFG, PrepareOptions(layout="brats"))
    # assert
    assert [c.case_id for c in flair] == ["BraTS2021_00001", "BraTS2021_00002"]
    np.testing.assert_allclose(t1[0].image, 2 * flair[0].image)
    assert report.label_values == (0, 1, 4)  # mapped to contiguous ids 0, 1, 2
    volumes = load_prepared(out, CFG)
    assert sorted(np.unique(np.concatenate([v.label.ravel() for v in volumes]))) == [0, 1, 2]


def test_abdomenct1k_reader_pairs_images_with_the_mask_folder(tmp_path: Path) -> None:
    # prepare: images in a part folder, masks in Mask/, CT intensities
    for i in (1, 2):
        image, label = _volume(i)
        _save(tmp_path / "AbdomenCT-1K-ImagePart1" / f"Case_{i:05d}_0000.nii.gz", image * 3 - 1000)
        _save(tmp_path / "Mask" / f"Case_{i:05d}.nii.gz", label)
    cfg = DataConfig(image_size=16, window=4, num_labels=5, modality="ct", ct_window=(-1000.0, 0.0))
    out = tmp_path / "prepared"
    # execute
    prepare_dataset(tmp_path, out, cfg, PrepareOptions(layout="abdomenct1k"))
    manifest = read_manifest(out)
    # assert
    assert [c["id"] for c in manifest["cases"]] == ["Case_00001", "Case_00002"]
    assert manifest["label_names"]["1"] == "liver"
    geometry = manifest["cases"][0]["geometry"]
    assert (geometry["intensity_low"], geometry["intensity_high"]) == (-1000.0, 0.0)
    assert load_prepared(out, cfg)[0].image.min() >= -1.0


def test_nibabel_anatomical_nii_big_endian_2mm(tmp_path: Path) -> None:
    # prepare: nibabel's own test image (big-endian int16, 2 mm, x flipped) in an nnU-Net folder
    source = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    original = nib.load(source)
    assert original.get_data_dtype().byteorder == ">"
    data = np.asarray(original.dataobj)
    label = (data > np.percentile(data, 60)).astype(np.uint8) + (data > np.percentile(data, 90)).astype(np.uint8)
    shutil.copy(source, (tmp_path / "imagesTr").mkdir(parents=True) or tmp_path / "imagesTr" / "anat_0000.nii")
    (tmp_path / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(label, original.affine), tmp_path / "labelsTr" / "anat.nii")
    meta = {"channel_names": {"0": "T1"}, "labels": {"bg": 0, "a": 1, "b": 2}, "numTraining": 1, "file_ending": ".nii"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    cfg = DataConfig(image_size=16, window=4, num_labels=3, crop_foreground=False)
    # execute
    case = next(iter_cases(discover("nnunet", tmp_path)))
    prepare_dataset(tmp_path, tmp_path / "prepared", cfg, PrepareOptions(square=False))
    geometry = read_manifest(tmp_path / "prepared")["cases"][0]["geometry"]
    volume = load_volumes(tmp_path / "prepared", cfg)[0]
    # assert: values read in native order, spacing 2 mm, the slice axis is canonical z (25 slices)
    np.testing.assert_array_equal(case.image, data.astype(np.float32))
    assert case.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert geometry["spacing"] == pytest.approx([2.0, 2.0, 2.0])
    np.testing.assert_allclose(geometry["affine"], original.affine)
    assert volume.image.shape == (25, 16, 16) and volume.image.dtype == np.float32
    # canonical orientation: the file's x runs right-to-left; nibabel's canonical array, resized
    # independently, matches the model grid and not its left-right mirror
    canonical = np.asarray(nib.as_closest_canonical(original).dataobj, dtype=np.float32).transpose(2, 0, 1)
    expected = F.interpolate(torch.from_numpy(canonical)[None, None], size=(25, 16, 16), mode="area")[0, 0].numpy()
    assert np.corrcoef(volume.image.ravel(), expected.ravel())[0, 1] > 0.95
    assert np.corrcoef(volume.image[:, ::-1].ravel(), expected.ravel())[0, 1] < 0.9
    assert nib.aff2axcodes(original.affine)[0] == "L"


def test_raw_and_prepared_folders_load_the_same_volumes(phantom_dir: Path, tmp_path: Path) -> None:
    # prepare
    cfg = DataConfig(image_size=16, window=4, num_labels=4)
    prepare_dataset(phantom_dir, tmp_path / "prepared", cfg, PrepareOptions())
    # execute
    raw = load_volumes(phantom_dir, cfg)
    cached = load_volumes(tmp_path / "prepared", cfg)
    subset = load_volumes(tmp_path / "prepared", cfg, case_ids=["phantom_001"])
    # assert
    assert [v.case_id for v in raw] == [v.case_id for v in cached]
    for a, b in zip(raw, cached, strict=True):
        np.testing.assert_allclose(a.image, b.image, atol=1e-6)
        np.testing.assert_array_equal(a.label, b.label)
    assert isinstance(cached[0].image, np.memmap)
    assert [v.case_id for v in subset] == ["phantom_001"]
