"""Persistent per-stream state: the ``StateStore`` protocol, the staging every store shares, and an in-memory store.

A store belongs to one model. The first writer binds it to the model's fingerprint and record layout
(:class:`~gdn2ts.streaming.records.RecordLayout`); a runner of another model is refused with
:class:`FingerprintMismatchError` before it can add a stream. Records move as rows (``uint8`` matrices, one row
per stream, see :class:`~gdn2ts.streaming.records.Rows`), many streams per call; each row carries a checksum
verified on every read, and a row that fails it fails only its own stream.

Writes are staged and become visible to other readers only at ``commit()``, all at once or not at all; reads
through the same store see its staged writes. Stream ids are data: bound as parameters, never part of a path or a
query string. A store opened for writing holds the store's writer lease (one writer per store; see
:mod:`gdn2ts.streaming.lease`); a store opened read-only reads beside it.

A :class:`JournaledStore` also keeps an observation journal: numbered, checksummed entries appended and truncated
in the same transactions as the records (see ``docs/streaming-durability.md``). A :class:`BlobStore` also keeps a
few named payloads (an online runner's learned weights and optimizer state), committed in the same transactions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from gdn2ts.streaming.errors import (
    CorruptJournalError,
    CorruptRecordError,
    FingerprintMismatchError,
    ReadOnlyStoreError,
    StoreError,
    StoreLockedError,
)
from gdn2ts.streaming.lease import Lease
from gdn2ts.streaming.records import RecordLayout, Rows, StreamRecord, check_ids, payload_checksum

__all__ = ["StateStore", "JournaledStore", "BlobStore", "StagedStore", "StoreError", "CorruptRecordError",
           "CorruptJournalError", "FingerprintMismatchError", "StoreLockedError", "ReadOnlyStoreError"]


@runtime_checkable
class StateStore(Protocol):
    """Where per-stream records live. Writes are staged until ``commit()``. A networked backend implements the
    same methods (and those of :class:`JournaledStore` and :class:`BlobStore` to serve a journaling, learning
    runner)."""

    model: str | None
    """Fingerprint of the model the store belongs to (None until a writer binds it)."""
    layout: RecordLayout | None
    """The record layout of that model (None until bound)."""
    readonly: bool
    """Opened for reading only (every write raises :class:`ReadOnlyStoreError`)."""
    lease: Lease | None
    """The writer lease this store holds (None when read-only)."""

    def bind(self, layout: RecordLayout, fingerprint: str) -> None:
        """Bind the store to a model (committed at once), or check that it is bound to this one:
        :class:`FingerprintMismatchError` names the store's model when it is another."""

    def read_rows(self, stream_ids: Sequence[str]) -> Rows:
        """The records of ``stream_ids`` (staged writes included) as rows; a record failing its checksum is
        listed in ``Rows.failed`` and the others are returned."""

    def write_rows(self, stream_ids: Sequence[str], rows: Rows) -> None:
        """Stage ``rows`` (``found`` ignored) for ``stream_ids`` (distinct), replacing earlier versions."""

    def get(self, stream_ids: Sequence[str], fingerprint: str | None = None) -> dict[str, StreamRecord | None]:
        """Records of ``stream_ids`` (None for unknown streams) as :class:`StreamRecord`; a corrupt one raises
        :class:`CorruptRecordError`, and with ``fingerprint``, a store of another model raises
        :class:`FingerprintMismatchError`."""

    def put(self, records: Mapping[str, StreamRecord]) -> None:
        """Stage records (binding an unbound store to their layout and fingerprint)."""

    def delete(self, stream_ids: Iterable[str]) -> None:
        """Stage deletions."""

    def iterate(self) -> Iterator[str]:
        """Ids of committed streams, in sorted order."""

    def commit(self) -> None:
        """Apply every staged write at once, or none of them."""

    def rollback(self) -> None:
        """Discard staged writes."""

    def close(self) -> None:
        """Release the store and its lease (staged writes are discarded)."""


@runtime_checkable
class JournaledStore(StateStore, Protocol):
    """A :class:`StateStore` that also keeps a journal of numbered entries, committed in the same transactions
    as the records (a networked backend: one transaction of its own, holding both)."""

    durable: bool
    """Whether a commit survives the death of the process (SQLite: yes; memory: no)."""

    def append_journal(self, seq: int, payload: bytes) -> None:
        """Stage entry ``seq`` (greater than :meth:`journal_head`); it gets a checksum."""

    def read_journal(self, after: int = 0) -> Iterator[tuple[int, bytes]]:
        """Entries numbered above ``after``, in order, each verified against its checksum
        (:class:`CorruptJournalError`, naming the entry, on failure)."""

    def truncate_journal(self, through: int) -> None:
        """Stage the removal of every entry numbered up to ``through``."""

    def journal_head(self) -> int:
        """The highest entry number ever appended (0 when none), staged entries included; truncation keeps it."""


@runtime_checkable
class BlobStore(StateStore, Protocol):
    """A :class:`StateStore` that also keeps named payloads (bytes, each with a checksum), staged like records
    and committed in the same transactions."""

    def put_blob(self, name: str, payload: bytes) -> None:
        """Stage ``payload`` under ``name`` (replacing any earlier one)."""

    def get_blob(self, name: str) -> bytes | None:
        """The payload under ``name`` (staged writes included), None when there is none; verified against its
        checksum (:class:`CorruptRecordError`, naming the blob, on failure)."""


_DELETED = (-1, -1)


class StagedStore:
    """What every store shares: the binding, staged rows, deletions, journal entries and blobs, and the record
    API on top of rows. A backend provides ``_read_committed``, ``_bind_committed``, ``_committed_head``,
    ``_committed_blob``, ``_has_content`` and its own ``commit``/``read_journal``/``iterate``/``close``."""

    what = "store"

    def __init__(self, readonly: bool = False):
        self.readonly = readonly
        self.model: str | None = None
        self.layout: RecordLayout | None = None
        self.lease: Lease | None = None
        self._batches: list[tuple[np.ndarray, Rows]] = []
        self._pos: dict[str, tuple[int, int]] = {}
        self.staged_journal: list[tuple[int, bytes, int]] = []
        self.staged_truncate: int | None = None
        self.staged_blobs: dict[str, tuple[bytes, int]] = {}

    # -- binding ---------------------------------------------------------------------------------------------------

    def bind(self, layout: RecordLayout, fingerprint: str) -> None:
        if not isinstance(layout, RecordLayout) or not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"bind: expected a RecordLayout and a fingerprint string, got {type(layout).__name__} "
                             f"and {fingerprint!r}")
        if self.model == fingerprint and self.layout == layout:
            return
        if self.readonly and self.model is None:
            # an empty store read beside (or before) its writer: nothing to read, nothing to bind
            self.model, self.layout = fingerprint, layout
            return
        if self.model is not None and self._has_content():
            if self.model != fingerprint:
                raise FingerprintMismatchError(
                    f"{self.what} holds the states of model {self.model!r}, not of this model {fingerprint!r}: "
                    "open another store for this model")
            raise StoreError(f"{self.what}: model {fingerprint!r} keeps records of layout {self.layout.spec}, "
                             f"not {layout.spec}")
        self._writable("bind")
        self._bind_committed(layout, fingerprint)
        self.model, self.layout = fingerprint, layout

    # -- rows ------------------------------------------------------------------------------------------------------

    def read_rows(self, stream_ids: Sequence[str]) -> Rows:
        ids = check_ids(stream_ids)
        if self.layout is None:
            return Rows.empty(len(ids), 8)
        staged = [i for i, sid in enumerate(ids) if sid in self._pos] if self._pos else []
        if not staged:
            return self._read_committed(ids)
        rest = np.setdiff1d(np.arange(len(ids)), staged)
        out = Rows.empty(len(ids), self.layout.nbytes)
        if rest.size:
            committed = self._read_committed([ids[i] for i in rest.tolist()])
            _place(out, rest, committed)
            out.failed.update({int(rest[j]): why for j, why in committed.failed.items()})
        for i in staged:
            b, r = self._pos[ids[i]]
            if b < 0:
                continue
            _, rows = self._batches[b]
            out.found[i] = True
            out.data[i], out.steps[i] = rows.data[r], rows.steps[r]
            out.last_timestamp[i], out.journal_seq[i] = rows.last_timestamp[r], rows.journal_seq[r]
        return out

    def write_rows(self, stream_ids: Sequence[str], rows: Rows) -> None:
        self._writable("write")
        ids = check_ids(stream_ids)
        if self.layout is None:
            raise StoreError(f"{self.what}: rows cannot be written before the store is bound to a model")
        if len(set(ids)) != len(ids):
            raise ValueError("write_rows: stream ids expected distinct")
        if rows.data.shape != (len(ids), self.layout.nbytes):
            raise ValueError(f"write_rows: rows expected shape ({len(ids)}, {self.layout.nbytes}), got "
                             f"{rows.data.shape}")
        b = len(self._batches)
        self._batches.append((np.asarray(ids, dtype=object), rows))
        self._pos.update(zip(ids, ((b, r) for r in range(len(ids))), strict=True))

    def _staged_rows(self) -> tuple[list[str], Rows, list[str]]:
        """The staged writes as one batch (the last version of each stream) and the staged deletions."""
        deletes = [sid for sid, p in self._pos.items() if p == _DELETED]
        if len(self._batches) == 1 and not deletes and len(self._pos) == len(self._batches[0][0]):
            ids, rows = self._batches[0]
            return list(ids), rows, []
        ids = [sid for sid, p in self._pos.items() if p != _DELETED]
        pos = np.array([self._pos[sid] for sid in ids], dtype=np.int64).reshape(-1, 2)
        nbytes = self.layout.nbytes if self.layout is not None else 8
        out = Rows.empty(len(ids), nbytes)
        for b, (_, rows) in enumerate(self._batches):
            at = np.flatnonzero(pos[:, 0] == b)
            if at.size:
                _place(out, at, rows, pos[at, 1])
        out.found[:] = True
        return ids, out, deletes

    # -- the record API --------------------------------------------------------------------------------------------

    def get(self, stream_ids, fingerprint=None):
        ids = check_ids(stream_ids)
        rows = self.read_rows(ids)
        rows.raise_failed(ids)
        if fingerprint is not None and self.model is not None and self.model != fingerprint and rows.found.any():
            sid = ids[int(np.flatnonzero(rows.found)[0])]
            raise FingerprintMismatchError(f"stream {sid!r}: stored state was written by model {self.model!r}, "
                                           f"not by this model {fingerprint!r}")
        if not rows.found.any():
            return dict.fromkeys(ids)
        # records own their tensors, with ordinary strides (the rows' views have the row size as their stride)
        tensors = {k: v.clone(memory_format=torch.contiguous_format) for k, v in self.layout.unpack(rows.data).items()}
        return {sid: StreamRecord({k: v[i:i + 1] for k, v in tensors.items()}, float(rows.last_timestamp[i]),
                                  int(rows.steps[i]), self.model or "", int(rows.journal_seq[i]))
                if rows.found[i] else None for i, sid in enumerate(ids)}

    def put(self, records: Mapping[str, StreamRecord]) -> None:
        self._writable("put")
        if not isinstance(records, Mapping):
            raise ValueError(f"put: 'records' expected a mapping of stream id -> StreamRecord, got "
                             f"{type(records).__name__}")
        for sid, record in records.items():
            if not isinstance(sid, str):
                raise ValueError(f"put: stream ids expected strings, got {type(sid).__name__} {sid!r}")
            if not isinstance(record, StreamRecord):
                raise ValueError(f"put: stream {sid!r} expected a StreamRecord, got {type(record).__name__}")
        if not records:
            return
        first = next(iter(records.values()))
        layout = self.layout or RecordLayout.of(first.tensors)
        model = self.model or first.fingerprint
        # everything is checked before anything is staged: a bad record stages nothing
        for sid, record in records.items():
            if record.fingerprint != model:
                raise FingerprintMismatchError(f"stream {sid!r}: a record of model {record.fingerprint!r} cannot "
                                               f"join a store of model {model!r}")
            try:
                layout.check(record.tensors, 1, what=f"stream {sid!r}")
            except ValueError as e:
                raise CorruptRecordError(str(e)) from None
        if self.layout is None:
            self.bind(layout, model)
        ids = list(records)
        n = len(ids)
        data = layout.pack({name: torch.cat([records[sid].tensors[name] for sid in ids]) for name, _, _ in
                            layout.fields})
        self.write_rows(ids, Rows(np.ones(n, dtype=bool), data,
                                  np.array([r.steps for r in records.values()], dtype=np.int64),
                                  np.array([r.last_timestamp for r in records.values()], dtype=np.float64),
                                  np.array([r.journal_seq for r in records.values()], dtype=np.int64), {}))

    def delete(self, stream_ids: Iterable[str]) -> None:
        self._writable("delete")
        for sid in check_ids(stream_ids):
            self._pos[sid] = _DELETED

    # -- journal and blobs -----------------------------------------------------------------------------------------

    def append_journal(self, seq: int, payload: bytes) -> None:
        self._writable("append_journal")
        head = self.journal_head()
        if isinstance(seq, bool) or not isinstance(seq, int) or seq <= head:
            raise ValueError(f"append_journal: 'seq' expected an int above the journal head {head}, got {seq!r}")
        if not isinstance(payload, (bytes, bytearray)):
            raise ValueError(f"append_journal: entry {seq} expected bytes, got {type(payload).__name__}")
        self.staged_journal.append((seq, bytes(payload), payload_checksum(payload)))

    def truncate_journal(self, through: int) -> None:
        self._writable("truncate_journal")
        if isinstance(through, bool) or not isinstance(through, int) or through < 0:
            raise ValueError(f"truncate_journal: 'through' expected a non-negative int, got {through!r}")
        self.staged_truncate = max(through, self.staged_truncate or 0)

    def journal_head(self) -> int:
        return max([self._committed_head(), *(seq for seq, _, _ in self.staged_journal)])

    def put_blob(self, name: str, payload: bytes) -> None:
        self._writable("put_blob")
        if not isinstance(name, str) or not name:
            raise ValueError(f"put_blob: 'name' expected a non-empty string, got {name!r}")
        if not isinstance(payload, (bytes, bytearray)):
            raise ValueError(f"put_blob: blob {name!r} expected bytes, got {type(payload).__name__}")
        self.staged_blobs[name] = (bytes(payload), payload_checksum(payload))

    def get_blob(self, name: str) -> bytes | None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"get_blob: 'name' expected a non-empty string, got {name!r}")
        row = self.staged_blobs.get(name) or self._committed_blob(name)
        if row is None:
            return None
        payload, digest = row
        if payload_checksum(payload) != digest:
            raise CorruptRecordError(f"blob {name!r}: stored payload fails its checksum")
        return payload

    def rollback(self) -> None:
        self._batches.clear()
        self._pos.clear()
        self.staged_journal.clear()
        self.staged_truncate = None
        self.staged_blobs.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def snapshot(self):
        """A context in which every read sees one committed state of the store (a read-only view replaying the
        journal reads records and entries from the same moment)."""
        return contextlib.nullcontext()

    def _has_staged(self) -> bool:
        return bool(self._pos or self.staged_journal or self.staged_truncate is not None or self.staged_blobs)

    def _staged_entries(self, after: int) -> Iterator[tuple[int, bytes]]:
        for seq, payload, _ in self.staged_journal:
            if seq > after and (self.staged_truncate is None or seq > self.staged_truncate):
                yield seq, payload

    def _writable(self, op: str) -> None:
        if self.readonly:
            raise ReadOnlyStoreError(f"{self.what} is open read-only: {op} is refused")

    # backend hooks
    def _read_committed(self, ids: list[str]) -> Rows:
        raise NotImplementedError

    def _bind_committed(self, layout: RecordLayout, fingerprint: str) -> None:
        raise NotImplementedError

    def _has_content(self) -> bool:
        raise NotImplementedError

    def _committed_head(self) -> int:
        raise NotImplementedError

    def _committed_blob(self, name: str) -> tuple[bytes, int] | None:
        raise NotImplementedError




def _place(out: Rows, at: np.ndarray, rows: Rows, take: np.ndarray | None = None) -> None:
    """Copy ``rows`` (or its rows ``take``) into positions ``at`` of ``out``."""
    take = slice(None) if take is None else take
    out.found[at], out.data[at], out.steps[at] = rows.found[take], rows.data[take], rows.steps[take]
    out.last_timestamp[at], out.journal_seq[at] = rows.last_timestamp[take], rows.journal_seq[take]


def verified(seq: int, payload: bytes, digest: int) -> tuple[int, bytes]:
    """A journal entry, checked against its checksum."""
    if payload_checksum(payload) != digest:
        raise CorruptJournalError(f"journal entry {seq}: stored entry fails its checksum")
    return seq, payload
