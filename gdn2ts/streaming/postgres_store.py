"""A state store in PostgreSQL (psycopg 3): the same protocol, journal and blobs as the embedded store, for
runners that keep their streams' states in a database server.

A store is one PostgreSQL schema (``name``, default ``gdn2ts``) of a database: several stores (the shards of a
fleet, one per runner) share a database, each under its own name. Its tables:

- ``meta``: one row: ``schema_version``, ``journal_head`` (the highest journal entry ever appended), ``model`` (the
  fingerprint of the model the store belongs to) and ``layout`` (its record layout, JSON).
- ``streams``: a row per stream: ``stream_id`` (the id's UTF-8 bytes, ``bytea``: a ``text`` column cannot hold the
  NUL character that a stream id may contain), ``record`` (the record's bytes in the store's layout), ``steps``,
  ``last_timestamp`` (``double precision``, ``-Infinity`` before the first observation), ``journal_seq`` and
  ``checksum`` (64-bit XXH3 of ``record``, verified on every read).
- ``journal`` (``seq``, ``payload``, ``checksum``) and ``blobs`` (``name``, ``payload``, ``checksum``).
- ``lease``: who holds the writer lease (pid, host, since, and the server process of its connection).

Every commit is one transaction: records, deletions, journal appends and truncation, blobs and the journal head.
Stream ids are always bound as parameters (never part of the SQL); the store's name is checked to be a plain
identifier and quoted. The writer lease is a session-level advisory lock (``pg_try_advisory_lock``) on the store's
connection, keyed on the store's name, so that the lease and the writes travel on the same connection: when the
connection dies, the server rolls back the transaction in flight and releases the lock, and this store object
refuses every further call (open the store again).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket

import numpy as np
import xxhash

try:  # the optional extra: pip install -e ".[postgres]"
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict
except ImportError:
    psycopg = None

from gdn2ts.streaming.errors import ReadOnlyStoreError, StoreError, StoreLockedError
from gdn2ts.streaming.records import RecordLayout, Rows, row_checksums
from gdn2ts.streaming.store import StagedStore, verified

__all__ = ["PostgresStore", "AdvisoryLease", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
_BATCH = 8192  # stream ids per statement (bound as one array parameter)
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_TABLES = """
CREATE TABLE IF NOT EXISTS {s}.meta (
    one boolean PRIMARY KEY DEFAULT true CHECK (one), schema_version integer NOT NULL,
    journal_head bigint NOT NULL DEFAULT 0, model text, layout text);
CREATE TABLE IF NOT EXISTS {s}.streams (
    stream_id bytea PRIMARY KEY, record bytea NOT NULL, steps bigint NOT NULL,
    last_timestamp double precision NOT NULL, journal_seq bigint NOT NULL, checksum bigint NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.journal (seq bigint PRIMARY KEY, payload bytea NOT NULL, checksum bigint NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.blobs (name text PRIMARY KEY, payload bytea NOT NULL, checksum bigint NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.lease (
    one boolean PRIMARY KEY DEFAULT true CHECK (one), pid integer, host text, since text, backend_pid integer);
-- records and entries are dense numbers: stored out of line as they are, never run through compression
ALTER TABLE {s}.streams ALTER COLUMN record SET STORAGE EXTERNAL;
ALTER TABLE {s}.journal ALTER COLUMN payload SET STORAGE EXTERNAL;
"""


def _key(name: str) -> int:
    """The advisory lock key of a store (per database): a stable 64-bit hash of its name, as a signed bigint."""
    return int(np.array(xxhash.xxh3_64_intdigest(f"gdn2ts.store:{name}".encode()), dtype=np.uint64).view(np.int64))


def _encode(sid: str) -> bytes:
    return sid.encode("utf-8", "surrogatepass")


class AdvisoryLease:
    """The writer lease of a :class:`PostgresStore`: a session-level advisory lock held by the store's connection
    (the server releases it when that connection ends, however the process ends)."""

    def __init__(self, conn: psycopg.Connection, key: int, holder: dict):
        self.conn, self.key, self.holder = conn, key, holder

    def release(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and not conn.closed and not conn.broken:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))


class PostgresStore(StagedStore):
    """A :class:`~gdn2ts.streaming.store.JournaledStore` and :class:`~gdn2ts.streaming.store.BlobStore` in a
    PostgreSQL database.

    Args:
        dsn: a libpq connection string or URI (``"host=/run/postgresql dbname=fleet"``,
            ``"postgresql://user@db.example:5432/fleet"``); the password, if any, never appears in an error.
        name: the store, a PostgreSQL schema of that database (lower-case letters, digits and ``_``, at most 63):
            stores of different names are independent.
        readonly: read beside a writer (no lease; every write raises ``ReadOnlyStoreError``; the store must exist).
        connect_timeout: seconds to wait for the server.

    Opening for writing creates the store if it is missing and takes its writer lease; a second writer, in this
    process or another, gets :class:`~gdn2ts.streaming.errors.StoreLockedError` naming the holder. Every failure of
    the server or the connection is a :class:`~gdn2ts.streaming.errors.StoreError` naming the store and the cause,
    and leaves the store as it was; after a lost connection the store refuses every call (the lease went with the
    connection): open it again.

    Example:
        >>> import os, torch
        >>> from gdn2ts.streaming.records import StreamRecord
        >>> dsn = os.environ.get("GDN2TS_POSTGRES_DSN")
        >>> if dsn:  # a server to try it on (see docs/streaming-postgres.md)
        ...     store = PostgresStore(dsn, name="doc_example")
        ...     store.put({"turbine/7": StreamRecord({"h": torch.arange(3.0)[None]}, 10.0, 3, "model-a")})
        ...     store.append_journal(store.journal_head() + 1, b"observations")
        ...     store.commit()
        ...     reader = PostgresStore(dsn, name="doc_example", readonly=True)
        ...     assert reader.get(["turbine/7"])["turbine/7"].steps == 3
        ...     reader.close(); store.close()
        ...     PostgresStore.drop(dsn, "doc_example")
    """

    durable = True

    def __init__(self, dsn: str, name: str = "gdn2ts", readonly: bool = False, connect_timeout: float = 10.0):
        super().__init__(readonly=readonly)
        if psycopg is None:
            raise ImportError("PostgresStore needs psycopg 3, the optional extra: pip install -e '.[postgres]'")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"PostgresStore: 'name' expected a schema name of lower-case letters, digits and '_' "
                             f"(at most 63, not starting with a digit), got {name!r}")
        self.name = name
        self.conn: psycopg.Connection | None = None
        self._lost = False
        self._head: int | None = None
        self._in_snapshot = False
        self._s = sql.Identifier(name)
        try:
            info = conninfo_to_dict(dsn)
        except (psycopg.Error, TypeError) as e:
            raise StoreError(f"PostgresStore {name!r}: cannot read the connection string "
                             f"({type(e).__name__}: {_first_line(e)})") from None
        self._secret = info.get("password") or None
        host = info.get("host") or os.environ.get("PGHOST") or "the default socket"
        where = f"{host}:{info.get('port') or os.environ.get('PGPORT') or 5432}/{info.get('dbname') or '?'}"
        self.what = f"PostgresStore {name!r} at {where}"
        try:
            self.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, round(connect_timeout)),
                                        application_name=f"gdn2ts store {name}")
            self.what = f"PostgresStore {name!r} at {self.conn.info.host}:{self.conn.info.port}/" \
                        f"{self.conn.info.dbname}"
            if readonly:
                self.conn.execute("SET default_transaction_read_only = on")
                self._open_readonly()
            else:
                self._open_writer()
        except psycopg.Error as e:
            error = self._error("open", e)
            self.close()
            raise error from None
        except BaseException:
            self.close()
            raise

    @classmethod
    def drop(cls, dsn: str, name: str, connect_timeout: float = 10.0) -> None:
        """Remove the store ``name`` and everything it holds (its schema), as its writer: a store another writer
        holds raises :class:`~gdn2ts.streaming.errors.StoreLockedError`, a schema that is not a store
        :class:`~gdn2ts.streaming.errors.StoreError`; both are left as they were."""
        store = cls(dsn, name, connect_timeout=connect_timeout)
        try:
            def drop(c):
                with c.transaction():
                    # a reader in the middle of a snapshot holds the tables for as long as it reads
                    c.execute("SET LOCAL lock_timeout = '30s'")
                    c.execute(store._sql("DROP SCHEMA {s} CASCADE"))

            store._run("drop", drop)
        finally:
            store.close()

    # -- opening ---------------------------------------------------------------------------------------------------

    def _open_writer(self) -> None:
        key = _key(self.name)
        if not self.conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
            holder = self._holder(key)
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}, server process "
                   f"{holder.get('backend_pid')}" if holder else "a writer that has just let go")
            raise StoreLockedError(f"{self.what} is held by another writer ({who}); one writer per store: close it "
                                   "first, or open this store read-only", holder)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "backend_pid": self.conn.info.backend_pid}
        self.lease = AdvisoryLease(self.conn, key, holder)
        # a server that loses sight of this host drops the connection, and with it the lease, within about a minute
        # (ignored on unix sockets)
        self.conn.execute("SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; "
                          "SET tcp_keepalives_count = 3")
        with self.conn.transaction():
            exists = self._exists()
            if exists is False:
                raise StoreError(f"{self.what}: schema {self.name!r} holds tables but no state store: choose "
                                 "another name")
            if exists is None:
                self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {s}").format(s=self._s))
            self.conn.execute(sql.SQL(_TABLES).format(s=self._s))
            self.conn.execute(self._sql("INSERT INTO {s}.meta (schema_version) VALUES (%s) ON CONFLICT DO NOTHING"),
                              (SCHEMA_VERSION,))
            self.conn.execute(self._sql("INSERT INTO {s}.lease VALUES (true, %s, %s, %s, %s) ON CONFLICT (one) DO "
                                        "UPDATE SET pid = EXCLUDED.pid, host = EXCLUDED.host, since = "
                                        "EXCLUDED.since, backend_pid = EXCLUDED.backend_pid"),
                              (holder["pid"], holder["host"], holder["since"], holder["backend_pid"]))
        self._read_meta()

    def _open_readonly(self) -> None:
        if not self._exists():
            raise StoreError(f"{self.what}: no store of this name to open read-only")
        self._read_meta()

    def _exists(self) -> bool | None:
        """True: the schema holds a store; False: it holds other tables; None: no such schema, or an empty one."""
        tables = {t for (t,) in self.conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (self.name,))}
        return ("meta" in tables) if tables else None

    def _read_meta(self) -> None:
        rows = self.conn.execute(self._sql("SELECT schema_version, journal_head, model, layout FROM {s}.meta")
                                 ).fetchall()
        if not rows:
            raise StoreError(f"{self.what} is not a state store (no schema version)")
        version, head, model, layout = rows[0]
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.what} has schema version {version}, expected {SCHEMA_VERSION}")
        if not self.readonly:
            self._head = int(head)
        if layout is not None:
            self.model, self.layout = model, RecordLayout.from_json(layout)

    def _holder(self, key: int) -> dict:
        """Who holds the lease: the note the holder wrote, when it was written by the connection holding the lock;
        else what the server knows of that connection."""
        rows = self.conn.execute(
            "SELECT l.pid, a.client_hostname, a.client_addr::text, a.backend_start FROM pg_locks l "
            "LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 1",
            ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)).fetchall()
        if not rows:
            return {}
        backend, hostname, addr, start = rows[0]
        if self._exists():
            note = self.conn.execute(self._sql("SELECT pid, host, since FROM {s}.lease WHERE backend_pid = %s"),
                                     (backend,)).fetchall()
            if note:
                return {"pid": note[0][0], "host": note[0][1], "since": note[0][2], "backend_pid": backend}
        return {"pid": None, "host": hostname or addr or "local socket",
                "since": start.isoformat(timespec="seconds") if start else None, "backend_pid": backend}

    # -- backend hooks ---------------------------------------------------------------------------------------------

    def _bind_committed(self, layout, fingerprint):
        self._run("bind", lambda c: c.execute(self._sql("UPDATE {s}.meta SET model = %s, layout = %s"),
                                              (fingerprint, layout.spec)))

    def _has_content(self):
        return self._run("read", lambda c: c.execute(self._sql(
            "SELECT EXISTS (SELECT 1 FROM {s}.streams) OR EXISTS (SELECT 1 FROM {s}.journal) "
            "OR EXISTS (SELECT 1 FROM {s}.blobs)")).fetchone()[0])

    def _read_committed(self, ids):
        n, nbytes = len(ids), self.layout.nbytes
        out = Rows.empty(n, nbytes)
        query = self._sql("SELECT req.pos, s.record, s.steps, s.last_timestamp, s.journal_seq, s.checksum "
                          "FROM unnest(%b::bytea[]) WITH ORDINALITY AS req(id, pos) "
                          "JOIN {s}.streams s ON s.stream_id = req.id")
        found = []
        for start in range(0, n, _BATCH):
            part = [_encode(sid) for sid in ids[start:start + _BATCH]]
            rows = self._run("read", lambda c, part=part: c.cursor(binary=True).execute(query, (part,)).fetchall())
            found += [(start + pos - 1, *rest) for pos, *rest in rows]
        if not found:
            return out
        pos, records, steps, last, seq, sums = zip(*found, strict=True)
        at = np.array(pos, dtype=np.int64)
        size = np.array([len(r) for r in records])
        whole = size == nbytes
        for i in np.flatnonzero(~whole).tolist():
            out.failed[pos[i]] = f"stored record has {size[i]} bytes, the store's layout {nbytes}"
        keep = np.flatnonzero(whole)
        if keep.size:
            out.data[at[keep]] = np.frombuffer(b"".join(records[i] for i in keep.tolist()),
                                               dtype=np.uint8).reshape(-1, nbytes)
            good = row_checksums(out.data, at[keep]) == np.array(sums, dtype=np.int64)[keep]
            ok, bad = keep[good], keep[~good]
            out.data[at[bad]] = 0
            out.failed.update({int(at[i]): "stored record fails its checksum" for i in bad.tolist()})
            out.found[at[ok]] = True
            out.steps[at[ok]] = np.array(steps, dtype=np.int64)[ok]
            out.last_timestamp[at[ok]] = np.array(last, dtype=np.float64)[ok]
            out.journal_seq[at[ok]] = np.array(seq, dtype=np.int64)[ok]
        return out

    def _committed_head(self):
        if self._head is not None:  # the writer: only it moves the head
            return self._head
        return int(self._run("read", lambda c: c.execute(self._sql("SELECT journal_head FROM {s}.meta")
                                                         ).fetchone()[0]))

    def _committed_blob(self, name):
        rows = self._run("read", lambda c: c.execute(self._sql("SELECT payload, checksum FROM {s}.blobs WHERE "
                                                               "name = %s"), (name,)).fetchall())
        return None if not rows else (bytes(rows[0][0]), int(rows[0][1]))

    # -- the rest of the protocol ----------------------------------------------------------------------------------

    def iterate(self):
        rows = self._run("read", lambda c: c.execute(self._sql("SELECT stream_id FROM {s}.streams ORDER BY "
                                                               "stream_id")).fetchall())
        # bytewise order of UTF-8 is the code points' order: Python's sorted order of the ids
        for (sid,) in rows:
            yield bytes(sid).decode("utf-8", "surrogatepass")

    def read_journal(self, after: int = 0):
        # entries are fetched one at a time (the journal can be large), so that a caller may commit between them
        floor = max(after, self.staged_truncate or 0)
        seqs = self._run("read the journal", lambda c: c.execute(self._sql(
            "SELECT seq FROM {s}.journal WHERE seq > %s ORDER BY seq"), (floor,)).fetchall())
        for (seq,) in seqs:
            rows = self._run("read the journal", lambda c, seq=seq: c.execute(self._sql(
                "SELECT payload, checksum FROM {s}.journal WHERE seq = %s"), (seq,)).fetchall())
            if rows:
                yield verified(seq, bytes(rows[0][0]), int(rows[0][1]))
        yield from self._staged_entries(after)

    def commit(self):
        if not self._has_staged():
            return
        if self.readonly:
            raise ReadOnlyStoreError(f"{self.what} is open read-only: commit is refused")
        ids, rows, deletes = self._staged_rows()
        sums = row_checksums(rows.data).tolist() if ids else []
        head = max([seq for seq, _, _ in self.staged_journal], default=0)

        def write(c: psycopg.Connection) -> None:
            with c.transaction():
                for start in range(0, len(ids), _BATCH):
                    end = min(start + _BATCH, len(ids))
                    c.execute(self._sql(
                        "INSERT INTO {s}.streams SELECT * FROM unnest(%b::bytea[], %b::bytea[], %b::int8[], "
                        "%b::float8[], %b::int8[], %b::int8[]) ON CONFLICT (stream_id) DO UPDATE SET "
                        "record = EXCLUDED.record, steps = EXCLUDED.steps, last_timestamp = EXCLUDED.last_timestamp, "
                        "journal_seq = EXCLUDED.journal_seq, checksum = EXCLUDED.checksum"),
                        ([_encode(sid) for sid in ids[start:end]], [r.tobytes() for r in rows.data[start:end]],
                         rows.steps[start:end].tolist(), rows.last_timestamp[start:end].tolist(),
                         rows.journal_seq[start:end].tolist(), sums[start:end]))
                for start in range(0, len(deletes), _BATCH):
                    c.execute(self._sql("DELETE FROM {s}.streams WHERE stream_id = ANY(%b::bytea[])"),
                              ([_encode(sid) for sid in deletes[start:start + _BATCH]],))
                for seq, payload, digest in self.staged_journal:
                    c.execute(self._sql("INSERT INTO {s}.journal VALUES (%s, %b, %s)"), (seq, payload, digest))
                if self.staged_truncate is not None:
                    c.execute(self._sql("DELETE FROM {s}.journal WHERE seq <= %s"), (self.staged_truncate,))
                for name, (payload, digest) in self.staged_blobs.items():
                    c.execute(self._sql("INSERT INTO {s}.blobs VALUES (%s, %b, %s) ON CONFLICT (name) DO UPDATE "
                                        "SET payload = EXCLUDED.payload, checksum = EXCLUDED.checksum"),
                              (name, payload, digest))
                if head:
                    c.execute(self._sql("UPDATE {s}.meta SET journal_head = greatest(journal_head, %s)"), (head,))

        self._run("commit", write)
        if head:
            self._head = max(self._head or 0, head)
        self.rollback()

    @contextlib.contextmanager
    def snapshot(self):
        """A read-only store's reads inside see one committed state of the store (a repeatable-read transaction);
        the writer's own reads are consistent already."""
        if not self.readonly or self._in_snapshot:
            yield
            return
        self._run("snapshot", lambda c: c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        self._in_snapshot = True
        try:
            yield
        finally:
            self._in_snapshot = False
            if self.conn is not None and not self.conn.broken:
                with contextlib.suppress(psycopg.Error):
                    self.conn.execute("COMMIT")

    def close(self):
        self.rollback()
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __len__(self):
        return int(self._run("read", lambda c: c.execute(self._sql("SELECT count(*) FROM {s}.streams")
                                                         ).fetchone()[0]))

    # -- statements and errors -------------------------------------------------------------------------------------

    def _sql(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(s=self._s)

    def _run(self, op: str, work):
        """``work(connection)``; a failure of the server or the connection is a :class:`StoreError` naming the store,
        the operation and the cause."""
        if self.conn is None:
            raise StoreError(f"{self.what} is closed")
        if self._lost:
            raise StoreError(f"{self.what}: {op} refused: the connection to the server was lost earlier, and the "
                             "writer lease with it: open the store again")
        try:
            return work(self.conn)
        except psycopg.Error as e:
            raise self._error(op, e) from None

    def _error(self, op: str, e: psycopg.Error) -> StoreError:
        """A :class:`StoreError` naming the store, the operation and the cause (the password never appears)."""
        text = _first_line(e)
        state = getattr(e, "sqlstate", None) or ""
        if self.conn is not None and (self.conn.broken or self.conn.closed):
            self._lost = True
            if self.lease is not None:
                self.lease.conn = None
            cause = (f"the connection to the server was lost ({text}); the server rolls back what it had not "
                     "committed, and the writer lease went with the connection: open the store again")
        elif isinstance(e, psycopg.OperationalError) and self.conn is None:
            cause = f"cannot connect ({text})"
        elif state == "53100":
            cause = f"disk full ({text})"
        elif state == "25006":
            cause = f"read-only ({text})"
        elif state == "42501":
            cause = f"permission denied ({text})"
        else:
            cause = f"{type(e).__name__}: {text}"
        if self._secret:
            cause = cause.replace(self._secret, "***")
        return StoreError(f"{self.what}: {op} failed: {cause}")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
