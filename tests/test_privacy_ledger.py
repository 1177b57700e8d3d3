"""The per-site privacy ledger: ε from Opacus's accountant, persistence, refusal before spending."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from gem3d.config import PrivacyConfig
from privacy.ledger import PrivacyBudgetError, PrivacyLedger, PrivacyLedgerError

SPENDS = [(1.1, 0.25, 30), (1.1, 0.25, 20), (0.8, 0.5, 10)]


@pytest.mark.parametrize(("accountant", "opacus_class"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_equals_opacus_accountant_for_recorded_steps(
    tmp_path: Path, accountant: str, opacus_class: type
) -> None:
    cfg = PrivacyConfig(enabled=True, accountant=accountant, delta=1e-5, budget_epsilon=1e3)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", cfg)
    reference = opacus_class()

    for sigma, q, steps in SPENDS:
        ledger.record(steps, sigma, q, label="slice")
        for _ in range(steps):  # Opacus's own accounting, one optimizer step at a time
            reference.step(noise_multiplier=sigma, sample_rate=q)

    expected = reference.get_epsilon(delta=1e-5)
    assert ledger.epsilon == pytest.approx(expected, rel=1e-9)
    saved = json.loads((tmp_path / "ledger.json").read_text())
    assert saved["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert saved["accountant"] == accountant and saved["delta"] == 1e-5
    assert saved["history"] == [list(entry) for entry in reference.history]
    assert saved["steps"] == 60


def test_check_refuses_before_spending_and_leaves_no_trace(tmp_path: Path) -> None:
    cfg = PrivacyConfig(enabled=True, budget_epsilon=2.0)
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, cfg)

    with pytest.raises(PrivacyBudgetError, match=r"over the budget privacy.budget_epsilon=2"):
        ledger.check(500, 1.0, 0.5)

    assert ledger.epsilon == 0.0 and ledger.steps == 0
    assert not path.exists()
    affordable = ledger.affordable_steps(1.0, 0.5)
    assert ledger.projected_epsilon(affordable, 1.0, 0.5) <= 2.0 < ledger.projected_epsilon(affordable + 1, 1.0, 0.5)


def test_refusal_survives_a_restart(tmp_path: Path) -> None:
    cfg = PrivacyConfig(enabled=True, budget_epsilon=3.0)
    path = tmp_path / "site" / "ledger.json"
    first = PrivacyLedger.open(path, cfg)
    steps = first.affordable_steps(1.0, 0.5)
    first.check(steps, 1.0, 0.5)
    first.record(steps, 1.0, 0.5, label="slice")

    reopened = PrivacyLedger.open(path, cfg)  # a new process: everything comes from disk

    assert reopened.steps == steps
    assert reopened.epsilon == pytest.approx(first.epsilon, rel=1e-12)
    with pytest.raises(PrivacyBudgetError, match="at most 0 more steps fit"):
        reopened.check(1, 1.0, 0.5)


def test_no_noise_is_never_affordable(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", PrivacyConfig(enabled=True, budget_epsilon=1e6))

    with pytest.raises(PrivacyBudgetError):
        ledger.check(1, 0.0, 0.5)


def test_changing_the_accountant_reaccounts_the_same_history(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    PrivacyLedger.open(path, PrivacyConfig(enabled=True, accountant="rdp")).record(40, 1.0, 0.25)

    prv = PrivacyLedger.open(path, PrivacyConfig(enabled=True, accountant="prv"))

    reference = PRVAccountant()
    reference.history = [(1.0, 0.25, 40)]
    assert prv.steps == 40 and prv.accountant_name == "prv"
    assert prv.epsilon == pytest.approx(reference.get_epsilon(delta=1e-5))


@pytest.mark.parametrize("content", ["{not json", '{"format": "other"}', '{"format": "gem3d-privacy-ledger/1"}'])
def test_unreadable_ledger_is_a_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(content)

    with pytest.raises(PrivacyLedgerError, match=r"ledger.json: not a readable privacy ledger"):
        PrivacyLedger.open(path, PrivacyConfig(enabled=True))
