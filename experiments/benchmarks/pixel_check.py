"""The release gate's pixel check at paper size: one matrix product per volume against a difference per pair.

``privacy.release.nearest_slice_rms`` finds, for every informed slice of a release, the nearest
slice of every training volume over the slice's 8 dihedral variants. It used to take a
``[D, 8, H, W]`` difference per (informed slice, training volume) pair; this measures both, side by
side in one process, on random volumes of the brats model grid (default 126 x 128 x 128), and
prints seconds per pair, their ratio, the largest difference between the two results, and the
time each would take for 200 x 200 cases (extrapolated: both are linear in the pairs).

    .venv/bin/python experiments/benchmarks/pixel_check.py [--cases 64] [--volumes 8] [--size 128] [--depth 126]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks import machine, markdown_table, positive_int
from experiments.commands.runner import report_errors
from gem3d.data.volume import Volume
from privacy.audit import dihedral
from privacy.release import nearest_slice_rms


def pair_by_pair(slices: list[np.ndarray], real: list[Volume]) -> np.ndarray:
    """The check as it was: a ``[D, 8, H, W]`` difference for each (slice, volume) pair."""
    best = np.full(len(slices), np.inf)
    for index, image in enumerate(slices):
        variants = torch.cat(list(dihedral(torch.from_numpy(image)[None, None])))[:, 0].numpy()
        for volume in real:
            squared = ((volume.image[:, None] - variants[None]) ** 2).mean(axis=(2, 3))
            best[index] = min(best[index], float(np.sqrt(squared.min())))
    return best


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=positive_int, default=64, help="informed slices (default 64)")
    parser.add_argument("--volumes", type=positive_int, default=8, help="training volumes (default 8)")
    parser.add_argument("--size", type=positive_int, default=128, help="slice size (default 128, brats)")
    parser.add_argument("--depth", type=positive_int, default=126, help="slices per volume (default 126, brats)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch intra-op threads (default 2)")
    return parser


def measure(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Both searches over the same seeded random slices and volumes: seconds and results per search."""
    rng = np.random.default_rng(0)
    shape = (args.depth, args.size, args.size)
    real = [Volume(f"r{i}", rng.uniform(-1, 1, shape).astype(np.float32), np.zeros(shape, np.uint8))
            for i in range(args.volumes)]  # fmt: skip
    slices = [rng.uniform(-1, 1, shape[1:]).astype(np.float32) for _ in range(args.cases)]
    seconds, results = {}, {}
    for name, search in (("matrix product", nearest_slice_rms), ("pair by pair", pair_by_pair)):
        started = time.perf_counter()
        results[name] = search(slices, real)
        seconds[name] = time.perf_counter() - started
    return seconds, results


def main() -> int:
    """Time both searches side by side; print the table and the ratio."""
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    seconds, results = measure(args)
    pairs = args.cases * args.volumes
    rows = [
        [name, f"{t:.2f}", f"{1000 * t / pairs:.2f}", f"{t / pairs * 40000 / 60:.1f}"] for name, t in seconds.items()
    ]
    print(f"# pixel_check: {json.dumps(machine(args.threads))}")
    print(f"# {args.cases} informed slices x {args.volumes} volumes of {[args.depth, args.size, args.size]}, float32")
    print(markdown_table(["search", "seconds", "ms a pair", "200 x 200 cases, minutes"], rows))
    ratio = seconds["pair by pair"] / seconds["matrix product"]
    difference = float(np.abs(results["matrix product"] - results["pair by pair"]).max())
    print(f"pair by pair / matrix product: {ratio:.1f}x; largest difference of the RMS found: {difference:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(report_errors("benchmark pixel_check", main))
