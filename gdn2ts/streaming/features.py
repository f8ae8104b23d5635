"""From raw long-format rows to what a checkpoint's encoder reads, and its forecasts back to raw units.

Raw rows carry a stream id, a timestamp (a number in the checkpoint's time unit, or a date-time) and one column per
channel in the data's own units. :func:`prepare_rows` converts date-times to time units, derives calendar
covariates the checkpoint names (hour of day and day of week as sine/cosine pairs, read from the timestamp in UTC),
and scales the channels; :func:`unscale_forecast` turns the runner's forecast table back into raw units.
"""

from __future__ import annotations

import math

import polars as pl

from gdn2ts.models.checkpoint import Checkpoint, Scaler

__all__ = ["CALENDAR", "calendar_columns", "to_time_units", "prepare_rows", "unscale_forecast"]

CALENDAR = ("hour_sin", "hour_cos", "dow_sin", "dow_cos")
"""Covariates that can be derived from a timestamp (UTC)."""


def calendar_columns(time_units: pl.Expr, time_unit_seconds: float) -> list[pl.Expr]:
    """Expressions for the :data:`CALENDAR` covariates of timestamps counted in units of ``time_unit_seconds``
    since 1970-01-01 UTC.

    Example:
        >>> import polars as pl
        >>> frame = pl.DataFrame({"time": [0.0, 6.0]})            # hours since the epoch (a Thursday)
        >>> frame.select(c.round(3) for c in calendar_columns(pl.col("time"), 3600.0)).rows()
        [(0.0, 1.0, 0.434, -0.901), (1.0, 0.0, 0.434, -0.901)]
    """
    seconds = time_units * time_unit_seconds
    hour = (seconds / 3600.0) % 24.0
    # 1970-01-01 was a Thursday: shift so that Monday is day 0
    day = ((seconds / 86400.0).floor() + 3.0) % 7.0
    two_pi = 2.0 * math.pi
    return [(hour * two_pi / 24.0).sin().alias("hour_sin"), (hour * two_pi / 24.0).cos().alias("hour_cos"),
            (day * two_pi / 7.0).sin().alias("dow_sin"), (day * two_pi / 7.0).cos().alias("dow_cos")]


def to_time_units(column: pl.Series, time_unit_seconds: float) -> pl.Series:
    """A timestamp column as float64 time units since the epoch: numbers pass through (already in units),
    date-times (naive ones read as UTC) and ISO-8601 strings are converted.

    Example:
        >>> import polars as pl
        >>> to_time_units(pl.Series("time", ["1970-01-02 00:00:00", "1970-01-02 01:30:00"]), 3600.0).to_list()
        [24.0, 25.5]
    """
    name = column.name
    if column.dtype == pl.String:
        try:
            column = column.str.to_datetime(time_unit="us")
        except pl.exceptions.PolarsError as e:
            raise ValueError(f"column {name!r}: timestamps expected numbers or ISO-8601 date-times ({e})") from None
    if isinstance(column.dtype, pl.Datetime):
        if column.dtype.time_zone is not None:
            column = column.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        micros = column.dt.cast_time_unit("us").dt.epoch("us").cast(pl.Float64)
        return (micros / (time_unit_seconds * 1e6)).alias(name)
    if isinstance(column.dtype, pl.Date):
        return (column.dt.epoch("s").cast(pl.Float64) / time_unit_seconds).alias(name)
    if column.dtype.is_numeric():
        return column.cast(pl.Float64)
    raise ValueError(f"column {name!r}: timestamps expected numbers or date-times, got {column.dtype}")


def prepare_rows(frame: pl.DataFrame, checkpoint: Checkpoint, id_column: str = "stream",
                 time_column: str = "time") -> pl.DataFrame:
    """Raw rows to the runner's input: timestamps in time units, calendar covariates derived where the batch
    lacks them, channels scaled. Other columns are kept (the runner rejects unknown ones, naming them).

    Example:
        >>> import polars as pl
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> from gdn2ts.models.checkpoint import Checkpoint, Scaler
        >>> ckpt = Checkpoint(StreamEncoder(EncoderConfig(n_channels=1, n_covariates=2, hidden_size=8, head_dim=4)),
        ...                   Scaler(("load",), (10.0,), (2.0,)), ("hour_sin", "hour_cos"), 3600.0)
        >>> rows = pl.DataFrame({"stream": ["a"], "time": ["2020-01-01 06:00"], "load": [14.0]})
        >>> prepare_rows(rows, ckpt).select(pl.all().exclude("stream").round(6)).row(0)
        (438294.0, 2.0, 1.0, 0.0)
    """
    for col in (id_column, time_column):
        if col not in frame.columns:
            raise ValueError(f"rows lack the column {col!r} (columns: {frame.columns})")
    frame = frame.with_columns(to_time_units(frame[time_column], checkpoint.time_unit_seconds))
    derive = [c for c in checkpoint.covariates if c not in frame.columns]
    if derive:
        unknown = [c for c in derive if c not in CALENDAR]
        if unknown:
            raise ValueError(f"rows lack the covariate columns {unknown}, which cannot be derived from the timestamp")
        exprs = calendar_columns(pl.col(time_column), checkpoint.time_unit_seconds)
        frame = frame.with_columns([e for e in exprs if e.meta.output_name() in derive])
    scaler = checkpoint.scaler
    scaled = []
    for c, loc, scale in zip(scaler.channels, scaler.loc, scaler.scale, strict=True):
        if c in frame.columns:
            if not (frame.schema[c].is_numeric() or frame.schema[c] == pl.Null):
                raise ValueError(f"column {c!r} expected numbers, got {frame.schema[c]}")
            scaled.append(((pl.col(c).cast(pl.Float64) - loc) / scale).alias(c))
    return frame.with_columns(scaled)


def unscale_forecast(table: pl.DataFrame, scaler: Scaler) -> pl.DataFrame:
    """The runner's forecast table (columns stream, step, channel, q<level>...) in raw units.

    Example:
        >>> import polars as pl
        >>> table = pl.DataFrame({"stream": ["a"], "step": [1], "channel": ["load"], "q0.5": [0.5]})
        >>> unscale_forecast(table, Scaler(("load",), (10.0,), (2.0,)))["q0.5"].to_list()
        [11.0]
    """
    levels = [c for c in table.columns if c.startswith("q")]
    loc = pl.col("channel").replace_strict(list(scaler.channels), list(scaler.loc), return_dtype=pl.Float64)
    scale = pl.col("channel").replace_strict(list(scaler.channels), list(scaler.scale), return_dtype=pl.Float64)
    return table.with_columns([(pl.col(c) * scale + loc).alias(c) for c in levels])

