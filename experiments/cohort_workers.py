"""Cohort generation sharded over worker processes or machines, on Ray.

``gem3d enhance``, ``deenhance`` and ``release`` sample their volumes in chunks of
``sampler.batch_volumes`` (``gem3d.synthesis.iter_jobs``). With ``--workers N`` the chunks go to N
Ray actors on this machine; with ``--ray-address ADDR`` to actors on a running Ray cluster
(``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the others; every
machine needs this project installed in the same Python environment). Each actor receives the
run's checkpoint files (bytes: no shared disk is needed), loads the models once, and samples
whole chunks: exactly the chunks, batch-mates included, that one process would sample, and each
volume's noise comes from its own seed. Every actor runs torch with the same number of threads
(``WorkerSettings.threads``, default 1): a CPU convolution's rounding depends on how many threads
share it, so equal threads per actor is what makes any number of workers write the same bytes.
(The plain in-process run uses torch's default threads, every core: its last bits can differ
from the workers' unless it also runs with that many threads.) They come
back in order to this process, which writes them as they arrive; at most two chunks per actor are
in flight, so this process holds a bounded number of volumes whatever the cohort's size.

Privacy: the volumes travel through Ray's object store before the release gate has audited
them. A local Ray (``--workers``) keeps them in this machine's shared memory, with spilling to
disk turned off (at most two chunks per actor are in flight, so the store does not fill). On a
cluster (``--ray-address``) they pass through the cluster's machines and whatever spilling the
cluster was started with: use only machines inside the site for ``gem3d release``, and start them
with spilling off (``ray start ... --system-config='{"automatic_object_spilling_enabled": false}'``).

Ray comes with Flower's simulation extra; it is imported only when workers are asked for.
"""

from __future__ import annotations

import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gem3d.errors import ConfigError
from gem3d.runs import STAGE_FILES
from gem3d.sampler import SampleRequest, sample_volumes
from gem3d.synthesis import Synthesiser, load_synthesiser

IN_FLIGHT_PER_WORKER = 2


@dataclass(frozen=True)
class WorkerSettings:
    """Where and how the actors run.

    Attributes:
        workers: actors to start (each samples whole chunks).
        address: a Ray cluster's address (``ray start --head`` prints it); None starts a local Ray
            with ``workers`` CPUs.
        threads: torch intra-op threads per actor, the same for every actor (their rounding depends on it).
        gpus: GPUs per actor (0: CPU actors; 1 puts each actor on its own GPU of the cluster).
    """

    workers: int
    address: str | None = None
    threads: int = 1
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers}: expected at least 1")
        if self.threads < 1:
            raise ConfigError(f"--threads-per-worker {self.threads}: expected at least 1")


def run_files(checkpoint: Path) -> dict[str, bytes]:
    """The checkpoint files an actor needs, by name: a run folder's volume and informed stages, or one file."""
    if checkpoint.is_file():
        return {STAGE_FILES["volume"]: checkpoint.read_bytes()}
    names = [STAGE_FILES["volume"], STAGE_FILES["informed"]]
    return {name: (checkpoint / name).read_bytes() for name in names if (checkpoint / name).exists()}


class ChunkWorker:
    """One actor: the run's models, loaded once from the checkpoint bytes it was given."""

    def __init__(self, files: dict[str, bytes], device: str | None, steps: int | None, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self._folder = tempfile.TemporaryDirectory(prefix="gem3d-worker-")
        for name, data in files.items():
            (Path(self._folder.name) / name).write_bytes(data)
        self.synth: Synthesiser = load_synthesiser(Path(self._folder.name), device, steps)

    def sample(self, requests: list[SampleRequest]) -> list[np.ndarray]:
        """The chunk's volumes ``[D, H, W]``, as ``sample_volumes`` gives them in one process."""
        cfg = self.synth.cfg
        return sample_volumes(
            self.synth.volume_model,
            self.synth.sampler,
            requests,
            cfg.data.window,
            cfg.sampler.overlap,
            cfg.sampler.batch_volumes,
        )


class RayChunks:
    """``chunks -> volumes`` on Ray actors (a context manager: the actors and a local Ray stop on exit).

    Use as ``gem3d.synthesis.iter_jobs``'s ``sample_chunks``: called with the cohort's chunks of
    requests, it yields each chunk's volumes in chunk order.
    """

    def __init__(self, settings: WorkerSettings, checkpoint: Path, device: str | None, steps: int | None) -> None:
        self.settings = settings
        self.checkpoint = checkpoint
        self.device = device
        self.steps = steps
        self._actors: list[Any] = []
        self._started_ray = False

    def __enter__(self) -> RayChunks:
        import ray

        settings = self.settings
        threads = settings.threads
        if not ray.is_initialized():
            if settings.address is not None:
                try:
                    ray.init(address=settings.address, log_to_driver=False)
                except Exception as error:  # Ray raises ConnectionError, RuntimeError, its own exceptions
                    message = str(error).splitlines()[0] if str(error) else type(error).__name__
                    where = f"--ray-address {settings.address}"
                    raise ConfigError(f"{where}: cannot join a Ray cluster ({message})") from None
            else:
                cpus = settings.workers * settings.threads
                # never spill objects to disk: a release's volumes are not audited yet while they travel
                ray.init(
                    num_cpus=cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    _system_config={"automatic_object_spilling_enabled": False},
                )
            self._started_ray = True
        files = ray.put(run_files(self.checkpoint))
        actor = ray.remote(num_cpus=settings.threads, num_gpus=settings.gpus)(ChunkWorker)
        self._actors = [actor.remote(files, self.device, self.steps, threads) for _ in range(settings.workers)]
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._started_ray:
            ray.shutdown()

    def __call__(self, chunks: Iterable[list[SampleRequest]]) -> Iterator[list[np.ndarray]]:
        import ray

        if not self._actors:
            raise RuntimeError("RayChunks is used inside a 'with' block")
        pending: deque[Any] = deque()
        limit = IN_FLIGHT_PER_WORKER * len(self._actors)
        for index, chunk in enumerate(chunks):
            if len(pending) >= limit:
                yield ray.get(pending.popleft())
            pending.append(self._actors[index % len(self._actors)].sample.remote(chunk))
        while pending:
            yield ray.get(pending.popleft())
