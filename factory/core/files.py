"""Files factory writes anywhere: folder checks, atomic writes and the lock that keeps a second writer out.

The warehouse's tables, exports, models and reports all go through these, so a reader never sees half a file
and two processes never write one folder at once (docs/RELIABILITY.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from factory.core.errors import FactoryError, UserInputError


# ------------------------------------------------------------------------------------------------ folders
def check_folder(path: Path) -> None:
    """Raise UserInputError if `path` exists but is not a folder, or lies under a regular file.

    Without this, `mkdir` and `open` fail with NotADirectoryError or FileExistsError tracebacks that do not
    say which of the path's parts is the file.
    """
    for candidate in (path, *path.parents):
        try:
            mode = candidate.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue  # does not exist (yet); the first part that exists decides
        except OSError as exc:
            raise UserInputError(f"{path}: cannot be used as a folder ({exc.strerror})") from None
        if stat.S_ISDIR(mode):
            return
        where = "it is a file" if candidate == path else f"{candidate} is a file"
        raise UserInputError(f"{path}: is not a folder ({where})")


def make_folder(path: Path) -> None:
    check_folder(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"{path}: cannot create this folder ({exc.strerror})") from None


# ------------------------------------------------------------------------------------------ atomic writes
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    make_folder(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append_line(path: Path, line: str) -> None:
    """Append one line to a log-like file in a single write (lines from several processes never interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- locking
# What a lock file holds while factory owns it: who took it, padded to a fixed size so that it is always
# written whole, in place, and never truncated.
_HOLDER_BYTES = 128


def _holder(fd: int) -> str:
    """Who holds a lock file, as the holder wrote it; never raises (the file may be empty or garbage)."""
    try:
        info = json.loads(os.pread(fd, _HOLDER_BYTES, 0).decode("utf-8", "replace"))
        started = datetime.fromtimestamp(float(info["started"]), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"started {started} by pid {int(info['pid'])}"
    except Exception:  # the details are a courtesy; the lock itself is what matters
        return "held by another process"


def _open_lock(lock_file: Path) -> int:
    """Open (or create) a lock file without following a link, and refuse anything but a plain file.

    A link planted at the lock's name would otherwise make factory lock, and write to, whatever it points at."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO must not hang
    try:
        fd = os.open(lock_file, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserInputError(
                f"{lock_file}: is a symbolic link; factory never follows a link for its lock file (remove the link)"
            ) from None
        raise UserInputError(f"{lock_file}: cannot open this lock file ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserInputError(f"{lock_file}: is not a plain file; factory uses this name for its lock (move it away)")
    return fd


def _is_holder_record(fd: int) -> bool:
    """Whether the lock file is empty or holds only factory's holder record (so writing the record loses nothing)."""
    st = os.fstat(fd)
    if st.st_nlink > 1:  # a hard link to someone's file: lock it, but write nothing into it
        return False
    if st.st_size == 0:
        return True
    if st.st_size != _HOLDER_BYTES:
        return False
    try:
        info = json.loads(os.pread(fd, _HOLDER_BYTES, 0).decode("utf-8"))
    except ValueError:
        return False
    return isinstance(info, dict) and set(info) == {"pid", "started"}


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, busy: Callable[[str], str]) -> Iterator[None]:
    """Hold an exclusive, non-blocking flock on `lock_file`; FactoryError(busy(holder)) if it is taken.

    The file is never truncated: the holder's record is written in place at a fixed size, and only into an
    empty file or one that already holds such a record. The kernel drops the lock when the holder dies, so a
    crashed build never leaves the folder locked.
    """
    fd = _open_lock(lock_file)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FactoryError(busy(_holder(fd))) from None
        try:
            if _is_holder_record(fd):
                with contextlib.suppress(OSError):  # who holds it is for messages only
                    record = json.dumps({"pid": os.getpid(), "started": time.time()})
                    os.pwrite(fd, record.ljust(_HOLDER_BYTES).encode(), 0)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(path: Path, what: str) -> Iterator[None]:
    """Lock a folder outside the warehouse (e.g. an export folder) against a second writer.

    The lock is the hidden file `.<name>.lock` beside the folder, in its parent (created if needed), so the
    folder itself can be replaced or emptied while locked. `what` names the folder in the error message,
    e.g. "export folder". Non-blocking: FactoryError when another process holds it.
    """
    path = Path(path).resolve()
    check_folder(path)
    make_folder(path.parent)
    lock_file = path.parent / f".{path.name}.lock"
    with exclusive_lock(
        lock_file, lambda holder: f"{path}: another process is writing this {what} ({holder}); wait for it"
    ):
        yield
