"""Write the multi-site demo cohort: nnU-Net v2 raw datasets per site plus a held-out test split.

Built from one real anatomy that ships with nilearn (the MNI152 T1 template with its grey- and
white-matter maps): every case is a random smooth deformation of that template, and every site adds
its own scanner character (bias field, contrast, noise, resolution, voxel order). Labels:
background, CSF, grey matter, white matter (and a synthetic lesion with --lesion).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.commands.common import nonnegative_int, positive_int, seed_int
from gem3d.data.demo_cohort import write_demo_cohort

NAME = "demo-data"
HELP = "write the multi-site demo cohort (MNI152 anatomy, deformed; nnU-Net v2 raw per site)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder to create (site_0 .. site_K-1, test)")
    parser.add_argument("--sites", type=positive_int, default=3, help="number of sites (default 3)")
    parser.add_argument("--cases-per-site", type=positive_int, default=5, help="training cases per site (default 5)")
    parser.add_argument(
        "--test-per-site", type=nonnegative_int, default=1, help="held-out test cases per site (default 1)"
    )
    parser.add_argument("--size", type=int, default=32, help="voxels across the longest in-plane extent (default 32)")
    parser.add_argument("--seed", type=seed_int, default=0, help="the cohort is a pure function of the seed")
    parser.add_argument("--lesion", action="store_true", help="add a synthetic white-matter lesion label (4)")
    parser.add_argument(
        "--pooled", action="store_true", help="all sites' training cases in one folder, pooled/ (a multi-scanner set)"
    )


def run(args: argparse.Namespace) -> int:
    out = write_demo_cohort(
        args.out,
        sites=args.sites,
        cases_per_site=args.cases_per_site,
        size=args.size,
        seed=args.seed,
        test_per_site=args.test_per_site,
        lesion=args.lesion,
        pooled=args.pooled,
    )
    folders = "pooled" if args.pooled else f"site_0 .. site_{args.sites - 1}"
    print(
        f"demo cohort: {args.sites} sites x {args.cases_per_site} cases, {args.sites * args.test_per_site} test cases "
        f"-> {out} ({folders}, test)"
    )
    return 0
