"""Write the multi-site demo cohort: nnU-Net v2 raw datasets per site plus a held-out test split.

Built from one real anatomy that ships with nilearn (the MNI152 T1 template with its grey- and
white-matter maps): every case is a random smooth deformation of that template, and every site adds
its own scanner character (bias field, contrast, noise, resolution, voxel order). Labels:
background, CSF, grey matter, white matter (and a synthetic lesion with --lesion).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from experiments.commands.common import CommandOptions, nonnegative_int, positive_int, seed_int
from gem3d.data.demo_cohort import write_demo_cohort

NAME = "demo-data"
HELP = "write the multi-site demo cohort (MNI152 anatomy, deformed; nnU-Net v2 raw per site)"


@dataclass(frozen=True, kw_only=True)
class DemoDataOptions(CommandOptions):
    """``gem3d demo-data``'s options (``add_arguments``)."""

    out: Path
    sites: int = 3
    cases_per_site: int = 5
    test_per_site: int = 1
    size: int = 32
    seed: int = 0
    lesion: bool = False
    pooled: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder to create (site_0 .. site_K-1, test)")
    parser.add_argument("--sites", type=positive_int, default=DemoDataOptions.sites, help="number of sites (default 3)")
    parser.add_argument(
        "--cases-per-site",
        type=positive_int,
        default=DemoDataOptions.cases_per_site,
        help="training cases per site (default 5)",
    )
    parser.add_argument(
        "--test-per-site",
        type=nonnegative_int,
        default=DemoDataOptions.test_per_site,
        help="held-out test cases per site (default 1)",
    )
    parser.add_argument(
        "--size", type=int, default=DemoDataOptions.size, help="voxels across the longest in-plane extent (default 32)"
    )
    parser.add_argument(
        "--seed", type=seed_int, default=DemoDataOptions.seed, help="the cohort is a pure function of the seed"
    )
    parser.add_argument("--lesion", action="store_true", help="add a synthetic white-matter lesion label (4)")
    parser.add_argument(
        "--pooled", action="store_true", help="all sites' training cases in one folder, pooled/ (a multi-scanner set)"
    )


def run(args: argparse.Namespace) -> int:
    run_demo_data(DemoDataOptions.from_args(args))
    return 0


def run_demo_data(options: DemoDataOptions) -> Path:
    """``gem3d demo-data``: ``gem3d.data.demo_cohort.write_demo_cohort``, and a line saying what it wrote."""
    out = write_demo_cohort(
        options.out,
        sites=options.sites,
        cases_per_site=options.cases_per_site,
        size=options.size,
        seed=options.seed,
        test_per_site=options.test_per_site,
        lesion=options.lesion,
        pooled=options.pooled,
    )
    folders = "pooled" if options.pooled else f"site_0 .. site_{options.sites - 1}"
    print(
        f"demo cohort: {options.sites} sites x {options.cases_per_site} cases, "
        f"{options.sites * options.test_per_site} test cases -> {out} ({folders}, test)"
    )
    return out
