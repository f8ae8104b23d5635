"""Time that is time: a frequency per dataset, each series on its regular grid, gaps as missing steps (never closed
up), windows with nothing to score left out, and named errors for time the grid cannot hold."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from gdn2ts.forecasting.codec import resolve_freq, series_frames
from gdn2ts.forecasting.data import DataConfig, DataError
from gdn2ts.forecasting.lightning import ForecastDataModule
from gdn2ts.forecasting.timegrid import infer_freq, parse_freq, regular_grid

from forecast_frames import counts_frame


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"layout": "long", "id_column": "store", "time_column": "time", "targets": ("visits",),
                         "lookback": 24, "horizon": 12, "fractions": (0.8, 0.2, 0.0), **kw})


def test_gaps_become_missing_steps_and_windows_with_nothing_to_score_are_left_out():
    # a 30-hour gap (hours 100..129 absent) inside the training rows of every series
    frame = counts_frame(n_series=2, n_hours=240, gaps=((100, 130),), time_zone=None)
    dm = ForecastDataModule(_cfg(), frame)
    dm.setup()
    assert dm.codec.freq == "1h"
    for s in dm.series:
        assert len(s.times) == 240 and s.stamps.diff().drop_nulls().unique().to_list() == [timedelta(hours=1)]
        assert np.isnan(s.values[100:130]).all() and not np.isnan(s.values[:100]).any()
    # by hand, per series: 192 training rows have 192 - 36 + 1 = 157 windows; those starting at 76..94 forecast
    # only gap hours (19), those starting at 100..106 read only gap hours (7)
    assert len(dm.datasets["train"]) == 2 * (157 - 19 - 7)
    starts = {t for _, t in dm.datasets["train"].index}
    assert not starts & (set(range(76, 95)) | set(range(100, 107))) and {75, 95, 99, 107} <= starts
    for k in range(len(dm.datasets["train"])):
        item = dm.datasets["train"][k]
        assert not np.isnan(item["target"].numpy()).all() and not np.isnan(item["values"].numpy()).all()
    # a window across the gap spans its lookback + horizon in hours, not rows of the file
    assert (0, 95) in dm.datasets["train"].index
    s = dm.series[0]
    assert s.stamps[95 + 24 + 12 - 1] - s.stamps[95] == timedelta(hours=35)


def test_frequency_is_given_or_inferred():
    hourly = counts_frame(n_series=2, n_hours=50, gaps=((10, 20),), time_zone="UTC")
    assert resolve_freq(hourly, _cfg()) == "1h"
    assert resolve_freq(hourly, _cfg(freq="30m")) == "30m"
    monthly = pl.DataFrame({"store": ["a"] * 6, "time": [date(2020, m, 1) for m in (1, 2, 3, 5, 6, 7)],
                            "visits": [1.0] * 6})
    assert resolve_freq(monthly, _cfg()) == "1mo"
    g = series_frames(monthly, _cfg(), "1mo")[0][1]
    assert g["time"].to_list() == [date(2020, m, 1) for m in range(1, 8)] and g["visits"].null_count() == 1
    assert infer_freq([pl.Series([0, 5, 10, 20, 25])]) == 5
    assert infer_freq([pl.Series([datetime(2020, 1, d) for d in (1, 8, 15, 29)])]) == "1w"
    assert parse_freq("15", pl.Int32) == 15
    # every series keeps its own grid: a half-hourly frame given freq '1h' puts the half hours off the grid
    half = pl.DataFrame({"store": ["a"] * 4, "time": [datetime(2020, 1, 1, 0, m) for m in (0, 30)] +
                         [datetime(2020, 1, 1, 1, m) for m in (0, 30)], "visits": [1.0] * 4})
    with pytest.raises(DataError, match=r"series 'a': timestamp 2020-01-01 00:30:00 is not on the grid of freq '1h'"):
        series_frames(half, _cfg(freq="1h"), "1h")


def test_regular_grid_inserts_rows_and_keeps_the_dtype():
    rows = pl.DataFrame({"t": pl.Series([2, 3, 7], dtype=pl.Int32), "y": [1.0, 2.0, 3.0]})
    g = regular_grid(rows, "t", 1, "a")
    assert g.schema == rows.schema and g["t"].to_list() == list(range(2, 8))
    assert g["y"].to_list() == [1.0, 2.0, None, None, None, 3.0]


@pytest.mark.parametrize("case, message", [
    ("backwards", r"series 'store0': timestamps going backwards at its rows 2 and 3"),
    ("duplicated", r"series 'store0': timestamps repeated at its rows 2 and 3"),
    ("off_grid", r"is not on the grid of freq '1h'"),
    ("freq_for_dates", r"freq '1h': the time column holds dates"),
    ("freq_for_ints", r"freq '1h': the time column holds integers, expected a positive int step"),
    ("bad_freq", r"freq '1 hour': expected a duration like '1h'"),
    ("not_inferable", r"cannot infer the frequency"),
    ("string_time", r"time column 'time' expected datetimes, dates or integers, got String \(parse it first"),
    ("string_target", r"target column 'visits' expected numbers, got String"),
    ("unknown_column", r"unknown columns \['price'\] \(not in the frame\)"),
    ("known_null", r"series 'store0' has a missing known covariate 'hour'"),
    ("static_varies", r"static covariate 'region' expected one value on every row"),
    ("two_roles", r"column 'hour' is in both 'known' and 'past'"),
])
def test_bad_input_is_named(case, message):
    frame = counts_frame(n_series=1, n_hours=30, time_zone=None)
    cfg = _cfg(known=("hour",), static=("region",))
    t = pl.col("time")
    if case == "backwards":
        frame = pl.concat([frame.slice(0, 3), frame.slice(1, 1), frame.slice(3)])
    elif case == "duplicated":
        frame = pl.concat([frame.slice(0, 3), frame.slice(2)])
    elif case == "off_grid":
        frame = frame.with_columns(pl.when(pl.col("hour") == 5).then(t + timedelta(minutes=10)).otherwise(t))
    elif case == "freq_for_dates":
        frame, cfg = frame.with_columns(t.dt.date()).unique("time", keep="first", maintain_order=True), \
            _cfg(freq="1h")
    elif case == "freq_for_ints":
        frame, cfg = frame.with_row_index("i").with_columns(time=pl.col("i").cast(pl.Int64)), _cfg(freq="1h")
    elif case == "bad_freq":
        cfg = _cfg(freq="1 hour")
    elif case == "not_inferable":
        frame = frame.head(1)
    elif case == "string_time":
        frame = frame.with_columns(t.dt.to_string())
    elif case == "string_target":
        frame = frame.with_columns(pl.col("visits").cast(pl.String))
    elif case == "unknown_column":
        cfg = _cfg(known=("hour", "price"))
    elif case == "known_null":
        frame = frame.with_columns(hour=pl.when(pl.col("hour") == 4).then(None).otherwise(pl.col("hour")))
    elif case == "static_varies":
        frame = frame.with_columns(region=pl.when(pl.col("hour") == 4).then(pl.lit("x")).otherwise(pl.col("region")))
    elif case == "two_roles":
        with pytest.raises(DataError, match=message):
            _cfg(known=("hour",), past=("hour",))
        return
    with pytest.raises(DataError, match=message):
        ForecastDataModule(cfg, frame).setup()
