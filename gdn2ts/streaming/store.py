"""Persistent per-stream state: the ``StateStore`` protocol, an in-memory store and the embedded SQLite store.

A stream's record (:class:`StreamRecord`) holds named tensors (layer states, conv tails, scaling statistics, ...),
the last timestamp, the step count and the fingerprint of the model that wrote it. Records are encoded with
safetensors (tensors and string metadata only; nothing is pickled) and carry a SHA-256 checksum that is verified
on every read.

Writes are staged and become visible to other readers only at ``commit()``, all at once or not at all; reads
through the same store see its staged writes. Stream ids are data: they are bound as SQL parameters and never
become part of a path or an SQL string.

Commit policy of :class:`SQLiteStore`: write-ahead logging (WAL) and ``synchronous=NORMAL`` by default, so a
committed batch survives a crash of the process (SIGKILL included); ``synchronous="FULL"`` also survives a power
loss at some cost per commit. Commit in batches (many streams per transaction): a transaction costs one log append.

A :class:`JournaledStore` also keeps an observation journal: numbered, checksummed entries appended and truncated
in the same transactions as the records, so that an online runner can commit one small entry per call and write
the full states only now and then (see ``docs/streaming-durability.md``).

A :class:`BlobStore` also keeps a few named payloads (an online runner's learned weights and optimizer state),
staged and committed in the same transactions as the records (see ``docs/streaming-learning.md``).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import TensorSpec, serialize
from safetensors.torch import load as st_load

__all__ = [
    "StreamRecord",
    "StateStore",
    "JournaledStore",
    "BlobStore",
    "MemoryStore",
    "SQLiteStore",
    "StoreError",
    "CorruptRecordError",
    "CorruptJournalError",
    "FingerprintMismatchError",
]

FORMAT = "gdn2ts.stream.v1"
# 2 added the journal table, 3 the blobs table (learned weights); older files are upgraded in place on open, and
# an older gdn2ts refuses a version-3 file rather than stream it with the wrong weights
SCHEMA_VERSION = "3"
_SQL_BATCH = 500  # stream ids per SELECT ... IN (...)


class StoreError(Exception):
    """Base class of the state stores' errors."""


class CorruptRecordError(StoreError):
    """A stored record failed its checksum or could not be decoded."""


class CorruptJournalError(StoreError):
    """A journal entry failed its checksum or could not be decoded."""


class FingerprintMismatchError(StoreError):
    """A stored record was written by a different model."""


@dataclass(frozen=True)
class StreamRecord:
    """Everything a stream carries between observations.

    Example:
        >>> import torch
        >>> r = StreamRecord({"layer0.recurrent": torch.zeros(1, 2, 4, 4)}, last_timestamp=3.5, steps=7,
        ...                  fingerprint="abc")
        >>> r.steps, r.fingerprint
        (7, 'abc')
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Named tensors (layer states, conv tails, scaling statistics); any dtype, stored on the CPU."""
    last_timestamp: float = float("-inf")
    """Timestamp of the last observation applied (``-inf`` before the first)."""
    steps: int = 0
    """Number of observations applied."""
    fingerprint: str = ""
    """Fingerprint of the model that wrote the record."""
    journal_seq: int = 0
    """The record reflects every journal entry numbered up to this one (0: it was written without a journal)."""

    def __post_init__(self):
        if not isinstance(self.tensors, dict):
            raise ValueError(f"StreamRecord: 'tensors' expected a dict of name -> tensor, got "
                             f"{type(self.tensors).__name__}")
        for name, t in self.tensors.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"StreamRecord: tensor names expected non-empty strings, got {name!r}")
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"StreamRecord: tensor {name!r} expected a torch.Tensor, got {type(t).__name__}")
        if isinstance(self.last_timestamp, bool) or not isinstance(self.last_timestamp, (int, float)) or \
                math.isnan(self.last_timestamp) or self.last_timestamp == math.inf:
            raise ValueError(f"StreamRecord: 'last_timestamp' expected a number (or -inf), got "
                             f"{self.last_timestamp!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"StreamRecord: 'steps' expected a non-negative int, got {self.steps!r}")
        if not isinstance(self.fingerprint, str):
            raise ValueError(f"StreamRecord: 'fingerprint' expected a string, got {type(self.fingerprint).__name__}")
        if isinstance(self.journal_seq, bool) or not isinstance(self.journal_seq, int) or self.journal_seq < 0:
            raise ValueError(f"StreamRecord: 'journal_seq' expected a non-negative int, got {self.journal_seq!r}")


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def save_tensors(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes of ``tensors`` (any device, views allowed) with string ``metadata``.

    Goes through safetensors' ``serialize`` with the tensors' own buffers: rows of a state pool are views that
    share one storage, which ``safetensors.torch.save`` would refuse (and it is several times slower per record).

    Example:
        >>> import torch
        >>> from safetensors.torch import load
        >>> pool = torch.arange(12.0).view(3, 4)
        >>> load(save_tensors({"row": pool[1]}, {"k": "v"}))["row"].tolist()
        [4.0, 5.0, 6.0, 7.0]
    """
    keep = {name: t if t.device.type == "cpu" and t.is_contiguous() else t.detach().cpu().contiguous()
            for name, t in tensors.items()}
    specs = {name: TensorSpec(dtype=_dtype_name(t.dtype), shape=t.shape, data_ptr=t.data_ptr(), data_len=t.nbytes)
             for name, t in keep.items()}
    # `keep` holds every buffer alive until serialize has copied it
    payload = bytes(serialize(specs, metadata=metadata))
    del keep
    return payload


def encode(record: StreamRecord) -> bytes:
    """safetensors bytes of the record's tensors, with the scalars in its string metadata."""
    metadata = {"format": FORMAT, "last_timestamp": repr(float(record.last_timestamp)), "steps": str(record.steps),
                "fingerprint": record.fingerprint, "journal_seq": str(record.journal_seq)}
    return save_tensors(record.tensors, metadata)


def read_metadata(payload: bytes) -> dict[str, str]:
    """The string metadata of safetensors bytes."""
    # safetensors layout: 8-byte little-endian header length, then the JSON header holding the metadata
    header_len = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + header_len]).get("__metadata__", {})


def decode(payload: bytes, stream_id: str) -> StreamRecord:
    try:
        tensors = st_load(payload)
        metadata = read_metadata(payload)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"unknown format {metadata.get('format')!r}")
        return StreamRecord(tensors=dict(tensors), last_timestamp=float(metadata["last_timestamp"]),
                            steps=int(metadata["steps"]), fingerprint=metadata["fingerprint"],
                            journal_seq=int(metadata.get("journal_seq", "0")))
    except Exception as e:  # any decoding failure is a corrupt record, named
        raise CorruptRecordError(f"stream {stream_id!r}: stored record cannot be decoded ({e})") from None


def checksum(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def check_ids(stream_ids) -> list[str]:
    """``stream_ids`` as a list of strings (a bare string or a non-string id is a ValueError)."""
    if isinstance(stream_ids, str):
        raise ValueError("stream_ids expected a sequence of strings, got a single string (wrap it in a list)")
    ids = list(stream_ids)
    for sid in ids:
        if not isinstance(sid, str):
            raise ValueError(f"stream ids expected strings, got {type(sid).__name__} {sid!r}")
    return ids


def _check_fingerprint(stream_id: str, record: StreamRecord, fingerprint: str | None) -> None:
    if fingerprint is not None and record.fingerprint != fingerprint:
        raise FingerprintMismatchError(
            f"stream {stream_id!r}: stored state was written by model {record.fingerprint!r}, "
            f"not by this model {fingerprint!r}")


@runtime_checkable
class StateStore(Protocol):
    """Where per-stream records live. Writes are staged until ``commit()``; a networked backend implements the
    same seven methods (and the four of :class:`JournaledStore` to serve a journaling runner)."""

    def get(self, stream_ids: Sequence[str], fingerprint: str | None = None) -> dict[str, StreamRecord | None]:
        """Records of ``stream_ids`` (None for unknown streams), staged writes included. With ``fingerprint``,
        a record written by another model raises :class:`FingerprintMismatchError`."""

    def put(self, records: Mapping[str, StreamRecord]) -> None:
        """Stage records (replacing any earlier version)."""

    def delete(self, stream_ids: Iterable[str]) -> None:
        """Stage deletions."""

    def iterate(self) -> Iterator[str]:
        """Ids of committed streams, in sorted order."""

    def commit(self) -> None:
        """Apply every staged write at once, or none of them."""

    def rollback(self) -> None:
        """Discard staged writes."""

    def close(self) -> None:
        """Release the store (staged writes are discarded)."""


@runtime_checkable
class JournaledStore(StateStore, Protocol):
    """A :class:`StateStore` that also keeps a journal of numbered entries, committed in the same transactions
    as the records (a networked backend: one transaction or batch of its own, holding both)."""

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
    and committed in the same transactions (a networked backend: in the same transaction or ordered log)."""

    def put_blob(self, name: str, payload: bytes) -> None:
        """Stage ``payload`` under ``name`` (replacing any earlier one)."""

    def get_blob(self, name: str) -> bytes | None:
        """The payload under ``name`` (staged writes included), None when there is none; verified against its
        checksum (:class:`CorruptRecordError`, naming the blob, on failure)."""


_DELETED = object()


class _Staging:
    """Staged writes shared by the stores: id -> encoded payload (or the deletion marker), journal entries to
    append and the journal truncation point."""

    def __init__(self):
        self.staged: dict[str, object] = {}
        self.staged_journal: list[tuple[int, bytes, str]] = []
        self.staged_truncate: int | None = None
        self.staged_blobs: dict[str, tuple[bytes, str]] = {}

    def put(self, records: Mapping[str, StreamRecord]) -> None:
        if not isinstance(records, Mapping):
            raise ValueError(f"put: 'records' expected a mapping of stream id -> StreamRecord, got "
                             f"{type(records).__name__}")
        encoded = {}
        for sid, record in records.items():
            if not isinstance(sid, str):
                raise ValueError(f"put: stream ids expected strings, got {type(sid).__name__} {sid!r}")
            if not isinstance(record, StreamRecord):
                raise ValueError(f"put: stream {sid!r} expected a StreamRecord, got {type(record).__name__}")
            encoded[sid] = encode(record)
        # everything encoded before anything is staged: a bad record stages nothing
        self.staged.update(encoded)

    def delete(self, stream_ids: Iterable[str]) -> None:
        for sid in check_ids(stream_ids):
            self.staged[sid] = _DELETED

    def append_journal(self, seq: int, payload: bytes) -> None:
        head = self.journal_head()
        if isinstance(seq, bool) or not isinstance(seq, int) or seq <= head:
            raise ValueError(f"append_journal: 'seq' expected an int above the journal head {head}, got {seq!r}")
        if not isinstance(payload, (bytes, bytearray)):
            raise ValueError(f"append_journal: entry {seq} expected bytes, got {type(payload).__name__}")
        self.staged_journal.append((seq, bytes(payload), checksum(payload)))

    def put_blob(self, name: str, payload: bytes) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"put_blob: 'name' expected a non-empty string, got {name!r}")
        if not isinstance(payload, (bytes, bytearray)):
            raise ValueError(f"put_blob: blob {name!r} expected bytes, got {type(payload).__name__}")
        self.staged_blobs[name] = (bytes(payload), checksum(payload))

    def get_blob(self, name: str) -> bytes | None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"get_blob: 'name' expected a non-empty string, got {name!r}")
        row = self.staged_blobs.get(name) or self._committed_blob(name)
        if row is None:
            return None
        payload, digest = row
        if checksum(payload) != digest:
            raise CorruptRecordError(f"blob {name!r}: stored payload fails its checksum")
        return payload

    def truncate_journal(self, through: int) -> None:
        if isinstance(through, bool) or not isinstance(through, int) or through < 0:
            raise ValueError(f"truncate_journal: 'through' expected a non-negative int, got {through!r}")
        self.staged_truncate = max(through, self.staged_truncate or 0)

    def journal_head(self) -> int:
        return max([self._committed_head(), *(seq for seq, _, _ in self.staged_journal)])

    def rollback(self) -> None:
        self.staged.clear()
        self.staged_journal.clear()
        self.staged_truncate = None
        self.staged_blobs.clear()

    def _committed_head(self) -> int:
        raise NotImplementedError

    def _committed_blob(self, name: str) -> tuple[bytes, str] | None:
        raise NotImplementedError

    def _staged_entries(self, after: int) -> Iterator[tuple[int, bytes]]:
        for seq, payload, _ in self.staged_journal:
            if seq > after and (self.staged_truncate is None or seq > self.staged_truncate):
                yield seq, payload


def _verified(seq: int, payload: bytes, digest: str) -> tuple[int, bytes]:
    if checksum(payload) != digest:
        raise CorruptJournalError(f"journal entry {seq}: stored entry fails its checksum")
    return seq, payload


class MemoryStore(_Staging):
    """An in-memory :class:`JournaledStore` and :class:`BlobStore` (tests, ephemeral runs). Records are kept
    encoded, exactly as on disk.

    Example:
        >>> import torch
        >>> store = MemoryStore()
        >>> store.put({"meter-1": StreamRecord({"h": torch.ones(2)}, 1.0, 1, "m")})
        >>> store.commit()
        >>> store.get(["meter-1", "meter-2"])["meter-2"] is None
        True
    """

    durable = False

    def __init__(self):
        super().__init__()
        self.committed: dict[str, bytes] = {}
        self.journal: dict[int, tuple[bytes, str]] = {}
        self.blobs: dict[str, tuple[bytes, str]] = {}
        self.head = 0

    def get(self, stream_ids, fingerprint=None):
        out = {}
        for sid in check_ids(stream_ids):
            payload = self.staged.get(sid, self.committed.get(sid))
            out[sid] = None if payload is None or payload is _DELETED else decode(payload, sid)
            if out[sid] is not None:
                _check_fingerprint(sid, out[sid], fingerprint)
        return out

    def iterate(self):
        return iter(sorted(self.committed))

    def read_journal(self, after: int = 0):
        for seq in sorted(s for s in self.journal if s > after):
            if self.staged_truncate is None or seq > self.staged_truncate:
                yield _verified(seq, *self.journal[seq])
        yield from self._staged_entries(after)

    def commit(self):
        for sid, payload in self.staged.items():
            if payload is _DELETED:
                self.committed.pop(sid, None)
            else:
                self.committed[sid] = payload
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


class SQLiteStore(_Staging):
    """The embedded default :class:`JournaledStore` and :class:`BlobStore`: one SQLite file in WAL mode, one row
    per stream, one row per journal entry, one row per blob.

    Args:
        path: the database file (created if missing).
        synchronous: SQLite's ``synchronous`` setting, ``"NORMAL"`` (survives process crashes) or ``"FULL"``
            (also survives power loss).
        timeout: seconds to wait for a lock held by another connection.

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/state.db"
        >>> store = SQLiteStore(path)
        >>> store.put({"turbine/7": StreamRecord({"h": torch.arange(3.0)}, 10.0, 3, "model-a")})
        >>> store.append_journal(1, b"observations")
        >>> store.commit(); store.close()
        >>> again = SQLiteStore(path)
        >>> again.get(["turbine/7"])["turbine/7"].steps, list(again.read_journal()), again.journal_head()
        (3, [(1, b'observations')], 1)
    """

    durable = True

    def __init__(self, path: str | Path, synchronous: str = "NORMAL", timeout: float = 30.0):
        super().__init__()
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"SQLiteStore: 'synchronous' expected 'NORMAL' or 'FULL', got {synchronous!r}")
        self.path = Path(path)
        self.conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        try:
            mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"SQLiteStore: {self.path} cannot use write-ahead logging (journal mode {mode})")
            self.conn.execute(f"PRAGMA synchronous={synchronous}")
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.conn.execute("CREATE TABLE IF NOT EXISTS streams (stream_id TEXT PRIMARY KEY, payload BLOB NOT NULL, "
                              "checksum TEXT NOT NULL)")
            self.conn.execute("CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL, "
                              "checksum TEXT NOT NULL)")
            self.conn.execute("CREATE TABLE IF NOT EXISTS blobs (name TEXT PRIMARY KEY, payload BLOB NOT NULL, "
                              "checksum TEXT NOT NULL)")
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('journal_head', '0')")
            version = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
            if version in ("1", "2"):
                # version 1 had no journal, version 2 no blobs: the tables above complete them
                self.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
                version = SCHEMA_VERSION
            self.conn.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise StoreError(f"SQLiteStore: {self.path} is not a usable state store ({e})") from None
        if version != SCHEMA_VERSION:
            self.conn.close()
            raise StoreError(f"SQLiteStore: {self.path} has schema version {version}, expected {SCHEMA_VERSION}")

    def get(self, stream_ids, fingerprint=None):
        ids = check_ids(stream_ids)
        out: dict[str, StreamRecord | None] = {}
        missing = []
        for sid in ids:
            if sid in self.staged:
                payload = self.staged[sid]
                out[sid] = None if payload is _DELETED else decode(payload, sid)
            else:
                missing.append(sid)
        rows = {}
        for start in range(0, len(missing), _SQL_BATCH):
            part = missing[start:start + _SQL_BATCH]
            marks = ",".join("?" * len(part))
            rows.update({sid: (payload, digest) for sid, payload, digest in self.conn.execute(
                f"SELECT stream_id, payload, checksum FROM streams WHERE stream_id IN ({marks})", part)})
        for sid in missing:
            if sid not in rows:
                out[sid] = None
                continue
            payload, digest = rows[sid]
            if checksum(payload) != digest:
                raise CorruptRecordError(f"stream {sid!r}: stored record fails its checksum")
            out[sid] = decode(payload, sid)
        for sid in ids:
            if out[sid] is not None:
                _check_fingerprint(sid, out[sid], fingerprint)
        return {sid: out[sid] for sid in ids}

    def iterate(self):
        for (sid,) in self.conn.execute("SELECT stream_id FROM streams ORDER BY stream_id"):
            yield sid

    def read_journal(self, after: int = 0):
        # entries are fetched one at a time (the journal can be large) and each statement is finished before the
        # next, so that a caller may commit between entries
        floor = max(after, self.staged_truncate or 0)
        seqs = [seq for (seq,) in self.conn.execute("SELECT seq FROM journal WHERE seq > ? ORDER BY seq", (floor,))]
        for seq in seqs:
            row = self.conn.execute("SELECT payload, checksum FROM journal WHERE seq = ?", (seq,)).fetchone()
            if row is not None:
                yield _verified(seq, *row)
        yield from self._staged_entries(after)

    def commit(self):
        if not (self.staged or self.staged_journal or self.staged_truncate is not None or self.staged_blobs):
            return
        puts = [(sid, payload, checksum(payload)) for sid, payload in self.staged.items() if payload is not _DELETED]
        deletes = [(sid,) for sid, payload in self.staged.items() if payload is _DELETED]
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("INSERT OR REPLACE INTO streams VALUES (?, ?, ?)", puts)
            self.conn.executemany("DELETE FROM streams WHERE stream_id = ?", deletes)
            if self.staged_journal:
                self.conn.executemany("INSERT INTO journal VALUES (?, ?, ?)", self.staged_journal)
                self.conn.execute("UPDATE meta SET value = ? WHERE key = 'journal_head'",
                                  (str(max(seq for seq, _, _ in self.staged_journal)),))
            if self.staged_truncate is not None:
                self.conn.execute("DELETE FROM journal WHERE seq <= ?", (self.staged_truncate,))
            self.conn.executemany("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?)",
                                  [(name, payload, digest) for name, (payload, digest) in self.staged_blobs.items()])
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        self.rollback()

    def close(self):
        self.rollback()
        self.conn.close()

    def _committed_head(self):
        return int(self.conn.execute("SELECT value FROM meta WHERE key = 'journal_head'").fetchone()[0])

    def _committed_blob(self, name):
        return self.conn.execute("SELECT payload, checksum FROM blobs WHERE name = ?", (name,)).fetchone()

    def __len__(self):
        return self.conn.execute("SELECT COUNT(*) FROM streams").fetchone()[0]
