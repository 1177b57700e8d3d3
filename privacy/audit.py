"""The memorization audit: does a synthetic cohort copy training volumes, and does the model leak membership?

What counts as a copy is what a person would call one (issue 12, point 5): the same patient
flipped (any axis), shifted by a few voxels, with a different intensity curve (any monotonic
map: scale, offset, gamma) or with noise, and also a volume that carries one copied slice.

**Canonical form** of a volume (every synthetic, training and holdout volume alike):

1. a light Gaussian smoothing (``smoothing`` voxels of the audit grid; against noise), then a
   resampling to the grid (trilinear);
2. histogram standardisation (Nyúl & Udupa, MRM 1999): every voxel's rank within its own volume
   is mapped through one standard scale, the mean sorted intensities of the training volumes.
   Ranks remove any monotonic intensity change; mapping them back to a typical intensity scale
   (rather than comparing ranks) keeps the noise of a near-uniform tissue from being blown up to
   the whole rank range of that tissue;
3. padded with background, and moved (Fourier shift, sub-voxel) so that its intensity centre of
   mass is the grid's centre: a shifted copy lands where its source lies.

**Volume check** (``image`` space): the RMS difference between canonical volumes, the minimum
over the 8 flips (each subset of the three axes; a flip about the centre keeps the centre) and
residual integer shifts of up to ``max_shift`` voxels per axis. ``feature`` space: the same
canonical volumes and flips through a fixed, seeded, **untrained** random 3D conv net (global
pooled, unit-normalised features; no pretrained weights are available offline).

**Slice check** (``slice`` space): every slice along the slice axis (axis 0) with at least
``slice_foreground`` of its pixels above the background (10% of the volume's range) is put in
the same canonical form in 2D (per slice: ranks mapped through the training slices' standard
scale, centred), and compared with every such slice of every training volume, under the 8
dihedral variants (4 rotations x mirror). A synthetic volume with one slice closer to a training
slice than the threshold is a copy, however different the rest of it is.

**Threshold**: the reference distances are those of real cases the model never saw (each holdout
volume / slice to its nearest training volume / slice) or, without a holdout, of each training
case to the *other* training cases (leave one out). A synthetic volume (slice) is a copy when its
nearest-neighbour distance is below ``margin * Q_quantile(reference distances)``, the quantile
interpolated linearly between observed values. The quantile needs at least ``ceil(1/quantile)``
reference cases (``min_reference``), else one case would set it; fewer are refused
(``AuditReferenceError``). The margin is there because a bare quantile flags, by construction,
about that fraction of volumes that are as new as real unseen patients; a copy sits far below.

Caveat: GEM-3D conditions on a real (edited) mask, so a synthetic volume shares its source
patient's anatomy; unedited masks make copies by this rule, and mask edits are what move a
volume away from its source.

**Membership inference** (``membership_inference``): the denoising error of each training and
holdout case at several fixed timesteps (the same windows and noise for every case), each
timestep's error standardised over the pooled cases (no labels used) and averaged (lower means
member; after Carlini et al., "Extracting training data from diffusion models", USENIX Sec 2023,
and Matsumoto et al., "Membership inference attacks against diffusion models", SPW 2023, who find
the signal at small and middle timesteps). Reported: the AUC with a seeded bootstrap 95% interval,
the TPR at 1% FPR, and the single-loss attack of the first audit as ``auc_loss``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

from gem3d.config import Config
from gem3d.data.spill import LazySequence
from gem3d.data.volume import Volume
from gem3d.data.windows import WindowSource
from gem3d.diffusion import noise_process
from gem3d.errors import DataError
from gem3d.files import atomic_write
from gem3d.training import DenoisingInputs, Stage, draw_inputs, per_sample_loss, predict

AUDIT_FORMAT = "gem3d-audit/2"
FEATURE_SPACE = "random-conv3d: untrained 3-layer 3D conv net (seeded), global mean+max pooled, L2-normalised"
VOLUME_SPACES = ("image", "feature")
FLIPS: tuple[tuple[int, ...], ...] = tuple(f for r in range(4) for f in itertools.combinations((0, 1, 2), r))
# Fractions of the training schedule the attack noises to (issue 12: several fixed timesteps).
MIA_TIMESTEPS = (0.02, 0.1, 0.25, 0.5)
FOREGROUND_LEVEL = 0.1  # a pixel is foreground above 10% of its volume's intensity range
_CHUNK = 64  # query rows per distance matrix, slices per canonical form: memory stays flat in cohort size
_VOLUMES = 8  # volumes put in canonical form at once (its centring holds ~1.3 MB per 32^3 volume)


class AuditReferenceError(DataError):
    """Too few reference cases for the requested quantile: the threshold would rest on one or two patients."""


@dataclass(frozen=True)
class AuditSettings:
    """How the copy rule is applied (see the module docstring).

    Attributes:
        grid: the audit grid volumes are compared on (8..128 per axis); slices use its last two.
        quantile: the reference quantile, strictly between 0 and 1.
        margin: threshold = margin x that quantile (> 0).
        min_reference: reference cases needed; ``None`` means ``ceil(1 / quantile)``.
        smoothing: Gaussian sigma in grid voxels before comparing (against noise); 0 turns it off.
        max_shift: residual integer shifts (voxels per axis) tried after centring.
        slice_check: also compare single slices (copied slices, regions).
        slice_foreground: a slice takes part when at least this fraction of it is foreground.
        feature_seed: seed of the random feature network.
    """

    grid: tuple[int, int, int] = (32, 32, 32)
    quantile: float = 0.05
    margin: float = 0.5
    min_reference: int | None = None
    smoothing: float = 1.5
    max_shift: int = 1
    slice_check: bool = True
    slice_foreground: float = 0.25
    feature_seed: int = 0

    def __post_init__(self) -> None:
        if len(self.grid) != 3 or not all(8 <= int(n) <= 128 for n in self.grid):
            raise ValueError(f"grid must be three sizes within 8..128, got {self.grid}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must be strictly between 0 and 1, got {self.quantile}")
        if not self.margin > 0:
            raise ValueError(f"margin must be > 0, got {self.margin}")
        if self.min_reference is not None and self.min_reference < 1:
            raise ValueError(f"min_reference must be >= 1, got {self.min_reference}")
        if not 0 <= self.smoothing <= 8:
            raise ValueError(f"smoothing must be within 0..8 voxels, got {self.smoothing}")
        if not 0 <= self.max_shift <= 3:
            raise ValueError(f"max_shift must be within 0..3 voxels, got {self.max_shift}")
        if not 0 < self.slice_foreground <= 1:
            raise ValueError(f"slice_foreground must be within (0, 1], got {self.slice_foreground}")

    @property
    def required_reference(self) -> int:
        """Reference cases the quantile needs: ``min_reference``, or ``ceil(1 / quantile)``."""
        if self.min_reference is not None:
            return self.min_reference
        return math.ceil(1.0 / self.quantile - 1e-9)


def settings_to_json(settings: AuditSettings) -> str:
    """The settings as a JSON object (a Flower config value: scalars only, so one string)."""
    return json.dumps(asdict(settings), sort_keys=True)


def settings_from_json(text: str) -> AuditSettings:
    """Inverse of ``settings_to_json``; unknown or invalid fields raise ``DataError`` (one line)."""
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        known = {f.name for f in fields(AuditSettings)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TypeError(f"unknown field(s) {', '.join(unknown)}")
        if "grid" in raw:
            raw["grid"] = tuple(int(n) for n in raw["grid"])
        return AuditSettings(**raw)
    except (TypeError, ValueError) as error:
        raise DataError(f"audit settings: {error}") from None


# --- the canonical form -------------------------------------------------------------------------


def _gaussian(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    return kernel / kernel.sum()


def smooth(x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing of ``[N, 1, *S]`` (2 or 3 spatial dims), per-axis ``sigmas``.

    Outside the array is each item's minimum (its background), so content at the border is not
    smeared outward as with replicate padding.
    """
    dims = x.dim() - 2
    conv = F.conv3d if dims == 3 else F.conv2d
    low = x.flatten(1).amin(dim=1).view(-1, *([1] * (dims + 1)))
    x = x - low
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        kernel = _gaussian(float(sigma))
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = len(kernel)
        pad = [0] * (2 * dims)
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = len(kernel) // 2
        x = conv(F.pad(x, pad), kernel.view(shape))
    return x + low


def ranks(flat: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` -> ``[N, V]``: each value's rank within its row in [0, 1], ties sharing their mean rank."""
    out = np.empty(tuple(flat.shape), dtype=np.float32)
    values = flat.double().numpy()
    for row in range(values.shape[0]):
        out[row] = (rankdata(values[row]) - 1) / max(values.shape[1] - 1, 1)
    return torch.from_numpy(out)


def standard_scale(flat: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` -> ``[V]``: the mean of the rows' sorted values, the scale ranks are mapped through."""
    return flat.sort(dim=1).values.mean(dim=0)


def standardise(flat: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Map each row's ranks through ``scale`` (linear interpolation), background at 0: ``[N, V]``."""
    position = ranks(flat) * (len(scale) - 1)
    low = position.floor().long().clamp(0, len(scale) - 2)
    weight = position - low
    return scale[low] * (1 - weight) + scale[low + 1] * weight - scale[0]


def centre(x: torch.Tensor) -> torch.Tensor:
    """Shift each ``[N, 1, *S]`` item (Fourier shift, sub-voxel) so its centre of mass is the array's centre.

    Items must be >= 0 with background 0 and a background margin: the shift is cyclic.
    """
    spatial = x.shape[2:]
    axes = [torch.arange(n, dtype=torch.float64) for n in spatial]
    mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # [dims, *S]
    weight = x[:, 0].double()
    mass = weight.flatten(1).sum(dim=1).clamp(min=1e-12)
    com = (weight[:, None] * mesh[None]).flatten(2).sum(dim=2) / mass[:, None]  # [N, dims]
    shift = (torch.tensor(spatial, dtype=torch.float64) - 1) / 2 - com
    dims = tuple(range(2, x.dim()))
    spectrum = torch.fft.rfftn(x.double(), dim=dims)
    phase = torch.zeros(spectrum.shape[0], *spectrum.shape[2:], dtype=torch.float64)
    for axis, n in enumerate(spatial):
        freq = torch.fft.rfftfreq(n) if axis == len(spatial) - 1 else torch.fft.fftfreq(n)
        view = [1] * len(spatial)
        view[axis] = -1
        phase = phase + freq.double().view(1, *view) * shift[:, axis].view(-1, *([1] * len(spatial)))
    moved = torch.fft.irfftn(spectrum * torch.exp(-2j * math.pi * phase)[:, None], s=spatial, dim=dims)
    return moved.float().clamp(min=0)


def _padding(settings: AuditSettings) -> int:
    """Background margin around a canonical array: room for centring and residual shifts."""
    return settings.max_shift + max(2, round(0.05 * max(settings.grid)))


def _images(volumes: Sequence[Volume]) -> LazySequence[np.ndarray]:
    """The volumes' images, each got when indexed: the training set may be a sequence that reads each case from disk."""
    return LazySequence(len(volumes), lambda i: volumes[i].image)


def volume_grid(volumes: Sequence[np.ndarray], settings: AuditSettings) -> torch.Tensor:
    """``[D, H, W]`` volumes (any sizes) -> ``[N, 1, *grid]``: smoothed (in grid voxels), then resampled."""
    out = []
    for image in volumes:
        tensor = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
        sigmas = [settings.smoothing * n / g for n, g in zip(tensor.shape[2:], settings.grid, strict=True)]
        tensor = smooth(tensor, sigmas) if settings.smoothing > 0 else tensor
        out.append(F.interpolate(tensor, size=settings.grid, mode="trilinear", align_corners=False))
    return torch.cat(out)


def canonical(grids: torch.Tensor, scale: torch.Tensor, pad: int) -> torch.Tensor:
    """``[N, 1, *S]`` smoothed grids -> standardised, padded, centred ``[N, 1, *(S + 2 pad)]``."""
    flat = standardise(grids.flatten(1), scale).view_as(grids)
    return centre(F.pad(flat, [pad] * (2 * (grids.dim() - 2))))


def volume_slices(
    volumes: Sequence[np.ndarray], settings: AuditSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slices (axis 0) with enough foreground, smoothed on the grid's in-plane size.

    Returns:
        slices ``[M, 1, H, W]``, the volume index ``[M]`` and the slice index ``[M]`` of each.
    """
    size = settings.grid[1:]
    kept, owners, positions = [], [], []
    for index, image in enumerate(volumes):
        tensor = torch.as_tensor(np.asarray(image, dtype=np.float32))[:, None]  # [D, 1, H, W]
        if settings.smoothing > 0:
            sigmas = [settings.smoothing * n / g for n, g in zip(tensor.shape[2:], size, strict=True)]
            background = tensor.amin()
            tensor = smooth(tensor - background, sigmas) + background  # one background for the whole volume
        tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
        low, high = float(tensor.amin()), float(tensor.amax())
        foreground = (tensor > low + FOREGROUND_LEVEL * (high - low)).flatten(1).float().mean(dim=1)
        chosen = torch.nonzero(foreground >= settings.slice_foreground).flatten()
        kept.append(tensor[chosen])
        owners.append(torch.full((len(chosen),), index, dtype=torch.long))
        positions.append(chosen)
    return torch.cat(kept), torch.cat(owners), torch.cat(positions)


Variants = Callable[[torch.Tensor], Iterable[torch.Tensor]]


def _nearest(
    query: torch.Tensor,
    variants: Variants,
    reference: torch.Tensor,
    norm: float,
    owners: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest reference row to each query row under any of its variants, in bounded chunks.

    Args:
        query: ``[Nq, ...]``; ``variants(chunk)`` yields the chunk's variants (flips, shifts, features).
        reference: ``[Nr, ...]`` rows to compare against.
        norm: distances are divided by it (``sqrt(voxels)`` gives an RMS difference).
        owners: ``([Nq], [Nr])`` case ids: a pair of the same case does not count (leave one
            out). Compared chunk by chunk, never as an ``[Nq, Nr]`` matrix.
    Returns:
        the distance ``[Nq]`` and the index ``[Nq]`` of the nearest reference row.
    """
    ref = reference.flatten(1)
    values, indices = torch.empty(len(query)), torch.empty(len(query), dtype=torch.long)
    for start in range(0, len(query), _CHUNK):
        rows = slice(start, start + _CHUNK)
        best = torch.full((len(query[rows]), ref.shape[0]), float("inf"))
        for variant in variants(query[rows]):
            best = torch.minimum(best, torch.cdist(variant.flatten(1), ref))
        if owners is not None:
            best[owners[0][rows, None] == owners[1][None, :]] = float("inf")
        values[rows], indices[rows] = best.min(dim=1)
    return (values / norm).double().numpy(), indices.numpy()


def volume_variants(max_shift: int) -> Variants:
    """Each flip of centred volumes ``[N, 1, D, H, W]`` (a flip keeps them centred), each with residual shifts."""
    shifts = list(itertools.product(range(-max_shift, max_shift + 1), repeat=3))

    def variants(canon: torch.Tensor) -> Iterable[torch.Tensor]:
        for flip in FLIPS:
            flipped = torch.flip(canon, dims=[d + 2 for d in flip]) if flip else canon
            for shift in shifts:
                yield torch.roll(flipped, shift, dims=(2, 3, 4)) if any(shift) else flipped

    return variants


def dihedral(x: torch.Tensor) -> Iterable[torch.Tensor]:
    """The 8 dihedral variants of square ``[N, 1, S, S]`` slices: 4 rotations, each also mirrored."""
    for k in range(4):
        rotated = torch.rot90(x, k, dims=(2, 3))
        yield rotated
        yield torch.flip(rotated, dims=(3,))


class RandomFeatures(nn.Module):
    """A fixed, seeded, untrained 3D conv feature extractor: ``[N, 1, D, H, W]`` -> ``[N, 128]`` unit vectors."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            convs = [nn.Conv3d(1, 16, 3, stride=2, padding=1)]
            convs += [nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.Conv3d(32, 64, 3, stride=2, padding=1)]
            for conv in convs:
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
            self.convs = nn.ModuleList(convs)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 1, D, H, W]`` -> ``[N, 128]``, one volume at a time.

        A batched conv rounds differently for different batch sizes; one at a time, a volume's
        features never depend on its batch-mates or on the audit's chunks, and on a CPU it is as fast.
        """
        return torch.cat([self._features(volume[None]) for volume in x]) if len(x) else x.new_zeros(0, 128)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        pooled = torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1)
        return F.normalize(pooled, dim=1)


def _summary(values: np.ndarray, quantile: float, extremes: bool) -> dict[str, float] | None:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return None
    out = {f"q{quantile:g}": float(np.quantile(finite, quantile)), "median": float(np.median(finite))}
    if extremes:  # a minimum or maximum is one pair's distance: kept out of a published report
        out = {"min": float(finite.min()), **out, "max": float(finite.max())}
    return out


@dataclass(frozen=True)
class AuditResult:
    """The audit's figures; ``report()`` is the JSON report, ``verdict()`` what may leave a site.

    ``reference_nn[space]``: the reference distances (one per reference case; per reference slice
    for ``slice``). ``synthetic_nn[space]``: one per synthetic volume (its closest slice for
    ``slice``; ``inf`` without a slice that takes part). ``copied_slices``: per synthetic volume.
    """

    settings: AuditSettings
    synthetic_ids: list[str]
    train_ids: list[str]
    reference: str
    reference_cases: int
    reference_nn: dict[str, np.ndarray]
    synthetic_nn: dict[str, np.ndarray]
    synthetic_nearest: dict[str, np.ndarray]
    thresholds: dict[str, float]
    copied_slices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    slice_counts: dict[str, int] = field(default_factory=dict)
    mia: dict[str, Any] | None = None

    @property
    def volume_flags(self) -> np.ndarray:
        """``[N]`` bool: the whole volume is a copy (image or feature space)."""
        flags = np.zeros(len(self.synthetic_ids), dtype=bool)
        for space in VOLUME_SPACES:
            if space in self.thresholds:
                flags |= self.synthetic_nn[space] < self.thresholds[space]
        return flags

    @property
    def slice_flags(self) -> np.ndarray:
        """``[N]`` bool: the volume carries at least one copied slice."""
        if not len(self.copied_slices):
            return np.zeros(len(self.synthetic_ids), dtype=bool)
        return self.copied_slices > 0

    @property
    def copy_flags(self) -> np.ndarray:
        return self.volume_flags | self.slice_flags

    @property
    def copies(self) -> list[str]:
        return [case for case, flag in zip(self.synthetic_ids, self.copy_flags, strict=True) if flag]

    @property
    def passed(self) -> bool:
        return not self.copies

    def verdict(self) -> dict[str, Any]:
        """What a site may send in a federated audit round: counts only (no distance, id or threshold).

        Keys: ``passed``; ``synthetic`` (volumes audited); ``copies`` (volumes that are copies by
        any check); ``volume_copies`` (by the whole-volume check); ``slice_copies`` (copied slices,
        all volumes together); ``reference`` (``holdout`` or ``leave-one-out``) and
        ``reference_cases``.
        """
        return {
            "passed": bool(self.passed),
            "synthetic": len(self.synthetic_ids),
            "copies": len(self.copies),
            "volume_copies": int(self.volume_flags.sum()),
            "slice_copies": int(self.copied_slices.sum()) if len(self.copied_slices) else 0,
            "reference": "holdout" if self.reference.startswith("holdout") else "leave-one-out",
            "reference_cases": self.reference_cases,
        }

    def report(self, include_ids: bool = True) -> dict[str, Any]:
        """The JSON report.

        ``include_ids=False`` is the published form (the release's privacy report): the rule, the
        settings and counts only. No case id, no per-case figure, and no distance at all: a
        threshold or a quantile of distances between real patients is a statistic of their
        images outside any DP mechanism (issue 12, point 8).
        """
        s = self.settings
        per_case = []
        if include_ids:
            for index, case in enumerate(self.synthetic_ids):
                entry: dict[str, Any] = {"case": case, "copy": bool(self.copy_flags[index])}
                for space in self.thresholds:
                    distance = float(self.synthetic_nn[space][index])
                    entry[space] = {
                        "nn_distance": distance if math.isfinite(distance) else None,
                        "nearest_train": self.train_ids[int(self.synthetic_nearest[space][index])]
                        if math.isfinite(distance)
                        else None,
                    }
                if "slice" in self.thresholds:
                    entry["slice"]["copied_slices"] = int(self.copied_slices[index])
                per_case.append(entry)
        grid = "x".join(map(str, s.grid))
        return {
            "format": AUDIT_FORMAT,
            "rule": (
                f"copy if the nearest-neighbour distance to the training set is below {s.margin:g} x the "
                f"{s.quantile:g} quantile of the {self.reference} distances: whole volumes on a {grid} grid "
                "(image space: RMS difference after smoothing, histogram standardisation and centring, minimum "
                "over 8 flips and residual shifts; feature space: random conv features of the same), or any "
                "single slice against every training slice (8 dihedral variants)"
            ),
            "settings": {**asdict(s), "grid": list(s.grid), "min_reference": s.required_reference},
            "feature_space": f"{FEATURE_SPACE}, seed {s.feature_seed}",
            "reference": self.reference,
            "counts": {
                "synthetic": len(self.synthetic_ids),
                "train": len(self.train_ids),
                "reference": self.reference_cases,
                **self.slice_counts,
            },
            **(
                {
                    "thresholds": self.thresholds,
                    "reference_nn": {space: _summary(v, s.quantile, True) for space, v in self.reference_nn.items()},
                    "synthetic_nn": {space: _summary(v, s.quantile, True) for space, v in self.synthetic_nn.items()},
                }
                if include_ids
                else {"distances": "withheld: statistics of real patients' images (the full report: gem3d audit)"}
            ),
            "copies": len(self.copies),
            "volume_copies": int(self.volume_flags.sum()),
            "slice_copies": int(self.copied_slices.sum()) if len(self.copied_slices) else 0,
            "volumes_with_copied_slices": int(self.slice_flags.sum()),
            "copy_fraction": len(self.copies) / max(len(self.synthetic_ids), 1),
            "copy_ids": self.copies if include_ids else [],
            "per_case": per_case,
            "membership_inference": self.mia,
            "passed": self.passed,
            "verdict": self.verdict(),
        }


def check_holdout_disjoint(train: Sequence[Volume], holdout: Sequence[Volume], where: str) -> None:
    """Refuse (``AuditReferenceError``, one line) a holdout that shares a case with the training set.

    A holdout is the audit's picture of patients the model never saw: a training case in it
    lowers the threshold towards copies and makes the membership test compare members with
    members. Cases are compared by their image voxels on the model grid, so a renamed copy counts
    too, and so does a training image with another mask. ``where`` names the holdout
    (``--holdout PATH``).
    """
    seen = {_case_digest(v): v.case_id for v in train}
    shared = [(v.case_id, seen[d]) for v in holdout if (d := _case_digest(v)) in seen]
    if shared:
        pairs = ", ".join(f"{h} = training {t}" for h, t in shared[:3]) + (" ..." if len(shared) > 3 else "")
        raise AuditReferenceError(
            f"{where}: {len(shared)} of {len(holdout)} holdout cases are training cases ({pairs}); "
            "a holdout must be cases the model never saw"
        )


def _case_digest(volume: Volume) -> bytes:
    digest = hashlib.sha256(str(volume.image.shape).encode())
    digest.update(np.ascontiguousarray(volume.image, dtype=np.float32).tobytes())
    return digest.digest()


def check_reference(settings: AuditSettings, cases: int, kind: str) -> None:
    """Refuse (``AuditReferenceError``, one line) fewer reference cases than the quantile needs.

    Args:
        cases: holdout cases, or training cases when ``kind`` is ``leave-one-out``.
        kind: ``holdout`` or ``leave-one-out``.
    """
    needed = settings.required_reference
    if cases < needed:
        source = "holdout cases" if kind == "holdout" else "training cases (leave-one-out, no holdout)"
        why = f"the {settings.quantile:g} quantile needs" if settings.min_reference is None else "--min-reference asks"
        raise AuditReferenceError(
            f"audit: {cases} {source} as the reference, but {why} at least {needed}; add holdout cases "
            f"or raise --quantile (to at least {1 / cases:.3g})"
        )


class _TrainingReference:
    """The training set every other volume is compared with, held in canonical form.

    Holdout and synthetic volumes are streamed through ``compare`` in chunks of ``_VOLUMES``, so
    memory does not grow with the synthetic cohort (issue 16). Two spaces: ``image`` (RMS
    difference over the grid's voxels, over flips and residual shifts) and ``feature`` (random
    convolutional features, over flips); and the training slices when ``settings.slice_check``.
    """

    def __init__(self, train: Sequence[Volume], settings: AuditSettings) -> None:
        self.settings = settings
        self.pad = _padding(settings)
        grids = volume_grid(_images(train), settings)
        self.scale = standard_scale(grids.flatten(1))
        canon = torch.cat(
            [canonical(grids[i : i + _VOLUMES], self.scale, self.pad) for i in range(0, len(train), _VOLUMES)]
        )
        del grids
        features = RandomFeatures(settings.feature_seed)

        def feature_variants(chunk: torch.Tensor) -> Iterable[torch.Tensor]:
            for flip in FLIPS:
                yield features(torch.flip(chunk, dims=[d + 2 for d in flip]) if flip else chunk)

        train_features = torch.cat([features(canon[i : i + _VOLUMES]) for i in range(0, len(train), _VOLUMES)])
        norm = float(np.prod(settings.grid)) ** 0.5  # RMS difference over the grid's voxels
        self.spaces: dict[str, tuple[Variants, torch.Tensor, float]] = {
            "image": (volume_variants(settings.max_shift), canon, norm),
            "feature": (feature_variants, train_features, 1.0),
        }
        self.slices = _TrainSlices.build(train, settings, self.pad) if settings.slice_check else None

    def compare(self, volumes: Sequence[Volume]) -> _Distances:
        """Every volume (in chunks) and its slices against the training set."""
        found = _Distances(len(volumes), list(self.spaces))
        for first in range(0, len(volumes), _VOLUMES):
            chunk = [volumes[i] for i in range(first, min(first + _VOLUMES, len(volumes)))]
            found.case_ids += [v.case_id for v in chunk]
            canon = canonical(volume_grid([v.image for v in chunk], self.settings), self.scale, self.pad)
            for space, (variants, reference, space_norm) in self.spaces.items():
                distance, index = _nearest(canon, variants, reference, space_norm)
                found.volume_nn[space][first : first + len(chunk)] = distance
                found.volume_nearest[space][first : first + len(chunk)] = index
            if self.slices is not None:
                found.add_slices(first, self.slices.nearest([v.image for v in chunk], self.settings, self.pad))
        return found

    def leave_one_out(self) -> dict[str, np.ndarray]:
        """Each training case's distance to the nearest other training case, per space."""
        canon = self.spaces["image"][1]
        cases = torch.arange(len(canon))
        return {
            space: _nearest(canon, variants, reference, space_norm, owners=(cases, cases))[0]
            for space, (variants, reference, space_norm) in self.spaces.items()
        }


def memorization_audit(
    synthetic: Sequence[Volume],
    train: Sequence[Volume],
    holdout: Sequence[Volume] | None = None,
    settings: AuditSettings = AuditSettings(),
) -> AuditResult:
    """Nearest-neighbour distances of synthetic and reference volumes (and slices) to the training set.

    Memory: the training set, the reference, is held in canonical form only (its grids and
    slices at the audit's resolution; each training case is indexed once per pass, so ``train``
    too may read each case from disk when indexed); holdout and synthetic volumes are read
    ``_VOLUMES`` at a time (any ``Sequence``), so a synthetic cohort of any size costs one chunk
    (issue 16).

    Args:
        synthetic, train, holdout: volumes with ``image`` ``[D, H, W]`` in [-1, 1] (any sizes).
        holdout: real cases the model never saw; ``None`` uses leave-one-out training distances.
    Raises:
        AuditReferenceError: fewer reference cases than ``settings.required_reference``.
        DataError: an empty set; AuditReferenceError: a holdout case whose image is a training case's.
    """
    if not synthetic:
        raise DataError("audit: no synthetic volumes")
    if not train:
        raise DataError("audit: no training volumes")
    if holdout is not None and not holdout:
        raise DataError("audit: the holdout set is empty")
    if holdout is None and len(train) < 2:
        raise DataError("audit: without a holdout, at least two training volumes are needed")
    kind = "holdout" if holdout is not None else "leave-one-out"
    reference_cases = len(holdout) if holdout is not None else len(train)
    check_reference(settings, reference_cases, kind)
    if holdout is not None:
        check_holdout_disjoint(train, holdout, "audit: the holdout")
    reference = _TrainingReference(train, settings)
    spaces, train_slices = reference.spaces, reference.slices
    synthetic_nn, nearest, thresholds = {}, {}, {}
    # the reference distances: holdout to train, or each training case to the other training cases
    if holdout is not None:
        held = reference.compare(holdout)
        reference_nn = {space: held.volume_nn[space] for space in spaces}
        slice_ref = held.slice_arrays()[0]
    else:
        reference_nn = reference.leave_one_out()
        slice_ref = train_slices.leave_one_out() if train_slices is not None else np.zeros(0)
    found = reference.compare(synthetic)
    for space in spaces:
        synthetic_nn[space], nearest[space] = found.volume_nn[space], found.volume_nearest[space]
        thresholds[space] = settings.margin * float(np.quantile(reference_nn[space], settings.quantile))

    # single slices: a synthetic volume with one slice closer to a training slice than the threshold
    copied = np.zeros(len(synthetic), dtype=np.int64)
    slice_counts: dict[str, int] = {}
    if train_slices is not None:
        slice_ref = slice_ref[np.isfinite(slice_ref)]
        distance, owner, index = found.slice_arrays()
        if len(slice_ref) and len(distance):
            threshold = settings.margin * float(np.quantile(slice_ref, settings.quantile))
            np.add.at(copied, owner, (distance < threshold).astype(np.int64))
            syn_nn = np.full(len(synthetic), np.inf)
            syn_nearest = np.zeros(len(synthetic), dtype=np.int64)
            for row, case in enumerate(owner):
                if distance[row] < syn_nn[case]:
                    syn_nn[case], syn_nearest[case] = distance[row], int(train_slices.owner[index[row]])
            thresholds["slice"] = threshold
            reference_nn["slice"], synthetic_nn["slice"], nearest["slice"] = slice_ref, syn_nn, syn_nearest
        slice_counts = {"synthetic_slices": found.slice_count, "train_slices": len(train_slices.owner)}
        if holdout is not None:
            slice_counts["holdout_slices"] = held.slice_count
    return AuditResult(
        settings=settings,
        synthetic_ids=found.case_ids,
        train_ids=[v.case_id for v in train],
        reference="holdout-to-train" if holdout is not None else "train-to-train (leave-one-out)",
        reference_cases=reference_cases,
        reference_nn=reference_nn,
        synthetic_nn=synthetic_nn,
        synthetic_nearest=nearest,
        thresholds=thresholds,
        copied_slices=copied,
        slice_counts=slice_counts,
    )


@dataclass
class _Distances:
    """What ``memorization_audit`` found for one set of volumes, filled chunk by chunk.

    ``volume_nn[space]`` / ``volume_nearest[space]``: ``[N]`` distance to the nearest training
    volume and its index. ``slice_count``: the set's slices that take part (``volume_slices``);
    for each of them, when the training set has slices, its distance to the nearest training
    slice, its volume's index in the set and that training slice's row.
    """

    count: int
    spaces: list[str]
    case_ids: list[str] = field(default_factory=list)
    slice_count: int = 0
    volume_nn: dict[str, np.ndarray] = field(init=False)
    volume_nearest: dict[str, np.ndarray] = field(init=False)
    _slices: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.volume_nn = {space: np.zeros(self.count) for space in self.spaces}
        self.volume_nearest = {space: np.zeros(self.count, dtype=np.int64) for space in self.spaces}

    def add_slices(self, first: int, found: tuple[int, np.ndarray, np.ndarray, np.ndarray]) -> None:
        """One chunk's ``_TrainSlices.nearest``; its owners count from ``first``, the chunk's first volume."""
        count, distance, owner, index = found
        self.slice_count += count
        if len(distance):
            self._slices.append((distance, owner + first, index))

    def slice_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``[M]`` distances, owners and nearest training rows of the set's compared slices."""
        if not self._slices:
            return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        distance, owner, index = (np.concatenate(parts) for parts in zip(*self._slices, strict=True))
        return distance, owner, index


@dataclass(frozen=True)
class _TrainSlices:
    """The training slices every other slice is compared with.

    Attributes:
        canon: ``[M, 1, S, S]`` canonical slices; owner: ``[M]`` each one's training case.
        scale: the slices' standard scale (None: no training slice takes part, no slice check).
        norm: distances are divided by it (``sqrt`` of the in-plane grid's pixels: an RMS difference).
    """

    canon: torch.Tensor
    owner: torch.Tensor
    scale: torch.Tensor | None
    norm: float

    @classmethod
    def build(cls, train: Sequence[Volume], settings: AuditSettings, pad: int) -> _TrainSlices:
        slices, owner, _ = volume_slices(_images(train), settings)
        norm = float(np.prod(settings.grid[1:])) ** 0.5
        if not len(slices):
            return cls(slices, owner, None, norm)
        scale = standard_scale(slices.flatten(1))
        canon = torch.cat([canonical(slices[i : i + _CHUNK], scale, pad) for i in range(0, len(slices), _CHUNK)])
        return cls(canon, owner, scale, norm)

    def nearest(
        self, images: Sequence[np.ndarray], settings: AuditSettings, pad: int
    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """The slices of ``images`` that take part, against every training slice (8 dihedral variants).

        Returns:
            how many take part, and per slice (none without training slices): the distance, its
            volume's index in ``images`` and the nearest training slice's row.
        """
        slices, owner, _ = volume_slices(images, settings)
        if self.scale is None or not len(slices):
            return len(slices), np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        distance, index = _nearest(canonical(slices, self.scale, pad), dihedral, self.canon, self.norm)
        return len(slices), distance, owner.numpy(), index

    def leave_one_out(self) -> np.ndarray:
        """``[M]`` each training slice's distance to the nearest slice of another training case."""
        if self.scale is None:
            return np.zeros(0)
        return _nearest(self.canon, dihedral, self.canon, self.norm, owners=(self.owner, self.owner))[0]


# --- the copies the audit is specified to catch ------------------------------------------------

# What a person would call a copy of a training volume (issue 12, point 5): the audit's tests and
# its benchmark (experiments/benchmarks/audit_sensitivity.py) plant these.
COPY_KINDS = (
    "exact",
    "flip_lr",
    "flip_ap",
    "flip_si",
    "shift_2",
    "shift_3",
    "scale",
    "gamma",
    "noise_5",
    "noise_15",
    "noise_30",
    "slice",
)


def _shifted(image: np.ndarray, shift: Sequence[int]) -> np.ndarray:
    """``image`` moved by whole voxels, what moves in filled with its background (minimum)."""
    out = np.full_like(image, image.min())
    source = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, image.shape, strict=True))
    target = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(shift, image.shape, strict=True))
    out[target] = image[source]
    return out


def planted_copy(kind: str, source: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A ``[D, H, W]`` copy of ``source`` (in [-1, 1]) of one of ``COPY_KINDS``.

    ``flip_lr``/``flip_ap``/``flip_si`` flip axis 1/2/0 (the model grid is slice-first RAS:
    D superior, H right-left, W anterior-posterior); ``shift_2`` moves 2 voxels along both in-plane
    axes, ``shift_3`` (-2, -3, 2) voxels; ``scale`` is ``0.8 x + 0.1``; ``gamma`` is 0.7 on [0, 1];
    ``noise_N`` adds Gaussian noise of SD N% of the [-1, 1] scale (clipped); ``slice`` is ``other``
    with its middle slice replaced by ``source``'s slice there (a copied slice in a different volume).
    """
    x = np.asarray(source, dtype=np.float32)
    y: np.ndarray
    if kind == "exact":
        y = x.copy()
    elif kind.startswith("flip_"):
        y = np.flip(x, axis={"lr": 1, "ap": 2, "si": 0}[kind.removeprefix("flip_")])
    elif kind == "shift_2":
        y = _shifted(x, (0, 2, 2))
    elif kind == "shift_3":
        y = _shifted(x, (-2, -3, 2))
    elif kind == "scale":
        y = 0.8 * x + 0.1
    elif kind == "gamma":
        y = 2 * ((x + 1) / 2).clip(0, 1) ** 0.7 - 1
    elif kind.startswith("noise_"):
        noise = rng.normal(0.0, int(kind.removeprefix("noise_")) / 100, x.shape).astype(np.float32)
        y = np.clip(x + noise, -1, 1)
    elif kind == "slice":
        y = np.array(other, dtype=np.float32)
        z = min(x.shape[0], y.shape[0]) // 2
        if y.shape[1:] != x.shape[1:]:
            raise ValueError("a copied slice needs volumes with the same in-plane size")
        y[z] = x[z]
    else:
        raise ValueError(f"unknown copy kind {kind!r}; expected one of {', '.join(COPY_KINDS)}")
    return np.ascontiguousarray(y, dtype=np.float32)


# --- membership inference -----------------------------------------------------------------------


def rank_auc(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray) -> float:
    """Mann-Whitney AUC: P(positive score > negative score), ties counting one half."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("rank_auc needs at least one score on each side")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def auc_interval(
    positive: np.ndarray, negative: np.ndarray, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``rank_auc``: members and non-members resampled apart, seeded."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    rng = np.random.default_rng(seed)
    p = pos[rng.integers(len(pos), size=(resamples, len(pos)))]
    n = neg[rng.integers(len(neg), size=(resamples, len(neg)))]
    ranked = rankdata(np.concatenate([p, n], axis=1), axis=1)  # ties share their mean rank
    u = ranked[:, : len(pos)].sum(axis=1) - len(pos) * (len(pos) + 1) / 2
    aucs = u / (len(pos) * len(neg))
    tail = (1 - level) / 2
    return float(np.quantile(aucs, tail)), float(np.quantile(aucs, 1 - tail))


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float = 0.01) -> tuple[float, float]:
    """The TPR at the strictest threshold that keeps the FPR at most ``fpr``, and the FPR it reaches.

    With n non-members the FPR moves in steps of 1/n: below 1/fpr of them, this is the TPR at
    zero false positives (members scoring above every non-member).
    """
    neg = np.sort(np.asarray(negative, dtype=np.float64))[::-1]
    allowed = math.floor(fpr * len(neg) + 1e-9)
    threshold = neg[allowed] if allowed < len(neg) else -np.inf
    return float(np.mean(np.asarray(positive) > threshold)), allowed / len(neg)


def _case_batches(
    model: nn.Module,
    stage: Stage,
    cfg: Config,
    volumes: Sequence[Volume],
    seed: int,
    timestep: int | None = None,
) -> Iterator[tuple[int, DenoisingInputs]]:
    """Every case's sample, drawn from its own generator seeded ``seed``, ``cfg.train.batch_size`` cases per batch.

    A case's window, timestep and noise do not depend on its batch-mates (style point 13), and a
    short last batch is padded with copies of its last case (dropped by the caller), so every
    forward has the same batch size: a case's figures are the same bytes wherever it stands in
    the cohort. The network never sees more than a training batch, whatever the cohort's size
    (issue 16).

    Yields:
        ``(first, inputs)``: the index of the batch's first case and its inputs (``[B, ...]``,
        B = ``cfg.train.batch_size``; rows past the cohort's end are padding).
    """
    device = next(model.parameters()).device
    process = noise_process(cfg.diffusion)
    source = WindowSource(list(volumes), cfg.data.window, cfg.train.informed_from)
    batch = cfg.train.batch_size
    for first in range(0, len(volumes), batch):
        rows = list(range(first, min(first + batch, len(volumes))))
        rows += [rows[-1]] * (batch - len(rows))
        drawn = [
            draw_inputs(
                model, process, source, [index], stage, torch.Generator().manual_seed(seed), cfg.train, device, timestep
            )
            for index in rows
        ]
        yield first, _stack(drawn)


@torch.no_grad()
def case_losses(
    model: nn.Module, stage: Stage, cfg: Config, volumes: Sequence[Volume], draws: int = 8, seed: int = 0
) -> np.ndarray:
    """``[N]`` mean denoising loss of each case over ``draws`` seeded noisings (windows, t, noise).

    Draw k noises every case with its own generator seeded ``seed + k`` (the single-loss attack,
    ``auc_loss``), in batches of ``cfg.train.batch_size`` cases.
    """
    model.eval()
    total = np.zeros(len(volumes))
    for k in range(draws):
        for first, inputs in _case_batches(model, stage, cfg, volumes, seed + k):
            loss = per_sample_loss(model, inputs).double().cpu().numpy()
            count = min(len(loss), len(volumes) - first)
            total[first : first + count] += loss[:count]
    return total / draws


def _stack(inputs: Sequence[DenoisingInputs]) -> DenoisingInputs:
    """One batch of single-sample inputs, concatenated field by field (``None`` fields stay ``None``)."""

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(i, name) for i in inputs]
        return None if parts[0] is None else torch.cat(parts)

    noisy, t, target = cat("noisy"), cat("t"), cat("target")
    assert noisy is not None and t is not None and target is not None
    return DenoisingInputs(noisy, t, cat("cond"), target, cat("position"), cat("mask"), cat("weight"))


@torch.no_grad()
def timestep_losses(
    model: nn.Module,
    stage: Stage,
    cfg: Config,
    volumes: Sequence[Volume],
    timesteps: Sequence[int],
    draws: int = 8,
    seed: int = 0,
) -> np.ndarray:
    """``[N, K]`` denoising error of each case at each fixed timestep, mean over ``draws``.

    Every case draws its window and noise from its own generator seeded ``seed + k`` (style
    point 13), so all cases, members or not, see the same randomness at draw k; the network
    sees ``cfg.train.batch_size`` cases at a time (``_case_batches``).
    """
    model.eval()
    out = np.zeros((len(volumes), len(timesteps)))
    for j, t in enumerate(timesteps):
        for k in range(draws):
            for first, inputs in _case_batches(model, stage, cfg, volumes, seed + k, t):
                error = ((predict(model, inputs) - inputs.target) ** 2).flatten(1).mean(dim=1)
                count = min(len(error), len(volumes) - first)
                out[first : first + count, j] += error[:count].double().cpu().numpy() / draws
    return out


def membership_inference(
    model: nn.Module,
    stage: Stage,
    cfg: Config,
    train: Sequence[Volume],
    holdout: Sequence[Volume],
    draws: int = 8,
    seed: int = 0,
    timesteps: Sequence[float] = MIA_TIMESTEPS,
    resamples: int = 2000,
) -> dict[str, Any]:
    """Membership inference on the model: training cases (members) against holdout cases.

    Args:
        timesteps: fractions of the training schedule the attack noises every case to.
        resamples: bootstrap resamples of the AUC interval (seeded by ``seed``).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if not train or not holdout:
        raise DataError("membership inference needs training and holdout cases")
    steps = cfg.diffusion.num_train_timesteps
    fixed = sorted({min(steps - 1, max(0, round(f * steps))) for f in timesteps})
    losses = timestep_losses(model, stage, cfg, [*train, *holdout], fixed, draws, seed)
    # Standardise each timestep over the pooled cases (no labels), so each weighs the same.
    spread = losses.std(axis=0)
    z = (losses - losses.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    score = -z.mean(axis=1)  # higher = more likely a member
    member, non_member = score[: len(train)], score[len(train) :]
    low, high = auc_interval(member, non_member, resamples, seed)
    tpr, fpr = tpr_at_fpr(member, non_member, 0.01)
    old_member = case_losses(model, stage, cfg, train, draws, seed)
    old_non_member = case_losses(model, stage, cfg, holdout, draws, seed)
    n1, n0 = len(train), len(holdout)
    return {
        "attack": (
            f"denoising error at fixed timesteps {fixed} (same windows and noise for every case), each "
            "standardised over the pooled cases and averaged; lower error => member; AUC by Mann-Whitney"
        ),
        "stage": stage,
        "draws": draws,
        "timesteps": fixed,
        "auc": rank_auc(member, non_member),
        "auc_ci95": [low, high],
        "auc_ci95_low": low,
        "auc_ci95_high": high,
        "auc_null_sd": math.sqrt((n1 + n0 + 1) / (12 * n1 * n0)),
        "bootstrap": {"resamples": resamples, "seed": seed, "method": "percentile, members and non-members apart"},
        "auc_by_timestep": {str(t): rank_auc(-losses[:n1, j], -losses[n1:, j]) for j, t in enumerate(fixed)},
        "tpr_at_1pct_fpr": tpr,
        "fpr_reached": fpr,
        "fpr_resolution": 1 / n0,
        "nonmembers_needed_for_1pct_fpr": 100,
        "tpr_note": (
            f"with {n0} non-members the false-positive rate moves in steps of 1/{n0}; resolving 1% needs "
            "at least 100 non-members" + ("" if n0 >= 100 else ", so this is the TPR at zero false positives")
        ),
        "auc_loss": rank_auc(-old_member, -old_non_member),
        "train_cases": n1,
        "holdout_cases": n0,
        "mean_loss_train": float(old_member.mean()),
        "mean_loss_holdout": float(old_non_member.mean()),
    }


# --- outputs ------------------------------------------------------------------------------------


def write_report(result: AuditResult, out: Path, include_ids: bool = True) -> tuple[Path, Path]:
    """Write the JSON report to ``out`` and the NN-distance histogram next to it (``.png``), atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    report = result.report(include_ids)
    report["histogram"] = png.name
    atomic_write(png, lambda path: plot_histogram(result, path))
    atomic_write(out, lambda path: path.write_text(json.dumps(report, indent=2)))
    return out, png


def plot_histogram(result: AuditResult, path: Path) -> None:
    """Histograms of reference and synthetic NN distances per space, with the copy threshold."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on sites or CI
    import matplotlib.pyplot as plt

    spaces = list(result.thresholds)
    fig, axes = plt.subplots(1, len(spaces), figsize=(5 * len(spaces), 3.6))
    for ax, space in zip(np.atleast_1d(axes), spaces, strict=True):
        ref, syn = result.reference_nn[space], result.synthetic_nn[space]
        syn = syn[np.isfinite(syn)]
        top = max([*ref, *syn, result.thresholds[space]]) * 1.05 + 1e-12
        bins = np.linspace(0.0, top, 30)
        unit = "slices" if space == "slice" else "volumes"
        ax.hist(ref, bins=bins, alpha=0.6, label=f"{result.reference} (n={len(ref)} {unit})")
        ax.hist(syn, bins=bins, alpha=0.6, label=f"synthetic-to-train (n={len(syn)} volumes)")
        ax.axvline(result.thresholds[space], color="red", linestyle="--", label="copy threshold")
        ax.set_title(f"{space}: nearest-neighbour distance")
        ax.set_xlabel("distance to the nearest training " + ("slice" if space == "slice" else "volume"))
        ax.set_ylabel("count")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
