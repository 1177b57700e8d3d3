"""One site on several GPUs: the processes ``torchrun`` starts, their process group and the few collectives gem3d uses.

A site with N GPUs runs N copies of the same command (``torchrun --nproc-per-node N -m experiments.cli
train ...``); torchrun tells each its place in ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. Every
process reads the same config and data and takes the same steps on its own device
(``cuda:LOCAL_RANK``); what differs between them is only which rows of a step's batch each one
computes (``gem3d.training``, ``privacy.dp_sgd``). Rank 0, the *leader*, is the only one that
writes: the run folder and its lock, checkpoints, the privacy ledger, MLflow, progress and logs.

Failures end every process. Each phase in which one process alone can fail (validating inputs,
taking the run folder's lock, reserving privacy budget, writing a checkpoint) runs under
``agreed``: every rank reports whether it failed, and if any did, all raise the first failure's
message, so none is left waiting in a collective. Every collective also has the process group's
``TIMEOUT``, the last resort for a process that died without a word (torchrun also stops the
others when one exits non-zero).

The single-process path is untouched: with no process group (``world().size == 1``) none of this runs.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gem3d.errors import ConfigError, Gem3dError

# A phase (a checkpoint written by the leader, the first compiled step) may keep the others waiting;
# 30 minutes is torch's default for gloo, long enough for both, and still ends a run whose peer vanished.
TIMEOUT = timedelta(minutes=30)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes training one site.

    Attributes:
        rank: 0 .. size - 1; rank 0 is the leader, the only one that writes.
        local_rank: its GPU on this machine (``cuda:local_rank``).
        size: the number of processes (1: an ordinary single-process run).
    """

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0


def launched() -> World:
    """The world ``torchrun`` (or any launcher setting ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) started
    this process in; ``World()`` when it was not."""
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
    try:
        size, rank, local = (int(os.environ.get(name, "1" if name == "WORLD_SIZE" else "0")) for name in names)
    except ValueError:
        raise ConfigError(f"{', '.join(names)}: not integers ({[os.environ.get(n) for n in names]})") from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ConfigError(f"torchrun environment: RANK={rank}, LOCAL_RANK={local}, WORLD_SIZE={size} is not a world")
    return World(rank=rank, local_rank=local, size=size)


def world() -> World:
    """The world of the initialised process group, or ``World()`` (one process) when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    size = dist.get_world_size()
    rank = dist.get_rank()
    return World(rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", rank)), size=size)


def backend() -> str:
    """gloo for CPU tensors and, where there is CUDA, NCCL for CUDA tensors in the same group
    (object collectives, ``agreed``, then run over gloo on the CPU)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextmanager
def session() -> Iterator[World]:
    """Join the process group of a torchrun launch for the duration of the block; yields this process's world.

    Does nothing for a process not launched with several processes, or one already in a group
    (a caller further out owns it). On CUDA each process takes its GPU, ``cuda:LOCAL_RANK``.
    """
    started = launched()
    if started.size == 1 or dist.is_initialized():
        yield world()
        return
    if torch.cuda.is_available():
        if started.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun: LOCAL_RANK={started.local_rank} but this machine has {torch.cuda.device_count()} GPUs; "
                "start at most one process per GPU (--nproc-per-node)"
            )
        torch.cuda.set_device(started.local_rank)
    dist.init_process_group(backend(), timeout=TIMEOUT, rank=started.rank, world_size=started.size)
    try:
        yield world()
    except Gem3dError:
        _leave_together()  # an agreed failure (``agreed``): every rank is here
        raise
    else:
        _leave_together()
    finally:
        dist.destroy_process_group()


def _leave_together() -> None:
    """Wait for every rank before the group is torn down: rank 0 hosts its store, and a rank that
    exits while another still talks to it can abort the process (seen: SIGABRT in gloo's teardown).
    On gloo, a rank that never comes is reported after two minutes rather than the group's timeout."""
    if "nccl" not in str(dist.get_backend()):
        dist.monitored_barrier(timeout=timedelta(minutes=2))
    else:
        dist.barrier()


def rank_device(device: torch.device, current: World | None = None) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` for a CUDA ``device``, else ``device``.

    Raises:
        ConfigError: a CUDA device with an explicit index under several processes (each takes its own).
    """
    current = current or world()
    if current.size == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(
            f"train.device: '{device}' names one GPU, but {current.size} processes train this site; "
            "use train.device = 'cuda' (each process takes cuda:LOCAL_RANK)"
        )
    return torch.device("cuda", current.local_rank)


def check_batch(batch_size: int, current: World | None = None) -> None:
    """Refuse a global batch that does not split evenly over the processes.

    Raises:
        ConfigError: naming ``train.batch_size`` and the number of processes.
    """
    current = current or world()
    if batch_size % current.size:
        raise ConfigError(
            f"train.batch_size = {batch_size}: must be divisible by the {current.size} processes training this "
            f"site (the global batch is split evenly; e.g. {current.size * max(1, round(batch_size / current.size))})"
        )


def shard(rows: int, current: World | None = None) -> slice:
    """This rank's contiguous block of ``rows`` rows (``rows`` divisible by the world size, ``check_batch``)."""
    current = current or world()
    per = rows // current.size
    return slice(current.rank * per, (current.rank + 1) * per)


def split(items: list[T], current: World | None = None) -> list[T]:
    """This rank's share of ``items``: every ``size``-th one from its rank on, so shares differ by at most one."""
    current = current or world()
    return items[current.rank :: current.size]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (every rank gets the same sum); returns it."""
    if world().size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
    """Rank ``source``'s ``tensor`` on every rank, in place; returns it."""
    if world().size > 1:
        dist.broadcast(tensor, src=source)
    return tensor


class PeerError(Gem3dError):
    """Another process of this site failed; its message is this one's."""


def agreed(work: Callable[[], T]) -> T:
    """Run ``work`` on every rank; if it fails on any, raise on all of them.

    A ``Gem3dError`` or ``OSError`` (a user's problem: a bad option, a locked or full folder, a
    spent budget) on one rank is re-raised where it happened and raised as ``PeerError`` with
    the same message on the others; anything else is re-raised where it happened and reported
    to the others as a ``PeerError`` naming its type. One collective per call: for phases, not steps.
    """
    current = world()
    if current.size == 1:
        return work()
    result: T | None = None
    failure: BaseException | None = None
    try:
        result = work()
    except Exception as error:  # a bug too: still tell the others, then let it surface here
        failure = error
    reports: list[str | None] = [None] * current.size
    message = None
    if failure is not None:
        message = str(failure) if isinstance(failure, Gem3dError | OSError) else f"{type(failure).__name__}: {failure}"
        if isinstance(failure, OSError) and failure.filename:
            message = f"{failure.filename}: {failure.strerror or failure}"
    dist.all_gather_object(reports, message)
    if failure is not None:
        raise failure
    failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if failed:
        rank, report = failed[0]
        raise PeerError(report if rank == 0 else f"process {rank} of {current.size}: {report}")
    return result  # type: ignore[return-value]


def barrier() -> None:
    """Wait for every rank (within the process group's ``TIMEOUT``)."""
    if world().size > 1:
        dist.barrier()


def run_local(processes: int, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` on ``processes`` local processes in one process group, as torchrun would start
    them; returns rank 0's result. For a caller that is itself one process (a Flower ClientApp).

    Each process is started afresh (``spawn``: ``work`` and ``args`` must pickle) and takes the same
    intra-op thread count as this one. A ``Gem3dError`` on any rank is raised here with rank 0's
    message (``agreed``); anything else raises ``torch.multiprocessing``'s error with its traceback.
    """
    with tempfile.TemporaryDirectory(prefix="gem3d-ranks.") as folder:
        with socket.socket() as probe:  # a free port for the group's rendezvous on this machine
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        threads = torch.get_num_threads()
        mp.spawn(_local_rank, args=(processes, port, threads, work, args, folder), nprocs=processes, join=True)
        outcome = torch.load(Path(folder) / "rank0.pt", weights_only=False)
    if "error" in outcome:
        raise Gem3dError(outcome["error"])
    return outcome["result"]  # type: ignore[no-any-return]


def _local_rank(
    rank: int, processes: int, port: int, threads: int, work: Callable[..., Any], args: tuple[Any, ...], folder: str
) -> None:
    """One process of ``run_local``: torchrun's environment, the group, ``work``; rank 0 saves the outcome."""
    torch.set_num_threads(threads)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(processes),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
        }
    )
    outcome: dict[str, Any]
    try:
        with session():
            outcome = {"result": work(*args)}
    except Gem3dError as error:  # rank 0 carries every rank's failure (agreed): the others stay quiet
        outcome = {"error": str(error)}
    if rank == 0:
        torch.save(outcome, Path(folder) / "rank0.pt")
