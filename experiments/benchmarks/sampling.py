"""Sampling cost per volume: our windowed sampler against full-3D diffusion (issue 4, item 7).

One run measures, each configuration in a fresh subprocess (so its peak memory is its own):

* **ours**: ``gem3d.sampler.sample_volumes`` with the inflated ``SliceDenoiser`` built from the
  config's model section (untrained: time and memory do not depend on the weights), W and h from
  the config, one volume at a time, ``--steps`` DDIM steps, for depths ``--depths`` at in-plane
  ``--size``, and at 96^3. Network calls, window evaluations and slice evaluations are counted by
  a hook on the network.
* **full-3D baseline**: MONAI ``DiffusionModelUNet(spatial_dims=3)`` with the same channels,
  attention levels, res blocks and conditioning channels, one denoising step per sampler step over
  the whole volume. It runs ``--baseline-steps`` steps (every step is the same work, so seconds
  per volume at ``--steps`` are scaled linearly from them) and is stopped above ``--memory-cap``
  GiB or ``--timeout`` seconds: those depths are reported as not fitting.
* **evaluations per volume** from ``plan_windows`` for the bundled configs' recipes
  (``diffusion.inference_steps``, ``data.window``, ``sampler.overlap``) against the reference
  recipe (DDIM 200 steps, W=16, h=1): window evaluations = windows x steps, slice evaluations =
  windows x W x steps (the compute that matters).

Peak memory (CPU) is the RSS high-water mark above the RSS with the network and inputs built.

On CUDA the network runs with the config's fast path (``gem3d.accel``), peak memory is
``torch.cuda.max_memory_allocated``, and the table adds volumes/hour at the config's own recipe
(``diffusion.inference_steps``; seconds scaled linearly from ``--steps``, every step being the
same work). A brats volume of 155 slices: ``--config brats --size 128 --depths 155 --device cuda``.

    .venv/bin/python experiments/benchmarks/sampling.py [--config tiny] [--size 64] [--steps 2]
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
from monai.networks.nets import DiffusionModelUNet

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks import emit, machine, markdown_table, peak_bytes, positive_ints, reset_peak, run_worker
from experiments.commands.runner import report_errors
from experiments.configs import resolve_config_path
from experiments.evaluation.fidelity import psnr
from gem3d.accel import accelerate
from gem3d.config import Config, load_config
from gem3d.data.dataset import load_volumes
from gem3d.data.phantoms import make_phantom, write_phantom_dataset
from gem3d.data.volume import Volume
from gem3d.diffusion import make_sampler
from gem3d.networks import SliceDenoiser, condition_channels
from gem3d.runs import load_model, train_stage
from gem3d.sampler import InformedSlice, SampleRequest, default_start, plan_windows, sample_volumes

REFERENCE = {"steps": 200, "window": 16, "overlap": 1}
RECIPE_CONFIGS = ("tiny", "brats", "abdomenct1k")
Recipe = tuple[str, int, int, int]  # (name, DDIM steps, W, h)


def phantom_mask(depth: int, size: int, num_labels: int) -> np.ndarray:
    """``[D, H, W]`` label ids of a phantom (slice axis first, as in the model grid)."""
    _, label = make_phantom((size, size, depth), num_labels, seed=0)
    return np.ascontiguousarray(np.moveaxis(label, 2, 0))


def count_evaluations(model: torch.nn.Module) -> dict[str, int]:
    """Counters of the network's calls, window and slice evaluations, kept by a forward pre-hook."""
    counts = {"calls": 0, "window_evals": 0, "slice_evals": 0}

    def count(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]  # [N, 1, L, H, W]: N windows of L slices
        counts["calls"] += 1
        counts["window_evals"] += x.shape[0]
        counts["slice_evals"] += x.shape[0] * x.shape[2]

    model.register_forward_pre_hook(count)
    return counts


def reset_counts(counts: dict[str, int]) -> None:
    """Set every counter of ``count_evaluations`` back to zero."""
    for key in counts:
        counts[key] = 0


def ours(cfg: Config, depth: int, size: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Sample one volume with the windowed sampler; count network calls and evaluations."""
    model = SliceDenoiser(cfg.model, cfg.data.num_labels)
    model.inflate()
    model = accelerate(model, cfg.accel, device).eval()
    counts = count_evaluations(model)
    mask = phantom_mask(depth, size, cfg.data.num_labels)
    start = depth // 2
    informed = InformedSlice(np.zeros((size, size), np.float32), mask[start], "real")
    request = SampleRequest(mask=mask, informed=informed, start=start, seed=0)
    sampler = make_sampler(cfg.diffusion, steps)
    if device.type == "cuda":  # warm-up, not timed: kernel selection and the allocator's first blocks
        sample_volumes(model, make_sampler(cfg.diffusion, 1), [request], cfg.data.window, cfg.sampler.overlap, 1)
        reset_counts(counts)
    baseline = reset_peak(device)
    started = time.perf_counter()
    sample_volumes(model, sampler, [request], cfg.data.window, cfg.sampler.overlap, batch_volumes=1)
    seconds = time.perf_counter() - started
    peak = peak_bytes(device)
    windows = sum(len(round_) for round_ in plan_windows(depth, start, cfg.data.window, cfg.sampler.overlap))
    return {"seconds": seconds, "steps": steps, "peak": peak, "baseline": baseline, "windows": windows, **counts}


def full3d(cfg: Config, depth: int, size: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Denoise one whole volume ``[1, 1, D, H, W]`` with a 3D U-Net of the same width."""
    m = cfg.model
    in_channels = 1 + condition_channels(m, cfg.data.num_labels)
    torch.manual_seed(0)
    net = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=1,
        channels=m.channels,
        attention_levels=m.attention_levels,
        num_res_blocks=m.num_res_blocks,
        norm_num_groups=m.norm_num_groups,
        num_head_channels=m.num_head_channels,
    )
    net = net.to(device).eval()
    x = torch.randn(1, 1, depth, size, size, device=device)
    cond = torch.randn(1, in_channels - 1, depth, size, size, device=device)
    sampler = make_sampler(cfg.diffusion, steps)
    baseline = reset_peak(device)
    started = time.perf_counter()
    with torch.no_grad():
        for step, t in enumerate(sampler.timesteps):
            output = net(torch.cat([x, cond], dim=1), torch.full((1,), t, dtype=torch.long, device=device))
            x = sampler.step(output, step, x)
    seconds = time.perf_counter() - started
    peak = peak_bytes(device)
    return {"seconds": seconds, "steps": steps, "peak": peak, "baseline": baseline, "calls": steps}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    cfg = load_config(resolve_config_path(spec["config"]), {"train.device": spec["device"]})
    device = torch.device(spec["device"])
    measure = ours if spec["kind"] == "ours" else full3d
    result = measure(cfg, spec["depth"], spec["size"], spec["steps"], device)
    above = result["peak"] - result["baseline"] if device.type == "cpu" else result["peak"]
    return {**result, "peak_mib": above / 2**20, "threads": torch.get_num_threads()}


def evaluations(depth: int, steps: int, window: int, overlap: int) -> tuple[int, int, int]:
    """``(windows, window evaluations, slice evaluations)`` of one volume of ``depth`` slices."""
    plan = plan_windows(depth, depth // 2, window, overlap)
    windows = sum(len(round_) for round_ in plan)
    length = min(window, depth)
    return windows, windows * steps, windows * length * steps


def evaluation_table(depths: list[int]) -> tuple[str, list[dict[str, Any]]]:
    """Evaluations per volume of each bundled config's recipe against the reference recipe."""
    rows, records = [], []
    for name in RECIPE_CONFIGS:
        cfg = load_config(resolve_config_path(name))
        steps, window, overlap = cfg.diffusion.inference_steps, cfg.data.window, cfg.sampler.overlap
        for depth in depths:
            ours_counts = evaluations(depth, steps, window, overlap)
            ref = evaluations(depth, REFERENCE["steps"], REFERENCE["window"], REFERENCE["overlap"])
            window_ratio, slice_ratio = ref[1] / ours_counts[1], ref[2] / ours_counts[2]
            met = "met" if slice_ratio >= 8 else "not met"
            rows.append(
                [
                    name,
                    f"DDIM {steps}, W={window}, h={overlap}",
                    depth,
                    f"{ours_counts[0]} / {ref[0]}",
                    f"{ours_counts[1]} / {ref[1]}",
                    f"{window_ratio:.2f}x",
                    f"{ours_counts[2]} / {ref[2]}",
                    f"{slice_ratio:.2f}x",
                    met,
                ]
            )
            records.append({"config": name, "depth": depth, "ours": ours_counts, "reference": ref})
    headers = ["config", "our recipe", "depth", "windows ours / ref", "window evals ours / ref"]
    headers += ["fewer window evals", "slice evals ours / ref", "fewer slice evals", "target >= 8x"]
    return markdown_table(headers, rows), records


def fidelity_model(
    config: str, train_steps: int, root: Path, run: Path | None, data: Path | None
) -> tuple[SliceDenoiser, Config, Path, str, list[Volume]]:
    """The model, config, run, stage and held-out cases (without ``run``: trained on phantoms in ``root``)."""
    if run is None:
        cfg = load_config(resolve_config_path(config), {"train.device": "cpu"})
        train_dir = write_phantom_dataset(root / "train", 8, (32, 32, 24), cfg.data.num_labels, seed=0)
        data = write_phantom_dataset(root / "test", 3, (32, 32, 24), cfg.data.num_labels, seed=1)
        volumes = load_volumes(train_dir, cfg.data)
        train_stage(cfg, volumes, "slice", root / "run", steps=train_steps)
        train_stage(cfg, volumes, "volume", root / "run", steps=train_steps // 2)
        run = root / "run"
    stage = "volume" if (run / "volume.safetensors").exists() else "slice"
    model, cfg, _ = load_model(run / f"{stage}.safetensors")
    assert data is not None
    test = data / "test" if (data / "test" / "labelsTr").is_dir() else data
    held_out = load_volumes(test, cfg.data)
    assert isinstance(model, SliceDenoiser)
    return model, cfg, run, stage, held_out


def fidelity_requests(held_out: list[Volume], seeds: int) -> list[SampleRequest]:
    """``seeds`` requests per held-out case, each from its own mask and real informed slice."""
    requests = []
    for index, volume in enumerate(held_out):
        start = default_start(volume.label)
        informed = InformedSlice(volume.image[start], volume.label[start], "real")
        for seed in range(seeds):
            requests.append(SampleRequest(volume.label, informed, start, seed=1000 * seed + index))
    return requests


def fidelity_recipes(cfg: Config, sweep: list[int] | None) -> list[Recipe]:
    """The config's recipe, the ``sweep`` step counts at its W and h, and the reference recipe(s)."""
    own = (cfg.diffusion.inference_steps, cfg.data.window, cfg.sampler.overlap)
    recipes = [("ours", *own)]
    recipes += [("sweep", steps, own[1], own[2]) for steps in sweep or [] if steps != own[0]]
    if own[1] != REFERENCE["window"]:  # the reference's steps and overlap at the window the model was trained on
        recipes.append(("reference at our W", REFERENCE["steps"], own[1], REFERENCE["overlap"]))
    recipes.append(("reference", REFERENCE["steps"], REFERENCE["window"], REFERENCE["overlap"]))
    return recipes


def score_recipe(
    model: SliceDenoiser,
    cfg: Config,
    recipe: Recipe,
    requests: list[SampleRequest],
    truth: list[Volume],
    counts: dict[str, int],
) -> dict[str, Any]:
    """Sample every request with one recipe; its PSNR (whole, foreground), evaluations per volume and seconds."""
    name, recipe_steps, window, overlap = recipe
    reset_counts(counts)
    started = time.perf_counter()
    sampler = make_sampler(cfg.diffusion, recipe_steps)
    synthetic = sample_volumes(model, sampler, requests, window, overlap, batch_volumes=len(requests))
    seconds = time.perf_counter() - started
    whole = [psnr(out, v.image) for out, v in zip(synthetic, truth, strict=True)]
    foreground = [psnr(out, v.image, v.label) for out, v in zip(synthetic, truth, strict=True)]
    return {
        "recipe": name,
        "steps": recipe_steps,
        "window": window,
        "overlap": overlap,
        "psnr": whole,
        "mean_psnr": float(np.mean(whole)),
        "mean_psnr_foreground": float(np.mean(foreground)),
        "window_evals_per_volume": counts["window_evals"] / len(requests),
        "slice_evals_per_volume": counts["slice_evals"] / len(requests),
        "seconds": seconds,
    }


def fidelity(
    config: str,
    train_steps: int,
    threads: int,
    run: Path | None = None,
    data: Path | None = None,
    sweep: list[int] | None = None,
    seeds: int = 1,
) -> list[dict[str, Any]]:
    """PSNR and network evaluations of several sampler recipes with one trained model, held-out cases.

    The model is ``run``'s volume stage (its slice stage if it has none) and the held-out cases
    are ``data`` (a dataset, or a cohort root with ``test/``). Without ``run``, the config is
    trained ``train_steps`` (slice) + ``train_steps // 2`` (volume) steps on 8 phantoms and 3
    held-out phantoms are used. Each case is sampled from its own mask and real informed slice (at
    ``default_start``) with ``seeds`` seeds per recipe, batched, and scored with the evaluation
    protocol's ``psnr`` over the whole volume and the foreground. Recipes: the config's (DDIM
    ``diffusion.inference_steps``, W, h), the same W and h at each step count of ``sweep``, and the
    reference (DDIM 200, W=16, h=1), and when the model's W is not 16 the reference's steps and
    overlap at the model's W (a model trained on W=8 windows never saw 16 slices). Evaluations are
    counted by a hook on the network.
    """
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, cfg, run, stage, held_out = fidelity_model(config, train_steps, Path(tmp), run, data)
    requests = fidelity_requests(held_out, seeds)
    truth = [held_out[i // seeds] for i in range(len(requests))]
    counts = count_evaluations(model)
    records = []
    for recipe in fidelity_recipes(cfg, sweep):
        scores = score_recipe(model, cfg, recipe, requests, truth, counts)
        depths = [v.label.shape[0] for v in held_out]
        records.append({**scores, "depths": depths, "run": str(run), "stage": stage, "seeds": seeds})
        name, recipe_steps, window, overlap = recipe
        print(f"  {name} DDIM {recipe_steps}, W={window}, h={overlap}: {scores['mean_psnr']:.2f} dB", file=sys.stderr)
    return records


def fidelity_table(records: list[dict[str, Any]]) -> str:
    """Markdown: each recipe's PSNR, evaluations per volume and the ratio against the reference."""
    reference = next(r for r in records if r["recipe"] == "reference")
    rows = []
    for r in records:
        fewer = reference["window_evals_per_volume"] / r["window_evals_per_volume"]
        fewer_slices = reference["slice_evals_per_volume"] / r["slice_evals_per_volume"]
        rows.append(
            [
                r["recipe"],
                f"DDIM {r['steps']}, W={r['window']}, h={r['overlap']}",
                f"{r['mean_psnr']:.2f}",
                f"{r['mean_psnr'] - reference['mean_psnr']:+.2f}",
                f"{r['mean_psnr_foreground']:.2f}",
                f"{r['window_evals_per_volume']:.0f}",
                f"{fewer:.1f}x / {fewer_slices:.1f}x",
                f"{r['seconds']:.1f}",
            ]
        )
    headers = ["recipe", "sampler", "mean PSNR dB", "vs reference dB", "foreground PSNR dB"]
    headers += ["window evals / volume", "fewer window / slice evals", "seconds (all volumes)"]
    return markdown_table(headers, rows)


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="config whose model, W and h are measured (default tiny)")
    parser.add_argument("--size", type=int, default=64, help="in-plane size H = W of the depth sweep (default 64)")
    parser.add_argument("--depths", type=positive_ints, default="32,64,128,256", help="depths of the sweep")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps per volume (default 2)")
    parser.add_argument("--baseline-steps", type=int, default=1, help="DDIM steps actually run by the 3D baseline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--memory-cap", type=float, default=8.0, help="GiB; a baseline above it is stopped")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds allowed per measurement")
    parser.add_argument("--no-baseline", action="store_true", help="skip the full-3D baseline")
    parser.add_argument("--no-cube", action="store_true", help="skip the 96^3 point (only the --depths sweep)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--fidelity",
        type=int,
        default=0,
        metavar="STEPS",
        help="only: train the config STEPS (slice) + STEPS/2 (volume) steps on phantoms, then compare "
        "the PSNR of our recipe and the reference recipe on held-out phantoms",
    )
    parser.add_argument("--fidelity-run", type=Path, help="only the fidelity comparison, with this trained run")
    parser.add_argument("--fidelity-data", type=Path, help="held-out cases for --fidelity-run (dataset or cohort)")
    parser.add_argument(
        "--fidelity-steps", type=positive_ints, default=None, help="also sweep these DDIM step counts at our W and h"
    )
    parser.add_argument("--seeds", type=int, default=1, help="fidelity: samples per held-out case and recipe")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args()


def print_fidelity_verdicts(records: list[dict[str, Any]]) -> None:
    """Our recipe against each reference recipe: fewer slice evaluations, PSNR gap, and the target."""
    ours = records[0]
    for reference in [r for r in records if r["recipe"].startswith("reference")]:
        gap = ours["mean_psnr"] - reference["mean_psnr"]
        fewer = reference["slice_evals_per_volume"] / ours["slice_evals_per_volume"]
        verdict = "met" if fewer >= 8 and gap >= -0.5 else "not met"
        print(
            f"ours vs {reference['recipe']}: {fewer:.1f}x fewer slice evaluations, {gap:+.2f} dB "
            f"(target >= 8x at >= -0.5 dB: {verdict})"
        )


def run_fidelity(args: argparse.Namespace) -> None:
    """The fidelity comparison alone (``--fidelity`` or ``--fidelity-run``): its table, verdicts and JSON."""
    sweep = args.fidelity_steps or []
    records = fidelity(
        args.config, args.fidelity, args.threads, args.fidelity_run, args.fidelity_data, sweep, args.seeds
    )
    print(f"# sampling fidelity: {json.dumps(machine(args.threads))}")
    print(f"# model: {records[0]['run']} ({records[0]['stage']} stage), {records[0]['seeds']} seed(s) per case")
    print(fidelity_table(records))
    print_fidelity_verdicts(records)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(args.threads), "fidelity": records}, indent=2))


def sweep_points(args: argparse.Namespace, depths: list[int]) -> list[tuple[int, int]]:
    """``(depth, in-plane size)`` of each measured volume: the depth sweep, then 96^3 unless ``--no-cube``."""
    return [(depth, args.size) for depth in depths] + ([] if args.no_cube else [(96, 96)])


def measure_points(args: argparse.Namespace, points: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Ours (and the full-3D baseline unless ``--no-baseline``) at each point, each in a fresh subprocess."""
    cap = int(args.memory_cap * 2**30)
    base = {"config": args.config, "device": args.device, "threads": args.threads}
    results: list[dict[str, Any]] = []
    for depth, size in points:
        row: dict[str, Any] = {"depth": depth, "size": size}
        spec = {**base, "kind": "ours", "depth": depth, "size": size, "steps": args.steps}
        row["ours"] = run_worker(Path(__file__), spec, args.timeout, cap)
        if not args.no_baseline:
            spec = {**base, "kind": "full3d", "depth": depth, "size": size, "steps": args.baseline_steps}
            row["full3d"] = run_worker(Path(__file__), spec, args.timeout, cap)
        print(f"  depth {depth} at {size}x{size}: done", file=sys.stderr, flush=True)
        results.append(row)
    return results


def timing_cells(result: dict[str, Any] | None, steps: int) -> list[str]:
    """s/volume at ``steps`` steps, s/step and peak MiB of one measurement, or why it has none."""
    if result is None:
        return ["-", "-", "-"]
    if "error" in result:
        return [f"did not fit: {result['error']}", "-", "-"]
    per_step = result["seconds"] / result["steps"]
    return [f"{per_step * steps:.1f}", f"{per_step:.2f}", f"{result['peak_mib']:.0f}"]


def volumes_per_hour(result: dict[str, Any], recipe_steps: int) -> str:
    """Our volumes/hour at the config's recipe, seconds scaled linearly from the measured steps."""
    if "error" in result:
        return "-"
    seconds = result["seconds"] / result["steps"] * recipe_steps
    return f"{3600 / seconds:.0f} ({seconds:.1f} s/volume at {recipe_steps} steps)"


def sweep_row(point: dict[str, Any], steps: int, recipe_steps: int | None) -> list[Any]:
    """One volume's row of the sweep table; ``recipe_steps`` (CUDA only) adds volumes/hour."""
    depth, size = point["depth"], point["size"]
    ours_r, full_r = point["ours"], point.get("full3d")
    nfe = "-" if "error" in ours_r else f"{ours_r['calls']} / {ours_r['window_evals']} / {ours_r['slice_evals']}"
    ratio = "-"
    if full_r is not None and "error" not in full_r and "error" not in ours_r:
        ratio = f"{full_r['peak_mib'] / max(ours_r['peak_mib'], 1e-9):.1f}x"
    per_hour = [] if recipe_steps is None else [volumes_per_hour(ours_r, recipe_steps)]
    cells = [*timing_cells(ours_r, steps), nfe, *timing_cells(full_r, steps), ratio, *per_hour]
    return [f"{depth}x{size}x{size}", *cells]


def sweep_headers(args: argparse.Namespace) -> list[str]:
    """Column headers of the sweep table."""
    headers = [
        "volume D x H x W",
        f"ours s/volume ({args.steps} steps)",
        "ours s/step",
        "ours peak MiB",
        "ours calls / window evals / slice evals",
        f"full-3D s/volume ({args.steps} steps)",
        "full-3D s/step",
        "full-3D peak MiB",
        "full-3D / ours peak memory",
    ]
    if args.device.startswith("cuda"):
        headers.append("ours volumes/hour (config recipe)")
    return headers


def print_sweep(args: argparse.Namespace, info: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """The header lines and the table of seconds, evaluations and peak memory per volume."""
    cfg = load_config(resolve_config_path(args.config))
    print(f"# sampling: {json.dumps(info)}")
    print(
        f"# ours: {args.config} model (channels {list(cfg.model.channels)}), W={cfg.data.window}, "
        f"h={cfg.sampler.overlap}, one volume at a time; {args.steps} DDIM steps per volume "
        f"(full-3D: {args.baseline_steps} steps run, seconds scaled to {args.steps})"
    )
    recipe_steps = cfg.diffusion.inference_steps if args.device.startswith("cuda") else None
    rows = [sweep_row(point, args.steps, recipe_steps) for point in results]
    print(markdown_table(sweep_headers(args), rows))


def print_memory_verdicts(results: list[dict[str, Any]], size: int) -> None:
    """Our peak memory at 256 vs 64 slices, and full-3D vs ours at 96^3, against their targets."""
    by_point = {(r["depth"], r["size"]): r["ours"] for r in results}
    low, high = by_point.get((64, size)), by_point.get((256, size))
    if low and high and "error" not in low and "error" not in high:
        flat = high["peak_mib"] / low["peak_mib"]
        verdict = "met" if flat <= 1.1 else "not met"
        print(f"\nours peak memory 256 vs 64 slices: {flat:.3f}x (target <= 1.1x: {verdict})")
    cube = next((r for r in results if (r["depth"], r["size"]) == (96, 96)), None)
    if cube is not None and "full3d" in cube and "error" not in cube["full3d"] and "error" not in cube["ours"]:
        ratio = cube["full3d"]["peak_mib"] / cube["ours"]["peak_mib"]
        verdict = "met" if ratio >= 10 else "not met"
        print(f"full-3D / ours peak memory at 96^3: {ratio:.1f}x (target >= 10x: {verdict})")


def run_sweep(args: argparse.Namespace) -> None:
    """The depth sweep (ours against full-3D), its verdicts, the evaluation table and the JSON."""
    depths = args.depths
    results = measure_points(args, sweep_points(args, depths))
    info = machine(args.threads)
    print_sweep(args, info, results)
    print_memory_verdicts(results, args.size)
    table, records = evaluation_table(depths if args.no_cube else [*depths, 96])
    print(f"\n# evaluations per volume, start at D/2, against the reference recipe {REFERENCE}")
    print(table)
    if args.json:
        payload = {"machine": info, "args": vars(args) | {"json": str(args.json)}, "results": results}
        args.json.write_text(json.dumps({**payload, "evaluations": records}, indent=2))


def main() -> int:
    """Dispatch: a ``--worker`` measurement, the fidelity comparison, or the depth sweep."""
    args = parse_args()
    if args.worker:
        emit(worker(json.loads(args.worker)))
    elif args.fidelity or args.fidelity_run:
        run_fidelity(args)
    else:
        run_sweep(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(report_errors("benchmark sampling", main))
