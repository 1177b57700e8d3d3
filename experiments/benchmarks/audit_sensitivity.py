"""How sensitive is the memorization audit? Planted copies caught, and false alarms on new patients (issue 12.5).

On a demo cohort (``write_demo_cohort``: one site, ``--cases`` training patients, and held-out
patients of the same site: ``--reference`` of them are the audit's holdout reference, ``--new``
others play a clean synthetic cohort), every training patient is copied once with each of
``privacy.audit.COPY_KINDS`` (flips, shifts, intensity scale, gamma, noise, one copied slice in a
new patient), and ``memorization_audit`` runs once on all copies together with the new patients.
It prints, per kind, the fraction of copies caught (by any check, by the whole-volume check, by
the slice check) and the false-alarm rate: the fraction of new patients flagged. The same runs
with the leave-one-out reference (no holdout) when ``--leave-one-out`` is given.

    .venv/bin/python experiments/benchmarks/audit_sensitivity.py [--cases 24] [--reference 20] [--new 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo's packages before this folder's scripts

from experiments.benchmarks import machine, markdown_table
from experiments.commands.runner import report_errors
from gem3d.config import DataConfig
from gem3d.data.dataset import load_volumes
from gem3d.data.demo_cohort import write_demo_cohort
from gem3d.data.volume import Volume
from privacy.audit import COPY_KINDS, AuditResult, AuditSettings, memorization_audit, planted_copy


def _rows(result: AuditResult, kinds: list[str], cases: int, new: int) -> list[list[str]]:
    flags = {name: result.copy_flags[i] for i, name in enumerate(result.synthetic_ids)}
    volume = {name: result.volume_flags[i] for i, name in enumerate(result.synthetic_ids)}
    sliced = {name: result.slice_flags[i] for i, name in enumerate(result.synthetic_ids)}
    rows = []
    for kind in kinds:
        names = [f"{kind}/{i}" for i in range(cases)]
        rows.append(
            [
                kind,
                f"{np.mean([flags[n] for n in names]):.2f}",
                f"{np.mean([volume[n] for n in names]):.2f}",
                f"{np.mean([sliced[n] for n in names]):.2f}",
            ]
        )
    alarms = [flags[f"new/{i}"] for i in range(new)]
    vol_alarms = [volume[f"new/{i}"] for i in range(new)]
    slice_alarms = [sliced[f"new/{i}"] for i in range(new)]
    rows.append(
        [
            f"false alarms (new patients, n={new})",
            f"{np.mean(alarms):.3f}",
            f"{np.mean(vol_alarms):.3f}",
            f"{np.mean(slice_alarms):.3f}",
        ]
    )
    return rows


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=24, help="training patients (each copied once per kind)")
    parser.add_argument("--reference", type=int, default=20, help="held-out patients used as the holdout reference")
    parser.add_argument("--new", type=int, default=40, help="other held-out patients, the clean 'synthetic' set")
    parser.add_argument("--size", type=int, default=32, help="demo cohort size (voxels in-plane)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (and the noise of the noisy copies)")
    parser.add_argument("--quantile", type=float, default=0.05)
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--kinds", default=",".join(COPY_KINDS), help="comma-separated copy kinds")
    parser.add_argument("--leave-one-out", action="store_true", help="also run without a holdout")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def load_cohort(args: argparse.Namespace, data: DataConfig) -> tuple[list[Volume], list[Volume]]:
    """The demo cohort's training patients and its held-out patients (reference, then new ones)."""
    with tempfile.TemporaryDirectory(prefix="gem3d-audit-bench-") as tmp:
        root = write_demo_cohort(
            Path(tmp) / "cohort",
            sites=1,
            cases_per_site=args.cases,
            size=args.size,
            seed=args.seed,
            test_per_site=args.reference + args.new,
        )
        return load_volumes(root / "site_0", data), load_volumes(root / "test", data)


def synthetic_cohort(train: list[Volume], new: list[Volume], kinds: list[str], seed: int) -> list[Volume]:
    """The new patients (``new/i``), then a planted copy of every training patient per kind (``kind/i``)."""
    rng = np.random.default_rng(seed)
    synthetic = [replace(v, case_id=f"new/{i}") for i, v in enumerate(new)]
    for kind in kinds:
        for i, source in enumerate(train):
            other = new[i % len(new)].image  # the copied slice goes into a new patient's volume
            image = planted_copy(kind, source.image, other, rng)
            synthetic.append(replace(source, case_id=f"{kind}/{i}", image=image))
    return synthetic


def print_setup(
    args: argparse.Namespace, train: list[Volume], reference: list[Volume], new: list[Volume], settings: AuditSettings
) -> None:
    """The header line: machine, cohort, and the audit's settings."""
    info = machine(args.threads)
    print(
        f"{info['date']}, {info['cpu']}, {info['cores']} cores, load {info['load_average']}, torch {info['torch']}; "
        f"demo cohort seed {args.seed}: {len(train)} training, {len(reference)} reference, {len(new)} new patients, "
        f"volumes {train[0].image.shape}; quantile {args.quantile:g}, margin {args.margin:g}, grid {args.grid}^3, "
        f"smoothing {settings.smoothing:g}, residual shifts +-{settings.max_shift}"
    )


def closest_new(result: AuditResult) -> dict[str, float]:
    """Per space, the nearest new patient's distance in units of the copy threshold."""
    clean = np.array([name.startswith("new/") for name in result.synthetic_ids])
    return {
        space: float(result.synthetic_nn[space][clean].min() / threshold)
        for space, threshold in result.thresholds.items()
    }


def print_audit(
    name: str, result: AuditResult, seconds: float, audited: int, kinds: list[str], cases: int, new: int
) -> None:
    """One reference's audit of ``audited`` volumes: its line, the table of copies caught, the closest new patient."""
    print(
        f"\nreference: {name} ({result.reference_cases} cases); {audited} synthetic volumes audited in "
        f"{seconds:.1f} s; thresholds "
        + ", ".join(f"{space} {value:.4f}" for space, value in result.thresholds.items())
    )
    print(
        markdown_table(
            ["copy kind", "caught (any check)", "whole-volume check", "slice check"],
            _rows(result, kinds, cases, new),
        )
    )
    print(
        "closest new patient, in units of the copy threshold (> 1 passes): "
        + ", ".join(f"{space} {value:.2f}" for space, value in closest_new(result).items())
    )


def main() -> None:
    """Plant copies of a demo cohort's training patients, audit them with each reference, print the tables."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    kinds = [k for k in args.kinds.split(",") if k]
    data = DataConfig(image_size=args.size, window=4, num_labels=4)
    train, held_out = load_cohort(args, data)
    reference, new = held_out[: args.reference], held_out[args.reference :]
    synthetic = synthetic_cohort(train, new, kinds, args.seed)
    settings = AuditSettings(grid=(args.grid,) * 3, quantile=args.quantile, margin=args.margin)
    print_setup(args, train, reference, new, settings)
    references: list[tuple[str, list[Volume] | None]] = [("holdout", reference)]
    if args.leave_one_out:
        references.append(("leave-one-out", None))
    for name, holdout in references:
        started = time.perf_counter()
        result = memorization_audit(synthetic, train, holdout, settings)
        seconds = time.perf_counter() - started
        print_audit(name, result, seconds, len(synthetic), kinds, len(train), len(new))


if __name__ == "__main__":
    raise SystemExit(report_errors("benchmark audit_sensitivity", main))
