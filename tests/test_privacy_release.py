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
from privacy.errors import ReleasePolicyError, ReleaseRefusedError
from privacy.ledger import PrivacyLedger
from privacy.model_privacy import site_entry, stage_record, statement
from privacy.release import (
    SCRUBBED_FIELDS,
    GeneratedCase,
    ReleasePolicy,
    check_policy,
    pseudonymous_ids,
    release_cohort,
    scrub_nifti,
)

SHAPE = (16, 16, 12)
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
        cases.append(GeneratedCase(np.asarray(image.dataobj), np.asarray(label.dataobj), image.affine, provenance))
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


def test_unedited_masks_are_refused(site: dict[str, Path]) -> None:
    cases = _cases(site["generated"], edits=[{"name": "flip", "changed": False}])

    with pytest.raises(ReleasePolicyError, match="changed by 0 edit"):
        check_policy(cases, ReleasePolicy(min_mask_edits=1))


def test_informed_slice_equal_to_a_real_slice_is_refused_whatever_its_label(
    site: dict[str, Path], micro_cfg: Config, tmp_path: Path
) -> None:
    train = load_volumes(site["train"], micro_cfg.data)
    cases = _cases(site["generated"])
    cases[1] = GeneratedCase(**{**cases[1].__dict__, "informed_slice": train[4].image[5].copy()})

    with pytest.raises(ReleasePolicyError, match="generated case 1: its informed slice matches a real training slice"):
        release_cohort(
            cases,
            tmp_path / "out",
            train=train,
            data_cfg=micro_cfg.data,
            privacy_statement=_dp_statement(_ledger(tmp_path)),
        )

    assert not (tmp_path / "out").exists()


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
        privacy_statement=_dp_statement(ledger),
        generator={"checkpoint_sha256": "ab" * 32},
    )

    report = json.loads((out / "privacy_report.json").read_text())
    assert report["differential_privacy"]["epsilon"] == pytest.approx(ledger.epsilon)
    assert report["differential_privacy"]["accountant"] == "rdp"
    assert report["audit"]["passed"] is True and report["audit"]["copies"] == 0
    assert report["policy"]["min_mask_edits"] == 1
    released = load_volumes(out, micro_cfg.data)
    assert len(released) == 3 and all(v.case_id.startswith("gem3d_syn_") for v in released)
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
                privacy_statement=refused if refused is not None else statement([("slice", None)]),
            )  # fmt: skip

    assert not (tmp_path / "out").exists()
    assert statement([("slice", public_base)])["non_dp_private"] == []  # public pre-training is not refused

    assert not (tmp_path / "out").exists()


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
    code = main([*args, "--steps", "2", "--grid", "16", "--seed", "3"])

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
    assert logged["metrics"]["audit.threshold.image"] == pytest.approx(report["audit"]["thresholds"]["image"])
    assert logged["params"]["release.accountant"] == report["differential_privacy"]["accountant"] == "rdp"
    assert logged["params"]["release.policy.informed_source"] == "generate only"
    assert logged["params"]["privacy.enabled"] == "True"
    client = MlflowClient(tracking_uri=tracking_uri(store))
    artifacts = {a.path for a in client.list_artifacts(logged["run_id"])}
    assert "privacy_report.json" in artifacts and "previews" in artifacts
    previews = {a.path for a in client.list_artifacts(logged["run_id"], "previews")}
    assert previews == {
        f"previews/{path.name.removesuffix('_0000.nii.gz')}.png" for path in (out / "imagesTr").iterdir()
    }
