"""The GPU fast path on a real CUDA device: same seed, same bytes; no host wait per training step.

Skipped without CUDA (CI and the CPU machines have none); run on a GPU machine with
``python -m pytest tests/test_cuda.py`` (``experiments/benchmarks/gpu.sh`` does, with the GPU
benchmarks). The default config is used on purpose: on CUDA its fast path is on (bf16 autocast,
TF32, fused attention, channels-last, deterministic kernels).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gem3d.accel import accelerate
from gem3d.config import Config, config_from_dict
from gem3d.data.dataset import load_volumes
from gem3d.data.windows import WindowSource
from gem3d.diffusion import make_sampler, noise_process
from gem3d.runs import build_model, load_model, train_stage
from gem3d.sampler import InformedSlice, SampleRequest, sample_volumes
from gem3d.training import DenoisingInputs, Stage, TrainState, draw_inputs, freeze_for_stage, new_state, train
from privacy.dp_sgd import GRAD_SAMPLE_MODES, per_sample_gradients, sample_rate, train_private
from privacy.ledger import PrivacyLedger
from tests.conftest import randomise_zero_parameters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def _cuda_cfg(cfg: Config) -> Config:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cuda"})})


def _network(cfg: Config, stage: Stage) -> torch.nn.Module:
    """A fresh network for ``stage``, its zero-initialised layers randomised (a fresh stage-2
    network's frozen output is zero, and so are its gradients)."""
    return randomise_zero_parameters(build_model(stage, cfg))


def _state(cfg: Config, stage: Stage) -> TrainState:
    model = accelerate(_network(cfg, stage), cfg.accel, CUDA)
    freeze_for_stage(model, stage, cfg.train.volume_train_all)
    return new_state(model, cfg.train)


def _trained(cfg: Config, phantom_dir: Path, stage: Stage, steps: int) -> dict[str, torch.Tensor]:
    state = _state(cfg, stage)
    source = WindowSource(load_volumes(phantom_dir, cfg.data), cfg.data.window, cfg.train.informed_from)
    train(state, noise_process(cfg.diffusion), source, stage, steps, cfg.train)
    weights = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    weights |= {f"ema.{k}": v for k, v in state.ema.module.state_dict().items()}
    return {k: v.detach().cpu() for k, v in weights.items()}


@pytest.mark.parametrize("stage", ["slice", "volume", "informed"])
def test_training_on_cuda_gives_the_same_bytes_for_the_same_seed(
    micro_cfg: Config, phantom_dir: Path, stage: Stage
) -> None:
    cfg = _cuda_cfg(micro_cfg)
    first = _trained(cfg, phantom_dir, stage, 4)
    second = _trained(cfg, phantom_dir, stage, 4)
    start = _network(cfg, stage).state_dict()
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differ, f"{len(differ)} of {len(first)} tensors differ between two seeded runs, e.g. {differ[:3]}"
    # and it trained: the trainable weights moved from their initialisation
    assert any(not torch.equal(first[f"model.{k}"], v) for k, v in start.items() if v.is_floating_point())


def test_training_at_the_brats_config_on_cuda_gives_the_same_bytes(tmp_path: Path) -> None:
    # the paper-scale network (26.6 M parameters, attention over 32x32 and 16x16 tokens), 128^2 slices
    from experiments.configs import resolve_config_path
    from gem3d.config import load_config
    from gem3d.data.phantoms import write_phantom_dataset

    cfg = load_config(resolve_config_path("brats"), {"train.batch_size": 2})
    data = write_phantom_dataset(tmp_path / "data", 2, (128, 128, 40), cfg.data.num_labels, seed=0)
    first = _trained(cfg, data, "slice", 3)
    second = _trained(cfg, data, "slice", 3)
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differ, f"{len(differ)} of {len(first)} tensors differ between two seeded runs, e.g. {differ[:3]}"


def test_sampling_on_cuda_gives_the_same_bytes_for_the_same_seed(micro_run: Path) -> None:
    model, cfg, _ = load_model(micro_run / "volume.safetensors", device=CUDA)
    rng = np.random.default_rng(0)
    depth, size = 9, cfg.data.image_size
    requests = [
        SampleRequest(
            mask=rng.integers(0, cfg.data.num_labels, (depth, size, size)).astype(np.uint8),
            informed=InformedSlice(rng.uniform(-1, 1, (size, size)).astype(np.float32), None, "file"),
            start=depth // 2,
            seed=seed,
        )
        for seed in (1, 2)
    ]
    sampler = make_sampler(cfg.diffusion, steps=4)

    def sample() -> list[np.ndarray]:
        return sample_volumes(model, sampler, requests, cfg.data.window, cfg.sampler.overlap)  # type: ignore[arg-type]

    first, second = sample(), sample()
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], first[1])  # the seeds matter
    assert all(np.isfinite(v).all() and v.std() > 0 for v in first)


def _syncs(state: TrainState, cfg: Config, source: WindowSource, until: int) -> list[str]:
    """Where the host waited for the device while ``train`` ran to step ``until`` ("file:line: message")."""
    process = noise_process(cfg.diffusion)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(state, process, source, "slice", until, cfg.train)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message)]


def test_a_training_step_on_cuda_does_not_wait_for_the_device(micro_cfg: Config, phantom_dir: Path) -> None:
    # prepare: a warmed-up state (the first step allocates and initialises what later steps reuse)
    cfg = _cuda_cfg(micro_cfg)
    source = WindowSource(load_volumes(phantom_dir, cfg.data), cfg.data.window, cfg.train.informed_from)
    state = _state(cfg, "slice")
    train(state, noise_process(cfg.diffusion), source, "slice", 1, cfg.train)
    # execute: 2 steps, then 8 more
    short = _syncs(state, cfg, source, 3)
    long = _syncs(state, cfg, source, 11)
    # assert: the host waits as often for 8 steps as for 2 (once at the end, for the mean loss)
    assert len(long) == len(short), "\n".join(["2 steps:", *short, "8 steps:", *long])
    assert len(short) <= 2, "\n".join(short)


def _on(inputs: DenoisingInputs, device: torch.device) -> DenoisingInputs:
    moved = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}
    return dataclasses.replace(inputs, **{k: v.to(device) for k, v in moved.items() if v is not None})


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("stage", ["slice", "volume"])
def test_per_window_gradients_on_cuda_are_those_on_the_cpu(
    micro_cfg: Config, phantom_dir: Path, stage: Stage, mode: str
) -> None:
    # prepare: one network on the CPU (fp32) and its copy on CUDA with the fast path (bf16, channels-last,
    # deterministic kernels), one batch of two windows
    cfg = _cuda_cfg(micro_cfg)
    cpu_model = _network(micro_cfg, stage)
    freeze_for_stage(cpu_model, stage, False)
    cuda_model = accelerate(copy.deepcopy(cpu_model), cfg.accel, CUDA)
    source = WindowSource(load_volumes(phantom_dir, cfg.data), cfg.data.window)
    generator = torch.Generator().manual_seed(1)
    inputs = draw_inputs(cpu_model, noise_process(cfg.diffusion), source, [0, 3], stage, generator, cfg.train, CPU)

    # execute
    expected, _ = per_sample_gradients(cpu_model, inputs, mode)
    got, _ = per_sample_gradients(cuda_model, _on(inputs, CUDA), mode)

    # assert: each window's whole gradient agrees to bf16 rounding (a wrong unit is O(1) off). Per
    # window, not per tensor: some tensors' true gradient is zero (an attention key's bias cannot
    # change a softmax), and their float noise has no scale to be relative to.
    assert torch.are_deterministic_algorithms_enabled()
    assert set(got) == set(expected)
    names = sorted(expected)
    for window in range(2):
        reference = torch.cat([expected[name][window].flatten() for name in names])
        difference = torch.cat([got[name][window].cpu().flatten() for name in names]) - reference
        error = float(difference.norm() / reference.norm())
        assert error < 0.05, f"window {window}: relative difference {error:.3g}"


def test_dp_sgd_on_cuda_trains_both_stages_and_is_accounted(
    micro_cfg: Config, phantom_dir: Path, tmp_path: Path
) -> None:
    # prepare
    cfg = _cuda_cfg(micro_cfg)
    values = {"enabled": True, "noise_multiplier": 1.0, "budget_epsilon": 1e4}
    cfg = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update=values)})
    volumes = load_volumes(phantom_dir, cfg.data)
    run = tmp_path / "run"
    ledger = PrivacyLedger.open(run / "privacy_ledger.json", cfg.privacy)
    dp_train = functools.partial(train_private, privacy_cfg=cfg.privacy, ledger=ledger)

    # execute: two DP steps of each stage, under deterministic kernels
    for stage in ("slice", "volume"):
        train_stage(cfg, volumes, stage, run, steps=2, train_fn=dp_train)

    # assert: four steps in the ledger, finite weights that moved, no Opacus attribute left behind
    assert ledger.history == [(1.0, sample_rate(cfg.train.batch_size, len(volumes)), 4)]
    model, _, _ = load_model(run / "volume.safetensors", "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())


def test_latent_stages_on_cuda_give_the_same_bytes_for_the_same_seed(phantom_dir: Path, tmp_path: Path) -> None:
    from tests.test_latent import LATENT

    cfg = _cuda_cfg(config_from_dict(LATENT, "latent micro"))
    volumes = load_volumes(phantom_dir, cfg.data)
    runs = [tmp_path / "first", tmp_path / "second"]
    for run in runs:
        for stage, steps in (("autoencoder", 3), ("slice", 2), ("volume", 2)):
            train_stage(cfg, volumes, stage, run, steps=steps)  # type: ignore[arg-type]

    for name in ("autoencoder", "slice", "volume"):
        first, second = (load_file(run / f"{name}.safetensors") for run in runs)
        differ = [k for k in first if not torch.equal(first[k], second[k])]
        assert not differ, f"{name}: {len(differ)} of {len(first)} tensors differ, e.g. {differ[:3]}"
