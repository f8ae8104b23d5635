"""State stores: exact round trips, atomic commits, checksums, model fingerprints, stream ids as data."""

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
from gdn2ts.streaming import store as store_module

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


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request, tmp_path):
    stores = []

    def make():
        s = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "state.db")
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
    writer, reader = SQLiteStore(tmp_path / "s.db"), SQLiteStore(tmp_path / "s.db")
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
    store.put({"keep": record(9), "new": record(3)})
    with pytest.raises(sqlite3.IntegrityError, match="disk full"):
        store.commit()
    fresh = SQLiteStore(tmp_path / "s.db")
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
    assert tmp_path.joinpath("s.db").exists() and len(list(tmp_path.iterdir())) <= 3  # no file per stream
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


def test_checksum_failure_names_the_stream(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    store.put({"meter-9": record(1), "meter-1": record(2)})
    store.commit()
    raw = sqlite3.connect(tmp_path / "s.db")
    payload = bytearray(raw.execute("SELECT payload FROM streams WHERE stream_id = 'meter-9'").fetchone()[0])
    payload[-1] ^= 0xFF
    raw.execute("UPDATE streams SET payload = ? WHERE stream_id = 'meter-9'", (bytes(payload),))
    raw.commit()
    raw.close()
    with pytest.raises(CorruptRecordError, match="stream 'meter-9': stored record fails its checksum"):
        store.get(["meter-1", "meter-9"])
    assert same(store.get(["meter-1"])["meter-1"], record(2))
    store.close()


def test_undecodable_record_names_the_stream():
    with pytest.raises(CorruptRecordError, match="stream 'x': stored record cannot be decoded"):
        store_module.decode(b"\x00" * 16, "x")


def test_state_from_another_model_is_refused(make_store):
    store = make_store()
    store.put({"a": record(1, fingerprint="model-a"), "b": record(2, fingerprint="model-b")})
    store.commit()
    assert same(store.get(["a"], fingerprint="model-a")["a"], record(1))
    with pytest.raises(FingerprintMismatchError, match="stream 'b': stored state was written by model 'model-b'"):
        store.get(["a", "b"], fingerprint="model-a")


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
    with pytest.raises(StoreError, match="is not a usable state store"):
        SQLiteStore(not_db)
    with pytest.raises(ValueError, match="'synchronous' expected"):
        SQLiteStore(tmp_path / "x.db", synchronous="OFF")


def test_large_batches(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    small = {f"stream-{i}": StreamRecord({"h": torch.full((4,), float(i))}, float(i), i, "m") for i in range(1200)}
    store.put(small)
    store.commit()
    got = store.get(list(small))
    assert all(got[sid].steps == r.steps and torch.equal(got[sid].tensors["h"], r.tensors["h"])
               for sid, r in small.items())
    store.close()
