"""Bad input at the observation edge, and streams reset or deleted: every bad-input class leaves every stored
state as it was (hashed before and after), and a rejected row never poisons its stream."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
import torch

from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.models.checkpoint import Checkpoint, Scaler
from gdn2ts.models.units import Limits, TimeSpec
from gdn2ts.streaming import OnlineRunner, SQLiteStore, UnknownStreamError

CHANNELS = ("load", "temp")
DAYS = TimeSpec("number", 86400.0, number_unit="d")  # numbers count days since 1970-01-01


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(time=DAYS, limits=None, scale=(50.0, 1e-300)) -> Checkpoint:
    torch.manual_seed(0)
    enc = StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, head_dim=8, horizon=3))
    return Checkpoint(enc, Scaler(CHANNELS, (500.0, 10.0), scale), (), time.unit_seconds, time,
                      limits=Limits(max_gap=3650.0, time_range=(19000.0, 19100.0)) if limits is None else limits)


def digest(store) -> str:
    """Every stored state (records and journal entries), through the store's own reads."""
    h = hashlib.sha256()
    ids = sorted(store.iterate())
    records = store.get(ids)
    for sid in ids:
        r = records[sid]
        h.update(repr((sid, r.steps, r.last_timestamp, r.journal_seq)).encode())
        for name in sorted(r.tensors):
            h.update(name.encode() + r.tensors[name].numpy().tobytes())
    for seq, payload in store.read_journal():
        h.update(str(seq).encode() + payload)
    return h.hexdigest()


def row(stream="a", time=19050.0, load=510.0, temp=10.0):
    return {"stream": [stream], "time": [time], "load": [load], "temp": [temp]}


@pytest.fixture
def runner(tmp_path):
    r = OnlineRunner.from_checkpoint(model(), SQLiteStore(tmp_path / "s.db"))
    r.observe({"stream": ["a", "a", "b"], "time": [19050.0, 19051.0, 19050.0], "load": [510.0, 490.0, 505.0],
               "temp": [10.0, 10.0, 10.0]})
    yield r
    r.close()


def test_an_overflow_names_the_column_and_the_stream(runner):
    before = digest(runner.store)
    # temp's scale is 1e-300: 11 becomes 1e300 (finite in float64) and that is inf in the model's float32
    with pytest.raises(ValueError, match="column 'temp' of stream 'b': 1e\\+300 \\(model units\\) overflows to inf"):
        runner.observe(row("b", 19052.0, temp=11.0))
    # a value that is inf once scaled in float64
    with pytest.raises(ValueError, match="column 'temp' of stream 'a': 1e\\+10 overflows to inf when scaled"):
        runner.observe(row("a", 19052.0, temp=1e10))
    assert digest(runner.store) == before


def test_values_beyond_max_abs_are_reported_not_saturated(tmp_path):
    r = OnlineRunner.from_checkpoint(model(scale=(50.0, 5.0)), SQLiteStore(tmp_path / "s.db"))
    r.observe(row("a", 19050.0))
    r.flush()
    before, fc = digest(r.store), r.forecast(["a"])
    # 1e3, 1e6 and 1e10 would all saturate the encoder alike: each is rejected, named, and changes nothing
    for big in (1e4, 1e6, 1e10):
        result = r.observe(row("a", 19051.0, load=big))
        assert result.accepted == 0 and result.reasons == {"beyond_max_abs": 1}
        assert f"stream 'a' at 19051.0: column 'load' is {(big - 500) / 50:g} standard deviations" in \
            result.rejected[0][2]
    assert digest(r.store) == before and r.forecast(["a"]).equals(fc)
    # the bound is the runner's: a wider one applies the same row
    r.close()
    wide = OnlineRunner.from_checkpoint(model(scale=(50.0, 5.0)), SQLiteStore(tmp_path / "s.db"),
                                        limits=Limits(max_abs=1e9))
    assert wide.observe(row("a", 19051.0, load=1e4)).accepted == 1
    wide.close()


def test_a_timestamp_in_the_wrong_unit_is_rejected_instead_of_poisoning_the_stream(runner):
    before = digest(runner.store)
    epoch_seconds = dt.datetime(2022, 1, 5, tzinfo=dt.timezone.utc).timestamp()
    result = runner.observe({"stream": ["a", "a"], "time": [epoch_seconds, epoch_seconds + 60],
                             "load": [500.0, 501.0], "temp": [10.0, 10.0]})
    assert result.accepted == 0 and result.reasons == {"too_far": 2}
    assert "is more than max_gap=3650 time units after its last observation 19051.0" in result.rejected[0][2]
    assert digest(runner.store) == before
    # the stream is not poisoned: its next real row is applied
    assert runner.observe(row("a", 19052.0)).accepted == 1
    # within one call: the row after a jump is rejected with it, the rows before it are applied
    result = runner.observe({"stream": ["b"] * 3, "time": [19051.0, 19051.0 + 5000, 19051.0 + 5001],
                             "load": [500.0] * 3, "temp": [10.0] * 3})
    assert result.accepted == 1 and result.reasons == {"too_far": 2}
    # a new stream is placed against the training data's time range
    assert runner.observe(row("new", epoch_seconds)).reasons == {"too_far": 1}
    assert runner.observe(row("new", 19200.0)).accepted == 1


@pytest.mark.parametrize("time, batch, pattern", [
    (DAYS, {"stream": ["a"], "time": [dt.datetime(2022, 1, 5)], "load": ["high"], "temp": [1.0]},
     "column 'load' expected numbers, got 'high'"),
    (TimeSpec("datetime", 86400.0), row("a", 19060.0), "holds numbers, but this model's timestamps are date-times"),
    (TimeSpec("datetime", 86400.0, time_zone="Europe/Paris"), row("a", "2022-03-27 02:30"),
     "does not exist in Europe/Paris"),
    (DAYS, row("a", "soon"), "timestamps expected numbers .*got 'soon'"),
    (DAYS, {"stream": [None], "time": [19060.0], "load": [1.0], "temp": [1.0]}, "every row needs a stream id"),
])
def test_unreadable_batches_change_nothing(tmp_path, time, batch, pattern):
    r = OnlineRunner.from_checkpoint(model(time, scale=(50.0, 5.0)), SQLiteStore(tmp_path / "s.db"))
    r.observe(row("a", "2022-01-05 00:00" if time.kind == "datetime" else 19000.0))
    before = digest(r.store)
    with pytest.raises(ValueError, match=pattern):
        r.observe(batch)
    assert digest(r.store) == before
    r.close()


def test_a_bare_runner_refuses_date_times_and_changes_nothing(tmp_path):
    m = model()
    r = OnlineRunner(m.encoder, SQLiteStore(tmp_path / "s.db"), CHANNELS)
    r.observe(row("a", 1.0, 0.5, 0.1))
    before = digest(r.store)
    with pytest.raises(ValueError, match="works in model units"):
        r.observe(row("a", dt.datetime(2024, 1, 1), 0.5, 0.1))
    assert digest(r.store) == before
    r.close()
    unbounded = OnlineRunner(m.encoder, SQLiteStore(tmp_path / "s.db"), CHANNELS, limits=Limits(max_abs=None))
    before = digest(unbounded.store)
    with pytest.raises(ValueError, match="column 'load' of stream 'a': 1e\\+300 \\(model units\\) overflows"):
        unbounded.observe(row("a", 2.0, 1e300))
    assert digest(unbounded.store) == before
    unbounded.close()


def test_reset_forgets_a_stream_durably(tmp_path):
    r = OnlineRunner.from_checkpoint(model(), SQLiteStore(tmp_path / "s.db"))
    r.observe({"stream": ["a", "b", "a"], "time": [19050.0, 19050.0, 19060.0], "load": [510.0, 505.0, 490.0],
               "temp": [10.0, 10.0, 10.0]})
    b_before = r.forecast(["b"])
    assert r.reset(["a", "unknown"]) == ["a"]
    assert r.info(["a"])["steps"][0] == 0 and r.forecast(["b"]).equals(b_before)
    with pytest.raises(UnknownStreamError, match="unknown stream 'a'"):
        r.forecast(["a"])
    # the reset stream starts afresh: a timestamp before its old last one is applied
    assert r.observe(row("a", 19055.0)).accepted == 1
    r.store.close()  # dies without a snapshot: the journal holds the call after the reset
    again = OnlineRunner.from_checkpoint(model(), SQLiteStore(tmp_path / "s.db"))
    assert again.info(["a", "b"])["steps"].to_list() == [1, 1]
    assert again.forecast(["a"])["origin"][0] == 19055.0
    again.close()


def test_delete_removes_streams_and_refuses_unknown_ones(tmp_path):
    r = OnlineRunner.from_checkpoint(model(), SQLiteStore(tmp_path / "s.db"))
    r.observe({"stream": ["a", "b"], "time": [19050.0, 19050.0], "load": [510.0, 505.0], "temp": [10.0, 10.0]})
    r.flush()
    before = digest(r.store)
    with pytest.raises(UnknownStreamError, match="delete: unknown stream 'zz'"):
        r.delete(["a", "zz"])
    assert digest(r.store) == before and r.info(["a"])["steps"][0] == 1
    r.delete(["a"])
    assert list(r.store.iterate()) == ["b"]
    r.store.close()  # dies right after: the deletion was committed
    again = OnlineRunner.from_checkpoint(model(), SQLiteStore(tmp_path / "s.db"))
    assert again.info(["a", "b"])["steps"].to_list() == [0, 1]
    again.close()
