"""Time as the data has it: a frequency per dataset and a regular grid of it per series.

A series' grid runs from its first timestamp to its last in steps of the frequency: ``"1h"``, ``"30m"``, ``"1d"``,
``"1w"``, ``"1mo"``, ``"1q"``, ``"1y"`` (polars duration strings; ``m`` is minutes, ``mo`` months) for datetime and
date columns, or a positive int for integer time columns. A timestamp the data lacks becomes a row with missing
values (never closed up); a timestamp off the grid, out of order or repeated is an error naming the series. The
frequency is given (``DataConfig.freq``) or inferred from the most common difference between consecutive
timestamps (month, quarter and year lengths are recognized). Timestamps stay in the user's type (polars Datetime
with its precision and time zone, Date, or integers) from input to forecast.
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl

from gdn2ts.forecasting.data import DataError

__all__ = ["check_time_dtype", "parse_freq", "infer_freq", "check_order", "regular_grid", "future_times"]

_FREQ = re.compile(r"^(\d+)(ns|us|ms|s|m|h|d|w|mo|q|y)$")
_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9,
       "d": 86400 * 10**9, "w": 7 * 86400 * 10**9}
_DAY_UNITS = ("d", "w", "mo", "q", "y")


def check_time_dtype(dtype: pl.DataType, column: str) -> None:
    """A time column must hold datetimes, dates or integers (a grid of steps needs exact arithmetic)."""
    if isinstance(dtype, pl.Datetime) or dtype == pl.Date or dtype.is_integer():
        return
    hint = " (parse it first, e.g. pl.col(c).str.to_datetime())" if dtype == pl.String else ""
    raise DataError(f"time column {column!r} expected datetimes, dates or integers, got {dtype}{hint}")


def parse_freq(freq, dtype: pl.DataType) -> str | int:
    """``freq`` checked against the time column's type: a duration string for datetimes and dates, a positive int
    for integers.

    Example:
        >>> parse_freq("1h", pl.Datetime("us")), parse_freq(7, pl.Int64), parse_freq("2", pl.Int32)
        ('1h', 7, 2)
    """
    if dtype.is_integer():
        if isinstance(freq, str) and freq.isdigit():
            freq = int(freq)
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise DataError(f"freq {freq!r}: the time column holds integers, expected a positive int step")
        return freq
    m = _FREQ.match(freq) if isinstance(freq, str) else None
    if m is None or int(m.group(1)) < 1:
        raise DataError(f"freq {freq!r}: expected a duration like '1h', '30m', '15s', '1d', '1w', '1mo', '1q', '1y' "
                        f"(m is minutes, mo months) for a {dtype} time column")
    if dtype == pl.Date and m.group(2) not in _DAY_UNITS:
        raise DataError(f"freq {freq!r}: the time column holds dates, expected whole days ('1d', '1w', '1mo', ...)")
    return freq


def _physical(col: pl.Series) -> np.ndarray:
    col = col.to_physical()
    return col.to_numpy() if col.dtype.is_float() else col.cast(pl.Int64).to_numpy()


def _ns_per_unit(dtype: pl.DataType) -> int:
    if dtype == pl.Date:
        return _NS["d"]
    return {"ns": 1, "us": 1_000, "ms": 1_000_000}[dtype.time_unit]


def _duration(ns: int) -> str:
    for unit in ("w", "d", "h", "m", "s", "ms", "us", "ns"):
        if ns % _NS[unit] == 0:
            return f"{ns // _NS[unit]}{unit}"
    raise AssertionError(ns)


def infer_freq(times: list[pl.Series]) -> str | int:
    """The most common difference between consecutive timestamps over all series, as a frequency.

    Differences of 28 to 31 days read as ``1mo``, of 89 to 92 days as ``1q``, of 365 or 366 days as ``1y``.

    Example:
        >>> from datetime import datetime
        >>> t = pl.Series([datetime(2020, 1, 1, h) for h in (0, 1, 2, 5, 6)])
        >>> infer_freq([t]), infer_freq([pl.Series([3, 5, 7, 11])])
        ('1h', 2)
    """
    diffs = [np.diff(_physical(t)) for t in times if len(t) > 1]
    diffs = np.concatenate(diffs) if diffs else np.zeros(0, np.int64)
    diffs = diffs[diffs > 0]
    if len(diffs) == 0:
        raise DataError("freq: cannot infer the frequency (no series has two distinct timestamps); give "
                        "DataConfig.freq, e.g. '1h' or '1d'")
    values, counts = np.unique(diffs, return_counts=True)
    mode = int(values[np.argmax(counts)])
    dtype = times[0].dtype
    if dtype.is_integer():
        return mode
    ns = mode * _ns_per_unit(dtype)
    days = ns / _NS["d"]
    for lo, hi, name in ((28, 31, "1mo"), (89, 92, "1q"), (365, 366, "1y")):
        if lo <= days <= hi:
            return name
    return _duration(ns)


def check_order(time: pl.Series, series_id) -> None:
    """Timestamps of one series in row order: present, strictly increasing (none repeated, none going back)."""
    if time.null_count():
        raise DataError(f"series {series_id!r}: {time.null_count()} missing timestamps in {time.name!r}")
    d = np.diff(_physical(time))
    bad = np.flatnonzero(d <= 0)
    if len(bad):
        i = int(bad[0])
        what = "repeated" if d[i] == 0 else "going backwards"
        raise DataError(f"series {series_id!r}: timestamps {what} at its rows {i} and {i + 1} ({time[i]} then "
                        f"{time[i + 1]}); expected each series' rows in increasing time, each time once (sort the "
                        f"frame by id and time, and drop duplicates)")


def _range(first, last, freq, dtype: pl.DataType) -> pl.Series:
    if dtype.is_integer():
        return pl.Series(np.arange(first, last + 1, freq, dtype=np.int64)).cast(dtype)
    if dtype == pl.Date:
        return pl.date_range(first, last, freq, eager=True)
    return pl.datetime_range(first, last, freq, eager=True, time_unit=dtype.time_unit, time_zone=dtype.time_zone)


def regular_grid(rows: pl.DataFrame, time: str, freq, series_id) -> pl.DataFrame:
    """One series' rows on its regular grid: a row per step from its first to its last timestamp, the steps the
    data lacks inserted with every other column null.

    Example:
        >>> g = regular_grid(pl.DataFrame({"t": [0, 2, 3, 6], "y": [1.0, 2.0, 3.0, 4.0]}), "t", 1, "a")
        >>> g["t"].to_list(), g["y"].to_list()
        ([0, 1, 2, 3, 4, 5, 6], [1.0, None, 2.0, 3.0, None, None, 4.0])
    """
    col = rows[time]
    grid = _range(col[0], col[-1], freq, col.dtype).alias(time)
    off = ~col.is_in(grid.implode())
    if off.any():
        t = col.filter(off)[0]
        raise DataError(f"series {series_id!r}: timestamp {t} is not on the grid of freq {freq!r} from its first "
                        f"timestamp {col[0]}; expected every timestamp a whole number of steps after the first "
                        f"(give DataConfig.freq to match the data)")
    if len(grid) == rows.height:
        return rows
    return grid.to_frame().join(rows, on=time, how="left").sort(time).select(rows.columns)


def future_times(last: pl.Series, freq, steps: int) -> pl.Series:
    """The ``steps`` grid timestamps after ``last`` (a one-element series holding a series' last timestamp).

    Example:
        >>> from datetime import date
        >>> future_times(pl.Series("t", [date(2020, 1, 31)]), "1mo", 2).to_list()
        [datetime.date(2020, 2, 29), datetime.date(2020, 3, 31)]
    """
    dtype = last.dtype
    if dtype.is_integer():
        return pl.Series(last.name, last[0] + freq * np.arange(1, steps + 1, dtype=np.int64)).cast(dtype)
    n, unit = _FREQ.match(freq).groups()
    end = last.dt.offset_by(f"{int(n) * steps}{unit}")[0]
    out = _range(last[0], end, freq, dtype)
    if len(out) != steps + 1:
        raise DataError(f"freq {freq!r}: {steps} steps after {last[0]} did not form a regular grid")
    return out.slice(1).alias(last.name)
