"""Issue 16, point 3: work over a cohort runs in bounded batches, and the batching changes no draw.

Each test counts what the real network receives (a forward hook; no stand-in model) and checks
that a cohort cut into batches gives what it gives whole: the same bytes where the network sees
the same batches, or a network that ignores its input (a fresh one: MONAI zero-initialises the
output conv, so what comes out is each item's own seeded noise); and the same values to float
rounding where the batch size differs (MONAI's time-embedding ``Linear`` rounds differently for
different batch sizes, by about 1e-7).
"""

from __future__ import annotations

import dataclasses
import tracemalloc
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, overload

import numpy as np
import pytest
import torch
from torch import nn

import privacy.audit
from gem3d.config import Config
from gem3d.data.dataset import load_volumes
from gem3d.data.nnunet_raw import read_grid_cases
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.data.spill import Spill
from gem3d.data.volume import Volume
from gem3d.diffusion import make_sampler
from gem3d.enhance import enhance, enhancement_jobs
from gem3d.informed import generated_slices
from gem3d.runs import build_model
from gem3d.sampler import SampleRequest, sample_volumes
from gem3d.synthesis import Synthesiser, generated_informed, iter_jobs, load_synthesiser
from privacy.audit import AuditSettings, case_losses, memorization_audit, planted_copy, timestep_losses


def _perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with every weight moved (seeded), so that its output depends on its input."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


@contextmanager
def _batch_sizes(model: nn.Module, also: Callable[[], Any] | None = None) -> Iterator[list[Any]]:
    """Record the batch size of every forward of ``model`` (with ``also()`` beside it, when given)."""
    sizes: list[Any] = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        size = int(args[0].shape[0])
        sizes.append(size if also is None else (size, also()))

    handle = model.register_forward_hook(hook)
    try:
        yield sizes
    finally:
        handle.remove()


def _with_batch(synth: Synthesiser, batch_volumes: int) -> Synthesiser:
    cfg = synth.cfg
    sampler = cfg.sampler.model_copy(update={"batch_volumes": batch_volumes})
    return dataclasses.replace(synth, cfg=cfg.model_copy(update={"sampler": sampler}))


def _masks(cfg: Config, count: int) -> tuple[list[np.ndarray], list[int], list[int]]:
    rng = np.random.default_rng(0)
    size = cfg.data.image_size
    masks = [rng.integers(0, cfg.data.num_labels, (6, size, size)).astype(np.uint8) for _ in range(count)]
    return masks, [int(s) for s in rng.integers(0, 6, count)], list(range(10, 10 + count))


# --- informed slices ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_informed_slices_in_batches_are_those_of_one_batch(micro_cfg: Config, batch: int) -> None:
    # prepare
    masks, starts, seeds = _masks(micro_cfg, 7)
    sampler = make_sampler(micro_cfg.diffusion, 3)
    fresh = build_model("informed", micro_cfg).eval()
    trained = _perturbed(build_model("informed", micro_cfg))

    # execute
    fresh_whole = generated_slices(fresh, sampler, masks, starts, seeds, batch=7)  # type: ignore[arg-type]
    fresh_parts = generated_slices(fresh, sampler, masks, starts, seeds, batch=batch)  # type: ignore[arg-type]
    whole = generated_slices(trained, sampler, masks, starts, seeds, batch=7)  # type: ignore[arg-type]
    with _batch_sizes(trained) as sizes:
        parts = generated_slices(trained, sampler, masks, starts, seeds, batch=batch)  # type: ignore[arg-type]

    # assert: at most `batch` slices per forward, every slice once per step
    assert max(sizes) <= batch and sum(sizes) == 7 * len(sampler.timesteps)
    # the same draws: each slice's noise is its own seed's, whatever its batch
    assert [a.image.tobytes() for a in fresh_parts] == [b.image.tobytes() for b in fresh_whole]
    assert [a.provenance for a in parts] == [b.provenance for b in whole]
    for a, b in zip(parts, whole, strict=True):
        np.testing.assert_allclose(a.image, b.image, atol=1e-4)
        np.testing.assert_array_equal(a.mask, b.mask)
    # the tolerance could not hide a mix-up: different slices differ by far more
    assert min(np.abs(whole[i].image - whole[i + 1].image).max() for i in range(6)) > 1e-2


def test_generated_informed_slices_go_through_the_run_a_volume_batch_at_a_time(micro_run: Path) -> None:
    # prepare: one volume per batch -> one window of slices (W = 4) per informed-generator call
    synth = _with_batch(load_synthesiser(micro_run, steps=2), 1)
    masks, starts, seeds = _masks(synth.cfg, 9)
    assert synth.informed_model is not None

    # execute
    with _batch_sizes(synth.informed_model) as sizes:
        slices = generated_informed(synth, masks, starts, seeds)

    # assert
    assert len(slices) == 9
    assert max(sizes) == synth.cfg.data.window and sum(sizes) == 9 * 2


# --- enhancement and de-enhancement ---------------------------------------------------------------


def _written(out: Path) -> Callable[[], int]:
    """How many images the work folder beside ``out`` holds (the dataset writer's, or the release's)."""

    def count() -> int:
        return sum(1 for _ in out.parent.glob(".gem3d-work.*/imagesTr/*.nii.gz"))

    return count


def test_iter_jobs_gives_the_bytes_of_one_sampler_call(micro_run: Path, phantom_dir: Path) -> None:
    # prepare
    synth = _with_batch(load_synthesiser(micro_run, steps=2), 2)
    cfg = synth.cfg
    progress: list[int] = []

    # execute
    with Spill.temporary() as spill:
        jobs = enhancement_jobs(synth, read_grid_cases(phantom_dir, synth.cfg, spill), 2, "generate", (), 1, spill)
        requests = [SampleRequest(j.target.label, j.informed, j.start, j.seed) for j in jobs]  # type: ignore[arg-type]
        with _batch_sizes(synth.volume_model) as sizes:
            streamed = list(iter_jobs(synth, jobs, lambda index, done, total: progress.append(index)))
        job_ids = [job.case_id for job in jobs]
    whole = sample_volumes(synth.volume_model, synth.sampler, requests, cfg.data.window, cfg.sampler.overlap, 2)

    # assert: the volumes of one call over the cohort (its own batches are the same), in job order
    assert [job.case_id for job, _ in streamed] == job_ids
    assert [v.tobytes() for _, v in streamed] == [v.tobytes() for v in whole]
    assert max(sizes) <= 2 * 2  # a round holds an upward and a downward window per volume
    assert sorted(set(progress)) == list(range(len(jobs)))


@pytest.mark.parametrize("app", ["enhance", "deenhance"])
def test_a_cohort_is_written_a_batch_at_a_time(micro_run: Path, phantom_dir: Path, tmp_path: Path, app: str) -> None:
    # prepare: one volume per batch
    from gem3d.deenhance import deenhance
    from gem3d.informed import SourceSpec

    synth = _with_batch(load_synthesiser(micro_run, steps=2), 1)
    out = tmp_path / "out"
    cases = 8 if app == "enhance" else 4

    # execute
    with _batch_sizes(synth.volume_model, _written(out)) as seen:
        if app == "enhance":
            enhance(synth, phantom_dir, out, 2, "generate", seed=0)
        else:
            reference = next((phantom_dir / "imagesTr").glob("*.nii.gz"))
            deenhance(synth, phantom_dir, out, SourceSpec("real", reference))

    # assert: one volume's windows per forward; volume k is sampled after volumes 0..k-1 were written
    assert max(size for size, _ in seen) <= 2
    written = [count for _, count in seen]
    assert written == sorted(written) and set(written) == set(range(cases))
    assert len(list((out / "imagesTr").glob("*.nii.gz"))) == cases


def _grid_bytes(data: Path, cfg: Config) -> int:
    """Bytes of a dataset's cases on the model grid (image and label)."""
    return sum(v.image.nbytes + v.label.nbytes for v in load_volumes(data, cfg.data, warn_partial=False))


@pytest.mark.parametrize("app", ["enhance", "deenhance", "release"])
def test_memory_does_not_grow_with_the_number_of_cases(micro_run: Path, tmp_path: Path, app: str) -> None:
    # prepare: cohorts of 2 and 8 deep phantoms, so that a case's arrays outweigh the rest; the
    # release's audit keeps a reference of each training case, small on its coarsest grid
    from gem3d.deenhance import deenhance
    from gem3d.informed import SourceSpec
    from privacy.release import ReleasePolicy, release_dataset

    policy = ReleasePolicy(require_dp=False, max_linkage_rate=1.0)
    audit = AuditSettings(grid=(8, 8, 8), quantile=0.5, slice_check=False)

    synth = _with_batch(load_synthesiser(micro_run, steps=1), 1)
    peaks, sizes = {}, {}

    # execute: numpy's allocations are traced (tracemalloc), the peak taken over each whole run
    for count in (2, 8):
        data = write_phantom_dataset(tmp_path / f"data_{count}", count, (16, 16, 160), seed=count)
        sizes[count] = _grid_bytes(data, synth.cfg)
        tracemalloc.start()
        try:
            if app == "enhance":
                enhance(synth, data, tmp_path / f"out_{count}", 1, "copy", seed=0)
            elif app == "release":
                release_dataset(
                    synth, data, tmp_path / f"out_{count}", per_case=1, mask_edit="rotate:20,elastic:4", policy=policy,
                    privacy_statement=None, audit_settings=audit,
                )  # fmt: skip
            else:
                reference = next((data / "imagesTr").glob("*.nii.gz"))
                deenhance(synth, data, tmp_path / f"out_{count}", SourceSpec("real", reference))
            peaks[count] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # assert: six more cases add under a tenth of their arrays to the peak (holding them adds it all)
    added = sizes[8] - sizes[2]
    assert peaks[8] - peaks[2] < 0.1 * added, (peaks, added)


# --- the audit ------------------------------------------------------------------------------------


def _with_train_batch(cfg: Config, batch_size: int) -> Config:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": batch_size})})


def test_membership_inference_forwards_a_training_batch_at_a_time(micro_cfg: Config, phantom_dir: Path) -> None:
    # prepare: five cases, two of them twice; the micro config's training batch is 2
    volumes = load_volumes(phantom_dir, micro_cfg.data)
    cohort = [volumes[0], volumes[1], volumes[2], volumes[0], volumes[1]]
    model = _perturbed(build_model("slice", micro_cfg))
    fresh = build_model("slice", micro_cfg).eval()

    # execute
    with _batch_sizes(model) as sizes:
        losses = timestep_losses(model, "slice", micro_cfg, cohort, [20, 500], draws=2)
        single = case_losses(model, "slice", micro_cfg, cohort, draws=2)
    other = {b: timestep_losses(model, "slice", _with_train_batch(micro_cfg, b), cohort, [20, 500], 2) for b in (1, 5)}
    blind = {b: case_losses(fresh, "slice", _with_train_batch(micro_cfg, b), cohort, 2) for b in (1, 2, 5)}

    # assert: every forward is one training batch (a short last one is padded), so a case's
    # figures are the same bytes wherever it stands in the cohort
    assert set(sizes) == {micro_cfg.train.batch_size}
    for figures in (losses, single):
        np.testing.assert_array_equal(figures[0], figures[3])
        np.testing.assert_array_equal(figures[1], figures[4])
        assert not np.allclose(figures[0], figures[1])
    # other batch sizes: the same draws (exact where the network ignores its input), float rounding otherwise
    assert blind[1].tobytes() == blind[2].tobytes() == blind[5].tobytes()
    for figures in other.values():
        np.testing.assert_allclose(figures, losses, rtol=1e-5)


class _Reads(Sequence[Volume]):
    """Volumes handed out as fresh copies, like a folder read case by case: counts how many are alive."""

    def __init__(self, volumes: Sequence[Volume]) -> None:
        self.volumes = volumes
        self.alive = self.most_alive = 0

    def __len__(self) -> int:
        return len(self.volumes)

    @overload
    def __getitem__(self, index: int) -> Volume: ...

    @overload
    def __getitem__(self, index: slice) -> list[Volume]: ...

    def __getitem__(self, index: int | slice) -> Volume | list[Volume]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        volume = self.volumes[index]
        image = volume.image.copy()
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(image, self._gone)
        return dataclasses.replace(volume, image=image)

    def _gone(self) -> None:
        self.alive -= 1


@pytest.fixture(scope="module")
def audit_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Volume]]:
    """Four training phantoms, two holdout phantoms, and nine synthetic volumes (two of them planted copies)."""
    from gem3d.config import DataConfig

    data = DataConfig(image_size=16, window=4, num_labels=4)
    root = tmp_path_factory.mktemp("audit_sets")
    train = load_volumes(write_phantom_dataset(root / "train", num_cases=4, shape=(16, 16, 12), seed=1), data)
    holdout = load_volumes(write_phantom_dataset(root / "holdout", num_cases=2, shape=(16, 16, 12), seed=2), data)
    new = load_volumes(write_phantom_dataset(root / "new", num_cases=7, shape=(16, 16, 12), seed=3), data)
    rng = np.random.default_rng(0)
    copies = [
        dataclasses.replace(
            train[i], case_id=f"copy_{kind}", image=planted_copy(kind, train[i].image, new[0].image, rng)
        )
        for i, kind in enumerate(("flip_lr", "noise_5"))
    ]
    return {"train": train, "holdout": holdout, "synthetic": copies + new}


@pytest.mark.parametrize("holdout", [True, False])
def test_memorisation_audit_streams_the_synthetic_cohort(
    audit_sets: dict[str, list[Volume]], monkeypatch: pytest.MonkeyPatch, holdout: bool
) -> None:
    # prepare
    settings = AuditSettings(grid=(16, 16, 16), quantile=0.5)
    train, synthetic = audit_sets["train"], audit_sets["synthetic"]
    reference = audit_sets["holdout"] if holdout else None
    reports, most_alive = {}, {}

    # execute: chunks of 1, 3 and every volume
    for chunk in (1, 3, 64):
        monkeypatch.setattr(privacy.audit, "_VOLUMES", chunk)
        reads = _Reads(synthetic)
        result = memorization_audit(reads, train, reference, settings)
        reports[chunk], most_alive[chunk] = result.report(), reads.most_alive

    # assert: the same report, byte for byte; at most two chunks of synthetic volumes in memory at once
    assert reports[1] == reports[3] == reports[64]
    assert {"copy_flip_lr", "copy_noise_5"} <= set(reports[1]["copy_ids"])
    assert [c["case"] for c in reports[1]["per_case"]] == [v.case_id for v in synthetic]
    assert most_alive[1] <= 2 and most_alive[3] <= 6 and most_alive[64] == len(synthetic)


# --- the release ----------------------------------------------------------------------------------


def test_the_release_writes_each_batch_before_sampling_the_next(
    micro_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    # prepare: a non-DP micro run, so the policy must allow it; one volume per batch
    from privacy.release import ReleasePolicy, release_dataset

    synth = _with_batch(load_synthesiser(micro_run, steps=2), 1)
    out = tmp_path / "released"
    policy = ReleasePolicy(require_dp=False, max_linkage_rate=1.0)

    # execute
    with _batch_sizes(synth.volume_model, _written(out)) as seen:
        result = release_dataset(
            synth, phantom_dir, out, per_case=1, mask_edit="rotate:20,elastic:4", policy=policy, privacy_statement=None,
            audit_settings=AuditSettings(grid=(16, 16, 16), quantile=0.5),
        )  # fmt: skip

    # assert: volume k is sampled after k volumes were written into the release's work folder
    assert max(size for size, _ in seen) <= 2
    written = [count for _, count in seen]
    assert written == sorted(written) and set(written) == set(range(4))
    assert result.cases == 4 and len(list((out / "imagesTr").glob("*.nii.gz"))) == 4


# --- evaluation -----------------------------------------------------------------------------------


def test_evaluation_scores_a_batch_at_a_time_and_keeps_only_the_montage(micro_run: Path, phantom_dir: Path) -> None:
    # prepare: the GEM-3D method of a micro run, two volumes per batch
    from experiments.evaluation.arrays import anatomical_views
    from experiments.evaluation.protocol import MAIN_SEED, CaseResult, method_report
    from experiments.evaluation.run import _overlapped, _real_informed, _score
    from gem3d.sampler import default_start

    synth = _with_batch(load_synthesiser(micro_run, steps=2), 2)
    cases = load_volumes(phantom_dir, synth.cfg.data)
    method = _overlapped(synth, "gem3d", synth.cfg.sampler.overlap)
    views = anatomical_views(synth.cfg.data.slice_axis)

    # execute
    with _batch_sizes(synth.volume_model) as sizes:
        scored, reports = _score({"gem3d": method}, cases, 2, None, views, lambda _: None, batch=2)  # type: ignore[arg-type]
    informed = [_real_informed(case) for case in cases]
    samples = [method.generate(cases, informed, MAIN_SEED + k) for k in range(2)]
    whole = method_report(
        [
            CaseResult(c.case_id, c.image, c.label, samples[0][i], method.boundaries(c.depth, default_start(c.label)),
                       [samples[1][i]])
            for i, c in enumerate(cases)
        ],
        views=views,
    )  # fmt: skip

    # assert: two volumes' windows per forward; the report of the whole cohort at once; the montage's cases kept
    assert max(sizes) <= 2 * 2
    assert reports["gem3d"] == whole
    assert [c.case_id for c in scored["gem3d"]] == [c.case_id for c in cases]  # 4 cases: the montage shows all


def test_the_full_3d_baseline_samples_a_volume_batch_at_a_time(micro_cfg: Config) -> None:
    from experiments.evaluation.baselines import Full3D

    # prepare: two copies of the same baseline (seeded), one with all five masks in a batch
    masks, _, seeds = _masks(micro_cfg, 5)
    cfg_all = micro_cfg.model_copy(update={"sampler": micro_cfg.sampler.model_copy(update={"batch_volumes": 5})})
    one, every = Full3D(micro_cfg, (8, 16)), Full3D(cfg_all, (8, 16))
    for model in (one, every):
        _perturbed(model.net)
    batch = micro_cfg.sampler.batch_volumes

    # execute
    with _batch_sizes(one.net) as sizes:
        bounded = one.sample(masks, seeds, steps=2)
    whole = every.sample(masks, seeds, steps=2)

    # assert: float rounding apart (the perturbed network amplifies it), the volumes of one batch
    assert max(sizes) == batch < 5
    for a, b in zip(bounded, whole, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3)
    assert min(np.abs(whole[i] - whole[i + 1]).max() for i in range(4)) > 0.1
