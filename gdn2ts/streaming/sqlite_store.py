"""The embedded default store: an SQLite index, journal and blobs, with the records in a slab file beside it.

Files for a store at ``state.db``: ``state.db`` (SQLite in WAL mode: the stream index, the journal, the blobs and
the store's model and layout), ``state.db-slab`` (the records, one fixed-size slot each; see
:mod:`gdn2ts.streaming.slab`) and ``state.db-lock`` (the writer lease; see :mod:`gdn2ts.streaming.lease`), plus
SQLite's own ``-wal`` and ``-shm`` files.

A commit writes the new records into free slots of the slab, then commits their index rows (slot, checksum,
steps, last timestamp, journal entry), the journal and the blobs in one SQLite transaction; the slots the index no
longer points to are free from then on. A process killed at any moment leaves every committed index row pointing
at the bytes it was committed with. ``synchronous="NORMAL"`` (the default) survives the death of the process;
``"FULL"`` also syncs the slab and the log at each commit, which survives a power loss.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import sqlite3
from pathlib import Path

import numpy as np

from gdn2ts.streaming.errors import (
    ReadOnlyStoreError,
    StoreError,
)
from gdn2ts.streaming.lease import FileLease
from gdn2ts.streaming.records import RecordLayout, Rows, row_checksums
from gdn2ts.streaming.slab import GROW_MIN, Slab
from gdn2ts.streaming.sqlite_legacy import convert_legacy, has_table
from gdn2ts.streaming.store import StagedStore, verified

__all__ = ["SQLiteStore"]

# 4 moved the records into a slab of fixed-size slots and bound the store to one model; older files (records as
# safetensors rows of the streams table) are converted on their first open for writing
SCHEMA_VERSION = "4"
_SQL_BATCH = 2000  # stream ids per statement (two parameters each)
# an index row of the streams table, as read: the stream's position in the request, slot, steps, last timestamp,
# journal entry, checksum
_META = np.dtype([("pos", np.int64), ("slot", np.int64), ("steps", np.int64), ("last", np.float64),
                  ("seq", np.int64), ("checksum", np.int64)])
_SLOT_CACHE = 1 << 18  # streams whose slot the writer remembers (the streams it read or wrote last)


class SQLiteStore(StagedStore):
    """The embedded default :class:`~gdn2ts.streaming.store.JournaledStore` and
    :class:`~gdn2ts.streaming.store.BlobStore`.

    Args:
        path: the database file (created if missing, unless ``readonly``).
        synchronous: ``"NORMAL"`` (survives process crashes) or ``"FULL"`` (also survives power loss).
        timeout: seconds to wait for SQLite's own locks.
        readonly: open for reading beside a writer (no lease; every write raises ``ReadOnlyStoreError``).

    Opening for writing takes the store's writer lease: a second writer, in this process or another, gets
    :class:`~gdn2ts.streaming.errors.StoreLockedError` naming the holder. Every failure of the database or the
    slab (a directory or a read-only location at the path, a full disk, a damaged file) is a
    :class:`~gdn2ts.streaming.errors.StoreError` naming the path and the cause, and leaves the store as it was.

    Example:
        >>> import tempfile, torch
        >>> from gdn2ts.streaming.records import StreamRecord
        >>> path = tempfile.mkdtemp() + "/state.db"
        >>> store = SQLiteStore(path)
        >>> store.put({"turbine/7": StreamRecord({"h": torch.arange(3.0)[None]}, 10.0, 3, "model-a")})
        >>> store.append_journal(1, b"observations")
        >>> store.commit()
        >>> reader = SQLiteStore(path, readonly=True)
        >>> reader.get(["turbine/7"])["turbine/7"].steps, list(reader.read_journal()), reader.journal_head()
        (3, [(1, b'observations')], 1)
        >>> store.close(); reader.close()
    """

    durable = True

    def __init__(self, path: str | Path, synchronous: str = "NORMAL", timeout: float = 30.0,
                 readonly: bool = False):
        super().__init__(readonly=readonly)
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"SQLiteStore: 'synchronous' expected 'NORMAL' or 'FULL', got {synchronous!r}")
        self.path = Path(path)
        self.what = f"SQLiteStore {self.path}"
        self.synchronous = synchronous
        self.conn: sqlite3.Connection | None = None
        self.slab: Slab | None = None
        self._free = np.zeros(0, dtype=np.int64)
        self._top = 0
        # the committed slot of streams read or written lately: the writer frees a stream's old slot without
        # asking the index (only this writer changes it)
        self._slot_of: dict[str, int] = {}
        try:
            is_dir, is_file = self.path.is_dir(), self.path.is_file()
        except OSError as e:
            raise self._error("open", e) from None
        if is_dir:
            raise StoreError(f"{self.what}: the path is a directory, not a state store file")
        if readonly and not is_file:
            raise StoreError(f"{self.what}: no store at this path to open read-only")
        if not readonly:
            self.lease = FileLease(f"{self.path}-lock", what=self.what)
        try:
            self._open(timeout)
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------------------------------

    def _open(self, timeout: float) -> None:
        try:
            if self.readonly:
                self.conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout,
                                            isolation_level=None)
            else:
                self.conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
                mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StoreError(f"{self.what}: cannot use write-ahead logging (journal mode {mode})")
            self.conn.execute(f"PRAGMA synchronous={self.synchronous}")
            # the index of a million streams is about 100 MB: keep its hot pages (64 MB at most) in memory
            self.conn.execute("PRAGMA cache_size=-65536")
            version = self._schema() if self.readonly else self._create()
        except sqlite3.Error as e:
            raise self._error("open", e) from None
        except OSError as e:
            raise self._error("open", e) from None
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.what} has schema version {version}, expected {SCHEMA_VERSION} (open it for "
                             "writing once to convert it)" if self.readonly and version in ("1", "2", "3") else
                             f"{self.what} has schema version {version}, expected {SCHEMA_VERSION}")
        meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        if "layout" in meta:
            self.model, self.layout = meta["model"], RecordLayout.from_json(meta["layout"])
            self._open_slab()

    def _schema(self) -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise StoreError(f"{self.what} is not a state store (no schema version)")
        return row[0]

    def _create(self) -> str:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            c.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            c.execute("INSERT OR IGNORE INTO meta VALUES ('journal_head', '0')")
            version = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
            if version in ("1", "2", "3") and has_table(c, "streams") and not has_table(c, "legacy_streams"):
                c.execute("ALTER TABLE streams RENAME TO legacy_streams")
                for table in ("journal", "blobs"):
                    if has_table(c, table):
                        c.execute(f"ALTER TABLE {table} RENAME TO legacy_{table}")
            c.execute("CREATE TABLE IF NOT EXISTS streams (stream_id TEXT PRIMARY KEY, slot INTEGER NOT NULL, "
                      "steps INTEGER NOT NULL, last_timestamp REAL NOT NULL, journal_seq INTEGER NOT NULL, "
                      "checksum INTEGER NOT NULL) WITHOUT ROWID")
            c.execute("CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL, "
                      "checksum INTEGER NOT NULL)")
            c.execute("CREATE TABLE IF NOT EXISTS blobs (name TEXT PRIMARY KEY, payload BLOB NOT NULL, "
                      "checksum INTEGER NOT NULL)")
            if version in ("1", "2", "3"):
                convert_legacy(self)
                c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
                version = SCHEMA_VERSION
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        return version

    def _open_slab(self) -> None:
        self.slab = Slab(f"{self.path}-slab", self.layout.nbytes, readonly=self.readonly)
        if self.readonly:
            return
        used = np.fromiter((s for (s,) in self.conn.execute("SELECT slot FROM streams")), dtype=np.int64)
        self._top = max(self.slab.capacity, int(used.max()) + 1 if used.size else 0)
        taken = np.zeros(self._top, dtype=bool)
        taken[used] = True
        self._free = np.flatnonzero(~taken)

    # -- backend hooks ---------------------------------------------------------------------------------------------

    def _bind_committed(self, layout, fingerprint):
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                  [("model", fingerprint), ("layout", layout.spec)])
            self.conn.execute("COMMIT")
        except sqlite3.Error as e:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise self._error("bind", e) from None
        if self.slab is not None:
            self.slab.close()
        self.layout = layout
        self._open_slab()

    def _has_content(self):
        return any(self._query(f"SELECT 1 FROM {t} LIMIT 1") for t in ("streams", "journal", "blobs"))

    def _query(self, sql: str, params=(), op: str = "read") -> list[tuple]:
        """All rows of one statement; a database failure is a :class:`StoreError` naming the store."""
        if self.conn is None:
            raise StoreError(f"{self.what} is closed")
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise self._error(op, e) from None

    def _read_committed(self, ids):
        n = len(ids)
        out = Rows.empty(n, self.layout.nbytes)
        if self.slab is None:  # bound in memory only (a read-only view of an empty store)
            return out
        try:
            meta = self._index(ids)
            if meta.size == 0:
                return out
            bad = meta["pos"][self._fill(out, meta)]
            if bad.size:
                # a writer may have moved these streams to other slots (and reused theirs) after this reader's
                # index snapshot: read what the index says now; a row failing again is corrupt
                before = {int(m["pos"]): m for m in meta[np.isin(meta["pos"], bad)]}
                again = self._index([ids[i] for i in bad.tolist()])
                again["pos"] = bad[again["pos"]]
                moved = again[[tuple(m)[1:] != tuple(before[int(m["pos"])])[1:] for m in again]]
                still = set(again["pos"].tolist())
                retried = moved["pos"][self._fill(out, moved)] if moved.size else np.zeros(0, dtype=np.int64)
                failing = set(retried.tolist()) | (still - set(moved["pos"].tolist()))
                out.failed.update({i: "stored record fails its checksum" for i in sorted(failing)})
            if not self.readonly:
                self._slot_of.update(zip((ids[i] for i in meta["pos"].tolist()), meta["slot"].tolist(),
                                         strict=True))
                self._trim_slot_cache()
        except sqlite3.Error as e:
            raise self._error("read", e) from None
        except OSError as e:
            raise self._error("read the slab", e) from None
        return out

    @contextlib.contextmanager
    def snapshot(self):
        # the writer is the only one changing the store: only a reader needs a read transaction
        if not self.readonly or self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            if self.conn is not None and self.conn.in_transaction:
                self.conn.execute("COMMIT")

    def _index(self, ids: list[str]) -> np.ndarray:
        """The index rows of the known streams among ``ids``, each with its position in ``ids`` (``_META``)."""
        found = []
        for start in range(0, len(ids), _SQL_BATCH):
            part = ids[start:start + _SQL_BATCH]
            pairs = [x for i, sid in enumerate(part, start) for x in (i, sid)]
            found += self.conn.execute(
                f"WITH req(pos, id) AS (VALUES {','.join(['(?, ?)'] * len(part))}) SELECT req.pos, slot, steps, "
                "last_timestamp, journal_seq, checksum FROM req JOIN streams ON stream_id = req.id", pairs).fetchall()
        return np.array(found, dtype=_META)

    def _fill(self, out: Rows, meta: np.ndarray) -> np.ndarray:
        """Read the slots of ``meta`` into rows ``meta["pos"]`` of ``out``; returns the indices (into ``meta``)
        whose checksum fails (left not found, zeroed)."""
        at = meta["pos"]
        self.slab.read(meta["slot"], out.data, at)
        good = row_checksums(out.data, at) == meta["checksum"]
        ok = at[good]
        out.found[ok] = True
        out.steps[ok] = meta["steps"][good]
        out.last_timestamp[ok] = meta["last"][good]
        out.journal_seq[ok] = meta["seq"][good]
        out.data[at[~good]] = 0
        return np.flatnonzero(~good)

    def _committed_head(self):
        return int(self._query("SELECT value FROM meta WHERE key = 'journal_head'")[0][0])

    def _committed_blob(self, name):
        rows = self._query("SELECT payload, checksum FROM blobs WHERE name = ?", (name,))
        return None if not rows else (rows[0][0], int(rows[0][1]))

    # -- the rest of the protocol ----------------------------------------------------------------------------------

    def iterate(self):
        for (sid,) in self._query("SELECT stream_id FROM streams ORDER BY stream_id"):
            yield sid

    def read_journal(self, after: int = 0):
        # entries are fetched one at a time (the journal can be large) and each statement is finished before the
        # next, so that a caller may commit between entries
        floor = max(after, self.staged_truncate or 0)
        seqs = [seq for (seq,) in self._query("SELECT seq FROM journal WHERE seq > ? ORDER BY seq", (floor,))]
        for seq in seqs:
            rows = self._query("SELECT payload, checksum FROM journal WHERE seq = ?", (seq,), "read the journal")
            if rows:
                yield verified(seq, rows[0][0], int(rows[0][1]))
        yield from self._staged_entries(after)

    def commit(self):
        if not self._has_staged():
            return
        if self.readonly:
            raise ReadOnlyStoreError(f"{self.what} is open read-only: commit is refused")
        ids, rows, deletes = self._staged_rows()
        c = self.conn
        new = self._allocate(len(ids))
        freed = np.zeros(0, dtype=np.int64)
        try:
            if ids:
                self.slab.write(new, rows.data)
            sums = row_checksums(rows.data) if ids else np.zeros(0, dtype=np.int64)
            if self.synchronous == "FULL" and ids:
                self.slab.sync()
            c.execute("BEGIN IMMEDIATE")
            old = self._old_slots(ids + deletes)
            c.executemany("INSERT OR REPLACE INTO streams VALUES (?, ?, ?, ?, ?, ?)",
                          zip(ids, new.tolist(), rows.steps.tolist(), rows.last_timestamp.tolist(),
                              rows.journal_seq.tolist(), sums.tolist(), strict=True))
            c.executemany("DELETE FROM streams WHERE stream_id = ?", [(sid,) for sid in deletes])
            if self.staged_journal:
                c.executemany("INSERT INTO journal VALUES (?, ?, ?)", self.staged_journal)
                c.execute("UPDATE meta SET value = ? WHERE key = 'journal_head'",
                          (str(max(seq for seq, _, _ in self.staged_journal)),))
            if self.staged_truncate is not None:
                c.execute("DELETE FROM journal WHERE seq <= ?", (self.staged_truncate,))
            c.executemany("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?)",
                          [(name, payload, digest) for name, (payload, digest) in self.staged_blobs.items()])
            c.execute("COMMIT")
            freed = old
        except BaseException as e:
            with contextlib.suppress(sqlite3.Error):  # a connection that is gone has nothing to roll back
                if c.in_transaction:
                    c.execute("ROLLBACK")
            # the slots written for this commit were never referenced: free again
            self._free = np.concatenate([new, self._free])
            if isinstance(e, (sqlite3.Error, OSError)):
                raise self._error("commit", e) from None
            raise
        self._free = np.concatenate([self._free, freed])
        self._slot_of.update(zip(ids, new.tolist(), strict=True))
        for sid in deletes:
            self._slot_of.pop(sid, None)
        self._trim_slot_cache()
        self.rollback()

    def _allocate(self, n: int) -> np.ndarray:
        """``n`` free slots (new ones past the top when too few are free). The longest free first: a slot freed now
        is taken again only after the others, which gives a reader that looked up the old slot just before time to
        read it."""
        take = self._free[:n]
        self._free = self._free[n:]
        if take.size < n:
            # grow by a margin, as the slab's file does, so that freed slots wait behind the new ones
            more = np.arange(self._top, self._top + max(n - take.size, GROW_MIN, self._top // 4), dtype=np.int64)
            self._top += more.size
            need = n - take.size
            take, self._free = np.concatenate([take, more[:need]]), np.concatenate([self._free, more[need:]])
        return take

    def _old_slots(self, ids: list[str]) -> np.ndarray:
        """The committed slots of the known streams among ``ids`` (remembered, or read from the index)."""
        known = [self._slot_of[sid] for sid in ids if sid in self._slot_of]
        rest = [sid for sid in ids if sid not in self._slot_of]
        for start in range(0, len(rest), _SQL_BATCH):
            part = rest[start:start + _SQL_BATCH]
            known += [s for (s,) in self.conn.execute(
                f"SELECT slot FROM streams WHERE stream_id IN ({','.join('?' * len(part))})", part)]
        return np.array(known, dtype=np.int64)

    def _trim_slot_cache(self) -> None:
        if len(self._slot_of) > _SLOT_CACHE:
            # forget the older half (insertion order)
            for sid in list(itertools.islice(self._slot_of, len(self._slot_of) - _SLOT_CACHE // 2)):
                del self._slot_of[sid]

    def close(self):
        self.rollback()
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.slab is not None:
            self.slab.close()
            self.slab = None
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def __len__(self):
        return self._query("SELECT COUNT(*) FROM streams")[0][0]

    # -- errors and old files --------------------------------------------------------------------------------------

    def _error(self, op: str, e: Exception) -> StoreError:
        """A :class:`StoreError` naming the store, the operation and the cause."""
        text = str(e)
        code = getattr(e, "errno", None)
        if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or "disk is full" in text:
            cause = f"disk full ({text})"
        elif code in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in text or "read-only" in text:
            cause = f"read-only location ({text})"
        elif self.path.is_dir():
            cause = "the path is a directory"
        elif "unable to open" in text:
            cause = f"cannot open the file ({text}; is its folder missing or read-only?)"
        elif isinstance(e, sqlite3.DatabaseError) and "not a database" in text:
            cause = f"not a usable state store ({text})"
        else:
            cause = f"{type(e).__name__}: {text}"
        return StoreError(f"{self.what}: {op} failed: {cause}")

    def _bind_in_transaction(self, layout: RecordLayout, fingerprint: str) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                              [("model", fingerprint), ("layout", layout.spec)])
        self.model, self.layout = fingerprint, layout
        self._open_slab()
