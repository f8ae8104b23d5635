"""One writer per store: a lease taken when a store is opened for writing, released on close, and recovered
after the holder dies.

:class:`FileLease` is an exclusive ``flock`` on a lock file beside the store, holding a line of JSON that names the
holder (pid, host, since). The operating system drops the lock when the holder's process ends, however it ends
(SIGKILL included), so the next writer takes it without any clean-up. A second writer, in this process or another,
gets :class:`~gdn2ts.streaming.errors.StoreLockedError` naming the holder. flock works between processes of one
machine (not across network file systems): a networked backend implements the same :class:`Lease` protocol with its
own lock (PostgreSQL: a session-level advisory lock).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Protocol, runtime_checkable

from gdn2ts.streaming.errors import StoreError, StoreLockedError

__all__ = ["Lease", "FileLease"]


@runtime_checkable
class Lease(Protocol):
    """A store's writer lease."""

    holder: dict
    """``{"pid", "host", "since"}`` of the process that holds it."""

    def release(self) -> None:
        """Give the lease up (idempotent)."""


class FileLease:
    """An exclusive lease on ``path`` (created if missing), taken at construction.

    Example:
        >>> import tempfile
        >>> from gdn2ts.streaming.errors import StoreLockedError
        >>> path = tempfile.mkdtemp() + "/state.db-lock"
        >>> first = FileLease(path, what="state.db")
        >>> try:
        ...     FileLease(path, what="state.db")
        ... except StoreLockedError as e:
        ...     e.holder["pid"] == first.holder["pid"]
        True
        >>> first.release(); FileLease(path, what="state.db").release()
    """

    def __init__(self, path: str | Path, what: str):
        self._fd: int | None = None
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            where = "read-only location: " if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
            raise StoreError(f"{what}: cannot open for writing: {where}cannot open the lock file {self.path} "
                             f"({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" if holder else
                   "another process")
            raise StoreLockedError(f"{what} is held by another writer ({who}); one writer per store: close it "
                                   "first, or open this store read-only", holder) from None
        except OSError as e:
            os.close(fd)
            raise StoreError(f"{what}: cannot lock {self.path} ({e.strerror})") from None
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(self.holder) + "\n").encode(), 0)
        except OSError:
            pass  # the lock holds without its note (a full disk): the holder is then reported as unknown
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self):
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}
