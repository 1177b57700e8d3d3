"""A site's private state folder: its secret key, its privacy policy and its privacy ledger.

One folder per site (hospital), owned by the site, never by a run or by the coordinator:

* ``site.key``: 32 random bytes (mode 0600), made on first use. It keys every fingerprint of the
  site's data that leaves the site (HMAC-SHA256, ``gem3d.data.volume.fingerprint``), so a
  checkpoint's data fingerprint cannot be used to confirm a guess of the patients' voxels.
* ``privacy_policy.toml``: the site's own privacy policy (``privacy.policy``), written by the site.
* ``privacy_ledger.json``: every DP-SGD step ever spent on the site's patients (``privacy.ledger``).

Where it is: ``gem3d train --site-state DIR`` or a SuperNode's node config ``state-dir``; by default
``<data>/.gem3d-site`` beside the site's data, so that every run over the same data, whatever its
``--out`` or ``--init``, finds the same ledger.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from gem3d.config import PrivacyConfig
from gem3d.data.volume import Volume, fingerprint
from gem3d.errors import ConfigError
from privacy.ledger import PrivacyLedger

DEFAULT_FOLDER = ".gem3d-site"
KEY_FILE = "site.key"
POLICY_FILE = "privacy_policy.toml"
LEDGER_FILE = "privacy_ledger.json"
_KEY_BYTES = 32


def default_state_dir(data_dir: Path) -> Path:
    """``<data>/.gem3d-site``: the state folder of the site whose data is in ``data_dir``."""
    return Path(data_dir) / DEFAULT_FOLDER


@dataclass(frozen=True)
class SiteState:
    """The private state folder of one site."""

    folder: Path

    @property
    def ledger_path(self) -> Path:
        return self.folder / LEDGER_FILE

    @property
    def policy_path(self) -> Path:
        return self.folder / POLICY_FILE

    def key(self) -> bytes:
        """The site's secret key, created (atomically, mode 0600) on first use.

        Raises:
            ConfigError: the folder cannot be created or written (e.g. read-only data).
        """
        path = self.folder / KEY_FILE
        if not path.exists():
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                tmp = self.folder / f".{KEY_FILE}.{secrets.token_hex(4)}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(secrets.token_bytes(_KEY_BYTES))
                try:
                    os.link(tmp, path)  # never replaces a key another process made meanwhile
                except FileExistsError:
                    pass
                finally:
                    tmp.unlink()
            except OSError as error:
                raise ConfigError(
                    f"{self.folder}: cannot create the site's private state folder ({error.strerror}); "
                    "pass --site-state DIR (a writable folder the site keeps)"
                ) from None
        key = path.read_bytes()
        if len(key) != _KEY_BYTES:
            raise ConfigError(f"{path}: not a gem3d site key ({len(key)} bytes, expected {_KEY_BYTES})")
        return key

    def fingerprint(self, volumes: list[Volume]) -> str:
        """The keyed fingerprint of ``volumes`` (HMAC-SHA256 under this site's key)."""
        return fingerprint(volumes, self.key())

    @property
    def site_id(self) -> str:
        """A stable name for this site in model privacy records; derived from its key, it says nothing else."""
        return "site-" + hmac.new(self.key(), b"gem3d site id", hashlib.sha256).hexdigest()[:12]

    def ledger(self, privacy_cfg: PrivacyConfig, terms: PrivacyConfig | None = None) -> PrivacyLedger:
        """The site's ledger opened for a run with ``privacy_cfg`` (see ``PrivacyLedger.open``).

        Args:
            terms: the site's policy; a ledger that does not exist yet is created with its budget
                and δ (under the ledger's lock), not with the run's.
        """
        if terms is not None and not self.ledger_path.exists():
            created = PrivacyLedger.open(self.ledger_path, terms)
            with created.lock:
                if not self.ledger_path.exists():
                    created.save()
        return PrivacyLedger.open(self.ledger_path, privacy_cfg)


def fingerprint_matches(stored: str, volumes: list[Volume], state: SiteState) -> bool | None:
    """Whether a checkpoint's ``data_fingerprint`` is that of ``volumes``; ``None`` if it cannot be told.

    A keyed fingerprint can only be checked with the key of the site that made it: ``None``
    when ``state`` holds no key (a key is never created for a check).
    """
    if stored.startswith("hmac-sha256:"):
        if not (state.folder / KEY_FILE).exists():
            return None
        return stored == state.fingerprint(volumes)
    return stored == fingerprint(volumes)
