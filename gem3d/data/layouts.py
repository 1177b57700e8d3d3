"""Dataset layouts: find every case's files, check the listing, and read cases.

* ``nnunet``: nnU-Net v2 raw: ``imagesTr/CASE_0000.nii.gz`` (channel suffix), ``labelsTr/CASE.nii.gz``,
  ``dataset.json`` (``channel_names``, ``labels``, ``numTraining``, ``file_ending``).
* ``msd``: Medical Segmentation Decathlon: ``dataset.json`` lists ``training`` pairs; images may be
  4D ``[X, Y, Z, C]`` (Task01 BrainTumour has FLAIR, T1w, t1gd, T2w).
* ``brats``: one folder per subject, ``SUBJ_flair/_t1/_t1ce/_t2/_seg.nii.gz`` (BraTS 2021) or
  ``SUBJ-t2f/-t1n/-t1c/-t2w/-seg.nii.gz`` (BraTS 2023); a folder holding MSD Task01 is read as ``msd``
  with the channel of the chosen sequence. FLAIR is the default, as in the paper.
* ``abdomenct1k``: ``Case_NNNNN_0000.nii.gz`` images anywhere under the input, masks
  ``Case_NNNNN.nii.gz`` in a mask folder.

``discover`` finds files without reading voxels and separates dataset-level errors (raised at once)
from case-level problems (reported per case, so ``--skip-invalid`` can go on). ``read_case`` reads
one case with every voxel check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gem3d.data.nifti import NIFTI_SUFFIXES, check_pair, read_header, read_image, read_label, spacing_of, strip_suffix
from gem3d.errors import DataError

Layout = Literal["nnunet", "msd", "brats", "abdomenct1k"]
LAYOUTS: tuple[Layout, ...] = ("nnunet", "msd", "brats", "abdomenct1k")
Sequence_ = Literal["flair", "t1", "t1ce", "t2"]
SEQUENCES: tuple[Sequence_, ...] = ("flair", "t1", "t1ce", "t2")

# BraTS 2021 suffix -> BraTS 2023 suffix, and the MSD Task01 channel name of each sequence.
BRATS_2023 = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"}
MSD_CHANNEL_NAMES = {"flair": ("flair",), "t1": ("t1w", "t1"), "t1ce": ("t1gd", "t1ce", "t1c"), "t2": ("t2w", "t2")}


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case.

    Attributes:
        channel: the channel to read from a 4D image ``[X, Y, Z, C]``; None for a 3D image.
        problem: why the case cannot be used (missing pair, duplicate id), or None.
    """

    case_id: str
    image: Path | None
    label: Path | None
    channel: int | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Listing:
    """A dataset's cases as found on disk.

    Attributes:
        declared_labels: label values ``dataset.json`` declares (sorted), or None when it declares none.
        label_names: value -> name, where known.
    """

    layout: Layout
    root: Path
    cases: list[CaseFiles]
    declared_labels: tuple[int, ...] | None = None
    label_names: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One case as read from disk, in its original voxel order.

    Attributes:
        image: ``[X, Y, Z]`` float32 original intensities.
        label: ``[X, Y, Z]`` int64 original label values.
        affine: ``[4, 4]`` voxel -> world (mm).
        spacing: voxel sizes in mm.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    files: CaseFiles


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and strip_suffix(p.name))


def _read_dataset_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: unreadable dataset.json ({error})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: dataset.json must hold a JSON object")
    return data


def _declared_labels(path: Path, labels: Any, msd: bool) -> tuple[tuple[int, ...], dict[int, str]]:
    """Label values from ``dataset.json``: nnU-Net ``{name: value | [values]}``, MSD ``{"value": name}``."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: 'labels' must be a non-empty object")
    values: set[int] = set()
    names: dict[int, str] = {}
    try:
        for key, value in labels.items():
            if msd:
                values.add(int(key))
                names[int(key)] = str(value)
            elif isinstance(value, list):  # nnU-Net region labels: a union of plain labels
                values.update(int(v) for v in value)
            else:
                values.add(int(value))
                names[int(value)] = str(key)
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'labels' has a non-integer label value") from None
    if 0 not in values or min(values) < 0:
        raise DataError(f"{path}: 'labels' must include background 0 and no negative values")
    if len(values) > 256:  # the model grid maps them to contiguous ids held as uint8
        raise DataError(f"{path}: 'labels' declares {len(values)} label values; at most 256 (background included)")
    return tuple(sorted(values)), names


def declared_data(root: str | Path) -> dict[str, Any]:
    """The data config a dataset declares: ``{"data.num_labels": n, "data.modality": "ct" | "mri"}``.

    From a prepared cache's manifest (its label table and data config) or a raw nnU-Net / MSD
    ``dataset.json`` (its ``labels``; CT when its ``channel_names`` / ``modality`` says ``CT``).
    Empty for folders that declare nothing (BraTS, AbdomenCT-1K layouts, a folder of sites).
    """
    root = Path(root)
    manifest, meta_path = root / "manifest.json", root / "dataset.json"
    if manifest.is_file():
        data = _read_dataset_json(manifest)
        declared: dict[str, Any] = {}
        if data.get("label_values"):
            declared["data.num_labels"] = len(data["label_values"])
        if data.get("data", {}).get("modality") in ("ct", "mri"):
            declared["data.modality"] = data["data"]["modality"]
        return declared
    if not meta_path.is_file():
        return {}
    meta = _read_dataset_json(meta_path)
    msd = "training" in meta
    declared = {}
    if "labels" in meta:
        values, _ = _declared_labels(meta_path, meta["labels"], msd=msd)
        declared["data.num_labels"] = len(values)
    channels = meta.get("modality" if msd else "channel_names")
    if isinstance(channels, dict) and channels:
        declared["data.modality"] = "ct" if str(next(iter(channels.values()))).strip().upper() == "CT" else "mri"
    return declared


def _check_num_training(path: Path, data: dict[str, Any], found: int) -> None:
    declared = data.get("numTraining")
    if declared is not None and declared != found:
        raise DataError(f"{path}: numTraining is {declared} but {found} training cases were found")


def _mark_duplicates(cases: list[CaseFiles]) -> list[CaseFiles]:
    seen: dict[str, int] = {}
    for case in cases:
        seen[case.case_id] = seen.get(case.case_id, 0) + 1
    out = []
    for case in cases:
        if seen[case.case_id] > 1 and case.problem is None:
            where = case.image or case.label
            case = CaseFiles(
                case.case_id, case.image, case.label, case.channel, f"{where}: duplicate case id '{case.case_id}'"
            )
        out.append(case)
    return out


def discover_nnunet(root: Path, channel: int) -> Listing:
    """nnU-Net v2 raw: pairs ``imagesTr/CASE_{channel:04d}`` with ``labelsTr/CASE``."""
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DataError(f"{root}: not an nnU-Net raw dataset (no {folder.name}/ folder)")
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        # nnU-Net v2's rule: every raw dataset has one; without it labels and modality are guesses
        raise DataError(
            f"{root}: no dataset.json; an nnU-Net v2 raw dataset declares its channel_names, labels, numTraining "
            "and file_ending there"
        )
    meta = _read_dataset_json(meta_path)
    for key in ("channel_names", "labels"):
        if key not in meta:
            raise DataError(
                f"{meta_path}: no '{key}' (nnU-Net v2 requires channel_names, labels, numTraining, file_ending)"
            )
    declared, names = _declared_labels(meta_path, meta["labels"], msd=False)
    num_channels = len(meta.get("channel_names", {})) or None
    if num_channels is not None and channel >= num_channels:
        raise DataError(f"{meta_path}: declares {num_channels} channels, data.channel={channel} was asked for")
    ending = meta.get("file_ending")
    if ending is not None and ending not in NIFTI_SUFFIXES:
        raise DataError(f"{meta_path}: file_ending '{ending}' is not a NIfTI ending (.nii.gz, .nii)")

    images: dict[str, dict[int, list[Path]]] = {}
    for path in _nifti_files(images_dir):
        match = re.fullmatch(r"(.+)_(\d{4})", strip_suffix(path.name) or "")
        if match is None:
            raise DataError(f"{path}: image name lacks the _0000-style channel suffix of the nnU-Net layout")
        if ending is not None and not path.name.endswith(ending):
            raise DataError(f"{path}: dataset.json says file_ending '{ending}'")
        images.setdefault(match.group(1), {}).setdefault(int(match.group(2)), []).append(path)
    labels: dict[str, list[Path]] = {}
    for path in _nifti_files(labels_dir):
        labels.setdefault(strip_suffix(path.name) or "", []).append(path)

    suffix = ending or ".nii.gz"
    cases = []
    for case_id in sorted(set(images) | set(labels)):
        channels = images.get(case_id, {})
        image_paths, label_paths = channels.get(channel, []), labels.get(case_id, [])
        image = image_paths[0] if image_paths else None
        label = label_paths[0] if label_paths else None
        problem = None
        if len(image_paths) > 1 or len(label_paths) > 1:
            dupes = image_paths if len(image_paths) > 1 else label_paths
            problem = f"{dupes[1]}: duplicate case id '{case_id}' (also {dupes[0].name})"
        elif label is None:
            problem = f"{labels_dir / (case_id + suffix)}: missing label for image {image.name if image else case_id}"
        elif image is None:
            problem = f"{images_dir / f'{case_id}_{channel:04d}{suffix}'}: missing image for label {label.name}"
        elif num_channels is not None and sorted(channels) != list(range(num_channels)):
            problem = (
                f"{images_dir}: case '{case_id}' has channels {sorted(channels)}, dataset.json declares {num_channels}"
            )
        cases.append(CaseFiles(case_id, image, label, None, problem))
    if not cases:
        raise DataError(f"{root}: no cases found in imagesTr/ and labelsTr/")
    _check_num_training(meta_path, meta, len(cases))
    return Listing("nnunet", root, cases, declared, names)


def _msd_channel(path: Path, meta: dict[str, Any], channel: int, sequence: str | None) -> int:
    """The channel index: by sequence name (BraTS) or ``data.channel``; checked against ``modality``."""
    modality = meta.get("modality") or meta.get("channel_names") or {}
    if sequence is None:
        if modality and channel >= len(modality):
            raise DataError(f"{path}: declares {len(modality)} channels, data.channel={channel} was asked for")
        return channel
    for key, name in modality.items():
        if str(name).lower() in MSD_CHANNEL_NAMES[sequence]:
            return int(key)
    raise DataError(f"{path}: no '{sequence}' channel among modality {dict(modality)}")


def discover_msd(root: Path, channel: int, sequence: str | None = None) -> Listing:
    """MSD: ``dataset.json``'s ``training`` list of ``{"image", "label"}`` paths relative to the root."""
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        raise DataError(f"{root}: not an MSD dataset (no dataset.json)")
    meta = _read_dataset_json(meta_path)
    training = meta.get("training")
    if not isinstance(training, list) or not training:
        raise DataError(f"{meta_path}: no 'training' list of image/label pairs")
    declared, names = _declared_labels(meta_path, meta.get("labels"), msd=True)
    index = _msd_channel(meta_path, meta, channel, sequence)
    cases = []
    for entry in training:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{meta_path}: every 'training' entry needs 'image' and 'label'")
        image, label = root / entry["image"], root / entry["label"]
        case_id = strip_suffix(image.name) or image.name
        problem = None
        if not image.is_file():
            problem = f"{image}: listed in dataset.json but missing (label {label.name})"
        elif not label.is_file():
            problem = f"{label}: listed in dataset.json but missing (image {image.name})"
        cases.append(CaseFiles(case_id, image, label, index, problem))
    _check_num_training(meta_path, meta, len(cases))
    return Listing("msd", root, _mark_duplicates(cases), declared, names)


def _brats_file(folder: Path, subject: str, part: str) -> Path | None:
    for name in (f"{subject}_{part}", f"{subject}-{BRATS_2023[part]}"):
        for suffix in NIFTI_SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def discover_brats(root: Path, sequence: str) -> Listing:
    """BraTS: subject folders (2021 or 2023 naming), or MSD Task01 with its 4-channel images."""
    if (root / "dataset.json").exists() and "training" in _read_dataset_json(root / "dataset.json"):
        listing = discover_msd(root, 0, sequence)
        return Listing("brats", root, listing.cases, listing.declared_labels, listing.label_names)
    if not root.is_dir():
        raise DataError(f"{root}: input folder not found")
    subjects = sorted({p.parent for suffix in NIFTI_SUFFIXES for p in root.rglob(f"*seg{suffix}")})
    subjects += sorted(
        {p.parent for p in root.rglob("*.nii*") if any(t in p.name for t in ("_flair", "-t2f"))} - set(subjects)
    )
    if not subjects:
        raise DataError(f"{root}: no BraTS subject folders (SUBJECT/SUBJECT_flair.nii.gz, SUBJECT_seg.nii.gz)")
    cases = []
    for folder in subjects:
        subject = folder.name
        image, label = _brats_file(folder, subject, sequence), _brats_file(folder, subject, "seg")
        problem = None
        if image is None:
            problem = f"{folder}: missing the {sequence} image of subject {subject}"
        elif label is None:
            problem = f"{folder}: missing the segmentation (_seg) of subject {subject}"
        cases.append(CaseFiles(subject, image, label, None, problem))
    names = {0: "background", 1: "necrotic core", 2: "oedema", 3: "enhancing tumour", 4: "enhancing tumour"}
    return Listing("brats", root, _mark_duplicates(cases), None, names)


def discover_abdomenct1k(root: Path) -> Listing:
    """AbdomenCT-1K: ``Case_NNNNN_0000`` images and ``Case_NNNNN`` masks anywhere under the root."""
    if not root.is_dir():
        raise DataError(f"{root}: input folder not found")
    images: dict[str, list[Path]] = {}
    masks: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("Case_*")):
        stem = strip_suffix(path.name)
        if stem is None or not path.is_file():
            continue
        if match := re.fullmatch(r"(Case_\d+)_0000", stem):
            images.setdefault(match.group(1), []).append(path)
        elif re.fullmatch(r"Case_\d+", stem):
            masks.setdefault(stem, []).append(path)
    if not images and not masks:
        raise DataError(f"{root}: no AbdomenCT-1K files (Case_NNNNN_0000.nii.gz images, Case_NNNNN.nii.gz masks)")
    cases = []
    for case_id in sorted(set(images) | set(masks)):
        image_paths, mask_paths = images.get(case_id, []), masks.get(case_id, [])
        problem = None
        if len(image_paths) > 1 or len(mask_paths) > 1:
            dupes = image_paths if len(image_paths) > 1 else mask_paths
            problem = f"{dupes[1]}: duplicate case id '{case_id}' (also {dupes[0]})"
        elif not mask_paths:
            problem = f"{image_paths[0]}: missing mask {case_id}.nii.gz"
        elif not image_paths:
            problem = f"{mask_paths[0]}: missing image {case_id}_0000.nii.gz"
        cases.append(
            CaseFiles(
                case_id, image_paths[0] if image_paths else None, mask_paths[0] if mask_paths else None, None, problem
            )
        )
    names = {0: "background", 1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"}
    return Listing("abdomenct1k", root, cases, None, names)


def discover(layout: str, root: str | Path, channel: int = 0, sequence: str = "flair") -> Listing:
    """Find a dataset's cases. Raises ``DataError`` for dataset-level problems (unknown layout,
    missing folders, ``dataset.json`` disagreeing with the files)."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout '{layout}' (expected one of {', '.join(LAYOUTS)})")
    if not root.is_dir():
        raise DataError(f"{root}: input folder not found")
    if sequence not in SEQUENCES:
        raise DataError(f"unknown BraTS sequence '{sequence}' (expected one of {', '.join(SEQUENCES)})")
    if layout == "nnunet":
        return discover_nnunet(root, channel)
    if layout == "msd":
        return discover_msd(root, channel)
    if layout == "brats":
        return discover_brats(root, sequence)
    return discover_abdomenct1k(root)


def check_case_headers(files: CaseFiles) -> str | None:
    """Header-only checks of a case (no voxels read): returns the problem, or None."""
    if files.problem is not None:
        return files.problem
    assert files.image is not None and files.label is not None
    try:
        image = read_header(files.image, channels=files.channel is not None)
        if files.channel is not None and len(image.shape) == 4 and files.channel >= image.shape[3]:
            return f"{files.image}: has {image.shape[3]} channels, channel {files.channel} was asked for"
        check_pair(image, read_header(files.label))
    except DataError as error:
        return str(error)
    return None


def read_case(files: CaseFiles, declared_labels: tuple[int, ...] | None = None) -> Case:
    """Read and check one case. Raises ``DataError`` naming the file and the problem."""
    if files.problem is not None:
        raise DataError(files.problem)
    assert files.image is not None and files.label is not None
    image, image_header = read_image(files.image, files.channel)
    label, label_header = read_label(files.label)
    check_pair(image_header, label_header)
    present = np.unique(label)
    if present.max() == 0:
        raise DataError(f"{files.label}: empty label map (no foreground voxels)")
    if declared_labels is not None:
        unexpected = sorted(set(int(v) for v in present) - set(declared_labels))
        if unexpected:
            raise DataError(
                f"{files.label}: unexpected label values {unexpected} (dataset.json declares {list(declared_labels)})"
            )
    affine = image_header.affine
    return Case(files.case_id, image, label, affine, spacing_of(affine), files)


def iter_cases(listing: Listing) -> Iterator[Case]:
    """Every case of a listing, read and checked (raises on the first bad one)."""
    for files in listing.cases:
        yield read_case(files, listing.declared_labels)
