"""The slice denoiser, its stage-2 inflation and the informed-slice generator."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.validators import ModuleValidator

from gem3d.config import Config
from gem3d.networks import (
    InformedSliceGenerator,
    SliceDenoiser,
    build_condition,
    condition_channels,
    encode_mask,
    inflated_unet_forward,
)
from gem3d.runs import build_model


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    # MONAI zero-initialises output convs; random weights make the equivalence test meaningful.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def _window(cfg: Config, shape: tuple[int, int, int, int, int], seed: int = 0):
    batch, _, depth, height, width = shape
    g = torch.Generator().manual_seed(seed)
    labels = cfg.data.num_labels
    x = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (batch, depth), generator=g)
    mask = torch.randint(0, labels, (batch, depth, height, width), generator=g)
    informed = torch.rand((batch, height, width), generator=g) * 2 - 1
    informed_mask = torch.randint(0, labels, (batch, height, width), generator=g)
    return x, t, build_condition(mask, informed, informed_mask, labels, cfg.model)


@pytest.mark.parametrize("shape", [(1, 1, 8, 16, 16), (2, 1, 4, 16, 16), (1, 1, 1, 32, 32), (3, 1, 5, 16, 32)])
@pytest.mark.parametrize("inflated", [False, True])
def test_denoiser_shapes(micro_cfg: Config, shape: tuple[int, int, int, int, int], inflated: bool) -> None:
    model = SliceDenoiser(micro_cfg.model, micro_cfg.data.num_labels)
    if inflated:
        model.inflate()
    x, t, cond = _window(micro_cfg, shape)

    out = model(x, t, cond)

    assert cond.shape == (shape[0], condition_channels(micro_cfg.model, 4), *shape[2:])
    assert out.shape == shape


@pytest.mark.parametrize("shape", [(1, 1, 8, 16, 16), (2, 1, 5, 16, 16)])
def test_inflated_equals_slice_model_at_initialisation(micro_cfg: Config, shape: tuple[int, ...]) -> None:
    slice_model = SliceDenoiser(micro_cfg.model, micro_cfg.data.num_labels)
    _randomise(slice_model)
    volume_model = copy.deepcopy(slice_model)
    volume_model.inflate()
    x, t, cond = _window(micro_cfg, shape)

    expected, actual = slice_model(x, t, cond), volume_model(x, t, cond)

    assert expected.abs().mean() > 1e-3  # a non-trivial output, not two zero maps
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_inflated_layers_mix_slices_once_trained(micro_cfg: Config) -> None:
    slice_model = SliceDenoiser(micro_cfg.model, micro_cfg.data.num_labels)
    _randomise(slice_model)
    volume_model = copy.deepcopy(slice_model)
    volume_model.inflate()
    with torch.no_grad():
        for parameter in volume_model.slice_axis_parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    x, t, cond = _window(micro_cfg, (1, 1, 6, 16, 16))
    changed = x.clone()
    changed[:, :, 0] += 1.0

    slice_delta = (slice_model(changed, t, cond) - slice_model(x, t, cond))[:, :, 3].abs().max()
    volume_delta = (volume_model(changed, t, cond) - volume_model(x, t, cond))[:, :, 3].abs().max()

    assert slice_delta == 0  # stage 1: slices are independent
    assert volume_delta > 1e-6  # stage 2: slice 0 reaches slice 3


def test_slice_axis_parameters_are_only_the_new_layers(micro_cfg: Config) -> None:
    model = SliceDenoiser(micro_cfg.model, micro_cfg.data.num_labels)
    base = {name for name, _ in model.named_parameters()}
    model.inflate()
    new = {id(p) for p in model.slice_axis_parameters()}
    renamed_base = {name.replace(".spatial.", ".") for name, p in model.named_parameters() if id(p) not in new}

    assert new
    assert renamed_base == base
    with pytest.raises(RuntimeError):
        model.inflate()


@pytest.mark.parametrize("stage", ["slice", "volume", "informed"])
def test_schedule_is_not_model_state(micro_cfg: Config, stage: str) -> None:
    model = build_model(stage, micro_cfg)  # type: ignore[arg-type]

    keys = list(model.state_dict())

    assert not list(model.buffers())
    assert not [k for k in keys if any(word in k for word in ("beta", "alpha", "timesteps", "sigma"))]
    assert len(keys) == len(list(model.parameters()))


@pytest.mark.parametrize("stage", ["slice", "volume", "informed"])
def test_opacus_module_validator_accepts_every_stage(micro_cfg: Config, stage: str) -> None:
    model = build_model(stage, micro_cfg)  # type: ignore[arg-type]

    errors = ModuleValidator.validate(model, strict=False)

    assert errors == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize(("encoding", "channels"), [("onehot", 3), ("scaled", 1)])
def test_mask_encoding(encoding: str, channels: int) -> None:
    label = torch.tensor([[[0, 1], [2, 3]]])  # [B=1, H=2, W=2]

    encoded = encode_mask(label, 4, encoding)

    assert encoded.shape == (1, channels, 2, 2)
    if encoding == "onehot":
        assert encoded[0, :, 1, 1].tolist() == [0.0, 0.0, 1.0]
        assert encoded[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]
    else:
        torch.testing.assert_close(encoded[0, 0], torch.tensor([[-1.0, -1 / 3], [1 / 3, 1.0]]))


def test_informed_mask_switch_adds_channels(micro_cfg: Config) -> None:
    without = micro_cfg.model.model_copy(update={"informed_mask": False})

    assert condition_channels(micro_cfg.model, 4) == condition_channels(without, 4) + 3


def test_informed_generator_shape_and_position_conditioning(micro_cfg: Config) -> None:
    model = InformedSliceGenerator(micro_cfg.informed, 4, "onehot")
    _randomise(model)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([10, 500])
    mask = torch.randint(0, 4, (2, 16, 16))

    low = model(x, t, torch.tensor([0.0, 0.0]), mask)
    high = model(x, t, torch.tensor([1.0, 1.0]), mask)

    assert low.shape == (2, 1, 16, 16)
    assert (low - high).abs().max() > 1e-4
    with pytest.raises(ValueError, match="mask"):
        model(x, t, torch.zeros(2), None)


def test_windows_of_different_lengths_in_concurrent_threads_give_their_sequential_results(micro_cfg: Config) -> None:
    # the window length is the call's own (no state written into the layers): threads do not mix it up
    from concurrent.futures import ThreadPoolExecutor

    model = SliceDenoiser(micro_cfg.model, micro_cfg.data.num_labels)
    model.inflate()
    _randomise(model)
    inputs = [_window(micro_cfg, (1, 1, depth, 16, 16), seed=depth) for depth in (2, 3, 5, 7)]
    with torch.no_grad():
        sequential = [model(*window) for window in inputs]
        with ThreadPoolExecutor(max_workers=4) as pool:
            concurrent = list(pool.map(lambda window: model(*window), inputs * 3))

    for index, out in enumerate(concurrent):
        torch.testing.assert_close(out, sequential[index % len(inputs)], atol=0, rtol=0)


def test_an_inflated_unet_called_without_its_window_length_fails_loudly(micro_cfg: Config) -> None:
    # MONAI's own forward passes no window length to the slice-axis layers: refused, not guessed
    model = build_model("volume", micro_cfg)
    assert isinstance(model, SliceDenoiser)
    x, t = torch.randn(6, model.unet.in_channels, 16, 16), torch.zeros(6, dtype=torch.long)

    with pytest.raises(TypeError, match="frames"):
        model.unet(x, t)
    assert inflated_unet_forward(model.unet, x, t, frames=3).shape == (6, 1, 16, 16)


def test_inflation_is_seeded_and_leaves_the_global_rng_alone(micro_cfg: Config) -> None:
    # prepare: two runs of the same stage-2 build, the global RNG in different states in between
    before = torch.random.get_rng_state()
    first = build_model("volume", micro_cfg).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.rand(7)
    second = build_model("volume", micro_cfg).state_dict()
    other_seed = SliceDenoiser(micro_cfg.model, micro_cfg.data.num_labels)
    other_seed.load_state_dict({k: v for k, v in first.items() if ".slice_" not in k}, strict=False)
    other_seed.inflate(seed=micro_cfg.train.seed + 1)
    # assert: same seed, same slice-axis weights; another seed, other (random) ones
    assert [k for k in first if not torch.equal(first[k], second[k])] == []
    randomised = [k for k in first if ".slice_attn." in k and ".to_q.weight" in k]
    assert randomised and all(not torch.equal(first[k], other_seed.state_dict()[k]) for k in randomised)
