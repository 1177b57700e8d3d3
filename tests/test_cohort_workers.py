"""Cohort generation on Ray workers: the same bytes as one process (a real local Ray, no mocks)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from experiments.cli import main
from experiments.cohort_workers import RayChunks, WorkerSettings
from gem3d.errors import ConfigError
from gem3d.sampler import InformedSlice, SampleRequest
from gem3d.synthesis import load_synthesiser


def _gem3d(*args: object) -> int:
    return main([str(a) for a in args] + ["--track", "off"])


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    return {
        f"{kind}/{path.name}": np.asarray(nib.Nifti1Image.from_filename(str(path)).dataobj)
        for kind in ("imagesTr", "labelsTr")
        for path in sorted((folder / kind).glob("*.nii.gz"))
    }


def test_enhance_writes_the_same_bytes_on_one_and_on_two_ray_workers(
    micro_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    # prepare: 4 cases x 3 pairs at 4 volumes a chunk (sampler.batch_volumes): 3 chunks on 2 workers
    common = ["--checkpoint", micro_run, "--data", phantom_dir, "--per-case", 3, "--informed", "copy"]
    common += ["--mask-edit", "rotate:10"]
    # execute
    assert _gem3d("enhance", *common, "--workers", 1, "--out", tmp_path / "alone") == 0
    assert _gem3d("enhance", *common, "--workers", 2, "--out", tmp_path / "workers") == 0
    assert _gem3d("enhance", *common, "--seed", 1, "--out", tmp_path / "other_seed") == 0
    # assert: every image and label array equal, file for file; another seed differs
    alone, workers = _arrays(tmp_path / "alone"), _arrays(tmp_path / "workers")
    assert len(alone) == 24 and alone.keys() == workers.keys()
    assert [name for name in alone if not np.array_equal(alone[name], workers[name])] == []
    other = _arrays(tmp_path / "other_seed")
    assert any(not np.array_equal(alone[n], other[n]) for n in alone if n.startswith("imagesTr"))


def test_chunks_come_back_in_order(micro_run: Path) -> None:
    synth = load_synthesiser(micro_run)
    mask = np.zeros((6, 16, 16), dtype=np.uint8)
    mask[1:5, 4:12, 4:12] = 1
    informed = InformedSlice(np.zeros((16, 16), np.float32), mask[3], "real")
    chunks = [[SampleRequest(mask, informed, 3, seed)] for seed in range(5)]
    with RayChunks(WorkerSettings(workers=2), micro_run, None, 2) as sample_chunks:
        volumes = [chunk[0] for chunk in sample_chunks(iter(chunks))]
    # each seed's volume is where its chunk was, and the seeds give different volumes
    assert len(volumes) == 5
    assert len({volume.tobytes() for volume in volumes}) == 5
    del synth


def test_no_workers_is_refused() -> None:
    with pytest.raises(ConfigError, match="--workers 0"):
        WorkerSettings(workers=0)
