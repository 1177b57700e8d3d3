"""Federation cost: round overhead, bytes per round per stage, simulation vs centralized (issue 5, item 7).

One process, K phantom sites (``--sites``, default 2), the tiny config (``--set`` to change):

1. **Simulation**: ``flwr.simulation.run_simulation`` of the real app (``server.app.create_app``,
   ``client.app.app``) for ``--rounds`` rounds of stage 1, stage 2 (frozen base: only the
   slice-axis weights travel) and the informed generator. Each client gets both CPUs
   (``num_cpus = 2``), so the sites train one after another and a round's local compute is the
   sum over sites. From the server's ``metrics.jsonl``: round time, bytes sent to one site and
   received from all sites, per round and stage.
2. **Local compute per round**: in this process, ``gem3d.training.train`` of ``local_steps``
   steps on each site's data from a fresh state, as a site does in a round (its network built
   the same way), timed per stage. Round overhead = round time - sum over sites of that compute:
   everything else (messages, serialisation, transport, aggregation, model build and data load
   on the site, site evaluation, server checkpoint). Target (issue 5): at most 10% of the round
   time at the mid config.
3. **Serialise + aggregate alone**: ``ArrayRecord`` from the trainable state dict, its byte count
   and back to torch (one site), and Flower's ``aggregate_arrayrecords`` over K replies.
4. **Centralized**: the same total steps (sites x local steps x rounds, per stage) with
   ``gem3d.training.train`` on the pooled data of all sites, in this process; its wall time
   against the simulation's (with and without Ray/SuperLink start-up).

Torch runs with one intra-op thread everywhere (``OMP_NUM_THREADS=1`` reaches the Ray workers).

    .venv/bin/python experiments/benchmarks/federation.py [--sites 2] [--rounds 2] [--local-steps 5] [--set "k=v ..."]
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

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch and Ray start: one thread per process

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.simulation import run_simulation

from client.app import app as client_app
from experiments.benchmarks import machine, markdown_table
from experiments.commands.common import resolve_config_path
from gem3d.config import Config, load_config
from gem3d.data.dataset import load_volumes
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.data.volume import Volume
from gem3d.data.windows import WindowSource
from gem3d.diffusion import train_scheduler
from gem3d.runs import build_model
from gem3d.training import Stage, freeze_for_stage, new_state, train
from server.app import create_app
from server.settings import parse_set

STAGES: tuple[Stage, ...] = ("slice", "volume", "informed")
TARGET_OVERHEAD = 0.10


def site_volumes(root: Path, sites: int, cfg: Config) -> list[list[Volume]]:
    return [load_volumes(root / f"site_{k}", cfg.data) for k in range(sites)]


def local_compute(cfg: Config, volumes: list[list[Volume]], stage: Stage, steps: int, repeats: int) -> list[float]:
    """Per repeat: the summed seconds of ``steps`` training steps on every site (fresh state each)."""
    scheduler = train_scheduler(cfg.diffusion)
    totals = []
    for _ in range(repeats):
        total = 0.0
        for site in volumes:
            model = build_model(stage, cfg)
            freeze_for_stage(model, stage, cfg.train.volume_train_all)
            state = new_state(model, cfg.train)
            source = WindowSource(site, cfg.data.window, cfg.train.informed_from)
            started = time.perf_counter()
            train(state, scheduler, source, stage, steps, cfg.train)
            total += time.perf_counter() - started
        totals.append(total)
    return totals


def serialise_and_aggregate(cfg: Config, stage: Stage, sites: int, repeats: int) -> dict[str, float]:
    """Median seconds: torch -> ArrayRecord -> byte count -> torch for one site; FedAvg of ``sites`` replies."""
    model = build_model(stage, cfg)
    freeze_for_stage(model, stage, cfg.train.volume_train_all)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {n: t.detach() for n, t in model.state_dict().items() if n in trainable}
    round_trip, aggregate = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        record = ArrayRecord(state)
        nbytes = record.count_bytes()
        record.to_torch_state_dict()
        round_trip.append(time.perf_counter() - started)
        replies = [
            RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"n": 3.0})}) for _ in range(sites)
        ]
        started = time.perf_counter()
        aggregate_arrayrecords(replies, "n")
        aggregate.append(time.perf_counter() - started)
    return {
        "bytes": float(nbytes),
        "round_trip_s": statistics.median(round_trip),
        "aggregate_s": statistics.median(aggregate),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="bundled config name or TOML path (default tiny)")
    parser.add_argument("--set", default="", help='config overrides, "section.field=value ..." (as the run config)')
    parser.add_argument("--sites", type=int, default=2, help="simulated sites (default 2)")
    parser.add_argument("--cases", type=int, default=3, help="phantom cases per site (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each stage (default 2)")
    parser.add_argument("--local-steps", type=int, default=5, help="local steps per round (default 5)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the local-compute timing (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)

    ours = {"federation.local_steps": args.local_steps, **{f"federation.rounds_{s}": args.rounds for s in STAGES}}
    cfg = load_config(resolve_config_path(args.config), {**parse_set(args.set), **ours})
    size, window = cfg.data.image_size, cfg.data.window
    run_set = " ".join([args.set, *(f"{k}={v}" for k, v in ours.items())]).strip()
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "sites", Path(tmp) / "run"
        for k in range(args.sites):
            write_phantom_dataset(root / f"site_{k}", args.cases, (size, size, 2 * window + 8), cfg.data.num_labels, k)
        volumes = site_volumes(root, args.sites, cfg)

        # 1. the simulation
        run_config = {"config": args.config, "data-root": str(root), "out-dir": str(out), "set": run_set}
        run_config["val-cases"] = 0  # every case trains, as in the centralized run
        backend = {"client_resources": {"num_cpus": 2}, "init_args": {"num_cpus": 2}}
        started = time.perf_counter()
        run_simulation(
            server_app=create_app(run_config), client_app=client_app, num_supernodes=args.sites, backend_config=backend
        )
        simulation_s = time.perf_counter() - started
        load_during_simulation = [round(x, 2) for x in os.getloadavg()]
        rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    # 2. local compute, 3. serialise + aggregate, 4. centralized: all in this process
    compute = {s: local_compute(cfg, volumes, s, args.local_steps, args.repeats) for s in STAGES}
    wire = {s: serialise_and_aggregate(cfg, s, args.sites, 5) for s in STAGES}
    pooled = [v for site in volumes for v in site]
    scheduler = train_scheduler(cfg.diffusion)
    central: dict[str, float] = {}
    for stage in STAGES:
        model = build_model(stage, cfg)
        freeze_for_stage(model, stage, cfg.train.volume_train_all)
        state = new_state(model, cfg.train)
        source = WindowSource(pooled, window, cfg.train.informed_from)
        started = time.perf_counter()
        train(state, scheduler, source, stage, args.sites * args.local_steps * args.rounds, cfg.train)
        central[stage] = time.perf_counter() - started

    info = machine(1)
    info["load_average_after_simulation"] = load_during_simulation
    round_rows, stage_rows = [], []
    for r in rounds:
        stage = r["stage"]
        per_round = statistics.median(compute[stage])
        overhead = r["round-seconds"] - per_round
        round_rows.append(
            [
                stage,
                r["round"],
                f"{r['round-seconds']:.2f}",
                f"{per_round:.2f}",
                f"{overhead:.2f}",
                f"{100 * overhead / r['round-seconds']:.0f}%",
                r.get("sent-arrays"),
                f"{r['sent-bytes'] / 2**20:.3f}",
                f"{r['received-bytes'] / 2**20:.3f}",
                r.get("sites-ok"),
            ]
        )
    slice_bytes = next(r["sent-bytes"] for r in rounds if r["stage"] == "slice")
    for stage in STAGES:
        # the run's first round also starts the Ray workers and imports torch there: left out
        steady = [r for r in rounds if r["stage"] == stage and r is not rounds[0]]
        sent = statistics.median(r["sent-bytes"] for r in steady)
        rt = statistics.median(r["round-seconds"] for r in steady)
        over = rt - statistics.median(compute[stage])
        # serialise + deserialise every message (K out, K back) and aggregate once
        wire_s = 2 * args.sites * wire[stage]["round_trip_s"] + wire[stage]["aggregate_s"]
        stage_rows.append(
            [
                stage,
                f"{sent / 2**20:.3f}",
                f"{sent / slice_bytes:.3f}",
                f"{1e3 * wire[stage]['round_trip_s']:.1f}",
                f"{1e3 * wire[stage]['aggregate_s']:.1f}",
                f"{100 * wire_s / rt:.1f}%",
                f"{rt:.2f}",
                f"{100 * over / rt:.0f}%",
                "met" if over / rt <= TARGET_OVERHEAD else "not met",
            ]
        )
    rounds_s = sum(r["round-seconds"] for r in rounds)
    central_s = sum(central.values())
    print(f"# federation: {json.dumps(info)}")
    print(
        f"# {args.sites} sites x {args.cases} phantom cases, {size}x{size} slices, window {window}, batch "
        f"{cfg.train.batch_size}, {args.local_steps} local steps, {args.rounds} rounds per stage, FedAvg, "
        f"sites run one after another (num_cpus 2 each)"
    )
    print("\n## Per round: time, local compute and overhead, bytes (target: overhead <= 10% at the mid config)\n")
    headers = ["stage", "round", "round s", "local compute s (all sites)", "overhead s", "overhead share"]
    headers += ["arrays sent", "MiB sent per site", "MiB received (all sites)", "sites ok"]
    print(markdown_table(headers, round_rows))
    print("\n## Per stage (rounds after the run's first): bytes vs stage 1, serialise/aggregate alone, overhead\n")
    headers = ["stage", "MiB sent per site per round", "vs stage 1", "torch->ArrayRecord->torch ms"]
    headers += [f"FedAvg of {args.sites} ms", "serialise+aggregate share of round", "median round s"]
    headers += ["all-overhead share", "10% target (here, not mid)"]
    print(markdown_table(headers, stage_rows))
    print("\n## Simulation vs centralized training of the same total steps on the pooled data\n")
    total_steps = args.sites * args.local_steps * args.rounds
    rows = [
        [
            "simulation, whole run_simulation (Ray + SuperLink start-up included)",
            f"{simulation_s:.1f}",
            f"{simulation_s / central_s:.2f}x",
        ],
        ["simulation, sum of round times", f"{rounds_s:.1f}", f"{rounds_s / central_s:.2f}x"],
        [
            f"centralized, {total_steps} steps per stage ({', '.join(f'{s} {central[s]:.1f}s' for s in STAGES)})",
            f"{central_s:.1f}",
            "1.00x",
        ],
    ]
    print(markdown_table(["run", "wall s", "vs centralized"], rows))
    if args.json:
        payload = {"machine": info, "rounds": rounds, "compute": compute, "wire": wire, "central": central}
        payload.update(simulation_s=simulation_s, args=vars(args) | {"json": str(args.json)})
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
