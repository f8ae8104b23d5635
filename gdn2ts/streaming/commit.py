"""When an online runner's work becomes durable: one journal entry per call with snapshots now and then, or the
states of the streams a call touched written on every call (see ``docs/streaming-durability.md``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from gdn2ts.streaming.journal import CommitPolicy, Entry, encode_entry
from gdn2ts.streaming.records import Rows
from gdn2ts.streaming.store import JournaledStore, StateStore
from gdn2ts.streaming.workingset import WorkingSet

__all__ = ["Durability"]


class Durability:
    """The commit and journal policy of one runner over one store.

    Args:
        store: the runner's store.
        policy: :class:`CommitPolicy` (``journal=None``: journal when the store is a durable
            :class:`JournaledStore`).

    ``seq`` is the number of the last journal entry (0 without a journal).
    """

    def __init__(self, store: StateStore, policy: CommitPolicy):
        if not isinstance(policy, CommitPolicy):
            raise ValueError(f"OnlineRunner: 'policy' expected a CommitPolicy, got {type(policy).__name__}")
        journaling = isinstance(store, JournaledStore)
        if policy.journal and not journaling:
            raise ValueError(f"OnlineRunner: a journal needs a JournaledStore, got {type(store).__name__}")
        self.store, self.policy = store, policy
        self.has_journal = journaling
        """The store keeps a journal (it may hold entries to replay, and snapshots truncate it)."""
        self.journaled = journaling and (policy.journal if policy.journal is not None else bool(store.durable))
        """Calls are journaled (else written through)."""
        self.seq = store.journal_head() if journaling else 0
        self.reset()

    def commit_call(self, entry: Entry, rows: Callable[[], tuple[list[str], Rows]],
                    blobs: Mapping[str, bytes] | None = None) -> None:
        """Make one call durable: its journal entry, or (write-through) the ``rows()`` (ids and rows) of the
        streams it touched, with ``blobs`` (name -> payload), in one transaction; nothing stays staged if that
        fails."""
        try:
            if self.journaled:
                self.store.append_journal(entry.seq, encode_entry(entry))
            else:
                self.store.write_rows(*rows())
            for name, payload in (blobs or {}).items():
                self.store.put_blob(name, payload)
            self.store.commit()
        except BaseException:
            # a call that did not commit must not linger as staged writes that later reads would see
            self.store.rollback()
            raise

    def called(self, seq: int, rows: int) -> bool:
        """Count a committed journaled call; True when a snapshot is due."""
        self.seq = seq
        self._calls += 1
        self._rows += rows
        p = self.policy
        return (self._calls >= p.snapshot_every or self._rows >= p.snapshot_rows or
                (p.snapshot_seconds is not None and time.monotonic() - self._since >= p.snapshot_seconds))

    def snapshot(self, ws: WorkingSet) -> None:
        """Write every changed stream of ``ws`` to the store and truncate the journal they reflect."""
        if self.journaled or ws.dirty.any():
            ws.seq = self.seq
            ws.write_dirty()
        if self.has_journal and self.seq:
            try:
                self.store.truncate_journal(self.seq)
                self.store.commit()
            except BaseException:
                self.store.rollback()
                raise
        self.reset()

    def reset(self) -> None:
        self._calls, self._rows, self._since = 0, 0, time.monotonic()
