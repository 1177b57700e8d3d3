"""Training throughput: slices/s, peak memory and achieved FLOP/s of stages 1 and 2 (issue 2, item 6).

For each configuration (the tiny config, and with ``--mid`` the tiny network at 96x96 slices and
window 16) and each stage (``slice``, ``volume``), one fresh subprocess:

1. writes phantoms (``write_phantom_dataset``) and loads them with ``load_volumes``;
2. times ``gem3d.training.train`` for ``--steps`` steps after one warm-up step, and records the
   peak memory of all these steps (CPU: RSS high-water mark above the RSS with model, optimizer
   and data loaded; CUDA: ``torch.cuda.max_memory_allocated``);
3. counts the FLOPs of one training step (forward + backward) with ``FlopCounterMode``, which
   counts matmuls and convolutions, not elementwise ops;
4. times a float32 matmul (``--matmul`` square) with the same threads, before and after the
   training steps, as the machine's attainable FLOP/s under the same load.

slices/s = steps/s x batch x window. The ratio achieved FLOP/s / matmul FLOP/s is printed.

On CUDA the network runs with the config's fast path (``gem3d.accel``: bf16 autocast, TF32, fused
attention, channels-last by default) and the table adds the model FLOP utilisation against the
device's dense bf16 peak (``BF16_PEAK_TFLOPS``, or ``--peak-tflops``) and a bf16 matmul baseline;
the paper-scale configs are measured with ``--config brats`` or ``--config abdomenct1k``.

    .venv/bin/python experiments/benchmarks/train_throughput.py [--config tiny] [--mid] [--device cpu|cuda] [--steps N]
    .venv/bin/python experiments/benchmarks/train_throughput.py --config brats --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks import (
    MID,
    bf16_peak_flops,
    emit,
    machine,
    markdown_table,
    peak_bytes,
    reset_peak,
    run_worker,
)
from experiments.commands.runner import report_errors
from experiments.configs import parse_overrides, resolve_config_path
from gem3d.accel import accelerate
from gem3d.config import TrainConfig, load_config
from gem3d.data.dataset import load_volumes
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.data.windows import WindowSource
from gem3d.diffusion import NoiseProcess, noise_process
from gem3d.runs import build_model, resolve_device
from gem3d.training import Stage, draw_inputs, freeze_for_stage, new_state, per_sample_loss, train


def matmul_flops_per_s(size: int, device: torch.device, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Median FLOP/s of ``[size, size] @ [size, size]`` in ``dtype`` (2 size^3 FLOPs each)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: first-call dispatch and allocation
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times)


def step_flops(
    model: torch.nn.Module,
    process: NoiseProcess,
    source: WindowSource,
    stage: Stage,
    cfg: TrainConfig,
    device: torch.device,
) -> int:
    """FLOPs (matmuls and convolutions) of one training step, forward + backward, on a batch of ``cfg.batch_size``."""
    generator = torch.Generator().manual_seed(1)
    indices = [i % len(source) for i in range(cfg.batch_size)]
    inputs = draw_inputs(model, process, source, indices, stage, generator, cfg, device)
    with FlopCounterMode(display=False) as counter:
        per_sample_loss(model, inputs).mean().backward()
    return counter.get_total_flops()


def cuda_metrics(device: torch.device, achieved: float, peak_tflops: float | None, fast_path: str) -> dict[str, Any]:
    """The CUDA device's name, bf16 peak, model FLOP utilisation, bf16 matmul TFLOP/s and fast path."""
    peak_flops = bf16_peak_flops(device, peak_tflops)
    return {
        "device_name": torch.cuda.get_device_name(device),
        "bf16_peak_tflops": peak_flops / 1e12 if peak_flops else None,
        "mfu_bf16": achieved / peak_flops if peak_flops else None,
        "bf16_matmul_tflops": matmul_flops_per_s(8192, device, dtype=torch.bfloat16) / 1e12,
        "fast_path": fast_path,
    }


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (configuration, stage) measurement; run in its own process."""
    torch.set_num_threads(spec["threads"])
    cfg = load_config(resolve_config_path(spec["config"]), spec["overrides"])
    device = resolve_device(cfg.train.device)
    stage = spec["stage"]
    size, window, batch = cfg.data.image_size, cfg.data.window, cfg.train.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        # depth 2W + 8 so foreground cropping still leaves whole windows
        shape = (size, size, 2 * window + 8)
        data = write_phantom_dataset(Path(tmp) / "phantoms", 4, shape, cfg.data.num_labels, seed=0)
        volumes = load_volumes(data, cfg.data)
    model = accelerate(build_model(stage, cfg), cfg.accel, device)
    freeze_for_stage(model, stage, cfg.train.volume_train_all)
    state = new_state(model, cfg.train)
    source = WindowSource(volumes, window, cfg.train.informed_from)
    process = noise_process(cfg.diffusion)

    # Peak memory covers the warm-up step too: its first backward and the AdamW state allocate
    # what later steps reuse, so a reset after it would hide them. The matmul runs outside.
    matmul = [matmul_flops_per_s(spec["matmul"], device)]
    baseline = reset_peak(device)
    train(state, process, source, stage, 1, cfg.train)  # warm-up step, not timed
    started = time.perf_counter()
    train(state, process, source, stage, 1 + spec["steps"], cfg.train)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds_per_step = (time.perf_counter() - started) / spec["steps"]
    peak = peak_bytes(device)
    matmul.append(matmul_flops_per_s(spec["matmul"], device))

    flops_per_step = step_flops(model, process, source, stage, cfg.train, device)
    achieved = flops_per_step / seconds_per_step
    matmul_mean = sum(matmul) / len(matmul)
    cuda = cuda_metrics(device, achieved, spec.get("peak_tflops"), str(cfg.accel)) if device.type == "cuda" else {}
    return {
        "stage": stage,
        "size": size,
        "window": window,
        "batch": batch,
        "steps": spec["steps"],
        "seconds_per_step": seconds_per_step,
        "slices_per_s": batch * window / seconds_per_step,
        "peak_mib": (peak - baseline) / 2**20 if device.type == "cpu" else peak / 2**20,
        "gflop_per_step": flops_per_step / 1e9,
        "achieved_gflops": achieved / 1e9,
        "matmul_gflops": matmul_mean / 1e9,
        "matmul_gflops_before_after": [m / 1e9 for m in matmul],
        "fraction_of_matmul": achieved / matmul_mean,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "threads": torch.get_num_threads(),
        **cuda,
    }


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="bundled config name or TOML path (default tiny)")
    parser.add_argument("--mid", action="store_true", help="also the mid configuration: 96x96 slices, window 16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per measurement (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--matmul", type=int, default=2048, help="size of the square matmul baseline (default 2048)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per measurement")
    parser.add_argument("--peak-tflops", type=float, default=None, help="CUDA: the device's dense bf16 peak")
    parser.add_argument("--stages", default="slice,volume", help="stages to measure (default slice,volume)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. accel.compile=true"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args()


def configurations(config: str, extra_overrides: dict[str, Any], mid: bool) -> list[tuple[str, dict[str, Any]]]:
    """``(label, overrides)`` of each configuration: the config as given, and with ``mid`` the mid one."""
    name = config + "".join(f" {k}={v}" for k, v in extra_overrides.items())
    configs: list[tuple[str, dict[str, Any]]] = [(name, {})]
    if mid:
        configs.append((f"mid (96x96, W=16) {name}", MID))
    return configs


def worker_spec(
    args: argparse.Namespace, overrides: dict[str, Any], extra_overrides: dict[str, Any], stage: str
) -> dict[str, Any]:
    """What the worker measuring one (configuration, stage) is told."""
    return {
        "config": args.config,
        "overrides": {**overrides, **extra_overrides, "train.device": args.device},
        "stage": stage,
        "steps": args.steps,
        "threads": args.threads,
        "matmul": args.matmul,
        "peak_tflops": args.peak_tflops,
    }


def result_row(label: str, stage: str, result: dict[str, Any], cuda: bool) -> list[Any]:
    """One measurement's table row (dashes and the error when it failed; CUDA adds MFU and bf16 matmul)."""
    if "error" in result:
        return [label, stage, *["-"] * (11 if cuda else 9), result["error"]]
    extra = []
    if cuda:
        mfu = result.get("mfu_bf16")
        extra = [f"{100 * mfu:.1f}%" if mfu else "- (--peak-tflops)", f"{result['bf16_matmul_tflops']:.0f}"]
    return [
        label,
        stage,
        f"{result['size']}x{result['size']}",
        f"{result['batch']}x{result['window']}",
        f"{result['seconds_per_step']:.3f}",
        f"{result['slices_per_s']:.1f}",
        f"{result['peak_mib']:.0f}",
        f"{result['gflop_per_step']:.2f}",
        f"{result['achieved_gflops']:.1f}",
        f"{result['matmul_gflops']:.1f}",
        f"{100 * result['fraction_of_matmul']:.1f}%",
        *extra,
        "",
    ]


def measure_all(args: argparse.Namespace) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """Each (configuration, stage) in its own subprocess; the table rows and the results."""
    extra_overrides = parse_overrides(args.set)
    rows, results = [], []
    for label, overrides in configurations(args.config, extra_overrides, args.mid):
        for stage in args.stages.split(","):
            spec = worker_spec(args, overrides, extra_overrides, stage)
            result = run_worker(Path(__file__), spec, args.timeout, rss_cap_bytes=None)
            results.append({"config": label, **spec, **result})
            rows.append(result_row(label, stage, result, args.device.startswith("cuda")))
            if "error" not in result:
                print(f"  {label} {stage}: done", file=sys.stderr, flush=True)
    return rows, results


def table_headers(device: str) -> list[str]:
    """Column headers of the table (CUDA adds MFU and the bf16 matmul)."""
    memory = "peak MiB (CUDA max allocated)" if device.startswith("cuda") else "peak RSS delta MiB"
    headers = ["config", "stage", "slice", "batch x W", "s/step", "slices/s", memory]
    headers += ["GFLOP/step (fwd+bwd)", "achieved GFLOP/s", "matmul GFLOP/s", "fraction of matmul"]
    if device.startswith("cuda"):
        headers += ["MFU (bf16 peak)", "bf16 matmul TFLOP/s"]
    return [*headers, "note"]


def main() -> int:
    """Dispatch a ``--worker`` measurement, or measure every configuration and stage and print the table."""
    args = parse_args()
    if args.worker:
        emit(worker(json.loads(args.worker)))
        return 0
    rows, results = measure_all(args)
    info = machine(args.threads)
    print(f"# train_throughput: {json.dumps(info)}")
    print(f"# device {args.device}, {args.steps} timed steps after 1 warm-up, matmul {args.matmul}^2 float32")
    print(markdown_table(table_headers(args.device), rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(report_errors("benchmark train_throughput", main))
