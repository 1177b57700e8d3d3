"""The GPU fast path, exercised on the CPU: off by default there, and each switch really switches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.blocks.selfattention import SABlock

from gem3d.accel import accelerate, fast_path
from gem3d.config import AccelConfig, Config
from gem3d.data.dataset import load_volumes
from gem3d.data.windows import WindowSource
from gem3d.diffusion import noise_process
from gem3d.networks import SliceDenoiser
from gem3d.runs import build_model
from gem3d.training import draw_inputs, predict
from tests.conftest import randomise_zero_parameters

CPU = torch.device("cpu")


def _network(cfg: Config) -> SliceDenoiser:
    """The stage-2 network with its zero-initialised layers (output conv, slice-axis attention) randomised,
    so that its output is not identically zero and a changed computation can show."""
    model = randomise_zero_parameters(build_model("volume", cfg).eval())
    assert isinstance(model, SliceDenoiser)
    return model


def _inputs(cfg: Config, phantom_dir: Path, model: SliceDenoiser):  # type: ignore[no-untyped-def]
    source = WindowSource(load_volumes(phantom_dir, cfg.data), cfg.data.window)
    generator = torch.Generator().manual_seed(3)
    return draw_inputs(model, noise_process(cfg.diffusion), source, [0, 1], "volume", generator, cfg.train, CPU)


def test_auto_is_off_on_a_cpu_and_on_for_cuda() -> None:
    cpu = fast_path(AccelConfig(), CPU)
    cuda = fast_path(AccelConfig(), torch.device("cuda"))
    assert not (cpu.bf16 or cpu.tf32 or cpu.flash_attention or cpu.channels_last or cpu.compile or cpu.deterministic)
    assert cuda.bf16 and cuda.tf32 and cuda.flash_attention and cuda.channels_last and cuda.deterministic
    assert not cuda.compile
    forced = fast_path(AccelConfig(bf16="on", flash_attention="on", channels_last="on"), CPU)
    assert forced.bf16 and forced.flash_attention and forced.channels_last and not forced.tf32


def test_default_fast_path_on_a_cpu_computes_what_the_plain_network_does(micro_cfg: Config, phantom_dir: Path) -> None:
    plain = _network(micro_cfg)
    accelerated = accelerate(_network(micro_cfg), micro_cfg.accel, CPU)
    inputs = _inputs(micro_cfg, phantom_dir, plain)
    with torch.no_grad():
        assert torch.equal(predict(plain, inputs), predict(accelerated, inputs))


def test_bf16_runs_the_network_in_bf16_and_returns_fp32(micro_cfg: Config, phantom_dir: Path) -> None:
    # prepare: record the dtype every convolution of the network sees
    model = _network(micro_cfg)
    inputs = _inputs(micro_cfg, phantom_dir, model)
    with torch.no_grad():
        reference = predict(model, inputs)
    assert reference.abs().max() > 0
    accelerate(model, AccelConfig(bf16="on"), CPU)
    seen: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _args, out: seen.add(out.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    # execute
    with torch.no_grad():
        output = predict(model, inputs)
    for hook in hooks:
        hook.remove()
    # assert: bf16 inside, fp32 out, close to the fp32 network but not equal (it did round)
    assert seen == {torch.bfloat16}
    assert output.dtype == torch.float32
    assert not torch.equal(output, reference)
    assert (output - reference).abs().max() < 0.05 * reference.abs().max()


def test_flash_attention_and_channels_last_keep_the_result(micro_cfg: Config, phantom_dir: Path) -> None:
    model = _network(micro_cfg)
    inputs = _inputs(micro_cfg, phantom_dir, model)
    with torch.no_grad():
        reference = predict(model, inputs)
    # execute
    accelerate(model, AccelConfig(flash_attention="on", channels_last="on"), CPU)
    with torch.no_grad():
        output = predict(model, inputs)
    # assert: the switches are set on every attention block and 2D convolution, the result kept
    blocks = [m for m in model.modules() if isinstance(m, SABlock)]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert blocks and all(b.use_flash_attention for b in blocks)
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert torch.allclose(output, reference, atol=1e-5, rtol=1e-4)
    # and off again: a second call sets, it does not toggle
    accelerate(model, AccelConfig(flash_attention="off"), CPU)
    assert not any(b.use_flash_attention for b in blocks)


@pytest.mark.parametrize("stage", ["slice", "informed"])
def test_training_under_bf16_keeps_fp32_weights_and_a_finite_loss(
    micro_cfg: Config, phantom_dir: Path, tmp_path: Path, stage: str
) -> None:
    from gem3d.runs import load_model, train_stage

    cfg = micro_cfg.model_copy(update={"accel": AccelConfig(bf16="on")})
    metrics = train_stage(cfg, load_volumes(phantom_dir, cfg.data), stage, tmp_path / "run", steps=3)  # type: ignore[arg-type]
    model, saved, _ = load_model(tmp_path / "run" / f"{stage}.safetensors")
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert saved.accel.bf16 == "on" and model.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("stage", ["slice", "volume", "informed"])
def test_every_network_traces_as_one_graph_for_torch_compile(micro_cfg: Config, phantom_dir: Path, stage: str) -> None:
    # prepare: the network under the CUDA fast path's bf16 autocast (traced, not run, so a CPU will do)
    model = build_model(stage, micro_cfg).eval()  # type: ignore[arg-type]
    model.compute_dtype = torch.bfloat16
    source = WindowSource(load_volumes(phantom_dir, micro_cfg.data), micro_cfg.data.window)
    generator = torch.Generator().manual_seed(3)
    process = noise_process(micro_cfg.diffusion)
    inputs = draw_inputs(model, process, source, [0, 1], stage, generator, micro_cfg.train, CPU)  # type: ignore[arg-type]
    args = (
        (inputs.noisy, inputs.t, inputs.cond)
        if stage != "informed"
        else (inputs.noisy, inputs.t, inputs.position, inputs.mask)
    )

    # execute: Dynamo's trace of one forward
    explanation = torch._dynamo.explain(model)(*args)

    # assert: no graph break, so compile (and CUDA graphs) see the whole network
    reasons = [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons
