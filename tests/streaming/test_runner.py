"""The online runner: batched observe == the encoder's own path, restarts continue exactly, bad rows and batches."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.streaming import FingerprintMismatchError, MemoryStore, OnlineRunner, SQLiteStore

from stored import digest as store_digest

CHANNELS = ["load", "temp"]


def encoder(seed=0):
    torch.manual_seed(seed)
    return StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, n_layers=2, num_heads=2, head_dim=8,
                                       horizon=3)).double()


def batches(n_streams=4, T=12, seed=0):
    """Irregular, interleaved observations with missing channels, cut into three batches."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for s in range(n_streams):
        t = 0.0
        for _ in range(T):
            t += float(torch.rand(1, generator=gen)) * 2 + 0.1
            load, temp = (float(x) for x in torch.randn(2, generator=gen))
            miss = torch.rand(2, generator=gen) < 0.25
            rows.append({"stream": f"s{s}", "time": t, "load": None if miss[0] else load,
                         "temp": None if miss[1] else temp})
    rows.sort(key=lambda r: r["time"])
    k = len(rows) // 3
    return [pl.DataFrame(rows[:k]), pl.DataFrame(rows[k:2 * k]), pl.DataFrame(rows[2 * k:])]


def test_observe_equals_the_encoder_forward():
    enc = encoder()
    runner = OnlineRunner(enc, MemoryStore(), CHANNELS)
    parts = batches(n_streams=3)
    for b in parts:
        assert runner.observe(b).accepted == b.height
    full = pl.concat(parts).filter(pl.col("stream") == "s1").sort("time")
    values = torch.tensor(full.select(CHANNELS).fill_null(float("nan")).to_numpy(), dtype=torch.float64)[None]
    times = torch.tensor(full["time"].to_numpy(), dtype=torch.float64)[None]
    ref = enc(values, times)["forecast"][0, -1]  # [H, C, Q]
    got = runner.forecast(["s1"])  # rows: step-major, channels in the configured order
    q = torch.tensor(got.select(["q0.1", "q0.5", "q0.9"]).to_numpy()).view(3, 2, 3)
    torch.testing.assert_close(q, ref.detach(), atol=1e-9, rtol=1e-8)


def test_restart_continues_exactly(tmp_path):
    parts = batches()
    uninterrupted = OnlineRunner(encoder(), MemoryStore(), CHANNELS)
    for b in parts:
        uninterrupted.observe(b)
    first = OnlineRunner(encoder(), SQLiteStore(tmp_path / "s.db"), CHANNELS)
    first.observe(parts[0])
    first.observe(parts[1])
    first.store.close()
    second = OnlineRunner(encoder(), SQLiteStore(tmp_path / "s.db"), CHANNELS)  # a new process, same weights
    second.observe(parts[2])
    ids = [f"s{i}" for i in range(4)]
    a, b = uninterrupted.forecast(ids), second.forecast(ids)
    assert a.equals(b)
    # the third call is in the journal until the next snapshot; flush writes the states themselves
    assert second.info(["s0"])["steps"].to_list() == [12]
    second.flush()
    assert second.store.get(["s0"])["s0"].steps == 12


def test_rows_not_after_the_last_observation_are_rejected_alone():
    runner = OnlineRunner(encoder(), MemoryStore(), CHANNELS)
    runner.observe([{"stream": "a", "time": 5.0, "load": 1.0, "temp": 2.0},
                    {"stream": "b", "time": 5.0, "load": 1.0, "temp": 2.0}])
    before = runner.store.get(["a"])["a"]
    result = runner.observe([{"stream": "a", "time": 5.0, "load": 3.0, "temp": None},
                             {"stream": "b", "time": 6.0, "load": 3.0, "temp": None},
                             {"stream": "b", "time": 6.0, "load": 4.0, "temp": None}])
    assert result.accepted == 1
    assert [(r[0], r[1]) for r in result.rejected] == [("a", 5.0), ("b", 6.0)]
    assert "stream 'a': timestamp 5.0 is not after its last observation 5.0" in result.rejected[0][2]
    after = runner.store.get(["a"])["a"]
    assert after.steps == before.steps and all(torch.equal(after.tensors[k], before.tensors[k])
                                               for k in before.tensors)


@pytest.mark.parametrize("rows,pattern", [
    ([{"stream": "a", "time": 1.0, "load": float("inf"), "temp": 0.0}], "holds inf for stream 'a'"),
    ([{"stream": "a", "time": 1.0, "load": 1.0, "humidity": 3.0}], r"unknown columns \['humidity'\]"),
    ([{"stream": "a", "load": 1.0}], r"lacks required columns \['time'\]"),
    ([{"stream": "a", "time": 1.0, "load": "high"}], "column 'load' expected numbers"),
    ([{"stream": "a", "time": float("nan"), "load": 1.0}], "column 'time' expected finite values"),
    ([{"stream": None, "time": 1.0, "load": 1.0}], "stream ids must not be null"),
])
def test_bad_batches_change_nothing(rows, pattern):
    runner = OnlineRunner(encoder(), MemoryStore(), CHANNELS)
    runner.observe([{"stream": "a", "time": 0.5, "load": 1.0, "temp": 1.0}])
    before = runner.store.get(["a"])["a"]
    with pytest.raises(ValueError, match=pattern):
        runner.observe(rows)
    after = runner.store.get(["a"])["a"]
    assert after.steps == before.steps


def test_state_written_by_another_model_is_refused(tmp_path):
    """A store belongs to one model: a runner of another model is refused at open, before it can add a stream,
    and the store is left as it was."""
    with OnlineRunner(encoder(seed=0), SQLiteStore(tmp_path / "s.db"), CHANNELS) as first:  # close: snapshot
        first.observe(batches()[0])
        steps = first.info(["s0"])["steps"][0]
    before = store_digest(tmp_path / "s.db")
    with pytest.raises(FingerprintMismatchError, match="holds the states of model .*, not of this model"):
        OnlineRunner(encoder(seed=1), SQLiteStore(tmp_path / "s.db"), CHANNELS)
    assert store_digest(tmp_path / "s.db") == before
    with OnlineRunner(encoder(seed=0), SQLiteStore(tmp_path / "s.db"), CHANNELS) as again:
        assert again.info(["s0"])["steps"][0] == steps


def test_unknown_stream_forecast_is_an_error():
    runner = OnlineRunner(encoder(), MemoryStore(), CHANNELS)
    with pytest.raises(KeyError, match="unknown stream 'zz'"):
        runner.forecast(["zz"])


def test_failed_commit_leaves_no_trace():
    class FailingStore(MemoryStore):
        fail = True

        def commit(self):
            if self.fail:
                raise OSError("disk full")
            super().commit()

    store = FailingStore()
    runner = OnlineRunner(encoder(), store, CHANNELS)
    with pytest.raises(OSError, match="disk full"):
        runner.observe([{"stream": "a", "time": 1.0, "load": 1.0, "temp": 2.0}])
    assert store.get(["a"])["a"] is None  # nothing staged is left to be read back
    store.fail = False
    assert runner.observe([{"stream": "a", "time": 1.0, "load": 1.0, "temp": 2.0}]).accepted == 1
    assert store.get(["a"])["a"].steps == 1
