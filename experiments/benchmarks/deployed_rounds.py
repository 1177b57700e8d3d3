"""Deployed rounds: what a round costs beyond local training, a ClientApp process per message (issue 16, point 6).

In a Flower deployment a SuperNode starts a fresh ``flwr-clientapp`` process for every message
(Flower's design: the ClientApp is short-lived), so each train message pays Python start-up and
the imports of torch, MONAI and Flower before any local step. The simulation's site caches do
not exist there. This benchmark runs the real deployment, ``experiments/federation/deploy_local.sh``
(TLS, SuperNode authentication, one SuperNode per site on this machine), at the mid config
(``experiments.benchmarks.MID``: the tiny network at 96x96 slices, window 16) on phantom sites,
non-DP (a DP site withholds its timings), without client-side evaluation, and reads the
server's round records:

* ``round``: the server's clock for the round (``round-seconds``);
* ``train``: the slowest site's local steps (``train-seconds``; the sites run in parallel);
* ``overhead``: the rest (process start and imports, data and network setup, (de)serialising,
  transport, aggregation, checkpointing), and its share of the round: the issue's target is
  <= 10% at mid.

Each site's train message also reports ``setup-seconds`` (data, network, optimizer inside the
ClientApp) and ``process-start-seconds`` (the ClientApp process's age when its handler ran: the
interpreter, the imports of torch, MONAI and Flower, Flower's own set-up); the server's own share
(unpacking, aggregation, checkpoint, report) is ``server s``. The rest is transport and waiting.
Rounds of several local-step counts (``--local-steps``, one run each) show how the fixed
per-message cost is amortised: a round is "heavier" with more local steps.

    .venv/bin/python experiments/benchmarks/deployed_rounds.py [--sites 2] [--local-steps 2,10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks import MID, machine, markdown_table, positive_ints
from experiments.commands.runner import report_errors
from gem3d.data.phantoms import write_phantom_dataset

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "experiments" / "federation" / "deploy_local.sh"


def deploy(root: Path, out: Path, local_steps: int, rounds: int, port: int) -> list[dict[str, Any]]:
    """One deployed run of ``rounds`` slice rounds; returns the server's round records."""
    overrides = {**MID, "federation.local_steps": local_steps, "federation.rounds_slice": rounds}
    overrides.update({"federation.rounds_volume": 0, "federation.rounds_informed": 0, "privacy.enabled": "false"})
    run_set = " ".join(f"{k}={v}" for k, v in overrides.items())
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PORT": str(port),
        "RUN_CONFIG": f"set='{run_set}' fraction-evaluate=0.0 val-cases=0",
        "OMP_NUM_THREADS": "1",
    }
    log = out.parent / f"deploy-{local_steps}.log"
    with open(log, "w") as handle:
        done = subprocess.run(["bash", str(DEPLOY), str(root), str(out)], env=env, stdout=handle, stderr=handle)
    if done.returncode != 0:
        raise SystemExit(f"deployed_rounds: deploy_local.sh exited {done.returncode}; see {log}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def row(local_steps: int, record: dict[str, Any]) -> dict[str, Any]:
    sites = list(record["per-site"].values())
    train = max(float(s["train-seconds"]) for s in sites)
    setup = max(float(s["setup-seconds"]) for s in sites)
    start = max(float(s.get("process-start-seconds", float("nan"))) for s in sites)
    total = float(record["round-seconds"])
    server = sum(float(record.get(k, 0.0)) for k in ("server-unpack-seconds", "checkpoint-seconds", "report-seconds"))
    return {
        "local_steps": local_steps,
        "round": int(record["round"]),
        "round_s": total,
        "train_s": train,
        "setup_s": setup,
        "process_start_s": start,
        "server_s": server + float(record.get("aggregate-seconds", 0.0)),
        "overhead_s": total - train,
        "overhead_share": (total - train) / total,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=2, help="SuperNodes, one per phantom site (default 2)")
    parser.add_argument("--cases", type=int, default=3, help="phantom cases per site (default 3)")
    parser.add_argument(
        "--local-steps", type=positive_ints, default="2,10", help="comma-separated local steps per round, one run each"
    )
    parser.add_argument("--rounds", type=int, default=2, help="slice rounds per run (default 2)")
    parser.add_argument("--port", type=int, default=39391, help="SuperLink port (default 39391)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    steps = args.local_steps
    if args.sites < 1 or args.rounds < 1:
        parser.error("--sites and --rounds must be >= 1")
    print(f"# deployed_rounds: {json.dumps(machine(1))}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gem3d-deployed-") as tmp:
        root = Path(tmp) / "sites"
        size, window = int(MID["data.image_size"]), int(MID["data.window"])
        for k in range(args.sites):
            write_phantom_dataset(root / f"site_{k}", args.cases, (size, size, 2 * window + 8), 4, k)
        for local_steps in steps:
            started = time.perf_counter()
            records = deploy(root, Path(tmp) / f"run-{local_steps}", local_steps, args.rounds, args.port)
            print(f"# {local_steps} local steps: {len(records)} rounds in {time.perf_counter() - started:.0f} s")
            rows += [row(local_steps, r) for r in records]
    print(f"# mid: {args.sites} SuperNodes x {args.cases} phantom cases, 96x96 slices, window 16, non-DP, TLS")
    headers = ["local steps", "round", "round s", "slowest site: train s", "setup s", "process start s"]
    headers += ["server s", "overhead s", "overhead share"]
    table = [
        [
            r["local_steps"],
            r["round"],
            f"{r['round_s']:.1f}",
            f"{r['train_s']:.1f}",
            f"{r['setup_s']:.2f}",
            f"{r['process_start_s']:.1f}",
            f"{r['server_s']:.2f}",
            f"{r['overhead_s']:.1f}",
            f"{100 * r['overhead_share']:.1f}%",
        ]
        for r in rows
    ]
    print(markdown_table(headers, table))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(report_errors("benchmark deployed_rounds", main))
