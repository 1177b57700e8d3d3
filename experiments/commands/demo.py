"""The main job: cohort, federated DP training, privacy release, de-enhancement, audit, evaluation.

Runs every step on CPU in about 15 minutes and ends with a summary table, where the outputs are,
and the ``mlflow ui`` command to browse the tracked runs. See experiments/demo.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "demo"
HELP = "the main job: the whole story on a 3-site demo cohort"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    parser.add_argument(
        "--sites", type=int, default=3, help="number of simulated hospitals (default 3; not with --small)"
    )
    parser.add_argument("--fresh", action="store_true", help="delete --out first (otherwise an earlier run resumes)")
    parser.add_argument("--small", action="store_true", help="a smaller, faster setting (2 sites, micro network)")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from experiments.demo import SMALL, DemoSettings, run_demo

    settings = SMALL if args.small else replace(DemoSettings(), sites=args.sites)
    run_demo(args.out, settings, args.fresh)
    return 0
