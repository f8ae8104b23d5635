"""A slab: one file of fixed-size slots, one record per slot, read and written many slots per call.

The slab knows nothing of streams: an index elsewhere (the store's SQLite table) maps each stream to its slot
and the slot's checksum. Writes are copy-on-write: a record's new version goes to a free slot, and the old slot
is freed only once the index that points to the new one has committed. A crash at any moment therefore leaves
every committed index entry pointing at the bytes it was committed with; a write cut off half-way lands in a slot
that no committed entry points to.

Reads and writes go through ``pread``/``pwrite`` (runs of consecutive slots in one call) rather than a memory
map, so that the process's resident memory stays bounded however large the slab grows; the operating system's
page cache keeps hot slots in memory. Growth reserves disk space up front (``posix_fallocate``), so a full disk is
an error at growth, never a fault on a later write.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["Slab", "GROW_MIN"]

GROW_MIN = 1024  # slots added at least per growth
_IOV_MAX = 1024  # buffers per preadv (the operating system's limit)


class Slab:
    """Slots of ``slot_bytes`` in the file ``path`` (created if missing).

    Args:
        path: the slab file.
        slot_bytes: bytes per slot.
        readonly: open for reading only.

    Example:
        >>> import tempfile, numpy as np
        >>> slab = Slab(tempfile.mkdtemp() + "/x-slab", slot_bytes=8)
        >>> slab.write(np.array([3, 0]), np.arange(16, dtype=np.uint8).reshape(2, 8))
        >>> slab.read(np.array([0, 3]))[:, 0].tolist()
        [8, 0]
    """

    def __init__(self, path: str | Path, slot_bytes: int, readonly: bool = False):
        if slot_bytes < 1:
            raise ValueError(f"Slab: 'slot_bytes' expected a positive int, got {slot_bytes!r}")
        self.path, self.slot_bytes, self.readonly = Path(path), int(slot_bytes), readonly
        flags = os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT
        self.fd = os.open(self.path, flags | os.O_CLOEXEC, 0o644)

    @property
    def capacity(self) -> int:
        """Slots the file holds now."""
        return os.fstat(self.fd).st_size // self.slot_bytes

    def reserve(self, slots: int) -> None:
        """Make the file hold at least ``slots`` slots, its disk space allocated (``OSError`` when the disk or a
        size limit refuses it; the file keeps its size)."""
        have = self.capacity
        if slots <= have:
            return
        want = max(slots, have + max(GROW_MIN, have // 4))
        try:
            os.posix_fallocate(self.fd, have * self.slot_bytes, (want - have) * self.slot_bytes)
        except OSError:
            # a size limit may leave room for fewer slots than the margin asks for: try exactly what is needed
            os.posix_fallocate(self.fd, have * self.slot_bytes, (slots - have) * self.slot_bytes)

    def read(self, slots: np.ndarray, out: np.ndarray | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """The contents of ``slots``: into rows ``rows`` of ``out`` (``[m, slot_bytes]`` uint8, C-contiguous) when
        given, else into a new ``[n, slot_bytes]`` array. Slots past the end read as zeros."""
        slots = np.asarray(slots, dtype=np.int64)
        if out is None:
            out = np.empty((slots.size, self.slot_bytes), dtype=np.uint8)
            rows = np.arange(slots.size)
        for offset, views in self._vectors(slots, out, rows):
            got = os.preadv(self.fd, views, offset)
            for view in views:  # past the end of the file: zeros
                if got < view.nbytes:
                    view[max(got, 0):] = bytes(view.nbytes - max(got, 0))
                got -= view.nbytes
        return out

    def write(self, slots: np.ndarray, data: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Write rows ``rows`` of ``data`` (all, in order, by default; ``[m, slot_bytes]`` uint8, C-contiguous)
        into ``slots`` (distinct), growing the file as needed."""
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size == 0:
            return
        self.reserve(int(slots.max()) + 1)
        data = np.ascontiguousarray(data, dtype=np.uint8)
        rows = np.arange(slots.size) if rows is None else rows
        for offset, views in self._vectors(slots, data, rows):
            done = os.pwritev(self.fd, views, offset)
            whole = b"".join(views) if done < sum(v.nbytes for v in views) else b""
            while done < len(whole):  # a short write (a signal, a nearly full disk): continue or fail
                done += os.pwrite(self.fd, whole[done:], offset + done)

    def _vectors(self, slots: np.ndarray, buf: np.ndarray, rows: np.ndarray):
        """``(file offset, [memoryview])`` for each run of consecutive slots: the buffer rows that go there, one
        view per run of consecutive rows (a scatter/gather list for preadv/pwritev)."""
        order = np.argsort(slots, kind="stable")
        slots, rows = slots[order], np.asarray(rows, dtype=np.int64)[order]
        # split where the slots stop being consecutive, or the rows do, or a vector would grow too long
        cut = np.flatnonzero(np.diff(slots) != 1) + 1
        pieces = np.flatnonzero((np.diff(rows) != 1) | (np.diff(slots) != 1)) + 1
        for run_start, run_end in zip(np.concatenate([[0], cut]).tolist(), np.concatenate([cut, [slots.size]])
                                      .tolist(), strict=True):
            inner = pieces[(pieces > run_start) & (pieces < run_end)].tolist()
            bounds = [run_start, *inner, run_end]
            for i in range(0, len(bounds) - 1, _IOV_MAX):
                part = bounds[i:i + _IOV_MAX + 1]
                views = [memoryview(buf[int(rows[a]):int(rows[a]) + (b - a)]).cast("B")
                         for a, b in zip(part[:-1], part[1:], strict=True)]
                yield int(slots[part[0]]) * self.slot_bytes, views

    def sync(self) -> None:
        """Flush written slots to the disk (for power-loss safety)."""
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
