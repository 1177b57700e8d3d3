"""ε bookkeeping: what ``PrivacyLedger`` costs, and its ε against Opacus's ``RDPAccountant``.

Seconds per ``PrivacyLedger.epsilon`` (a fresh RDP accounting of the whole history) and per
``ledger.check`` for histories of 1, 10 and 100 entries (10 steps at q = 0.5 each, alternating
noise multipliers so entries do not merge: one entry per federated round), with the ledger's ε
against Opacus's ``RDPAccountant`` stepped once per step. ``opacus_epsilon`` also serves the
step-time worker (``dp_step_cost``), which checks the ledger's ε after the timed DP steps.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from opacus.accountants import RDPAccountant

from experiments.benchmarks import markdown_table
from gem3d.config import PrivacyConfig
from privacy.ledger import PrivacyLedger


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε of Opacus's own accountant over ``(noise multiplier, sample rate, steps)`` entries, stepped once
    per step as Opacus's ``PrivacyEngine`` does."""
    opacus = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            opacus.step(noise_multiplier=sigma, sample_rate=q)
    return opacus.get_epsilon(delta=delta)


def epsilon_costs(repeats: int) -> list[dict[str, Any]]:
    """Seconds per ``ledger.epsilon`` (uncached) and per ``ledger.check`` for histories of 1, 10 and 100 entries."""
    pcfg = PrivacyConfig(enabled=True, budget_epsilon=1e6)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for entries in (1, 10, 100):
            # alternating noise multipliers so entries do not merge: one entry per federated round
            history = [(1.0 + 0.1 * (i % 2), 0.5, 10) for i in range(entries)]
            spends = [
                {"id": str(i), "label": "", "noise_multiplier": s, "sample_rate": q, "steps": n, "status": "spent"}
                for i, (s, q, n) in enumerate(history)
            ]
            ledger = PrivacyLedger(
                Path(tmp) / "l.json", ledger_id="bench", accountant="rdp", delta=pcfg.delta, budget_epsilon=1e6,
                spends=spends,
            )  # fmt: skip
            epsilon_s, check_s = [], []
            for _ in range(repeats if entries <= 10 else 1):  # 100 entries take tens of seconds
                ledger._epsilon = None  # drop the cache: time a fresh accounting, as after every record
                started = time.perf_counter()
                epsilon = ledger.epsilon
                epsilon_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                ledger.check(10, 1.0, 0.5)
                check_s.append(time.perf_counter() - started)
            out.append(
                {
                    "entries": entries,
                    "steps": sum(s for _, _, s in history),
                    "epsilon_ms": 1e3 * statistics.median(epsilon_s),
                    "check_ms": 1e3 * statistics.median(check_s),
                    "ledger_epsilon": epsilon,
                    "opacus_epsilon": opacus_epsilon(history, pcfg.delta),
                }
            )
    return out


def print_epsilon_table(costs: list[dict[str, Any]]) -> None:
    """Print the ε bookkeeping table (rows from ``epsilon_costs``)."""
    print("\n## ε bookkeeping cost (RDP, δ = 1e-5; history entries of 10 steps at q = 0.5)\n")
    headers = ["history entries", "steps", "ledger.epsilon ms", "ledger.check ms", "ε ledger", "ε Opacus RDPAccountant"]
    rows = [
        [
            e["entries"],
            e["steps"],
            f"{e['epsilon_ms']:.2f}",
            f"{e['check_ms']:.2f}",
            f"{e['ledger_epsilon']:.6f}",
            f"{e['opacus_epsilon']:.6f}",
        ]
        for e in costs
    ]
    print(markdown_table(headers, rows))
