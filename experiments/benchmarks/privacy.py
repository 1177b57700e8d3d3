"""DP-SGD cost: step time, peak memory, ε bookkeeping and the quality cost of DP (issue 6, item 7).

This script runs the DP benchmark jobs and prints their tables (``--json``: also the results),
each measurement that needs its own process in a fresh ``--worker`` subprocess. On the tiny
config (``--mid``: also 96x96 slices, window 16) with phantoms, for stage 1 (``slice``) and
stage 2 (``volume``); what the jobs share (phantoms, model, privacy config) is in ``dp_setup``.

1. **Step time** (``dp_step_cost.time_worker``): non-DP against DP-SGD with each
   ``privacy.grad_sample_mode`` and, at stage 1, Opacus's ghost clipping, interleaved in one
   process; the ``auto`` mode's DP/non-DP ratio against the target (at most 1.5x).
2. **Correctness of each mode** (``dp_updates``, in the same worker): each mode's clipped update
   (noise off) against a plain per-window reference.
3. **Peak memory** (``dp_step_cost.peak_worker``): each of (stage, DP or not) in a fresh
   subprocess; the DP/non-DP ratio.
4. **ε bookkeeping** (``dp_accounting``): seconds per ``PrivacyLedger.epsilon`` and per
   ``ledger.check`` for histories of 1, 10 and 100 entries, and the ledger's ε against Opacus's
   ``RDPAccountant`` (also after the timed DP steps of job 1).
5. **Quality cost** (``dp_quality.quality_worker``, stage 1): held-out validation loss after
   ``--quality-steps`` steps at ε in {1, 4, 8} against non-DP, same steps, same seed.

    .venv/bin/python experiments/benchmarks/privacy.py [--mid] [--steps N] [--repeats R] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks import MID, emit, machine, run_worker
from experiments.benchmarks.dp_accounting import epsilon_costs, print_epsilon_table
from experiments.benchmarks.dp_quality import print_quality_table, quality_worker
from experiments.benchmarks.dp_step_cost import peak_worker, print_step_time_table, step_time_row, time_worker
from experiments.benchmarks.dp_updates import mode_rows, print_mode_table
from experiments.commands.runner import report_errors

WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "time": time_worker,
    "peak": peak_worker,
    "quality": quality_worker,
}


def parse_args() -> argparse.Namespace:
    """The command line (``--worker`` is internal: one worker's JSON spec)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="bundled config name or TOML path (default tiny)")
    parser.add_argument("--mid", action="store_true", help="also the mid configuration: 96x96 slices, window 16")
    parser.add_argument("--mid-only", action="store_true", help="the mid configuration only")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat and kind (default 3)")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved repeats (default 4)")
    parser.add_argument("--mid-steps", type=int, default=1, help="timed steps per repeat at the mid config (default 1)")
    parser.add_argument("--mid-repeats", type=int, default=3, help="interleaved repeats at the mid config (default 3)")
    parser.add_argument("--no-timing", action="store_true", help="skip step times, modes and memory")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory workers")
    parser.add_argument("--no-epsilon", action="store_true", help="skip the ε bookkeeping timings")
    parser.add_argument(
        "--quality-steps", type=int, default=100, help="stage-1 steps per quality run; 0 skips (default 100)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per worker")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args()


def configs(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(label, config overrides) of each configuration the command line asks for."""
    chosen: list[tuple[str, dict[str, Any]]] = [("tiny", {})]
    if args.mid or args.mid_only:
        chosen.append(("mid (96x96, W=16)", MID))
    return chosen[1:] if args.mid_only else chosen


def run_timing(
    args: argparse.Namespace, script: Path, base: dict[str, Any], results: dict[str, Any]
) -> tuple[list[list[str]], list[list[str]]]:
    """Jobs 1-3 for each configuration and stage: the time worker and, unless ``--no-memory``, the peak
    workers; appends their results to ``results`` and returns the step-time and mode table rows."""
    time_rows: list[list[str]] = []
    update_rows: list[list[str]] = []
    for label, overrides in [] if args.no_timing else configs(args):
        for stage in ("slice", "volume"):
            spec = {**base, "kind": "time", "overrides": overrides, "stage": stage}
            if overrides:  # mid: fewer steps, and no Opacus ghost (it fails the update check at tiny already)
                spec.update(steps=args.mid_steps, repeats=args.mid_repeats, ghost=False)
            result = run_worker(script, spec, args.timeout, rss_cap_bytes=None)
            peaks: dict[bool, dict[str, Any]] = {}
            if not args.no_memory:
                peaks = {
                    dp: run_worker(script, {**spec, "kind": "peak", "dp": dp}, args.timeout, rss_cap_bytes=None)
                    for dp in (False, True)
                }
                results["peak"].append({"config": label, "stage": stage, "plain": peaks[False], "dp": peaks[True]})
            results["time"].append({"config": label, **result})
            print(f"  {label} {stage}: done", file=sys.stderr, flush=True)
            time_rows.append(step_time_row(label, stage, result, peaks))
            update_rows += mode_rows(label, stage, result)
    return time_rows, update_rows


def main() -> int:
    args = parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        emit(WORKERS[spec["kind"]](spec))
        return 0
    torch.set_num_threads(args.threads)
    script = Path(__file__)
    base = {"config": args.config, "threads": args.threads, "steps": args.steps, "repeats": args.repeats}
    results: dict[str, Any] = {"time": [], "peak": [], "quality": None, "epsilon": None}
    time_rows, update_rows = run_timing(args, script, base, results)
    eps = [] if args.no_epsilon else epsilon_costs(repeats=max(args.repeats, 5))
    results["epsilon"] = eps
    quality = None
    if args.quality_steps > 0:
        spec = {**base, "kind": "quality", "overrides": {}, "steps": args.quality_steps}
        quality = run_worker(script, spec, args.timeout, rss_cap_bytes=None)
        results["quality"] = quality

    info = machine(args.threads)
    print(f"# privacy: {json.dumps(info)}")
    print(
        f"# {args.repeats} interleaved repeats x {args.steps} steps ({args.mid_repeats} x {args.mid_steps} at the "
        "mid config), after 1 warm-up step each; "
        f"DP: Poisson rate 1 (site = one batch), noise 1.0, clip 1.0, RDP accountant"
    )
    if time_rows:
        print_step_time_table(time_rows)
        print_mode_table(update_rows)
    if eps:
        print_epsilon_table(eps)
    if quality is not None:
        print_quality_table(quality, args.quality_steps)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(report_errors("benchmark privacy", main))
