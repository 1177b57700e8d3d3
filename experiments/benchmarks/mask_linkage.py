"""How linkable are released masks to their source patients? The linkage attack against mask-edit recipes.

For each recipe of ``gem3d.masks`` edits, every training mask of a dataset is edited ``--per-case``
times (seeded), and ``privacy.linkage.linkage_test`` plays the recipient's attack: the nearest
training mask by foreground Dice under flips and shifts. It prints the hit rate (chance is 1/N),
the median Dice of a released mask to its source and the inter-patient Dice of the training set,
side by side for every recipe, so a release policy's mask edits can be chosen by measurement.

    python experiments/benchmarks/mask_linkage.py --data demo_out/data/site_0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo's packages before this folder's scripts

from experiments.commands.runner import report_errors
from gem3d.config import load_config
from gem3d.data.dataset import load_volumes
from gem3d.masks import apply_edits, parse_edits
from privacy.linkage import linkage_test

RECIPES = ("", "flip", "rotate:15,elastic:3", "rotate:30,elastic:6", "elastic:10", "rotate:45,elastic:10,flip")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a site dataset (nnU-Net v2 raw)")
    parser.add_argument("--config", default="experiments/configs/tiny.toml")
    parser.add_argument("--per-case", type=int, default=2)
    parser.add_argument("--recipes", default=";".join(RECIPES), help="';'-separated edit specs ('' = unedited)")
    args = parser.parse_args()
    cfg = load_config(args.config)
    volumes = load_volumes(args.data, cfg.data)
    train = [v.label for v in volumes]
    print(f"{args.data}: {len(train)} training masks, chance hit rate {1 / len(train):.3f}")
    print(f"{'recipe':<28} {'hit rate':>8} {'source Dice':>11} {'inter-patient Dice':>18} {'seconds':>7}")
    for recipe in args.recipes.split(";"):
        rng = np.random.default_rng(0)
        edits = parse_edits(recipe, cfg.data.slice_axis)
        released, sources = [], []
        for index, label in enumerate(train):
            donors = [m for j, m in enumerate(train) if j != index]
            for _ in range(args.per_case):
                edited, _ = apply_edits(label, edits, cfg.data.num_labels, rng, donors=donors)
                released.append(edited)
                sources.append(index)
        started = time.perf_counter()
        result = linkage_test(released, sources, train)
        report = result.report()
        print(
            f"{recipe or '(unedited)':<28} {report['hit_rate']:>8.3f} {report['source_dice_median']:>11.3f} "
            f"{report['inter_patient_dice_median']:>18.3f} {time.perf_counter() - started:>7.1f}"
        )


if __name__ == "__main__":
    raise SystemExit(report_errors("benchmark mask_linkage", main))
