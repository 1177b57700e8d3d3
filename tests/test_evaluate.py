"""``gem3d evaluate`` end to end on a micro run: every protocol key, the baselines, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.cli import main
from experiments.evaluation import FIDELITY_KEYS, PROTOCOL_VERSION
from gem3d.config import Config
from gem3d.data.dataset import load_volumes
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.runs import train_stage

METHOD_KEYS = {
    "fidelity",
    "appearance",
    "background_noise",
    "seam_ratio",
    "view_check",
    "distribution",
    "diversity",
    "per_case",
}


@pytest.fixture(scope="module")
def cohort(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(micro run trained on phantom_dir, its training data, 3 held-out phantom cases)."""
    from gem3d.config import config_from_dict
    from tests.conftest import MICRO

    cfg: Config = config_from_dict(MICRO, "micro")
    volumes = load_volumes(phantom_dir, cfg.data)
    root = tmp_path_factory.mktemp("evaluate")
    run = root / "run"
    for stage, steps in (("slice", 3), ("volume", 2), ("informed", 2)):
        train_stage(cfg, volumes, stage, run, steps=steps)  # type: ignore[arg-type]
    # Held-out cases: another phantom seed, renamed so no id is shared with the training data.
    test = write_phantom_dataset(root / "test_raw", num_cases=3, shape=(16, 16, 12), seed=7)
    held_out = root / "heldout"
    for sub in ("imagesTr", "labelsTr"):
        (held_out / sub).mkdir(parents=True)
        for path in sorted((test / sub).iterdir()):
            (held_out / sub / path.name.replace("phantom", "test")).write_bytes(path.read_bytes())
    (held_out / "dataset.json").write_bytes((test / "dataset.json").read_bytes())
    return run, phantom_dir, held_out


def _gem3d(*args: object) -> int:
    # These tests are about the outputs; tracking (a new MLflow store costs seconds) has its own tests.
    return main([str(a) for a in args] + ["--track", "off"])


def test_evaluate_quick_reports_every_metric_for_gem3d_and_all_baselines(
    cohort: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    run, train_data, held_out = cohort
    out = tmp_path / "report.json"

    code = _gem3d(
        "evaluate", "--checkpoint", run, "--data", held_out, "--out", out,
        "--train-data", train_data, "--quick", "--threads", "1",
    )  # fmt: skip

    assert code == 0
    report = json.loads(out.read_text())
    assert report["protocol"] == PROTOCOL_VERSION
    assert report["settings"]["feature_extractor"].startswith("seeded-random-features")
    assert report["data"]["cases"] == ["test_000", "test_001", "test_002"]
    assert any("--quick" in d for d in report["deviations"])
    assert set(report["methods"]) == {"gem3d", "mask_only", "independent_windows", "full_3d"}
    for key, section in report["methods"].items():
        assert "skipped" not in section, key
        assert set(section) >= METHOD_KEYS, key
        assert set(FIDELITY_KEYS) <= set(section["fidelity"]), key
        assert isinstance(section["fidelity"]["psnr"], float), key
        assert set(section["distribution"]["views"]) == {"axial", "sagittal", "coronal"}, key
        assert section["diversity"]["pairs"] == 3, key  # 2 samples per case, 3 cases
    assert report["methods"]["full_3d"]["seam_ratio"] is None  # no windows
    for key in ("gem3d", "mask_only", "independent_windows"):
        assert report["methods"][key]["seam_ratio"]["real_mean"] > 0
    assert isinstance(report["appearance_transfer"]["with_informed"], float)
    assert isinstance(report["appearance_transfer"]["without_informed"], float)
    downstream = report["downstream"]
    assert downstream["split"] == {"train": ["test_000", "test_001"], "test": ["test_002"]}
    assert 0.0 <= downstream["real_only"]["mean"] <= 1.0
    for key in report["methods"]:
        assert len(downstream[key]["gain"]["per_seed"]) == 1
    assert (tmp_path / "report.png").stat().st_size > 0
    assert (tmp_path / "report.baselines" / "mask_only" / "volume.safetensors").exists()
    assert (tmp_path / "report.baselines" / "full_3d.safetensors").exists()


def test_evaluate_reports_unrequested_and_untrainable_baselines_as_skipped(
    cohort: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    run, _, held_out = cohort
    out = tmp_path / "report.json"

    code = _gem3d(
        "evaluate", "--checkpoint", run, "--data", held_out, "--out", out,
        "--baselines", "mask-only,no-overlap", "--quick", "--no-downstream",
    )  # fmt: skip

    assert code == 0
    methods = json.loads(out.read_text())["methods"]
    assert "fidelity" in methods["independent_windows"]
    assert "--train-data" in methods["mask_only"]["skipped"]
    assert methods["full_3d"] == {"skipped": "not requested (--baselines)"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--checkpoint": "missing_run"}, "checkpoint not found"),
        ({"--data": "missing_data"}, "evaluation data folder not found"),
        ({"--baselines": "gan"}, "unknown baseline 'gan'"),
        ({"--baseline-checkpoint": "mask-only=nowhere"}, "baseline checkpoint not found"),
        ({"--train-data": "__training__"}, "also in the training data"),
    ],
)
def test_evaluate_bad_input_is_one_line_and_exit_2(
    cohort: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    message: str,
) -> None:
    run, train_data, held_out = cohort
    options = {"--checkpoint": str(run), "--data": str(held_out), "--out": str(tmp_path / "r.json")}
    for key, value in change.items():
        options[key] = str(train_data) if value == "__training__" else str(tmp_path / value)
        if key == "--baselines":
            options[key] = value
        if key == "--baseline-checkpoint":
            options[key] = value.replace("nowhere", str(tmp_path / "nowhere"))
    if "--train-data" in change:
        options["--data"] = str(train_data)  # evaluating on the training cases must be refused

    code = _gem3d("evaluate", *[item for pair in options.items() for item in pair], "--no-downstream")

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r.json").exists()
