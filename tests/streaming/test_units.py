"""Time and units as a person expects: the user's timestamp types and raw values at the runner's edge, forecasts
back in them, and a runner over a bare encoder that works in model units and says so."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest
import torch

from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.models.checkpoint import Checkpoint, Scaler, load_checkpoint, save_checkpoint
from gdn2ts.models.units import Limits, StreamScales, TimeSpec
from gdn2ts.streaming import MemoryStore, OnlineRunner
from gdn2ts.streaming.features import prepare_rows
from gdn2ts.streaming.units import CALENDAR, Units, time_in, time_out

CHANNELS = ("load", "temp")
SCALER = Scaler(CHANNELS, (500.0, 10.0), (50.0, 5.0))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ckpt(time: TimeSpec, covariates=CALENDAR, scales=None, limits=None) -> Checkpoint:
    torch.manual_seed(0)
    enc = StreamEncoder(EncoderConfig(n_channels=2, n_covariates=len(covariates), hidden_size=16, head_dim=8,
                                      horizon=3))
    return Checkpoint(enc, SCALER, tuple(covariates), time.unit_seconds, time, scales,
                      Limits() if limits is None else limits)


@pytest.mark.parametrize("spec, values", [
    (TimeSpec("datetime", 3600.0), [dt.datetime(2024, 3, 31, 0, 30), dt.datetime(2024, 10, 27, 2, 30)]),
    (TimeSpec("datetime", 900.0, time_zone="Europe/Paris"),
     [dt.datetime(2024, 3, 31, 1, 45), dt.datetime(2024, 3, 31, 3, 0), dt.datetime(2024, 10, 27, 23, 15)]),
    (TimeSpec("date", 86400.0), [dt.date(2019, 12, 31), dt.date(2020, 2, 29)]),
    (TimeSpec("number", 3600.0, number_unit="s"), [1.7e9, 1.7e9 + 5400.0]),
    (TimeSpec("number", 86400.0, number_unit="d"), [19000.0, 19001.5]),
])
def test_timestamps_round_trip_in_their_type(spec, values):
    column = pl.Series("t", values)
    if spec.time_zone:
        column = column.dt.replace_time_zone(spec.time_zone)
    model = time_in(column, spec)
    back = time_out(model, spec)
    assert back.dtype == column.dtype and back.to_list() == column.to_list()


def test_zones_offsets_and_clock_changes():
    paris = TimeSpec("datetime", 3600.0, time_zone="Europe/Paris")
    # a naive string is read in the spec's zone; an offset or Z is honoured
    naive, utc = (time_in(pl.Series("t", [s]), paris)[0] for s in ("2024-07-01 14:00", "2024-07-01T12:00:00Z"))
    assert naive == utc == time_in(pl.Series("t", ["2024-07-01T14:00:00+02:00"]), paris)[0]
    with pytest.raises(ValueError, match="2024-03-31 02:30:00 does not exist in Europe/Paris"):
        time_in(pl.Series("t", ["2024-03-31 02:30"]), paris)
    # calendar covariates read the local clock
    units = Units(SCALER, paris, ("hour_sin", "hour_cos"))
    rows = units.to_model(pl.DataFrame({"stream": ["a"], "time": ["2024-07-01 06:00"], "load": [500.0]}))
    assert rows["hour_sin"][0] == pytest.approx(1.0) and abs(rows["hour_cos"][0]) < 1e-12


def test_numbers_need_a_stated_unit_and_datetimes_refuse_numbers():
    with pytest.raises(ValueError, match="numeric timestamps need their unit stated"):
        TimeSpec("number", 3600.0)
    with pytest.raises(ValueError, match="holds numbers, but this model's timestamps are date-times"):
        time_in(pl.Series("time", [1.7e9]), TimeSpec("datetime", 3600.0))
    with pytest.raises(ValueError, match="got 'yesterday'"):
        time_in(pl.Series("time", ["yesterday"]), TimeSpec("date", 86400.0))


@pytest.mark.parametrize("kind", ["date-column", "naive-datetime-column", "aware-datetime-column", "strings"])
def test_python_api_takes_the_types_the_command_takes(tmp_path, kind):
    spec = TimeSpec("datetime", 3600.0, time_zone="Europe/Paris")
    model = ckpt(spec)
    days = [dt.datetime(2024, 5, 1, h) for h in (0, 1, 3)]
    if kind == "date-column":
        model = ckpt(TimeSpec("date", 86400.0), covariates=CALENDAR[2:])
        days = [dt.date(2024, 5, d) for d in (1, 2, 4)]
        time = pl.Series("time", days)
    elif kind == "naive-datetime-column":
        time = pl.Series("time", days)
    elif kind == "aware-datetime-column":
        time = pl.Series("time", days).dt.replace_time_zone("Europe/Paris").dt.convert_time_zone("Asia/Tokyo")
    else:
        time = pl.Series("time", [d.isoformat() for d in days])
    rows = pl.DataFrame({"stream": ["a", "a", "b"], "time": time, "load": [510.0, None, 470.0],
                         "temp": [11.0, 12.0, None]})
    runner = OnlineRunner.from_checkpoint(model, MemoryStore())
    assert runner.observe(rows).accepted == 3
    # the same rows through the command
    path = save_checkpoint(tmp_path / "m.safetensors", model.encoder, SCALER, model.covariates, time=model.time)
    src = tmp_path / "rows.parquet"
    rows.write_parquet(src)
    from gdn2ts.apps.stream_cli import run_stream

    run_stream(str(path), str(tmp_path / "s.db"), input=str(src), forecast_out=str(tmp_path / "fc.parquet"),
               quiet=True)
    cli = pl.read_parquet(tmp_path / "fc.parquet").sort("stream", "step", "channel")
    api = runner.forecast(["a", "b"]).sort("stream", "step", "channel")
    assert cli.select(api.columns).equals(api)


def test_forecasts_come_back_in_the_users_units_and_timestamp_type():
    scales = StreamScales(("a",), ((1000.0, 0.0),), ((10.0, 2.0),))
    spec = TimeSpec("datetime", 3600.0, time_zone="America/New_York")
    model = ckpt(spec, scales=scales)
    runner = OnlineRunner.from_checkpoint(model, MemoryStore())
    rows = pl.DataFrame({"stream": ["a", "b"], "time": ["2024-11-03 00:30", "2024-11-03 00:30"],
                         "load": [1010.0, 510.0], "temp": [1.0, 11.0]})
    runner.observe(rows)
    fc = runner.forecast(["a", "b"])
    assert fc.schema["origin"] == pl.Datetime("us", "America/New_York") == fc.schema["target_time"]
    a = fc.filter(pl.col("stream") == "a")
    # the clocks go back at 2:00 that night: three hours later is 2:30 local, in the second offset
    assert [t.isoformat() for t in a.filter(pl.col("channel") == "load")["target_time"]] == \
        ["2024-11-03T01:30:00-04:00", "2024-11-03T01:30:00-05:00", "2024-11-03T02:30:00-05:00"]
    # values: the model's quantiles unscaled with each stream's own scaling (b has none: the global one)
    bare = OnlineRunner(model.encoder, MemoryStore(), CHANNELS, CALENDAR)
    bare.observe(prepare_rows(rows, model))
    raw = bare.forecast(["a", "b"])
    for sid, (loc, scale) in (("a", ((1000.0, 0.0), (10.0, 2.0))), ("b", (SCALER.loc, SCALER.scale))):
        for j, ch in enumerate(CHANNELS):
            got = fc.filter((pl.col("stream") == sid) & (pl.col("channel") == ch))["q0.5"].to_numpy()
            want = raw.filter((pl.col("stream") == sid) & (pl.col("channel") == ch))["q0.5"].to_numpy()
            np.testing.assert_allclose(got, want * scale[j] + loc[j], rtol=1e-12)
    stats = runner.stats(["a"]).filter(pl.col("channel") == "load")
    assert stats["mean"][0] == pytest.approx(1010.0) and stats["count"][0] == 1
    info = runner.info(["a", "zz"])
    assert info["last_time"].dtype == pl.Datetime("us", "America/New_York") and info["last_time"][1] is None


def test_a_bare_runner_works_in_model_units_and_says_so():
    model = ckpt(TimeSpec("datetime", 3600.0))
    bare = OnlineRunner(model.encoder, MemoryStore(), CHANNELS, CALENDAR)
    assert bare.units is None
    with pytest.raises(ValueError, match="works in model units .* OnlineRunner.from_checkpoint"):
        bare.observe({"stream": ["a"], "time": [dt.datetime(2024, 5, 1)], "load": [0.1], "temp": [0.0],
                      **{c: [0.0] for c in CALENDAR}})
    # raw values into a model-unit runner are caught by the magnitude bound rather than applied as z-scores
    row = {"stream": ["a"], "time": [1.0], "load": [512.0], "temp": [0.1], **{c: [0.0] for c in CALENDAR}}
    result = bare.observe(row)
    assert result.accepted == 0 and result.reasons == {"beyond_max_abs": 1}
    assert "column 'load' is 512 model units, beyond max_abs=100" in result.rejected[0][2]
    bare.observe({**row, "load": [0.2]})
    fc = bare.forecast(["a"])
    assert fc.schema["origin"] == pl.Float64 and fc["origin"][0] == 1.0
    assert fc["target_time"].to_list()[:2] == [2.0, 2.0]
    # rows already converted to model units cannot go to a runner that converts them again
    units_runner = OnlineRunner.from_checkpoint(model, MemoryStore())
    prepared = prepare_rows(pl.DataFrame({"stream": ["a"], "time": ["2024-05-01"], "load": [510.0],
                                          "temp": [11.0]}), model)
    with pytest.raises(ValueError, match="holds numbers, but this model's timestamps are date-times"):
        units_runner.observe(prepared)


def test_version_1_checkpoints_still_load(tmp_path):
    from safetensors.torch import load_file, save_file

    model = ckpt(TimeSpec("datetime", 3600.0))
    path = save_checkpoint(tmp_path / "m.safetensors", model.encoder, SCALER, CALENDAR, 3600.0)
    tensors = load_file(str(path))
    with open(path, "rb") as f:
        import json

        meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    old = {k: meta[k] for k in ("config", "scaler", "covariates", "time_unit_seconds", "sha256")}
    save_file(tensors, str(path), metadata={**old, "format": "gdn2ts.encoder.v1"})
    loaded = load_checkpoint(path)
    assert loaded.time is None and loaded.scaling == "global" and loaded.columns == ("stream", "time")
    # numbers in model time units, as version 1 meant them; date-times convert
    assert loaded.time_spec == TimeSpec("number", 3600.0, number_unit="1h")
    runner = OnlineRunner.from_checkpoint(loaded, MemoryStore())
    hours = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc).timestamp() / 3600
    assert runner.observe({"stream": ["a"], "time": ["2024-05-01 00:00"], "load": [500.0], "temp": [10.0]}).accepted
    assert runner.observe({"stream": ["a"], "time": [hours], "load": [500.0], "temp": [10.0]}).reasons == \
        {"not_after_last": 1}
    assert runner.observe({"stream": ["a"], "time": [hours + 1], "load": [500.0], "temp": [10.0]}).accepted == 1
    assert runner.forecast(["a"])["origin"][0] == hours + 1


def test_one_stream_verbs_in_the_users_units():
    model = ckpt(TimeSpec("datetime", 3600.0, time_zone="Europe/Paris"))
    runner = OnlineRunner.from_checkpoint(model, MemoryStore())
    paris = dt.timezone(dt.timedelta(hours=2))
    runner.observe_one("a", dt.datetime(2024, 5, 1, 13, tzinfo=paris), {"load": 520.0, "temp": 11.0})
    runner.observe_one("a", "2024-05-01 14:00", {"load": 530.0})
    with pytest.raises(ValueError, match="observe_one: stream 'a': timestamp 2024-05-01 13:30:00\\+02:00 is not after"):
        runner.observe_one("a", dt.datetime(2024, 5, 1, 11, 30, tzinfo=dt.timezone.utc), {"load": 1.0})
    out = runner.forecast_one("a", horizon=1)
    table = runner.forecast(["a"])
    assert out["load"][0][0.5] == table.filter((pl.col("step") == 1) & (pl.col("channel") == "load"))["q0.5"][0]
    assert table["origin"][0].isoformat() == "2024-05-01T14:00:00+02:00"
    bare = OnlineRunner(model.encoder, MemoryStore(), CHANNELS, CALENDAR)
    with pytest.raises(ValueError, match="'timestamp' expected a finite number"):
        bare.observe_one("a", dt.datetime(2024, 5, 1), {"load": 0.1}, dict.fromkeys(CALENDAR, 0.0))
