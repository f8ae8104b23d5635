"""The commit policy: journal, snapshots, replay on open, and bad input that leaves every stored state as it was."""

from __future__ import annotations

import sqlite3

import numpy as np
import polars as pl
import pytest
import torch

from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.streaming import (
    CommitPolicy,
    CorruptJournalError,
    CorruptRecordError,
    FingerprintMismatchError,
    MemoryStore,
    OnlineRunner,
    SQLiteStore,
)
from gdn2ts.streaming.journal import Entry, decode_entry, encode_entry
from gdn2ts.streaming.records import RecordLayout

from stored import dump

CHANNELS = ["a", "b"]
ODD_IDS = ["'; DROP TABLE streams; --", "../../etc/passwd", "x\x00y", "流-β", "", "NULL"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def encoder(seed=0):
    torch.manual_seed(seed)
    return StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, n_layers=2, num_heads=2, head_dim=8, horizon=2))


def parts(ids=("s0", "s1", "s2"), n_calls=6, seed=0, per_call=None):
    """Calls over `per_call` of the streams (all by default), zero to two rows each, some values missing."""
    rng = np.random.default_rng(seed)
    clock = dict.fromkeys(ids, 0.0)
    out = []
    for _ in range(n_calls):
        rows = []
        for sid in (ids if per_call is None else rng.choice(ids, size=per_call, replace=False).tolist()):
            for _ in range(int(rng.integers(0, 3))):
                clock[sid] += rng.uniform(0.1, 1.0)
                rows.append({"stream": sid, "time": clock[sid], "a": float(rng.standard_normal()),
                             "b": None if rng.random() < 0.3 else float(rng.standard_normal())})
        out.append(pl.DataFrame(rows, schema={"stream": pl.String, "time": pl.Float64, "a": pl.Float64,
                                              "b": pl.Float64}))
    return out




def test_replay_after_a_crash_equals_the_uninterrupted_run(durable):
    ids = [f"s{i}" for i in range(6)]
    batches = parts(ids, n_calls=11, per_call=3)
    reference = OnlineRunner(encoder(), MemoryStore(), CHANNELS)
    for b in batches:
        reference.observe(b)
    first = OnlineRunner(encoder(), durable.open(), CHANNELS, capacity=3, policy=CommitPolicy(snapshot_every=5))
    for b in batches[:10]:
        first.observe(b)
    # snapshots, spills (records newer than some journal entries) and two journal entries are in the file; the
    # process now dies without closing
    entries = [s for s, _ in first.store.read_journal()]
    assert entries and max(r.journal_seq for r in first.store.get(ids).values() if r is not None) >= entries[0]
    first.store.close()  # dies (the lease goes with it)
    second = OnlineRunner(encoder(), durable.open(), CHANNELS, capacity=3)
    assert list(second.store.read_journal()) == []  # replayed, then snapshotted
    second.observe(batches[10])
    assert reference.forecast(ids).equals(second.forecast(ids))
    assert reference.stats(ids).equals(second.stats(ids)) and reference.info(ids).equals(second.info(ids))
    second.flush()
    a, b = reference.store.get(ids), second.store.get(ids)
    assert all(torch.equal(a[s].tensors[k], b[s].tensors[k]) for s in ids for k in a[s].tensors)


def test_snapshot_policy_and_flush_truncate_the_journal(durable):
    runner = OnlineRunner(encoder(), durable.open(), CHANNELS, policy=CommitPolicy(snapshot_every=3))
    seqs = [runner.observe(b).seq for b in parts(n_calls=5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert [s for s, _ in runner.store.read_journal()] == [4, 5]  # the third call snapshotted
    assert runner.store.get(["s0"])["s0"].journal_seq == 3
    runner.close()
    again = durable.open()
    assert list(again.read_journal()) == [] and again.journal_head() == 5
    assert all(r.journal_seq == 5 for r in again.get(["s0", "s1", "s2"]).values())
    again.close()


def test_welford_statistics_match_numpy():
    batches = parts(n_calls=6, seed=3)
    runner = OnlineRunner(encoder(), MemoryStore(), CHANNELS)
    for b in batches:
        runner.observe(b)
    full = pl.concat(batches)
    got = runner.stats(["s1"])
    for ch in CHANNELS:
        x = full.filter(pl.col("stream") == "s1")[ch].drop_nulls().to_numpy()
        row = got.filter(pl.col("channel") == ch)
        assert row["count"].item() == x.size
        np.testing.assert_allclose(row["mean"].item(), x.mean(), rtol=1e-12)
        np.testing.assert_allclose(row["var"].item(), x.var(ddof=1), rtol=1e-10)
    fresh = OnlineRunner(encoder(), MemoryStore(), CHANNELS)
    fresh.observe([{"stream": "q", "time": 1.0, "a": 2.0, "b": None}])
    assert fresh.stats(["q"]).rows() == [("q", "a", 1, 2.0, None, None), ("q", "b", 0, None, None, None)]
    with pytest.raises(KeyError, match="unknown stream 'zz'"):
        fresh.stats(["zz"])


BAD = [
    ([{"stream": "s0", "time": 9.0, "a": float("-inf"), "b": 0.0}], ValueError, "holds inf for stream 's0'"),
    ([{"stream": "s0", "time": 9.0, "a": 1.0, "pressure": 3.0}], ValueError, r"unknown columns \['pressure'\]"),
    ([{"stream": "s0", "time": 9.0, "a": "high"}], ValueError, "column 'a' expected numbers"),
    ([{"stream": "s0", "time": 9.0, "a": 1.0}, {"stream": "s1", "time": 9.0, "a": "x"}], ValueError,
     "column 'a' expected numbers"),
    ({"stream": ["s0", "s1"], "time": [9.0]}, ValueError, "cannot be read as a table"),
    ({"stream": ["s0"], "time": ["noon"], "a": [1.0]}, ValueError, "column 'time' expected numbers"),
]


@pytest.mark.parametrize("rows,error,pattern", BAD)
def test_bad_batches_leave_the_database_as_it_was(rows, error, pattern, durable):
    runner = OnlineRunner(encoder(), durable.open(), CHANNELS)
    runner.observe(parts()[0])
    runner.observe(parts()[1])
    before, info, fc = durable.dump(), runner.info(["s0", "s1"]), runner.forecast(["s0"])
    with pytest.raises(error, match=pattern):
        runner.observe(rows)
    assert durable.dump() == before
    assert runner.info(["s0", "s1"]).equals(info) and runner.forecast(["s0"]).equals(fc)


def test_stale_rows_are_rejected_by_stream_while_others_proceed(durable):
    runner = OnlineRunner(encoder(), durable.open(), CHANNELS)
    runner.observe([{"stream": "a", "time": 5.0, "a": 1.0}, {"stream": "b", "time": 5.0, "a": 1.0}])
    result = runner.observe([{"stream": "a", "time": 4.0, "a": 2.0}, {"stream": "b", "time": 6.0, "a": 2.0},
                             {"stream": "a", "time": 5.0, "a": 2.0}])
    assert result.accepted == 1
    assert [r[2] for r in result.rejected] == ["stream 'a': timestamp 4.0 is not after its last observation 5.0",
                                               "stream 'a': timestamp 5.0 is not after its last observation 5.0"]
    assert runner.info(["a", "b"])["steps"].to_list() == [1, 2]
    assert runner.observe([{"stream": "a", "time": 5.0, "a": 2.0}]).seq == 0  # all rejected: nothing journaled
    assert runner.store.journal_head() == 2


def corrupt(path, stream_id: str, at: int = -3) -> None:
    """Flip one bit of a stream's record in the store's slab."""
    con = sqlite3.connect(path)
    slot = con.execute("SELECT slot FROM streams WHERE stream_id = ?", (stream_id,)).fetchone()[0]
    layout = RecordLayout.from_json(con.execute("SELECT value FROM meta WHERE key = 'layout'").fetchone()[0])
    con.close()
    with open(f"{path}-slab", "r+b") as f:
        f.seek(slot * layout.nbytes + (at % layout.nbytes))
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x01]))


def test_a_corrupt_record_fails_only_its_own_stream(tmp_path):
    with OnlineRunner(encoder(), SQLiteStore(tmp_path / "s.db"), CHANNELS) as first:
        first.observe(parts()[0])
    corrupt(tmp_path / "s.db", "s1")
    before = dump(tmp_path / "s.db")
    runner = OnlineRunner(encoder(), SQLiteStore(tmp_path / "s.db"), CHANNELS)
    batch = parts()[2]
    result = runner.observe(batch)
    s1_rows = batch.filter(pl.col("stream") == "s1").height
    assert result.accepted == batch.height - s1_rows > 0
    assert len(result.rejected) == s1_rows
    assert all(r[0] == "s1" and "stream 's1': stored record fails its checksum" in r[2] for r in result.rejected)
    fc = runner.forecast(["s0", "s1", "s2"])
    bad = fc.filter(pl.col("stream") == "s1")
    assert bad["error"].to_list() == ["stored record fails its checksum"] * bad.height
    assert bad["q0.5"].null_count() == bad.height
    assert fc.filter(pl.col("stream") != "s1")["error"].null_count() == fc.height - bad.height
    assert fc.filter(pl.col("stream") != "s1")["q0.5"].null_count() == 0
    with pytest.raises(CorruptRecordError, match="stream 's1': stored record fails its checksum"):
        runner.stats(["s1"])
    runner.close()
    after = dump(tmp_path / "s.db")
    assert after["records"]["s1"] == before["records"]["s1"]
    assert [r for r in after["streams"] if r[0] == "s1"] == [r for r in before["streams"] if r[0] == "s1"]


def test_a_store_of_another_model_refuses_its_runner(durable):
    with OnlineRunner(encoder(), durable.open(), CHANNELS) as first:
        first.observe(parts()[0])
    before = durable.dump()
    with pytest.raises(FingerprintMismatchError, match="holds the states of model"):
        OnlineRunner(encoder(seed=5), durable.open(), CHANNELS)
    store = durable.open()  # the refused runner closed the store and released its lease
    with pytest.raises(FingerprintMismatchError, match="stored state was written by model"):
        store.get(["s0"], fingerprint="another-model")
    store.close()
    assert durable.dump() == before


def test_journal_entries_are_checked(tmp_path):
    runner = OnlineRunner(encoder(), SQLiteStore(tmp_path / "s.db"), CHANNELS)
    for b in parts()[:3]:
        runner.observe(b)
    runner.store.close()  # dies with three entries in the journal (the lease goes with it)
    before = dump(tmp_path / "s.db")
    with pytest.raises(FingerprintMismatchError, match="s.db holds the states of model"):
        OnlineRunner(encoder(seed=1), SQLiteStore(tmp_path / "s.db"), CHANNELS)
    with pytest.raises(ValueError, match=r"journal entry 1: written with channels \['a', 'b'\]"):
        OnlineRunner(encoder(), SQLiteStore(tmp_path / "s.db"), ["b", "a"])
    raw = sqlite3.connect(tmp_path / "s.db")
    payload = bytearray(raw.execute("SELECT payload FROM journal WHERE seq = 2").fetchone()[0])
    payload[-1] ^= 0xFF
    raw.execute("UPDATE journal SET payload = ? WHERE seq = 2", (bytes(payload),))
    raw.commit()
    raw.close()
    with pytest.raises(CorruptJournalError, match="journal entry 2: stored entry fails its checksum"):
        OnlineRunner(encoder(), SQLiteStore(tmp_path / "s.db"), CHANNELS)
    after = dump(tmp_path / "s.db")
    assert after["streams"] == before["streams"] and [r[0] for r in after["journal"]] == [1, 2, 3]
    with pytest.raises(CorruptJournalError, match="journal entry 7: cannot be decoded"):
        decode_entry(7, b"\x00" * 40)


def test_journal_entry_round_trip_and_shapes():
    e = Entry(4, "m", (("a", "b"), ("hour",)), ODD_IDS[:3], np.array([3, 1]), np.arange(4.0),
              np.arange(8.0).reshape(4, 2), np.ones((4, 1)))
    d = decode_entry(4, encode_entry(e), "m")
    assert d.stream_ids == ODD_IDS[:3] and d.columns == e.columns and np.array_equal(d.values, e.values)
    with pytest.raises(CorruptJournalError, match="journal entry 5: cannot be decoded"):
        decode_entry(5, encode_entry(e))  # an entry stored under another number
    bad = Entry(4, "m", e.columns, ODD_IDS[:3], np.array([1, 3]), np.arange(4.0), e.values, e.covariates)
    with pytest.raises(CorruptJournalError, match="inconsistent shapes"):
        decode_entry(4, encode_entry(bad))


def test_stream_ids_are_data(durable):
    rows = [{"stream": sid, "time": float(t), "a": float(i + t), "b": None} for i, sid in enumerate(ODD_IDS)
            for t in (1, 2)]
    reference = OnlineRunner(encoder(), MemoryStore(), CHANNELS)
    runner = OnlineRunner(encoder(), durable.open(), CHANNELS, capacity=3)
    for r in (reference, runner):
        r.observe(rows[:6])
        r.observe(rows[6:])
    runner.store.close()  # dies (the lease goes with it)
    again = OnlineRunner(encoder(), durable.open(), CHANNELS)
    assert again.forecast(ODD_IDS).equals(reference.forecast(ODD_IDS))
    assert sorted(again.store.iterate()) == sorted(ODD_IDS)
    if durable.backend == "sqlite":
        assert {p.name for p in durable.path.parent.iterdir()} <= {"s.db", "s.db-shm", "s.db-wal", "s.db-slab",
                                                                   "s.db-lock"}


def test_a_failed_journal_commit_leaves_no_trace(tmp_path):
    class FailingStore(SQLiteStore):
        fail = False

        def commit(self):
            if self.fail and self.staged_journal:
                raise OSError("disk full")
            super().commit()

    store = FailingStore(tmp_path / "s.db")
    runner = OnlineRunner(encoder(), store, CHANNELS)
    runner.observe(parts()[0])
    before, info = dump(tmp_path / "s.db"), runner.info(["s0", "s1", "s2"])
    store.fail = True
    with pytest.raises(OSError, match="disk full"):
        runner.observe(parts()[1])
    assert dump(tmp_path / "s.db") == before and runner.info(["s0", "s1", "s2"]).equals(info)
    assert list(store._staged_entries(0)) == []
    store.fail = False
    assert runner.observe(parts()[1]).seq == 2


def test_write_through_without_a_journal(durable):
    runner = OnlineRunner(encoder(), durable.open(), CHANNELS, policy=CommitPolicy(journal=False))
    runner.observe(parts()[0])
    assert list(runner.store.read_journal()) == [] and runner.store.get(["s0"])["s0"].steps > 0
    with pytest.raises(ValueError, match="a journal needs a JournaledStore"):
        OnlineRunner(encoder(), object(), CHANNELS, policy=CommitPolicy(journal=True))
    with pytest.raises(ValueError, match="'snapshot_every' expected a positive int"):
        CommitPolicy(snapshot_every=0)
    runner.close()
    runner.close()
    with pytest.raises(ValueError, match="the runner is closed"):
        runner.observe(parts()[1])
