"""DP-SGD: per-window gradients, clipping through Opacus, DP training of every stage, the ledger."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator

from gem3d.config import Config, PrivacyConfig
from gem3d.data.dataset import load_volumes
from gem3d.data.windows import WindowSource
from gem3d.diffusion import noise_process
from gem3d.errors import ConfigError
from gem3d.runs import build_model, load_model, train_stage
from gem3d.training import DenoisingInputs, draw_inputs, freeze_for_stage, new_state, per_sample_loss
from privacy.dp_sgd import (
    GRAD_SAMPLE_MODES,
    per_sample_gradients,
    resolve_grad_sample_mode,
    resolve_noise_multiplier,
    sample_rate,
    train_private,
)
from privacy.ledger import PrivacyBudgetError, PrivacyLedger, epsilon_for_history


def _dp_cfg(cfg: Config, **privacy: object) -> Config:
    values = {"enabled": True, "noise_multiplier": 1.0, "budget_epsilon": 1e4, **privacy}
    return cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update=values)})


def _one(inputs: DenoisingInputs, index: int) -> DenoisingInputs:
    def take(value: torch.Tensor | None) -> torch.Tensor | None:
        return None if value is None else value[index : index + 1]

    return DenoisingInputs(*(take(getattr(inputs, f)) for f in inputs.__dataclass_fields__))


def _manual_window_grads(model: torch.nn.Module, inputs: DenoisingInputs) -> list[list[torch.Tensor]]:
    """Reference: one ordinary backward per window (the privacy unit)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for index in range(inputs.noisy.shape[0]):
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, _one(inputs, index)).sum().backward()
        grads.append([p.grad.detach().clone() for p in params])
    return grads


@pytest.mark.parametrize("stage", ["slice", "volume", "informed"])
def test_models_pass_opacus_validator(micro_cfg: Config, stage: str) -> None:
    model = build_model(stage, micro_cfg)  # type: ignore[arg-type]

    errors = ModuleValidator.validate(model, strict=False)

    assert errors == []


def _model_with_gradients(cfg: Config, stage: str) -> torch.nn.Module:
    """``stage``'s model frozen as in training, with no parameter left all-zero.

    MONAI zero-initialises the U-Net's output conv, which zeroes every stage-2 slice-axis
    gradient of a fresh model; small random values stand in for a trained base, so the
    comparisons below compare non-zero gradients.
    """
    model = build_model(stage, cfg)  # type: ignore[arg-type]
    freeze_for_stage(model, stage, False)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
    return model


def _inputs(cfg: Config, phantom_dir: Path, model: torch.nn.Module, stage: str, indices: list[int]) -> DenoisingInputs:
    return draw_inputs(
        model,
        noise_process(cfg.diffusion),
        WindowSource(load_volumes(phantom_dir, cfg.data), cfg.data.window),
        indices,
        stage,  # type: ignore[arg-type]
        torch.Generator().manual_seed(1),
        cfg.train,
        torch.device("cpu"),
    )


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("stage", ["slice", "volume", "informed"])
def test_per_sample_gradients_are_per_window(micro_cfg: Config, phantom_dir: Path, stage: str, mode: str) -> None:
    model = _model_with_gradients(micro_cfg, stage)
    inputs = _inputs(micro_cfg, phantom_dir, model, stage, [0, 3])

    grads, losses = per_sample_gradients(model, inputs, mode)

    expected = _manual_window_grads(model, inputs)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert set(grads) == set(names)
    assert any(bool(g.any()) for g in expected[0])
    for index in range(2):
        for name, reference in zip(names, expected[index], strict=True):
            assert grads[name].shape == (2, *reference.shape)
            torch.testing.assert_close(grads[name][index], reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses, per_sample_loss(model, inputs).detach(), rtol=1e-5, atol=1e-6)
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "_forward_counter") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_auto_grad_sample_mode_is_the_measured_default(micro_cfg: Config) -> None:
    model = build_model("slice", micro_cfg)

    resolved = {mode: resolve_grad_sample_mode(model, mode) for mode in ("auto", *GRAD_SAMPLE_MODES)}

    assert resolved == {"auto": "loop", "loop": "loop", "vmap": "vmap", "hooks": "hooks"}
    assert PrivacyConfig().grad_sample_mode == "auto"
    with pytest.raises(ConfigError, match="grad_sample_mode"):
        resolve_grad_sample_mode(model, "ghost")


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_each_window_gradient_is_clipped(micro_cfg: Config, phantom_dir: Path, mode: str) -> None:
    model = build_model("slice", micro_cfg)
    params = list(model.parameters())
    inputs = _inputs(micro_cfg, phantom_dir, model, "slice", [0, 1, 2, 3])
    clip = 0.05
    expected_batch = 4
    manual = _manual_window_grads(model, inputs)
    norms = [torch.sqrt(sum((g**2).sum() for g in sample)) for sample in manual]
    assert min(norms) > clip  # every window is clipped, so the check below can fail
    expected_update = [
        -sum(sample[k] * (clip / (norm + 1e-6)) for sample, norm in zip(manual, norms, strict=True)) / expected_batch
        for k in range(len(params))
    ]
    before = [p.detach().clone() for p in params]
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=expected_batch,
    )

    grads, _ = per_sample_gradients(model, inputs, mode)
    for name, p in model.named_parameters():
        p.grad_sample = grads[name]
    optimizer.step()

    for p, old, update in zip(params, before, expected_update, strict=True):
        torch.testing.assert_close(p.detach() - old, update, rtol=1e-3, atol=1e-7)


def test_dp_training_of_slice_and_volume_stages_is_accounted(
    micro_cfg: Config, phantom_dir: Path, tmp_path: Path
) -> None:
    cfg = _dp_cfg(micro_cfg)
    volumes = load_volumes(phantom_dir, cfg.data)
    run = tmp_path / "run"
    ledger = PrivacyLedger.open(run / "privacy_ledger.json", cfg.privacy)
    dp_train = functools.partial(train_private, privacy_cfg=cfg.privacy, ledger=ledger)
    before = build_model("slice", cfg).state_dict()

    slice_metrics = train_stage(cfg, volumes, "slice", run, steps=2, train_fn=dp_train)
    volume_metrics = train_stage(cfg, volumes, "volume", run, steps=2, train_fn=dp_train)

    q = sample_rate(cfg.train.batch_size, len(volumes))
    reference = RDPAccountant()
    reference.history = [(1.0, q, 4)]
    assert ledger.history == [(1.0, q, 4)]
    assert volume_metrics["epsilon"] == pytest.approx(reference.get_epsilon(delta=cfg.privacy.delta))
    assert slice_metrics["epsilon"] < volume_metrics["epsilon"]
    reopened = PrivacyLedger.open(run / "privacy_ledger.json", cfg.privacy)
    assert reopened.epsilon == pytest.approx(volume_metrics["epsilon"])
    slice_model, _, _ = load_model(run / "slice.safetensors", "model")
    sent = slice_model.state_dict()
    assert not any("_module" in name for name in sent)
    assert set(sent) == set(before)
    assert any(not torch.equal(sent[name], before[name]) for name in before)
    for p in slice_model.parameters():
        assert not hasattr(p, "grad_sample")


def test_dp_training_of_the_informed_generator(micro_cfg: Config, phantom_dir: Path, tmp_path: Path) -> None:
    cfg = _dp_cfg(micro_cfg, noise_multiplier=1.5)
    volumes = load_volumes(phantom_dir, cfg.data)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", cfg.privacy)
    before = build_model("informed", cfg).state_dict()

    metrics = train_stage(
        cfg,
        volumes,
        "informed",
        tmp_path / "run",
        steps=2,
        train_fn=functools.partial(train_private, privacy_cfg=cfg.privacy, ledger=ledger),
    )

    assert metrics["steps"] == 2 and metrics["noise_multiplier"] == 1.5
    assert ledger.history == [(1.5, sample_rate(cfg.train.batch_size, len(volumes)), 2)]
    trained, _, _ = load_model(tmp_path / "run" / "informed.safetensors", "model")
    assert any(not torch.equal(trained.state_dict()[name], before[name]) for name in before)


def test_dp_training_with_opacus_hooks_leaves_a_plain_module(
    micro_cfg: Config, phantom_dir: Path, tmp_path: Path
) -> None:
    cfg = _dp_cfg(micro_cfg, grad_sample_mode="hooks")
    volumes = load_volumes(phantom_dir, cfg.data)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", cfg.privacy)
    model = _model_with_gradients(cfg, "volume")
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    metrics = train_private(
        new_state(model, cfg.train),
        noise_process(cfg.diffusion),
        WindowSource(volumes, cfg.data.window),
        "volume",
        2,
        cfg.train,
        privacy_cfg=cfg.privacy,
        ledger=ledger,
    )

    assert metrics["steps"] == 2 and ledger.steps == 2
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(m, "activations") or hasattr(m, "autograd_grad_sample_hooks") for m in model.modules())
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "_forward_counter") for p in model.parameters())


def test_target_epsilon_sets_the_noise_for_the_planned_steps() -> None:
    cfg = PrivacyConfig(enabled=True, target_epsilon=4.0, delta=1e-5)

    sigma = resolve_noise_multiplier(cfg, 0.1, 100)

    assert 3.9 <= epsilon_for_history([(sigma, 0.1, 100)], 1e-5) <= 4.0
    assert resolve_noise_multiplier(cfg.model_copy(update={"target_epsilon": None}), 0.1, 100) == 1.0


def test_over_budget_training_is_refused_before_any_step(micro_cfg: Config, phantom_dir: Path, tmp_path: Path) -> None:
    cfg = _dp_cfg(micro_cfg, budget_epsilon=1.0)
    volumes = load_volumes(phantom_dir, cfg.data)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", cfg.privacy)
    model = build_model("slice", cfg)
    state = new_state(model, cfg.train)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(PrivacyBudgetError, match="over the budget"):
        train_private(
            state,
            noise_process(cfg.diffusion),
            WindowSource(volumes, cfg.data.window),
            "slice",
            50,
            cfg.train,
            privacy_cfg=cfg.privacy,
            ledger=ledger,
        )

    assert state.step == 0 and ledger.steps == 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_gem3d_train_with_dp_writes_a_ledger(phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from experiments.cli import main

    run = tmp_path / "run"
    micro = ["--set", "data.image_size=16", "--set", "data.window=4", "--set", "model.channels='8,16'"]
    micro += ["--set", "model.attention_levels='false,true'", "--set", "model.norm_num_groups=4"]
    micro += ["--set", "model.num_head_channels=8", "--set", "privacy.enabled=true"]

    micro += ["--site-state", str(tmp_path / "site")]

    code = main(["train", *micro, "--data", str(phantom_dir), "--stage", "slice", "--out", str(run), "--steps", "2"])

    assert code == 0
    assert not (run / "privacy_ledger.json").exists()  # the ledger is the site's, not the run's
    ledger = PrivacyLedger.read(tmp_path / "site" / "privacy_ledger.json")
    assert ledger.steps == 2 and ledger.epsilon > 0
    assert f"ε = {ledger.epsilon:.3f}" in capsys.readouterr().out


def test_empty_poisson_batches_are_noise_steps_and_accounted(
    micro_cfg: Config, phantom_dir: Path, tmp_path: Path
) -> None:
    cfg = _dp_cfg(micro_cfg)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 1})})  # q = 1/4
    volumes = load_volumes(phantom_dir, cfg.data)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", cfg.privacy)
    model = build_model("volume", cfg)
    freeze_for_stage(model, "volume", False)
    state = new_state(model, cfg.train)
    sizes: list[float] = []
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    train_private(
        state,
        noise_process(cfg.diffusion),
        WindowSource(volumes, cfg.data.window),
        "volume",
        24,
        cfg.train,
        lambda metrics: sizes.append(metrics["batch_size"]),
        privacy_cfg=cfg.privacy,
        ledger=ledger,
    )

    # the Poisson sample is secret (not seeded): P(a step is empty) = 0.75**4, P(none of 24) < 2e-4
    assert 0.0 in sizes and len(sizes) == 24
    assert ledger.history == [(1.0, 0.25, 24)]
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_importing_the_privacy_package_leaves_flower_log_lines_printed_once() -> None:
    # Opacus configures the root logger when imported; the privacy package undoes that, so a site's
    # or the server's Flower lines are not printed a second time as "date:LEVEL:message".
    import subprocess
    import sys

    program = (
        "import privacy.dp_sgd\n"
        "from flwr.common.logger import log\n"
        "from logging import INFO\n"
        "log(INFO, 'a single line')\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert (done.stdout + done.stderr).count("a single line") == 1
