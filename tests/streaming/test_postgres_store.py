"""The PostgreSQL store against a real server: one writer per store across processes (a killed holder's lease goes
to the next writer), read-only views beside the writer, a connection lost in the middle of a commit, stores that
share a database, and bad input and server failures that leave the store as it was (hashed before and after).

Skipped without a server (the reason says how to start one); CI runs them (GDN2TS_REQUIRE_POSTGRES=1)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import polars as pl
import pytest
import torch

from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.streaming import (
    CorruptJournalError,
    CorruptRecordError,
    FingerprintMismatchError,
    MemoryStore,
    OnlineRunner,
    ReadOnlyStoreError,
    StoreError,
    StoreLockedError,
    StreamRecord,
)

CHANNELS = ["a", "b"]


@pytest.fixture(autouse=True)
def one_thread():
    """The writer process steps with one thread: the same arithmetic here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def encoder(seed: int = 0) -> StreamEncoder:
    torch.manual_seed(seed)
    return StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, n_layers=2, num_heads=2, head_dim=8, horizon=2))


def batch(t: int, n_streams: int = 5) -> pl.DataFrame:
    rng = np.random.default_rng(t)
    return pl.DataFrame({"stream": [f"s{i}" for i in range(n_streams)], "time": t + rng.uniform(0, 0.5, n_streams),
                         "a": rng.standard_normal(n_streams), "b": rng.standard_normal(n_streams)})


def record(seed: int, fingerprint: str = "m") -> StreamRecord:
    gen = torch.Generator().manual_seed(seed)
    return StreamRecord({"h": torch.randn(1, 64, generator=gen)}, float(seed), seed, fingerprint)


def reference(calls: int) -> OnlineRunner:
    runner = OnlineRunner(encoder(), MemoryStore(), CHANNELS)
    for t in range(calls):
        runner.observe(batch(t))
    return runner


def open_when_free(postgres, name: str, seconds: float = 10.0):
    """A writer of ``name``, once the server has let go of the last holder's lease."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return postgres.store(name)
        except StoreLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


WRITER = textwrap.dedent("""
    import sys, numpy as np, polars as pl, torch
    from gdn2ts.models import EncoderConfig, StreamEncoder
    from gdn2ts.streaming import OnlineRunner
    from gdn2ts.streaming.postgres_store import PostgresStore
    torch.set_num_threads(1)
    torch.manual_seed(0)
    enc = StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, n_layers=2, num_heads=2, head_dim=8, horizon=2))
    runner = OnlineRunner(enc, PostgresStore(sys.argv[1], name=sys.argv[2]), ["a", "b"])
    for t in range(3):
        rng = np.random.default_rng(t)
        runner.observe(pl.DataFrame({"stream": [f"s{i}" for i in range(5)], "time": t + rng.uniform(0, 0.5, 5),
                                     "a": rng.standard_normal(5), "b": rng.standard_normal(5)}))
    print("ready", flush=True)
    sys.stdin.readline()
""")


def test_one_writer_across_processes_and_a_killed_holder(postgres):
    """A second writer is refused naming the holder; a read-only view beside it sees what it applied and changes
    nothing; the holder killed with SIGKILL, the server releases its lease and the next writer continues with every
    acknowledged call (replayed from the journal)."""
    name = postgres.name()
    want = reference(3).forecast(["s0", "s4"])
    proc = subprocess.Popen([sys.executable, "-c", WRITER, postgres.dsn, name], text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "ready"
        before = postgres.digest(name)
        with pytest.raises(StoreLockedError, match=rf"'{name}' at .* is held by another writer \(pid {proc.pid} "
                                                   rf"on {socket.gethostname()} since ") as info:
            postgres.store(name)
        assert info.value.holder["pid"] == proc.pid and info.value.holder["since"]
        view = OnlineRunner(encoder(), postgres.store(name, readonly=True), CHANNELS)
        assert view.info(["s0", "s4"])["steps"].to_list() == [3, 3]
        assert view.forecast(["s0", "s4"]).equals(want)
        assert view.stream_ids() == [f"s{i}" for i in range(5)]
        with pytest.raises(ReadOnlyStoreError, match="observe is refused: the store is open read-only"):
            view.observe(batch(10))
        view.close()
        assert postgres.digest(name) == before
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with OnlineRunner(encoder(), open_when_free(postgres, name), CHANNELS) as again:
        assert again.info(["s0", "s4"])["steps"].to_list() == [3, 3]
        assert again.forecast(["s0", "s4"]).equals(want)


def test_a_second_writer_in_this_process_and_read_only_opens(postgres):
    name = postgres.name()
    first = postgres.store(name)
    assert first.lease.holder["pid"] == os.getpid() and first.durable
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
        postgres.store(name)
    reader = postgres.store(name, readonly=True)
    assert reader.lease is None
    for write in (lambda: reader.put({"x": record(1)}), lambda: reader.delete(["x"]),
                  lambda: reader.append_journal(1, b"x"), lambda: reader.put_blob("w", b"x")):
        with pytest.raises(ReadOnlyStoreError, match="is open read-only"):
            write()
    first.close()
    first.close()  # closing again does nothing
    postgres.store(name).close()
    reader.close()
    with pytest.raises(StoreError, match="no store of this name to open read-only"):
        postgres.store(postgres.name(), readonly=True)


def test_read_only_snapshots_see_one_committed_state(postgres):
    name = postgres.name()
    writer = postgres.store(name)
    writer.put({"a": record(1)})
    writer.append_journal(1, b"first")
    writer.commit()
    reader = postgres.store(name, readonly=True)
    writer.put({"a": record(2), "b": record(3)})
    assert reader.get(["a", "b"])["b"] is None  # staged writes stay the writer's until commit
    with reader.snapshot():
        assert reader.get(["a"])["a"].steps == 1  # the snapshot starts here
        writer.append_journal(2, b"second")
        writer.commit()
        assert reader.get(["a", "b"])["a"].steps == 1 and reader.get(["b"])["b"] is None
        assert list(reader.read_journal()) == [(1, b"first")] and reader.journal_head() == 1
    got = reader.get(["a", "b"])
    assert got["a"].steps == 2 and got["b"].steps == 3
    assert list(reader.read_journal()) == [(1, b"first"), (2, b"second")] and reader.journal_head() == 2
    reader.close()
    writer.close()


def block_until_waiting(con, backend_pid: int) -> None:
    """Wait until the server process ``backend_pid`` waits on a lock."""
    for _ in range(400):
        row = con.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (backend_pid,)).fetchone()
        if row and row[0] == "Lock":
            return
        time.sleep(0.025)
    raise AssertionError(f"server process {backend_pid} never waited on the lock")


def commit_in_thread(store) -> dict:
    out = {}

    def run():
        try:
            store.commit()
        except StoreError as e:
            out["error"] = e

    out["thread"] = threading.Thread(target=run)
    out["thread"].start()
    return out


def test_a_connection_lost_in_the_middle_of_a_commit_leaves_the_store_as_it_was(postgres):
    """The commit writes its records, then waits on a row lock this test holds on the store's meta row (its last
    statement moves the journal head); the test terminates the commit's server process. The store is as it was,
    the store object refuses further calls, and a new writer opens at once (the lease went with the connection)."""
    name = postgres.name()
    store = postgres.store(name)
    store.put({f"k{i}": record(i) for i in range(20)})
    store.append_journal(1, b"entry one")
    store.commit()
    before = postgres.digest(name)
    with postgres.connect() as blocker:
        blocker.execute("BEGIN")
        blocker.execute(f"SELECT * FROM {name}.meta FOR UPDATE")
        store.put({f"k{i}": record(100 + i) for i in range(20)} | {"new": record(7)})
        store.delete(["k3"])
        store.append_journal(2, b"entry two")
        store.truncate_journal(1)
        store.put_blob("weights", b"w")
        pending = commit_in_thread(store)
        block_until_waiting(blocker, store.conn.info.backend_pid)
        assert blocker.execute("SELECT pg_terminate_backend(%s, 10000)", (store.conn.info.backend_pid,)).fetchone()[0]
        pending["thread"].join(30)
        blocker.execute("ROLLBACK")
    assert str(pending["error"]).startswith(f"PostgresStore '{name}' at ")
    assert "commit failed: the connection to the server was lost" in str(pending["error"])
    assert postgres.digest(name) == before
    for call in (lambda: store.get(["k1", "unknown"]), store.commit):  # the staged writes are kept, unwritable
        with pytest.raises(StoreError, match="refused: the connection to the server was lost earlier"):
            call()
    store.close()
    again = postgres.store(name)
    got = again.get(["k1", "k3", "new"])
    assert got["k1"].steps == 1 and got["k3"].steps == 3 and got["new"] is None
    assert list(again.read_journal()) == [(1, b"entry one")] and again.get_blob("weights") is None
    again.close()


def test_a_runner_whose_connection_dies_mid_call_recovers_every_acknowledged_call(postgres):
    name = postgres.name()
    runner = OnlineRunner(encoder(), postgres.store(name), CHANNELS)
    for t in range(3):
        runner.observe(batch(t))
    before = postgres.digest(name)
    with postgres.connect() as blocker:
        blocker.execute("BEGIN")
        blocker.execute(f"SELECT * FROM {name}.meta FOR UPDATE")
        out = {}

        def call():
            try:
                runner.observe(batch(3))
            except StoreError as e:
                out["error"] = e

        thread = threading.Thread(target=call)
        thread.start()
        backend = runner.store.conn.info.backend_pid
        block_until_waiting(blocker, backend)
        blocker.execute("SELECT pg_terminate_backend(%s, 10000)", (backend,))
        thread.join(30)
        blocker.execute("ROLLBACK")
    assert "observe" not in out and "the connection to the server was lost" in str(out["error"])
    assert postgres.digest(name) == before
    with pytest.raises(StoreError, match="refused: the connection to the server was lost earlier"):
        runner.close()  # its flush is refused: nothing more is written
    runner.store.close()
    assert postgres.digest(name) == before
    want = reference(3)
    with OnlineRunner(encoder(), postgres.store(name), CHANNELS) as again:
        ids = [f"s{i}" for i in range(5)]
        assert again.forecast(ids).equals(want.forecast(ids)) and again.info(ids).equals(want.info(ids))
        again.observe(batch(3))
        want.observe(batch(3))
        assert again.forecast(ids).equals(want.forecast(ids))


def test_two_stores_in_one_database_are_independent(postgres):
    a_name, b_name = postgres.name(), postgres.name()
    a, b = postgres.store(a_name), postgres.store(b_name)  # two writers at once: one lease each
    a.put({"s": record(1, "model-a"), "only-a": record(2, "model-a")})
    a.append_journal(1, b"a1")
    a.commit()
    b.put({"s": record(5, "model-b")})
    b.append_journal(1, b"b1")
    b.append_journal(2, b"b2")
    b.commit()
    assert (a.model, b.model) == ("model-a", "model-b")
    b.delete(["s"])
    b.truncate_journal(2)
    b.commit()
    assert a.get(["s"])["s"].steps == 1 and b.get(["s", "only-a"]) == {"s": None, "only-a": None}
    assert list(a.read_journal()) == [(1, b"a1")] and a.journal_head() == 1 and b.journal_head() == 2
    assert list(a.iterate()) == ["only-a", "s"] and len(b) == 0
    a.close()
    b.close()
    a, b = postgres.store(a_name), postgres.store(b_name)
    with pytest.raises(FingerprintMismatchError, match=f"'{a_name}' at .* holds the states of model 'model-a'"):
        a.bind(a.layout, "model-b")
    b.bind(b.layout, "model-c")  # emptied: it can be bound again
    assert (a.model, b.model, postgres.store(b_name, readonly=True).model) == ("model-a", "model-c", "model-c")
    a.close()
    b.close()


def test_a_corrupt_record_fails_only_its_own_stream(postgres):
    name = postgres.name()
    store = postgres.store(name)
    store.put({"meter-9": record(1), "meter-1": record(2), "short": record(3)})
    store.commit()
    with postgres.connect() as con:
        con.execute(f"UPDATE {name}.streams SET record = set_byte(record, 5, get_byte(record, 5) # 16) "
                    "WHERE stream_id = %s", (b"meter-9",))
        con.execute(f"UPDATE {name}.streams SET record = substring(record FROM 1 FOR 16) WHERE stream_id = %s",
                    (b"short",))
    before = postgres.digest(name)
    with pytest.raises(CorruptRecordError, match="stream 'meter-9': stored record fails its checksum"):
        store.get(["meter-1", "meter-9"])
    rows = store.read_rows(["meter-1", "meter-9", "none", "short"])
    assert rows.found.tolist() == [True, False, False, False]
    assert rows.failed == {1: "stored record fails its checksum",
                           3: "stored record has 16 bytes, the store's layout 256"}
    assert store.get(["meter-1"])["meter-1"].steps == 2
    store.close()
    assert postgres.digest(name) == before


def test_journal_entries_are_checked(postgres):
    name = postgres.name()
    runner = OnlineRunner(encoder(), postgres.store(name), CHANNELS)
    for t in range(3):
        runner.observe(batch(t))
    runner.store.close()  # dies with three entries in the journal
    with postgres.connect() as con:
        con.execute(f"UPDATE {name}.journal SET payload = set_byte(payload, 100, get_byte(payload, 100) # 1) "
                    "WHERE seq = 2")
    before = postgres.digest(name)
    with pytest.raises(CorruptJournalError, match="journal entry 2: stored entry fails its checksum"):
        OnlineRunner(encoder(), postgres.store(name), CHANNELS)
    with pytest.raises(FingerprintMismatchError, match=f"'{name}' at .* holds the states of model"):
        OnlineRunner(encoder(seed=1), postgres.store(name), CHANNELS)
    assert postgres.digest(name) == before


def test_a_failed_commit_changes_nothing_and_can_be_retried(postgres):
    """A server error half-way through a commit (a trigger refuses one of its rows) and a blob name the server
    cannot store: a StoreError naming the store and the cause; the store as it was; the staged writes kept."""
    name = postgres.name()
    store = postgres.store(name)
    store.put({"keep": record(1)})
    store.commit()
    with postgres.connect() as con:
        con.execute(f"CREATE FUNCTION {name}.refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'no room for %', "
                    "convert_from(NEW.stream_id, 'UTF8'); END $$ LANGUAGE plpgsql")
        con.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON {name}.streams FOR EACH ROW WHEN "
                    f"(NEW.stream_id = '\\x6e6577'::bytea) EXECUTE FUNCTION {name}.refuse()")
    before = postgres.digest(name)
    store.put({"keep": record(9), "new": record(3)})
    store.append_journal(1, b"entry")
    with pytest.raises(StoreError, match=rf"'{name}' at .*: commit failed: RaiseException: no room for new"):
        store.commit()
    assert postgres.digest(name) == before
    assert store.get(["keep"])["keep"].steps == 9  # still staged, read back
    with postgres.connect() as con:
        con.execute(f"DROP TRIGGER refuse ON {name}.streams")
    store.commit()
    got = postgres.store(name, readonly=True).get(["keep", "new"])
    assert got["keep"].steps == 9 and got["new"].steps == 3
    before = postgres.digest(name)
    store.put_blob("bad\x00name", b"x")
    store.put({"keep": record(10)})
    with pytest.raises(StoreError, match="commit failed: DataError"):
        store.commit()
    assert postgres.digest(name) == before
    store.rollback()
    store.close()


def test_bad_names_places_and_servers(postgres):
    with pytest.raises(ValueError, match="'name' expected a schema name"):
        postgres.store("Robert'); DROP TABLE streams; --")
    other = postgres.name()
    with postgres.connect() as con:
        con.execute(f"CREATE SCHEMA {other}")
        con.execute(f"CREATE TABLE {other}.invoices (id int)")
    with pytest.raises(StoreError, match=f"schema '{other}' holds tables but no state store"):
        postgres.store(other)
    name = postgres.name()
    postgres.store(name).close()
    with postgres.connect() as con:
        con.execute(f"UPDATE {name}.meta SET schema_version = 99")
    with pytest.raises(StoreError, match="has schema version 99, expected 1"):
        postgres.store(name)
    with pytest.raises(StoreError, match="has schema version 99, expected 1"):
        postgres.store(name, readonly=True)
    # a writer pointed at a read-only server (as a hot standby is)
    from gdn2ts.streaming.postgres_store import PostgresStore

    with pytest.raises(StoreError, match="open failed: read-only"):
        PostgresStore(f"{postgres.dsn} options='-c default_transaction_read_only=on'", name=postgres.name())
    # an unreachable server: named, and the password is not
    with pytest.raises(StoreError, match=r"'x' at 127.0.0.1:9/gdn2ts: open failed: cannot connect") as info:
        PostgresStore("postgresql://gdn2ts:s3cret-pw@127.0.0.1:9/gdn2ts", name="x", connect_timeout=2)
    assert "s3cret-pw" not in str(info.value)


def test_many_streams_in_several_statements(postgres, monkeypatch):
    from gdn2ts.streaming import postgres_store

    monkeypatch.setattr(postgres_store, "_BATCH", 100)
    name = postgres.name()
    store = postgres.store(name)
    small = {f"stream-{i}": StreamRecord({"h": torch.full((1, 4), float(i))}, float(i) if i else float("-inf"), i,
                                         "m") for i in range(450)}
    store.put(small)
    store.commit()
    ids = list(small)[::-1] + ["missing", "stream-7"]  # any order, unknown and repeated ids
    got = store.read_rows(ids)
    assert got.found.tolist() == [True] * 450 + [False, True]
    assert got.steps.tolist() == list(range(449, -1, -1)) + [0, 7]
    assert got.last_timestamp.tolist() == [float(i) for i in range(449, 0, -1)] + [float("-inf")] * 2 + [7.0]
    store.delete(list(small)[:250])
    store.commit()
    assert len(store) == 200 and list(store.iterate()) == sorted(list(small)[250:])
    store.close()


def test_drop_removes_a_store_only_as_its_writer(postgres):
    from gdn2ts.streaming.postgres_store import PostgresStore

    name, other = postgres.name(), postgres.name()
    store = postgres.store(name)
    store.put({"a": record(1)})
    store.commit()
    before = postgres.digest(name)
    with pytest.raises(StoreLockedError, match="is held by another writer"):
        PostgresStore.drop(postgres.dsn, name)
    assert postgres.digest(name) == before
    with postgres.connect() as con:
        con.execute(f"CREATE SCHEMA {other}")
        con.execute(f"CREATE TABLE {other}.invoices (id int)")
    with pytest.raises(StoreError, match="holds tables but no state store"):
        PostgresStore.drop(postgres.dsn, other)
    store.close()
    PostgresStore.drop(postgres.dsn, name)
    with postgres.connect() as con:
        assert con.execute("SELECT to_regnamespace(%s), to_regclass(%s)", (name, f"{other}.invoices")).fetchone() \
            == (None, f"{other}.invoices")
    with pytest.raises(StoreError, match="no store of this name to open read-only"):
        postgres.store(name, readonly=True)
