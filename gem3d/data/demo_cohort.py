"""A small multi-site brain MRI cohort built from real anatomy that ships with nilearn.

What it is, honestly: ONE template's anatomy, deformed. The source is the MNI152 2009a symmetric
T1 template (skull-stripped) and its grey- and white-matter probability maps, which the nilearn
package installs as data files (no network). Labels are background 0, CSF 1 (brain voxels that are
neither grey nor white matter), grey matter 2, white matter 3, and optionally a synthetic lesion 4.
Every case is a random smooth deformation of that one anatomy (a small random affine plus a smooth
displacement field; image and label are resampled through the same field), so the cohort has
realistic brain shape and contrast but the variability of one subject, not of a population.

Each site has its own scanner-like character, fixed by the seed:

* a multiplicative bias field (smooth, site amplitude and direction, per-case jitter);
* a contrast curve (gamma) and an arbitrary intensity scale, stored as int16 like scanners do;
* Rician noise of a site-specific level;
* resolution: a site-specific slice spacing (thicker slices give fewer slices) and in-plane blur;
* the voxel order on disk (RAS, LAS or LPS), so readers must canonicalise.

Output: ``OUT/site_0 .. OUT/site_{K-1}`` and ``OUT/test`` (held-out cases of every site), each an
nnU-Net v2 raw dataset, plus ``OUT/cohort.json`` describing the sites and cases.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff
from scipy.ndimage import gaussian_filter

from gem3d.data.nifti import save_nifti
from gem3d.data.nnunet_raw import case_files, dataset_json
from gem3d.errors import DataError
from gem3d.files import AtomicFolder

LABEL_NAMES = ("background", "CSF", "GM", "WM", "lesion")
ORIENTATIONS = ("RAS", "LAS", "LPS")
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass(frozen=True)
class SiteCharacter:
    """One simulated scanner.

    Attributes:
        gamma: contrast curve ``I ** gamma`` on the [0, 1] template intensity.
        scale: arbitrary units of the stored intensities.
        noise: Rician noise sigma relative to the [0, 1] intensity.
        bias: bias-field amplitude (log scale), with ``bias_direction`` its main axis.
        slice_factor: slice spacing relative to the in-plane spacing (1 = isotropic).
        blur: in-plane Gaussian blur sigma in voxels.
        orientation: the voxel order written to disk.
    """

    name: str
    gamma: float
    scale: float
    noise: float
    bias: float
    bias_direction: tuple[float, float, float]
    slice_factor: float
    blur: float
    orientation: str


def template_dir() -> Path:
    """nilearn's bundled data folder, found from the installed package (no network, and no import:
    importing ``nilearn.datasets`` pulls in pandas and scikit-learn and costs seconds)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the nilearn package is not installed; it ships the MNI152 template the demo is built from")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder}: nilearn's MNI152 template files are missing ({', '.join(missing)})")
    return folder


@functools.lru_cache(maxsize=1)
def load_template(block: int = 3) -> tuple[np.ndarray, float]:
    """The template cropped to the brain and block-averaged.

    Args:
        block: average ``block**3`` voxels of the 1 mm template, to limit aliasing when sampling coarsely.
    Returns:
        channels ``[5, X, Y, Z]`` float32 (T1 in [0, 1], then CSF, GM, WM, brain probabilities) on
        a RAS grid, and its spacing in mm.
    """
    folder = template_dir()
    raw = [np.asarray(nib.Nifti1Image.from_filename(folder / TEMPLATE_FILES[k]).dataobj) for k in ("t1", "gm", "wm")]
    # A margin of background around the brain, so deformed cases are not cut at the field of view.
    margin = 4 * block
    raw = [np.pad(a, margin) for a in raw]
    hits = np.argwhere(raw[0] > 0)
    lo, hi = hits.min(axis=0) - margin, hits.max(axis=0) + 1 + margin
    # Grow the box to a multiple of the block so averaging keeps the whole brain.
    hi = lo + -(-(hi - lo) // block) * block
    pad = [(0, max(0, int(h) - n)) for h, n in zip(hi, raw[0].shape, strict=True)]
    t1, gm, wm = (np.pad(a, pad)[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32) / 255.0 for a in raw)
    brain = (t1 > 0).astype(np.float32)
    csf = brain * np.clip(1.0 - gm - wm, 0.0, 1.0)
    stack = np.stack([t1, csf, gm * brain, wm * brain, brain])
    shape = [n // block for n in stack.shape[1:]]
    stack = stack.reshape(5, shape[0], block, shape[1], block, shape[2], block).mean(axis=(2, 4, 6))
    return np.ascontiguousarray(stack, dtype=np.float32), float(block)


def site_characters(num_sites: int, seed: int) -> list[SiteCharacter]:
    """Sites spread over each factor (shuffled), so any two sites differ in intensity statistics."""
    rng = np.random.default_rng([seed, 7919])

    def spread(low: float, high: float) -> np.ndarray:
        values = np.linspace(low, high, num_sites) if num_sites > 1 else np.array([(low + high) / 2])
        return rng.permutation(values)

    gammas, noises, biases = spread(0.65, 1.5), spread(0.01, 0.06), spread(0.05, 0.4)
    scales, slices, blurs = spread(600.0, 3000.0), spread(1.0, 1.6), spread(0.0, 0.8)
    sites = []
    for k in range(num_sites):
        direction = rng.normal(size=3)
        unit = direction / np.linalg.norm(direction)
        sites.append(
            SiteCharacter(
                name=f"site_{k}",
                gamma=round(float(gammas[k]), 3),
                scale=round(float(scales[k]), 1),
                noise=round(float(noises[k]), 4),
                bias=round(float(biases[k]), 3),
                bias_direction=(round(float(unit[0]), 3), round(float(unit[1]), 3), round(float(unit[2]), 3)),
                slice_factor=round(float(slices[k]), 3),
                blur=round(float(blurs[k]), 3),
                orientation=ORIENTATIONS[k % len(ORIENTATIONS)],
            )
        )
    return sites


def _deformation_grid(shape: tuple[int, int, int], rng: np.random.Generator, strength: float) -> torch.Tensor:
    """Sampling positions ``[1, X, Y, Z, 3]`` in normalised template coordinates (grid_sample order z, y, x).

    A random affine (rotation up to ~6 degrees, scale +-6 %) about the centre, plus a smooth
    displacement field: Gaussian noise on a 4x4x4 control grid, upsampled trilinearly.
    """
    axes = [torch.linspace(-1.0, 1.0, n) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # [X, Y, Z, 3] as (x, y, z)
    angles = rng.uniform(-0.1, 0.1, size=3)
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = rotation @ r
    matrix = torch.tensor(rotation * rng.uniform(0.94, 1.06, size=3), dtype=torch.float32)
    shift = torch.tensor(rng.uniform(-0.03, 0.03, size=3), dtype=torch.float32)
    control = torch.tensor(rng.normal(0.0, strength, size=(1, 3, 4, 4, 4)), dtype=torch.float32)
    field = F.interpolate(control, size=shape, mode="trilinear", align_corners=True)[0].permute(1, 2, 3, 0)
    warped = grid @ matrix.T + shift + field
    return warped.flip(-1)[None]  # grid_sample wants (z, y, x) for an input [N, C, X, Y, Z]


def make_case(
    site: SiteCharacter, size: int, rng: np.random.Generator, lesion: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One deformed case with the site's character.

    Args:
        size: voxels along the longest in-plane (x, y) extent; z follows the site's slice spacing.
    Returns:
        image ``[X, Y, Z]`` int16, label ``[X, Y, Z]`` uint8, affine ``[4, 4]``, in the site's voxel order.
    """
    template, template_spacing = load_template()
    extent = np.array(template.shape[1:]) * template_spacing  # mm along x, y, z
    spacing = float(max(extent[0], extent[1]) / size)
    spacings = np.array([spacing, spacing, spacing * site.slice_factor])
    nx, ny, nz = (max(4, round(e / s)) for e, s in zip(extent, spacings, strict=True))
    shape = (nx, ny, nz)
    grid = _deformation_grid(shape, rng, strength=0.04)
    source = torch.from_numpy(template)[None]  # [1, 5, X, Y, Z]
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0].numpy()
    t1, csf, gm, wm, brain = warped
    probabilities = np.stack([1.0 - brain, csf, gm, wm])
    label = np.argmax(probabilities, axis=0).astype(np.uint8)
    image = np.clip(t1, 0.0, 1.0)
    if lesion:
        candidates = np.argwhere(label == 3)
        centre = candidates[rng.integers(len(candidates))]
        radii = rng.uniform(1.2, 2.5, size=3)
        coords = np.indices(shape).reshape(3, -1).T.reshape(*shape, 3)
        inside = (((coords - centre) / radii) ** 2).sum(axis=-1) <= 1.0
        inside &= label > 0
        label[inside] = 4
        image[inside] *= 0.45  # a T1 "black hole"
    # Site character: contrast curve, blur, bias field, Rician noise, units.
    image = image**site.gamma
    if site.blur > 0:
        image = gaussian_filter(image, sigma=(site.blur, site.blur, 0.0))
    axes = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    direction = np.array(site.bias_direction) + rng.normal(0.0, 0.2, size=3)
    bias = np.exp(site.bias * sum(d * a for d, a in zip(direction, axes, strict=True)))
    image = image * bias
    noise = rng.normal(0.0, site.noise, size=(2, *shape))
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    image = np.clip(image * site.scale, 0, 32767).astype(np.int16)
    # Centre the brain at the world origin, then store in the site's voxel order.
    affine = np.diag([*spacings, 1.0])
    affine[:3, 3] = -0.5 * (np.array(shape) - 1) * spacings
    ornt = axcodes2ornt(tuple(site.orientation))
    image, label = apply_orientation(image, ornt), apply_orientation(label, ornt)
    affine = affine @ inv_ornt_aff(ornt, shape)
    return np.ascontiguousarray(image), np.ascontiguousarray(label), affine


def _dataset_json(name: str, num_cases: int, num_labels: int) -> dict[str, object]:
    description = "gem3d demo cohort: the MNI152 template anatomy, randomly deformed, simulated scanner effects"
    labels = {i: LABEL_NAMES[i] for i in range(num_labels)}
    return dataset_json("T1", labels, num_cases, name=name, description=description)


def _write_split(
    folder: Path,
    character: SiteCharacter,
    site_index: int,
    count: int,
    held_out: bool,
    seed: int,
    size: int,
    lesion: bool,
) -> list[dict[str, str]]:
    """Write ``count`` cases of one site into ``folder`` (imagesTr, labelsTr); return their cohort entries.

    Not ``DatasetWriter``: ``folder`` is one split inside a cohort renamed into place whole, and
    a seed fixes the cohort's bytes: uint8 labels (the writer stores int16) and a ``dataset.json``
    with a name and description. The file names are the layout's (``case_files``).
    """
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    cases = []
    for index in range(count):
        case_id = f"{character.name}_test_{index:03d}" if held_out else f"{character.name}_{index:03d}"
        # One stream per case: a case does not change when other counts change.
        rng = np.random.default_rng([seed, site_index, int(held_out), index])
        image, label, affine = make_case(character, size, rng, lesion)
        for array, path in zip((image, label), case_files(folder, case_id), strict=True):
            save_nifti(path, array, affine)
        cases.append({"id": case_id, "site": character.name, "split": folder.name})
    return cases


DEMO_ROOT_MARKER = ".gem3d-demo-partitions"
"""In a data root whose site folders the simulated sites build themselves (``write_demo_site``)."""


def write_demo_site(
    root: str | Path, index: int, sites: int, cases_per_site: int = 6, size: int = 32, seed: int = 0
) -> Path:
    """Write one site's partition of the demo cohort, ``root/site_<index>``: the cases ``write_demo_cohort`` gives it.

    For a simulation started with nothing prepared (``flwr run .``): each simulated site builds
    its own partition on first use, as Flower's quickstarts partition a public dataset. Atomic:
    built beside, then renamed; a site that finds its folder built meanwhile keeps that one.
    """
    root = Path(root)
    target = root / f"site_{index}"
    if not 0 <= index < sites:
        raise DataError(f"demo partition {index}: expected 0..{sites - 1}")
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_ROOT_MARKER).touch()
    character = site_characters(sites, seed)[index]
    with AtomicFolder(target, keep_existing=True) as tmp:
        written = _write_split(tmp, character, index, cases_per_site, False, seed, size, lesion=False)
        (tmp / "dataset.json").write_text(
            json.dumps(_dataset_json(f"gem3d-demo-{target.name}", len(written), 4), indent=2)
        )
    return target


def write_demo_cohort(
    out: str | Path,
    sites: int = 3,
    cases_per_site: int = 5,
    size: int = 32,
    seed: int = 0,
    test_per_site: int = 1,
    lesion: bool = False,
    pooled: bool = False,
) -> Path:
    """Write the cohort to ``out`` (atomically: built in a temporary folder, then renamed).

    Args:
        pooled: write every site's training cases into one folder, ``pooled`` (a multi-scanner
            dataset, as public ones are), instead of one folder per site. The cases are the same.
    Returns:
        ``out``, holding ``site_0 .. site_{sites-1}`` (or ``pooled``), ``test`` and ``cohort.json``.
    """
    out = Path(out)
    if sites < 1 or cases_per_site < 1 or test_per_site < 0:
        raise DataError("demo-data needs at least one site and one case per site")
    if not 8 <= size <= 512:  # beyond 512 a single case is gigabytes: no demo needs it
        raise DataError(f"demo-data --size {size}: expected 8..512 voxels")
    if out.exists():
        raise DataError(f"{out}: already exists; choose a new folder")
    try:
        folder = AtomicFolder(out)
    except OSError as error:
        raise DataError(f"{out}: output folder not writable ({error.strerror})") from None
    num_labels = 5 if lesion else 4
    characters = site_characters(sites, seed)
    cases: list[dict[str, str]] = []
    record: dict[str, object] = {
        "what": "one template's anatomy (nilearn MNI152 2009a T1 + GM/WM maps), randomly deformed per case",
        "seed": seed,
        "size": size,
        "labels": list(LABEL_NAMES[:num_labels]),
        "sites": [asdict(c) for c in characters],
        "pooled": pooled,
        "cases": cases,
    }
    with folder as tmp:
        training = [("pooled" if pooled else c.name, c, cases_per_site, False) for c in characters]
        for split, character, count, held_out in training + [("test", c, test_per_site, True) for c in characters]:
            cases += _write_split(
                tmp / split, character, characters.index(character), count, held_out, seed, size, lesion
            )
        for split in dict.fromkeys([name for name, *_ in training] + ["test"]):
            count = sum(1 for c in cases if c["split"] == split)
            (tmp / split / "dataset.json").write_text(
                json.dumps(_dataset_json(f"gem3d-demo-{split}", count, num_labels), indent=2)
            )
        (tmp / "cohort.json").write_text(json.dumps(record, indent=2))
    return out
