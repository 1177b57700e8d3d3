"""Latent GEM-3D: the stage-0 slice autoencoder, the denoiser on latents, a pretrained codec loaded locally.

Everything on the micro network of conftest.py, 16x16 slices, with a two-level autoencoder
(f = 2, 2 latent channels): a latent run trains stage 0 to 2 and the informed generator and
samples, centrally, with DP-SGD and (in ``test_federated_latent_run``) in Flower's simulation.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import AutoencoderKL
from safetensors.torch import save_file

from gem3d.autoencoder import SliceAutoencoder, area_downsample, decode_slices, encode_slices
from gem3d.checkpoint import load_checkpoint, read_metadata, subset
from gem3d.config import Config, config_from_dict
from gem3d.data.dataset import load_volumes
from gem3d.diffusion import make_sampler
from gem3d.errors import CheckpointError, ConfigError
from gem3d.networks import InformedSliceGenerator, SliceDenoiser, encode_mask
from gem3d.runs import load_model, train_stage
from gem3d.sampler import InformedSlice, SampleRequest, generate_informed_slices, sample_volumes
from privacy.model_privacy import model_statement
from tests.conftest import MICRO

REPO = Path(__file__).resolve().parent.parent
AUTOENCODER = {"channels": [8, 8], "latent_channels": 2, "norm_num_groups": 4}
LATENT = {
    **MICRO,
    "model": {**MICRO["model"], "latent": True},
    "autoencoder": AUTOENCODER,
    "train": {**MICRO["train"], "steps_autoencoder": 4},
}


@pytest.fixture
def latent_cfg() -> Config:
    return config_from_dict(LATENT, "latent micro")


@pytest.fixture(scope="module")
def latent_run(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A latent run folder: autoencoder, slice, volume and informed stages (read-only)."""
    cfg = config_from_dict(LATENT, "latent micro")
    volumes = load_volumes(phantom_dir, cfg.data)
    run = tmp_path_factory.mktemp("latent") / "run"
    for stage, steps in (("autoencoder", 30), ("slice", 3), ("volume", 2), ("informed", 2)):
        train_stage(cfg, volumes, stage, run, steps=steps)  # type: ignore[arg-type]
    return run


def test_a_latent_model_needs_an_image_size_its_autoencoder_and_unet_can_halve() -> None:
    with pytest.raises(ConfigError, match=r"data.image_size.*divisible by 8.*autoencoder's f = 4"):
        config_from_dict({**LATENT, "data": {**LATENT["data"], "image_size": 20}, "autoencoder": {}}, "c")
    with pytest.raises(ConfigError, match=r"autoencoder\.norm_num_groups"):
        config_from_dict({**LATENT, "autoencoder": {**AUTOENCODER, "norm_num_groups": 3}}, "c")
    assert config_from_dict(LATENT, "c").autoencoder.factor == 2
    assert config_from_dict({}, "c").autoencoder.factor == 4


def test_masks_enter_at_latent_resolution_as_exact_label_shares() -> None:
    label = torch.randint(0, 4, (1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    shares = area_downsample(encode_mask(label, 4, "onehot"), 4)  # [1, 3, 3, 4, 4]

    assert shares.shape == (1, 3, 3, 4, 4)
    block = label[0, 1, 4:8, 8:12]  # latent pixel (1, 2) of slice 1
    for k in (1, 2, 3):
        assert shares[0, k - 1, 1, 1, 2].item() == pytest.approx(float((block == k).float().mean()))
    background = 1 - shares.sum(dim=1)
    assert torch.all(background >= -1e-6) and torch.all(background <= 1 + 1e-6)


def test_latent_networks_work_on_latents_with_a_frozen_codec(latent_cfg: Config) -> None:
    denoiser = SliceDenoiser(latent_cfg.model, 4, latent_cfg.autoencoder)
    generator = InformedSliceGenerator(latent_cfg.informed, 4, "onehot", latent_cfg.autoencoder)
    x = torch.randn(2, 2, 4, 8, 8)  # [B, C, D, h, w]: 2 latent channels, 16 / 2 = 8
    mask = torch.randint(0, 4, (2, 4, 16, 16))
    from gem3d.networks import build_condition

    cond = build_condition(mask, torch.randn(2, 2, 8, 8), mask[:, 0], 4, latent_cfg.model, denoiser.factor)
    assert denoiser(x, torch.tensor([3, 7]), cond).shape == x.shape
    assert generator(x[:, :, 0], torch.tensor([3, 7]), torch.tensor([0.2, 0.8]), mask[:, 0]).shape == (2, 2, 8, 8)
    assert denoiser.codec is not None and not any(p.requires_grad for p in denoiser.codec.parameters())


def test_a_latent_run_trains_every_stage_and_keeps_its_codec_frozen(latent_run: Path) -> None:
    autoencoder = subset(load_checkpoint(latent_run / "autoencoder.safetensors")[0], "ema")
    for stage in ("slice", "volume", "informed"):
        tensors, _ = load_checkpoint(latent_run / f"{stage}.safetensors")
        for weights in ("model", "ema"):
            codec = {
                name[len("codec.") :]: t for name, t in subset(tensors, weights).items() if name.startswith("codec.")
            }
            assert codec.keys() == autoencoder.keys()
            assert all(torch.equal(codec[name], autoencoder[name]) for name in codec), (stage, weights)
    scale = float(autoencoder["scale"])
    assert scale != 1.0 and np.isfinite(scale)  # latent_scale "auto": measured when stage 0 ended


def test_the_autoencoder_learns_to_reconstruct(phantom_dir: Path, latent_cfg: Config, tmp_path: Path) -> None:
    volumes = load_volumes(phantom_dir, latent_cfg.data)
    losses: list[float] = []

    train_stage(
        latent_cfg, volumes, "autoencoder", tmp_path / "run", steps=120, on_step=lambda m: losses.append(m["loss"])
    )

    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_latent_sampling_is_seeded_bounded_and_decoded(latent_run: Path, phantom_dir: Path) -> None:
    model, cfg, _ = load_model(latent_run / "volume.safetensors")
    assert isinstance(model, SliceDenoiser) and model.codec is not None
    volumes = load_volumes(phantom_dir, cfg.data)
    informed = InformedSlice(volumes[1].image[5], volumes[1].label[5], "real")
    sampler = make_sampler(cfg.diffusion, 3)
    requests = [SampleRequest(volumes[0].label, informed, 5, seed=7), SampleRequest(volumes[2].label, informed, 3, 8)]

    first = sample_volumes(model, sampler, requests, cfg.data.window, cfg.sampler.overlap, batch_volumes=2)
    again = sample_volumes(model, sampler, requests[:1], cfg.data.window, cfg.sampler.overlap, batch_volumes=1)

    assert [v.shape for v in first] == [volumes[0].label.shape, volumes[2].label.shape]
    assert all(v.dtype == np.float32 and v.min() >= -1 and v.max() <= 1 for v in first)
    np.testing.assert_allclose(again[0], first[0], atol=1e-5)  # seeded per volume, whatever its batch-mates
    assert not np.allclose(first[0][0], first[0][-1])


def test_latent_informed_slices_are_generated_and_decoded(latent_run: Path, phantom_dir: Path) -> None:
    model, cfg, _ = load_model(latent_run / "informed.safetensors")
    assert isinstance(model, InformedSliceGenerator) and model.codec is not None
    mask = load_volumes(phantom_dir, cfg.data)[0].label[4]
    sampler = make_sampler(cfg.diffusion, 3)

    slices = generate_informed_slices(model, sampler, [0.4, 0.4], [mask, mask], [1, 2], (16, 16))

    assert [s.shape for s in slices] == [(16, 16), (16, 16)]
    assert not np.allclose(slices[0], slices[1])  # two seeds, two slices


def test_decoding_in_bounded_batches_changes_nothing(latent_run: Path) -> None:
    model, _, _ = load_model(latent_run / "autoencoder.safetensors")
    assert isinstance(model, SliceAutoencoder)
    x = torch.rand(7, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = encode_slices(model, x, batch=7)
    # float32 convolutions round differently with the batch size (seen: 1.2e-6 on a latent of ~1.7)
    np.testing.assert_allclose(encode_slices(model, x, batch=2), z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(decode_slices(model, z, batch=3), decode_slices(model, z, batch=7), rtol=1e-5, atol=1e-5)
    assert z.shape == (7, 2, 8, 8)


def test_a_latent_stage_without_an_autoencoder_is_refused(
    phantom_dir: Path, latent_cfg: Config, tmp_path: Path
) -> None:
    volumes = load_volumes(phantom_dir, latent_cfg.data)
    with pytest.raises(CheckpointError, match="train --stage autoencoder into this --out first"):
        train_stage(latent_cfg, volumes, "slice", tmp_path / "run", steps=1)


def _monai_weights(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    """The state dict of a plain MONAI AutoencoderKL of ``cfg.autoencoder``'s shape (another tool's file)."""
    torch.manual_seed(seed)
    return SliceAutoencoder(cfg.autoencoder).net.state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_local_pretrained_autoencoder_is_loaded(
    phantom_dir: Path, latent_cfg: Config, tmp_path: Path, suffix: str
) -> None:
    weights = _monai_weights(latent_cfg, seed=3)
    assert not any(name.startswith("net.") for name in weights)  # MONAI's own names
    path = tmp_path / f"vae{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    else:
        torch.save({"state_dict": weights}, path)
    cfg = latent_cfg.model_copy(
        update={"autoencoder": latent_cfg.autoencoder.model_copy(update={"checkpoint": str(path)})}
    )

    train_stage(cfg, load_volumes(phantom_dir, cfg.data), "slice", tmp_path / "run", steps=1)

    model, _, _ = load_model(tmp_path / "run" / "slice.safetensors")
    assert isinstance(model, SliceDenoiser) and model.codec is not None
    loaded = model.codec.net.state_dict()
    assert all(torch.equal(loaded[name], weights[name]) for name in weights)
    assert float(model.codec.scale) == 1.0  # a foreign file carries no scale


def test_a_pretrained_autoencoder_of_another_shape_is_one_line(
    latent_cfg: Config, phantom_dir: Path, tmp_path: Path
) -> None:
    other = config_from_dict({**LATENT, "autoencoder": {**AUTOENCODER, "latent_channels": 3}}, "other")
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in _monai_weights(other, 0).items()}, str(path))
    cfg = latent_cfg.model_copy(
        update={"autoencoder": latent_cfg.autoencoder.model_copy(update={"checkpoint": str(path)})}
    )
    with pytest.raises(CheckpointError, match=r"vae.safetensors \(autoencoder weights\).*with another shape") as error:
        train_stage(cfg, load_volumes(phantom_dir, cfg.data), "slice", tmp_path / "run", steps=1)
    assert "\n" not in str(error.value)


def test_a_pickled_autoencoder_is_not_unpickled(latent_cfg: Config, tmp_path: Path) -> None:
    from gem3d.autoencoder import pretrained_state_dict

    path = tmp_path / "vae.pt"
    torch.save({"state_dict": AutoencoderKL(spatial_dims=2, channels=(8, 8), latent_channels=2, norm_num_groups=4,
                                             attention_levels=(False, False), num_res_blocks=1)}, path)  # fmt: skip
    with pytest.raises(CheckpointError, match="not a weights-only torch file"):
        pretrained_state_dict(path)


def test_dp_sgd_trains_the_autoencoder_under_the_ledger(phantom_dir: Path, latent_cfg: Config, tmp_path: Path) -> None:
    from privacy.dp_sgd import sample_rate, train_private
    from privacy.ledger import PrivacyLedger

    cfg = latent_cfg.model_copy(
        update={"privacy": latent_cfg.privacy.model_copy(update={"enabled": True, "budget_epsilon": 1e4})}
    )
    volumes = load_volumes(phantom_dir, cfg.data)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", cfg.privacy)
    dp_train = functools.partial(train_private, privacy_cfg=cfg.privacy, ledger=ledger)

    metrics = train_stage(cfg, volumes, "autoencoder", tmp_path / "run", steps=3, train_fn=dp_train)

    assert ledger.history == [(1.0, sample_rate(cfg.train.batch_size, len(volumes)), 3)]
    assert metrics["epsilon"] == pytest.approx(ledger.epsilon)
    tensors, _ = load_checkpoint(tmp_path / "run" / "autoencoder.safetensors")
    assert float(tensors["ema.scale"]) == 1.0  # "auto" measures no scale on patients outside DP


def test_gem3d_train_stage_autoencoder_and_a_refused_latent_stage(
    phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from experiments.cli import main as gem3d

    sets = [
        "--set", "data.image_size=16", "--set", "data.window=4", "--set", "model.channels=8,16",
        "--set", "model.norm_num_groups=4", "--set", "model.num_head_channels=8",
        "--set", "autoencoder.channels=8,8", "--set", "autoencoder.norm_num_groups=4",
    ]  # fmt: skip
    base = ["train", "--config", "tiny_latent", *sets, "--data", str(phantom_dir), "--out", str(tmp_path / "run")]

    refused = gem3d([*base, "--stage", "slice", "--steps", "1", "--track", "off"])
    refused_err = capsys.readouterr().err
    trained = gem3d([*base, "--stage", "autoencoder", "--steps", "2", "--track", "off"])
    trained_err = capsys.readouterr().err

    assert refused == 2 and "Traceback" not in refused_err
    assert "needs its autoencoder" in refused_err and len(refused_err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "slice.safetensors").exists()
    assert trained == 0, trained_err[-2000:]
    assert (tmp_path / "run" / "autoencoder.safetensors").exists()

    latent = gem3d([*base, "--stage", "slice", "--steps", "1", "--track", "off"])

    assert latent == 0, capsys.readouterr().err[-2000:]
    record = read_metadata(tmp_path / "run" / "slice.safetensors")["privacy"]
    stage_0 = read_metadata(tmp_path / "run" / "autoencoder.safetensors")["privacy"]
    assert record["init"]["privacy"] == stage_0  # the slice stage carries its autoencoder's record
    statement = model_statement(tmp_path / "run")
    assert statement["stages"] == ["autoencoder", "slice"]
    assert any(entry.startswith("slice <- init") for entry in statement["non_dp_private"])


def test_a_latent_runs_mask_only_baseline_shares_its_autoencoder(
    latent_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    from experiments.evaluation.baselines import train_mask_only

    main, cfg, _ = load_model(latent_run / "volume.safetensors")
    assert isinstance(main, SliceDenoiser) and main.codec is not None

    run = train_mask_only(
        cfg, load_volumes(phantom_dir, cfg.data), tmp_path / "mask_only", {"slice": 2, "volume": 1}, main.codec
    )

    baseline, baseline_cfg, _ = load_model(run / "volume.safetensors")
    assert isinstance(baseline, SliceDenoiser) and baseline.codec is not None
    assert not baseline_cfg.model.informed_slice
    theirs, ours = baseline.codec.state_dict(), main.codec.state_dict()
    assert all(torch.equal(theirs[name], ours[name]) for name in ours)


def test_a_dp_latent_model_is_released_through_the_gate(tmp_path: Path) -> None:
    """Every stage, the autoencoder included, under DP-SGD with its record: the release gate passes it."""
    from experiments.cli import main
    from gem3d.data.phantoms import write_phantom_dataset
    from privacy.dp_sgd import train_private
    from privacy.ledger import PrivacyLedger
    from privacy.model_privacy import site_entry, stage_record

    data = write_phantom_dataset(tmp_path / "site", num_cases=6, shape=(16, 16, 12), seed=21)
    cfg = config_from_dict({**LATENT, "privacy": {"enabled": True, "budget_epsilon": 1e4}}, "latent dp")
    volumes = load_volumes(data, cfg.data)
    ledger = PrivacyLedger.open(tmp_path / "state" / "privacy_ledger.json", cfg.privacy)
    dp_train = functools.partial(train_private, privacy_cfg=cfg.privacy, ledger=ledger)
    run = tmp_path / "run"

    def record() -> dict[str, object]:
        codec = run / "autoencoder.safetensors"
        init = codec if codec.exists() else None
        return {"privacy": stage_record(public=False, sites={"site-a": site_entry(ledger)}, init=init)}

    for stage in ("autoencoder", "slice", "volume", "informed"):
        train_stage(cfg, volumes, stage, run, steps=1, train_fn=dp_train, extra_metadata=record)  # type: ignore[arg-type]
    out = tmp_path / "released"

    code = main(
        ["release", "--checkpoint", str(run), "--data", str(data), "--out", str(out), "--steps", "2",
         "--grid", "16", "--quantile", "0.2", "--seed", "3", "--track", "off"]
    )  # fmt: skip

    assert code == 0
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["cases"] == len(volumes) == len(list((out / "imagesTr").glob("*.nii.gz")))
    assert report["differential_privacy"]["epsilon"] == pytest.approx(ledger.epsilon)


def test_a_numeric_latent_scale_overrides_the_autoencoders(latent_run: Path, latent_cfg: Config) -> None:
    from gem3d.runs import codec_source, load_codec

    measured = load_codec(latent_cfg, codec_source(latent_cfg, latent_run))
    fixed_cfg = latent_cfg.model_copy(
        update={"autoencoder": latent_cfg.autoencoder.model_copy(update={"latent_scale": 0.5})}
    )
    fixed = load_codec(fixed_cfg, codec_source(fixed_cfg, latent_run))

    assert float(measured.scale) != 1.0 and float(fixed.scale) == 0.5


ADVERSARIAL = {
    **LATENT,
    "autoencoder": {**AUTOENCODER, "adversarial_weight": 0.5, "discriminator_layers": 2, "discriminator_channels": 8},
}


def _adversarial_gradients(weight: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The gradients of ``adversarial_loss`` alone, for the autoencoder's and the discriminator's weights."""
    cfg = config_from_dict(
        {**ADVERSARIAL, "autoencoder": {**ADVERSARIAL["autoencoder"], "adversarial_weight": weight}}, "adv"
    )
    torch.manual_seed(0)
    model = SliceAutoencoder(cfg.autoencoder, with_discriminator=True)
    x = torch.rand((3, 1, 16, 16), generator=torch.Generator().manual_seed(1)) * 2 - 1
    recon = model.net.decode(model.net.encode(x)[0])
    model.adversarial_loss(x, recon).sum().backward()
    assert model.discriminator is not None
    grads = {"ae": {}, "d": {}}
    for part, module in (("ae", model.net), ("d", model.discriminator)):
        grads[part] = {
            n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in module.named_parameters()
        }
    return grads["ae"], grads["d"]


def test_the_adversarial_terms_train_each_player_only_on_its_own_term() -> None:
    # the autoencoder's gradient is adversarial_weight times its "fool the judge" term: linear in the
    # weight with no offset (the judge's own term must not reach it); the judge's is the weight's none
    ae_1, d_1 = _adversarial_gradients(1.0)
    ae_3, d_3 = _adversarial_gradients(3.0)

    assert any(float(g.abs().sum()) > 0 for g in ae_1.values())
    assert any(float(g.abs().sum()) > 0 for g in d_1.values())
    for name in ae_1:  # float32 rounding: relative to the layer's largest gradient
        torch.testing.assert_close(ae_3[name], 3.0 * ae_1[name], rtol=1e-4, atol=1e-4 * float(ae_3[name].abs().max()))
    for name in d_1:
        torch.testing.assert_close(d_3[name], d_1[name], rtol=1e-4, atol=1e-4 * float(d_1[name].abs().max()))


def test_an_adversarial_slice_loss_ignores_batch_mates_and_validation_scores_reconstruction_only() -> None:
    cfg = config_from_dict(ADVERSARIAL, "adv")
    torch.manual_seed(0)
    model = SliceAutoencoder(cfg.autoencoder, with_discriminator=True)
    plain = SliceAutoencoder(cfg.autoencoder)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("discriminator.")})
    x = torch.rand((3, 1, 16, 16), generator=torch.Generator().manual_seed(2)) * 2 - 1
    noise = torch.randn((3, 2, 8, 8), generator=torch.Generator().manual_seed(3))

    batch = model.reconstruction_loss(x, noise).detach()
    alone = torch.cat([model.reconstruction_loss(x[i : i + 1], noise[i : i + 1]).detach() for i in range(3)])
    model.eval()
    validation = model.reconstruction_loss(x, noise).detach()

    torch.testing.assert_close(batch, alone)  # GroupNorm judge: DP-SGD's per-slice gradients are per slice
    torch.testing.assert_close(validation, plain.reconstruction_loss(x, noise).detach())
    assert bool((batch > validation).all())  # in training the adversarial terms are added


def test_an_adversarial_stage_0_keeps_its_judge_out_of_the_codec(phantom_dir: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(ADVERSARIAL, "adv")
    volumes = load_volumes(phantom_dir, cfg.data)
    run = tmp_path / "run"

    train_stage(cfg, volumes, "autoencoder", run, steps=3)
    train_stage(cfg, volumes, "slice", run, steps=1)

    stage0 = load_checkpoint(run / "autoencoder.safetensors")[0]
    assert any(name.startswith("ema.discriminator.") for name in stage0)
    slice_names = load_checkpoint(run / "slice.safetensors")[0]
    assert any(name.startswith("ema.codec.net.") for name in slice_names)
    assert not any("discriminator" in name for name in slice_names)
    with pytest.raises(ConfigError, match=r"autoencoder\.discriminator_layers': 3 layers need slices of at least 24"):
        config_from_dict({**ADVERSARIAL, "autoencoder": {**ADVERSARIAL["autoencoder"], "discriminator_layers": 3}}, "c")


def test_dp_sgd_clips_the_adversarial_autoencoder_and_its_judge_per_slice(phantom_dir: Path, tmp_path: Path) -> None:
    from privacy.dp_sgd import per_sample_gradients, resolve_grad_sample_mode

    cfg = config_from_dict(ADVERSARIAL, "adv")
    torch.manual_seed(0)
    model = SliceAutoencoder(cfg.autoencoder, with_discriminator=True)
    x = torch.rand((2, 1, 16, 16), generator=torch.Generator().manual_seed(4)) * 2 - 1
    noise = torch.randn((2, 2, 8, 8), generator=torch.Generator().manual_seed(5))
    from gem3d.training import DenoisingInputs

    inputs = DenoisingInputs(noisy=x, t=torch.zeros(2, dtype=torch.long), cond=None, target=x, noise=noise)

    grads, _ = per_sample_gradients(model, inputs, "hooks")
    one = model.reconstruction_loss(x[1:], noise[1:]).sum()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    reference = dict(
        zip(names, torch.autograd.grad(one, [p for p in model.parameters() if p.requires_grad]), strict=True)
    )

    assert resolve_grad_sample_mode(model, "hooks") == "loop"  # hooks would credit the frozen judging pass
    assert any(name.startswith("discriminator.") for name in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g[1], reference[name], rtol=1e-4, atol=1e-6)
