"""Distribution distance between synthetic and real cohorts: FID per view (2.5D) and MMD.

2.5D, as used for MAISI: every 2D slice of every volume along each of the three axes goes through
a 2D feature extractor; FID and MMD compare the synthetic and real feature sets per view.

The feature extractor is pluggable (``FeatureExtractor``). What it is decides what the numbers
mean, so its ``name`` goes into every report:
- ``SeededRandomFeatures``: the offline default, a fixed conv network with seeded random weights.
  It needs no download and is the same on every machine, so numbers are comparable between runs
  of this toolkit, but NOT with published FIDs (those use RadImageNet/Inception features).
- ``ExportedFeatures``: any network the user saved with ``torch.export.save`` (``.pt2``) or as
  TorchScript (e.g. a RadImageNet ResNet-50), loaded from a local file.
- ``ResNetFeatures``: a 2D ResNet state dict in torchvision's key layout (e.g. a PyTorch port of
  RadImageNet's ResNet-50) loaded with ``weights_only=True`` into MONAI's ``ResNet``; nothing is
  downloaded. MedicalNet's weights are 3D and do not fit the per-view (2D) protocol.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet

from experiments.evaluation.arrays import as_volume, view_slices

RANDOM_FEATURES_LABEL = "seeded-random-features (not RadImageNet)"
_CHUNK = 64  # slices per forward pass: bounds memory on CPU


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps 2D slices to feature vectors.

    ``name`` identifies the network and its weights in reports. ``__call__`` takes
    ``[N, 1, h, w]`` float32 slices in [-1, 1] (any h, w) and returns ``[N, F]`` features.
    """

    name: str

    def __call__(self, slices: torch.Tensor) -> torch.Tensor: ...


class SeededRandomFeatures:
    """A fixed convolutional network with seeded random weights (the offline default).

    Four stride-2 conv + LeakyReLU layers (widths ``width * (1, 2, 4, 8)``); the features are the
    global mean and standard deviation of every layer's activations, so they see both fine
    texture and coarse structure. Kaiming-normal weights drawn from ``torch.Generator(seed)``.

    Args:
        seed: weight seed; part of the name, so reports with different seeds never get mixed up.
        width: channels of the first layer. Output size F = 2 * width * 15.
    """

    def __init__(self, seed: int = 0, width: int = 8) -> None:
        self.name = f"{RANDOM_FEATURES_LABEL}, seed {seed}, width {width}"
        generator = torch.Generator().manual_seed(seed)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        channels = [1, width, 2 * width, 4 * width, 8 * width]
        for c_in, c_out in itertools.pairwise(channels):
            fan_in = c_in * 9
            weight = torch.randn(c_out, c_in, 3, 3, generator=generator) * (2.0 / fan_in) ** 0.5
            bias = torch.randn(c_out, generator=generator) * 0.01
            self.layers.append((weight, bias))

    @torch.no_grad()
    def __call__(self, slices: torch.Tensor) -> torch.Tensor:
        """``[N, 1, h, w]`` -> ``[N, F]``."""
        x = slices.float()
        features = []
        for weight, bias in self.layers:
            x = F.leaky_relu(F.conv2d(x, weight, bias, stride=2, padding=1), 0.2)
            features += [x.mean(dim=(2, 3)), x.std(dim=(2, 3), unbiased=False)]
        return torch.cat(features, dim=1)


def _file_tag(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"{path.name} (sha256 {digest}…)"


def _prepare(slices: torch.Tensor, channels: int, size: int | None) -> torch.Tensor:
    """``[N, 1, h, w]`` -> ``[N, channels, size, size]`` (repeat grey; bilinear resize)."""
    x = slices.float()
    if size is not None:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, channels, -1, -1).contiguous()


def _pool(features: torch.Tensor) -> torch.Tensor:
    """Global average pooling of spatial feature maps: ``[N, F, ...]`` -> ``[N, F]``."""
    return features.flatten(2).mean(dim=2) if features.ndim > 2 else features


class ExportedFeatures:
    """A user-supplied feature network from a local file: ``torch.export`` (``.pt2``) or TorchScript.

    ``.pt2`` files (``torch.export.save``; export with a dynamic batch dimension, since slices come
    in chunks of up to 64) load through ``torch.export.load``; any other suffix through
    ``torch.jit.load`` (TorchScript, deprecated since torch 2.13 but still read). Neither format
    unpickles arbitrary objects. The network receives ``[N, channels, size, size]`` slices in
    [-1, 1]: bake any normalisation its weights expect into it. Spatial outputs are globally
    average-pooled.

    Args:
        path: the network file.
        channels: input channels the network expects (3 for ImageNet-style networks).
        size: resize slices to ``size x size`` first; None keeps them as they are.
    """

    def __init__(self, path: str | Path, channels: int = 3, size: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: feature network file not found")
        try:
            if path.suffix == ".pt2":
                self.module: Any = torch.export.load(str(path)).module()
            else:
                self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as error:  # both loaders raise assorted types for a foreign file
            raise ValueError(f"{path}: not a torch.export (.pt2) or TorchScript file ({error})") from error
        self.channels, self.size = channels, size
        kind = "export" if path.suffix == ".pt2" else "torchscript"
        self.name = f"{kind}:{_file_tag(path)}"

    @torch.no_grad()
    def __call__(self, slices: torch.Tensor) -> torch.Tensor:
        return _pool(self.module(_prepare(slices, self.channels, self.size))).float()


_RESNET_LAYOUTS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3])}


class ResNetFeatures:
    """A 2D ResNet (18/34/50) from a local state dict in torchvision's key layout.

    ``conv1, bn1, layer1..layer4`` (+ an ignored ``fc``); a leading ``module.`` or ``model.`` is
    stripped. Loaded with ``torch.load(weights_only=True)`` (or safetensors) into MONAI's ``ResNet``
    (7x7 stride-2 stem, no downsample bias, as torchvision); features are the pooled 512/2048
    channels before ``fc``. Keys must match exactly: a mismatch raises naming the file and keys.

    Args:
        path: ``.pt``/``.pth`` state dict or ``.safetensors`` file.
        depth: 18, 34 or 50 (RadImageNet's released network is ResNet-50).
        channels: input channels of the first conv in the weights (3 for RadImageNet).
        size: resize slices to ``size x size`` first (224 for RadImageNet); None keeps them.
    """

    def __init__(self, path: str | Path, depth: int = 50, channels: int = 3, size: int | None = None) -> None:
        path = Path(path)
        if depth not in _RESNET_LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNET_LAYOUTS)}, got {depth}")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ResNet weights file not found")
        block, layers = _RESNET_LAYOUTS[depth]
        self.module = ResNet(
            block,
            layers,
            [64, 128, 256, 512],
            spatial_dims=2,
            n_input_channels=channels,
            conv1_t_stride=2,
            bias_downsample=False,
            feed_forward=False,
        )
        self.module.load_state_dict(_read_state_dict(path, set(self.module.state_dict())))
        self.module.eval()
        self.channels, self.size = channels, size
        self.name = f"resnet{depth}:{_file_tag(path)}"

    @torch.no_grad()
    def __call__(self, slices: torch.Tensor) -> torch.Tensor:
        return _pool(self.module(_prepare(slices, self.channels, self.size))).float()


def _read_state_dict(path: Path, expected: set[str]) -> dict[str, torch.Tensor]:
    raw: Any
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(path))
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle errors come in many types; all mean "not a plain state dict"
            raise ValueError(f"{path}: not a weights-only state dict ({error})") from error
        if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
            raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(raw).__name__}")
    state = {}
    for key, value in raw.items():
        for prefix in ("module.", "model."):
            key = key.removeprefix(prefix)
        if not key.startswith("fc."):
            state[key] = value
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: keys do not match a torchvision-layout ResNet: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
        )
    return state


def load_feature_extractor(spec: str = "random") -> FeatureExtractor:
    """Build an extractor from a CLI-style spec.

    ``random`` or ``random:SEED`` -> ``SeededRandomFeatures``;
    ``export:PATH`` (or ``torchscript:PATH``) -> ``ExportedFeatures(PATH, channels=3, size=224)``;
    ``resnet50:PATH`` (also 18/34) -> ``ResNetFeatures(PATH, depth, channels=3, size=224)``.
    """
    kind, _, rest = spec.partition(":")
    if kind == "random":
        return SeededRandomFeatures(seed=int(rest) if rest else 0)
    if kind in ("export", "torchscript") and rest:
        return ExportedFeatures(rest, channels=3, size=224)
    if kind.startswith("resnet") and kind[6:].isdigit() and rest:
        return ResNetFeatures(rest, depth=int(kind[6:]), channels=3, size=224)
    raise ValueError(
        f"feature extractor '{spec}': use random[:SEED], export:PATH, torchscript:PATH or resnet{{18,34,50}}:PATH"
    )


def view_features(volumes: Sequence[Any], axis: int, extractor: FeatureExtractor) -> torch.Tensor:
    """Features of every slice of every volume along array ``axis``.

    Args:
        volumes: ``[D, H, W]`` volumes in [-1, 1].
        axis: 0 = slice axis; see ``arrays.anatomical_views`` for names.

    Returns:
        ``[sum of the volumes' sizes along axis, F]`` float64.
    """
    features = []
    for volume in volumes:
        slices = view_slices(as_volume(volume), axis)
        for start in range(0, slices.shape[0], _CHUNK):
            features.append(extractor(slices[start : start + _CHUNK]).double())
    return torch.cat(features)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def fid(synthetic: torch.Tensor, real: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017).

    ``|mu_s - mu_r|^2 + tr(S_s) + tr(S_r) - 2 tr((S_s S_r)^(1/2))``, with the last trace taken as
    ``sum sqrt(eig(S_s^(1/2) S_r S_s^(1/2)))``: the same number as MONAI's ``FIDMetric`` (a test
    checks this) but through symmetric eigendecompositions, ~50x faster than its general
    ``scipy.linalg.sqrtm`` on hundreds of features, and real-valued by construction.

    Args:
        synthetic: ``[N, F]`` features; real: ``[M, F]`` features (N, M >= 2).
    """
    if synthetic.shape[0] < 2 or real.shape[0] < 2:
        raise ValueError("FID needs at least 2 feature vectors per set")
    x, y = synthetic.double(), real.double()
    mean_term = (x.mean(0) - y.mean(0)).pow(2).sum()
    cov_x, cov_y = torch.cov(x.T).reshape(x.shape[1], -1), torch.cov(y.T).reshape(y.shape[1], -1)
    root_x = _sqrt_psd(cov_x)
    middle = root_x @ cov_y @ root_x
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float(mean_term + cov_x.trace() + cov_y.trace() - 2 * cross)


MMD_BLOCK = 4096
"""Rows of the pooled distance matrix ``mmd`` holds at once (and the points its median heuristic uses)."""


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None, block: int = MMD_BLOCK) -> float:
    """Unbiased squared maximum mean discrepancy with an RBF kernel (Gretton et al. 2012).

    ``k(a, b) = exp(-|a - b|^2 / (2 sigma^2))``; sigma is the median pairwise distance of the
    pooled set (median heuristic) unless ``bandwidth`` is given. The unbiased estimate is about 0
    for samples of one distribution (it can be slightly negative) and grows as they differ.

    Memory is ``block`` rows of the pooled ``[N + M, N + M]`` kernel at a time, not the whole
    matrix (which is quadratic in the cohort: 100 brats volumes give ~15 500 slices a view, a
    1.9 GB matrix, several times over). Up to ``block`` pooled points, the result is that of the
    whole matrix at once, bit for bit; beyond, the median heuristic takes the median over a seeded
    random subset of ``block`` pooled points (the kernel sums still cover every pair).

    Args:
        x: ``[N, F]``; y: ``[M, F]`` (N, M >= 2).

    Returns:
        MMD^2.
    """
    x, y = x.double().flatten(1), y.double().flatten(1)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("MMD needs at least 2 samples per set")
    if block < 2:
        raise ValueError(f"MMD's block must be >= 2 rows, got {block}")
    pooled = torch.cat([x, y])
    sigma_sq = _median_sq_distance(pooled, block) if bandwidth is None else bandwidth**2
    sum_xx = sum_yy = sum_xy = diagonal_x = diagonal_y = torch.zeros((), dtype=torch.float64)
    for first in range(0, n + m, block):
        rows = pooled[first : first + block]
        kernel = torch.exp(-torch.cdist(rows, pooled).pow(2) / (2 * sigma_sq))  # [rows, N + M]
        diagonal = kernel[:, first : first + rows.shape[0]].diagonal()
        in_x = max(0, min(n - first, rows.shape[0]))  # the rows that are points of x
        sum_xx = sum_xx + kernel[:in_x, :n].sum()
        sum_xy = sum_xy + kernel[:in_x, n:].sum()
        sum_yy = sum_yy + kernel[in_x:, n:].sum()
        diagonal_x = diagonal_x + diagonal[:in_x].sum()
        diagonal_y = diagonal_y + diagonal[in_x:].sum()
    term_x = (sum_xx - diagonal_x) / (n * (n - 1))
    term_y = (sum_yy - diagonal_y) / (m * (m - 1))
    return float(term_x + term_y - 2 * sum_xy / (n * m))


def _median_sq_distance(points: torch.Tensor, block: int) -> float:
    """The median squared distance between distinct points of ``[P, F]`` (a seeded subset of ``block`` when larger)."""
    if points.shape[0] > block:
        chosen = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(0))[:block]
        points = points[chosen.sort().values]
    sq = torch.cdist(points, points).pow(2)
    off_diagonal = sq[~torch.eye(points.shape[0], dtype=torch.bool)]
    return float(off_diagonal.median().clamp_min(1e-12))  # the median of d^2 is the median d, squared


def distribution_distance(
    synthetic: Sequence[Any],
    real: Sequence[Any],
    extractor: FeatureExtractor | None = None,
    views: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """FID and MMD per view between a synthetic and a real cohort.

    Args:
        synthetic, real: lists of ``[D, H, W]`` volumes in [-1, 1].
        extractor: defaults to ``SeededRandomFeatures(0)``.
        views: view name -> array axis (``arrays.anatomical_views``); default axes 0, 1, 2.

    Returns:
        ``{"feature_extractor": name, "views": {view: {"fid", "mmd", "num_synthetic", "num_real"}},
        "fid_mean": mean FID over views, "mmd_mean": mean MMD^2 over views}``.
    """
    extractor = extractor if extractor is not None else SeededRandomFeatures(0)
    views = dict(views) if views is not None else {"axis0": 0, "axis1": 1, "axis2": 2}
    synthetic_features = {name: view_features(synthetic, axis, extractor) for name, axis in views.items()}
    real_features = {name: view_features(real, axis, extractor) for name, axis in views.items()}
    return distribution_distance_of(synthetic_features, real_features, extractor.name)


def distribution_distance_of(
    synthetic: Mapping[str, torch.Tensor], real: Mapping[str, torch.Tensor], extractor_name: str
) -> dict[str, Any]:
    """``distribution_distance`` from features already drawn: per view, ``[N, F]`` synthetic and ``[M, F]`` real.

    A caller that streams volumes (``protocol.MethodScorer``) keeps only their ``view_features``
    (``torch.cat`` of each volume's, in order: the same features as one call over the cohort).
    """
    per_view: dict[str, Any] = {}
    for name in synthetic:
        synth, true = synthetic[name], real[name]
        per_view[name] = {
            "fid": fid(synth, true),
            "mmd": mmd(synth, true),
            "num_synthetic": int(synth.shape[0]),
            "num_real": int(true.shape[0]),
        }
    return {
        "feature_extractor": extractor_name,
        "views": per_view,
        "fid_mean": sum(v["fid"] for v in per_view.values()) / len(per_view),
        "mmd_mean": sum(v["mmd"] for v in per_view.values()) / len(per_view),
    }


__all__ = [
    "RANDOM_FEATURES_LABEL",
    "ExportedFeatures",
    "FeatureExtractor",
    "ResNetFeatures",
    "SeededRandomFeatures",
    "distribution_distance",
    "distribution_distance_of",
    "fid",
    "load_feature_extractor",
    "mmd",
    "view_features",
]
