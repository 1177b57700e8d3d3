"""NIfTI reading with validation, and atomic writing.

Every check raises ``DataError`` with a message that names the file and the problem, so the CLI
prints one line. Header checks (``read_header``) are cheap and run over a whole dataset before any
voxel is read; voxel checks (``read_image``, ``read_label``) run when a case is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from gem3d.errors import DataError
from gem3d.files import atomic_write

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def strip_suffix(name: str) -> str | None:
    """``"CASE_0000.nii.gz"`` -> ``"CASE_0000"``; None for a name that is not NIfTI."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes in mm: the column norms of the affine's 3x3 part."""
    x, y, z = (float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    return (x, y, z)


@dataclass(frozen=True)
class Header:
    """What a NIfTI header says, read without touching the voxels.

    Attributes:
        shape: the array shape, 3D or 4D (a trailing channel axis).
        affine: ``[4, 4]`` voxel -> world (mm, RAS+).
    """

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return (int(self.shape[0]), int(self.shape[1]), int(self.shape[2]))


def _load(path: Path) -> nib.Nifti1Image:
    if path.is_dir():
        raise DataError(f"{path}: is a folder, a NIfTI file was expected")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises many types for corrupt headers
        raise DataError(f"{path}: unreadable or corrupt NIfTI ({type(error).__name__}: {error})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise DataError(f"{path}: not a NIfTI image ({type(image).__name__})")
    return image


def read_header(path: str | Path, channels: bool = False) -> Header:
    """Read and check a header.

    Args:
        channels: accept a 4D file ``[X, Y, Z, C]`` (multi-channel); otherwise only 3D
            (or 4D with a single trailing channel).
    Raises:
        DataError: unreadable file, wrong dimensionality, empty or singular geometry.
    """
    path = Path(path)
    image = _load(path)
    shape = tuple(int(n) for n in image.shape)
    if len(shape) == 4 and shape[3] == 1 and not channels:
        shape = shape[:3]
    if len(shape) == 4 and not channels:
        raise DataError(f"{path}: 4D image of shape {shape} where a 3D volume is expected")
    if len(shape) not in ((3, 4) if channels else (3,)):
        raise DataError(f"{path}: expected a 3D volume, got {len(shape)}D shape {shape}")
    if min(shape[:3]) < 1:
        raise DataError(f"{path}: empty volume of shape {shape}")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: the affine is singular or not finite")
    _check_size(path, image)
    return Header(path=path, shape=shape, affine=affine)


GZIP_MAX_RATIO = 1032  # deflate cannot compress better than ~1032:1


def _check_size(path: Path, image: nib.Nifti1Image) -> None:
    """Refuse a file too small for the voxels its header declares (truncated, or a header that lies).

    Header-only: ``.nii`` by its size, ``.nii.gz`` by the uncompressed size in its gzip trailer
    (mod 2**32) and by deflate's best ratio, so no voxel is read.
    """
    header = image.header
    expected = (
        int(header.get_data_offset()) + int(np.prod(image.shape, dtype=np.int64)) * header.get_data_dtype().itemsize
    )
    size = path.stat().st_size
    gzipped = path.name.endswith(".gz")
    if gzipped:
        with open(path, "rb") as handle:
            handle.seek(max(size - 4, 0))
            isize = int.from_bytes(handle.read(4), "little")
        short = expected > size * GZIP_MAX_RATIO or (expected < 2**32 and isize < expected)
    else:
        short = size < expected
    if short:
        raise DataError(
            f"{path}: truncated or corrupt: the header declares shape {tuple(image.shape)} "
            f"({expected / 2**20:.1f} MiB of voxels) but the file cannot hold them"
        )


def _voxels(path: Path, channel: int | None) -> tuple[np.ndarray, Header]:
    header = read_header(path, channels=channel is not None)
    image = _load(path)
    try:
        if channel is None:
            data = np.asarray(image.dataobj)
            data = data.reshape(header.spatial_shape)
        else:
            if len(header.shape) == 3:
                if channel != 0:
                    raise DataError(f"{path}: has one channel, channel {channel} was asked for")
                data = np.asarray(image.dataobj)
            else:
                if channel >= header.shape[3]:
                    raise DataError(f"{path}: has {header.shape[3]} channels, channel {channel} was asked for")
                data = np.asarray(image.dataobj[..., channel])
    except DataError:
        raise
    except Exception as error:  # truncated gzip streams raise EOFError, zlib.error, OSError, ValueError
        raise DataError(f"{path}: truncated or corrupt voxel data ({type(error).__name__}: {error})") from None
    return data, header


def read_image(path: str | Path, channel: int | None = None) -> tuple[np.ndarray, Header]:
    """Intensities of a 3D image, or one channel of a 4D one.

    Returns:
        ``[X, Y, Z]`` float32 in the file's voxel order (native endianness), and the header.
    Raises:
        DataError: any header problem, truncated data, NaN or Inf voxels.
    """
    path = Path(path)
    data, header = _voxels(path, channel)
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise DataError(f"{path}: contains {bad} NaN or Inf voxels")
    return data, header


def read_label(path: str | Path) -> tuple[np.ndarray, Header]:
    """A 3D label map.

    Returns:
        ``[X, Y, Z]`` int64 label values as stored (not yet mapped to contiguous ids), and the header.
    Raises:
        DataError: any header problem, truncated data, NaN/Inf, non-integer or negative values.
    """
    path = Path(path)
    data, header = _voxels(path, None)
    values = np.asarray(data)
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise DataError(f"{path}: label map contains NaN or Inf voxels")
        if (values != np.round(values)).any():
            raise DataError(f"{path}: label map has non-integer values (e.g. {values[values != np.round(values)][0]})")
    elif values.dtype.kind not in "iub":
        raise DataError(f"{path}: label map has unsupported data type {values.dtype}")
    labels = values.astype(np.int64)
    if (labels < 0).any():
        raise DataError(f"{path}: label map has negative values (min {int(labels.min())})")
    return labels, header


def check_pair(image: Header, label: Header) -> None:
    """Image and label must share the spatial shape and affine."""
    if image.spatial_shape != label.spatial_shape:
        raise DataError(
            f"{label.path}: label shape {label.spatial_shape} differs from image shape {image.spatial_shape}"
        )
    if not np.allclose(image.affine, label.affine, atol=1e-3, rtol=1e-4):
        raise DataError(f"{label.path}: label affine differs from the image's ({image.path.name})")


def save_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> Path:
    """Write ``data`` with ``affine`` atomically (temp file, then rename). Both sform and qform are set.

    Args:
        data: ``[X, Y, Z]`` array in the voxel order ``affine`` describes.
        header: optional header to copy (e.g. a mask's), so units and intent carry over.
    """
    path = Path(path)
    name = path.name
    if strip_suffix(name) is None:
        raise DataError(f"{path}: output must end in .nii.gz or .nii")
    image = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64), header=header)
    image.set_sform(np.asarray(affine, dtype=np.float64), code=1)
    image.set_qform(np.asarray(affine, dtype=np.float64), code=1)
    return atomic_write(path, lambda tmp: nib.save(image, tmp))
