"""An in-memory store: the same protocol, staging and checksums as the embedded store, for tests and ephemeral
runs (nothing survives the process)."""

from __future__ import annotations

import os
import socket

import numpy as np

from gdn2ts.streaming.records import Rows, row_checksums
from gdn2ts.streaming.store import StagedStore, verified

__all__ = ["MemoryStore"]


class _ProcessLease:
    """The lease of an in-memory store: held by this process for the store's lifetime."""

    def __init__(self):
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": None}

    def release(self) -> None:
        pass


class MemoryStore(StagedStore):
    """An in-memory :class:`~gdn2ts.streaming.store.JournaledStore` and
    :class:`~gdn2ts.streaming.store.BlobStore` (tests, ephemeral runs). Records are kept as rows with their
    checksums, exactly as on disk.

    Example:
        >>> import torch
        >>> from gdn2ts.streaming.records import StreamRecord
        >>> store = MemoryStore()
        >>> store.put({"meter-1": StreamRecord({"h": torch.ones(1, 2)}, 1.0, 1, "m")})
        >>> store.commit()
        >>> store.get(["meter-1", "meter-2"])["meter-2"] is None
        True
    """

    durable = False
    what = "MemoryStore"

    def __init__(self):
        super().__init__()
        self.lease = _ProcessLease()
        self.committed: dict[str, tuple[np.ndarray, int, float, int, int]] = {}
        self.journal: dict[int, tuple[bytes, int]] = {}
        self.blobs: dict[str, tuple[bytes, int]] = {}
        self.head = 0

    def _read_committed(self, ids):
        out = Rows.empty(len(ids), self.layout.nbytes)
        for i, sid in enumerate(ids):
            row = self.committed.get(sid)
            if row is None:
                continue
            data, steps, last, seq, crc = row
            if int(row_checksums(data[None])[0]) != crc:
                out.failed[i] = "stored record fails its checksum"
                continue
            out.found[i], out.data[i], out.steps[i], out.last_timestamp[i], out.journal_seq[i] = \
                True, data, steps, last, seq
        return out

    def _bind_committed(self, layout, fingerprint):
        pass

    def _has_content(self):
        return bool(self.committed or self.journal or self.blobs)

    def iterate(self):
        return iter(sorted(self.committed))

    def read_journal(self, after: int = 0):
        for seq in sorted(s for s in self.journal if s > after):
            if self.staged_truncate is None or seq > self.staged_truncate:
                yield verified(seq, *self.journal[seq])
        yield from self._staged_entries(after)

    def commit(self):
        if not self._has_staged():
            return
        ids, rows, deletes = self._staged_rows()
        sums = row_checksums(rows.data)
        for i, sid in enumerate(ids):
            self.committed[sid] = (rows.data[i].copy(), int(rows.steps[i]), float(rows.last_timestamp[i]),
                                   int(rows.journal_seq[i]), int(sums[i]))
        for sid in deletes:
            self.committed.pop(sid, None)
        for seq, payload, digest in self.staged_journal:
            self.journal[seq] = (payload, digest)
            self.head = max(self.head, seq)
        if self.staged_truncate is not None:
            for seq in [s for s in self.journal if s <= self.staged_truncate]:
                del self.journal[seq]
        self.blobs.update(self.staged_blobs)
        self.rollback()

    def close(self):
        self.rollback()

    def _committed_head(self):
        return self.head

    def _committed_blob(self, name):
        return self.blobs.get(name)

    def __len__(self):
        return len(self.committed)

