"""The release gate: policy, header scrubbing, pseudonyms, ledger and audit checks, nothing partial."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from gem3d.config import Config, PrivacyConfig
from gem3d.data.dataset import load_volumes
from gem3d.data.phantoms import write_phantom_dataset
from gem3d.data.volume import Volume
from gem3d.errors import DataError
from privacy.audit import AuditSettings
from privacy.errors import ReleasePolicyError, ReleaseRefusedError
from privacy.ledger import PrivacyLedger
from privacy.model_privacy import site_entry, stage_record, statement
from privacy.release import (
    PIXEL_CHUNK,
    SCRUBBED_FIELDS,
    GeneratedCase,
    ReleasePolicy,
    check_policy,
    nearest_slice_rms,
    pseudonymous_ids,
    release_cohort,
    scrub_nifti,
    secret_order,
)

SHAPE = (16, 16, 12)
# six training patients, leave-one-out: six reference distances place the 0.2 quantile (0.05 needs 20)
SIX_CASES = AuditSettings(quantile=0.2)
EDITED = [{"name": "rotate", "changed": True}]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("release")
    return {
        "train": write_phantom_dataset(root / "site_hospital_a", num_cases=6, shape=SHAPE, seed=21),
        "generated": write_phantom_dataset(root / "donor_cohort", num_cases=3, shape=SHAPE, seed=22),
    }


def _cases(folder: Path, informed: str = "generate", edits: list | None = None) -> list[GeneratedCase]:
    """Stand-ins for generated cases, with provenance that names its sources (which must not leak)."""
    cases = []
    for image_path in sorted((folder / "imagesTr").glob("*.nii.gz")):
        case_id = image_path.name.removesuffix("_0000.nii.gz")
        image = nib.load(image_path)
        label = nib.load(folder / "labelsTr" / f"{case_id}.nii.gz")
        provenance = {
            "source_case": case_id,
            "site": "site_hospital_a",
            "path": str(image_path),
            "date": "2024-05-06",
            "informed": {"kind": informed, "case": case_id},
            "mask_edits": EDITED if edits is None else edits,
        }
        # a stand-in for a generated informed slice on the 16x16 model grid: noise, like no real slice
        informed_slice = np.random.default_rng(len(cases)).uniform(-1, 1, (16, 16)).astype(np.float32)
        cases.append(
            GeneratedCase(
                np.asarray(image.dataobj), np.asarray(label.dataobj), image.affine, provenance, informed_slice
            )
        )
    return cases


def _ledger(tmp_path: Path, steps: int = 10) -> PrivacyLedger:
    ledger = PrivacyLedger.open(tmp_path / "privacy_ledger.json", PrivacyConfig(enabled=True))
    if steps:
        ledger.record(steps, 1.0, 0.25, label="slice")
    return ledger


def _dp_statement(ledger: PrivacyLedger) -> dict[str, Any]:
    """The privacy statement of a model whose one stage trained under ``ledger``."""
    return statement([("slice", stage_record(public=False, sites={"site-a": site_entry(ledger)}))])


def _all_text(folder: Path) -> str:
    """Every byte of every file in ``folder`` (gz files decompressed too), as latin-1 text."""
    chunks = []
    for path in folder.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            chunks.append(raw.decode("latin-1"))
            if path.suffix == ".gz":
                chunks.append(gzip.decompress(raw).decode("latin-1"))
            chunks.append(str(path.relative_to(folder)))
    return "\n".join(chunks)


def test_headers_are_scrubbed(tmp_path: Path) -> None:
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    original = nib.Nifti1Image(np.arange(24, dtype=np.float32).reshape(2, 3, 4), affine)
    original.header["descrip"] = b"Doe^John 1970-01-01 scanned 2023-02-03"
    original.header["aux_file"] = b"MRN123456"
    original.header["db_name"] = b"hospital_pacs"
    original.header["intent_name"] = b"patient42"
    original.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"AccessionNumber=999"))
    nib.save(original, tmp_path / "in.nii.gz")

    nib.save(scrub_nifti(nib.load(tmp_path / "in.nii.gz")), tmp_path / "out.nii.gz")

    scrubbed = nib.load(tmp_path / "out.nii.gz")
    for name in SCRUBBED_FIELDS:
        assert scrubbed.header[name].item() == b""
    assert len(scrubbed.header.extensions) == 0
    np.testing.assert_array_equal(np.asarray(scrubbed.dataobj), np.asarray(original.dataobj))
    np.testing.assert_allclose(scrubbed.affine, affine)
    text = gzip.decompress((tmp_path / "out.nii.gz").read_bytes())
    assert b"MRN123456" not in text and b"Doe^John" not in text and b"AccessionNumber" not in text


@pytest.mark.parametrize("kind", ["real", "copy", "file"])
def test_copied_informed_slices_are_refused(site: dict[str, Path], kind: str) -> None:
    cases = _cases(site["generated"], informed=kind)

    with pytest.raises(ReleasePolicyError, match=f"informed slice source '{kind}'"):
        check_policy(cases, ReleasePolicy())


@pytest.mark.parametrize(
    "edits",
    [
        [{"name": "rotate", "angle_deg": 7.0, "changed": False}],  # changed nothing
        [{"name": "flip", "axis": 2, "changed": True}],  # an isometry: the source's anatomy, mirrored
        [{"name": "rotate", "angle_deg": -90.0, "changed": True}, {"name": "relabel", "changed": True}],
        [{"name": "remove", "label": 3, "changed": True}],  # the outline stays the source's
    ],
)
def test_masks_not_reshaped_by_an_edit_are_refused(site: dict[str, Path], edits: list[dict[str, Any]]) -> None:
    cases = _cases(site["generated"], edits=edits)

    with pytest.raises(ReleasePolicyError, match="changed by 0 edit"):
        check_policy(cases, ReleasePolicy(min_mask_edits=1))
    reshaped = _cases(site["generated"], edits=[*edits, {"name": "elastic", "changed": True}])
    check_policy(reshaped, ReleasePolicy(min_mask_edits=1))


def test_a_spec_of_only_shape_preserving_edits_is_refused_before_generating() -> None:
    from gem3d.errors import ConfigError
    from privacy.release import release_dataset

    with pytest.raises(ConfigError, match="0 edit\\(s\\) that change the anatomy's shape"):
        release_dataset(
            None, Path("/nonexistent"), Path("/nonexistent/out"), per_case=1, mask_edit="flip,relabel:1=2",  # type: ignore[arg-type]
            policy=ReleasePolicy(), privacy_statement=None,
        )  # fmt: skip


def test_informed_slice_equal_to_a_real_slice_is_refused_whatever_its_label(
    site: dict[str, Path], micro_cfg: Config, tmp_path: Path
) -> None:
    train = load_volumes(site["train"], micro_cfg.data)
    real = train[4].image[5]
    for copied in (real.copy(), np.fliplr(real).copy(), np.rot90(real, 1).copy(), np.flipud(np.rot90(real)).copy()):
        cases = _cases(site["generated"])
        cases[1] = GeneratedCase(**{**cases[1].__dict__, "informed_slice": copied})

        with pytest.raises(ReleasePolicyError, match="generated case 1: its informed slice matches a real training"):
            release_cohort(
                cases, tmp_path / "out", train=train, data_cfg=micro_cfg.data,
            audit_settings=SIX_CASES,
                privacy_statement=_dp_statement(_ledger(tmp_path)),
            )  # fmt: skip

    assert not (tmp_path / "out").exists()
    unchecked = _cases(site["generated"])
    unchecked[2] = GeneratedCase(**{**unchecked[2].__dict__, "informed_slice": None})
    with pytest.raises(ReleasePolicyError, match="generated case 2: its informed slice did not reach the release gate"):
        release_cohort(
            unchecked,
            tmp_path / "out",
            train=train,
            data_cfg=micro_cfg.data,
            audit_settings=SIX_CASES,
            privacy_statement=None,
        )


def _direct_rms(image: np.ndarray, volumes: list[Volume]) -> float:
    """The smallest RMS difference of ``image`` (its 8 dihedral variants) to any slice, pair by pair."""
    variants = [np.rot90(image, k) for k in range(4)]
    variants += [np.fliplr(v) for v in variants]
    return min(
        float(np.sqrt(((volume.image[z].astype(np.float64) - v) ** 2).mean()))
        for volume in volumes
        for z in range(volume.depth)
        for v in variants
    )


def test_the_pixel_check_finds_the_nearest_real_slice_as_a_pair_by_pair_search_does() -> None:
    # prepare: 3 real volumes; 40 slices (more than a chunk): noise, and copies flipped, rotated, noised
    rng = np.random.default_rng(0)
    real = [Volume(f"r{i}", rng.uniform(-1, 1, (5, 8, 8)).astype(np.float32), np.zeros((5, 8, 8), np.uint8))
            for i in range(3)]  # fmt: skip
    slices = [rng.uniform(-1, 1, (8, 8)).astype(np.float32) for _ in range(PIXEL_CHUNK + 8)]
    slices[3] = real[1].image[2].copy()
    slices[PIXEL_CHUNK + 1] = np.flipud(np.rot90(real[2].image[4])).copy()
    slices[7] = (real[0].image[0] + rng.normal(0, 0.01, (8, 8))).astype(np.float32)

    # execute
    found = nearest_slice_rms(slices, real)

    # assert
    expected = [_direct_rms(image, real) for image in slices]
    assert np.allclose(found, expected, rtol=1e-9, atol=1e-6)
    assert found[3] < 1e-6 and found[PIXEL_CHUNK + 1] < 1e-6 and 0.005 < found[7] < 0.015
    assert min(np.delete(found, [3, 7, PIXEL_CHUNK + 1])) > 0.3
    with pytest.raises(DataError, match="generated case 0: informed slice shape"):
        nearest_slice_rms([np.zeros((4, 4), np.float32)], real)


def test_release_writes_a_scrubbed_pseudonymous_cohort(
    site: dict[str, Path], micro_cfg: Config, tmp_path: Path
) -> None:
    train = load_volumes(site["train"], micro_cfg.data)
    ledger = _ledger(tmp_path / "site")
    out = tmp_path / "release"

    release_cohort(
        _cases(site["generated"]),
        out,
        train=train,
        data_cfg=micro_cfg.data,
        audit_settings=SIX_CASES,
        privacy_statement=_dp_statement(ledger),
        generator={"checkpoint_sha256": "ab" * 32},
        seed=0,  # the secret order made reproducible for the test: permutation [2, 0, 1]
    )

    report = json.loads((out / "privacy_report.json").read_text())
    assert report["differential_privacy"]["epsilon"] == pytest.approx(ledger.epsilon)
    assert report["differential_privacy"]["accountant"] == "rdp"
    assert report["audit"]["passed"] is True and report["audit"]["copies"] == 0
    assert report["policy"]["min_mask_edits"] == 1
    released = load_volumes(out, micro_cfg.data)
    assert len(released) == 3 and all(v.case_id.startswith("gem3d_syn_") for v in released)
    # the recipient's linkage attack: released files in listing order, matched to the sources by pixels
    sources = [np.asarray(case.image) for case in _cases(site["generated"])]
    files = sorted((out / "imagesTr").glob("*_0000.nii.gz"))
    matched = [next(i for i, s in enumerate(sources) if np.allclose(nib.load(f).get_fdata(), s)) for f in files]
    assert matched == secret_order(3, seed=0) != [0, 1, 2]  # the i-th name went to source order[i]
    text = _all_text(out)
    for source_id in [f"phantom_{i:03d}" for i in range(6)] + ["site_hospital_a", "donor_cohort", str(tmp_path)]:
        assert source_id not in text
    assert re.search(r"(19|20)\d\d-\d\d-\d\d", text) is None
    for path in out.rglob("*.nii.gz"):
        header = nib.load(path).header
        assert all(header[name].item() == b"" for name in SCRUBBED_FIELDS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release", "site"]


def test_release_refuses_a_planted_copy_and_writes_nothing(
    site: dict[str, Path], micro_cfg: Config, tmp_path: Path
) -> None:
    train = load_volumes(site["train"], micro_cfg.data)
    cases = _cases(site["generated"])
    cases += [c for c in _cases(site["train"]) if "phantom_002" in c.provenance["source_case"]]

    with pytest.raises(ReleaseRefusedError, match="audit found 1 of 4"):
        release_cohort(
            cases,
            tmp_path / "out",
            train=train,
            data_cfg=micro_cfg.data,
            audit_settings=SIX_CASES,
            privacy_statement=_dp_statement(_ledger(tmp_path)),
        )

    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["privacy_ledger.json"]


def test_release_refuses_a_model_with_a_stage_trained_without_dp(
    site: dict[str, Path], micro_cfg: Config, tmp_path: Path
) -> None:
    train = load_volumes(site["train"], micro_cfg.data)
    ledger = _ledger(tmp_path)
    public_base = stage_record(public=True, sites={})
    mixed = statement([
        ("slice", stage_record(public=False, sites={"site-a": site_entry(ledger)})),
        ("volume", stage_record(public=False, sites={"site-b": site_entry(None)})),
    ])  # fmt: skip

    for refused, reason in ((None, "slice: no privacy record"), (mixed, "volume: trained on site-b's data without")):
        with pytest.raises(ReleaseRefusedError, match=f"not DP-SGD trained throughout: {reason}"):
            release_cohort(
                _cases(site["generated"]), tmp_path / "out", train=train, data_cfg=micro_cfg.data,
            audit_settings=SIX_CASES,
                privacy_statement=refused if refused is not None else statement([("slice", None)]),
            )  # fmt: skip

    assert not (tmp_path / "out").exists()
    assert statement([("slice", public_base)])["non_dp_private"] == []  # public pre-training is not refused

    assert not (tmp_path / "out").exists()


def test_the_secret_order_is_a_uniform_permutation() -> None:
    draws = [tuple(secret_order(4)) for _ in range(2400)]

    assert all(sorted(d) == [0, 1, 2, 3] for d in draws)
    counts = np.bincount([d.index(0) for d in draws], minlength=4)  # where case 0 lands: 600 each expected
    assert counts.min() > 480 and counts.max() < 720
    assert len(set(draws)) == 24


def test_pseudonymous_ids_are_distinct_and_seedable() -> None:
    assert pseudonymous_ids(50, seed=1) == pseudonymous_ids(50, seed=1)
    assert len(set(pseudonymous_ids(50))) == 50
    assert pseudonymous_ids(5) != pseudonymous_ids(5)


def test_gem3d_release_refuses_a_model_without_dp(
    site: dict[str, Path], micro_cfg: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from experiments.cli import main
    from gem3d.runs import train_stage

    volumes = load_volumes(site["train"], micro_cfg.data)
    run = tmp_path / "run"
    train_stage(micro_cfg, volumes, "slice", run, steps=0)
    train_stage(micro_cfg, volumes, "volume", run, steps=0)

    code = main(["release", "--checkpoint", str(run), "--data", str(site["train"]), "--out", str(tmp_path / "out")])

    assert code == 2
    assert "the model is not DP-SGD trained throughout" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "mlflow").exists()  # a refusal is not tracked either


@pytest.fixture(autouse=True)
def _no_tracking_server(monkeypatch: pytest.MonkeyPatch) -> None:
    # the embedded store is what the release test reads back; a developer's server must not get test runs
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_gem3d_release_publishes_and_tracks_the_privacy_report(
    site: dict[str, Path], micro_cfg: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # prepare: a micro run trained with DP-SGD in every stage, each checkpoint recording it
    import functools

    from mlflow import MlflowClient

    from experiments.cli import main
    from experiments.tracking import read_runs, tracking_uri
    from gem3d.runs import train_stage
    from privacy.dp_sgd import train_private

    cfg = micro_cfg.model_copy(
        update={"privacy": micro_cfg.privacy.model_copy(update={"enabled": True, "budget_epsilon": 1e4})}
    )
    volumes = load_volumes(site["train"], cfg.data)
    run = tmp_path / "run"
    ledger = PrivacyLedger.open(tmp_path / "site" / "privacy_ledger.json", cfg.privacy)
    dp_train = functools.partial(train_private, privacy_cfg=cfg.privacy, ledger=ledger)

    def record() -> dict[str, Any]:
        return {"privacy": stage_record(public=False, sites={"site-a": site_entry(ledger)})}

    for stage in ("slice", "volume", "informed"):
        train_stage(cfg, volumes, stage, run, steps=1, train_fn=dp_train, extra_metadata=record)  # type: ignore[arg-type]
    out = tmp_path / "project" / "released"

    # execute
    args = ["release", "--checkpoint", str(run), "--data", str(site["train"]), "--out", str(out)]
    code = main([*args, "--steps", "2", "--grid", "16", "--quantile", "0.2", "--seed", "3"])

    # assert: the cohort and report exist, and the MLflow run beside --out carries the same figures
    assert code == 0
    report = json.loads((out / "privacy_report.json").read_text())
    assert f"ε = {report['differential_privacy']['epsilon']:.3f}" in capsys.readouterr().out
    store = tmp_path / "project" / "mlflow"
    runs = read_runs(store, "gem3d-release")
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED" and runs[0]["run_name"] == "released"
    logged = runs[0]
    assert logged["metrics"]["epsilon"] == pytest.approx(ledger.epsilon)
    assert logged["metrics"]["delta"] == pytest.approx(cfg.privacy.delta)
    assert logged["metrics"]["cases"] == report["cases"] == len(volumes)
    assert logged["metrics"]["audit.copies"] == 0.0
    # the published audit holds counts, no distance between real patients (nor does the release's MLflow run)
    assert "thresholds" not in report["audit"] and "reference_nn" not in report["audit"]
    assert not any(key.startswith(("audit.threshold", "audit.nn_")) for key in logged["metrics"])
    assert logged["params"]["release.accountant"] == report["differential_privacy"]["accountant"] == "rdp"
    assert logged["params"]["release.policy.informed_source"] == "generate only"
    assert logged["params"]["privacy.enabled"] == "True"
    # assert: one canonical header for every released case, equal to no source header; dataset-level intensities
    sources = [nib.load(p) for p in sorted((site["train"] / "imagesTr").glob("*.nii.gz"))]
    released = [nib.load(p) for p in sorted((out / "imagesTr").glob("*.nii.gz"))]
    geometry = {(r.shape, r.affine.round(6).tobytes()) for r in released}
    assert len(geometry) == 1
    assert all(r.shape != s.shape or not np.allclose(r.affine, s.affine) for r in released for s in sources)
    assert all(float(r.get_fdata().min()) >= 0.0 and float(r.get_fdata().max()) <= 1.0 for r in released)
    client = MlflowClient(tracking_uri=tracking_uri(store))
    artifacts = {a.path for a in client.list_artifacts(logged["run_id"])}
    assert "privacy_report.json" in artifacts and "previews" in artifacts
    previews = {a.path for a in client.list_artifacts(logged["run_id"], "previews")}
    assert previews == {
        f"previews/{path.name.removesuffix('_0000.nii.gz')}.png" for path in (out / "imagesTr").iterdir()
    }


@pytest.fixture(scope="module")
def dp_run(site: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro run trained with DP-SGD (1 step per stage), each checkpoint recording it (read-only)."""
    import functools

    from gem3d.config import config_from_dict
    from gem3d.runs import train_stage
    from privacy.dp_sgd import train_private
    from tests.conftest import MICRO

    cfg = config_from_dict({**MICRO, "privacy": {"enabled": True, "budget_epsilon": 1e4}})
    volumes = load_volumes(site["train"], cfg.data)
    root = tmp_path_factory.mktemp("dp_run")
    ledger = PrivacyLedger.open(root / "site" / "privacy_ledger.json", cfg.privacy)
    dp_train = functools.partial(train_private, privacy_cfg=cfg.privacy, ledger=ledger)

    def record() -> dict[str, Any]:
        return {"privacy": stage_record(public=False, sites={"site-a": site_entry(ledger)})}

    for stage in ("slice", "volume", "informed"):
        train_stage(cfg, volumes, stage, root / "run", steps=1, train_fn=dp_train, extra_metadata=record)  # type: ignore[arg-type]
    return root / "run"


def test_gem3d_release_refuses_a_generator_that_returns_real_slices(
    site: dict[str, Path], dp_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # prepare: the adversary's generator hands out real training slices, flipped, as "generated" ones
    import gem3d.enhance
    import gem3d.synthesis
    from experiments.cli import main
    from gem3d.sampler import InformedSlice

    real = load_volumes(site["train"], gem3d.synthesis.load_synthesiser(dp_run).cfg.data)

    def leaking(synth: Any, masks: list[np.ndarray], starts: list[int], seeds: list[int]) -> list[InformedSlice]:
        picks = [real[i % len(real)].image[min(z, real[i % len(real)].depth - 1)] for i, z in enumerate(starts)]
        return [InformedSlice(np.fliplr(p).copy(), None, "generate", {}) for p in picks]

    monkeypatch.setattr(gem3d.enhance, "generated_informed", leaking)  # what plan_enhancement calls
    out = tmp_path / "released"
    # execute
    code = main(["release", "--checkpoint", str(dp_run), "--data", str(site["train"]), "--out", str(out),
                 "--steps", "2", "--grid", "16", "--quantile", "0.2", "--track", "off",
                 "--max-linkage-rate", "1"])  # fmt: skip
    # assert: refused by the pixel check, one line, nothing written anywhere beside --out
    assert code == 2
    assert "its informed slice matches a real training slice" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_gem3d_release_refuses_a_holdout_that_is_its_training_data(
    site: dict[str, Path], dp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from experiments.cli import main

    out = tmp_path / "released"
    code = main(["release", "--checkpoint", str(dp_run), "--data", str(site["train"]), "--out", str(out),
                 "--holdout", str(site["train"]), "--steps", "2", "--track", "off"])  # fmt: skip

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"--holdout {site['train']}: 6 of 6 holdout cases are training cases" in err
    assert list(tmp_path.iterdir()) == []


def _source_ids(site: dict[str, Path]) -> list[str]:
    return [p.name.removesuffix(".nii.gz") for p in (site["train"] / "labelsTr").glob("*.nii.gz")]


def test_a_killed_release_leaves_nothing_and_the_next_one_cleans_up(
    site: dict[str, Path], dp_run: Path, tmp_path: Path
) -> None:
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from gem3d.files import WORK_PREFIX, work_prefix
    from privacy.release import INCOMPLETE

    repo = Path(__file__).resolve().parent.parent
    argv = [
        sys.executable,
        "-m",
        "experiments.cli",
        "release",
        "--checkpoint",
        str(dp_run),
        "--data",
        str(site["train"]),
        "--steps",
        "2",
        "--grid",
        "16",
        "--quantile",
        "0.2",
        "--track",
        "off",
        "--max-linkage-rate",
        "1",
    ]  # fmt: skip; the linkage gate is not this test's subject
    temp_before = set(Path(tempfile.gettempdir()).iterdir())
    # execute: SIGKILL at two points of a release (start-up or generation, then writing or audit)
    for delay in (3.0, 7.0):
        process = subprocess.Popen([*argv, "--out", str(tmp_path / "killed")], cwd=repo, env=os.environ.copy())
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed = tmp_path / "killed"
        if killed.exists():  # it published before the kill (a quiet machine): only ever a complete release
            assert (killed / "privacy_report.json").exists() and not (killed / INCOMPLETE).exists()
            shutil.rmtree(killed)
        # assert: nothing beside --out or in the temp dir names a source case
        leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
        leftovers += [p for p in Path(tempfile.gettempdir()).iterdir() if p not in temp_before]
        for path in leftovers:
            text = _all_text(path.parent) if path.suffix in (".gz", ".json") else path.name
            assert not any(case in text or case in str(path) for case in _source_ids(site)), path
    # a working folder left by a killed release whatever the timing above: its process is gone
    stale = tmp_path / f"{work_prefix(process.pid)}planted"
    (stale / "imagesTr").mkdir(parents=True)
    (stale / "imagesTr" / "gem3d_syn_0_0000.nii.gz").write_bytes(b"un-audited")
    # execute: the next release into the same folder
    done = subprocess.run([*argv, "--out", str(tmp_path / "released")], cwd=repo, capture_output=True, text=True)
    # assert: it succeeds, and no working folder of the killed ones is left
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(tmp_path.glob(f"{WORK_PREFIX}*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["released"]


def test_the_linkage_attack_finds_lightly_edited_masks_and_the_gate_refuses(
    site: dict[str, Path], micro_cfg: Config
) -> None:
    from gem3d.masks import apply_edits, flip, parse_edits
    from privacy.release import check_linkage

    train = load_volumes(site["train"], micro_cfg.data)
    others = load_volumes(site["generated"], micro_cfg.data)  # different patients, as a control
    rng = np.random.default_rng(0)
    sources = list(range(len(train)))
    # execute / assert: the attacker finds the source of unedited and flipped masks: refused
    for masks in ([v.label for v in train], [flip(v.label, 2) for v in train]):
        with pytest.raises(ReleaseRefusedError, match="closer to their source patient"):
            check_linkage(masks, sources, train, ReleasePolicy())
    rotated = [apply_edits(v.label, parse_edits("rotate:3"), 4, rng)[0] for v in train]
    with pytest.raises(ReleaseRefusedError, match=r"closer to their source|linkage attack found the source"):
        check_linkage(rotated, sources, train, ReleasePolicy(max_linkage_rate=0.2))
    # the control: other patients' masks do not link to the sources they are assigned
    control = check_linkage([v.label for v in others] * 2, sources, train, ReleasePolicy(max_linkage_rate=1.0))
    assert control["hit_rate"] <= 0.5 and control["chance"] == pytest.approx(1 / 6)


def test_gem3d_release_refuses_masks_the_linkage_attack_traces_back(
    site: dict[str, Path], dp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from experiments.cli import main

    code = main(["release", "--checkpoint", str(dp_run), "--data", str(site["train"]), "--out", str(tmp_path / "r"),
                 "--mask-edit", "rotate:2", "--steps", "2", "--quantile", "0.2", "--track", "off"])  # fmt: skip

    assert code == 2
    assert re.search(r"closer to their source patient|linkage attack found the source", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_gem3d_release_with_too_few_reference_patients_is_refused_before_generating(
    site: dict[str, Path], dp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from experiments.cli import main

    # six training patients, leave-one-out, the default 0.05 quantile: 20 are needed
    code = main(["release", "--checkpoint", str(dp_run), "--data", str(site["train"]), "--out", str(tmp_path / "r"),
                 "--steps", "2", "--track", "off"])  # fmt: skip

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "6 training cases" in err and "at least 20" in err and "window" not in err  # no sampling progress
    assert list(tmp_path.iterdir()) == []
