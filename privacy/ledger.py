"""The per-site privacy ledger: every DP-SGD step a site has ever spent, persisted as JSON.

The ground truth is the Opacus accountant's *history*, a list of ``(noise multiplier, sample
rate, steps)``. It is cumulative over every step, stage, federated round and restart of the
site, because every training call opens the same file, checks before it spends and records
what it spent. ε is always recomputed from the whole history with an Opacus accountant (RDP
by default, PRV on request), so the ε in the file equals what Opacus reports for the recorded
steps; the accountant and δ in use are written next to it. Changing ``privacy.accountant`` or
``privacy.delta`` later is allowed: the history is re-accounted, never reset.

File format (``gem3d-privacy-ledger/1``)::

    {"format": ..., "accountant": "rdp", "delta": 1e-05, "budget_epsilon": 10.0,
     "epsilon": 1.93, "steps": 120,
     "history": [[noise_multiplier, sample_rate, steps], ...],
     "spends": [{"label": "slice", "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 20,
                 "epsilon_after": 0.81}, ...]}

Writes are atomic (temp file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from opacus.accountants import IAccountant, create_accountant

from gem3d.config import PrivacyConfig
from privacy.errors import PrivacyBudgetError, PrivacyLedgerError

__all__ = ["LEDGER_FORMAT", "PrivacyBudgetError", "PrivacyLedger", "PrivacyLedgerError", "epsilon_for_history"]

LEDGER_FORMAT = "gem3d-privacy-ledger/1"
History = list[tuple[float, float, int]]


def epsilon_for_history(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε that Opacus's ``accountant`` gives for a history of ``(noise, sample rate, steps)`` at ``delta``.

    An empty history has spent nothing (ε = 0); PRV cannot account an empty history itself.
    """
    if not history or all(steps == 0 for _, _, steps in history):
        return 0.0
    acc = _accountant(accountant, history)
    return float(acc.get_epsilon(delta=delta))


def _accountant(name: str, history: History) -> IAccountant:
    acc = create_accountant(mechanism=name)
    acc.history = [(float(sigma), float(q), int(steps)) for sigma, q, steps in history if steps > 0]
    return acc


def _append(history: History, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """History with ``steps`` more, merged into the last entry as Opacus's accountants do."""
    out = list(history)
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        sigma, q, previous = out.pop()
        out.append((sigma, q, previous + steps))
    else:
        out.append((noise_multiplier, sample_rate, steps))
    return out


class PrivacyLedger:
    """A site's cumulative DP-SGD spending, bound to one JSON file.

    Use ``PrivacyLedger.open(path, privacy_cfg)``; ``check`` before training, ``record`` after.
    """

    def __init__(self, path: Path, privacy_cfg: PrivacyConfig, history: History, spends: list[dict[str, Any]]):
        self.path = path
        self.cfg = privacy_cfg
        self._history = history
        self._spends = spends
        self._epsilon: float | None = None

    @classmethod
    def open(cls, path: str | Path, privacy_cfg: PrivacyConfig) -> PrivacyLedger:
        """Load the ledger at ``path``, or start an empty one there (written on the first ``record``).

        Raises:
            PrivacyLedgerError: the file exists but is not a readable gem3d ledger.
        """
        path = Path(path)
        if not path.exists():
            return cls(path, privacy_cfg, [], [])
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != LEDGER_FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, expected {LEDGER_FORMAT!r}")
            history = [(float(sigma), float(q), int(steps)) for sigma, q, steps in raw["history"]]
            spends = list(raw.get("spends", []))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise PrivacyLedgerError(f"{path}: not a readable privacy ledger ({error})") from None
        if any(sigma < 0 or not 0 < q <= 1 or steps < 0 for sigma, q, steps in history):
            raise PrivacyLedgerError(f"{path}: history holds an invalid (noise, sample rate, steps) entry")
        return cls(path, privacy_cfg, history, spends)

    @property
    def accountant_name(self) -> str:
        return self.cfg.accountant

    @property
    def delta(self) -> float:
        return self.cfg.delta

    @property
    def budget_epsilon(self) -> float:
        return self.cfg.budget_epsilon

    @property
    def history(self) -> History:
        """A copy of the accountant history ``[(noise multiplier, sample rate, steps), ...]``."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """DP-SGD steps recorded, over all stages, rounds and restarts."""
        return sum(steps for _, _, steps in self._history)

    @property
    def epsilon(self) -> float:
        """ε spent so far at ``delta``, from the configured Opacus accountant."""
        if self._epsilon is None:
            self._epsilon = epsilon_for_history(self._history, self.delta, self.accountant_name)
        return self._epsilon

    def projected_epsilon(self, steps: int, noise_multiplier: float, sample_rate: float) -> float:
        """ε after ``steps`` more steps at ``(noise_multiplier, sample_rate)``; spends nothing."""
        _check_step_args(steps, noise_multiplier, sample_rate)
        if steps == 0:
            return self.epsilon
        if noise_multiplier == 0:
            return math.inf  # no noise: no differential privacy at all
        history = _append(self._history, noise_multiplier, sample_rate, steps)
        return epsilon_for_history(history, self.delta, self.accountant_name)

    def check(self, steps: int, noise_multiplier: float, sample_rate: float) -> float:
        """Refuse, before anything is spent, training that would exceed ``budget_epsilon``.

        Returns:
            the projected ε after these steps.
        Raises:
            PrivacyBudgetError: the projected ε is over the budget.
        """
        projected = self.projected_epsilon(steps, noise_multiplier, sample_rate)
        if projected > self.budget_epsilon:
            affordable = self.affordable_steps(noise_multiplier, sample_rate, limit=steps)
            raise PrivacyBudgetError(
                f"{self.path}: {steps} more DP-SGD steps (noise multiplier {noise_multiplier:.4g}, "
                f"sample rate {sample_rate:.4g}) would raise this site's ε from {self.epsilon:.3f} to "
                f"{projected:.3f} at δ={self.delta:g} ({self.accountant_name}), over the budget "
                f"privacy.budget_epsilon={self.budget_epsilon:g}; at most {affordable} more steps fit"
            )
        return projected

    def affordable_steps(self, noise_multiplier: float, sample_rate: float, limit: int = 1_000_000) -> int:
        """The most steps (up to ``limit``) at these settings that keep ε within the budget."""
        if self.projected_epsilon(1, noise_multiplier, sample_rate) > self.budget_epsilon:
            return 0
        low, high = 1, limit  # ε grows with steps: binary search the last affordable count
        if self.projected_epsilon(high, noise_multiplier, sample_rate) <= self.budget_epsilon:
            return high
        while high - low > 1:
            middle = (low + high) // 2
            if self.projected_epsilon(middle, noise_multiplier, sample_rate) <= self.budget_epsilon:
                low = middle
            else:
                high = middle
        return low

    def record(self, steps: int, noise_multiplier: float, sample_rate: float, label: str = "") -> float:
        """Add ``steps`` spent steps to the history and persist the ledger atomically.

        Recording never refuses: the steps were spent. Call ``check`` before spending.

        Returns:
            ε after these steps.
        """
        _check_step_args(steps, noise_multiplier, sample_rate)
        if steps == 0:
            return self.epsilon
        self._history = _append(self._history, float(noise_multiplier), float(sample_rate), int(steps))
        self._epsilon = None
        epsilon = self.epsilon
        self._spends.append(
            {
                "label": label,
                "noise_multiplier": float(noise_multiplier),
                "sample_rate": float(sample_rate),
                "steps": int(steps),
                "epsilon_after": epsilon,
            }
        )
        self.save()
        return epsilon

    def report(self) -> dict[str, Any]:
        """ε, δ and what they mean, for reports and federated replies.

        The level is *example-level* DP-SGD at this site, the example being one patient's volume
        (see ``privacy.dp_sgd``); client-level DP on the server is a different guarantee with its
        own ε, and reports must say which one they carry.
        """
        return {
            "level": "example-level DP-SGD at one site; the unit is one patient (one volume)",
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant_name,
            "steps": self.steps,
            "budget_epsilon": self.budget_epsilon,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "accountant": self.accountant_name,
            "delta": self.delta,
            "budget_epsilon": self.budget_epsilon,
            "epsilon": self.epsilon,
            "steps": self.steps,
            "history": [list(entry) for entry in self._history],
            "spends": self._spends,
        }

    def save(self) -> Path:
        """Write the ledger atomically to ``self.path``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(self.as_dict(), handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path


def _check_step_args(steps: int, noise_multiplier: float, sample_rate: float) -> None:
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
