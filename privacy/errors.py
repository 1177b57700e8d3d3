"""Errors of the privacy layer. Each is a ``Gem3dError``: the CLI prints it as one line."""

from __future__ import annotations

from gem3d.errors import Gem3dError


class PrivacyBudgetError(Gem3dError):
    """Training (or a release) would push a site past its configured privacy budget."""


class PrivacyLedgerError(Gem3dError):
    """A privacy ledger file is unreadable or not a gem3d ledger."""


class ReleasePolicyError(Gem3dError):
    """Generated cases violate the release policy (copied informed slices, unedited masks, ...)."""


class ReleaseRefusedError(Gem3dError):
    """The release gate refused: the audit found copies, or the ledger is missing or over budget."""


class PolicyRefusedError(Gem3dError):
    """A site refuses a request that asks for less privacy than its own policy allows."""
