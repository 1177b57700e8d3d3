"""Federation cost: where a round's time goes, bytes per round per stage, simulation vs centralized (issue 5, item 7).

Two configurations in one run: ``tiny`` (32x32 slices, window 8) and ``mid`` (the tiny network
at 96x96 slices, window 16: ``experiments.benchmarks.MID``, as in ``privacy.py`` and
``train_throughput.py``). For each, K phantom sites (``--sites``, default 2) with ``--cases`` cases each:

1. **Simulation**: ``flwr.simulation.run_simulation`` of the real app (``server.app.create_app``,
   ``client.app.app``, MLflow tracking on, as a user runs it) for rounds of stage 1, stage 2
   (frozen base: only the slice-axis weights travel) and the informed generator. Each client
   gets both CPUs (``num_cpus = 2``), so the sites run one after another and a round's site
   work is the sum over sites.
2. **Where a round's time goes**, from the timings the sites put in their replies and the server
   in ``metrics.jsonl`` (all measured inside the same rounds, so shared-machine load hits both
   sides of every ratio alike):

   * local training: the sites' ``train-seconds`` (``gem3d.training.train`` alone);
   * site setup: data (cached across rounds in a worker), network, optimizer;
   * site evaluation (``@app.evaluate``: validation loss on held-out data) and server evaluation;
   * serialise: torch <-> ``ArrayRecord`` on the sites and on the server, copying weights out;
   * transport + framework: the train and evaluate phases minus the site work inside them
     (Flower/Ray message passing, config parsing on the site);
   * aggregate (the strategy), checkpoint (atomic safetensors + progress file), report
     (MLflow logging of the round);
   * other: the rest of the round's clock.

   The issue's overhead is serialise + transport + aggregate; its share of the round time is
   the target (<= 10% at mid). The share of everything but local training is given as well.
3. **Mid, extrapolated to a realistic round**: mid steps cost seconds each on this CPU, so the
   simulation runs few local steps (``--mid-local-steps``) and the table extrapolates the
   measured fixed per-round costs to longer rounds with the measured seconds per step: a
   hospital's round is minutes of local compute, not a few steps. The table says so.
4. **Centralized**, tiny only: the same total steps (sites x local steps x rounds, per stage)
   with ``gem3d.training.train`` on the pooled data of all sites, in this process; its wall time
   against the simulation's.

Torch runs with one intra-op thread everywhere (``OMP_NUM_THREADS=1`` reaches the Ray workers).
A few minutes on 2 shared cores with the defaults.

    .venv/bin/python experiments/benchmarks/federation.py [--sites 2] [--local-steps 10] [--mid-local-steps 1]
        [--only tiny|mid] [--set "k=v ..."] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch and Ray start: one thread per process

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flwr.simulation import run_simulation

from client.app import app as client_app
from experiments.benchmarks import MID, machine, markdown_table
from experiments.commands.runner import report_errors
from experiments.configs import resolve_config_path
from gem3d.config import Config, load_config
from gem3d.data.dataset import load_volumes
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.data.windows import WindowSource
from gem3d.diffusion import noise_process
from gem3d.runs import build_model
from gem3d.training import Stage, freeze_for_stage, new_state, train
from server.app import create_app
from server.settings import parse_set

STAGES: tuple[Stage, ...] = ("slice", "volume", "informed")
TARGET_OVERHEAD = 0.10
# Local steps per site of the extrapolated mid rounds.
MID_ROUND_STEPS = (10, 50, 200)
# The parts of a round, in table order (``breakdown`` computes them).
PARTS = ("train", "setup", "site eval", "serialise", "transport", "aggregate", "checkpoint", "report", "other")
ISSUE_OVERHEAD = ("serialise", "transport", "aggregate")


def site_sum(record: dict[str, Any], key: str) -> float:
    return sum(float(site.get(key, 0.0)) for site in record.get("per-site", {}).values())


def breakdown(record: dict[str, Any]) -> dict[str, float]:
    """Seconds of each part of one round (``PARTS``), from one line of the server's ``metrics.jsonl``."""
    train_s, setup_s = site_sum(record, "train-seconds"), site_sum(record, "setup-seconds")
    site_serialise = site_sum(record, "serialise-seconds") + site_sum(record, "pack-seconds")
    site_eval = float(record.get("sites-eval-seconds", 0.0))
    parts = {
        "train": train_s,
        "setup": setup_s,
        "site eval": site_eval + float(record.get("server-eval-seconds", 0.0)),
        "serialise": site_serialise + float(record.get("server-unpack-seconds", 0.0)),
        "transport": float(record["train-phase-seconds"])
        - (train_s + setup_s + site_serialise)
        + float(record["evaluate-phase-seconds"])
        - site_eval,
        "aggregate": float(record["aggregate-seconds"]),
        "checkpoint": float(record["checkpoint-seconds"]),
        "report": float(record.get("report-seconds", 0.0)),
    }
    parts["other"] = float(record["round-seconds"]) - sum(parts.values())
    return parts


def shares(record: dict[str, Any]) -> tuple[float, float]:
    """``(issue overhead share, everything-but-training share)`` of one round's time."""
    parts, total = breakdown(record), float(record["round-seconds"])
    return sum(parts[p] for p in ISSUE_OVERHEAD) / total, (total - parts["train"]) / total


def simulate(cfg_name: str, overrides: dict[str, Any], sites: int, cases: int, tmp: Path) -> list[dict[str, Any]]:
    """Run the Flower simulation on fresh phantom sites; return the server's round records."""
    cfg = load_config(resolve_config_path(cfg_name), overrides)
    size, window = cfg.data.image_size, cfg.data.window
    root, out = tmp / "sites", tmp / "run"
    for k in range(sites):
        write_phantom_dataset(root / f"site_{k}", cases, (size, size, 2 * window + 8), cfg.data.num_labels, k)
    run_set = " ".join(f"{k}={v}" for k, v in overrides.items())
    run_config = {"config": cfg_name, "data-root": str(root), "out-dir": str(out), "set": run_set}
    run_config["val-cases"] = 0  # every case trains, as in the centralized run
    backend = {"client_resources": {"num_cpus": 2}, "init_args": {"num_cpus": 2}}
    run_simulation(
        server_app=create_app(run_config), client_app=client_app, num_supernodes=sites, backend_config=backend
    )
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def centralized(cfg: Config, root: Path, sites: int, steps: int) -> dict[str, float]:
    """Seconds of ``steps`` steps of each stage with ``gem3d.training.train`` on the pooled site data."""
    pooled = [v for k in range(sites) for v in load_volumes(root / f"site_{k}", cfg.data)]
    process = noise_process(cfg.diffusion)
    seconds = {}
    for stage in STAGES:
        model = build_model(stage, cfg)
        freeze_for_stage(model, stage, cfg.train.volume_train_all)
        state = new_state(model, cfg.train)
        source = WindowSource(pooled, cfg.data.window, cfg.train.informed_from)
        started = time.perf_counter()
        train(state, process, source, stage, steps, cfg.train)
        seconds[stage] = time.perf_counter() - started
    return seconds


def round_rows(label: str, rounds: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for index, record in enumerate(rounds):
        parts = breakdown(record)
        issue, non_train = shares(record)
        first = " (run's 1st: Ray start)" if index == 0 else ""
        rows.append(
            [
                label,
                f"{record['stage']} {record['round']}{first}",
                f"{record['round-seconds']:.2f}",
                *(f"{parts[p]:.2f}" for p in PARTS),
                f"{100 * issue:.1f}%",
                f"{100 * non_train:.0f}%",
            ]
        )
    return rows


def steady(rounds: list[dict[str, Any]], stage: Stage) -> list[dict[str, Any]]:
    """The stage's rounds, leaving out the run's first (Ray workers start and import torch in it)."""
    return [r for r in rounds[1:] if r["stage"] == stage]


def stage_rows(label: str, rounds: list[dict[str, Any]], sites: int, local_steps: int) -> list[list[Any]]:
    slice_bytes = next(r["sent-bytes"] for r in rounds if r["stage"] == "slice")
    rows = []
    for stage in STAGES:
        kept = steady(rounds, stage)
        if not kept:
            continue
        issue = statistics.median(shares(r)[0] for r in kept)
        non_train = statistics.median(shares(r)[1] for r in kept)
        per_step = statistics.median(breakdown(r)["train"] for r in kept) / (sites * local_steps)
        rows.append(
            [
                label,
                stage,
                f"{kept[0]['sent-bytes'] / 2**20:.3f}",
                f"{kept[0]['sent-bytes'] / slice_bytes:.3f}",
                f"{kept[0]['received-bytes'] / 2**20:.3f}",
                kept[0]["sent-arrays"],
                f"{per_step:.2f}",
                f"{statistics.median(r['round-seconds'] for r in kept):.2f}",
                f"{100 * issue:.1f}%",
                f"{100 * non_train:.0f}%",
                "met" if issue <= TARGET_OVERHEAD else "not met",
            ]
        )
    return rows


def _steps(steps: float) -> str:
    return "any (>= 1)" if steps <= 1 else f"{steps:.1f}"


def extrapolated_rows(rounds: list[dict[str, Any]], sites: int, local_steps: int) -> list[list[Any]]:
    """Mid rounds of more local steps: fixed per-round costs as measured, training scaled per step."""
    rows = []
    for stage in STAGES:
        kept = steady(rounds, stage)
        if not kept:
            continue
        parts = {p: statistics.median(breakdown(r)[p] for r in kept) for p in PARTS}
        per_step = parts["train"] / (sites * local_steps)
        issue = sum(parts[p] for p in ISSUE_OVERHEAD)
        fixed = sum(parts.values()) - parts["train"]
        # the fewest local steps per site for which a share is at most the target:
        # issue / (fixed + K n t) <= target, and fixed / (fixed + K n t) <= target
        issue_steps = max(issue / TARGET_OVERHEAD - fixed, 0.0) / (sites * per_step)
        all_steps = fixed * (1 - TARGET_OVERHEAD) / TARGET_OVERHEAD / (sites * per_step)
        for steps in (local_steps, *MID_ROUND_STEPS):
            train_s = sites * steps * per_step
            total = train_s + fixed
            kind = "measured" if steps == local_steps else "extrapolated"
            rows.append(
                [
                    stage,
                    f"{steps} ({kind})",
                    f"{train_s / sites / 60:.1f}",
                    f"{total:.1f}",
                    f"{100 * issue / total:.1f}%",
                    f"{100 * fixed / total:.0f}%",
                    _steps(issue_steps),
                    _steps(all_steps),
                ]
            )
    return rows


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="bundled config name or TOML path (default tiny)")
    parser.add_argument("--set", default="", help='config overrides for both runs, "section.field=value ..."')
    parser.add_argument("--only", choices=("tiny", "mid"), default=None, help="run one configuration only")
    parser.add_argument("--sites", type=int, default=2, help="simulated sites (default 2)")
    parser.add_argument("--cases", type=int, default=3, help="phantom cases per site (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="tiny: rounds of each stage (default 2)")
    parser.add_argument("--local-steps", type=int, default=10, help="tiny: local steps per round (default 10)")
    parser.add_argument("--mid-local-steps", type=int, default=1, help="mid: local steps per round (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return parser.parse_args()


def schedule(steps: int, rounds: dict[Stage, int]) -> dict[str, Any]:
    """Config overrides for ``steps`` local steps per round and ``rounds`` rounds of each stage."""
    return {"federation.local_steps": steps, **{f"federation.rounds_{s}": n for s, n in rounds.items()}}


def run_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The config overrides of each configuration to run (tiny and mid, or ``--only`` one)."""
    # mid: stage 1 gets a second round so that one steady (after Ray start-up) round exists per stage
    runs = {
        "tiny": {**parse_set(args.set), **schedule(args.local_steps, dict.fromkeys(STAGES, args.rounds))},
        "mid": {
            **parse_set(args.set),
            **MID,
            **schedule(args.mid_local_steps, {"slice": 2, "volume": 1, "informed": 1}),
        },
    }
    return {args.only: runs[args.only]} if args.only else runs


def measure(args: argparse.Namespace, label: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """One configuration's simulation (and, for tiny, the centralized run of the same total steps)."""
    cfg = load_config(resolve_config_path(args.config), overrides)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        rounds = simulate(args.config, overrides, args.sites, args.cases, Path(tmp))
        simulation_s = time.perf_counter() - started
        load = [round(x, 2) for x in os.getloadavg()]
        central = None
        if label == "tiny":
            steps = args.sites * cfg.federation.local_steps * args.rounds
            central = centralized(cfg, Path(tmp) / "sites", args.sites, steps)
    return {"cfg": cfg, "rounds": rounds, "simulation_s": simulation_s, "load_after": load, "central": central}


def print_setup(args: argparse.Namespace, info: dict[str, Any], results: dict[str, Any]) -> None:
    """The machine line and one line per configuration: sites, cases, shapes, schedule, load."""
    print(f"# federation: {json.dumps(info)}")
    for label, result in results.items():
        cfg = result["cfg"]
        fed, size = cfg.federation, cfg.data.image_size
        print(
            f"# {label}: {args.sites} sites x {args.cases} phantom cases, {size}x{size} slices, window "
            f"{cfg.data.window}, batch {cfg.train.batch_size}, {fed.local_steps} local steps, rounds "
            f"{fed.rounds_slice}/{fed.rounds_volume}/{fed.rounds_informed}, FedAvg, sites one after another; "
            f"load average after the simulation {result['load_after']}"
        )


def print_round_table(results: dict[str, Any]) -> None:
    """Where each round's time goes, every round of every configuration."""
    print("\n## Where each round's time goes (seconds; site parts summed over the sites)\n")
    headers = ["config", "stage round", "round s", *PARTS, "serialise+transport+aggregate", "all but train"]
    rows = [row for label, r in results.items() for row in round_rows(label, r["rounds"])]
    print(markdown_table(headers, rows))


def print_stage_table(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Bytes, s/step and overhead share per stage of every configuration."""
    print("\n## Per stage (rounds after the run's first): bytes, s/step, overhead share (target <= 10% at mid)\n")
    headers = ["config", "stage", "MiB sent per site", "vs stage 1", "MiB received (all sites)", "arrays"]
    headers += ["train s/step", "median round s", "serialise+transport+aggregate", "all but train", "10% target"]
    rows = [
        row
        for label, r in results.items()
        for row in stage_rows(label, r["rounds"], args.sites, r["cfg"].federation.local_steps)
    ]
    print(markdown_table(headers, rows))


def print_extrapolated_table(args: argparse.Namespace, mid: dict[str, Any]) -> None:
    """Mid's rounds extrapolated to more local steps per site."""
    print(
        f"\n## Mid, longer rounds: measured at {mid['cfg'].federation.local_steps} local steps, "
        "EXTRAPOLATED to more (fixed per-round costs as measured, training x steps at the measured s/step)\n"
    )
    headers = ["stage", "local steps per site", "local compute min per site", "round s (all sites)"]
    headers += ["serialise+transport+aggregate", "all but train", "steps per site for <= 10%: s+t+a"]
    headers += ["steps per site for <= 10%: all but train"]
    print(markdown_table(headers, extrapolated_rows(mid["rounds"], args.sites, mid["cfg"].federation.local_steps)))


def centralized_rows(args: argparse.Namespace, tiny: dict[str, Any]) -> list[list[Any]]:
    """Tiny's simulation (whole, and its rounds) and centralized wall times, and their ratios."""
    central = tiny["central"]
    central_s = sum(central.values())
    rounds_s = sum(r["round-seconds"] for r in tiny["rounds"])
    total_steps = args.sites * tiny["cfg"].federation.local_steps * args.rounds
    return [
        [
            "simulation, whole run_simulation (Ray + SuperLink start-up included)",
            f"{tiny['simulation_s']:.1f}",
            f"{tiny['simulation_s'] / central_s:.2f}x",
        ],
        ["simulation, sum of round times", f"{rounds_s:.1f}", f"{rounds_s / central_s:.2f}x"],
        [
            f"centralized, {total_steps} steps per stage ({', '.join(f'{s} {central[s]:.1f}s' for s in STAGES)})",
            f"{central_s:.1f}",
            "1.00x",
        ],
    ]


def print_centralized_table(args: argparse.Namespace, tiny: dict[str, Any]) -> None:
    """Tiny: the simulation against centralized training of the same total steps."""
    print("\n## Tiny: simulation vs centralized training of the same total steps on the pooled data\n")
    print(markdown_table(["run", "wall s", "vs centralized"], centralized_rows(args, tiny)))


def write_json(args: argparse.Namespace, info: dict[str, Any], results: dict[str, Any]) -> None:
    """The machine, the arguments and every configuration's results, to ``--json``."""
    payload = {label: {**r, "cfg": r["cfg"].model_dump(mode="json")} for label, r in results.items()}
    args.json.write_text(json.dumps({"machine": info, "args": vars(args) | {"json": str(args.json)}, **payload}))


def main() -> int:
    """Simulate each configuration, then print the tables (and write ``--json``)."""
    args = parse_args()
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    results = {label: measure(args, label, overrides) for label, overrides in run_overrides(args).items()}
    info = machine(1)
    print_setup(args, info, results)
    print_round_table(results)
    print_stage_table(args, results)
    if "mid" in results:
        print_extrapolated_table(args, results["mid"])
    if "tiny" in results and results["tiny"]["central"]:
        print_centralized_table(args, results["tiny"])
    if args.json:
        write_json(args, info, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(report_errors("benchmark federation", main))
