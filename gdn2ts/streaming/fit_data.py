"""From a user's long-format rows (stream id, timestamp, channels, optional covariates; irregular times, missing
values) to what :func:`gdn2ts.streaming.train.fit` trains on, with no regular grid asked of the user.

* :func:`infer_time_spec`: the timestamp type from the column (date-times, naive or with a zone; dates; numbers
  only with their unit stated) and the model's time unit from the data (each stream's median spacing, snapped to
  a common unit) unless given.
* :func:`split_tails`: each stream's tail (the last ``holdout`` fraction of its time span) is held out.
* :func:`fit_scaling`: per-stream or global location and scale of each channel, from the training rows only.
* :func:`to_grid`: rows on the grid of the time unit, internally: row ``k`` of a stream holds its observations
  within half a unit of ``t0 + k`` (averaged when several fall there; the latest time kept, so the encoder sees
  the true elapsed times), and NaN where nothing was observed (the encoder skips such rows exactly). Forecast step
  ``k`` from a row targets the grid row ``k`` later: the rows within half a unit of ``origin + k`` units, as
  online learning matches them (:mod:`gdn2ts.streaming.learn`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from gdn2ts.models.checkpoint import Scaler
from gdn2ts.models.units import StreamScales, TimeSpec, format_duration, parse_duration
from gdn2ts.streaming.units import Units, parse_datetimes, time_in

__all__ = ["infer_time_spec", "split_tails", "fit_scaling", "Grid", "to_grid", "NICE_UNITS", "season_of"]

NICE_UNITS = ("1s", "1min", "5min", "10min", "15min", "30min", "1h", "2h", "3h", "6h", "12h", "1d", "1w")
"""Time units a data's spacing snaps to (the nearest on a log scale)."""


def infer_time_spec(column: pl.Series, ids: pl.Series, number_unit: str | None = None, time_zone: str | None = None,
                    time_unit: str | None = None) -> TimeSpec:
    """The :class:`TimeSpec` of a timestamp column of long-format rows (``ids`` their streams).

    Date-time columns (or ISO-8601 strings) give ``datetime`` with the column's zone (``time_zone`` overrides it,
    and states the zone of naive date-times); date columns give ``date``; numbers need ``number_unit``. The time
    unit is ``time_unit`` when given, else the median spacing of consecutive rows of each stream, the median over
    streams, snapped to :data:`NICE_UNITS` (a day at least for dates).

    Example:
        >>> t = pl.Series("time", ["2024-05-01 00:00", "2024-05-01 01:00", "2024-05-01 03:00", "2024-05-01 04:10"])
        >>> infer_time_spec(t, pl.Series(["a"] * 4), time_zone="Europe/Paris").describe()
        'date-times in Europe/Paris, time unit 1h'
        >>> infer_time_spec(pl.Series("t", [0, 60, 120]), pl.Series(["a"] * 3), number_unit="s").describe()
        'numbers (s since 1970-01-01 UTC), time unit 1min'
    """
    name = column.name
    if column.dtype == pl.String:
        text = column.str.strip_chars()
        parsed = parse_datetimes(text)
        if parsed.null_count() == column.null_count():
            # ISO dates with no time of day are dates
            dates_only = text.drop_nulls().str.contains(r"^\d{4}-\d{2}-\d{2}$").all()
            column = parsed.dt.date() if dates_only else parsed
        elif column.str.strip_chars().cast(pl.Float64, strict=False).null_count() == column.null_count():
            column = column.str.strip_chars().cast(pl.Float64)
        else:
            bad = column.filter(column.is_not_null() & parsed.is_null())[0]
            raise ValueError(f"column {name!r}: timestamps expected date-times (ISO-8601), dates or numbers, got "
                             f"{bad!r}")
    if column.null_count():
        raise ValueError(f"column {name!r}: every row needs a timestamp ({column.null_count()} are empty)")
    if isinstance(column.dtype, pl.Datetime):
        spec = TimeSpec("datetime", 1.0, time_zone or column.dtype.time_zone)
    elif isinstance(column.dtype, pl.Date):
        spec = TimeSpec("date", 86400.0, time_zone)
    elif column.dtype.is_numeric():
        if number_unit is None:
            raise ValueError(f"column {name!r} holds numbers: state what they count (e.g. --time_numbers s for "
                             "seconds since 1970-01-01, or ms, h, d)")
        spec = TimeSpec("number", 1.0, number_unit=number_unit)
    else:
        raise ValueError(f"column {name!r}: timestamps expected date-times, dates or numbers, got {column.dtype}")
    if time_unit is not None:
        seconds = parse_duration(time_unit)
    else:
        seconds_since = time_in(column, TimeSpec(spec.kind, 1.0, spec.time_zone, spec.number_unit), "data")
        spacing = (pl.DataFrame({"id": ids, "t": seconds_since}).sort("id", "t")
                   .group_by("id").agg(pl.col("t").diff().filter(pl.col("t").diff() > 0).median().alias("dt"))
                   ["dt"].drop_nulls())
        if spacing.len() == 0:
            raise ValueError(f"column {name!r}: no stream has two distinct timestamps, so the time unit cannot be "
                             "told from the data; state it (e.g. --data.time_unit 1h)")
        seconds = _snap(float(spacing.median()))
        if spec.kind == "date":
            seconds = max(seconds, 86400.0)
    return TimeSpec(spec.kind, seconds, spec.time_zone, spec.number_unit)


def _snap(seconds: float) -> float:
    nice = [parse_duration(u) for u in NICE_UNITS]
    return min(nice, key=lambda s: abs(math.log(s / seconds)))


def season_of(unit_seconds: float) -> int:
    """Grid rows in one season of the seasonal-naive baseline: a day for sub-daily units that divide it, a week
    for daily data, else 1 (the last value).

    Example:
        >>> season_of(3600.0), season_of(86400.0), season_of(604800.0)
        (24, 7, 1)
    """
    per_day = 86400.0 / unit_seconds
    if unit_seconds < 86400.0 and abs(per_day - round(per_day)) < 1e-9:
        return int(round(per_day))
    return 7 if unit_seconds == 86400.0 else 1


def split_tails(frame: pl.DataFrame, id_column: str, time_column: str, holdout: float) -> pl.Series:
    """Per row, whether it is in its stream's held-out tail: at or after ``last - holdout * (last - first)``
    (model time). Streams of one timestamp are all training.

    Example:
        >>> f = pl.DataFrame({"s": ["a"] * 5 + ["b"] * 2, "t": [0.0, 1, 2, 3, 4, 10, 30]})
        >>> split_tails(f, "s", "t", 0.25).to_list()
        [False, False, False, True, True, False, True]
    """
    t = pl.col(time_column)
    cut = t.max().over(id_column) - holdout * (t.max() - t.min()).over(id_column)
    return frame.select(((t >= cut) & (t.max().over(id_column) > t.min().over(id_column))).alias("tail")
                        ).to_series()


def fit_scaling(train: pl.DataFrame, id_column: str, channels: tuple[str, ...], per_stream: bool
                ) -> tuple[Scaler, StreamScales | None]:
    """The global :class:`Scaler` of the training rows (model units: NaN / null missing) and, with
    ``per_stream``, each stream's own (a channel with fewer than two distinct values in a stream takes the global
    scale, one with none the global location too).

    Example:
        >>> f = pl.DataFrame({"s": ["a", "a", "b", "b"], "x": [1.0, 3.0, 10.0, 10.0]})
        >>> g, own = fit_scaling(f, "s", ("x",), per_stream=True)
        >>> g.loc, own.of("a"), own.of("b")
        ((6.0,), ((2.0,), (1.0,)), ((10.0,), (4.06201920231798,)))
    """
    values = torch.tensor(train.select(channels).cast(pl.Float64).fill_null(float("nan")).to_numpy())
    scaler = Scaler.fit(channels, values)
    if not per_stream:
        return scaler, None
    stats = (train.lazy().group_by(id_column, maintain_order=True)
             .agg([pl.col(c).cast(pl.Float64).fill_nan(None).mean().alias(f"m{i}") for i, c in enumerate(channels)]
                  + [pl.col(c).cast(pl.Float64).fill_nan(None).std(ddof=0).alias(f"s{i}")
                     for i, c in enumerate(channels)]
                  + [pl.col(c).cast(pl.Float64).fill_nan(None).count().alias(f"n{i}")
                     for i, c in enumerate(channels)]).collect().sort(id_column))
    loc, scale = [], []
    for row in stats.iter_rows(named=True):
        spread = [row[f"n{i}"] >= 2 and row[f"s{i}"] is not None and row[f"s{i}"] > 0 for i in range(len(channels))]
        loc.append([row[f"m{i}"] if row[f"n{i}"] else scaler.loc[i] for i in range(len(channels))])
        scale.append([row[f"s{i}"] if spread[i] else scaler.scale[i] for i in range(len(channels))])
    return scaler, StreamScales(tuple(str(s) for s in stats[id_column].to_list()), loc, scale)


@dataclass
class Grid:
    """Rows of ``S`` streams on a common grid of ``N`` time units (see the module docstring)."""

    streams: list[str]
    """Stream ids, in row order."""
    values: torch.Tensor
    """``[S, N, C]`` float32 model-unit values, NaN where not observed."""
    times: torch.Tensor
    """``[S, N]`` float64 model times: the latest observation time of the row, else the grid time."""
    covariates: torch.Tensor | None
    """``[S, N, K]`` float32 (zero where nothing was observed), or None."""
    t0: float
    """Model time of grid row 0."""


def to_grid(frame: pl.DataFrame, units: Units, id_column: str, time_column: str) -> Grid:
    """Model-unit rows (as :meth:`Units.to_model` gives them: times in model units, channels scaled, covariates
    present) on the grid of the time unit.

    Example:
        >>> from gdn2ts.models.checkpoint import Scaler
        >>> units = Units(Scaler(("x",), (0.0,), (1.0,)), TimeSpec("number", 1.0, number_unit="s"))
        >>> rows = pl.DataFrame({"s": ["a", "a", "a"], "t": [0.0, 0.9, 3.2], "x": [1.0, 3.0, 5.0]})
        >>> g = to_grid(rows, units, "s", "t")
        >>> g.values[0, :, 0].tolist(), g.times[0].tolist()
        ([1.0, 3.0, nan, 5.0], [0.0, 0.9, 2.0, 3.2])
    """
    channels, covs = list(units.channels), list(units.covariates)
    t = frame[time_column].to_numpy()
    t0 = float(np.floor(t.min() + 0.5))
    k = np.floor(t - t0 + 0.5).astype(np.int64)
    n = int(k.max()) + 1
    streams = sorted(frame[id_column].cast(pl.String).unique().to_list())
    if len(streams) * n * max(1, len(channels)) > 400_000_000:
        raise ValueError(f"{len(streams)} streams over {n} time units of {format_duration(units.time.unit_seconds)} "
                         "are too many grid cells to train on at once: choose a coarser time unit or fewer streams")
    cells = (frame.with_columns(pl.Series("__k", k), pl.col(id_column).cast(pl.String))
             .group_by(id_column, "__k")
             .agg(pl.col(time_column).max(), *[pl.col(c).fill_nan(None).mean() for c in channels + covs]))
    s = cells[id_column].replace_strict(streams, list(range(len(streams))), return_dtype=pl.Int64).to_numpy()
    kk = cells["__k"].to_numpy()
    values = np.full((len(streams), n, len(channels)), np.nan, dtype=np.float32)
    values[s, kk] = cells.select(channels).fill_null(float("nan")).to_numpy()
    times = np.broadcast_to(t0 + np.arange(n, dtype=np.float64), (len(streams), n)).copy()
    times[s, kk] = cells[time_column].to_numpy()
    covariates = None
    if covs:
        # rows where nothing was observed are skipped by the encoder: their covariates stay zero
        cov = np.zeros((len(streams), n, len(covs)), dtype=np.float32)
        cov[s, kk] = cells.select(covs).fill_null(0.0).to_numpy()
        covariates = torch.from_numpy(cov)
    return Grid(streams, torch.from_numpy(values), torch.from_numpy(times), covariates, t0)
