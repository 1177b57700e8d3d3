"""Does data loading starve training? Windows/s drawn from the prepared cache against the step rate.

One run, side by side: build a demo cohort, prepare it with the config, then measure

* windows/s drawn by ``WindowSource.windows`` from the memory-mapped cache, in the training
  process, and from volumes held in RAM (the upper bound),
* windows/s through the training loader (``gem3d.data.loader``: one batch per step, drawn ahead
  by 0 and ``--workers`` worker processes, as ``train.loader_workers`` sets),
* the time to open the cache (``load_volumes`` on ``manifest.json``) and to read the raw folder,
* training steps/s of ``gem3d.training.train`` (slice stage) on the same data,

and prints the headroom: windows/s divided by the windows/s training consumes (steps/s x batch).

    .venv/bin/python experiments/benchmarks/data_loading.py [--config tiny] [--steps 20] [--workers 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.commands.runner import report_errors
from experiments.configs import resolve_config_path
from gem3d.config import Config, TrainConfig, load_config
from gem3d.data.dataset import load_raw, load_volumes
from gem3d.data.demo_cohort import write_demo_cohort
from gem3d.data.loader import StepBatches, step_batches
from gem3d.data.prepare import PrepareOptions, prepare_dataset
from gem3d.data.volume import Volume
from gem3d.data.windows import WindowSource
from gem3d.diffusion import noise_process
from gem3d.runs import build_model, resolve_device
from gem3d.training import freeze_for_stage, new_state, train


def windows_per_second(volumes: list[Volume], window: int, batch: int, seconds: float) -> float:
    """Windows drawn per second by ``WindowSource.windows`` (batches of ``batch``, random volumes)."""
    source = WindowSource(volumes, window)
    generator = torch.Generator().manual_seed(0)
    drawn, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        indices = torch.randint(len(source), (batch,), generator=generator).tolist()
        # .sum() forces the copy out of the memory map, as moving the batch to a device would
        float(source.windows(indices, generator).image.sum())
        drawn += batch
    return drawn / (time.perf_counter() - started)


def loader_windows_per_second(
    volumes: list[Volume], window: int, batch: int, workers: int, prefetch: int, seconds: float
) -> float:
    """Windows/s through the training loader with ``workers`` processes (0: drawn in this process)."""
    cfg = TrainConfig(batch_size=batch, loader_workers=workers, prefetch_batches=prefetch)
    batches = StepBatches(WindowSource(volumes, window), windows=True, batch_size=batch, seed=0)
    loader = step_batches(batches, 0, 10**9, cfg, torch.device("cpu"))
    float(next(loader).image.sum())  # workers started and their first batches ready
    drawn, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        float(next(loader).image.sum())
        drawn += batch
    elapsed = time.perf_counter() - started
    del loader  # stops the workers
    return drawn / elapsed


@dataclass(frozen=True)
class Measurements:
    """What one run measured: preparing and opening the data, window rates, training steps/s."""

    prepare_s: float
    open_s: float
    raw_s: float
    cache_rate: float
    ram_rate: float
    alone_rate: float
    workers_rate: float
    steps_per_s: float
    depth: int


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--cases", type=int, default=12, help="cases in the benchmark cohort")
    parser.add_argument("--size", type=int, default=None, help="cohort in-plane size (default: data.image_size)")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed")
    parser.add_argument("--seconds", type=float, default=3.0, help="time spent drawing windows per measurement")
    parser.add_argument("--device", default=None, help="override train.device")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes to compare with none")
    parser.add_argument("--no-train", action="store_true", help="measure loading only (paper-scale configs on CPU)")
    return parser.parse_args()


def best_rates(
    cached: list[Volume], in_ram: list[Volume], cfg: Config, workers: int, seconds: float
) -> tuple[float, float, float, float]:
    """Windows/s from the cache, from RAM, and through the loader with 0 and ``workers`` workers."""
    batch, window, prefetch = cfg.train.batch_size, cfg.data.window, cfg.train.prefetch_batches
    # Interleaved, best of two: the machine may be shared, and a slow burst should not pick the winner.
    cache_rate = ram_rate = alone_rate = workers_rate = 0.0
    for _ in range(2):
        cache_rate = max(cache_rate, windows_per_second(cached, window, batch, seconds / 2))
        ram_rate = max(ram_rate, windows_per_second(in_ram, window, batch, seconds / 2))
        alone_rate = max(alone_rate, loader_windows_per_second(cached, window, batch, 0, prefetch, seconds / 2))
        workers_rate = max(
            workers_rate, loader_windows_per_second(cached, window, batch, workers, prefetch, seconds / 2)
        )
    return cache_rate, ram_rate, alone_rate, workers_rate


def training_steps_per_s(volumes: list[Volume], cfg: Config, device: torch.device, steps: int) -> float:
    """Steps/s of ``steps`` slice-stage training steps after two warm-up steps."""
    model = build_model("slice", cfg).to(device)
    freeze_for_stage(model, "slice", cfg.train.volume_train_all)
    state = new_state(model, cfg.train)
    source = WindowSource(volumes, cfg.data.window, cfg.train.informed_from)
    train(state, noise_process(cfg.diffusion), source, "slice", 2, cfg.train)  # warm-up
    return train(state, noise_process(cfg.diffusion), source, "slice", 2 + steps, cfg.train)["steps_per_s"]


def measure(args: argparse.Namespace, cfg: Config, device: torch.device, size: int) -> Measurements:
    """Write and prepare a demo cohort, time opening it, then measure window rates and training."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_demo_cohort(root / "cohort", sites=1, cases_per_site=args.cases, size=size, test_per_site=0)
        started = time.perf_counter()
        prepare_dataset(root / "cohort" / "site_0", root / "prepared", cfg.data, PrepareOptions())
        prepare_s = time.perf_counter() - started
        started = time.perf_counter()
        cached = load_volumes(root / "prepared", cfg.data)
        open_s = time.perf_counter() - started
        started = time.perf_counter()
        in_ram = load_raw(root / "cohort" / "site_0", cfg.data)
        raw_s = time.perf_counter() - started

        in_ram = [Volume(v.case_id, np.array(v.image), np.array(v.label)) for v in in_ram]
        rates = best_rates(cached, in_ram, cfg, args.workers, args.seconds)
        steps_per_s = float("nan") if args.no_train else training_steps_per_s(cached, cfg, device, args.steps)
    depth = int(np.mean([v.depth for v in cached]))
    return Measurements(prepare_s, open_s, raw_s, *rates, steps_per_s, depth)


def print_report(args: argparse.Namespace, cfg: Config, device: torch.device, size: int, m: Measurements) -> None:
    """The machine and cohort lines, the timings and rates, and the headroom over training."""
    batch = cfg.train.batch_size
    consumed = m.steps_per_s * batch
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(
        f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}{gpu}"
    )
    print(
        f"config {args.config}: {args.cases} demo cases (--size {size}) -> model grid "
        f"[D~{m.depth}, {cfg.data.image_size}, {cfg.data.image_size}], window {cfg.data.window}, batch {batch}"
    )
    print(f"prepare (validate + cache):   {m.prepare_s:8.2f} s  ({args.cases / m.prepare_s:.1f} cases/s)")
    print(f"open cache (mmap):            {m.open_s * 1e3:8.1f} ms")
    print(f"read raw folder in memory:    {m.raw_s:8.2f} s")
    print(f"windows/s from cache (mmap):  {m.cache_rate:10.0f}")
    print(f"windows/s from RAM:           {m.ram_rate:10.0f}")
    print(f"loader, 0 workers:            {m.alone_rate:10.0f} windows/s")
    speedup = m.workers_rate / m.alone_rate
    print(f"loader, {args.workers} workers:            {m.workers_rate:10.0f} windows/s  ({speedup:.2f}x)")
    if not args.no_train:
        print(f"training steps/s (slice):     {m.steps_per_s:10.3f}  -> consumes {consumed:.2f} windows/s")
        print(f"headroom (cache / consumed):  {m.cache_rate / consumed:10.0f}x")
        print(f"headroom (loader, {args.workers} workers):  {m.workers_rate / consumed:10.0f}x  (target >= 2x)")


def main() -> int:
    """Measure the data loading and training of one config, and print the report."""
    args = parse_args()
    overrides = {"train.device": args.device} if args.device else {}
    cfg = load_config(resolve_config_path(args.config), overrides)
    device = resolve_device(cfg.train.device)
    size = args.size or cfg.data.image_size
    print_report(args, cfg, device, size, measure(args, cfg, device, size))
    return 0


if __name__ == "__main__":
    raise SystemExit(report_errors("benchmark data_loading", main))
