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
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default demo_out, with --latent demo_out_latent)"
    )
    parser.add_argument(
        "--sites", type=int, default=3, help="number of simulated hospitals (default 3; not with --small)"
    )
    parser.add_argument("--fresh", action="store_true", help="delete --out first (otherwise an earlier run resumes)")
    parser.add_argument("--small", action="store_true", help="a smaller, faster setting (2 sites, micro network)")
    parser.add_argument(
        "--latent",
        action="store_true",
        help="the latent variant (config tiny_latent): a slice autoencoder pre-trained on public data, "
        "the denoiser and informed generator on its latents",
    )


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from experiments.demo import LATENT, SMALL, SMALL_LATENT, DemoSettings, run_demo
    from gem3d.errors import ConfigError

    if not 2 <= args.sites <= 16:  # de-enhancement harmonises across sites: at least two
        raise ConfigError(f"--sites {args.sites}: expected 2..16 simulated hospitals")
    if args.small and args.sites != 3:
        raise ConfigError(f"--sites {args.sites}: not with --small (its setting has 2 sites)")
    if args.small:
        settings = SMALL_LATENT if args.latent else SMALL
    else:
        settings = replace(LATENT if args.latent else DemoSettings(), sites=args.sites)
    out = args.out if args.out is not None else Path("demo_out_latent" if args.latent else "demo_out")
    run_demo(out, settings, args.fresh)
    return 0
