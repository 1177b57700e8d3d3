"""The memorization audit: does a synthetic cohort copy training volumes, and does the model leak membership?

Copy rule (documented in every report):
1. Every volume (synthetic, training, holdout) is resampled to one common grid (default 32^3,
   trilinear) from its normalised model-space intensities in [-1, 1].
2. Distances in two spaces: *image space*, the RMS voxel difference; *feature space*, the
   Euclidean distance of unit-normalised features from a fixed, seeded, **untrained** random 3D
   conv network (no pretrained weights are available offline; random conv features still
   respond to local texture and shape, so a copy with a small perturbation stays close).
3. Reference: each holdout volume's nearest-neighbour (NN) distance to the training set, i.e.
   how close a real patient the model never saw comes to some training patient. Without a
   holdout, each training volume's NN distance to the *other* training volumes is used.
4. A synthetic volume is a **copy** when its NN distance to the training set is below
   ``margin * Q_quantile(reference NN distances)`` in image space *or* in feature space.
   Defaults: quantile 0.05, margin 0.5, i.e. closer to a training patient than half the
   distance at which the closest 5% of genuinely new patients come. The margin is there
   because a bare 5% quantile flags, by construction, about 5% of volumes that are as new as
   real unseen patients (per space, so more with two spaces): too many false alarms for a
   release gate, whereas an exact or lightly perturbed copy sits far below half of it.

Caveat: GEM-3D conditions on a real (edited) mask, so a synthetic volume shares its source
patient's anatomy; unedited masks make copies by this rule, and mask edits are what move a
volume away from its source.

Membership inference: a loss-based attack on the model. Each training and holdout case gets
its mean denoising loss over ``draws`` seeded noisings (same seeds for every case); members are
predicted to have lower loss. The AUC is the Mann-Whitney rank statistic
P(loss(member) < loss(non-member)), ties counting one half: 0.5 means no membership signal.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gem3d.config import Config
from gem3d.data.volume import Volume
from gem3d.data.windows import WindowSource
from gem3d.diffusion import train_scheduler
from gem3d.errors import DataError
from gem3d.training import Stage, draw_inputs, per_sample_loss

AUDIT_FORMAT = "gem3d-audit/1"
FEATURE_SPACE = "random-conv3d: untrained 3-layer 3D conv net (seeded), global mean+max pooled, L2-normalised"


@dataclass(frozen=True)
class AuditSettings:
    """How the copy rule is applied (see the module docstring)."""

    grid: tuple[int, int, int] = (32, 32, 32)
    quantile: float = 0.05
    margin: float = 0.5
    feature_seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.quantile <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if self.margin <= 0:
            raise ValueError(f"margin must be > 0, got {self.margin}")


def to_grid(volumes: Sequence[np.ndarray], grid: tuple[int, int, int]) -> torch.Tensor:
    """Resample ``[D, H, W]`` volumes (any sizes) to ``[N, 1, *grid]`` float32 (trilinear)."""
    out = []
    for image in volumes:
        tensor = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
        out.append(F.interpolate(tensor, size=grid, mode="trilinear", align_corners=False))
    return torch.cat(out)


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
        for conv in self.convs:
            x = F.relu(conv(x))
        pooled = torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1)
        return F.normalize(pooled, dim=1)


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[Na, Nb]`` Euclidean distances between the flattened rows of ``a`` and ``b``."""
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double())


def _nearest(dist: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    values, indices = dist.min(dim=1)
    return values.numpy(), indices.numpy()


def _summary(values: np.ndarray, quantile: float) -> dict[str, float]:
    return {
        "min": float(values.min()),
        f"q{quantile:g}": float(np.quantile(values, quantile)),
        "median": float(np.median(values)),
        "max": float(values.max()),
    }


@dataclass(frozen=True)
class AuditResult:
    """The audit's figures; ``report()`` is the JSON report."""

    settings: AuditSettings
    synthetic_ids: list[str]
    train_ids: list[str]
    reference: str
    reference_nn: dict[str, np.ndarray]
    synthetic_nn: dict[str, np.ndarray]
    synthetic_nearest: dict[str, np.ndarray]
    thresholds: dict[str, float]
    mia: dict[str, Any] | None = None

    @property
    def copies(self) -> list[str]:
        flags = self.copy_flags
        return [case for case, flag in zip(self.synthetic_ids, flags, strict=True) if flag]

    @property
    def copy_flags(self) -> np.ndarray:
        flags = np.zeros(len(self.synthetic_ids), dtype=bool)
        for space, threshold in self.thresholds.items():
            flags |= self.synthetic_nn[space] < threshold
        return flags

    @property
    def passed(self) -> bool:
        return not self.copies

    def report(self, include_ids: bool = True) -> dict[str, Any]:
        """The JSON report; ``include_ids=False`` leaves out every case id (for a release folder)."""
        s = self.settings
        per_case = []
        for index, flag in enumerate(self.copy_flags):
            entry: dict[str, Any] = {
                space: {"nn_distance": float(self.synthetic_nn[space][index])} for space in self.thresholds
            }
            if include_ids:
                entry["case"] = self.synthetic_ids[index]
                for space in self.thresholds:
                    entry[space]["nearest_train"] = self.train_ids[int(self.synthetic_nearest[space][index])]
            entry["copy"] = bool(flag)
            per_case.append(entry)
        return {
            "format": AUDIT_FORMAT,
            "rule": (
                f"copy if the NN distance to the training set is below {s.margin:g} x the {s.quantile:g} "
                f"quantile of the {self.reference} NN distances, in image space (RMS voxel difference on a "
                f"{'x'.join(map(str, s.grid))} grid) or in feature space"
            ),
            "settings": {"grid": list(s.grid), "quantile": s.quantile, "margin": s.margin},
            "feature_space": f"{FEATURE_SPACE}, seed {s.feature_seed}",
            "reference": self.reference,
            "counts": {
                "synthetic": len(self.synthetic_ids),
                "train": len(self.train_ids),
                "reference": len(next(iter(self.reference_nn.values()))),
            },
            "thresholds": self.thresholds,
            "reference_nn": {space: _summary(v, s.quantile) for space, v in self.reference_nn.items()},
            "synthetic_nn": {space: _summary(v, s.quantile) for space, v in self.synthetic_nn.items()},
            "copies": len(self.copies),
            "copy_fraction": len(self.copies) / max(len(self.synthetic_ids), 1),
            "copy_ids": self.copies if include_ids else [],
            "per_case": per_case,
            "membership_inference": self.mia,
            "passed": self.passed,
        }


def memorization_audit(
    synthetic: Sequence[Volume],
    train: Sequence[Volume],
    holdout: Sequence[Volume] | None = None,
    settings: AuditSettings = AuditSettings(),
) -> AuditResult:
    """Nearest-neighbour distances of synthetic and reference volumes to the training set.

    Args:
        synthetic, train, holdout: volumes with ``image`` ``[D, H, W]`` in [-1, 1] (any sizes).
        holdout: real cases the model never saw; ``None`` uses leave-one-out training distances.
    Raises:
        DataError: an empty set, too few training volumes without a holdout, or a holdout case
            identical to a training case (the reference would be meaningless).
    """
    if not synthetic:
        raise DataError("audit: no synthetic volumes")
    if not train:
        raise DataError("audit: no training volumes")
    if holdout is not None and not holdout:
        raise DataError("audit: the holdout set is empty")
    if holdout is None and len(train) < 2:
        raise DataError("audit: without a holdout, at least two training volumes are needed")
    features = RandomFeatures(settings.feature_seed)
    grids = {
        "synthetic": to_grid([v.image for v in synthetic], settings.grid),
        "train": to_grid([v.image for v in train], settings.grid),
    }
    if holdout is not None:
        grids["holdout"] = to_grid([v.image for v in holdout], settings.grid)
    voxels = float(np.prod(settings.grid))
    spaces = {
        # RMS voxel difference: Euclidean distance / sqrt(voxels), comparable across grids.
        "image": {name: g.flatten(1) / voxels**0.5 for name, g in grids.items()},
        "feature": {name: features(g) for name, g in grids.items()},
    }
    reference_nn, synthetic_nn, synthetic_nearest, thresholds = {}, {}, {}, {}
    for space, emb in spaces.items():
        if holdout is not None:
            ref, ref_index = _nearest(_distances(emb["holdout"], emb["train"]))
            if (ref <= 1e-9).any():
                i = int(np.argmax(ref <= 1e-9))
                raise DataError(
                    f"audit: holdout case {holdout[i].case_id} is identical to training case "
                    f"{train[int(ref_index[i])].case_id}; the holdout must be disjoint from the training set"
                )
        else:
            leave_one_out = _distances(emb["train"], emb["train"]).fill_diagonal_(float("inf"))
            ref, _ = _nearest(leave_one_out)
        reference_nn[space] = ref
        synthetic_nn[space], synthetic_nearest[space] = _nearest(_distances(emb["synthetic"], emb["train"]))
        thresholds[space] = settings.margin * float(np.quantile(ref, settings.quantile))
    return AuditResult(
        settings=settings,
        synthetic_ids=[v.case_id for v in synthetic],
        train_ids=[v.case_id for v in train],
        reference="holdout-to-train" if holdout is not None else "train-to-train (leave-one-out)",
        reference_nn=reference_nn,
        synthetic_nn=synthetic_nn,
        synthetic_nearest=synthetic_nearest,
        thresholds=thresholds,
    )


def rank_auc(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray) -> float:
    """Mann-Whitney AUC: P(positive score > negative score), ties counting one half."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("rank_auc needs at least one score on each side")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


@torch.no_grad()
def case_losses(
    model: nn.Module, stage: Stage, cfg: Config, volumes: Sequence[Volume], draws: int = 8, seed: int = 0
) -> np.ndarray:
    """``[N]`` mean denoising loss of each case over ``draws`` seeded noisings (windows, t, noise).

    Draw k uses generator seed ``seed + k`` for every case set, so member and non-member
    losses are measured under the same randomness schedule.
    """
    device = next(model.parameters()).device
    model.eval()
    scheduler = train_scheduler(cfg.diffusion)
    source = WindowSource(list(volumes), cfg.data.window, cfg.train.informed_from)
    indices = list(range(len(volumes)))
    total = np.zeros(len(volumes))
    for k in range(draws):
        generator = torch.Generator().manual_seed(seed + k)
        inputs = draw_inputs(model, scheduler, source, indices, stage, generator, cfg.train, device)
        total += per_sample_loss(model, inputs).double().cpu().numpy()
    return total / draws


def membership_inference(
    model: nn.Module,
    stage: Stage,
    cfg: Config,
    train: Sequence[Volume],
    holdout: Sequence[Volume],
    draws: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Loss-based membership inference: AUC of "lower loss means member" over train vs holdout cases."""
    member = case_losses(model, stage, cfg, train, draws, seed)
    non_member = case_losses(model, stage, cfg, holdout, draws, seed)
    return {
        "attack": "loss threshold (lower denoising loss => member), AUC by Mann-Whitney rank statistic",
        "stage": stage,
        "draws": draws,
        "auc": rank_auc(-member, -non_member),
        "train_cases": len(train),
        "holdout_cases": len(holdout),
        "mean_loss_train": float(member.mean()),
        "mean_loss_holdout": float(non_member.mean()),
    }


def write_report(result: AuditResult, out: Path, include_ids: bool = True) -> tuple[Path, Path]:
    """Write the JSON report to ``out`` and the NN-distance histogram next to it (``.png``), atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    report = result.report(include_ids)
    report["histogram"] = png.name
    _write_atomic(png, lambda path: plot_histogram(result, path))
    _write_atomic(out, lambda path: path.write_text(json.dumps(report, indent=2)))
    return out, png


def _write_atomic(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_histogram(result: AuditResult, path: Path) -> None:
    """Histograms of reference and synthetic NN distances per space, with the copy threshold."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on sites or CI
    import matplotlib.pyplot as plt

    spaces = list(result.thresholds)
    fig, axes = plt.subplots(1, len(spaces), figsize=(5 * len(spaces), 3.6))
    for ax, space in zip(np.atleast_1d(axes), spaces, strict=True):
        ref, syn = result.reference_nn[space], result.synthetic_nn[space]
        bins = np.linspace(0.0, max(ref.max(), syn.max()) * 1.05 + 1e-12, 30)
        ax.hist(ref, bins=bins, alpha=0.6, label=f"{result.reference} (n={len(ref)})")
        ax.hist(syn, bins=bins, alpha=0.6, label=f"synthetic-to-train (n={len(syn)})")
        ax.axvline(result.thresholds[space], color="red", linestyle="--", label="copy threshold")
        ax.set_title(f"{space} space: nearest-neighbour distance")
        ax.set_xlabel("distance to the nearest training volume")
        ax.set_ylabel("volumes")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
