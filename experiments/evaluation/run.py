"""The [cli] half of the evaluation protocol (``PROTOCOL.md``): generate with every method, then score.

``evaluate(...)`` loads the held-out cohort and the run, builds each method's generator (GEM-3D,
the ``mask_only`` run, the same run with independent windows, the ``full_3d`` baseline), samples
the protocol's volumes ``sampler.batch_volumes`` cases at a time, and hands them to the metrics
library (``MethodScorer``, which keeps each case's figures and features, not its volumes; and
``utility_curves``). It returns the report dict; ``gem3d evaluate`` writes it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experiments.evaluation.arms import Arm, SampleRequests, arm_synthesiser, resolve_arms
from experiments.evaluation.arrays import anatomical_views
from experiments.evaluation.baselines import FULL3D_CHANNELS, FULL3D_FILE, Full3D, train_mask_only
from experiments.evaluation.distribution import FeatureExtractor
from experiments.evaluation.nnunet_judge import BUDGETS, nnunet_segmenter
from experiments.evaluation.protocol import (
    DIVERSITY_SAMPLES,
    DOWNSTREAM_STEPS,
    MAIN_SEED,
    METHODS,
    PROTOCOL_VERSION,
    CaseResult,
    MethodScorer,
    seam_boundaries,
    split_cases,
)
from experiments.evaluation.utility import UtilityDesign, utility_curves
from experiments.previews import save_figure
from gem3d.autoencoder import SliceAutoencoder
from gem3d.checkpoint import read_metadata
from gem3d.config import Config
from gem3d.data.dataset import load_volumes
from gem3d.data.volume import Volume, fingerprint
from gem3d.diffusion import make_sampler
from gem3d.errors import CheckpointError, DataError
from gem3d.files import AtomicFolder
from gem3d.runs import STAGE_FILES
from gem3d.sampler import InformedSlice, SampleRequest, Window, default_start, plan_windows, sample_volumes
from gem3d.synthesis import Synthesiser, load_synthesiser
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
DEFAULT_ARMS = ("gem3d", "gem3d-own", "mask-only", "full-3d")  # those whose generator is there

Log = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    """What the protocol fixes, and what ``--quick`` may reduce (every change is a deviation).

    Attributes:
        sampler_steps: caps the DDIM steps; None = the run's ``diffusion.inference_steps``.
        diversity_samples: samples per mask (seeds 0..K-1); 1 turns diversity off.
        utility: the downstream design (real counts, multipliers, seeds, TSTR; ``UtilityDesign``).
        downstream_steps: the cap on each segmenter's optimiser steps (it stops earlier on a plateau).
        arms: the downstream arms (``arms.ARMS``) to run, when their generator is there.
        segmenter: ``unet`` (the protocol's small UNet, early stopping) or ``nnunet`` (nnU-Net v2 as
            the judge, at the headline point only); ``nnunet_budget``: ``full`` or ``short``.
        baseline_step_cap: caps the baselines' training steps (None = the main run's steps).
        full3d_channels: widths of the full-3D baseline's UNet levels when it is trained here.
        deviations: a sentence per change from the protocol.
    """

    sampler_steps: int | None = None
    diversity_samples: int = DIVERSITY_SAMPLES
    utility: UtilityDesign = field(default_factory=UtilityDesign)
    downstream_steps: int = DOWNSTREAM_STEPS
    arms: tuple[str, ...] = DEFAULT_ARMS
    segmenter: str = "unet"
    nnunet_budget: str = "full"
    baseline_step_cap: int | None = None
    full3d_channels: tuple[int, ...] = FULL3D_CHANNELS
    deviations: tuple[str, ...] = ()


QUICK_UTILITY = UtilityDesign(real_counts=(2,), multipliers=(1,), few_real=2, multiplier=1, seeds=(0,), tstr=False)


def quick_settings() -> Settings:
    """The reduced CPU smoke setting of ``--quick``: few steps, 2 diversity samples, one downstream point."""
    return Settings(
        sampler_steps=10,
        diversity_samples=2,
        utility=QUICK_UTILITY,
        downstream_steps=20,
        arms=("gem3d",),
        baseline_step_cap=50,
        full3d_channels=(8, 16, 16),
        deviations=(
            "--quick: DDIM steps capped at 10 (fewer if the run's config has fewer)",
            "--quick: 2 diversity samples per mask instead of 4",
            f"--quick: downstream at 2 real cases x1 synthetic, arm gem3d, seed 0, no TSTR, a 20-step cap "
            f"instead of the protocol's curves, 3 seeds and {DOWNSTREAM_STEPS}",
            "--quick: baselines trained for at most 50 steps per stage",
            "--quick: full-3D baseline UNet channels (8, 16, 16) instead of (16, 32, 32)",
        ),
    )


@dataclass
class Method:
    """One method's generator.

    ``generate(cases, informed, seed)`` returns one ``[D, H, W]`` volume per case (its label is the
    mask); ``boundaries(depth, start)`` gives the seam boundaries of that volume (empty: no windows);
    ``sample(requests)`` samples any masks, starts and seeds (the downstream arms; None: the method
    cannot, as independent windows have no start).
    """

    key: str
    generate: Callable[[Sequence[Volume], Sequence[InformedSlice], int], list[np.ndarray]]
    boundaries: Callable[[int, int], list[int]]
    sample: SampleRequests | None = None
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

    def sample(requests: list[SampleRequest]) -> list[np.ndarray]:
        return sample_volumes(synth.volume_model, synth.sampler, requests, window, overlap, cfg.sampler.batch_volumes)

    def generate(cases: Sequence[Volume], informed: Sequence[InformedSlice], seed: int) -> list[np.ndarray]:
        return sample(
            [
                SampleRequest(case.label, slice_, default_start(case.label), seed)
                for case, slice_ in zip(cases, informed, strict=True)
            ]
        )

    def boundaries(depth: int, start: int) -> list[int]:
        plan = [w for round_ in plan_windows(depth, start, window, overlap) for w in round_]
        return seam_boundaries(plan, depth)

    return Method(key, generate, boundaries, sample, uses_informed=cfg.model.informed_slice)


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

    def sample(requests: list[SampleRequest]) -> list[np.ndarray]:  # no informed slice, no start
        return model.sample([r.mask for r in requests], [r.seed for r in requests], steps)

    return Method("full_3d", generate, lambda depth, start: [], sample, uses_informed=False)


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
    codec: SliceAutoencoder | None = None,
) -> dict[str, Path]:
    """Train the requested trainable baselines into ``folder``, replacing it whole (``AtomicFolder``).

    ``codec``: a latent run's autoencoder, which its mask-only baseline shares.
    """
    with AtomicFolder(folder, replace=True) as tmp:
        made: dict[str, Path] = {}
        if "mask_only" in wanted:
            log(f"baseline mask_only: training slice {steps['slice']} + volume {steps['volume']} steps")
            train_mask_only(cfg, train_volumes, tmp / "mask_only", steps, codec)
            made["mask_only"] = folder / "mask_only"
        if "full_3d" in wanted:
            total = steps["slice"] + steps["volume"]
            log(f"baseline full_3d: training {total} steps")
            model = Full3D(cfg, channels)
            model.train(train_volumes, total)
            model.save(tmp / FULL3D_FILE, train_volumes)
            made["full_3d"] = folder / FULL3D_FILE
    return made


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
    downstream_data: str | Path | None = None,
    nnunet_dir: str | Path | None = None,
    log: Log = _stderr,
) -> tuple[dict[str, Any], dict[str, list[CaseResult]]]:
    """Run the protocol; returns (the report dict, per method the cases ``montage`` shows).

    Args:
        checkpoint: the evaluated run folder (volume stage, and informed stage when present).
        data: held-out cases (nnU-Net raw dataset, prepared cache, or cohort root with ``test/``).
        methods: ``gem3d`` plus the baselines to run; the rest are reported as skipped.
        baseline_checkpoints: ``mask_only`` -> run folder, ``full_3d`` -> checkpoint file.
        train_data: the main run's training data, to train the baselines not given.
        baselines_dir: where trained baselines go (required with ``train_data``).
        extractor: the FID/MMD features (its ``name`` goes in the report).
        downstream: False skips the segmentation task (reported as skipped, listed as a deviation).
        downstream_data: the downstream task's real pool (validation and training cases), tested
            on every case of ``data``; None: the protocol's split of ``data`` (``split_cases``).
        nnunet_dir: the work folder of ``settings.segmenter = "nnunet"`` (its logs stay there).
    """
    settings = settings or Settings()
    checkpoint = Path(checkpoint)
    synth, sampler_steps = _evaluated_run(checkpoint, device, settings)
    cfg = synth.cfg
    folder = eval_data_folder(Path(data))
    cases = sorted(load_volumes(folder, cfg.data), key=lambda v: v.case_id)
    if not cases:
        raise DataError(f"{folder}: no cases found")
    deviations = list(settings.deviations)
    # every input is read and checked before the first sample is drawn
    pool = _downstream_pool(downstream_data, cfg, cases, folder) if downstream else None
    train_volumes = _training_data(train_data, cfg, cases, folder, checkpoint, deviations)

    steps = _stage_steps(checkpoint, cfg)
    if settings.baseline_step_cap is not None:
        steps = {stage: min(n, settings.baseline_step_cap) for stage, n in steps.items()}
    baseline_checkpoints = dict(baseline_checkpoints or {})
    to_train = {m for m in ("mask_only", "full_3d") if m in methods and m not in baseline_checkpoints}
    if to_train and train_volumes is not None:
        if baselines_dir is None:
            raise ValueError("baselines_dir is required to train baselines")
        trained = _train_baselines_into(
            Path(baselines_dir), to_train, cfg, train_volumes, steps, settings.full3d_channels, log,
            synth.volume_model.codec,
        )  # fmt: skip
        baseline_checkpoints.update(trained)
    runnable, skipped = _methods(synth, methods, baseline_checkpoints, device, sampler_steps)

    views = anatomical_views(cfg.data.slice_axis)
    batch = cfg.sampler.batch_volumes
    scored, reports = _score(runnable, cases, settings.diversity_samples, extractor, views, log, batch)
    reports.update({key: {"skipped": reason} for key, reason in skipped.items()})

    if downstream:
        nnunet_work = Path(nnunet_dir) if nnunet_dir is not None else checkpoint.parent / "nnunet"
        downstream_report = _downstream(cases, pool, runnable, synth, settings, cfg, nnunet_work, log)
    else:
        downstream_report = {"skipped": "--no-downstream"}
        deviations.append("--no-downstream: the segmentation task was not run")

    report = {
        "protocol": PROTOCOL_VERSION,
        "checkpoint": {"path": str(checkpoint), "sha256": synth.checkpoints},
        "data": {"path": str(folder), "fingerprint": fingerprint(cases), "cases": [c.case_id for c in cases]},
        "settings": _report_settings(synth, settings, extractor, views, downstream_data, baseline_checkpoints, steps),
        "deviations": deviations,
        "methods": reports,
        "appearance_transfer": _appearance_transfer(reports),
        "downstream": downstream_report,
    }
    return report, scored


def _evaluated_run(checkpoint: Path, device: str | None, settings: Settings) -> tuple[Synthesiser, int]:
    """The evaluated GEM-3D run (not a mask-only one) with its sampler capped at ``settings.sampler_steps``."""
    synth = load_synthesiser(checkpoint, device)
    cfg = synth.cfg
    if not cfg.model.informed_slice:
        raise CheckpointError(f"{checkpoint}: is a mask-only run; evaluate the GEM-3D run and pass it as a baseline")
    sampler_steps = min(cfg.diffusion.inference_steps, settings.sampler_steps or cfg.diffusion.inference_steps)
    if sampler_steps != cfg.diffusion.inference_steps:
        synth = dataclasses.replace(synth, sampler=make_sampler(cfg.diffusion, sampler_steps))
    return synth, sampler_steps


def _report_settings(
    synth: Synthesiser,
    settings: Settings,
    extractor: FeatureExtractor,
    views: dict[str, int],
    downstream_data: str | Path | None,
    baseline_checkpoints: dict[str, str | Path],
    steps: dict[str, int],
) -> dict[str, Any]:
    """The report's ``settings`` section: what the protocol ran with, the baselines' training included."""
    cfg = synth.cfg
    return {
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
            "seeds": list(settings.utility.seeds),
            "max_steps": settings.downstream_steps,
            "arms": list(settings.arms),
            "pool": str(downstream_data) if downstream_data is not None else "split of the evaluation cases",
        },
        "baselines": {
            "checkpoints": {k: str(v) for k, v in baseline_checkpoints.items()},
            "training_steps": steps,
            "full_3d_steps": steps["slice"] + steps["volume"],
            "full_3d_channels": list(settings.full3d_channels),
            "independent_windows_tile_seed": f"seed * {TILE_SEED_STRIDE} + tile index",
        },
    }


def _downstream_pool(
    downstream_data: str | Path | None, cfg: Config, cases: list[Volume], folder: Path
) -> list[Volume] | None:
    """The downstream task's real pool (None: a split of the evaluation cases); no case may be a test case."""
    if downstream_data is None:
        return None
    pool = sorted(load_volumes(eval_data_folder(Path(downstream_data)), cfg.data), key=lambda v: v.case_id)
    shared = sorted({v.case_id for v in pool} & {v.case_id for v in cases})
    if shared:
        raise DataError(f"{downstream_data}: cases {shared} are also test cases in {folder}")
    return pool


def _training_data(
    train_data: str | Path | None,
    cfg: Config,
    cases: list[Volume],
    folder: Path,
    checkpoint: Path,
    deviations: list[str],
) -> list[Volume] | None:
    """The run's training data (to train baselines): held out from the test cases, its fingerprint checked."""
    if train_data is None:
        return None
    volumes = load_volumes(Path(train_data), cfg.data)
    shared = sorted({v.case_id for v in volumes} & {v.case_id for v in cases})
    if shared:
        raise DataError(f"{folder}: cases {shared} are also in the training data {train_data}; use held-out cases")
    stored = read_metadata(synth_path(checkpoint)).get("data_fingerprint")
    site = SiteState(default_state_dir(Path(train_data)))
    if stored is not None and fingerprint_matches(str(stored), volumes, site) is False:
        deviations.append(
            f"{train_data}: its fingerprint differs from the one the run was trained on; baselines trained on it"
        )
    return volumes


def _methods(
    synth: Synthesiser,
    methods: Sequence[str],
    baseline_checkpoints: dict[str, str | Path],
    device: str | None,
    sampler_steps: int,
) -> tuple[dict[str, Method], dict[str, str]]:
    """(the methods that can run, by key; the others with the reason)."""
    cfg = synth.cfg
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
            runnable[key] = _full_3d(Full3D.load(baseline_checkpoints[key], device), sampler_steps)
    return runnable, skipped


def _score(
    runnable: dict[str, Method],
    cases: list[Volume],
    diversity_samples: int,
    extractor: FeatureExtractor,
    views: dict[str, int],
    log: Log,
    batch: int,
) -> tuple[dict[str, list[CaseResult]], dict[str, Any]]:
    """Sections 2 and 3: every method samples every case (seeds 0..K-1) and is scored (``MethodScorer``).

    The cases go ``batch`` at a time: a batch's volumes are scored and dropped, so memory holds
    one batch of generated volumes whatever the cohort's size (issue 16).

    Returns:
        per method, the cases the montage shows (``montage_cases``), and per method its report.
    """
    informed = [_real_informed(case) for case in cases]
    shown = set(montage_cases(len(cases)))
    scored: dict[str, list[CaseResult]] = {}
    reports: dict[str, Any] = {}
    for key, method in runnable.items():
        log(f"{key}: sampling {len(cases)} cases x {diversity_samples} seeds")
        scorer = MethodScorer(extractor, views)
        scored[key] = []
        for first in range(0, len(cases), batch):
            chunk, chunk_informed = cases[first : first + batch], informed[first : first + batch]
            samples = [method.generate(chunk, chunk_informed, MAIN_SEED + k) for k in range(diversity_samples)]
            for i, case in enumerate(chunk):
                result = CaseResult(
                    case.case_id,
                    case.image,
                    case.label,
                    samples[0][i],
                    method.boundaries(case.label.shape[0], default_start(case.label)),
                    [samples[k][i] for k in range(1, diversity_samples)],
                )
                scorer.add(result)
                if first + i in shown:
                    scored[key].append(result)
        reports[key] = scorer.report()
    return scored, reports


def _appearance_transfer(reports: dict[str, Any]) -> dict[str, float | None]:
    """Per-label intensity error with (gem3d) and without (mask_only) the informed slice, and their ratio."""
    mask_only = reports.get("mask_only", {})
    with_informed = reports["gem3d"]["appearance"]["foreground_mean"]
    without_informed = mask_only["appearance"]["foreground_mean"] if "appearance" in mask_only else None
    return {
        "with_informed": with_informed,
        "without_informed": without_informed,
        # the informed slice's effect (issue 18 target: at most 0.5): < 1 means it carried appearance
        "ratio": with_informed / without_informed if without_informed else None,
    }


def synth_path(checkpoint: Path) -> Path:
    """The volume-stage checkpoint file of a run folder (or the file itself)."""
    return checkpoint / STAGE_FILES["volume"] if checkpoint.is_dir() else checkpoint


def _downstream(
    cases: list[Volume],
    pool: list[Volume] | None,
    runnable: dict[str, Method],
    synth: Synthesiser,
    settings: Settings,
    cfg: Config,
    nnunet_work: Path,
    log: Log,
) -> dict[str, Any]:
    """Section 4: the utility curves of every runnable arm, on real test cases.

    ``pool`` (the real training pool) is tested on all ``cases``; without one, ``split_cases``
    splits ``cases`` into pool and test.
    """
    if pool is None:
        by_id = {case.case_id: case for case in cases}
        try:
            train_ids, test_ids = split_cases(list(by_id))
        except ValueError as error:
            return {"skipped": str(error)}
        pool, test = [by_id[i] for i in train_ids], [by_id[i] for i in test_ids]
    else:
        test = cases
    arms: list[Arm] = []
    skipped: dict[str, str] = {}
    for arm in resolve_arms(settings.arms):
        method = runnable.get(arm.method)
        if method is None or method.sample is None:
            skipped[arm.name] = f"its generator ({arm.method}) was not run"
        elif arm.informed == "copy" and min(settings.utility.real_counts) < 2:
            skipped[arm.name] = "copied informed slices need at least 2 real cases; the design has 1"
        else:
            arms.append(arm)
    if not arms:
        return {"skipped": "no downstream arm can run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())}
    samplers = {key: m.sample for key, m in runnable.items() if m.sample is not None}
    synthesise = arm_synthesiser(arms, samplers, synth, pool)
    device = next(synth.volume_model.parameters()).device
    test_pairs = [(c.image, c.label) for c in test]
    design, segmenter = settings.utility, None
    if settings.segmenter == "nnunet":  # nnU-Net judges the headline point: real-only vs real + the arms
        design = dataclasses.replace(design, real_counts=(design.few_real,), multipliers=(0, design.multiplier),
                                     tstr=False)  # fmt: skip
        budget = BUDGETS[settings.nnunet_budget]
        segmenter = nnunet_segmenter(test_pairs, cfg.data.num_labels, nnunet_work, budget, device.type, log)
    log(f"downstream: arms {[a.name for a in arms]}, pool {len(pool)} real cases, {len(test)} test cases")
    report = utility_curves(
        [(c.image, c.label) for c in pool],
        test_pairs,
        synthesise,
        [a.name for a in arms],
        design,
        settings.downstream_steps,
        device,
        cfg.data.num_labels,
        log,
        segmenter,
    )
    return {
        "segmenter": settings.segmenter if segmenter is None else f"nnunet ({settings.nnunet_budget} budget)",
        "split": {"pool": [c.case_id for c in pool], "test": [c.case_id for c in test]},
        "arms": {a.name: a.as_dict() for a in arms},
        "skipped_arms": skipped,
        **report,
    }


MONTAGE_CASES = 4  # cases in the evaluation's picture; ``evaluate`` keeps only these of each method's volumes


def montage_cases(count: int, max_cases: int = MONTAGE_CASES) -> list[int]:
    """The indices of the sorted cases a montage shows: evenly spread, so a multi-site test split shows every site."""
    shown = min(max_cases, count)
    return sorted({round(i * (count - 1) / max(1, shown - 1)) for i in range(shown)})


def montage(scored: dict[str, list[CaseResult]], path: str | Path, max_cases: int = MONTAGE_CASES) -> Path:
    """A PNG: per case (``max_cases`` spread over the cases), the real slice and each method's, with label contours.

    Written atomically (temp file, then rename), with matplotlib's Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    methods = list(scored)
    picked = montage_cases(len(scored[methods[0]]), max_cases)
    cases = [scored[methods[0]][i] for i in picked]
    columns = 1 + len(methods)
    figure, axes = plt.subplots(len(cases), columns, figsize=(2.2 * columns, 2.2 * len(cases)), squeeze=False)
    for row, case in enumerate(cases):
        z = default_start(np.asarray(case.label))
        panels = [("real", case.image)] + [(m, scored[m][picked[row]].generated) for m in methods]
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
