"""One run per output: an OS-level lock on an output file or folder, held while the run writes it.

    with output_lock(out):          # out: a file or folder, existing or not
        ...check what is in out, then write it...

A second run on the same output stops at once with one line, `error: sw.jsonl is in use by another
run (pid 1234)`, instead of both writing (two translate.py runs on one --out used to write every
record twice, two train.py runs to mix their files).

How: `fcntl.flock` (exclusive, non-blocking) on a lock file beside the output, `.<name>.lock` in
the output's parent folder. Beside rather than inside, because a folder output may not exist yet
and may be replaced whole when it is saved (clo/atomic.py), which would replace a lock inside it
too. The kernel drops a flock lock when its holder exits, however it exits, so a killed run can
never leave the output locked; at most it leaves the small lock file, which the next run reuses.
The file holds the holder's pid, for the message, and is removed on release (the inode check in
`_acquire` makes removal safe against a run that opened the file just before).

Parent folders that do not exist are created for the lock file and removed again on release if
they are still empty, so a run that fails leaves no trace. POSIX only (Linux, macOS).
"""

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from clo.errors import CloError


def lock_path(path: Path | str) -> Path:
    """The lock file of output `path`: `.<name>.lock` in the same folder, named after the path resolved
    (links followed, `.` and `..` gone), so that every name of one output shares one lock."""
    path = Path(path).resolve()
    return path.parent / f".{path.name}.lock"


@contextmanager
def output_lock(path: Path | str):
    """Hold the lock on output `path` inside the `with` block; CloError if another run holds it."""
    path = Path(path)
    lock = lock_path(path)
    created = _make_parents(lock.parent)
    try:
        fd = _acquire(path, lock)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held, so a run that opens it next sees it gone
        os.close(fd)
        _remove_empty(created)


def _acquire(path: Path, lock: Path) -> int:
    """An open descriptor of `lock`, flock-ed exclusively, with this process's pid written in it."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # another run removed the empty parent it had created: make it again
            _make_parents(lock.parent)
            continue
        except OSError as e:
            raise CloError(f"{path}: cannot create the lock file {lock} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", errors="replace").strip() or "unknown"
            os.close(fd)
            raise CloError(f"{path} is in use by another run (pid {holder})") from None
        if _same_file(fd, lock):
            break
        os.close(fd)  # the holder removed this file on release after we opened it: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    return fd


def _same_file(fd: int, lock: Path) -> bool:
    """Whether `lock` still names the file open as `fd`."""
    try:
        on_disk = os.stat(lock)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders `_make_parents` created, innermost first, up to the first one not empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            break


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing ancestors; return those created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    created = []
    for f in reversed(missing):
        try:
            f.mkdir()
            created.append(f)
        except FileExistsError:
            pass  # made by another run meanwhile: not ours to remove
        except OSError as e:
            raise CloError(f"{f}: cannot create the folder ({e.strerror})") from None
    return created
