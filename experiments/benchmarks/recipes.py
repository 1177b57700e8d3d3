"""Which training recipe gives the best samples? ε-DDPM vs v + Min-SNR vs rectified flow (issue 18.2).

On a pooled multi-scanner demo cohort (``write_demo_cohort(pooled=True)``, the demo's public data
recipe: ``--sites`` simulated scanners x ``--cases`` training patients), each recipe
trains the same network from the same seed for the same steps (slice ``--slice-steps``, volume
``--volume-steps``; the wall time of each is printed beside it), and a mask-only twin
(``model.informed_slice = false``, same recipe and steps) shows what the informed slice adds.
The held-out cases come from ``--heldout-scanners`` OTHER simulated scanners (a cohort of another
seed, ``--test`` patients each), as the demo's sites are to its public pre-training: the informed
slice has to carry an appearance the model has not seen. ``rflow-noaug`` is ``rflow`` without the
appearance augmentation (``train.appearance_log_gamma = 0``; tiny's default is 0.5).
Every held-out case is then generated from its own mask and its own real informed slice (the
protocol's ``default_start``), with ``--seeds`` sampler seeds, at each sampler step count of
``--steps``, and scored against the real case:

* ``psnr``: whole-volume PSNR (dB, [-1, 1] range);
* ``err`` / ``err0``: per-label mean-intensity error over the labelled structures, with the
  informed slice (GEM-3D) and without (the mask-only twin); ``ratio`` = mean err / mean err0
  over the cases, its interval a bootstrap over cases (2000 resamples, seeded);
* ``bg``: standard deviation of the background (label 0) of the sample / of the real case;
* ``bg_hf``: the same for the high-frequency part (the volume minus its 3x3x3 mean), which is
  what salt-and-pepper noise raises;
* ``seam``: ``seam_ratio`` at the sampler's window boundaries (1 = no seam).

Means over cases x seeds with 95% t-intervals over the cases (each case's mean over seeds).
Writes ``--out`` (JSON) and ``--png`` (the curves against sampler steps).

    .venv/bin/python experiments/benchmarks/recipes.py [--slice-steps 1200] [--volume-steps 150]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo's packages before this folder's scripts

from experiments.benchmarks import machine, markdown_table
from experiments.commands.runner import report_errors
from experiments.configs import resolve_config_path
from experiments.evaluation.appearance import background_noise, label_intensity_error
from experiments.evaluation.consistency import seam_ratio
from experiments.evaluation.downstream import t_interval
from experiments.evaluation.fidelity import psnr
from experiments.evaluation.protocol import seam_boundaries
from gem3d.config import Config, load_config
from gem3d.data.dataset import load_volumes
from gem3d.data.demo_cohort import write_demo_cohort
from gem3d.data.volume import Volume
from gem3d.runs import train_stage
from gem3d.sampler import InformedSlice, SampleRequest, default_start, plan_windows, sample_volumes
from gem3d.synthesis import load_synthesiser
from server.settings import parse_set

RECIPES = {
    "ddpm-eps": "diffusion.process=ddpm diffusion.prediction_type=epsilon",
    "ddpm-eps-minsnr": "diffusion.process=ddpm diffusion.prediction_type=epsilon diffusion.loss_weighting=min_snr",
    "ddpm-v-minsnr": "diffusion.process=ddpm diffusion.prediction_type=v_prediction diffusion.loss_weighting=min_snr",
    "rflow": "diffusion.process=rflow diffusion.prediction_type=v_prediction",
    "rflow-noaug": "diffusion.process=rflow diffusion.prediction_type=v_prediction train.appearance_log_gamma=0",
}
# The demo's public pre-training settings (experiments/demo.py, PRETRAIN_SET) on the tiny config.
BASE = "train.batch_size=4 train.lr=1e-3"


def config_for(recipe: str, informed: bool) -> Config:
    # A mask-only model is never augmented (gem3d.training.draw_inputs); saying so in its config
    # makes twins that train identically equal, so they are trained once (``measure``).
    text = f"{BASE} {RECIPES[recipe]}" + (
        "" if informed else " model.informed_slice=false train.appearance_log_gamma=0"
    )
    return load_config(resolve_config_path("tiny"), parse_set(text))


def train_recipe(cfg: Config, volumes: list[Volume], run: Path, slice_steps: int, volume_steps: int) -> float:
    """Train the slice and volume stages into ``run``; returns the wall time in seconds."""
    started = time.perf_counter()
    train_stage(cfg, volumes, "slice", run, steps=slice_steps)
    train_stage(cfg, volumes, "volume", run, steps=volume_steps)
    return time.perf_counter() - started


def score(synthetic: np.ndarray, real: Volume, boundaries: list[int]) -> dict[str, float]:
    noise = background_noise(synthetic, real.image, real.label)
    return {
        "psnr": psnr(synthetic, real.image),
        "err": label_intensity_error(synthetic, real.image, real.label)["foreground_mean"],
        "bg": noise["std_ratio"],
        "bg_hf": noise["hf_std_ratio"],
        "seam": seam_ratio(synthetic, boundaries),
    }


def generate(run: Path, cases: list[Volume], steps: int, seeds: list[int]) -> list[list[np.ndarray]]:
    """``[case][seed]`` volumes of ``run`` at ``steps`` sampler steps, each from the case's own informed slice."""
    synth = load_synthesiser(run, steps=steps)
    cfg = synth.cfg
    requests = []
    for case in cases:
        z = default_start(case.label)
        informed = InformedSlice(case.image[z], case.label[z], "real", {"case": case.case_id})
        requests += [SampleRequest(case.label, informed, z, seed) for seed in seeds]
    out = sample_volumes(
        synth.volume_model, synth.sampler, requests, cfg.data.window, cfg.sampler.overlap, cfg.sampler.batch_volumes
    )
    return [out[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(cases))]


def summarise(per_case: list[float]) -> dict[str, Any]:
    low, high = t_interval(per_case)
    return {"mean": float(np.mean(per_case)), "ci": [low, high], "n": len(per_case)}


def ratio_of_means(numerator: list[float], denominator: list[float], resamples: int = 2000) -> dict[str, Any]:
    """mean(numerator) / mean(denominator) over paired cases, with a 95% bootstrap interval over cases."""
    a, b = np.asarray(numerator), np.asarray(denominator)
    rng = np.random.default_rng(0)
    picks = rng.integers(len(a), size=(resamples, len(a)))
    ratios = a[picks].mean(axis=1) / b[picks].mean(axis=1)
    low, high = np.percentile(ratios, (2.5, 97.5))
    return {"mean": float(a.mean() / b.mean()), "ci": [float(low), float(high)], "n": len(a)}


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data = write_demo_cohort(
        work / "data", sites=args.sites, cases_per_site=args.cases, test_per_site=0, seed=1, pooled=True
    )
    heldout = write_demo_cohort(
        work / "heldout", sites=args.heldout_scanners, cases_per_site=1, test_per_site=args.test, seed=0
    )
    probe = config_for("ddpm-eps", True)
    volumes = load_volumes(data / "pooled", probe.data)
    cases = sorted(load_volumes(heldout / "test", probe.data), key=lambda v: v.case_id)
    seeds = list(range(args.seeds))
    results: dict[str, Any] = {}
    trained: dict[str, tuple[Path, float]] = {}  # config JSON -> (run, seconds): identical configs train once
    for recipe in args.recipes:
        runs, seconds = {}, {}
        for informed in (True, False):
            name = f"{recipe}{'' if informed else '-mask-only'}"
            cfg = config_for(recipe, informed)
            key = cfg.model_dump_json()
            if key not in trained:
                print(f"[recipes] training {name}", file=sys.stderr, flush=True)
                volume_steps = args.volume_steps if informed else args.mask_only_volume_steps
                elapsed = train_recipe(cfg, volumes, work / name, args.slice_steps, volume_steps)
                trained[key] = (work / name, elapsed)
            runs[informed], seconds[name] = trained[key]
        rows = {}
        for steps in args.steps:
            print(f"[recipes] sampling {recipe} at {steps} steps", file=sys.stderr, flush=True)
            with_informed = generate(runs[True], cases, steps, seeds)
            without = generate(runs[False], cases, steps, seeds)
            metrics: dict[str, list[float]] = {k: [] for k in ("psnr", "err", "err0", "bg", "bg_hf", "seam")}
            for case, ours, theirs in zip(cases, with_informed, without, strict=True):
                start = default_start(case.label)
                plan = [
                    w
                    for r in plan_windows(case.label.shape[0], start, probe.data.window, probe.sampler.overlap)
                    for w in r
                ]
                boundaries = seam_boundaries(plan, case.label.shape[0])
                scored = [score(v, case, boundaries) for v in ours]
                err0 = float(
                    np.mean([label_intensity_error(v, case.image, case.label)["foreground_mean"] for v in theirs])
                )
                for key in ("psnr", "err", "bg", "bg_hf", "seam"):
                    metrics[key].append(float(np.mean([s[key] for s in scored])))
                metrics["err0"].append(err0)
            rows[steps] = {key: summarise(values) for key, values in metrics.items() if key != "ratio"}
            rows[steps]["ratio"] = ratio_of_means(metrics["err"], metrics["err0"])
        results[recipe] = {"train_seconds": seconds, "by_steps": rows}
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("psnr", "PSNR (dB)"),
        ("ratio", "intensity error: informed / mask-only"),
        ("bg", "background std / real"),
        ("bg_hf", "background HF std / real"),
        ("seam", "seam ratio"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for recipe, result in results.items():
            steps = sorted(int(s) for s in result["by_steps"])
            means = [result["by_steps"][s][key]["mean"] for s in steps]
            lows = [result["by_steps"][s][key]["ci"][0] or m for s, m in zip(steps, means, strict=True)]
            highs = [result["by_steps"][s][key]["ci"][1] or m for s, m in zip(steps, means, strict=True)]
            ax.plot(steps, means, marker="o", label=recipe)
            ax.fill_between(steps, lows, highs, alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("sampler steps")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def table(results: dict[str, Any]) -> str:
    def cell(entry: dict[str, Any], digits: int = 3) -> str:
        low, high = entry["ci"]
        interval = f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None else ""
        return f"{entry['mean']:.{digits}f}{interval}"

    rows = []
    for recipe, result in results.items():
        for steps, row in sorted(result["by_steps"].items(), key=lambda item: int(item[0])):
            rows.append(
                [
                    recipe,
                    steps,
                    cell(row["psnr"], 2),
                    cell(row["err"]),
                    cell(row["err0"]),
                    cell(row["ratio"], 2),
                    cell(row["bg"], 2),
                    cell(row["bg_hf"], 2),
                    cell(row["seam"], 3),
                ]
            )
    headers = [
        "recipe",
        "steps",
        "PSNR dB",
        "err (informed)",
        "err (mask-only)",
        "ratio",
        "bg std ratio",
        "bg HF std ratio",
        "seam ratio",
    ]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--sites", type=int, default=4, help="simulated scanners of the pooled cohort")
    parser.add_argument("--cases", type=int, default=4, help="training patients per scanner")
    parser.add_argument("--heldout-scanners", type=int, default=3, help="unseen scanners of the held-out cases")
    parser.add_argument("--test", type=int, default=3, help="held-out patients per unseen scanner")
    parser.add_argument("--slice-steps", type=int, default=1200)
    parser.add_argument("--volume-steps", type=int, default=150)
    parser.add_argument("--mask-only-volume-steps", type=int, default=30)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50], help="sampler steps")
    parser.add_argument("--seeds", type=int, default=2, help="sampler seeds per case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("recipes.json"))
    parser.add_argument("--png", type=Path, default=Path("recipes.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        results = measure(args, Path(work))
    record = {"machine": machine(args.threads), "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    args.out.write_text(json.dumps(record, indent=2))
    plot(results, args.png)
    for recipe, result in results.items():
        times = ", ".join(f"{k} {v:.0f} s" for k, v in result["train_seconds"].items())
        print(f"{recipe}: training wall time {times}")
    print(table(results))


if __name__ == "__main__":
    raise SystemExit(report_errors("benchmark recipes", main))
