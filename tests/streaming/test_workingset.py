"""The bounded working set: many more streams than slots, lossless spills, bit-identical results."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.streaming import CommitPolicy, MemoryStore, OnlineRunner, SQLiteStore
from gdn2ts.streaming.workingset import StateLayout, WorkingSet

CHANNELS = ["a", "b"]


@pytest.fixture(autouse=True)
def one_thread():
    # tiny batches: a second intra-op thread only adds hand-offs on a busy 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def encoder():
    torch.manual_seed(0)
    return StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, n_layers=2, num_heads=2, head_dim=8, horizon=2))


def calls(n_streams, n_calls, per_call, seed=0):
    """Calls of `per_call` distinct random streams, one to three rows each, increasing times, some values missing."""
    rng = np.random.default_rng(seed)
    clock = np.zeros(n_streams)
    out = []
    for _ in range(n_calls):
        rows = []
        for s in rng.choice(n_streams, size=per_call, replace=False).tolist():
            for _ in range(int(rng.integers(1, 4))):
                clock[s] += rng.uniform(0.1, 2.0)
                a, b = rng.standard_normal(2)
                rows.append({"stream": f"s{s}", "time": clock[s], "a": None if rng.random() < 0.2 else a,
                             "b": None if rng.random() < 0.2 else b})
        out.append(pl.DataFrame(rows))
    return out


def components(runner, ids):
    """Every state component of the streams, flushed to the store first: {id: {name: tensor}}."""
    runner.flush()
    return {sid: rec.tensors for sid, rec in runner.store.get(ids).items()}


@pytest.mark.parametrize("store", ["memory-journal", "sqlite"])
def test_small_capacity_equals_all_hot_bit_for_bit(store, tmp_path):
    parts = calls(n_streams=60, n_calls=25, per_call=6)
    hot = OnlineRunner(encoder(), MemoryStore(), CHANNELS, capacity=64)
    small = OnlineRunner(encoder(), MemoryStore() if store == "memory-journal" else SQLiteStore(tmp_path / "s.db"),
                         CHANNELS, capacity=8, policy=CommitPolicy(journal=True))
    for part in parts:
        assert hot.observe(part).accepted == small.observe(part).accepted == part.height
        assert len(small.ws) <= 8
    assert all(pool.shape[0] == 8 for pool in small.ws.pools.values())
    ids = sorted(set(pl.concat(parts)["stream"].to_list()))
    assert len(ids) > 40  # most streams went through the store at least once
    assert hot.forecast(ids).equals(small.forecast(ids))
    assert hot.stats(ids).equals(small.stats(ids)) and hot.info(ids).equals(small.info(ids))
    a, b = components(hot, ids), components(small, ids)
    assert all(torch.equal(a[sid][k], b[sid][k]) for sid in ids for k in a[sid])


def test_spilled_and_reloaded_stream_is_bit_identical():
    rows = [{"stream": "x", "time": float(t), "a": float(t) / 3, "b": None if t % 2 else 1.0} for t in range(1, 6)]
    hot = OnlineRunner(encoder(), MemoryStore(), CHANNELS, capacity=4, policy=CommitPolicy(journal=True))
    cold = OnlineRunner(encoder(), MemoryStore(), CHANNELS, capacity=2, policy=CommitPolicy(journal=True))
    for r in (hot, cold):
        r.observe(rows[:3])
    assert "x" in cold.ws.slot_of and cold.store.get(["x"])["x"] is None  # dirty, only in the journal so far
    cold.observe([{"stream": "y", "time": 1.0, "a": 1.0, "b": 1.0}, {"stream": "z", "time": 1.0, "a": 2.0, "b": 2.0}])
    assert "x" not in cold.ws.slot_of and cold.store.get(["x"])["x"].steps == 3  # spilled, committed
    assert hot.forecast(["x"]).equals(cold.forecast(["x"]))  # read from the store, not loaded
    assert "x" not in cold.ws.slot_of
    for r in (hot, cold):
        r.observe(rows[3:])  # reloaded into a slot
    assert hot.forecast(["x"]).equals(cold.forecast(["x"]))
    a, b = components(hot, ["x"]), components(cold, ["x"])
    assert all(torch.equal(a["x"][k], b["x"][k]) for k in a["x"])


def test_many_streams_in_bounded_memory(tmp_path):
    """20,000 streams through 256 slots: the pools never grow and every stream is stored exactly once."""
    runner = OnlineRunner(encoder(), SQLiteStore(tmp_path / "s.db"), CHANNELS, capacity=256)
    sizes = {k: v.shape for k, v in runner.ws.pools.items()}
    n = 20_000
    for start in range(0, n, 256):
        ids = [f"m{i}" for i in range(start, min(n, start + 256))]
        runner.observe(pl.DataFrame({"stream": ids, "time": [1.0] * len(ids), "a": [0.5] * len(ids)}))
        assert len(runner.ws) <= 256
    assert {k: v.shape for k, v in runner.ws.pools.items()} == sizes
    runner.flush()
    assert len(runner.store) == n and list(runner.store.read_journal()) == []
    info = runner.info(["m0", "m19999", "unknown"])
    assert info["steps"].to_list() == [1, 1, 0] and info["last_time"].to_list() == [1.0, 1.0, None]


def test_a_call_beyond_capacity_is_refused_and_changes_nothing():
    runner = OnlineRunner(encoder(), MemoryStore(), CHANNELS, capacity=3)
    runner.observe([{"stream": "a", "time": 1.0, "a": 1.0}])
    before = runner.store.get(["a"])["a"]
    with pytest.raises(ValueError, match="touches 4 streams, more than the working set's capacity 3"):
        runner.observe([{"stream": s, "time": 2.0, "a": 1.0} for s in "abcd"])
    after = runner.store.get(["a"])["a"]
    assert after.steps == before.steps == 1 and runner.info(["a"])["steps"].to_list() == [1]


def test_working_set_loads_layout_checked_records():
    enc = encoder()
    layout = StateLayout(enc.init_state(1), 2)
    ws = WorkingSet(layout, capacity=2, store=MemoryStore(), fingerprint="m")
    slots = ws.acquire(["p", "q"])
    assert sorted(slots.tolist()) == [0, 1] and not ws.dirty.any()
    assert torch.isinf(ws.pools["last_time"]).all() and ws.pools["layer0.recurrent"].abs().sum() == 0
    with pytest.raises(ValueError, match="'capacity' expected a positive int"):
        WorkingSet(layout, capacity=0, store=MemoryStore(), fingerprint="m")
