"""A cohort's arrays on disk while it is made, read back one case at a time (issue 16, point 3).

Enhancement, de-enhancement and the release go through every case of a dataset several times
(planning, donors, sampling, writing). Held in memory, the cases cost memory linear in the
cohort: about 10 MB a case at the brats grid and 30-60 MB at the abdomenct1k grid, so a
cohort of hundreds to a thousand cases does not fit. Instead each case's model-grid arrays (and
each planned pair's edited mask) are written once to a ``Spill`` folder as ``.npy`` files and
loaded when needed, then dropped: memory is a few cases, whatever the cohort's size.

* ``Spill.temporary()``: the folder, a private temporary directory (mode 0700: it holds
  patient-derived arrays) under ``$TMPDIR``, removed when the block ends, on errors too. It needs
  disk for the cohort's model-grid arrays (uncompressed); point ``TMPDIR`` at a larger disk if
  the default is small. A run that is killed leaves it for the system's temporary-file cleaner.
* ``Spill.put(array)`` -> ``OnDisk``, whose ``load()`` reads the array back.
* ``InMemory``: the same interface for an array already in memory (the evaluation's small pools).
* ``SpilledCase``: a dataset case on the model grid, spilled; ``spilled_volumes`` a
  ``Sequence[Volume]`` over such cases that loads each case when indexed.
* ``LazySequence``: a ``Sequence`` whose items are made when indexed (cases, masks, jobs), and
  ``reordered``, a lazy view in another order.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, overload

import numpy as np

from gem3d.data.geometry import CaseGeometry, ModelGridCase
from gem3d.data.volume import Volume
from gem3d.errors import DataError

T = TypeVar("T")


class Stored(Protocol):
    """An array kept somewhere: ``load()`` gives it (``[D, H, W]`` for the arrays kept here)."""

    def load(self) -> np.ndarray: ...


@dataclass(frozen=True)
class InMemory:
    """An array already in memory, behind the ``Stored`` interface."""

    array: np.ndarray

    def load(self) -> np.ndarray:
        return self.array


@dataclass(frozen=True)
class OnDisk:
    """An array in a ``Spill`` file, read whole by ``load()`` (into memory: nothing stays mapped)."""

    path: Path

    def load(self) -> np.ndarray:
        return np.load(self.path, allow_pickle=False)


class Spill:
    """A folder of arrays written once and read back when needed (use ``Spill.temporary()``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    @classmethod
    @contextmanager
    def temporary(cls) -> Iterator[Spill]:
        """A spill in a new private temporary folder, removed when the block ends."""
        try:
            scope = tempfile.TemporaryDirectory(prefix="gem3d-spill-")
        except OSError as error:
            raise DataError(f"{tempfile.gettempdir()}: cannot make a temporary folder ({error.strerror})") from None
        with scope as folder:
            yield cls(Path(folder))

    def put(self, array: np.ndarray) -> OnDisk:
        """Write ``array`` to a new file of the spill; its handle."""
        path = self.folder / f"{self.count:06d}.npy"
        self.count += 1
        try:
            np.save(path, np.ascontiguousarray(array), allow_pickle=False)
        except OSError as error:
            path.unlink(missing_ok=True)
            raise DataError(
                f"{self.folder}: cannot write a cohort's model-grid arrays there ({error.strerror or error}); "
                "set TMPDIR to a folder on a larger disk"
            ) from None
        return OnDisk(path)


@dataclass(frozen=True)
class SpilledCase:
    """A dataset case on the model grid, its arrays in a ``Spill``.

    Attributes:
        site: the site dataset it came from (the folder's name for a single dataset).
        image, label: ``[D, H, W]`` float32 in [-1, 1] and uint8 contiguous ids, on disk.
    """

    case_id: str
    site: str
    geometry: CaseGeometry
    image: OnDisk
    label: OnDisk

    def volume(self) -> Volume:
        """Its arrays, loaded."""
        return Volume(self.case_id, self.image.load(), self.label.load())

    def grid(self) -> ModelGridCase:
        """Its arrays, loaded, with the geometry that maps them back."""
        return ModelGridCase(self.image.load(), self.label.load(), self.geometry)


class LazySequence(Sequence[T]):
    """``length`` items, item ``i`` made by ``get(i)`` each time it is indexed (nothing is kept).

    The one way this package hands a cohort's cases, masks or jobs to code that takes a
    ``Sequence``: that code holds what it indexes, for as long as it keeps it, and no more.
    """

    def __init__(self, length: int, get: Callable[[int], T]) -> None:
        self.length = length
        self.get = get

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return [self.get(i) for i in range(*index.indices(self.length))]
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return self.get(index % self.length)


def spilled_volumes(cases: Sequence[SpilledCase]) -> LazySequence[Volume]:
    """The spilled cases as volumes, each loaded when indexed."""
    return LazySequence(len(cases), lambda i: cases[i].volume())


def reordered(items: Sequence[T], order: Sequence[int]) -> LazySequence[T]:
    """``[items[i] for i in order]``, each item got from ``items`` when indexed."""
    order = list(order)
    return LazySequence(len(order), lambda i: items[order[i]])


__all__ = ["InMemory", "LazySequence", "OnDisk", "Spill", "SpilledCase", "Stored", "reordered", "spilled_volumes"]
