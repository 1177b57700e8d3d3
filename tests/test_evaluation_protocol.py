"""The protocol's fixed choices and the per-method report section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.evaluation import (
    FIDELITY_KEYS,
    CaseResult,
    anatomical_views,
    method_report,
    seam_boundaries,
    split_cases,
    write_report,
)
from gem3d.data.phantoms import make_phantom
from gem3d.sampler import Window, plan_windows


def test_seam_boundaries_follow_the_sampler_plan() -> None:
    # prepare: D = 20, W = 8, h = 2, start 6 -> first window 6..13, up 12..19 (carries 12, 13),
    # down 0..7 (carries 6, 7): fresh blocks 6..13, 14..19, 0..5
    rounds = plan_windows(20, 6, 8, 2)
    independent = [Window(0, 8), Window(8, 8), Window(16, 4)]

    # execute
    overlapped = seam_boundaries([w for round_ in rounds for w in round_], 20)
    plain = seam_boundaries(independent, 20)

    # assert
    assert overlapped == [6, 14]
    assert plain == [8, 16]


@pytest.mark.parametrize(
    ("ids", "train", "test"),
    [(["c3", "c1", "c2"], ["c1", "c2"], ["c3"]), (["b", "a"], ["a"], ["b"]), (list("dcba"), ["a", "b"], ["c", "d"])],
)
def test_split_cases_is_sorted_first_half_trains(ids: list[str], train: list[str], test: list[str]) -> None:
    # execute / assert
    assert split_cases(ids) == (train, test)


def test_split_cases_needs_two_cases() -> None:
    # execute / assert
    with pytest.raises(ValueError, match="at least 2"):
        split_cases(["only"])


def test_method_report_covers_every_metric_and_writes_as_json(tmp_path: Path) -> None:
    # prepare: "generated" = the real volume plus per-window offsets (seams) and noise
    generator = np.random.default_rng(0)
    cases = []
    for seed in range(2):
        image, label = make_phantom((16, 16, 16), 4, seed)
        image = (image / np.abs(image).max()).astype(np.float32)
        generated = image + 0.05 * generator.standard_normal(image.shape).astype(np.float32)
        generated[8:] += 0.3
        samples = [generated + 0.1 * generator.standard_normal(image.shape).astype(np.float32)]
        cases.append(CaseResult(f"case{seed}", image, label, generated, boundaries=[8], samples=samples))

    # execute
    report = method_report(cases, views=anatomical_views(2))
    path = write_report(tmp_path / "report.json", report)

    # assert
    assert set(report["fidelity"]) == set(FIDELITY_KEYS)
    assert 0 < report["fidelity"]["ssim"] < 1
    assert report["seam_ratio"]["mean"] > 2 * report["seam_ratio"]["real_mean"]
    assert 0.1 < report["appearance"]["foreground_mean"] < 0.3  # half of each label is 0.3 off
    assert set(report["view_check"]) == {"axial", "sagittal", "coronal"}
    assert report["distribution"]["feature_extractor"].startswith("seeded-random-features (not RadImageNet)")
    assert report["diversity"]["pairs"] == 2
    assert set(report["per_case"]) == {"case0", "case1"}
    assert json.loads(path.read_text())["per_case"]["case0"]["fidelity"]["psnr"] > 0


def test_a_method_without_windows_has_no_seam_ratio() -> None:
    # prepare
    image, label = make_phantom((16, 16, 16), 4, 0)
    image = image / np.abs(image).max()

    # execute
    report = method_report([CaseResult("c", image, label, image * 0.9)], views={"axial": 0})

    # assert
    assert report["seam_ratio"] is None
    assert report["diversity"] is None


def test_background_noise_is_relative_to_the_real_background() -> None:
    from experiments.evaluation.appearance import background_noise

    rng = np.random.default_rng(0)
    label = np.zeros((8, 16, 16), np.int64)
    label[:, 4:12, 4:12] = 1
    real = np.where(label == 0, -0.9, 0.5) + rng.normal(0, 0.05, label.shape)
    noisy = np.where(label == 0, -0.9, 0.5) + rng.normal(0, 0.10, label.shape)  # twice the real noise
    same = background_noise(real, real, label)
    doubled = background_noise(noisy, real, label)
    assert same == {"std_ratio": 1.0, "hf_std_ratio": 1.0}
    assert 1.8 < doubled["std_ratio"] < 2.2 and 1.8 < doubled["hf_std_ratio"] < 2.2
    assert np.isnan(background_noise(real, real, np.ones_like(label))["std_ratio"])
