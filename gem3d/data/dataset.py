"""Load a dataset directory into training volumes.

Minimal reader for an nnU-Net v2 raw folder (``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz``):
canonical orientation, slice axis first, intensity normalisation to [-1, 1] and in-plane resize.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from gem3d.config import DataConfig
from gem3d.data.volume import Volume
from gem3d.errors import DataError

NIFTI_SUFFIX = ".nii.gz"


def _read(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: cannot read NIfTI ({error})") from None
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: contains NaN or Inf voxels")
    return data, img


def normalise_intensity(image: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Map intensities to [-1, 1]: MRI by percentile clip, CT by HU window."""
    if cfg.modality == "ct":
        low, high = cfg.ct_window
    else:
        low, high = np.percentile(image, cfg.mri_percentiles)
    if high <= low:
        return np.zeros_like(image, dtype=np.float32)
    return (2.0 * (np.clip(image, low, high) - low) / (high - low) - 1.0).astype(np.float32)


def resize_slices(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``[D, H, W]`` -> ``[D, size, size]``: bilinear for the image, nearest for the label."""
    image_t = torch.from_numpy(image).unsqueeze(1)
    label_t = torch.from_numpy(label.astype(np.float32)).unsqueeze(1)
    image_r = F.interpolate(image_t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    label_r = F.interpolate(label_t, size=(size, size), mode="nearest-exact")
    return image_r.squeeze(1).numpy(), label_r.squeeze(1).numpy().astype(np.uint8)


def load_case(image_path: Path, label_path: Path, case_id: str, cfg: DataConfig) -> Volume:
    """Read, canonicalise, normalise and resize one case."""
    image, image_nii = _read(image_path)
    label, label_nii = _read(label_path)
    if image.shape != label.shape:
        raise DataError(f"{label_path}: label shape {label.shape} differs from image shape {image.shape}")
    if not np.allclose(image_nii.affine, label_nii.affine, atol=1e-3):
        raise DataError(f"{label_path}: label affine differs from the image's")
    if (label < 0).any() or (label != np.round(label)).any() or label.max() >= cfg.num_labels:
        raise DataError(f"{label_path}: labels must be integers in 0..{cfg.num_labels - 1} (data.num_labels)")
    image = np.moveaxis(normalise_intensity(image, cfg), cfg.slice_axis, 0)
    label = np.moveaxis(label.astype(np.uint8), cfg.slice_axis, 0)
    image, label = resize_slices(np.ascontiguousarray(image), np.ascontiguousarray(label), cfg.image_size)
    return Volume(case_id=case_id, image=image, label=label)


def load_volumes(data_dir: str | Path, cfg: DataConfig) -> list[Volume]:
    """Load every case of an nnU-Net v2 raw dataset folder.

    Returns:
        one ``Volume`` per case, sorted by case id.
    """
    data_dir = Path(data_dir)
    labels_dir = data_dir / "labelsTr"
    if not labels_dir.is_dir():
        raise DataError(f"{data_dir}: not an nnU-Net raw dataset (no labelsTr/ folder)")
    label_paths = sorted(labels_dir.glob(f"*{NIFTI_SUFFIX}"))
    if not label_paths:
        raise DataError(f"{labels_dir}: no {NIFTI_SUFFIX} label files")
    volumes = []
    for label_path in label_paths:
        case_id = label_path.name.removesuffix(NIFTI_SUFFIX)
        image_path = data_dir / "imagesTr" / f"{case_id}_{cfg.channel:04d}{NIFTI_SUFFIX}"
        if not image_path.exists():
            raise DataError(f"{image_path}: missing image for label {label_path.name}")
        volumes.append(load_case(image_path, label_path, case_id, cfg))
    return volumes
