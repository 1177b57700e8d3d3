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
    assert downstream["split"] == {"pool": ["test_000", "test_001"], "test": ["test_002"]}  # no pool: a split
    head = downstream["headline"]
    assert head["arm"] == "gem3d" and 0.0 <= head["real_only"]["mean"] <= 1.0
    assert len(head["gain"]["per_seed"]) == 1 and head["verdict"].startswith("one seed")
    assert downstream["arms"]["gem3d"]["informed"] == "generate"
    assert (tmp_path / "report_utility.png").stat().st_size > 0
    assert (tmp_path / "report.png").stat().st_size > 0
    assert (tmp_path / "report.baselines" / "mask_only" / "volume.safetensors").exists()
    assert (tmp_path / "report.baselines" / "full_3d.safetensors").exists()


def test_evaluate_draws_the_curves_from_a_real_pool_with_named_arms(
    cohort: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # prepare: the run's own training data is the real pool (a site enhancing its data); tested on held_out
    run, train_data, held_out = cohort
    out = tmp_path / "report.json"

    # execute
    code = _gem3d(
        "evaluate", "--checkpoint", run, "--data", held_out, "--out", out, "--train-data", train_data,
        "--quick", "--baselines", "mask-only", "--downstream-data", train_data, "--arms", "gem3d,gem3d-own,mask-only",
        "--real-counts", "1,2", "--multipliers", "0,2", "--seeds", "0,1", "--downstream-steps", "4", "--threads", "1",
    )  # fmt: skip

    # assert
    assert code == 0
    report = json.loads(out.read_text())
    downstream = report["downstream"]
    pool = sorted(v.case_id for v in load_volumes(train_data, Config().data))
    assert downstream["split"]["pool"] == pool and downstream["split"]["test"] == report["data"]["cases"]
    assert set(downstream["curves"]["real_count"]) == {"real_only", "gem3d", "gem3d-own", "mask-only"}
    assert [p["real"] for p in downstream["curves"]["real_count"]["gem3d"]] == [1, 2]
    assert [p["multiplier"] for p in downstream["curves"]["multiplier"]["mask-only"]] == [0, 2]
    assert downstream["arms"]["gem3d-own"]["informed"] == "own" and downstream["arms"]["gem3d-own"]["mask_edits"] == ""
    assert downstream["arms"]["mask-only"]["mask_edits"] == downstream["arms"]["gem3d"]["mask_edits"] != ""
    assert downstream["tstr"] == {}  # --quick: no TSTR (the library test covers it)
    assert all(r["steps"] <= 4 for r in downstream["runs"])
    deviations = " ".join(report["deviations"])
    for option in ("--arms", "--real-counts", "--multipliers", "--seeds", "--downstream-steps"):
        assert option in deviations
    assert "downstream Dice at 2 real cases" in capsys.readouterr().out
    assert (tmp_path / "report_utility.png").stat().st_size > 0


@pytest.mark.nnunet
def test_evaluate_with_nnunet_as_the_judge(cohort: tuple[Path, Path, Path], tmp_path: Path) -> None:
    # prepare
    pytest.importorskip("nnunetv2")
    run, train_data, held_out = cohort
    out = tmp_path / "report.json"

    # execute: real-only and real + GEM-3D at 2 real cases, one seed, nnU-Net's short CPU budget
    code = _gem3d(
        "evaluate", "--checkpoint", run, "--data", held_out, "--out", out, "--baselines", "none", "--quick",
        "--downstream-data", train_data, "--segmenter", "nnunet", "--nnunet-budget", "short", "--threads", "1",
    )  # fmt: skip

    # assert
    assert code == 0
    downstream = json.loads(out.read_text())["downstream"]
    assert downstream["segmenter"] == "nnunet (short budget)"
    assert {(r["arm"], r["segmenter"], r["trainer"]) for r in downstream["runs"]} == {
        ("real_only", "nnunet", "nnUNetTrainer_1epoch"),
        ("gem3d", "nnunet", "nnUNetTrainer_1epoch"),
    }
    assert all(r["capped"] for r in downstream["runs"])  # a short budget is never read as converged
    assert 0.0 <= downstream["headline"]["real_only"]["mean"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "report.nnunet").iterdir()) == ["logs"]


def test_a_downstream_pool_that_shares_test_cases_is_refused_before_any_sampling(
    cohort: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _, held_out = cohort
    out = tmp_path / "report.json"

    code = _gem3d("evaluate", "--checkpoint", run, "--data", held_out, "--out", out, "--quick",
                  "--downstream-data", held_out)  # fmt: skip

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "also test cases" in err[0], err  # one line: no "sampling" was logged before it
    assert not out.exists()


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
        ({"--arms": "gem3D"}, "unknown arm 'gem3D'"),
        ({"--real-counts": "0,2"}, "--real-counts 0,2: expected comma-separated integers >= 1"),
        ({"--downstream-data": "missing_pool"}, "--downstream-data"),
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
        if key in ("--baselines", "--arms", "--real-counts"):
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
