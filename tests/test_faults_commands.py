"""Bad inputs and faults against every command: one line naming the culprit, nothing written (issue 13).

One representative per class the fault harness found unclean, each run through the real CLI entry
point: a non-zero exit, exactly one line on stderr naming the option or file (and the valid range
where there is one), no traceback, no file left behind and every existing file byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from experiments.cli import main
from gem3d.checkpoint import save_checkpoint
from tests.conftest import copy_dataset

MICRO_SET = [
    "data.image_size=16", "data.window=4", "model.channels='8,16'", "model.attention_levels='false,true'",
    "model.norm_num_groups=4", "model.num_head_channels=8", "train.batch_size=2",
]  # fmt: skip
MICRO_ARGS = [arg for setting in MICRO_SET for arg in ("--set", setting)]


def _fingerprint(path: Path) -> str:
    if path.is_dir():
        return "dir"
    stat = path.stat()  # a sparse giant is compared by size and time, not read
    return (
        hashlib.sha256(path.read_bytes()).hexdigest() if stat.st_size < 2**24 else f"{stat.st_size}@{stat.st_mtime_ns}"
    )


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the sha256 of its bytes (folders as 'dir')."""
    return {str(p.relative_to(root)): _fingerprint(p) for p in sorted(root.rglob("*"))}


def _refused(argv: list[str | Path], work: Path, capsys: pytest.CaptureFixture[str], *culprits: str) -> str:
    """Run ``gem3d argv``; assert a clean refusal that names every culprit; return the line."""
    before = _tree(work)
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:  # argparse
        code = exit_info.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code not in (0, None), err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert all(culprit in lines[0] for culprit in culprits), lines[0]
    assert _tree(work) == before  # nothing partial, nothing changed
    return lines[0]


def _sparse_mask(folder: Path) -> Path:
    """An honest mask no disk has room to sample: an uncompressed uint8 NIfTI whose float32 volume
    outgrows the free space. The file is sparse (no block is written), so it costs nothing."""
    side = round((shutil.disk_usage(folder).free / 3) ** (1 / 3)) + 1
    image = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.eye(4))
    image.header.set_data_shape((side, side, side))
    path = folder / "huge_mask.nii"
    with path.open("wb") as stream:
        stream.write(image.header.binaryblock + b"\0" * 4)
        stream.truncate(352 + side**3)
    return path


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def data(phantom_dir: Path, work: Path) -> Path:
    """A writable copy of the phantom dataset inside ``work``."""
    return copy_dataset(phantom_dir, work / "data")


def _sample(command: str, run: Path, mask: Path, out: Path, *extra: str | Path) -> list[str | Path]:
    argv = [command, "--checkpoint", run, "--mask", mask, "--informed", "generate", "--out", out]
    return [*argv, "--steps", "2", "--track", "off", *extra]


# ---- free space: estimated from the mask's header before the model loads --------------------------


@pytest.mark.parametrize(("command", "extra"), [("sample", ()), ("counterfactual", ("--remove-label", "1"))])
def test_a_mask_whose_volume_no_disk_holds_is_refused_before_the_model_loads(
    command: str, extra: tuple[str, ...], work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mask = _sparse_mask(work)

    # the run does not exist: the disk is named first, before any model is looked for
    _refused(_sample(command, work / "no_run", mask, work / "out.nii.gz", *extra), work, capsys, "--out", "needs about")


def test_evaluate_refuses_baselines_that_no_disk_holds_before_training_them(
    micro_run: Path, phantom_dir: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # prepare: a run whose embedded config declares a network far too big to checkpoint here
    metadata = json.loads((micro_run / "config.json").read_text())
    config = metadata.get("config", metadata)
    config["model"]["channels"] = [32768, 32768]
    run = work / "run"
    run.mkdir()
    save_checkpoint(run / "volume.safetensors", {"ema.w": torch.ones(1)}, {"stage": "volume", "config": config})
    argv = ["evaluate", "--checkpoint", run, "--data", phantom_dir, "--train-data", phantom_dir, "--quick"]
    argv += ["--baselines", "mask-only", "--no-downstream", "--out", work / "report.json", "--track", "off"]

    _refused(argv, work, capsys, "--out", "needs about", "TiB")


# ---- options: the option, the value and the valid range --------------------------------------------


def test_a_negative_informed_slice_index_is_refused(
    micro_run: Path, phantom_dir: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = phantom_dir / "imagesTr" / "phantom_001_0000.nii.gz"
    argv = _sample("sample", micro_run, phantom_dir / "labelsTr" / "phantom_001.nii.gz", work / "o.nii.gz")
    argv[argv.index("generate")] = f"real:{image}@-1"

    _refused(argv, work, capsys, "--informed", "@-1", ">= 0")


@pytest.mark.parametrize("edit", ["rotate:abc", "nosuch", "rotate:"])
def test_a_bad_mask_edit_names_the_option(
    edit: str, micro_run: Path, phantom_dir: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mask = phantom_dir / "labelsTr" / "phantom_001.nii.gz"

    _refused(
        _sample("counterfactual", micro_run, mask, work / "c.nii.gz", "--mask-edit", edit), work, capsys, "--mask-edit"
    )


@pytest.mark.parametrize("reference", ["", "real:", "{work}"])
def test_a_bad_deenhance_reference_names_reference_not_informed(
    reference: str, micro_run: Path, phantom_dir: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["deenhance", "--checkpoint", micro_run, "--data", phantom_dir, "--out", work / "de", "--track", "off"]
    line = _refused([*argv, "--reference", reference.format(work=work)], work, capsys, "--reference")

    assert "--informed" not in line


def test_evaluate_refuses_an_empty_seed_list(
    micro_run: Path, phantom_dir: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["evaluate", "--checkpoint", micro_run, "--data", phantom_dir, "--out", work / "r.json", "--seeds", ""]

    _refused([*argv, "--track", "off"], work, capsys, "--seeds", "integers")


def test_a_config_folder_names_the_option(phantom_dir: Path, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["audit", "--synthetic", phantom_dir, "--train", phantom_dir, "--holdout", phantom_dir]

    _refused([*argv, "--out", work / "a.json", "--config", work, "--track", "off"], work, capsys, "--config", "folder")


# ---- outputs inside their inputs -----------------------------------------------------------------


OUTPUT_INSIDE: dict[str, Callable[[Path, Path], list[str | Path]]] = {
    "deenhance": lambda run, data: [
        "deenhance", "--checkpoint", run, "--data", data, "--reference", next((data / "imagesTr").iterdir()),
        "--out", data / "deenhanced", "--track", "off",
    ],
    "release": lambda run, data: [
        "release", "--checkpoint", run, "--data", data, "--out", data / "labelsTr" / "release", "--allow-non-dp",
    ],
    "enhance": lambda run, data: [
        "enhance", "--checkpoint", run, "--data", data, "--out", data / "enhanced", "--steps", "2", "--track", "off",
    ],
    "prepare": lambda run, data: ["prepare", "--layout", "nnunet", "--input", data, "--output", data / "cache"],
    "train": lambda run, data: [
        "train", "--data", data, "--stage", "slice", "--out", data / "imagesTr", "--public-data", "--track", "off",
        *MICRO_ARGS,
    ],
}  # fmt: skip


@pytest.mark.parametrize("command", OUTPUT_INSIDE)
def test_an_output_inside_its_input_folder_is_refused(
    command: str, micro_run: Path, data: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _refused(OUTPUT_INSIDE[command](micro_run, data), work, capsys, "inside", str(data))


# ---- one line: what a stage starts from is checked before the data is read -------------------------


def _flipped(run: Path, stage: str) -> Path:
    path = run / f"{stage}.safetensors"
    payload = bytearray(path.read_bytes())
    payload[-1] ^= 0x01
    path.write_bytes(bytes(payload))
    return path


@pytest.mark.parametrize(
    ("setup", "extra", "culprit"),
    [
        (lambda w, run: None, ["--resume"], "--resume"),
        (lambda w, run: None, ["--init", "{work}/no_such_run"], "no_such_run"),
        (lambda w, run: _flipped(run, "slice"), ["--init", "{work}/init"], "slice.safetensors"),
        (lambda w, run: None, ["--init", "{work}/init/informed.safetensors"], "'informed'-stage"),
        (lambda w, run: None, ["--device", "tpu"], "tpu"),
        (lambda w, run: None, ["--stage", "volume"], "slice"),
    ],
    ids=["resume-nothing", "init-missing", "init-flipped-byte", "init-wrong-stage", "device-bogus", "volume-first"],
)
def test_train_refuses_a_bad_start_in_one_line_before_reading_the_data(
    setup: Callable[[Path, Path], object],
    extra: list[str],
    culprit: str,
    micro_run: Path,
    data: Path,
    work: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # prepare: the phantoms' labels cover part of the slice, which training warns about once the data
    # is read: a refusal before the data is read prints that error alone
    init = Path(shutil.copytree(micro_run, work / "init"))
    setup(work, init)
    argv = ["train", "--data", data, "--stage", "slice", "--out", work / "run", "--public-data", "--track", "off"]
    argv += [*MICRO_ARGS, *(e.format(work=work) for e in extra)]  # a later --stage wins

    _refused(argv, work, capsys, culprit)


def test_audit_input_errors_are_one_line_without_the_training_field_of_view_warning(
    phantom_dir: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["audit", "--synthetic", work / "no_synthetic", "--train", phantom_dir, "--holdout", phantom_dir]
    argv += ["--out", work / "a.json", "--quantile", "0.25", "--grid", "8", "--track", "off"]

    _refused(argv, work, capsys, "no_synthetic")


# ---- representatives of the classes that were already clean -----------------------------------------


def _nan_affine_mask(folder: Path, phantom_dir: Path) -> Path:
    label = np.asarray(nib.load(phantom_dir / "labelsTr" / "phantom_001.nii.gz").dataobj).astype(np.int16)
    header = nib.Nifti1Image(label, np.eye(4)).header.copy()
    header["srow_x"], header["srow_y"], header["srow_z"] = [np.array([np.nan, 0, 0, 0])] * 3
    header["sform_code"], header["qform_code"] = 1, 0
    path = folder / "nan_affine.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + label.tobytes(order="F"))
    return path


def _float_mask(folder: Path, phantom_dir: Path) -> Path:
    image = nib.load(phantom_dir / "labelsTr" / "phantom_001.nii.gz")
    path = folder / "float_labels.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj, np.float32) + 0.25, image.affine), path)
    return path


@pytest.mark.parametrize(("make", "culprit"), [(_nan_affine_mask, "nan_affine.nii"), (_float_mask, "float_labels")])
def test_a_bad_mask_is_named(
    make: Callable[[Path, Path], Path],
    culprit: str,
    micro_run: Path,
    phantom_dir: Path,
    work: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mask = make(work, phantom_dir)

    _refused(_sample("sample", micro_run, mask, work / "o.nii.gz"), work, capsys, culprit)


def test_an_existing_preview_is_kept_byte_for_byte(
    micro_run: Path, phantom_dir: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (work / "o.png").write_bytes(b"\x89PNG mine")
    mask = phantom_dir / "labelsTr" / "phantom_001.nii.gz"

    _refused(_sample("sample", micro_run, mask, work / "o.nii.gz"), work, capsys, "o.png", "already exists")


def test_a_stage_file_that_is_a_folder_is_named(
    micro_run: Path, phantom_dir: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Path(shutil.copytree(micro_run, work / "run"))
    (run / "volume.safetensors").unlink()
    (run / "volume.safetensors").mkdir()
    mask = phantom_dir / "labelsTr" / "phantom_001.nii.gz"

    _refused(_sample("sample", run, mask, work / "o.nii.gz"), work, capsys, "volume.safetensors")


@pytest.mark.parametrize(
    "extra, culprit",
    [(["--fresh"], "not a demo's"), ([], "not a demo's"), (["--small", "--sites", "4"], "not with --small")],
)
def test_the_demo_refuses_a_foreign_out_folder_even_with_fresh_and_sites_with_small(
    extra: list[str], culprit: str, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("a user's own file, which --fresh must not delete")

    _refused(
        ["demo", "--out", work / "mine", *extra], work, capsys, "mine" if "not a" in culprit else "--sites", culprit
    )


def test_release_names_a_missing_holdout_before_reading_the_training_data(
    micro_run: Path, data: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (data / "imagesTr" / "phantom_001_0000.nii.gz").write_bytes(b"not a NIfTI")  # read first, it would be named
    argv = ["release", "--checkpoint", micro_run, "--data", data, "--out", work / "release", "--allow-non-dp"]

    _refused([*argv, "--holdout", work / "no_holdout", "--track", "off"], work, capsys, "no_holdout", "not found")


def test_prepare_refuses_a_dataset_json_declaring_more_labels_than_a_label_map_holds(
    data: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"] = {"background": 0, **{f"structure_{v}": v for v in range(1, 300)}}
    (data / "dataset.json").write_text(json.dumps(meta))

    _refused(["prepare", "--layout", "nnunet", "--input", data, "--output", work / "cache"], work, capsys, "300 label")


def test_an_empty_device_is_refused_not_taken_for_the_default(
    micro_run: Path, phantom_dir: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mask = phantom_dir / "labelsTr" / "phantom_001.nii.gz"

    _refused([*_sample("sample", micro_run, mask, work / "o.nii.gz"), "--device", ""], work, capsys, "--device")


@pytest.mark.parametrize("holdout", ["same folder", "renamed copy"])
def test_a_holdout_that_holds_a_training_case_is_refused(
    phantom_dir: Path, work: Path, capsys: pytest.CaptureFixture[str], holdout: str
) -> None:
    # prepare: the training folder itself, or a holdout of two new cases and a training case renamed
    import shutil

    if holdout == "same folder":
        reference = phantom_dir
    else:
        from gem3d.data.phantoms import write_phantom_dataset

        reference = write_phantom_dataset(work / "holdout", num_cases=3, shape=(16, 16, 12), seed=7)
        for kind, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
            shutil.copy(phantom_dir / kind / f"phantom_001{suffix}", reference / kind / f"phantom_002{suffix}")
    argv = ["audit", "--synthetic", phantom_dir, "--train", phantom_dir, "--holdout", reference]
    argv += ["--out", work / "a.json", "--quantile", "0.5", "--track", "off"]

    line = _refused(argv, work, capsys, f"--holdout {reference}", "training cases", "never saw")
    shared = "phantom_001" if holdout == "same folder" else "phantom_002"
    assert f"{shared} = training phantom_001" in line
