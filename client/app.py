"""The gem3d ClientApp: one hospital in the federation (Flower Message API).

Thin on purpose: it unpacks messages and calls ``client/task.py``. A site whose data or
instructions are invalid replies with an error message naming the problem; the server logs it
and the round goes on with the other sites.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.task import RoundJob, audit_round, evaluate_round, install_base, locate_site, train_round
from gem3d.errors import Gem3dError

# torch, MONAI and Flower leave ~500k long-lived objects after import; every full garbage
# collection walked them all (0.4 s here, in the middle of a round). Frozen, they are skipped.
gc.freeze()

app = ClientApp()
logger = logging.getLogger("flwr").getChild("gem3d.client")


def _answer(msg: Message, context: Context, work: Callable[[], RecordDict]) -> Message:
    """Reply with ``work()``'s records, or with an error reply for a ``Gem3dError``."""
    try:
        return Message(content=work(), reply_to=msg)
    except Gem3dError as error:
        logger.error("gem3d site on node %s: %s", context.node_id, error)
        return Message(error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(error)), reply_to=msg)


def _process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), None elsewhere: in a deployment every
    message gets a fresh ClientApp process, so this is what the message paid before its handler ran."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, in clock ticks
    except (OSError, ValueError, IndexError):
        return None


def _job(msg: Message) -> tuple[dict[str, Any], RoundJob]:
    record = dict(msg.content["config"])
    # Sites often share a machine (simulation, small hospitals): the server sets the thread budget.
    torch.set_num_threads(max(int(record.get("torch-threads", torch.get_num_threads())), 1))
    return record, RoundJob.from_record(record)


def _arrays(msg: Message) -> dict[str, torch.Tensor]:
    return msg.content["arrays"].to_torch_state_dict()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local steps of the current stage on the global weights; reply with trainable weights + metrics."""

    started = _process_age()  # before any work: the process's start, its imports and Flower's own set-up

    def work() -> RecordDict:
        record, job = _job(msg)
        site = locate_site(dict(context.node_config), record)
        unpacking = time.perf_counter()
        arrays = _arrays(msg)
        unpacked = time.perf_counter()
        weights, metrics = train_round(site, job, arrays)
        packing = time.perf_counter()
        reply = ArrayRecord(weights)
        # Message (de)serialisation on the site, for the overhead accounting of a round.
        metrics["serialise-seconds"] = unpacked - unpacking + time.perf_counter() - packing
        if started is not None:
            metrics["process-start-seconds"] = started
        return RecordDict({"arrays": reply, "metrics": MetricRecord(metrics)})

    return _answer(msg, context, work)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation loss of the global weights on this site's held-out cases."""

    def work() -> RecordDict:
        record, job = _job(msg)
        site = locate_site(dict(context.node_config), record)
        return RecordDict({"metrics": MetricRecord(evaluate_round(site, job, _arrays(msg)))})

    return _answer(msg, context, work)


@app.query("install_base")
def install(msg: Message, context: Context) -> Message:
    """Store the frozen stage-2 base (the global slice model) once, so stage-2 rounds send only slice-axis weights."""

    def work() -> RecordDict:
        record = dict(msg.content["config"])
        site = locate_site(dict(context.node_config), record)
        path = install_base(site, str(record.get("base-id", "")), msg.content["base"].to_torch_state_dict())
        return RecordDict({"result": ConfigRecord({"path": str(path)})})

    return _answer(msg, context, work)


@app.query("audit")
def audit(msg: Message, context: Context) -> Message:
    """Audit a release's candidates against this site's patients; reply with the verdict only (``server/audit.py``)."""

    def work() -> RecordDict:
        record = dict(msg.content["config"])
        torch.set_num_threads(max(int(record.get("torch-threads", torch.get_num_threads())), 1))
        site = locate_site(dict(context.node_config), record)
        arrays = msg.content["candidates"].to_torch_state_dict()
        candidates = [arrays[name] for name in sorted(arrays)]
        return RecordDict({"verdict": ConfigRecord(audit_round(site, record, candidates))})

    return _answer(msg, context, work)
