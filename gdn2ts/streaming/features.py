"""Model-unit helpers for code that drives a runner without units (the quickstart, tests, custom loops).

A runner opened with :meth:`OnlineRunner.from_checkpoint` (or ``units=``) converts rows and forecasts itself; use
these functions only with a runner over a bare encoder, which works in model units:

* :func:`prepare_rows`: rows in the user's units to model units. Numeric timestamps are taken as model time
  units already (date-times, dates and ISO-8601 strings are converted by the checkpoint's time spec); calendar
  covariates the checkpoint names are derived where the rows lack them; channels are scaled (per stream where the
  checkpoint scales per stream).
* :func:`unscale_forecast`: a model-unit forecast table back to the user's units (values only).

Mixing them with a runner that has units would convert twice; such a runner refuses numeric timestamps when its
checkpoint's timestamps are date-times.
"""

from __future__ import annotations

import polars as pl

from gdn2ts.models.checkpoint import Checkpoint, Scaler
from gdn2ts.models.units import TimeSpec
from gdn2ts.streaming.units import CALENDAR, Units, calendar_columns, time_in

__all__ = ["CALENDAR", "calendar_columns", "to_time_units", "prepare_rows", "unscale_forecast"]


def to_time_units(column: pl.Series, time_unit_seconds: float, spec: TimeSpec | None = None) -> pl.Series:
    """A timestamp column as float64 time units since the epoch: numbers pass through (already in units),
    date-times (naive ones read as UTC, or in ``spec.time_zone``), dates and ISO-8601 strings are converted.

    Example:
        >>> to_time_units(pl.Series("time", ["1970-01-02 00:00:00", "1970-01-02 01:30:00"]), 3600.0).to_list()
        [24.0, 25.5]
        >>> to_time_units(pl.Series("time", [7, 8]), 3600.0).to_list()
        [7.0, 8.0]
    """
    if column.dtype.is_numeric():
        return column.cast(pl.Float64)
    if spec is None or spec.kind == "number":
        spec = TimeSpec("datetime", time_unit_seconds)
    return time_in(column, spec, op="rows")


def prepare_rows(frame: pl.DataFrame, checkpoint: Checkpoint, id_column: str = "stream",
                 time_column: str = "time") -> pl.DataFrame:
    """Raw rows to a model-unit runner's input: timestamps in time units, calendar covariates derived where the
    batch lacks them, channels scaled. Other columns are kept (the runner rejects unknown ones, naming them).

    Example:
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> ckpt = Checkpoint(StreamEncoder(EncoderConfig(n_channels=1, n_covariates=2, hidden_size=8, head_dim=4)),
        ...                   Scaler(("load",), (10.0,), (2.0,)), ("hour_sin", "hour_cos"), 3600.0)
        >>> rows = pl.DataFrame({"stream": ["a"], "time": ["2020-01-01 06:00"], "load": [14.0]})
        >>> prepare_rows(rows, ckpt).select(pl.all().exclude("stream").round(6)).row(0)
        (438294.0, 2.0, 1.0, 0.0)
    """
    for col in (id_column, time_column):
        if col not in frame.columns:
            raise ValueError(f"rows lack the column {col!r} (columns: {frame.columns})")
    spec = checkpoint.time_spec
    frame = frame.with_columns(to_time_units(frame[time_column], checkpoint.time_unit_seconds, spec))
    units = Units(checkpoint.scaler, spec, checkpoint.covariates, checkpoint.stream_scales)
    return units.to_model(frame, id_column, time_column, op="rows", converted_time=True)


def unscale_forecast(table: pl.DataFrame, scaler: Scaler | Checkpoint) -> pl.DataFrame:
    """A model-unit forecast table (columns stream, step, channel, q<level>...) in raw units (per stream when a
    checkpoint with per-stream scaling is given).

    Example:
        >>> table = pl.DataFrame({"stream": ["a"], "step": [1], "channel": ["load"], "q0.5": [0.5]})
        >>> unscale_forecast(table, Scaler(("load",), (10.0,), (2.0,)))["q0.5"].to_list()
        [11.0]
    """
    ckpt = scaler if isinstance(scaler, Checkpoint) else None
    units = Units(scaler if ckpt is None else ckpt.scaler, TimeSpec("number", 1.0, number_unit="s"),
                  stream_scales=None if ckpt is None else ckpt.stream_scales)
    return units.forecast_to_user(table)
