"""The privacy of a whole model: what each stage was trained on, under which ledger, from which weights.

Every stage checkpoint carries a ``privacy`` record in its metadata (``gem3d train`` and the
federated server write it)::

    {"format": "gem3d-model-privacy/1",
     "data": "private" | "public",            # what this stage's own training saw
     "sites": {"<site>": {"dp": true, "ledger": "3f9c...", "epsilon": 2.1, "delta": 1e-05}},
     "client_level": {"epsilon": 4.2, "delta": 1e-05, ...} | null,   # server-side DP, apart
     "init": {"sha256": "...", "privacy": {<the record of the weights it started from>} | null}}

A site's ε is its ledger's *cumulative* ε when the stage finished: the ledger composes every
stage, round and run over that site's patients, so the latest figure per site already is the
composition over stages. Sites hold different patients, so the model's patient-level ε is the
maximum over sites (parallel composition); this assumes no patient is in two sites' data, and
no site trained under two ledgers. Weights a stage started from (``--init``, the stage-1 base
of stage 2) bring their own record, composed in the same way. A checkpoint without a record
(made before gem3d kept one), or weights of unknown origin, count as trained on private data
without DP. Public pre-training is recorded as public (``gem3d train --public-data``): it is
the user's declaration, and the statement says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gem3d.checkpoint import file_sha256, read_metadata
from gem3d.errors import CheckpointError
from gem3d.runs import STAGE_FILES
from gem3d.training import STAGES
from privacy.ledger import PrivacyLedger

RECORD_FORMAT = "gem3d-model-privacy/1"


def site_entry(ledger: PrivacyLedger | None) -> dict[str, Any]:
    """One site's part of a record: DP-SGD under ``ledger`` (its ε now), or no DP (``None``)."""
    if ledger is None:
        return {"dp": False, "ledger": None, "epsilon": None, "delta": None, "accountant": None}
    return {
        "dp": True,
        "ledger": ledger.id,
        "epsilon": ledger.epsilon,
        "delta": ledger.delta,
        "accountant": ledger.accountant_name,
    }


def init_entry(path: Path | None) -> dict[str, Any] | None:
    """What a stage started from: the file's hash and its own privacy record (None: a fresh init).

    A file that is not a gem3d checkpoint (a pretrained autoencoder's state dict) has no record:
    ``statement`` counts it as weights of unknown origin.
    """
    if path is None:
        return None
    try:
        privacy = read_metadata(path).get("privacy")
    except CheckpointError:
        privacy = None
    return {"sha256": file_sha256(path), "privacy": privacy}


def stage_record(
    *,
    public: bool,
    sites: dict[str, dict[str, Any]],
    init: Path | None = None,
    client_level: dict[str, Any] | None = None,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The privacy record of a stage checkpoint.

    Args:
        public: the stage trained on data its user declared public.
        sites: ``{site: site_entry(...)}`` for the sites whose data it trained on.
        init: the checkpoint whose weights the stage started from, if any.
        previous: the record of the checkpoint this training resumed (its history is kept).
    """
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "data": "public" if public else "private",
        "sites": {} if public else dict(sites),
        "client_level": client_level,
        "init": init_entry(init),
    }
    if previous is not None:
        record = _merge(previous, record)
    return record


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """One record for a stage trained in several parts (a resume, another federated round).

    An ``old`` without a record format (a checkpoint from before gem3d kept one) brings a site
    of unknown privacy, which counts as private data without DP.
    """
    if old.get("format") != RECORD_FORMAT:
        old = {"data": "private", "sites": {"unrecorded": site_entry(None)}, "init": None}
    sites = dict(old.get("sites") or {})
    for name, entry in new["sites"].items():
        before = sites.get(name)
        if before is None:
            sites[name] = entry
        else:
            sites[name] = {
                "dp": bool(before.get("dp")) and bool(entry.get("dp")),
                "ledger": entry.get("ledger") or before.get("ledger"),
                "epsilon": _max(before.get("epsilon"), entry.get("epsilon")),
                "delta": _max(before.get("delta"), entry.get("delta")),
                "accountant": entry.get("accountant") or before.get("accountant"),
            }
    private = "private" in (old.get("data"), new["data"])
    return {
        "format": RECORD_FORMAT,
        "data": "private" if private else "public",
        "sites": sites,
        "client_level": new.get("client_level") or old.get("client_level"),
        "init": old.get("init") if old.get("init") is not None else new.get("init"),
    }


def _max(a: float | None, b: float | None) -> float | None:
    values = [v for v in (a, b) if v is not None]
    return max(values) if values else None


def model_statement(run: str | Path) -> dict[str, Any]:
    """The privacy statement of a model (a run folder or one checkpoint file): ``statement`` of its stages."""
    run = Path(run)
    paths = [run / STAGE_FILES[s] for s in STAGES if (run / STAGE_FILES[s]).exists()] if run.is_dir() else [run]
    records = []
    for path in paths:
        metadata = read_metadata(path)
        records.append((str(metadata.get("stage", path.stem)), metadata.get("privacy")))
    return statement(records)


def statement(records: list[tuple[str, dict[str, Any] | None]]) -> dict[str, Any]:
    """Compose the records of a model's stages (``[(stage, record or None), ...]``) into one statement.

    Returns:
        ``{"patient_level": {"epsilon", "delta", "sites": {site: {"epsilon", "delta"}}},
        "client_level": {...} | None, "non_dp_private": [what trained on private data without
        DP], "public": [stages trained on declared-public data], "trained_at": [every site whose
        private data trained a stage, with or without DP], "stages": [...]}``. The patient-level
        ε is ``None`` where no DP-SGD ran at all.
    """
    sites: dict[str, dict[str, Any]] = {}
    trained_at: set[str] = set()
    non_dp: list[str] = []
    public: list[str] = []
    client_levels: list[dict[str, Any]] = []
    for name, record in records:
        _collect(record, name, sites, non_dp, public, client_levels, trained_at)
    patient_eps = [e["epsilon"] for e in sites.values() if e["epsilon"] is not None]
    patient_delta = [e["delta"] for e in sites.values() if e["delta"] is not None]
    client = max(client_levels, key=lambda c: float(c.get("epsilon") or 0.0)) if client_levels else None
    return {
        "patient_level": {
            "level": "patient (one volume), DP-SGD at each site; maximum over sites",
            "epsilon": max(patient_eps) if patient_eps else None,
            "delta": max(patient_delta) if patient_delta else None,
            "sites": sites,
        },
        "client_level": client,
        "non_dp_private": sorted(set(non_dp)),
        "public": sorted(set(public)),
        "trained_at": sorted(trained_at),
        "stages": [name for name, _ in records],
    }


def _collect(
    record: dict[str, Any] | None,
    where: str,
    sites: dict[str, dict[str, Any]],
    non_dp: list[str],
    public: list[str],
    client_levels: list[dict[str, Any]],
    trained_at: set[str],
) -> None:
    """Fold one record (and, recursively, the records of the weights it started from) into the statement."""
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        non_dp.append(f"{where}: no privacy record (weights of unknown origin count as private, without DP)")
        return
    if record.get("data") == "public":
        public.append(where)
    for name, entry in (record.get("sites") or {}).items():
        if record.get("data") != "public":
            trained_at.add(name)
        if not entry.get("dp"):
            non_dp.append(f"{where}: trained on {name}'s data without DP-SGD")
            continue
        current = sites.setdefault(name, {"epsilon": None, "delta": None, "accountant": entry.get("accountant")})
        current["epsilon"] = _max(current["epsilon"], entry.get("epsilon"))
        current["delta"] = _max(current["delta"], entry.get("delta"))
    if record.get("data") == "private" and not record.get("sites"):
        non_dp.append(f"{where}: trained on private data of no recorded site")
    if record.get("client_level"):
        client_levels.append(dict(record["client_level"]))
    init = record.get("init")
    if init is not None:
        _collect(
            init.get("privacy"),
            f"{where} <- init {str(init.get('sha256', ''))[:12]}",
            sites,
            non_dp,
            public,
            client_levels,
            trained_at,
        )
