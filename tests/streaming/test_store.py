"""State stores: exact round trips, atomic commits, checksums, one model per store, stream ids as data."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from gdn2ts.streaming import (
    CorruptRecordError,
    FingerprintMismatchError,
    MemoryStore,
    SQLiteStore,
    StateStore,
    StoreError,
    StreamRecord,
)

from stored import dump

ODD_IDS = ["'; DROP TABLE streams; --", "../../etc/passwd", "meter/7\\x", "流-β", "", " ", "a" * 500, "NULL"]


def record(seed: int, fingerprint: str = "model-a") -> StreamRecord:
    gen = torch.Generator().manual_seed(seed)
    return StreamRecord(
        tensors={
            "layer0.recurrent": torch.randn(1, 2, 4, 3, generator=gen),
            "layer0.conv": torch.randn(1, 6, 3, generator=gen).bfloat16(),
            "scaler.count": torch.tensor([seed], dtype=torch.int64),
        },
        last_timestamp=1_700_000_000.25 + seed,
        steps=seed,
        fingerprint=fingerprint,
    )


def same(a: StreamRecord, b: StreamRecord) -> bool:
    return (a.last_timestamp == b.last_timestamp and a.steps == b.steps and a.fingerprint == b.fingerprint
            and a.tensors.keys() == b.tensors.keys()
            and all(a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k])
                    for k in a.tensors))


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def make_store(request, tmp_path):
    stores = []
    # the PostgreSQL store of this test (a fresh schema of the test server; skipped without one, see conftest.py)
    pg = request.getfixturevalue("postgres") if request.param == "postgres" else None
    name = pg.name() if pg else None

    def make():
        s = (MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "state.db")
             if request.param == "sqlite" else pg.store(name))
        stores.append(s)
        return s

    yield make
    for s in stores:
        try:
            s.close()
        except sqlite3.ProgrammingError:
            pass


def test_protocol_and_exact_round_trip(make_store):
    store = make_store()
    assert isinstance(store, StateStore)
    recs = {f"s{i}": record(i) for i in range(5)}
    store.put(recs)
    store.commit()
    got = store.get(list(recs) + ["unknown"])
    assert got["unknown"] is None
    assert all(same(got[sid], recs[sid]) for sid in recs)
    assert list(store.iterate()) == sorted(recs) and len(store) == 5


def test_staged_writes_are_read_back_but_invisible_until_commit(make_store, tmp_path):
    store = make_store()
    store.put({"a": record(1)})
    assert same(store.get(["a"])["a"], record(1))  # read-your-writes
    assert list(store.iterate()) == []
    store.rollback()
    assert store.get(["a"])["a"] is None
    store.put({"a": record(2)})
    store.delete(["a"])
    store.commit()
    assert store.get(["a"])["a"] is None


def test_other_connection_sees_only_committed_batches(tmp_path):
    writer = SQLiteStore(tmp_path / "s.db")
    writer.put({"c": record(3)})
    writer.commit()
    reader = SQLiteStore(tmp_path / "s.db", readonly=True)
    writer.put({"a": record(1), "b": record(2)})
    assert reader.get(["a", "b"]) == {"a": None, "b": None}
    writer.commit()
    got = reader.get(["a", "b"])
    assert same(got["a"], record(1)) and same(got["b"], record(2))
    writer.close()
    reader.close()


def test_failed_commit_writes_nothing(tmp_path):
    """A write that fails half-way through a batch (here: a trigger aborts the second row) leaves every stored
    record as it was, and the staged batch can be retried."""
    store = SQLiteStore(tmp_path / "s.db")
    store.put({"keep": record(1)})
    store.commit()
    store.conn.execute("CREATE TRIGGER boom BEFORE INSERT ON streams WHEN NEW.stream_id = 'new' "
                       "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    before = dump(tmp_path / "s.db")
    store.put({"keep": record(9), "new": record(3)})
    with pytest.raises(StoreError, match=r"s.db: commit failed: .*disk full"):
        store.commit()
    assert dump(tmp_path / "s.db") == before
    fresh = SQLiteStore(tmp_path / "s.db", readonly=True)
    got = fresh.get(["keep", "new"])
    assert same(got["keep"], record(1)) and got["new"] is None
    store.conn.execute("DROP TRIGGER boom")
    store.commit()
    got = fresh.get(["keep", "new"])
    assert same(got["keep"], record(9)) and same(got["new"], record(3))
    fresh.close()
    store.close()


def test_bad_record_in_a_put_stages_nothing(make_store):
    store = make_store()
    with pytest.raises(ValueError, match="stream 'b' expected a StreamRecord"):
        store.put({"a": record(1), "b": {"not": "a record"}})
    assert store.get(["a"])["a"] is None


def test_reopen_continues_where_it_stopped(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    store.put({sid: record(i) for i, sid in enumerate(ODD_IDS)})
    store.commit()
    store.close()
    again = SQLiteStore(tmp_path / "s.db")
    got = again.get(ODD_IDS)
    assert all(same(got[sid], record(i)) for i, sid in enumerate(ODD_IDS))
    assert sorted(again.iterate()) == sorted(ODD_IDS)
    assert again.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # the database with SQLite's -wal and -shm, the slab and the lock file: no file per stream
    assert {p.name for p in tmp_path.iterdir()} <= {"s.db", "s.db-wal", "s.db-shm", "s.db-slab", "s.db-lock"}
    again.close()


def test_stream_ids_are_data(make_store):
    store = make_store()
    store.put({sid: record(i) for i, sid in enumerate(ODD_IDS)})
    store.commit()
    store.delete([ODD_IDS[0]])
    store.commit()
    got = store.get(ODD_IDS)
    assert got[ODD_IDS[0]] is None
    assert all(same(got[sid], record(i)) for i, sid in enumerate(ODD_IDS) if i > 0)


def flip_bit(path, stream_id: str) -> None:
    con = sqlite3.connect(path)
    slot = con.execute("SELECT slot FROM streams WHERE stream_id = ?", (stream_id,)).fetchone()[0]
    con.close()
    reader = SQLiteStore(path, readonly=True)
    nbytes = reader.layout.nbytes
    reader.close()
    with open(f"{path}-slab", "r+b") as f:
        f.seek(slot * nbytes + 5)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x10]))


def test_checksum_failure_names_the_stream_and_spares_the_others(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    store.put({"meter-9": record(1), "meter-1": record(2)})
    store.commit()
    flip_bit(tmp_path / "s.db", "meter-9")
    with pytest.raises(CorruptRecordError, match="stream 'meter-9': stored record fails its checksum"):
        store.get(["meter-1", "meter-9"])
    rows = store.read_rows(["meter-1", "meter-9", "none"])
    assert rows.found.tolist() == [True, False, False] and rows.failed == {1: "stored record fails its checksum"}
    assert same(store.get(["meter-1"])["meter-1"], record(2))
    store.close()


def test_a_store_belongs_to_one_model(make_store):
    store = make_store()
    store.put({"a": record(1, fingerprint="model-a")})
    store.commit()
    assert store.model == "model-a"
    assert same(store.get(["a"], fingerprint="model-a")["a"], record(1))
    with pytest.raises(FingerprintMismatchError, match="stream 'b': a record of model 'model-b' cannot join"):
        store.put({"c": record(3), "b": record(2, fingerprint="model-b")})
    assert store.get(["c"])["c"] is None  # nothing of the refused put was staged
    with pytest.raises(FingerprintMismatchError, match="stream 'a': stored state was written by model 'model-a'"):
        store.get(["a"], fingerprint="model-b")
    with pytest.raises(FingerprintMismatchError, match="holds the states of model 'model-a'"):
        store.bind(store.layout, "model-b")
    with pytest.raises(CorruptRecordError, match="tensor 'layer0.recurrent' is torch.float32"):
        store.put({"d": StreamRecord({**record(4).tensors, "layer0.recurrent": torch.zeros(1, 2)}, 0.0, 0,
                                     "model-a")})


def test_an_empty_store_can_be_bound_again(make_store):
    store = make_store()
    store.put({"a": record(1, fingerprint="model-a")})
    store.rollback()
    store.bind(store.layout, "model-b")
    store.put({"b": record(2, fingerprint="model-b")})
    store.commit()
    assert store.model == "model-b" and same(store.get(["b"])["b"], record(2, fingerprint="model-b"))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(tensors={"h": [1.0]}), "tensor 'h' expected a torch.Tensor"),
    (dict(tensors={"": torch.zeros(1)}), "tensor names expected non-empty strings"),
    (dict(last_timestamp=float("nan")), "'last_timestamp' expected a number"),
    (dict(last_timestamp=float("inf")), "'last_timestamp' expected a number"),
    (dict(steps=-1), "'steps' expected a non-negative int"),
    (dict(fingerprint=3), "'fingerprint' expected a string"),
])
def test_bad_records_are_rejected(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        StreamRecord(**kwargs)


def test_bad_ids_and_files(make_store, tmp_path):
    store = make_store()
    with pytest.raises(ValueError, match="got a single string"):
        store.get("abc")
    with pytest.raises(ValueError, match="stream ids expected strings"):
        store.get([1])
    not_db = tmp_path / "notes.txt"
    not_db.write_text("this is not a database " * 100)
    with pytest.raises(StoreError, match="notes.txt: open failed: not a usable state store"):
        SQLiteStore(not_db)
    with pytest.raises(ValueError, match="'synchronous' expected"):
        SQLiteStore(tmp_path / "x.db", synchronous="OFF")


def test_large_batches(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    small = {f"stream-{i}": StreamRecord({"h": torch.full((1, 4), float(i))}, float(i), i, "m") for i in range(1200)}
    store.put(small)
    store.commit()
    got = store.get(list(small))
    assert all(got[sid].steps == r.steps and torch.equal(got[sid].tensors["h"], r.tensors["h"])
               for sid, r in small.items())
    store.close()
