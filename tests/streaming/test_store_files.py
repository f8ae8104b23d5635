"""The SQLite store's files: one writer per store (the lease), read-only views beside the writer, every failure a
StoreError naming the path and the cause with the store left as it was, the slab, and older files converted."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import save

from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.streaming import (
    CommitPolicy,
    CorruptRecordError,
    FingerprintMismatchError,
    MemoryStore,
    OnlineRunner,
    ReadOnlyStoreError,
    SQLiteStore,
    StoreError,
    StoreLockedError,
    StreamRecord,
)
from gdn2ts.streaming.slab import Slab

from stored import digest

CHANNELS = ["a", "b"]


@pytest.fixture(autouse=True)
def one_thread():
    """The writer processes step with one thread: the same arithmetic here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def encoder():
    torch.manual_seed(0)
    return StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, n_layers=2, num_heads=2, head_dim=8, horizon=2))


def batch(n_streams: int, t: float, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame({"stream": [f"s{i}" for i in range(n_streams)], "time": t + rng.uniform(0, 0.5, n_streams),
                         "a": rng.standard_normal(n_streams), "b": rng.standard_normal(n_streams)})


def record(seed: int) -> StreamRecord:
    gen = torch.Generator().manual_seed(seed)
    return StreamRecord({"h": torch.randn(1, 64, generator=gen)}, float(seed), seed, "m")


WRITER = textwrap.dedent("""
    import sys, numpy as np, polars as pl, torch
    from gdn2ts.models import EncoderConfig, StreamEncoder
    from gdn2ts.streaming import CommitPolicy, OnlineRunner, SQLiteStore
    torch.set_num_threads(1)
    torch.manual_seed(0)
    enc = StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, n_layers=2, num_heads=2, head_dim=8, horizon=2))
    runner = OnlineRunner(enc, SQLiteStore(sys.argv[1]), ["a", "b"], policy=CommitPolicy(journal=sys.argv[2] == "1"))
    for t in range(3):
        rng = np.random.default_rng(t)
        runner.observe(pl.DataFrame({"stream": [f"s{i}" for i in range(5)], "time": t + rng.uniform(0, 0.5, 5),
                                     "a": rng.standard_normal(5), "b": rng.standard_normal(5)}))
    print("ready", flush=True)
    sys.stdin.readline()
    runner.close()
    print("closed", flush=True)
""")


def reference_runner() -> OnlineRunner:
    """What the writer applied, in memory."""
    runner = OnlineRunner(encoder(), MemoryStore(), CHANNELS)
    for t in range(3):
        rng = np.random.default_rng(t)
        runner.observe(pl.DataFrame({"stream": [f"s{i}" for i in range(5)], "time": t + rng.uniform(0, 0.5, 5),
                                     "a": rng.standard_normal(5), "b": rng.standard_normal(5)}))
    return runner


@contextlib.contextmanager
def writer_process(path, journal: bool):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "1" if journal else "0"], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "write-through"])
def test_one_writer_per_store_across_processes(journal, tmp_path):
    """A second writer is refused, naming the holder, under either commit policy; read-only views work beside
    the writer and see what it applied; a killed writer's lease goes to the next writer, with its work."""
    db = tmp_path / "s.db"
    reference = reference_runner()
    want = reference.forecast(["s0", "s4"])
    with writer_process(db, journal) as proc:
        before = digest(db)
        with pytest.raises(StoreLockedError, match=rf"s.db is held by another writer \(pid {proc.pid} on "):
            SQLiteStore(db)
        with pytest.raises(StoreLockedError) as info:
            OnlineRunner(encoder(), SQLiteStore(db), CHANNELS, policy=CommitPolicy(journal=journal))
        assert info.value.holder["pid"] == proc.pid and info.value.holder["since"]
        view = OnlineRunner(encoder(), SQLiteStore(db, readonly=True), CHANNELS)
        assert view.info(["s0", "s4"])["steps"].to_list() == [3, 3]
        assert view.forecast(["s0", "s4"]).equals(want)
        assert view.stream_ids() == [f"s{i}" for i in range(5)]
        assert view.audit(batch(2, 10.0)).energy.height > 0  # read-only, as audits are
        with pytest.raises(ReadOnlyStoreError, match="observe is refused: the store is open read-only"):
            view.observe(batch(2, 10.0))
        view.close()
        assert digest(db) == before
        proc.kill()  # SIGKILL: the operating system drops the lease with the process
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with OnlineRunner(encoder(), SQLiteStore(db), CHANNELS, policy=CommitPolicy(journal=journal)) as again:
        assert again.info(["s0", "s4"])["steps"].to_list() == [3, 3]
        assert again.forecast(["s0", "s4"]).equals(want)


def test_a_second_writer_in_the_same_process_is_refused_and_close_releases(tmp_path):
    first = SQLiteStore(tmp_path / "s.db")
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        SQLiteStore(tmp_path / "s.db")
    reader = SQLiteStore(tmp_path / "s.db", readonly=True)
    with pytest.raises(ReadOnlyStoreError, match="open read-only: put is refused"):
        reader.put({"x": record(1)})
    first.close()
    SQLiteStore(tmp_path / "s.db").close()
    reader.close()


def test_a_read_only_view_of_an_empty_or_missing_store(tmp_path):
    SQLiteStore(tmp_path / "s.db").close()
    view = OnlineRunner(encoder(), SQLiteStore(tmp_path / "s.db", readonly=True), CHANNELS)
    assert view.info(["x"])["steps"].to_list() == [0]
    view.close()
    with pytest.raises(StoreError, match="missing.db: no store at this path to open read-only"):
        SQLiteStore(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()


def test_a_directory_at_the_store_path(tmp_path):
    (tmp_path / "s.db").mkdir()
    with pytest.raises(StoreError, match="s.db: the path is a directory"):
        SQLiteStore(tmp_path / "s.db")
    assert list((tmp_path / "s.db").iterdir()) == []


@contextlib.contextmanager
def as_nobody():
    """Run the block with the permissions of an unprivileged user (the tests may run as root, which no file mode
    stops)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_a_read_only_location():
    # a folder every user can reach (pytest's own is its owner's alone)
    top = Path(tempfile.mkdtemp(dir="/tmp"))
    folder = top / "shared"
    folder.mkdir()
    store = SQLiteStore(folder / "s.db")
    store.put({f"k{i}": record(i) for i in range(3)})
    store.commit()
    store.close()
    before = digest(folder / "s.db")
    os.chmod(top, 0o755)
    os.chmod(folder, 0o555)
    for f in folder.iterdir():
        os.chmod(f, 0o444)
    try:
        with as_nobody():
            with pytest.raises(StoreError, match=r"new.db: .*read-only location"):
                SQLiteStore(folder / "new.db")
            with pytest.raises(StoreError, match=r"s.db: .*read-only location"):
                SQLiteStore(folder / "s.db")
    finally:
        os.chmod(folder, 0o755)
    assert digest(folder / "s.db") == before and not (folder / "new.db").exists()
    shutil.rmtree(top)


DISK_FULL = textwrap.dedent("""
    import resource, signal, sys, json, torch
    from gdn2ts.streaming import SQLiteStore, StoreError, StreamRecord
    store = SQLiteStore(sys.argv[1])
    limit = int(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        store.put({f"new{i}": StreamRecord({"h": torch.full((1, 64), float(i))}, 1.0, 1, "m") for i in range(4000)})
        store.commit()
        print(json.dumps({"error": None}))
    except StoreError as e:
        print(json.dumps({"error": str(e)}))
""")


def test_a_full_disk_fails_the_commit_and_changes_nothing(tmp_path):
    db = tmp_path / "s.db"
    store = SQLiteStore(db)
    store.put({f"k{i}": record(i) for i in range(50)})
    store.commit()
    store.close()
    before = digest(db)
    limit = max(os.path.getsize(db), os.path.getsize(f"{db}-slab")) + 64 * 1024
    out = subprocess.run([sys.executable, "-c", DISK_FULL, str(db), str(limit)], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["error"] is not None and "s.db: commit failed: disk full" in result["error"], result
    assert digest(db) == before
    with SQLiteStore(db, readonly=True) as again:
        got = again.get(["k3", "new7"])
        assert got["new7"] is None and got["k3"].steps == 3


def test_the_slab_reads_and_writes_scattered_rows(tmp_path):
    slab = Slab(tmp_path / "x-slab", slot_bytes=24)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (300, 24), dtype=np.uint8)
    slots = rng.permutation(1000)[:300]
    slab.write(slots, data)
    out = np.zeros((400, 24), dtype=np.uint8)
    rows = rng.permutation(400)[:300]
    slab.read(slots, out, rows)
    assert (out[rows] == data).all()
    assert (np.delete(out, rows, axis=0) == 0).all()
    # slots never written read as zeros, also past the end of the file
    assert (slab.read(np.array([int(np.setdiff1d(np.arange(1000), slots)[0]), 10**6])) == 0).all()
    assert slab.capacity >= 1000
    slab.close()


def legacy_store(path, models=("m", "m")) -> dict:
    """A store as gdn2ts wrote it before records moved to the slab (schema version 3)."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.execute("CREATE TABLE streams (stream_id TEXT PRIMARY KEY, payload BLOB NOT NULL, checksum TEXT NOT NULL)")
    con.execute("CREATE TABLE journal (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL, checksum TEXT NOT NULL)")
    con.execute("CREATE TABLE blobs (name TEXT PRIMARY KEY, payload BLOB NOT NULL, checksum TEXT NOT NULL)")
    con.executemany("INSERT INTO meta VALUES (?, ?)", [("schema_version", "3"), ("journal_head", "7")])
    records = {}
    for i, model in enumerate(models):
        h = torch.full((1, 4), float(i))
        payload = save({"h": h}, metadata={"format": "gdn2ts.stream.v1", "last_timestamp": repr(float(i)),
                                            "steps": str(i + 1), "fingerprint": model, "journal_seq": "5"})
        con.execute("INSERT INTO streams VALUES (?, ?, ?)", (f"k{i}", payload, hashlib.sha256(payload).hexdigest()))
        records[f"k{i}"] = (h, i + 1)
    entry = b"an entry"
    con.execute("INSERT INTO journal VALUES (7, ?, ?)", (entry, hashlib.sha256(entry).hexdigest()))
    con.commit()
    con.close()
    return records


def test_an_older_store_is_converted_on_its_first_open_for_writing(tmp_path):
    db = tmp_path / "old.db"
    records = legacy_store(db)
    with pytest.raises(StoreError, match="schema version 3, expected 4 .open it for writing once"):
        SQLiteStore(db, readonly=True)
    store = SQLiteStore(db)
    assert store.model == "m" and store.journal_head() == 7 and list(store.read_journal()) == [(7, b"an entry")]
    got = store.get(list(records))
    for sid, (h, steps) in records.items():
        assert torch.equal(got[sid].tensors["h"], h) and got[sid].steps == steps and got[sid].journal_seq == 5
    store.close()


def test_an_older_store_of_two_models_is_not_converted(tmp_path):
    db = tmp_path / "old.db"
    legacy_store(db, models=("m", "other"))
    before = db.read_bytes()
    with pytest.raises(FingerprintMismatchError, match="holds the states of several models"):
        SQLiteStore(db)
    con = sqlite3.connect(db)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "3"
    con.close()
    assert len(before) > 0


def test_a_damaged_older_store_is_not_converted(tmp_path):
    db = tmp_path / "old.db"
    legacy_store(db)
    con = sqlite3.connect(db)
    con.execute("UPDATE journal SET payload = ? WHERE seq = 7", (b"tampered",))
    con.commit()
    con.close()
    with pytest.raises(CorruptRecordError, match="journal entry 7 fails its checksum; the file is not converted"):
        SQLiteStore(db)


def test_a_reader_sees_a_record_the_writer_moved_after_its_lookup(tmp_path):
    """The writer frees a record's old slot once the new one is committed and may reuse it: a reader holding an
    older snapshot then reads bytes that fail the checksum. Outside a snapshot the reader looks again and finds the
    new slot; inside one it reports the record (a read-only runner starts its replay over, see OnlineRunner)."""
    writer = SQLiteStore(tmp_path / "s.db")
    writer.put({"a": record(1)})
    writer.commit()
    reader = SQLiteStore(tmp_path / "s.db", readonly=True)
    first = reader.conn.execute("SELECT slot FROM streams").fetchone()[0]
    with reader.snapshot():
        assert reader.get(["a"])["a"].steps == 1  # the snapshot starts here
        seed = 1
        while True:  # rewrite until a's first slot is taken again (after the other free slots: a thousand or so)
            seed += 1
            writer.put({"a": record(seed)})
            writer.commit()
            if writer.conn.execute("SELECT slot FROM streams").fetchone()[0] == first:
                break
            assert seed < 5000
        assert seed > 1000  # freed slots wait behind the rest
        writer.put({"a": record(seed + 1)})  # and a's new bytes are now in its first slot... then moved on
        writer.commit()
        rows = reader.read_rows(["a"])
        assert rows.failed == {0: "stored record fails its checksum"}
    assert reader.get(["a"])["a"].steps == seed + 1
    reader.close()
    writer.close()


def test_a_runner_whose_last_flush_fails_still_releases_its_store(tmp_path):
    runner = OnlineRunner(encoder(), SQLiteStore(tmp_path / "s.db"), CHANNELS)
    runner.observe(batch(3, 1.0))
    runner.store.conn.close()  # the database goes away under the runner
    with pytest.raises(StoreError):
        runner.close()
    again = OnlineRunner(encoder(), SQLiteStore(tmp_path / "s.db"), CHANNELS)  # the lease was released
    assert again.info(["s0"])["steps"].to_list() == [1]  # the journaled call is replayed
    again.close()


def test_a_read_only_view_too_small_for_the_unwritten_streams_says_so(tmp_path):
    writer = OnlineRunner(encoder(), SQLiteStore(tmp_path / "s.db"), CHANNELS)
    for part in range(3):  # journaled, not yet snapshotted: the nine states exist only in the writer
        writer.observe(batch(3, 1.0, seed=part).with_columns(pl.col("stream") + f"-{part}"))
    with pytest.raises(StoreError, match="cannot hold every stream changed since the writer's last snapshot in its "
                                         "capacity of 4"):
        OnlineRunner(encoder(), SQLiteStore(tmp_path / "s.db", readonly=True), CHANNELS, capacity=4)
    view = OnlineRunner(encoder(), SQLiteStore(tmp_path / "s.db", readonly=True), CHANNELS, capacity=9)
    assert view.info([f"s{i}-{p}" for i in range(3) for p in range(3)])["steps"].to_list() == [1] * 9
    view.close()
    writer.close()
