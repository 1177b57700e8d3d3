"""Shared pieces of the sampling and analysis commands: options, progress bars, mask edits, MLflow runs."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from experiments.commands.common import add_track_argument, open_tracker
from experiments.previews import case_preview
from experiments.tracking import Tracker
from gem3d.apps import Job, Synthesiser, load_synthesiser, real_original, run_jobs, to_original, write_volume
from gem3d.config import Config
from gem3d.data.geometry import CaseGeometry

# argparse fields that are not the command's own options: the dispatcher's handler and name, and
# --track (where the run is logged says nothing about the run).
_NOT_PARAMS = ("handler", "command", "track")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="run folder (or a volume checkpoint file)")
    parser.add_argument("--seed", type=int, default=0, help="seeds all sampling noise (default 0)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: diffusion.inference_steps of the run)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: the run's train.device)")


def open_synthesiser(args: argparse.Namespace) -> Synthesiser:
    return load_synthesiser(args.checkpoint, args.device, args.steps)


class ProgressBars:
    """One tqdm bar per volume, with its ETA; used as the sampler's ``on_progress``."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.bars: dict[int, tqdm] = {}

    def __call__(self, index: int, done: int, total: int) -> None:
        if index not in self.bars:
            name = self.names[index] if index < len(self.names) else f"volume {index}"
            self.bars[index] = tqdm(total=total, desc=name, unit="window", leave=False, dynamic_ncols=True)
        bar = self.bars[index]
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def mask_editor(
    spec: str | None, num_labels: int, seed: int
) -> Callable[[np.ndarray], tuple[np.ndarray, list[dict[str, Any]]]] | None:
    """A function applying ``--mask-edit`` edits to a model-grid mask, or None without edits."""
    if not spec:
        return None
    from gem3d.masks import apply_edits, parse_edits

    edits = parse_edits(spec)

    def edit(label: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
        return apply_edits(label, edits, num_labels, np.random.default_rng(seed))

    return edit


def single_outputs(out: Path) -> tuple[Path, Path]:
    """The provenance JSON and the PNG preview ``write_single`` writes beside ``out`` (``X.nii.gz``)."""
    stem = out.name.removesuffix(".gz").removesuffix(".nii")
    return out.with_name(f"{stem}.provenance.json"), out.with_name(f"{stem}.png")


def write_single(synth: Synthesiser, job: Job, out: Path) -> tuple[np.ndarray, CaseGeometry]:
    """Sample one job with a progress bar, write ``out`` + provenance + a PNG preview (``single_outputs``).

    Returns:
        the written label map ``[X, Y, Z]`` (the job's mask in its original grid) and its geometry.
    """
    bars = ProgressBars([out.name])
    try:
        (volume,) = run_jobs(synth, [job], bars)
    finally:
        bars.close()
    image, label, geometry = to_original(volume, job)
    write_volume(out, image, geometry, job.provenance)
    case_preview(single_outputs(out)[1], image, label, geometry, real_original(job))
    return label, geometry


def add_track_option(parser: argparse.ArgumentParser) -> None:
    """``--track DIR|off`` of a sampling or analysis command; the default store is beside ``--out``."""
    add_track_argument(parser, "mlflow/ beside --out, in its parent folder")


def default_store(out: Path) -> Path:
    """The MLflow store of a command writing ``out``: ``mlflow/`` beside it, in its parent folder.

    Beside, never inside: an output dataset must stay a clean nnU-Net raw folder, and the outputs
    of one project folder (the demo's ``demo_out/``) share one store.
    """
    return out.parent / "mlflow"


def _run_name(out: Path) -> str:
    name = out.name
    for suffix in (".nii.gz", ".nii", ".json"):
        name = name.removesuffix(suffix)
    return name or out.name


def command_params(args: argparse.Namespace) -> dict[str, Any]:
    """The command's own options as MLflow params, ``args.<option>`` (paths as strings, None as "None")."""
    return {f"args.{key}": value for key, value in sorted(vars(args).items()) if key not in _NOT_PARAMS}


class CommandRun:
    """A command's MLflow run (or none, with ``--track off``) and its wall-clock time.

    Args:
        tracker: the open run, or None when tracking is off.
        started: ``time.perf_counter()`` when the command began (model loading counts).
    """

    def __init__(self, tracker: Tracker | None, started: float) -> None:
        self.tracker = tracker
        self.started = started

    def finish(
        self,
        cases: int | None,
        metrics: Mapping[str, Any] | None = None,
        artifacts: Sequence[tuple[Path, str | None]] = (),
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        """Log the outcome: ``cases`` written, seconds, extra ``metrics``, ``tags`` and ``artifacts``.

        Args:
            cases: volumes written (None for a command that writes none, such as the audit).
            artifacts: (file or folder, artifact folder or None) pairs; missing paths are skipped.
        """
        if self.tracker is None:
            return
        seconds = time.perf_counter() - self.started
        figures: dict[str, Any] = {"seconds_total": seconds}
        if cases is not None:
            figures["cases"] = cases
            if cases > 0:
                figures["seconds_per_volume"] = seconds / cases
        self.tracker.log_metrics({**figures, **(metrics or {})})
        self.tracker.set_tags(tags or {})
        for path, folder in artifacts:
            if path.exists():
                self.tracker.log_artifact(path, folder)


@contextmanager
def tracked(
    args: argparse.Namespace,
    command: str,
    cfg: Config | None,
    started: float,
    checkpoints: Mapping[str, str] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[CommandRun]:
    """The MLflow run of one sampling or analysis command, in experiment ``gem3d-<command>``.

    Opens the run in ``--track`` (default: ``default_store(args.out)``) with the config's flattened
    fields and the command's options (``command_params``) as params, the checkpoint hashes as tags
    (``checkpoint_sha256.<stage>``) and the config as ``config.json``. The run ends FAILED if the
    block raises. Tracking never breaks the command: a store that cannot be written warns once and
    the rest of the logging is skipped.

    Args:
        cfg: the config the command ran with (the checkpoint's), or None.
        started: ``time.perf_counter()`` at the command's start, for ``seconds_total``.
        checkpoints: stage -> sha256 of the checkpoint files used.
    """
    tracker = open_tracker(args, default_store(args.out), command, _run_name(args.out), cfg)
    if tracker is None:
        yield CommandRun(None, started)
        return
    with tracker:
        tracker.log_params(command_params(args))
        hashes = {f"checkpoint_sha256.{stage}": digest for stage, digest in (checkpoints or {}).items()}
        tracker.set_tags({"gem3d.command": command, **hashes, **(tags or {})})
        if cfg is not None:
            tracker.log_dict(cfg.model_dump(mode="json"), "config.json")
        yield CommandRun(tracker, started)
