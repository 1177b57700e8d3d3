"""Writing files safely: the one atomic writer, the one JSON writer, the one atomic folder.

Every output appears whole or not at all: it is written to a hidden temporary file in its own
folder and renamed over the target (``os.replace`` is atomic on one file system). A folder of
outputs (a dataset, a cache, a release) is built the same way: in a work folder beside it
(``AtomicFolder``), renamed into place when it is complete, removed on any failure. Temporary files
and folders get the permissions a plain ``open`` or ``mkdir`` would give under the process's umask
(``tempfile`` makes them 0600 / 0700, which left shared datasets unreadable by colleagues; issue 13).
Secrets choose their own, stricter mode (``mode=0o600``: a site's key).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def current_umask() -> int:
    """The process's umask (read by setting and restoring it; no other way exists in POSIX)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(folder: bool = False) -> int:
    """The mode ``open(..., "w")`` (0666) or ``mkdir`` (0777) gives under the umask."""
    return (0o777 if folder else 0o666) & ~current_umask()


def atomic_write(
    path: str | Path, write: Callable[[Path], object], *, mode: int | None = None, durable: bool = False
) -> Path:
    """Create ``path`` whole or not at all: ``write(tmp)`` fills a hidden file beside it, which is then renamed.

    Args:
        write: writes the content to the path it is given (any writer: nibabel, safetensors, JSON).
        mode: the file's permissions; default the umask's (``default_mode``).
        durable: fsync the file before the rename (ledgers: a crash must not lose a spent budget).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, default_mode() if mode is None else mode)
        if durable:
            with open(tmp, "rb+") as stream:
                os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return value.name  # never a full path: outputs must not carry where a file was on disk
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_json(path: str | Path, payload: Any, *, mode: int | None = None, durable: bool = False) -> Path:
    """Write ``payload`` as indented JSON with sorted keys (a seed gives identical bytes), atomically."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text), mode=mode, durable=durable)


WORK_PREFIX = ".gem3d-work."


def work_prefix(pid: int | None = None) -> str:
    """The name prefix of a work folder owned by process ``pid`` (default this one) on this host."""
    return f"{WORK_PREFIX}{os.getpid() if pid is None else pid}@{socket.gethostname()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_work(folder: Path) -> list[Path]:
    """Remove the work folders in ``folder`` whose process on this host is gone (a killed run's leftovers).

    Folders of other hosts (a shared file system) are left alone: their processes cannot be checked here.
    """
    removed = []
    host = socket.gethostname()
    for stale in folder.glob(f"{WORK_PREFIX}*"):
        owner = stale.name.removeprefix(WORK_PREFIX).partition(".")[0]
        pid, _, where = owner.partition("@")
        if stale.is_dir() and pid.isdigit() and where == host and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


def work_folder_beside(out: str | Path) -> Path:
    """A new hidden work folder beside ``out`` (same file system, so it can be renamed into place).

    It carries this process's id and host in its name, so the next run into the same folder
    removes it if this process is killed (``remove_stale_work``); umask permissions.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work(out.parent)
    folder = Path(tempfile.mkdtemp(prefix=work_prefix(), dir=out.parent))
    os.chmod(folder, default_mode(folder=True))
    return folder


class AtomicFolder:
    """A folder that appears at ``out`` whole or not at all: the one folder-level atomic write.

    Built in ``work_folder_beside(out)`` (umask permissions, same file system; a killed run's
    leftover is removed by the next run into the same parent), renamed to ``out`` by ``commit``,
    removed by ``discard``. As a context manager it yields the work folder, commits when the
    block ends normally and discards on any exception (``BaseException`` included: Ctrl-C); an
    ``OSError`` that names no file (a full disk, a quota) comes back as a ``DataError`` naming ``out``::

        with AtomicFolder(out) as work:
            write_json(work / "dataset.json", ...)

    What happens when ``out`` exists at the rename is the caller's to choose; checking it up
    front, with the caller's own message, stays with the caller.

    Args:
        replace: remove an existing ``out`` first (a folder this program owns and rebuilds).
        keep_existing: if ``out`` appeared meanwhile (another process built the same folder),
            keep that one and drop this one, instead of failing.
        remove_created_parents: on failure, also remove the folders above ``out`` that this call
            created (the top-most one that did not exist), so a failure leaves no trace at all.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        replace: bool = False,
        keep_existing: bool = False,
        remove_created_parents: bool = False,
    ) -> None:
        self.out = Path(out)
        self.replace = replace
        self.keep_existing = keep_existing
        missing = [folder for folder in self.out.parents if not folder.exists()] if remove_created_parents else []
        self.created = missing[-1] if missing else None  # the top-most folder this call creates
        self.committed = False
        self.path = work_folder_beside(self.out)

    def commit(self) -> Path:
        """Rename the work folder to ``out``; on failure discard it and raise."""
        try:
            if self.replace and self.out.exists():
                shutil.rmtree(self.out)
            try:
                os.replace(self.path, self.out)
            except OSError:
                if not (self.keep_existing and self.out.is_dir()):
                    raise
                shutil.rmtree(self.path, ignore_errors=True)
        except BaseException:
            self.discard()
            raise
        self.committed = True
        return self.out

    def discard(self) -> None:
        """Remove the work folder (and the parents this call created, with ``remove_created_parents``).

        After ``commit`` it does nothing: the folder is the output now.
        """
        if self.committed:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> None:
        if kind is None:
            self.commit()
            return
        committed = self.committed
        self.discard()
        if not committed and isinstance(error, OSError) and not error.filename:
            # a full disk or a quota fails a write with no file name: say which output it was
            from gem3d.errors import DataError

            raise DataError(f"{self.out}: {error.strerror or error} while writing it; nothing was written") from error


RUN_LOCK = ".gem3d-writer.lock"


@contextmanager
def writer_lock(folder: str | Path, what: str = "--out") -> Iterator[None]:
    """Hold ``folder``'s writer lock while writing it: a second writer is refused at once, not silently raced.

    Raises:
        ConfigError: another process holds it (naming the folder and how to proceed).
    """
    from filelock import FileLock, Timeout

    from gem3d.errors import ConfigError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # a singleton per path: the same process may nest it (a command around a library call), others may not
    lock = FileLock(str(folder / RUN_LOCK), timeout=0, is_singleton=True)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(
            f"{what} {folder}: another gem3d process is writing it (lock {RUN_LOCK}); wait for it or choose another"
        ) from None
    try:
        yield
    finally:
        lock.release()
