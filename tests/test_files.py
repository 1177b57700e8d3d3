"""The one atomic writer and the one atomic folder: whole or nothing, umask permissions, stale work folders
of killed runs removed (issues 13, 14)."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gem3d.data.nifti import save_nifti
from gem3d.data.nnunet_raw import DatasetWriter
from gem3d.errors import DataError
from gem3d.files import (
    WORK_PREFIX,
    AtomicFolder,
    atomic_write,
    remove_stale_work,
    work_folder_beside,
    work_prefix,
    write_json,
)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_follow_the_umask_not_tempfiles_private_modes(tmp_path: Path, umask_022: None) -> None:
    json_file = write_json(tmp_path / "a.json", {"b": 1, "a": np.float32(2.0)})
    nifti = save_nifti(tmp_path / "x.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    folder = work_folder_beside(tmp_path / "out")

    assert _mode(json_file) == 0o644 and _mode(nifti) == 0o644
    assert _mode(folder) == 0o755
    assert json_file.read_text() == '{\n  "a": 2.0,\n  "b": 1\n}\n'


def test_a_secret_keeps_its_own_mode(tmp_path: Path, umask_022: None) -> None:
    key = atomic_write(tmp_path / "site.key", lambda tmp: tmp.write_bytes(b"k"), mode=0o600)

    assert _mode(key) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = write_json(tmp_path / "kept.json", {"v": 1})

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device", str(tmp))

    with pytest.raises(OSError):
        atomic_write(target, fail)

    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]


def test_only_work_folders_of_dead_processes_on_this_host_are_removed(tmp_path: Path) -> None:
    # prepare: a process that has exited, this (live) process, and a folder of another host
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f"{work_prefix(int(dead.stdout))}x"
    alive = tmp_path / f"{work_prefix()}y"
    elsewhere = tmp_path / f"{WORK_PREFIX}{int(dead.stdout)}@not-{socket.gethostname()}.z"
    for folder in (killed, alive, elsewhere):
        folder.mkdir()

    removed = remove_stale_work(tmp_path)

    assert removed == [killed]
    assert alive.exists() and elsewhere.exists() and not killed.exists()


def test_a_second_writer_of_a_folder_is_refused_while_the_first_holds_it(tmp_path: Path) -> None:
    from gem3d.errors import ConfigError
    from gem3d.files import writer_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gem3d.files import writer_lock\n"
         "with writer_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)", str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="another gem3d process is writing it"), writer_lock(tmp_path / "run"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with writer_lock(tmp_path / "run"), writer_lock(tmp_path / "run"):  # free again, and nestable in one process
        pass


def _dead_pid() -> int:
    """The id of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_an_atomic_folder_appears_whole_with_umask_permissions(tmp_path: Path, umask_022: None) -> None:
    out = tmp_path / "made" / "dataset"

    with AtomicFolder(out) as work:
        write_json(work / "dataset.json", {"n": 1})
        assert not out.exists() and work.parent == out.parent and work.name.startswith(work_prefix())

    assert (out / "dataset.json").read_text() == '{\n  "n": 1\n}\n'
    assert _mode(out) == 0o755
    assert sorted(p.name for p in out.parent.iterdir()) == ["dataset"]


@pytest.mark.parametrize("error", [RuntimeError("disk"), KeyboardInterrupt()])
def test_an_exception_leaves_no_folder_and_no_work_folder(tmp_path: Path, error: BaseException) -> None:
    out = tmp_path / "dataset"

    with pytest.raises(type(error)), AtomicFolder(out) as work:
        (work / "half.nii.gz").write_bytes(b"half")
        raise error

    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_named_by_the_output_it_was_writing(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    # what a write() on a full disk raises: an errno, no file name
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    message = rf"{out}: No space left on device while writing it; nothing was written"
    with pytest.raises(DataError, match=message), AtomicFolder(out) as work:
        (work / "half.nii.gz").write_bytes(b"half")
        raise full
    with pytest.raises(DataError, match=str(out)), DatasetWriter(out):  # the dataset writer says the same
        raise full

    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_not_lost(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "kept.json").write_text("old")

    with pytest.raises(OSError), AtomicFolder(out) as work:
        (work / "new.json").write_text("new")

    assert [p.name for p in out.iterdir()] == ["kept.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def test_replace_rebuilds_and_keep_existing_keeps_the_other_writers_folder(tmp_path: Path) -> None:
    # prepare: a folder this program rebuilds, and one another process built while this one worked
    rebuilt, raced = tmp_path / "baselines", tmp_path / "site_0"
    for folder in (rebuilt, raced):
        folder.mkdir()
        (folder / "old").write_text("old")

    with AtomicFolder(rebuilt, replace=True) as work:
        (work / "new").write_text("new")
    with AtomicFolder(raced, keep_existing=True) as work:
        (work / "new").write_text("new")

    assert [p.name for p in rebuilt.iterdir()] == ["new"]
    assert [p.name for p in raced.iterdir()] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baselines", "site_0"]


def test_a_failure_removes_the_parents_it_created_only_when_asked(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), AtomicFolder(tmp_path / "a" / "b" / "cache", remove_created_parents=True):
        raise RuntimeError("bad case")
    with pytest.raises(RuntimeError), AtomicFolder(tmp_path / "c" / "cache"):
        raise RuntimeError("bad case")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert list((tmp_path / "c").iterdir()) == []


def test_a_killed_runs_work_folder_is_removed_by_the_next_atomic_folder(tmp_path: Path) -> None:
    killed = tmp_path / f"{work_prefix(_dead_pid())}x"
    (killed / "imagesTr").mkdir(parents=True)

    with AtomicFolder(tmp_path / "dataset") as work:
        (work / "dataset.json").write_text("{}")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def test_discarding_after_a_commit_keeps_the_output_and_its_parents(tmp_path: Path) -> None:
    folder = AtomicFolder(tmp_path / "a" / "cache", remove_created_parents=True)
    (folder.path / "manifest.json").write_text("{}")

    folder.commit()
    folder.discard()  # a writer's ``abort`` after its ``finish``

    assert (tmp_path / "a" / "cache" / "manifest.json").is_file()
