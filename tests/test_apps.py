"""The applications end to end on a micro run: sample, counterfactual, enhance, deenhance."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from experiments.cli import main


@pytest.fixture(scope="module")
def run(micro_run: Path) -> Path:
    return micro_run


def _gem3d(*args: object) -> int:
    # These tests are about the outputs; tracking (a new MLflow store costs seconds) has its own tests.
    return main([str(a) for a in args] + ["--track", "off"])


def test_sample_keeps_the_masks_geometry_and_seeds_give_identical_bytes(
    run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    mask = phantom_dir / "labelsTr" / "phantom_001.nii.gz"
    image = phantom_dir / "imagesTr" / "phantom_001_0000.nii.gz"

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert (
            _gem3d(
                "sample",
                "--checkpoint",
                run,
                "--mask",
                mask,
                "--informed",
                f"real:{image}@6",
                "--seed",
                seed,
                "--out",
                tmp_path / f"{name}.nii.gz",
            )
            == 0
        )

    out, reference = nib.load(tmp_path / "a.nii.gz"), nib.load(mask)
    assert out.shape == reference.shape
    np.testing.assert_allclose(out.affine, reference.affine)
    assert out.header.get_zooms() == reference.header.get_zooms()
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert (tmp_path / "a.nii.gz").read_bytes() != (tmp_path / "c.nii.gz").read_bytes()
    provenance = json.loads((tmp_path / "a.provenance.json").read_text())
    assert provenance["seed"] == 1 and provenance["informed"]["kind"] == "real"
    assert len(provenance["checkpoints"]["volume"]) == 64
    assert np.isfinite(out.get_fdata()).all()


@pytest.mark.parametrize("source", ["generate", "file"])
def test_sample_from_generated_or_file_informed_slice(
    run: Path, phantom_dir: Path, tmp_path: Path, source: str
) -> None:
    mask = phantom_dir / "labelsTr" / "phantom_002.nii.gz"
    spec = source
    if source == "file":
        slice_ = nib.load(phantom_dir / "imagesTr" / "phantom_000_0000.nii.gz").get_fdata()[:, :, 6]
        nib.save(nib.Nifti1Image(slice_.astype(np.float32), np.eye(4)), tmp_path / "slice.nii.gz")
        spec = f"file:{tmp_path / 'slice.nii.gz'}"

    code = _gem3d("sample", "--checkpoint", run, "--mask", mask, "--informed", spec, "--out", tmp_path / "s.nii.gz")

    assert code == 0
    assert nib.load(tmp_path / "s.nii.gz").shape == nib.load(mask).shape
    assert json.loads((tmp_path / "s.provenance.json").read_text())["informed"]["kind"] == source


def test_counterfactual_removes_a_label(run: Path, phantom_dir: Path, tmp_path: Path) -> None:
    mask = phantom_dir / "labelsTr" / "phantom_001.nii.gz"
    other = phantom_dir / "imagesTr" / "phantom_003_0000.nii.gz"

    code = _gem3d(
        "counterfactual",
        "--checkpoint",
        run,
        "--mask",
        mask,
        "--informed",
        f"real:{other}",
        "--remove-label",
        3,
        "--out",
        tmp_path / "cf.nii.gz",
    )

    assert code == 0
    edited = np.asarray(nib.load(tmp_path / "cf_mask.nii.gz").dataobj)
    assert 3 in np.asarray(nib.load(mask).dataobj) and 3 not in edited
    assert json.loads((tmp_path / "cf.provenance.json").read_text())["mask_edits"][0]["name"] == "remove"


@pytest.mark.parametrize(("informed", "edits"), [("copy", "flip"), ("generate", "rotate:10")])
def test_enhance_writes_a_dataset_with_provenance(
    run: Path, phantom_dir: Path, tmp_path: Path, informed: str, edits: str
) -> None:
    out = tmp_path / "enhanced"

    code = _gem3d(
        "enhance",
        "--checkpoint",
        run,
        "--data",
        phantom_dir,
        "--per-case",
        2,
        "--informed",
        informed,
        "--mask-edit",
        edits,
        "--out",
        out,
    )

    assert code == 0
    assert len(list((out / "imagesTr").glob("*_0000.nii.gz"))) == 8
    assert len(list((out / "labelsTr").glob("*.nii.gz"))) == 8
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 8
    record = json.loads((out / "provenance" / "phantom_000_syn001.json").read_text())
    assert record["source_case"] == "phantom_000" and record["informed"]["kind"] == informed
    assert record["mask_edits"][0]["name"] == edits.split(":")[0]
    source = nib.load(phantom_dir / "labelsTr" / "phantom_000.nii.gz")
    synthetic = nib.load(out / "imagesTr" / "phantom_000_syn001_0000.nii.gz")
    assert synthetic.shape == source.shape
    np.testing.assert_allclose(synthetic.affine, source.affine)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_deenhance_reports_site_spread(run: Path, phantom_dir: Path, two_site_dir: Path, tmp_path: Path) -> None:
    reference = phantom_dir / "imagesTr" / "phantom_000_0000.nii.gz"

    code = _gem3d(
        "deenhance",
        "--checkpoint",
        run,
        "--data",
        two_site_dir,
        "--reference",
        f"{reference}@6",
        "--out",
        tmp_path / "de",
    )

    assert code == 0
    report = json.loads((tmp_path / "de" / "deenhance_report.json").read_text())
    assert report["site_spread_before"]["sites"] == ["site_0", "site_1"]
    assert len(report["cases"]) == 4
    assert np.isfinite(report["site_spread_after"]["mean"]) and np.isfinite(report["spread_reduction"])
    assert len(list((tmp_path / "de" / "imagesTr").glob("*.nii.gz"))) == 4


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--informed", "copy"], "unknown source 'copy'"),
        (["--informed", "real:/nonexistent.nii.gz"], "/nonexistent.nii.gz: informed-slice file not found"),
        (["--informed", "generate", "--mask", "/nonexistent_mask.nii.gz"], "/nonexistent_mask.nii.gz"),
        (["--informed", "generate", "--mask", "/tmp"], "/tmp: is a folder"),
        (["--informed", "real:/tmp@3"], "/tmp is a folder"),
        (["--informed", "generate", "--start", "9999"], "--start 9999 of"),
    ],
)
def test_sample_bad_input_is_one_clear_error(
    run: Path, phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    argv = {
        "--checkpoint": str(run),
        "--mask": str(phantom_dir / "labelsTr" / "phantom_000.nii.gz"),
        "--out": str(tmp_path / "x.nii.gz"),
    }
    argv.update(dict(zip(args[::2], args[1::2], strict=True)))

    code = main(["sample", *[a for pair in argv.items() for a in pair], "--track", "off"])

    assert code == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_existing_output_is_never_overwritten(run: Path, phantom_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "kept"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")

    code = _gem3d("enhance", "--checkpoint", run, "--data", phantom_dir, "--out", out)

    assert code == 2
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("command", "sidecar"),
    [
        ("sample", "x.png"),
        ("sample", "x.provenance.json"),
        ("counterfactual", "x_mask.nii.gz"),
    ],
)
def test_an_existing_sidecar_is_refused_before_any_work(
    run: Path, phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, sidecar: str
) -> None:
    # prepare: a file the command would write beside --out, already there
    (tmp_path / sidecar).write_text("keep me")
    mask = phantom_dir / "labelsTr" / "phantom_001.nii.gz"
    extra = ["--remove-label", "3"] if command == "counterfactual" else []

    code = _gem3d(command, "--checkpoint", run, "--mask", mask, "--informed", "generate", *extra,
                  "--out", tmp_path / "x.nii.gz")  # fmt: skip

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{tmp_path / sidecar} already exists" in err
    assert (tmp_path / sidecar).read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [sidecar]


def test_an_output_under_a_file_is_one_line(
    run: Path, phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("not a folder")

    code = _gem3d("sample", "--checkpoint", run, "--mask", phantom_dir / "labelsTr" / "phantom_001.nii.gz",
                  "--informed", "generate", "--out", tmp_path / "afile" / "x.nii.gz")  # fmt: skip

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "is not a folder" in err and "--out" in err


def test_an_output_on_a_read_only_file_system_is_refused_before_any_work(
    run: Path, phantom_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # /proc refuses new files even to root: a real read-only file system, no mock
    code = _gem3d("sample", "--checkpoint", run, "--mask", phantom_dir / "labelsTr" / "phantom_001.nii.gz",
                  "--informed", "generate", "--out", "/proc/gem3d-test/x.nii.gz")  # fmt: skip

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--out /proc/gem3d-test/x.nii.gz: cannot write in /proc" in err


def test_a_mask_with_label_ids_the_model_was_not_trained_on_is_refused_by_name(
    run: Path, phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # prepare: a phantom mask with one tissue relabelled 7 (the model knows ids 0..3)
    source = nib.load(phantom_dir / "labelsTr" / "phantom_001.nii.gz")
    label = np.asarray(source.dataobj).copy()
    label[label == 2] = 7
    mask = tmp_path / "mask7.nii.gz"
    nib.save(nib.Nifti1Image(label, source.affine), mask)

    code = _gem3d(
        "sample", "--checkpoint", run, "--mask", mask, "--informed", "generate", "--out", tmp_path / "x.nii.gz"
    )

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(mask) in err and "unexpected label values [7]" in err
    assert not (tmp_path / "x.nii.gz").exists()
