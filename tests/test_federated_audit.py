"""The federated audit (issue 12, point 6): every site audits a release's candidates against its own patients.

Played as the adversary: a planted copy of one site's patient must be caught by that site,
through a real Flower simulation, and the release must then write nothing; what a site replies
must hold no distance, threshold or case id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from experiments.simulation import simulate_audit_round
from gem3d.config import Config
from gem3d.data.dataset import load_volumes
from gem3d.data.phantoms import write_phantom_dataset
from privacy.audit import AuditSettings
from privacy.errors import ReleaseRefusedError
from privacy.model_privacy import site_entry, stage_record, statement
from privacy.release import GeneratedCase, ReleasePolicy, check_site_verdicts, release_cohort

SHAPE = (16, 16, 12)
# six patients per site: leave-one-out gives six reference distances, enough for the 0.2 quantile
SETTINGS = AuditSettings(quantile=0.2)
ALLOWED_VERDICT_KEYS = {
    "site",
    "passed",
    "synthetic",
    "copies",
    "slice_copies",
    "reference",
    "reference_cases",
    "reason",
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("federated_audit")
    return {
        "root": root / "sites",
        "site_0": write_phantom_dataset(root / "sites" / "site_0", num_cases=6, shape=SHAPE, seed=31),
        "site_1": write_phantom_dataset(root / "sites" / "site_1", num_cases=6, shape=SHAPE, seed=32),
        "donor": write_phantom_dataset(root / "donor", num_cases=3, shape=SHAPE, seed=33),
    }


def _two_site_statement() -> dict[str, Any]:
    """The privacy statement of a model trained at site_0 and site_1 (DP-SGD records, as the server writes them)."""
    entry = {"dp": True, "ledger": None, "epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"}
    return statement([("slice", stage_record(public=False, sites={"site_0": entry, "site_1": entry}))])


def _case(image: np.ndarray, label: np.ndarray, affine: np.ndarray, index: int) -> GeneratedCase:
    provenance = {"informed": {"kind": "generate"}, "mask_edits": [{"name": "rotate", "changed": True}]}
    informed = np.random.default_rng(index).uniform(-1, 1, (16, 16)).astype(np.float32)  # like no real slice
    return GeneratedCase(image, label, affine, provenance, informed)


def _cases_from(folder: Path, flip: bool = False) -> list[GeneratedCase]:
    cases = []
    for path in sorted((folder / "imagesTr").glob("*_0000.nii.gz")):
        image = nib.load(path)
        label = nib.load(folder / "labelsTr" / path.name.replace("_0000", ""))
        data, mask = np.asarray(image.dataobj, dtype=np.float32), np.asarray(label.dataobj)
        if flip:  # a left-right flip: what a person would still call a copy
            data, mask = data[::-1].copy(), mask[::-1].copy()
        cases.append(_case(data, mask, image.affine, len(cases)))
    return cases


def test_a_site_catches_a_copy_of_its_own_patient_and_only_verdicts_leave_it(
    federation: dict[str, Path], micro_cfg: Config
) -> None:
    # prepare: clean candidates (other patients) and one left-right flipped copy of a site_1 patient
    clean = [v.image for v in load_volumes(federation["donor"], micro_cfg.data)]
    copied = load_volumes(federation["site_1"], micro_cfg.data)[2].image[::-1].copy()

    # execute: one real Flower simulation, one SuperNode per site folder
    verdicts = simulate_audit_round([*clean, copied], federation["root"], micro_cfg, SETTINGS)

    # assert: site_1 fails, site_0 (which never saw that patient) passes; replies hold counts only
    by_site = {v["site"]: v for v in verdicts}
    assert sorted(by_site) == ["site_0", "site_1"]
    assert by_site["site_1"]["passed"] is False
    assert by_site["site_1"]["copies"] >= 1
    assert by_site["site_0"]["passed"] is True
    for verdict in verdicts:
        assert set(verdict) <= ALLOWED_VERDICT_KEYS
        assert all(isinstance(value, bool | int | str) for value in verdict.values())


def test_a_release_from_a_federated_model_is_written_only_if_every_site_passes(
    federation: dict[str, Path], micro_cfg: Config, tmp_path: Path
) -> None:
    # prepare: the releasing site is site_0; site_1's patient is planted among its candidates
    train = load_volumes(federation["site_0"], micro_cfg.data)
    planted = _cases_from(federation["donor"]) + _cases_from(federation["site_1"], flip=True)[3:4]

    def site_audit(candidates: list[np.ndarray]) -> list[dict[str, Any]]:
        return simulate_audit_round(candidates, federation["root"], micro_cfg, SETTINGS)

    # execute / assert: the local audit (site_0's patients) cannot see the copy; site_1's audit refuses it
    with pytest.raises(ReleaseRefusedError, match=r"federated audit failed at 1 of 2 sites: site_1"):
        release_cohort(
            planted,
            tmp_path / "refused",
            train=train,
            data_cfg=micro_cfg.data,
            privacy_statement=_two_site_statement(),
            audit_settings=SETTINGS,
            site_audit=site_audit,
        )
    assert list(tmp_path.iterdir()) == []

    # execute: the same release without the planted copy
    out = release_cohort(
        _cases_from(federation["donor"]),
        tmp_path / "released",
        train=train,
        data_cfg=micro_cfg.data,
        privacy_statement=_two_site_statement(),
        audit_settings=SETTINGS,
        site_audit=site_audit,
    )

    # assert: written, with every site's verdict in the report
    import json

    report = json.loads((out / "privacy_report.json").read_text())
    assert report["federated_audit"]["passed"] is True
    assert [v["site"] for v in report["federated_audit"]["sites"]] == ["site_0", "site_1"]


def test_a_federated_model_audited_at_one_site_only_is_refused_before_anything_is_written(
    federation: dict[str, Path], micro_cfg: Config, tmp_path: Path
) -> None:
    train = load_volumes(federation["site_0"], micro_cfg.data)

    with pytest.raises(ReleaseRefusedError, match="trained at 2 sites"):
        release_cohort(
            _cases_from(federation["donor"]),
            tmp_path / "out",
            train=train,
            data_cfg=micro_cfg.data,
            privacy_statement=_two_site_statement(),
            audit_settings=SETTINGS,
        )

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("verdicts", "message"),
    [
        ([{"site": "site_0", "passed": True}], "site_1 \\(no verdict\\)"),
        ([{"site": "site_0", "passed": True}, {"site": "site_1", "passed": False, "copies": 2}], "2 copied volume"),
        ([{"site": "site_0", "passed": True}, {"site": "node_7", "passed": False, "reason": "no reply"}], "no reply"),
        ([], "no site answered|site_0 \\(no verdict\\)"),
    ],
)
def test_every_site_that_trained_the_model_must_pass(verdicts: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ReleaseRefusedError, match=message):
        check_site_verdicts(verdicts, ["site_0", "site_1"], ReleasePolicy())


def test_verdicts_of_every_site_pass_and_a_waiver_is_recorded() -> None:
    passed = [{"site": "site_0", "passed": True}, {"site": "site_1", "passed": True}]

    assert check_site_verdicts(passed, ["site_0", "site_1"], ReleasePolicy())["passed"] is True
    waived = check_site_verdicts(None, ["site_0", "site_1"], ReleasePolicy(audit_every_site=False))
    assert waived == {"run": False, "why": "waived"}


def test_the_statement_names_every_site_that_trained_on_private_data() -> None:
    public = stage_record(public=True, sites={})
    private = stage_record(public=False, sites={"site_0": site_entry(None), "site_1": site_entry(None)})

    assert statement([("slice", public)])["trained_at"] == []
    assert statement([("slice", public), ("volume", private)])["trained_at"] == ["site_0", "site_1"]
