"""Cohort generation on 1 and 2 Ray workers: throughput side by side, and the bytes compared (issue 16, point 5).

One run: a run folder of the config trained a few steps on phantoms (throughput does not depend
on the weights), a phantom dataset of ``--cases`` cases, then ``gem3d.enhance.enhance`` (copied
informed slices, one pair per case, ``--steps`` sampler steps) three times:

* in this process (``torch`` with every core's thread), for reference;
* on 1 Ray worker and on 2 Ray workers (``experiments.cohort_workers``, one torch thread each),
  each timed from the first chunk sent to the last volume written, with the actors started and
  their models loaded (by a warm-up run) before the clock starts.

It prints volumes/s of each, the 2-vs-1 ratio (target >= 1.7x on this 2-core machine), whether
the 2-worker arrays equal the 1-worker ones (the contract), and whether the in-process ones do
too (they need not: a different thread count may round differently).

    .venv/bin/python experiments/benchmarks/cohort_workers.py [--config tiny] [--cases 16] [--steps 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.benchmarks import machine
from experiments.cohort_workers import RayChunks, WorkerSettings
from experiments.commands.runner import report_errors
from experiments.configs import resolve_config_path
from gem3d.config import load_config
from gem3d.data.dataset import load_volumes
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.enhance import enhance
from gem3d.runs import train_stage
from gem3d.synthesis import Synthesiser, load_synthesiser


def arrays(folder: Path) -> dict[str, np.ndarray]:
    """Every image and label array of a written dataset, by file."""
    return {
        f"{kind}/{path.name}": np.asarray(nib.Nifti1Image.from_filename(str(path)).dataobj)
        for kind in ("imagesTr", "labelsTr")
        for path in sorted((folder / kind).glob("*.nii.gz"))
    }


def timed_enhance(synth: Synthesiser, data: Path, out: Path) -> float:
    started = time.perf_counter()
    enhance(synth, data, out, 1, "copy", seed=0)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--cases", type=int, default=16, help="cases in the dataset (one new pair each)")
    parser.add_argument("--depth", type=int, default=40, help="slices per phantom case")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps per volume")
    args = parser.parse_args()
    cfg = load_config(resolve_config_path(args.config), {"train.device": "cpu", "train.checkpoint_every": 0})
    size = cfg.data.image_size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_phantom_dataset(root / "data", args.cases, (size, size, args.depth), cfg.data.num_labels, seed=0)
        volumes = load_volumes(data, cfg.data)
        train_stage(cfg, volumes, "slice", root / "run", steps=2)
        train_stage(cfg, volumes, "volume", root / "run", steps=2)
        synth = load_synthesiser(root / "run", "cpu", args.steps)
        alone_s = timed_enhance(synth, data, root / "alone")
        seconds, same = {}, {}
        for workers in (1, 2):
            settings = WorkerSettings(workers=workers)
            with RayChunks(settings, root / "run", "cpu", args.steps) as chunks:
                # warm: actors started, models loaded, first network call made
                warm = enhance(replace(synth, sample_chunks=chunks), data, root / f"warm{workers}", 1, "copy", seed=1)
                del warm
                seconds[workers] = timed_enhance(replace(synth, sample_chunks=chunks), data, root / f"w{workers}")
        reference = arrays(root / "w1")
        for name in ("w2", "alone"):
            written = arrays(root / name)
            same[name] = written.keys() == reference.keys() and all(
                np.array_equal(written[key], reference[key]) for key in reference
            )
    info = machine(torch.get_num_threads())
    print(f"# cohort_workers: {info}")
    print(
        f"config {args.config}: {args.cases} cases [{args.depth}, {size}, {size}] -> 1 pair each, "
        f"{args.steps} sampler steps, sampler.batch_volumes {cfg.sampler.batch_volumes}"
    )
    threads = torch.get_num_threads()
    print(f"in this process ({threads} threads): {args.cases / alone_s:6.3f} volumes/s ({alone_s:.1f} s)")
    for workers in (1, 2):
        rate, taken = args.cases / seconds[workers], seconds[workers]
        print(f"{workers} Ray worker(s), 1 thread:  {rate:6.3f} volumes/s ({taken:.1f} s)")
    print(f"2 workers write the 1-worker bytes: {same['w2']}; in-process ({threads} threads) too: {same['alone']}")
    ratio = seconds[1] / seconds[2]
    print(f"2 workers vs 1: {ratio:.2f}x (target >= 1.7x: {'met' if ratio >= 1.7 else 'not met'})")
    return 0 if same["w2"] else 1


if __name__ == "__main__":
    raise SystemExit(report_errors("benchmark cohort_workers", main))
