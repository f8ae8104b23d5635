"""``gdn2ts stream``: CSV, JSON lines, Parquet and standard input through a checkpoint into a store; forecasts
out; bad files stop with a named error and leave the store as it was."""

from __future__ import annotations

import io
import json
import sys

import polars as pl
import pytest
import torch

from gdn2ts.apps.stream_cli import run_stream
from gdn2ts.cli import main
from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.models.checkpoint import Scaler, load_checkpoint, save_checkpoint
from gdn2ts.streaming import MemoryStore, OnlineRunner, SQLiteStore
from gdn2ts.streaming.features import CALENDAR, prepare_rows

CHANNELS = ("load", "temp")
ROWS = {
    "stream": ["a", "b", "a", "b", "a", "c"],
    "time": ["2020-03-02 00:00", "2020-03-02 00:00", "2020-03-02 01:00", "2020-03-02 03:00", "2020-03-02 02:00",
             "2020-03-01 23:00"],
    "load": [520.0, 610.0, None, 605.0, 530.0, 100.0],
    "temp": [11.5, 9.0, 12.0, None, 12.5, 3.0],
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    enc = StreamEncoder(EncoderConfig(n_channels=2, n_covariates=4, hidden_size=16, num_heads=2, head_dim=8,
                                      horizon=3))
    return save_checkpoint(tmp_path / "model.safetensors", enc, Scaler(CHANNELS, (500.0, 10.0), (50.0, 5.0)),
                           CALENDAR, time_unit_seconds=3600.0)


def _stored(path, ids=("a", "b", "c")):
    store = SQLiteStore(path)
    try:
        return {sid: rec for sid, rec in store.get(list(ids)).items() if rec is not None}
    finally:
        store.close()


def test_csv_stream_matches_the_runner_and_writes_forecasts(tmp_path, ckpt):
    src = tmp_path / "obs.csv"
    pl.DataFrame(ROWS).write_csv(src)
    out = tmp_path / "fc.csv"
    main(["stream", "--checkpoint", str(ckpt), "--store", str(tmp_path / "s.db"), "--input", str(src),
          "--forecast_out", str(out), "--batch_rows", "2", "--quiet", "true"])
    fc = pl.read_csv(out)
    assert fc.columns == ["stream", "origin", "target_time", "step", "channel", "q0.1", "q0.5", "q0.9", "error"]
    assert fc.height == 3 * 3 * 2 and set(fc["stream"]) == {"a", "b", "c"}
    # the same rows through the runner by hand (scaled, calendar covariates) give the same forecasts
    loaded = load_checkpoint(ckpt)
    runner = OnlineRunner(loaded.encoder, MemoryStore(), CHANNELS, CALENDAR)
    runner.observe(prepare_rows(pl.DataFrame(ROWS), loaded))
    ref = runner.forecast(["a", "b", "c"]).drop("origin", "target_time")
    mine = fc.sort(["stream", "step", "channel"])
    ref = ref.sort(["stream", "step", "channel"])
    scale = ref["channel"].replace_strict({"load": 50.0, "temp": 5.0}, return_dtype=pl.Float64)
    loc = ref["channel"].replace_strict({"load": 500.0, "temp": 10.0}, return_dtype=pl.Float64)
    # (float32 states; batches of two rows group the streams' steps differently than one call does)
    assert ((mine["q0.5"] - (ref["q0.5"] * scale + loc)).abs().max()) < 1e-4
    # this checkpoint states no timestamp type (numbers in hours): origins are the last timestamps in hours since
    # the epoch (2020-03-02 02:00 for a), each step one hour later
    a = fc.filter(pl.col("stream") == "a")
    assert a["origin"][0] == (18323 * 24 + 2) and (a["target_time"] - a["origin"] == a["step"]).all()
    assert _stored(tmp_path / "s.db")["a"].steps == 3


def test_jsonl_parquet_and_stdin_agree_with_csv(tmp_path, ckpt, monkeypatch):
    frame = pl.DataFrame(ROWS)
    results = {}
    for fmt in ("csv", "jsonl", "parquet", "stdin"):
        if fmt == "stdin":
            buf = io.BytesIO()
            frame.write_csv(buf)
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(buf.getvalue())))
            src = "-"
        else:
            src = str(tmp_path / f"obs.{fmt}")
            {"csv": frame.write_csv, "jsonl": frame.write_ndjson, "parquet": frame.write_parquet}[fmt](src)
        out = tmp_path / f"fc-{fmt}.parquet"
        summary = run_stream(str(ckpt), str(tmp_path / f"{fmt}.db"), input=src, forecast_out=str(out), quiet=True)
        assert summary == {**summary, "rows": 6, "accepted": 6, "rejected": 0, "streams": 3, "reasons": {}}
        results[fmt] = pl.read_parquet(out)
    for fmt in ("jsonl", "parquet", "stdin"):
        assert results[fmt].equals(results["csv"]), fmt


def test_numeric_timestamps_and_explicit_format(tmp_path, ckpt):
    src = tmp_path / "obs.txt"
    src.write_text("stream,time,load,temp\nx,100.0,510,10\nx,101.5,,11\n")
    summary = run_stream(str(ckpt), str(tmp_path / "s.db"), input=str(src), format="csv", quiet=True)
    assert summary["accepted"] == 2 and _stored(tmp_path / "s.db", ["x"])["x"].last_timestamp == 101.5
    with pytest.raises(ValueError, match="cannot tell the format"):
        run_stream(str(ckpt), str(tmp_path / "s.db"), input=str(src), quiet=True)


def test_out_of_order_rows_are_reported_and_the_rest_applied(tmp_path, ckpt, capsys):
    src = tmp_path / "obs.csv"
    src.write_text("stream,time,load,temp\na,10,510,10\na,10,520,10\nb,5,500,9\n")
    with pytest.raises(SystemExit) as stop:
        main(["stream", "--checkpoint", str(ckpt), "--store", str(tmp_path / "s.db"), "--input", str(src)])
    assert stop.value.code == 3  # rows were rejected
    err = capsys.readouterr().err
    assert "rejected: " in err and "'a'" in err and "applied 2 of 3 rows" in err
    assert "rejected 1 of 3 rows: not_after_last 1" in err
    assert set(_stored(tmp_path / "s.db")) == {"a", "b"}


@pytest.mark.parametrize("content, fmt, message", [
    ("stream,time,load,temp,pressure\na,1,1,1,1\n", "csv", "unknown columns ['pressure']"),
    ("stream,time,load,temp\na,1,1,1\na,2,inf,1\n", "csv", "'load' holds inf for stream 'a'"),
    ("stream,time,load,temp\na,1,high,1\n", "csv", "'load' expected numbers"),
    ("stream,when,load,temp\na,1,1,1\n", "csv", "lacks the column 'time'"),
    ("stream,time,load,temp\na,yesterday,1,1\n", "csv", "column 'time': timestamps expected numbers .*got 'yesterday'"),
    ("stream,time,load,temp\na,1,1,1\n,2,1,1\n", "csv", "every row needs a stream id"),
    ("stream,time,load,temp\na,1,1e308,1\n", "csv", "column 'load' of stream 'a': .* overflows to inf"),
    ("not parquet at all", "parquet", "cannot be read as parquet"),
    ('{"stream": "a", "time": 1, "load": 1}\n{broken', "jsonl", "cannot be read as jsonl"),
])
def test_bad_files_stop_with_a_named_error_and_change_nothing(tmp_path, ckpt, capsys, content, fmt, message):
    db = tmp_path / "s.db"
    good = tmp_path / "good.csv"
    good.write_text("stream,time,load,temp\na,0.5,500,10\n")
    run_stream(str(ckpt), str(db), input=str(good), quiet=True)
    before = _stored(db)["a"]
    bad = tmp_path / f"bad.{fmt}"
    bad.write_text(content)
    with pytest.raises(SystemExit, match="gdn2ts stream: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        main(["stream", "--checkpoint", str(ckpt), "--store", str(db), "--input", str(bad), "--batch_rows", "1"])
    after = _stored(db)
    assert set(after) == {"a"} and after["a"].steps == before.steps
    assert torch.equal(after["a"].tensors["last_output"], before.tensors["last_output"])


def test_missing_files_and_foreign_stores(tmp_path, ckpt):
    with pytest.raises(SystemExit, match="input file .* does not exist"):
        main(["stream", "--checkpoint", str(ckpt), "--store", str(tmp_path / "s.db"), "--input",
              str(tmp_path / "none.csv")])
    with pytest.raises(SystemExit, match="checkpoint .* does not exist"):
        main(["stream", "--checkpoint", str(tmp_path / "none.safetensors"), "--store", str(tmp_path / "s.db")])
    with pytest.raises(SystemExit, match="cannot tell the format of .*fc.xlsx"):
        main(["stream", "--checkpoint", str(ckpt), "--store", str(tmp_path / "s.db"), "--forecast_out",
              str(tmp_path / "fc.xlsx")])
    # a store written by another model is refused, naming the stream
    src = tmp_path / "obs.csv"
    src.write_text("stream,time,load,temp\na,1,500,10\n")
    run_stream(str(ckpt), str(tmp_path / "s.db"), input=str(src), quiet=True)
    enc = StreamEncoder(EncoderConfig(n_channels=2, n_covariates=4, hidden_size=16, num_heads=2, head_dim=8,
                                      horizon=3))
    other = save_checkpoint(tmp_path / "other.safetensors", enc, Scaler(CHANNELS, (0.0, 0.0), (1.0, 1.0)),
                            CALENDAR, time_unit_seconds=3600.0)
    src.write_text("stream,time,load,temp\na,2,500,10\n")
    with pytest.raises(SystemExit, match="holds the states of model .* not of this model"):
        main(["stream", "--checkpoint", str(other), "--store", str(tmp_path / "s.db"), "--input", str(src)])


# ---------------------------------------------------------------------------------------------------------------
# observations streamed in: micro-batches, capacity, follow, the other stream commands


def test_micro_batches_close_at_rows_or_time_whichever_first():
    import os
    import threading
    import time

    from gdn2ts.apps.stream_input import LineFeed, micro_batches

    read, write = os.pipe()
    feed = LineFeed(os.fdopen(read, "rb"))
    batches, seen = [], []

    def consume():
        for lines in micro_batches(feed, max_rows=3, max_seconds=0.15):
            batches.append(lines)
            seen.append(time.monotonic())

    worker = threading.Thread(target=consume)
    worker.start()
    out = os.fdopen(write, "wb", buffering=0)
    start = time.monotonic()
    out.write(b"one\n")
    time.sleep(0.6)  # a slow producer: the lone row is applied long before the next one comes
    assert batches == [[b"one\n"]] and seen[0] - start < 0.5
    out.write(b"a\nb\nc\nd\ne\n")  # a fast one: batches of max_rows
    out.close()
    worker.join(5)
    assert batches[1:] == [[b"a\n", b"b\n", b"c\n"], [b"d\n", b"e\n"]]


def test_a_batch_wider_than_the_working_set_is_split_by_stream(tmp_path, ckpt):
    rows = pl.DataFrame({"stream": [f"s{i % 7}" for i in range(21)],
                         "time": [f"2020-03-02 {i // 7:02d}:00" for i in range(21)],
                         "load": [500.0 + i for i in range(21)], "temp": [10.0] * 21})
    src = tmp_path / "wide.csv"
    rows.write_csv(src)
    summary = run_stream(str(ckpt), str(tmp_path / "s.db"), input=str(src), capacity=3, batch_rows=21,
                         forecast_out=str(tmp_path / "fc.csv"), quiet=True)
    assert summary["accepted"] == 21 and summary["rejected"] == 0
    # the same as applying it whole with room for every stream
    run_stream(str(ckpt), str(tmp_path / "t.db"), input=str(src), forecast_out=str(tmp_path / "ref.csv"), quiet=True)
    got, want = (pl.read_csv(tmp_path / f).sort("stream", "step", "channel") for f in ("fc.csv", "ref.csv"))
    assert ((got["q0.5"] - want["q0.5"]).abs().max()) < 1e-4
    assert {sid: rec.steps for sid, rec in _stored(tmp_path / "s.db", [f"s{i}" for i in range(7)]).items()} == \
        {f"s{i}": 3 for i in range(7)}


def test_standard_input_in_micro_batches_and_a_bad_line(tmp_path, ckpt, monkeypatch, capsys):
    good = "".join(f"a,2020-03-02 {h:02d}:00,{500 + h},10\n" for h in range(5))
    text = "stream,time,load,temp\n" + good + "a,2020-03-02 06:00,high,10\n" + "a,2020-03-02 07:00,500,10\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    # the header and four rows make the first batch of five lines; the second (lines 6-8) holds the bad one
    with pytest.raises(ValueError, match=r"standard input lines 6-8: .*column 'load' expected numbers, got 'high' "
                                         r"\(nothing of these lines was applied; the 4 rows accepted before them"):
        run_stream(str(ckpt), str(tmp_path / "s.db"), batch_rows=5, acks=True, quiet=True)
    acks = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert acks == [{"batch": 1, "rows": 4, "accepted": 4, "rejected": 0, "total_accepted": 4}]
    assert _stored(tmp_path / "s.db", ["a"])["a"].steps == 4


def test_follow_a_growing_file(tmp_path, ckpt):
    import threading
    import time

    src = tmp_path / "grows.jsonl"
    src.write_text('{"stream": "a", "time": "2020-03-02 00:00", "load": 500, "temp": 10}\n')
    result = {}
    worker = threading.Thread(target=lambda: result.update(run_stream(
        str(ckpt), str(tmp_path / "s.db"), input=str(src), follow=True, idle_exit=1.0, batch_ms=50, quiet=True)))
    worker.start()
    time.sleep(0.3)
    with src.open("a") as f:
        f.write('{"stream": "a", "time": "2020-03-02 01:00", "load": 510, "temp": 11}\n{"stream": "b", ')
        f.flush()
        time.sleep(0.3)  # half a line: read once it is complete
        f.write('"time": "2020-03-02 01:00", "load": 400, "temp": 9}\n')
    worker.join(10)
    assert result == {**result, "rows": 3, "accepted": 3, "batches": 3}
    assert {s: r.steps for s, r in _stored(tmp_path / "s.db", ["a", "b"]).items()} == {"a": 2, "b": 1}


def test_forecast_reset_and_delete_commands(tmp_path, ckpt, capsys):
    src = tmp_path / "obs.csv"
    pl.DataFrame(ROWS).write_csv(src)
    db = str(tmp_path / "s.db")
    run_stream(str(ckpt), db, input=str(src), quiet=True)
    main(["stream", "forecast", "--checkpoint", str(ckpt), "--store", db, "--out", str(tmp_path / "fc.parquet")])
    fc = pl.read_parquet(tmp_path / "fc.parquet")
    assert sorted(fc["stream"].unique()) == ["a", "b", "c"] and fc.height == 3 * 3 * 2
    main(["stream", "reset", "--checkpoint", str(ckpt), "--store", db, "--streams", "[a, nobody]"])
    assert "reset: 1 streams ['a']" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="gdn2ts stream delete: delete: unknown stream 'a'"):
        main(["stream", "delete", "--checkpoint", str(ckpt), "--store", db, "--streams", "[b, a]"])
    main(["stream", "delete", "--checkpoint", str(ckpt), "--store", db, "--streams", "[b]", "--quiet", "true"])
    assert set(_stored(tmp_path / "s.db")) == {"c"}
    with pytest.raises(SystemExit, match="unknown streams \\['a'\\]"):
        main(["stream", "forecast", "--checkpoint", str(ckpt), "--store", db, "--streams", "[a]"])


def test_an_interrupt_hands_on_the_open_batch_first():
    from gdn2ts.apps.stream_input import micro_batches

    class Interrupted:
        """A feed whose third wait is interrupted (SIGINT, or SIGTERM as the command maps it)."""

        def __init__(self):
            self.calls = 0
            self.error = None
            self.lines = self

        def get(self, timeout=None):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return f"row {self.calls}\n".encode()

    batches = []
    with pytest.raises(KeyboardInterrupt):
        for lines in micro_batches(Interrupted(), max_rows=10, max_seconds=5.0):
            batches.append(lines)
    assert batches == [[b"row 1\n", b"row 2\n"]]
