"""Latent GEM-3D against pixel GEM-3D (issue 17, item 5): reconstruction, cost per volume, fidelity.

Three measurements, each in one run:

* **cost** (``--cost``): sampling time and peak memory of one window of ``--window`` slices at
  256² and 512² slices, ``--steps`` sampler steps, pixel model against latent model, each in a
  fresh subprocess (its peak RSS, or CUDA max allocated, is its own). Pixel: the
  ``abdomenct1k`` denoiser at that slice size; latent: ``abdomenct1k_latent_256`` (f = 4) and
  ``abdomenct1k_latent`` (f = 8), both on 64² latents. Untrained networks: time and memory do not
  depend on the weights. The latent time includes decoding the window's slices (once per volume,
  not per step), which the table also gives alone.
* **fidelity** (``--fidelity SECONDS``): ``tiny`` (pixel) and ``tiny_latent`` trained for the
  same wall-clock time on the demo cohort's three sites pooled (pixel: 2/3 slice, 1/3 volume
  stage; latent: 1/4 autoencoder, 1/2 slice, 1/4 volume), then every held-out case of the
  cohort's ``test`` split sampled from its own mask and its own real informed slice (at
  ``default_start``), ``--seeds`` seeds each: PSNR over the volume and the foreground, means with
  95% t-intervals over cases and the paired latent − pixel difference. Training checkpoints every
  25 steps; the clock is read between chunks, so each model gets its time to within one chunk.
* **reconstruction**: the latent run's autoencoder (EMA) on every slice of the held-out cases
  with foreground: PSNR and SSIM per case (2D SSIM averaged over the case's slices), with intervals.

    .venv/bin/python experiments/benchmarks/latent.py --cost --fidelity 240 [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import SSIMMetric

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks import emit, machine, markdown_table, peak_bytes, reset_peak, run_worker
from experiments.commands.runner import report_errors
from experiments.configs import resolve_config_path
from experiments.evaluation.downstream import t_interval
from experiments.evaluation.fidelity import psnr
from gem3d.accel import accelerate
from gem3d.autoencoder import decode_slices, encode_slices
from gem3d.config import Config, load_config
from gem3d.data.dataset import load_volumes
from gem3d.data.demo_cohort import write_demo_cohort
from gem3d.data.volume import Volume
from gem3d.diffusion import make_sampler
from gem3d.networks import SliceDenoiser
from gem3d.runs import build_model, load_model, train_stage
from gem3d.sampler import InformedSlice, SampleRequest, default_start, sample_volumes

COST_CONFIGS = {256: ("abdomenct1k", "abdomenct1k_latent_256"), 512: ("abdomenct1k", "abdomenct1k_latent")}
CHUNK = 25  # training steps between two readings of the clock


def cost_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Sample one window-long volume with an untrained (latent or pixel) model; time and peak memory."""
    torch.set_num_threads(spec["threads"])
    overrides = {"data.image_size": spec["size"], "data.window": spec["window"], "train.device": spec["device"]}
    cfg = load_config(resolve_config_path(spec["config"]), overrides)
    device = torch.device(spec["device"])
    model = build_model("volume", cfg)
    assert isinstance(model, SliceDenoiser)
    model = accelerate(model, cfg.accel, device).eval()
    size, depth = spec["size"], spec["window"]
    mask = np.zeros((depth, size, size), dtype=np.uint8)
    mask[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    mask[:, size // 3 : size // 2, size // 3 : size // 2] = 2
    informed = InformedSlice(np.zeros((size, size), np.float32), mask[0], "file")
    request = SampleRequest(mask=mask, informed=informed, start=0, seed=0)
    baseline = reset_peak(device)
    started = time.perf_counter()
    sample_volumes(model, make_sampler(cfg.diffusion, spec["steps"]), [request], depth, 0, batch_volumes=1)
    seconds = time.perf_counter() - started
    peak = peak_bytes(device)
    decode = 0.0
    if model.codec is not None:  # decoding alone, once per volume
        latents = torch.zeros((depth, model.image_channels, size // model.factor, size // model.factor), device=device)
        started = time.perf_counter()
        decode_slices(model.codec, latents)
        decode = time.perf_counter() - started
    above = peak - baseline if device.type == "cpu" else peak
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("codec."))
    return {"seconds": seconds, "decode_seconds": decode, "peak_mib": above / 2**20, "params": params}


def cost(args: argparse.Namespace) -> str:
    rows = []
    for size, (pixel, latent) in COST_CONFIGS.items():
        results = {}
        for kind, name in (("pixel", pixel), ("latent", latent)):
            spec = {"config": name, "size": size, "window": args.window, "steps": args.steps}
            spec |= {"threads": args.threads, "device": args.device}
            results[kind] = run_worker(Path(__file__), spec, args.timeout, int(args.memory_cap * 2**30))
            print(f"  cost {size}^2 {kind}: {results[kind]}", file=sys.stderr, flush=True)
        p, q = results["pixel"], results["latent"]
        if "error" in p or "error" in q:
            rows.append([f"{size}²", pixel, latent, p.get("error", "-"), q.get("error", "-"), "-", "-", "-", "-", "-"])
            continue
        pixel_step = p["seconds"] / args.steps
        latent_step = (q["seconds"] - q["decode_seconds"]) / args.steps
        rows.append(
            [
                f"{size}²",
                f"{pixel} ({p['params'] / 1e6:.1f} M)",
                f"{latent} ({q['params'] / 1e6:.1f} M)",
                f"{pixel_step:.2f}",
                f"{latent_step:.2f}",
                f"{q['decode_seconds']:.2f}",
                f"{pixel_step / latent_step:.1f}x",
                f"{p['peak_mib']:.0f}",
                f"{q['peak_mib']:.0f}",
                f"{p['peak_mib'] / max(q['peak_mib'], 1e-9):.1f}x",
            ]
        )
    headers = ["slices", "pixel config", "latent config", "pixel s/step", "latent s/step", "latent decode s"]
    headers += ["step time pixel / latent", "pixel peak MiB", "latent peak MiB", "memory pixel / latent"]
    title = (
        f"# cost: one window of {args.window} slices, {args.steps} sampler step(s), untrained networks, "
        f"{args.device}: {json.dumps(machine(args.threads))}"
    )
    return title + "\n" + markdown_table(headers, rows)


def _train_for(cfg: Config, volumes: list[Volume], run: Path, plan: list[tuple[str, float]]) -> dict[str, int]:
    """Train each stage of ``plan`` for its seconds, in chunks of ``CHUNK`` steps; return the steps taken."""
    steps: dict[str, int] = {}
    for stage, seconds in plan:
        started, done = time.perf_counter(), 0
        while done == 0 or time.perf_counter() - started < seconds:
            done += CHUNK
            train_stage(cfg, volumes, stage, run, steps=done, resume=done > CHUNK)  # type: ignore[arg-type]
        steps[stage] = done
    return steps


def _interval(values: list[float]) -> str:
    low, high = t_interval(values)
    mean = float(np.mean(values))
    return f"{mean:.2f} [{low:.2f}, {high:.2f}]" if low is not None and high is not None else f"{mean:.2f}"


def _sample_scores(run: Path, held_out: list[Volume], seeds: int) -> tuple[list[float], list[float]]:
    """Per held-out case, PSNR over the volume and the foreground, averaged over ``seeds`` seeds."""
    model, cfg, _ = load_model(run / "volume.safetensors")
    assert isinstance(model, SliceDenoiser)
    requests = []
    for index, volume in enumerate(held_out):
        start = default_start(volume.label)
        informed = InformedSlice(volume.image[start], volume.label[start], "real")
        requests += [SampleRequest(volume.label, informed, start, seed=1000 * s + index) for s in range(seeds)]
    sampler = make_sampler(cfg.diffusion)
    out = sample_volumes(model, sampler, requests, cfg.data.window, cfg.sampler.overlap, cfg.sampler.batch_volumes)
    whole, foreground = [], []
    for index, volume in enumerate(held_out):
        mine = out[index * seeds : (index + 1) * seeds]
        whole.append(float(np.mean([psnr(x, volume.image) for x in mine])))
        foreground.append(float(np.mean([psnr(x, volume.image, volume.label) for x in mine])))
    return whole, foreground


def reconstruction(run: Path, held_out: list[Volume]) -> dict[str, list[float]]:
    """The autoencoder's PSNR and 2D SSIM per held-out case, over its slices with foreground."""
    codec, _, _ = load_model(run / "autoencoder.safetensors")
    metric = SSIMMetric(spatial_dims=2, data_range=2.0, win_size=7)
    scores: dict[str, list[float]] = {"psnr": [], "ssim": []}
    for volume in held_out:
        keep = volume.label.reshape(volume.label.shape[0], -1).any(axis=1)
        slices = torch.from_numpy(np.ascontiguousarray(volume.image[keep], dtype=np.float32))[:, None]
        recon = decode_slices(codec, encode_slices(codec, slices)).clamp(-1, 1)  # type: ignore[arg-type]
        scores["psnr"].append(psnr(recon[:, 0].numpy(), slices[:, 0].numpy()))
        scores["ssim"].append(float(metric(recon, slices).mean()))
    return scores


def fidelity(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cohort = write_demo_cohort(root / "cohort", sites=3, cases_per_site=6, test_per_site=2, seed=0, pooled=True)
        lines, scores, steps = [], {}, {}
        plans = {
            "tiny": [("slice", args.fidelity * 2 / 3), ("volume", args.fidelity / 3)],
            "tiny_latent": [
                ("autoencoder", args.fidelity / 4),
                ("slice", args.fidelity / 2),
                ("volume", args.fidelity / 4),
            ],
        }
        for name, plan in plans.items():
            cfg = load_config(resolve_config_path(name), {"train.checkpoint_every": CHUNK})
            volumes = load_volumes(cohort / "pooled", cfg.data)
            held_out = load_volumes(cohort / "test", cfg.data)
            started = time.perf_counter()
            steps[name] = _train_for(cfg, volumes, root / name, plan)
            trained = time.perf_counter() - started
            scores[name] = _sample_scores(root / name, held_out, args.seeds)
            print(f"  fidelity {name}: {steps[name]} in {trained:.0f} s", file=sys.stderr, flush=True)
            steps[name]["seconds"] = round(trained)
        recon = reconstruction(root / "tiny_latent", held_out)
    rows = []
    for name in plans:
        whole, foreground = scores[name]
        rows.append([name, json.dumps(steps[name]), _interval(whole), _interval(foreground)])
    difference = [b - a for a, b in zip(scores["tiny"][0], scores["tiny_latent"][0], strict=True)]
    difference_fg = [b - a for a, b in zip(scores["tiny"][1], scores["tiny_latent"][1], strict=True)]
    rows.append(["latent − pixel (paired)", "", _interval(difference), _interval(difference_fg)])
    lines.append(
        f"# fidelity: equal training time ({args.fidelity:.0f} s per model), demo cohort 3 sites x 6 cases pooled, "
        f"{len(held_out)} held-out cases x {args.seeds} seed(s), own real informed slice: "
        + json.dumps(machine(args.threads))
    )
    headers = ["model", "steps per stage (and seconds)", "PSNR dB, mean [95% CI]", "foreground PSNR dB"]
    lines.append(markdown_table(headers, rows))
    lines.append(
        f"# reconstruction (tiny_latent autoencoder, {steps['tiny_latent']['autoencoder']} steps), "
        f"{len(held_out)} held-out cases, slices with foreground"
    )
    lines.append(
        markdown_table(
            ["autoencoder", "PSNR dB, mean [95% CI]", "SSIM, mean [95% CI]"],
            [["tiny_latent (f = 4, 4 x 8 x 8)", _interval(recon["psnr"]), _interval(recon["ssim"])]],
        )
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cost", action="store_true", help="sampling time and memory at 256² and 512², latent vs pixel"
    )
    parser.add_argument("--window", type=int, default=4, help="cost: slices of the sampled window (default 4)")
    parser.add_argument("--steps", type=int, default=1, help="cost: sampler steps (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-cap", type=float, default=16.0, help="cost: GiB; a worker above it is stopped")
    parser.add_argument("--timeout", type=float, default=900.0, help="cost: seconds allowed per worker")
    parser.add_argument("--fidelity", type=float, default=0.0, metavar="SECONDS", help="training seconds per model")
    parser.add_argument("--seeds", type=int, default=2, help="fidelity: samples per held-out case (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        emit(cost_worker(json.loads(args.worker)))
        return 0
    if not args.cost and not args.fidelity:
        parser.error("choose --cost and/or --fidelity SECONDS")
    if args.cost:
        print(cost(args), flush=True)
    if args.fidelity:
        print(fidelity(args), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(report_errors("benchmark latent", main))
