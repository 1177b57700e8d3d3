"""FID, MMD and the pluggable feature extractors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import FIDMetric
from monai.networks.nets import ResNet

from experiments.evaluation import (
    RANDOM_FEATURES_LABEL,
    ExportedFeatures,
    FeatureExtractor,
    ResNetFeatures,
    SeededRandomFeatures,
    distribution_distance,
    fid,
    load_feature_extractor,
    mmd,
)
from gem3d.data.phantoms import make_phantom


def _gaussian(n: int, dim: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * scale + shift


def _cohort(seeds: range, size: int = 16) -> list[np.ndarray]:
    volumes = []
    for seed in seeds:
        image, _ = make_phantom((size, size, size), 4, seed)
        volumes.append(image / np.abs(image).max())
    return volumes


def test_mmd_is_near_zero_for_one_distribution_and_positive_for_a_shift() -> None:
    # prepare
    x, y = _gaussian(200, 8, 0), _gaussian(200, 8, 1)
    shifted = _gaussian(200, 8, 2, shift=1.0)

    # execute
    same, different = mmd(x, y), mmd(x, shifted)

    # assert
    assert abs(same) < 0.02
    assert different > 0.1
    assert different > 10 * abs(same)


@pytest.mark.parametrize("block", [2, 7, 30, 37])
def test_mmd_in_blocks_of_rows_is_the_whole_matrix_s(block: int) -> None:
    # prepare: blocks that split x, straddle x and y, and cover everything
    x, y = _gaussian(30, 4, 0), _gaussian(7, 4, 1, shift=0.5)

    # execute
    whole = mmd(x, y, bandwidth=1.7)
    blocked = mmd(x, y, bandwidth=1.7, block=block)
    median_whole, median_blocked = mmd(x, y), mmd(x, y, block=block)

    # assert: the same sums in another order; the median heuristic is exact while the block holds
    # every point, and a seeded subset's (the same twice) beyond
    assert blocked == pytest.approx(whole, rel=1e-12, abs=1e-15)
    if block >= 37:
        assert median_blocked == median_whole
    else:
        assert median_blocked == mmd(x, y, block=block) and median_blocked != median_whole


def test_fid_of_identical_sets_is_zero_and_matches_monai() -> None:
    # prepare
    x = _gaussian(100, 16, 0)
    y = _gaussian(100, 16, 1, shift=0.3, scale=1.5)

    # execute
    identical = fid(x, x.clone())
    ours = fid(x, y)
    reference = float(FIDMetric()(x.double(), y.double()))

    # assert
    assert identical == pytest.approx(0.0, abs=1e-6)
    assert ours == pytest.approx(reference, rel=1e-6)
    assert ours > 1.0


def test_seeded_random_features_are_fixed_by_the_seed() -> None:
    # prepare
    slices = _gaussian(6, 24 * 24, 3).reshape(6, 1, 24, 24)

    # execute
    first, again, other = (
        SeededRandomFeatures(0)(slices),
        SeededRandomFeatures(0)(slices),
        SeededRandomFeatures(1)(slices),
    )

    # assert
    assert first.shape == (6, 2 * 8 * 15)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert RANDOM_FEATURES_LABEL in SeededRandomFeatures(0).name
    assert isinstance(SeededRandomFeatures(0), FeatureExtractor)


def test_distribution_distance_reports_each_view_and_the_extractor() -> None:
    # prepare
    real = _cohort(range(2), size=12)
    generator = np.random.default_rng(0)
    noisy = [volume + 0.3 * generator.standard_normal(volume.shape) for volume in real]

    # execute
    same = distribution_distance(real, [volume.copy() for volume in real], views={"axial": 0})
    different = distribution_distance(noisy, real)

    # assert
    assert same["feature_extractor"].startswith(RANDOM_FEATURES_LABEL)
    assert set(same["views"]) == {"axial"}
    assert set(different["views"]) == {"axis0", "axis1", "axis2"}
    assert different["views"]["axis1"]["num_real"] == 2 * 12
    assert same["fid_mean"] == pytest.approx(0.0, abs=1e-4)
    assert different["fid_mean"] > 1.0
    assert different["mmd_mean"] > same["mmd_mean"]
    assert different["feature_extractor"] == same["feature_extractor"]


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_exported_extractor_loads_a_local_file(tmp_path: Path) -> None:
    # prepare: a torch.export program with a dynamic batch, as the docstring asks users to make
    path = tmp_path / "features.pt2"
    batch = torch.export.Dim("batch", max=1024)
    program = torch.export.export(_TinyNet(), (torch.zeros(2, 3, 224, 224),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))
    slices = torch.zeros(4, 1, 12, 12)

    # execute
    extractor = load_feature_extractor(f"export:{path}")
    features = extractor(slices)

    # assert
    assert features.shape == (4, 5)  # pooled over the 222x222 map of the input resized to 224
    assert extractor.name.startswith("export:features.pt2 (sha256 ")


def test_resnet_extractor_loads_a_torchvision_layout_state_dict(tmp_path: Path) -> None:
    # prepare: a ResNet-18 state dict as DataParallel saves it, with a classifier head
    net = ResNet("basic", [2, 2, 2, 2], [64, 128, 256, 512], spatial_dims=2, conv1_t_stride=2, bias_downsample=False)
    state = {f"module.{key}": value for key, value in net.state_dict().items()}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    broken = tmp_path / "broken.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, broken)

    # execute
    extractor = ResNetFeatures(path, depth=18, size=32)
    features = extractor(torch.zeros(2, 1, 20, 20))

    # assert
    assert features.shape == (2, 512)
    assert extractor.name.startswith("resnet18:resnet18.pth")
    with pytest.raises(ValueError, match=r"broken\.pth: keys do not match"):
        ResNetFeatures(broken, depth=18)


def test_unknown_extractor_specs_are_refused(tmp_path: Path) -> None:
    # execute / assert
    with pytest.raises(ValueError, match=r"feature extractor 'inception'"):
        load_feature_extractor("inception")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt2"):
        ExportedFeatures(tmp_path / "missing.pt2")
    not_a_network = tmp_path / "notes.pt2"
    not_a_network.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.pt2: not a torch\.export"):
        ExportedFeatures(not_a_network)
    assert load_feature_extractor("random:3").name.startswith(RANDOM_FEATURES_LABEL + ", seed 3")
