"""The [cli] half of the evaluation protocol (``PROTOCOL.md``): generate with every method, then score.

``evaluate(...)`` loads the held-out cohort and the run, builds each method's generator (GEM-3D,
the ``mask_only`` run, the same run with independent windows, the ``full_3d`` baseline), samples
the protocol's volumes, and hands them to the metrics library (``method_report``,
``downstream_utility``). It returns the report dict; ``gem3d evaluate`` writes it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experiments.evaluation.arrays import anatomical_views
from experiments.evaluation.baselines import FULL3D_CHANNELS, FULL3D_FILE, Full3D, train_mask_only
from experiments.evaluation.distribution import FeatureExtractor
from experiments.evaluation.downstream import downstream_utility, segmentation_dice
from experiments.evaluation.protocol import (
    DIVERSITY_SAMPLES,
    DOWNSTREAM_SEEDS,
    DOWNSTREAM_STEPS,
    MAIN_SEED,
    METHODS,
    PROTOCOL_VERSION,
    SYNTHETIC_PER_CASE,
    SYNTHETIC_SEED_BASE,
    CaseResult,
    method_report,
    seam_boundaries,
    split_cases,
)
from experiments.previews import save_figure
from gem3d.apps import Synthesiser, generated_informed, load_synthesiser
from gem3d.checkpoint import read_metadata
from gem3d.config import Config
from gem3d.data.dataset import load_volumes
from gem3d.data.volume import Volume, fingerprint
from gem3d.diffusion import make_sampler
from gem3d.errors import CheckpointError, DataError
from gem3d.files import work_folder_beside
from gem3d.runs import STAGE_FILES
from gem3d.sampler import InformedSlice, SampleRequest, Window, default_start, plan_windows, sample_volumes
from privacy.site_state import SiteState, default_state_dir, fingerprint_matches

# CLI spellings of the baselines -> protocol method keys.
BASELINE_NAMES = {
    "mask-only": "mask_only",
    "mask_only": "mask_only",
    "no-overlap": "independent_windows",
    "independent-windows": "independent_windows",
    "independent_windows": "independent_windows",
    "full-3d": "full_3d",
    "full_3d": "full_3d",
}
BASELINES = ("mask_only", "independent_windows", "full_3d")
TILE_SEED_STRIDE = 1000  # independent windows: tile k of a volume with seed s uses seed s * 1000 + k

Log = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    """What the protocol fixes, and what ``--quick`` may reduce (every change is a deviation).

    Attributes:
        sampler_steps: caps the DDIM steps; None = the run's ``diffusion.inference_steps``.
        diversity_samples: samples per mask (seeds 0..K-1); 1 turns diversity off.
        downstream_seeds / downstream_steps: the segmentation task's seeds and steps.
        synthetic_per_case: synthetic volumes per real downstream training case.
        baseline_step_cap: caps the baselines' training steps (None = the main run's steps).
        full3d_channels: widths of the full-3D baseline's UNet levels when it is trained here.
        deviations: a sentence per change from the protocol.
    """

    sampler_steps: int | None = None
    diversity_samples: int = DIVERSITY_SAMPLES
    downstream_seeds: tuple[int, ...] = DOWNSTREAM_SEEDS
    downstream_steps: int = DOWNSTREAM_STEPS
    synthetic_per_case: int = SYNTHETIC_PER_CASE
    baseline_step_cap: int | None = None
    full3d_channels: tuple[int, ...] = FULL3D_CHANNELS
    deviations: tuple[str, ...] = ()


def quick_settings(seeds: Sequence[int] | None = None) -> Settings:
    """The reduced CPU smoke setting of ``--quick``: few steps, 2 diversity samples, 1 downstream seed."""
    chosen = tuple(seeds) if seeds is not None else (0,)
    return Settings(
        sampler_steps=10,
        diversity_samples=2,
        downstream_seeds=chosen,
        downstream_steps=20,
        synthetic_per_case=1,
        baseline_step_cap=50,
        full3d_channels=(8, 16, 16),
        deviations=(
            "--quick: DDIM steps capped at 10 (fewer if the run's config has fewer)",
            "--quick: 2 diversity samples per mask instead of 4",
            f"--quick: downstream seeds {list(chosen)} and a 20-step cap "
            f"instead of {list(DOWNSTREAM_SEEDS)} and {DOWNSTREAM_STEPS}",
            "--quick: 1 synthetic volume per downstream training case instead of 2",
            "--quick: baselines trained for at most 50 steps per stage",
            "--quick: full-3D baseline UNet channels (8, 16, 16) instead of (16, 32, 32)",
        ),
    )


@dataclass
class Method:
    """One method's generator.

    ``generate(cases, informed, seed)`` returns one ``[D, H, W]`` volume per case (its label is the
    mask); ``boundaries(depth, start)`` gives the seam boundaries of that volume (empty: no windows).
    """

    key: str
    generate: Callable[[Sequence[Volume], Sequence[InformedSlice], int], list[np.ndarray]]
    boundaries: Callable[[int, int], list[int]]
    uses_informed: bool = True
    notes: list[str] = field(default_factory=list)


def eval_data_folder(data: Path) -> Path:
    """``DIR`` itself (an nnU-Net raw dataset or a prepared cache), or ``DIR/test`` for a cohort root."""
    if not data.is_dir():
        raise DataError(f"{data}: evaluation data folder not found")
    if not (data / "labelsTr").is_dir() and (data / "test" / "labelsTr").is_dir():
        return data / "test"
    return data


def _overlapped(synth: Synthesiser, key: str, overlap: int) -> Method:
    """GEM-3D's bi-directional overlapped sampler with the run's (or a baseline run's) volume model."""
    cfg = synth.cfg
    window = cfg.data.window

    def generate(cases: Sequence[Volume], informed: Sequence[InformedSlice], seed: int) -> list[np.ndarray]:
        requests = [
            SampleRequest(case.label, slice_, default_start(case.label), seed)
            for case, slice_ in zip(cases, informed, strict=True)
        ]
        return sample_volumes(
            synth.volume_model,
            synth.sampler,
            requests,
            window,
            overlap,
            cfg.sampler.batch_volumes,
        )

    def boundaries(depth: int, start: int) -> list[int]:
        plan = [w for round_ in plan_windows(depth, start, window, overlap) for w in round_]
        return seam_boundaries(plan, depth)

    return Method(key, generate, boundaries, uses_informed=cfg.model.informed_slice)


def _tiles(depth: int, window: int) -> list[Window]:
    """``[0, W), [W, 2W), ...``; the last tile may be shorter."""
    return [Window(start, min(window, depth - start)) for start in range(0, depth, window)]


def _independent(synth: Synthesiser) -> Method:
    """The run's volume model on independent tiles: no carried slices, each tile from its own noise."""
    cfg = synth.cfg
    window = cfg.data.window

    def generate(cases: Sequence[Volume], informed: Sequence[InformedSlice], seed: int) -> list[np.ndarray]:
        requests, owners = [], []
        for index, (case, slice_) in enumerate(zip(cases, informed, strict=True)):
            for k, tile in enumerate(_tiles(case.label.shape[0], window)):
                mask = np.ascontiguousarray(case.label[tile.start : tile.stop])
                # One window per tile: a tile is never longer than W, so plan_windows gives one round.
                requests.append(SampleRequest(mask, slice_, 0, seed * TILE_SEED_STRIDE + k))
                owners.append((index, tile))
        pieces = sample_volumes(synth.volume_model, synth.sampler, requests, window, 0, cfg.sampler.batch_volumes)
        volumes = [np.zeros(case.label.shape, np.float32) for case in cases]
        for (index, tile), piece in zip(owners, pieces, strict=True):
            volumes[index][tile.start : tile.stop] = piece
        return volumes

    def boundaries(depth: int, start: int) -> list[int]:
        return seam_boundaries(_tiles(depth, window), depth)

    return Method("independent_windows", generate, boundaries)


def _full_3d(model: Full3D, steps: int | None) -> Method:
    """The whole-volume baseline: no informed slice, no windows (so no seam ratio)."""

    def generate(cases: Sequence[Volume], informed: Sequence[InformedSlice], seed: int) -> list[np.ndarray]:
        return model.sample([case.label for case in cases], [seed] * len(cases), steps)

    return Method("full_3d", generate, lambda depth, start: [], uses_informed=False)


def _real_informed(case: Volume) -> InformedSlice:
    """The protocol's informed slice: the case's own real slice at ``default_start``."""
    z = default_start(case.label)
    return InformedSlice(case.image[z], case.label[z], "real", {"case": case.case_id, "model_index": z})


def _stage_steps(checkpoint: Path, cfg: Config) -> dict[str, int]:
    """Steps the main run trained per stage (checkpoint metadata; the config's when not in a run folder)."""
    steps = {}
    for stage in ("slice", "volume"):
        path = checkpoint / STAGE_FILES[stage] if checkpoint.is_dir() else None
        if path is not None and path.exists():
            steps[stage] = int(read_metadata(path).get("step", getattr(cfg.train, f"steps_{stage}")))
        else:
            steps[stage] = int(getattr(cfg.train, f"steps_{stage}"))
    return steps


def _load_baseline_run(path: Path, device: str | None, steps: int | None, main: Config) -> Synthesiser:
    """A ``mask_only`` run folder; it must really be one (``model.informed_slice = false``)."""
    synth = load_synthesiser(path, device, steps)
    if synth.cfg.model.informed_slice:
        raise CheckpointError(f"{path}: is not a mask-only run (its config has model.informed_slice = true)")
    if synth.cfg.data.window != main.data.window or synth.cfg.data.image_size != main.data.image_size:
        raise CheckpointError(f"{path}: its data grid (window, image size) differs from the evaluated run's")
    return synth


def _train_baselines_into(
    folder: Path,
    wanted: set[str],
    cfg: Config,
    train_volumes: list[Volume],
    steps: dict[str, int],
    channels: tuple[int, ...],
    log: Log,
) -> dict[str, Path]:
    """Train the requested trainable baselines into ``folder`` (atomically: a temp folder, then rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = work_folder_beside(folder)
    try:
        made: dict[str, Path] = {}
        if "mask_only" in wanted:
            log(f"baseline mask_only: training slice {steps['slice']} + volume {steps['volume']} steps")
            train_mask_only(cfg, train_volumes, tmp / "mask_only", steps)
            made["mask_only"] = folder / "mask_only"
        if "full_3d" in wanted:
            total = steps["slice"] + steps["volume"]
            log(f"baseline full_3d: training {total} steps")
            model = Full3D(cfg, channels)
            model.train(train_volumes, total)
            model.save(tmp / FULL3D_FILE, train_volumes)
            made["full_3d"] = folder / FULL3D_FILE
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return made
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _stderr(message: str) -> None:
    print(f"[evaluate] {message}", file=sys.stderr, flush=True)


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    *,
    methods: Sequence[str] = METHODS,
    baseline_checkpoints: dict[str, str | Path] | None = None,
    train_data: str | Path | None = None,
    baselines_dir: str | Path | None = None,
    extractor: FeatureExtractor,
    settings: Settings | None = None,
    device: str | None = None,
    downstream: bool = True,
    log: Log = _stderr,
) -> tuple[dict[str, Any], dict[str, list[CaseResult]]]:
    """Run the protocol; returns (the report dict, the scored cases per method, for pictures).

    Args:
        checkpoint: the evaluated run folder (volume stage, and informed stage when present).
        data: held-out cases (nnU-Net raw dataset, prepared cache, or cohort root with ``test/``).
        methods: ``gem3d`` plus the baselines to run; the rest are reported as skipped.
        baseline_checkpoints: ``mask_only`` -> run folder, ``full_3d`` -> checkpoint file.
        train_data: the main run's training data, to train the baselines not given.
        baselines_dir: where trained baselines go (required with ``train_data``).
        extractor: the FID/MMD features (its ``name`` goes in the report).
        downstream: False skips the segmentation task (reported as skipped, listed as a deviation).
    """
    settings = settings or Settings()
    baseline_checkpoints = dict(baseline_checkpoints or {})
    checkpoint = Path(checkpoint)
    synth = load_synthesiser(checkpoint, device)
    cfg = synth.cfg
    sampler_steps = min(cfg.diffusion.inference_steps, settings.sampler_steps or cfg.diffusion.inference_steps)
    if sampler_steps != cfg.diffusion.inference_steps:
        synth = dataclasses.replace(synth, sampler=make_sampler(cfg.diffusion, sampler_steps))
    folder = eval_data_folder(Path(data))
    cases = sorted(load_volumes(folder, cfg.data), key=lambda v: v.case_id)
    if not cases:
        raise DataError(f"{folder}: no cases found")
    deviations = list(settings.deviations)
    if not cfg.model.informed_slice:
        raise CheckpointError(f"{checkpoint}: is a mask-only run; evaluate the GEM-3D run and pass it as a baseline")

    # -- baselines ------------------------------------------------------------------------------
    train_volumes: list[Volume] | None = None
    if train_data is not None:
        train_volumes = load_volumes(Path(train_data), cfg.data)
        shared = sorted({v.case_id for v in train_volumes} & {v.case_id for v in cases})
        if shared:
            raise DataError(f"{folder}: cases {shared} are also in the training data {train_data}; use held-out cases")
        stored = read_metadata(synth_path(checkpoint)).get("data_fingerprint")
        site = SiteState(default_state_dir(Path(train_data)))
        if stored is not None and fingerprint_matches(str(stored), train_volumes, site) is False:
            deviations.append(
                f"{train_data}: its fingerprint differs from the one the run was trained on; baselines trained on it"
            )
    steps = _stage_steps(checkpoint, cfg)
    if settings.baseline_step_cap is not None:
        steps = {stage: min(n, settings.baseline_step_cap) for stage, n in steps.items()}
    to_train = {m for m in ("mask_only", "full_3d") if m in methods and m not in baseline_checkpoints}
    if to_train and train_volumes is not None:
        if baselines_dir is None:
            raise ValueError("baselines_dir is required to train baselines")
        baseline_checkpoints.update(
            _train_baselines_into(
                Path(baselines_dir), to_train, cfg, train_volumes, steps, settings.full3d_channels, log
            )
        )

    runnable: dict[str, Method] = {"gem3d": _overlapped(synth, "gem3d", cfg.sampler.overlap)}
    skipped: dict[str, str] = {}
    for key in BASELINES:
        if key not in methods:
            skipped[key] = "not requested (--baselines)"
        elif key == "independent_windows":
            runnable[key] = _independent(synth)
        elif key not in baseline_checkpoints:
            skipped[key] = f"no {key} model: pass --baseline-checkpoint {key}=PATH or --train-data DIR"
        elif key == "mask_only":
            baseline = _load_baseline_run(Path(baseline_checkpoints[key]), device, sampler_steps, cfg)
            runnable[key] = _overlapped(baseline, key, baseline.cfg.sampler.overlap)
        else:
            runnable[key] = _full_3d(Full3D.load(baseline_checkpoints[key]), sampler_steps)

    # -- generation and per-method metrics -----------------------------------------------------
    views = anatomical_views(cfg.data.slice_axis)
    informed = [_real_informed(case) for case in cases]
    scored: dict[str, list[CaseResult]] = {}
    reports: dict[str, Any] = {}
    for key, method in runnable.items():
        log(f"{key}: sampling {len(cases)} cases x {settings.diversity_samples} seeds")
        samples = [method.generate(cases, informed, MAIN_SEED + k) for k in range(settings.diversity_samples)]
        results = [
            CaseResult(
                case.case_id,
                case.image,
                case.label,
                samples[0][i],
                method.boundaries(case.label.shape[0], default_start(case.label)),
                [samples[k][i] for k in range(1, settings.diversity_samples)],
            )
            for i, case in enumerate(cases)
        ]
        scored[key] = results
        reports[key] = method_report(results, extractor, views)
    for key, reason in skipped.items():
        reports[key] = {"skipped": reason}
    mask_only = reports.get("mask_only", {})
    with_informed = reports["gem3d"]["appearance"]["foreground_mean"]
    without_informed = mask_only["appearance"]["foreground_mean"] if "appearance" in mask_only else None
    appearance = {
        "with_informed": with_informed,
        "without_informed": without_informed,
        # the informed slice's effect (issue 18 target: at most 0.5): < 1 means it carried appearance
        "ratio": with_informed / without_informed if without_informed else None,
    }

    # -- downstream utility --------------------------------------------------------------------
    informed_source = "generate" if synth.informed_model is not None else "real"
    if downstream:
        downstream_report = _downstream(cases, runnable, synth, settings, cfg, informed_source, log)
    else:
        downstream_report = {"skipped": "--no-downstream"}
        deviations.append("--no-downstream: the segmentation task was not run")

    report = {
        "protocol": PROTOCOL_VERSION,
        "checkpoint": {"path": str(checkpoint), "sha256": synth.checkpoints},
        "data": {"path": str(folder), "fingerprint": fingerprint(cases), "cases": [c.case_id for c in cases]},
        "settings": {
            "sampler_steps": len(synth.sampler.timesteps),
            "eta": cfg.diffusion.eta,
            "window": cfg.data.window,
            "overlap": cfg.sampler.overlap,
            "informed_slice": "real@default_start",
            "main_seed": MAIN_SEED,
            "diversity_samples": settings.diversity_samples,
            "feature_extractor": getattr(extractor, "name", type(extractor).__name__),
            "views": views,
            "data_range": 2.0,
            "downstream": {
                "seeds": list(settings.downstream_seeds),
                "max_steps": settings.downstream_steps,
                "synthetic_per_case": settings.synthetic_per_case,
                "informed": informed_source,
            },
            "baselines": {
                "checkpoints": {k: str(v) for k, v in baseline_checkpoints.items()},
                "training_steps": steps,
                "full_3d_steps": steps["slice"] + steps["volume"],
                "full_3d_channels": list(settings.full3d_channels),
                "independent_windows_tile_seed": f"seed * {TILE_SEED_STRIDE} + tile index",
            },
        },
        "deviations": deviations,
        "methods": reports,
        "appearance_transfer": appearance,
        "downstream": downstream_report,
    }
    return report, scored


def synth_path(checkpoint: Path) -> Path:
    """The volume-stage checkpoint file of a run folder (or the file itself)."""
    return checkpoint / STAGE_FILES["volume"] if checkpoint.is_dir() else checkpoint


def _downstream(
    cases: list[Volume],
    runnable: dict[str, Method],
    synth: Synthesiser,
    settings: Settings,
    cfg: Config,
    informed_source: str,
    log: Log,
) -> dict[str, Any]:
    """Section 4: real few vs real + synthetic, per method, paired seeds, one shared real-only arm."""
    by_id = {case.case_id: case for case in cases}
    try:
        train_ids, test_ids = split_cases(list(by_id))
    except ValueError as error:
        return {"skipped": str(error)}
    real_train = [(by_id[i].image, by_id[i].label) for i in train_ids]
    test_pairs = [(by_id[i].image, by_id[i].label) for i in test_ids]
    train_cases = [by_id[i] for i in train_ids]
    seeds, steps = settings.downstream_seeds, settings.downstream_steps
    log(f"downstream: real-only, {len(seeds)} seeds x at most {steps} steps (early stopping)")
    real_only = segmentation_dice(real_train, test_pairs, seeds, steps, "cpu", cfg.data.num_labels)
    out: dict[str, Any] = {"split": {"train": train_ids, "test": test_ids}, "real_only": real_only}
    for key, method in runnable.items():
        synthetic: list[tuple[np.ndarray, np.ndarray]] = []
        sources: list[int] = []  # the real training case whose mask made each synthetic volume
        for k in range(settings.synthetic_per_case):
            seed = SYNTHETIC_SEED_BASE + k
            starts = [default_start(c.label) for c in train_cases]
            if method.uses_informed and informed_source == "generate":
                informed = generated_informed(synth, [c.label for c in train_cases], starts, [seed] * len(starts))
            else:
                informed = [_real_informed(c) for c in train_cases]
            volumes = method.generate(train_cases, informed, seed)
            synthetic += [(volume, case.label) for volume, case in zip(volumes, train_cases, strict=True)]
            sources += range(len(train_cases))
        log(f"downstream: {key}, real + {len(synthetic)} synthetic")
        result = downstream_utility(
            real_train,
            synthetic,
            test_pairs,
            seeds,
            steps,
            "cpu",
            cfg.data.num_labels,
            real_only=real_only,
            synthetic_sources=sources,
        )
        out[key] = {"real_plus_synthetic": result["real_plus_synthetic"], "gain": result["gain"]}
    return out


def montage(scored: dict[str, list[CaseResult]], path: str | Path, max_cases: int = 4) -> Path:
    """A PNG: per case, the real middle slice and each method's, with the label contour overlaid.

    Written atomically (temp file, then rename), with matplotlib's Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    methods = list(scored)
    cases = scored[methods[0]][:max_cases]
    columns = 1 + len(methods)
    figure, axes = plt.subplots(len(cases), columns, figsize=(2.2 * columns, 2.2 * len(cases)), squeeze=False)
    for row, case in enumerate(cases):
        z = default_start(np.asarray(case.label))
        panels = [("real", case.image)] + [(m, scored[m][row].generated) for m in methods]
        for column, (title, volume) in enumerate(panels):
            ax = axes[row][column]
            ax.imshow(np.asarray(volume)[z], cmap="gray", vmin=-1, vmax=1)
            label = np.asarray(case.label)[z]
            if label.max() > 0:
                ax.contour(label, levels=np.arange(0.5, label.max() + 0.5), linewidths=0.5, cmap="autumn")
            ax.set_title(f"{title}" if row else f"{title}\n{case.case_id}", fontsize=7)
            if column == 0:
                ax.set_ylabel(f"{case.case_id} z={z}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    figure.tight_layout()
    return save_figure(figure, path, dpi=100)


__all__ = [
    "BASELINES",
    "BASELINE_NAMES",
    "Method",
    "Settings",
    "eval_data_folder",
    "evaluate",
    "montage",
    "quick_settings",
]
