"""Is peak memory flat in the size of the cohort? (issue 16, point 3: target max/min <= 1.1 from 10 to 200 cases)

For each cohort size (``--cases``, default 10, 50, 200) and each workload, one fresh subprocess
measures the peak resident memory of:

* ``enhance``: ``gem3d.enhance.enhance`` with ``--informed generate``, one new pair per case: the
  dataset read onto the model grid into a temporary spill (``gem3d.data.spill``: the cases and
  planned masks wait on disk), the informed slices generated (``informed_batch`` per call),
  the volumes sampled ``sampler.batch_volumes`` at a time and each written as its batch ends;
* ``deenhance``: ``gem3d.deenhance.deenhance`` of the cohort with one reference slice (the
  cohort's first image): every case regenerated from its own mask, a batch at a time;
* ``audit``: the memorisation audit of the cohort as synthetic cases, read back from disk a
  chunk at a time as the release does (``RawVolumes``), against a fixed training set and holdout
  (``--reference`` cases each), then membership inference on the cohort (its first half as
  members, the rest as non-members, held in memory before the measurement starts).

The models are the config's networks with untrained, seeded random weights (memory does not
depend on what they learnt); the cases are phantoms (``write_phantom_dataset``). Peak memory is
the process's RSS high-water mark (``VmHWM``, reset when the measured work starts:
``experiments.benchmarks.reset_peak``); the table gives it, and how far it rose above the RSS at
the start (models, libraries and any inputs loaded). The ratios max/min over the sizes are
printed per workload. Evaluation is not measured: it holds its held-out real cases, and its
FID/MMD keep every slice's features (linear in the cohort, a few KB a slice); MMD's pooled
distance matrix is taken ``distribution.MMD_BLOCK`` rows at a time, no longer whole.

    .venv/bin/python experiments/benchmarks/cohort_memory.py [--config tiny] [--cases 10,50,200] [--steps 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks import emit, machine, markdown_table, peak_bytes, positive_ints, reset_peak, run_worker
from experiments.commands.runner import report_errors
from experiments.configs import resolve_config_path
from gem3d.config import Config, load_config
from gem3d.data.dataset import RawVolumes, load_volumes
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.deenhance import deenhance
from gem3d.diffusion import make_sampler
from gem3d.enhance import enhance
from gem3d.informed import SourceSpec
from gem3d.runs import build_model
from gem3d.synthesis import Synthesiser
from privacy.audit import AuditSettings, membership_inference, memorization_audit

WORKLOADS = ("enhance", "deenhance", "audit")
CPU = torch.device("cpu")


def random_model(stage: str, cfg: Config) -> torch.nn.Module:
    """``stage``'s network with every weight moved by seeded noise (a fresh one outputs zeros)."""
    model = build_model(stage, cfg)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (workload, cohort size) measurement; run in its own process."""
    torch.set_num_threads(spec["threads"])
    cfg = load_config(resolve_config_path(spec["config"]))
    root = Path(spec["root"])
    cohort = root / f"cohort_{spec['cases']}"
    if spec["workload"] in ("enhance", "deenhance"):
        volume, informed = random_model("volume", cfg), random_model("informed", cfg)
        synth = Synthesiser(volume, informed, cfg, make_sampler(cfg.diffusion, spec["steps"]), {})  # type: ignore[arg-type]
        reference = SourceSpec("real", sorted((cohort / "imagesTr").glob("*.nii.gz"))[0])
        out = root / f"{spec['workload']}_{spec['cases']}"
        baseline = reset_peak(CPU)
        started = time.perf_counter()
        if spec["workload"] == "enhance":
            enhance(synth, cohort, out, 1, "generate", seed=0)
        else:
            deenhance(synth, cohort, out, reference, seed=0)
    else:
        model = random_model("volume", cfg)
        train = load_volumes(root / "train", cfg.data)
        holdout = load_volumes(root / "holdout", cfg.data)
        cases = load_volumes(cohort, cfg.data)  # membership inference's members and non-members
        half = len(cases) // 2
        settings = AuditSettings(grid=(spec["grid"],) * 3, quantile=0.1)
        baseline = reset_peak(CPU)
        started = time.perf_counter()
        memorization_audit(RawVolumes(cohort, cfg.data), train, holdout, settings)
        membership_inference(model, "volume", cfg, cases[:half], cases[half:], draws=spec["draws"], resamples=200)
    seconds = time.perf_counter() - started
    peak = peak_bytes(CPU)
    return {"peak_mib": peak / 2**20, "above_start_mib": (peak - baseline) / 2**20, "seconds": seconds}


def write_data(root: Path, sizes: list[int], reference: int, depth: int, cfg: Config) -> None:
    """One phantom cohort per size, and the audit's fixed training set and holdout."""
    shape = (cfg.data.image_size, cfg.data.image_size, depth)
    for size in sizes:
        write_phantom_dataset(root / f"cohort_{size}", size, shape, cfg.data.num_labels, seed=0)
    write_phantom_dataset(root / "train", reference, shape, cfg.data.num_labels, seed=1)
    write_phantom_dataset(root / "holdout", reference, shape, cfg.data.num_labels, seed=2)


def build_parser() -> argparse.ArgumentParser:
    """The command line (``main`` keeps the parser to reject unknown workloads)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="bundled config name or TOML path (default tiny)")
    parser.add_argument(
        "--cases", type=positive_ints, default="10,50,200", help="cohort sizes, comma-separated (default 10,50,200)"
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"of {', '.join(WORKLOADS)}")
    parser.add_argument("--steps", type=int, default=1, help="sampler steps (default 1: memory does not depend on it)")
    parser.add_argument("--depth", type=int, default=16, help="slices of each phantom (default 16)")
    parser.add_argument("--reference", type=int, default=20, help="training and holdout cases of the audit")
    parser.add_argument("--grid", type=int, default=16, help="the memorisation audit's grid (default 16^3)")
    parser.add_argument("--draws", type=int, default=1, help="membership-inference draws per timestep (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def checked_workloads(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """The comma-separated workloads of ``--workloads``; exits through ``parser.error`` on an unknown one."""
    workloads = [w for w in text.split(",") if w]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"--workloads: unknown {', '.join(unknown)} (choose from {', '.join(WORKLOADS)})")
    return workloads


def worker_spec(args: argparse.Namespace, workload: str, size: int, root: str) -> dict[str, Any]:
    """What the worker measuring one (workload, cohort size) is told."""
    return {
        "workload": workload,
        "cases": size,
        "config": args.config,
        "root": root,
        "steps": args.steps,
        "grid": args.grid,
        "draws": args.draws,
        "threads": args.threads,
    }


def result_row(workload: str, size: int, result: dict[str, Any]) -> list[Any]:
    """One measurement's table row (dashes and the error when it failed)."""
    if "error" in result:
        return [workload, size, "-", "-", "-", result["error"]]
    return [
        workload,
        size,
        f"{result['peak_mib']:.0f}",
        f"{result['above_start_mib']:.1f}",
        f"{result['seconds']:.1f}",
        "",
    ]


def measure_all(
    args: argparse.Namespace, sizes: list[int], workloads: list[str], cfg: Config
) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """Write the data, then each (workload, cohort size) in its own subprocess; the table rows and the results."""
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        write_data(Path(tmp), sizes, args.reference, args.depth, cfg)
        for workload in workloads:
            for size in sizes:
                spec = worker_spec(args, workload, size, tmp)
                result = run_worker(Path(__file__), spec, args.timeout, rss_cap_bytes=None)
                results.append({**spec, **result})
                rows.append(result_row(workload, size, result))
                print(f"  {workload} {size} cases: done", file=sys.stderr, flush=True)
    return rows, results


def print_flatness(results: list[dict[str, Any]], workloads: list[str], sizes: list[int]) -> None:
    """Per workload with two or more measurements: peak RSS max/min over the sizes against the target."""
    for workload in workloads:
        done = [r for r in results if r["workload"] == workload and "error" not in r]
        if len(done) < 2:
            continue
        peaks = [r["peak_mib"] for r in done]
        rises = [r["above_start_mib"] for r in done]
        ratio = max(peaks) / min(peaks)
        verdict = "flat" if ratio <= 1.1 else "NOT flat"
        print(
            f"{workload}: peak RSS max/min over {min(sizes)}..{max(sizes)} cases = {ratio:.3f} "
            f"(target <= 1.1: {verdict}); rise above start {min(rises):.1f}..{max(rises):.1f} MiB"
        )


def main() -> int:
    """Dispatch a ``--worker`` measurement, or measure every workload and size and print the table."""
    parser = build_parser()
    args = parser.parse_args()
    if args.worker:
        emit(worker(json.loads(args.worker)))
        return 0
    sizes = args.cases
    workloads = checked_workloads(parser, args.workloads)
    cfg = load_config(resolve_config_path(args.config))
    rows, results = measure_all(args, sizes, workloads, cfg)
    info = machine(args.threads)
    print(f"# cohort_memory: {json.dumps(info)}")
    print(
        f"# config {args.config}, untrained seeded random weights, {args.steps} sampler step(s), phantoms "
        f"{cfg.data.image_size}x{cfg.data.image_size}x{args.depth}; audit: grid {args.grid}^3, "
        f"{args.reference} training + {args.reference} holdout cases, {args.draws} MIA draw(s)"
    )
    print(markdown_table(["workload", "cases", "peak RSS MiB", "above start MiB", "seconds", "note"], rows))
    print_flatness(results, workloads, sizes)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(report_errors("benchmark cohort_memory", main))
