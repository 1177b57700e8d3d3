"""The per-site privacy ledger: every DP-SGD step a site has ever spent, persisted as JSON.

The ground truth is the Opacus accountant's *history*, a list of ``(noise multiplier, sample
rate, steps)``. It is cumulative over every step, stage, federated round, run and restart of
the site: the ledger belongs to the site's private state folder (``privacy.site_state``), not
to a run folder, so ``--init``, a new ``--out`` or a new federated run over the same site
continues it. ε is always recomputed from the whole history with an Opacus accountant (RDP by
default, PRV on request), so the ε in the file equals what Opacus reports for the recorded steps.

What binds:

* **Terms fixed at creation.** The budget and δ are written when the ledger is created and
  never re-read from a config: a later run that asks for a larger budget or a larger δ is
  refused (``PrivacyBudgetError``); one that asks for less is held to its own, stricter numbers
  for that run. The accountant may change: both are valid bounds, and the history is
  re-accounted, never reset.
* **Read-check-record is atomic.** ``reserve`` takes a file lock (``filelock``, on a hidden
  ``.privacy_ledger.json.lock`` beside it), re-reads the file, checks the projected ε and
  records the steps as *reserved* before a single one is taken; when training ends the
  reservation is settled to the steps actually taken. Two concurrent trainings over one ledger
  therefore account every step, and a process killed mid-training leaves its whole reservation
  counted (over-counting is safe; losing steps is not).

File format (``gem3d-privacy-ledger/2``)::

    {"format": ..., "id": "3f9c...", "accountant": "rdp", "delta": 1e-05, "budget_epsilon": 10.0,
     "epsilon": 1.93, "steps": 120,
     "history": [[noise_multiplier, sample_rate, steps], ...],
     "spends": [{"id": "a1b2...", "label": "slice", "noise_multiplier": 1.0, "sample_rate": 0.5,
                 "steps": 20, "status": "spent", "epsilon_after": 0.81}, ...]}

``id`` is random (it names the ledger in model privacy records without saying anything about
the data). Writes are atomic (``gem3d.files.write_json``: a temporary file beside it, then
``os.replace``). Files of format ``gem3d-privacy-ledger/1`` are read and upgraded on the next write.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from opacus.accountants import IAccountant, create_accountant

from gem3d.config import PrivacyConfig
from gem3d.files import write_json
from privacy.errors import PrivacyBudgetError, PrivacyLedgerError

__all__ = [
    "LEDGER_FORMAT",
    "PrivacyBudgetError",
    "PrivacyLedger",
    "PrivacyLedgerError",
    "Reservation",
    "epsilon_for_history",
]

LEDGER_FORMAT = "gem3d-privacy-ledger/2"
_READABLE_FORMATS = ("gem3d-privacy-ledger/1", LEDGER_FORMAT)
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


def _history_of(spends: list[dict[str, Any]]) -> History:
    history: History = []
    for spend in spends:
        if int(spend["steps"]) > 0:
            history = _append(
                history, float(spend["noise_multiplier"]), float(spend["sample_rate"]), int(spend["steps"])
            )
    return history


@dataclass
class Reservation:
    """Steps reserved in a ledger by ``PrivacyLedger.reserve``; set ``taken`` as steps are spent."""

    id: str
    steps: int
    taken: int = 0


class PrivacyLedger:
    """A site's cumulative DP-SGD spending, bound to one JSON file.

    Use ``PrivacyLedger.open(path, privacy_cfg)`` to spend (``reserve``, or ``check`` then
    ``record``) and ``PrivacyLedger.read(path)`` to report.
    """

    def __init__(
        self,
        path: Path,
        *,
        ledger_id: str,
        accountant: str,
        delta: float,
        budget_epsilon: float,
        spends: list[dict[str, Any]],
        limit_epsilon: float | None = None,
        limit_delta: float | None = None,
    ):
        self.path = path
        self.id = ledger_id
        self.accountant_name = accountant
        self.delta = delta
        self.budget_epsilon = budget_epsilon
        # A run may hold itself to stricter numbers than the ledger's terms (never looser).
        self.limit_epsilon = budget_epsilon if limit_epsilon is None else limit_epsilon
        self.limit_delta = delta if limit_delta is None else limit_delta
        self._spends = spends
        self._history = _history_of(spends)
        self._epsilon: float | None = None

    @property
    def lock(self) -> FileLock:
        """The inter-process lock of this ledger (a hidden ``.<ledger>.lock`` beside it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path.parent / f".{self.path.name}.lock"))

    @classmethod
    def read(cls, path: str | Path) -> PrivacyLedger:
        """The ledger at ``path`` as written, for reporting.

        Raises:
            PrivacyLedgerError: there is no file, or it is not a readable gem3d ledger.
        """
        path = Path(path)
        if not path.exists():
            raise PrivacyLedgerError(f"{path}: no privacy ledger here")
        raw = _load(path)
        return cls(
            path,
            ledger_id=str(raw.get("id") or "legacy"),
            accountant=str(raw["accountant"]),
            delta=float(raw["delta"]),
            budget_epsilon=float(raw["budget_epsilon"]),
            spends=raw["spends"],
        )

    @classmethod
    def open(cls, path: str | Path, privacy_cfg: PrivacyConfig) -> PrivacyLedger:
        """The ledger at ``path`` for a run with ``privacy_cfg``, or a new one there (written on the first spend).

        A new ledger takes its budget, δ and accountant from ``privacy_cfg``. An existing one keeps
        its own budget and δ; ``privacy_cfg`` may only be stricter (its numbers then limit this run).

        Raises:
            PrivacyLedgerError: the file exists but is not a readable gem3d ledger.
            PrivacyBudgetError: ``privacy_cfg`` asks for a larger budget or δ than the ledger was created with.
        """
        path = Path(path)
        if not path.exists():
            return cls(
                path,
                ledger_id=secrets.token_hex(8),
                accountant=privacy_cfg.accountant,
                delta=privacy_cfg.delta,
                budget_epsilon=privacy_cfg.budget_epsilon,
                spends=[],
            )
        existing = cls.read(path)
        if privacy_cfg.budget_epsilon > existing.budget_epsilon:
            raise PrivacyBudgetError(
                f"{path}: privacy.budget_epsilon={privacy_cfg.budget_epsilon:g} asks for more than this site's "
                f"budget, fixed at {existing.budget_epsilon:g} when its ledger was created; refused"
            )
        if privacy_cfg.delta > existing.delta:
            raise PrivacyBudgetError(
                f"{path}: privacy.delta={privacy_cfg.delta:g} is larger than this site's δ, fixed at "
                f"{existing.delta:g} when its ledger was created; refused"
            )
        return cls(
            path,
            ledger_id=existing.id,
            accountant=privacy_cfg.accountant,
            delta=existing.delta,
            budget_epsilon=existing.budget_epsilon,
            spends=existing._spends,
            limit_epsilon=privacy_cfg.budget_epsilon,
            limit_delta=privacy_cfg.delta,
        )

    def reload(self) -> None:
        """Re-read the spends from disk (another process may have spent since)."""
        if self.path.exists():
            self._spends = _load(self.path)["spends"]
            self._history = _history_of(self._spends)
            self._epsilon = None

    @property
    def history(self) -> History:
        """A copy of the accountant history ``[(noise multiplier, sample rate, steps), ...]``."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """DP-SGD steps recorded (reserved ones included), over all stages, rounds, runs and restarts."""
        return sum(steps for _, _, steps in self._history)

    @property
    def epsilon(self) -> float:
        """ε spent so far at the ledger's ``delta``, from the configured Opacus accountant."""
        if self._epsilon is None:
            self._epsilon = epsilon_for_history(self._history, self.delta, self.accountant_name)
        return self._epsilon

    def projected_epsilon(self, steps: int, noise_multiplier: float, sample_rate: float) -> float:
        """ε at this run's δ after ``steps`` more steps at ``(noise_multiplier, sample_rate)``; spends nothing."""
        _check_step_args(steps, noise_multiplier, sample_rate)
        if steps > 0 and noise_multiplier == 0:
            return math.inf  # no noise: no differential privacy at all
        history = _append(self._history, noise_multiplier, sample_rate, steps) if steps else self._history
        return epsilon_for_history(history, self.limit_delta, self.accountant_name)

    def check(self, steps: int, noise_multiplier: float, sample_rate: float) -> float:
        """Refuse, before anything is spent, training that would exceed this run's budget.

        Returns:
            the projected ε after these steps.
        Raises:
            PrivacyBudgetError: the projected ε is over the budget.
        """
        projected = self.projected_epsilon(steps, noise_multiplier, sample_rate)
        if projected > self.limit_epsilon:
            affordable = self.affordable_steps(noise_multiplier, sample_rate, limit=steps)
            raise PrivacyBudgetError(
                f"{self.path}: {steps} more DP-SGD steps (noise multiplier {noise_multiplier:.4g}, "
                f"sample rate {sample_rate:.4g}) would raise this site's ε from {self.epsilon:.3f} to "
                f"{projected:.3f} at δ={self.limit_delta:g} ({self.accountant_name}), over the budget "
                f"privacy.budget_epsilon={self.limit_epsilon:g}; at most {affordable} more steps fit"
            )
        return projected

    def affordable_steps(self, noise_multiplier: float, sample_rate: float, limit: int = 1_000_000) -> int:
        """The most steps (up to ``limit``) at these settings that keep ε within this run's budget."""
        if self.projected_epsilon(1, noise_multiplier, sample_rate) > self.limit_epsilon:
            return 0
        low, high = 1, limit  # ε grows with steps: binary search the last affordable count
        if self.projected_epsilon(high, noise_multiplier, sample_rate) <= self.limit_epsilon:
            return high
        while high - low > 1:
            middle = (low + high) // 2
            if self.projected_epsilon(middle, noise_multiplier, sample_rate) <= self.limit_epsilon:
                low = middle
            else:
                high = middle
        return low

    @contextlib.contextmanager
    def reserve(
        self, steps: int, noise_multiplier: float, sample_rate: float, label: str = ""
    ) -> Iterator[Reservation]:
        """Check and reserve ``steps`` under the file lock; on exit, settle to ``reservation.taken``.

        Raises:
            PrivacyBudgetError: the steps would exceed the budget (nothing is reserved).
        """
        _check_step_args(steps, noise_multiplier, sample_rate)
        reservation = Reservation(id=secrets.token_hex(8), steps=steps)
        with self.lock:
            self.reload()
            self.check(steps, noise_multiplier, sample_rate)
            self._add_spend(reservation.id, label, noise_multiplier, sample_rate, steps, "reserved")
            self.save()
        try:
            yield reservation
        finally:
            with self.lock:
                self.reload()
                settled = [spend for spend in self._spends if spend["id"] == reservation.id]
                for spend in settled:
                    spend["steps"] = min(int(reservation.taken), steps)
                    spend["status"] = "spent"
                self._spends = [s for s in self._spends if int(s["steps"]) > 0]
                self._refresh()
                for spend in settled:
                    spend["epsilon_after"] = self.epsilon
                self.save()

    def record(self, steps: int, noise_multiplier: float, sample_rate: float, label: str = "") -> float:
        """Add ``steps`` spent steps to the history and persist the ledger atomically (under the lock).

        Recording never refuses: the steps were spent. Check (or ``reserve``) before spending.

        Returns:
            ε after these steps.
        """
        _check_step_args(steps, noise_multiplier, sample_rate)
        if steps == 0:
            return self.epsilon
        with self.lock:
            self.reload()
            self._add_spend(secrets.token_hex(8), label, noise_multiplier, sample_rate, steps, "spent")
            self.save()
        return self.epsilon

    def _add_spend(self, spend_id: str, label: str, sigma: float, rate: float, steps: int, status: str) -> None:
        self._spends.append(
            {
                "id": spend_id,
                "label": label,
                "noise_multiplier": float(sigma),
                "sample_rate": float(rate),
                "steps": int(steps),
                "status": status,
            }
        )
        self._refresh()

    def _refresh(self) -> None:
        self._history = _history_of(self._spends)
        self._epsilon = None
        if self._spends:
            self._spends[-1].setdefault("epsilon_after", self.epsilon)

    def report(self) -> dict[str, Any]:
        """ε, δ and what they mean, for reports and federated replies.

        The level is *example-level* DP-SGD at this site, the example being one patient's volume
        (see ``privacy.dp_sgd``); client-level DP on the server is a different guarantee with its
        own ε, and reports must say which one they carry.
        """
        return {
            "level": "example-level DP-SGD at one site; the unit is one patient (one volume)",
            "ledger": self.id,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant_name,
            "steps": self.steps,
            "budget_epsilon": self.budget_epsilon,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "id": self.id,
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
        # durable: a crash after a step must not forget the budget that step spent
        return write_json(self.path, self.as_dict(), durable=True)


def _load(path: Path) -> dict[str, Any]:
    """The raw ledger file, validated; format 1 files are given spends (with ids) from their history."""
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or raw.get("format") not in _READABLE_FORMATS:
            found = raw.get("format") if isinstance(raw, dict) else None
            raise ValueError(f"format is {found!r}, expected {LEDGER_FORMAT!r}")
        if raw["format"] != LEDGER_FORMAT:  # format 1: the history is the truth, spends were informational
            raw["spends"] = [
                {"id": f"v1-{i}", "label": "", "noise_multiplier": s, "sample_rate": q, "steps": n, "status": "spent"}
                for i, (s, q, n) in enumerate(raw["history"])
            ]
        spends = [dict(s) for s in raw["spends"]]
        for spend in spends:
            sigma, q, steps = float(spend["noise_multiplier"]), float(spend["sample_rate"]), int(spend["steps"])
            str(spend["id"])
            if sigma < 0 or not 0 < q <= 1 or steps < 0:
                raise ValueError("a spend holds an invalid (noise, sample rate, steps) entry")
        raw["spends"] = spends
        float(raw["delta"]), float(raw["budget_epsilon"]), str(raw["accountant"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PrivacyLedgerError(f"{path}: not a readable privacy ledger ({error})") from None
    return raw


def _check_step_args(steps: int, noise_multiplier: float, sample_rate: float) -> None:
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
