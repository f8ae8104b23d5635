"""The user's units at the runner's edge: timestamps in the user's type, channel values in the user's units.

A runner opened with :class:`Units` (``OnlineRunner.from_checkpoint`` builds them from a checkpoint) reads rows in
the user's units and answers in them: timestamps are date-times (naive or in a zone), dates or numbers with a
stated unit, as the checkpoint's :class:`~gdn2ts.models.units.TimeSpec` says; channel values are raw, scaled by
the checkpoint's scaler (per stream where the stream has its own, else global); forecasts are unscaled and their
origin and target times come back in the user's timestamp type. A runner without units works in model units
(numbers in model time units, scaled values) and says so (``runner.units is None``).

Conversions happen here, once, before the frame checks of :mod:`gdn2ts.streaming.frames`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from gdn2ts.models.checkpoint import Checkpoint, Scaler
from gdn2ts.models.units import StreamScales, TimeSpec

__all__ = ["Units", "CALENDAR", "calendar_columns", "time_in", "time_out", "parse_datetimes"]

CALENDAR = ("hour_sin", "hour_cos", "dow_sin", "dow_cos")
"""Covariates that can be derived from a timestamp: hour of day and day of week as sine/cosine pairs."""


def calendar_columns(time_units: pl.Expr, time_unit_seconds: float) -> list[pl.Expr]:
    """Expressions for the :data:`CALENDAR` covariates of timestamps counted in units of ``time_unit_seconds``
    since 1970-01-01 UTC (in UTC).

    Example:
        >>> frame = pl.DataFrame({"time": [0.0, 6.0]})            # hours since the epoch (a Thursday)
        >>> frame.select(c.round(3) for c in calendar_columns(pl.col("time"), 3600.0)).rows()
        [(0.0, 1.0, 0.434, -0.901), (1.0, 0.0, 0.434, -0.901)]
    """
    seconds = time_units * time_unit_seconds
    hour = (seconds / 3600.0) % 24.0
    # 1970-01-01 was a Thursday: shift so that Monday is day 0
    day = ((seconds / 86400.0).floor() + 3.0) % 7.0
    return _cyclic(hour, day)


def _cyclic(hour: pl.Expr, day: pl.Expr) -> list[pl.Expr]:
    two_pi = 2.0 * math.pi
    return [(hour * two_pi / 24.0).sin().alias("hour_sin"), (hour * two_pi / 24.0).cos().alias("hour_cos"),
            (day * two_pi / 7.0).sin().alias("dow_sin"), (day * two_pi / 7.0).cos().alias("dow_cos")]


def _first_failure(raw: pl.Series, parsed: pl.Series) -> object:
    bad = raw.filter(raw.is_not_null() & parsed.is_null())
    return bad[0] if bad.len() else None


def parse_datetimes(text: pl.Series) -> pl.Series:
    """ISO-8601 strings as date-times (null where one does not parse)."""
    if text.dtype == pl.Null:
        return text.cast(pl.Datetime("us"))
    try:
        return text.str.to_datetime(time_unit="us", strict=False)
    except pl.exceptions.PolarsError:  # no format fits the first values at all
        return pl.Series(text.name, [None] * text.len(), dtype=pl.Datetime("us"))


def time_in(column: pl.Series, spec: TimeSpec, op: str = "observe") -> pl.Series:
    """A timestamp column in the user's type as float64 model time units (seconds since the epoch / unit).

    Date-times with a zone are converted; naive ones are read in ``spec.time_zone`` (UTC when None); dates are
    midnights. Numbers are accepted only when ``spec.kind`` is ``number`` (counted in ``spec.number_unit``); ISO-8601
    strings parse as date-times (or as numbers, for a ``number`` spec).

    Example:
        >>> spec = TimeSpec("datetime", 3600.0)
        >>> time_in(pl.Series("time", ["1970-01-02 00:00", "1970-01-02 01:30"]), spec).to_list()
        [24.0, 25.5]
        >>> time_in(pl.Series("time", [86400.0]), TimeSpec("number", 3600.0, number_unit="s")).to_list()
        [24.0]
    """
    name = column.name
    if column.dtype in (pl.String, pl.Null):
        text = column.str.strip_chars() if column.dtype == pl.String else column
        numbers = text.cast(pl.Float64, strict=False)
        if spec.kind == "number" and _first_failure(text, numbers) is None:
            column = numbers
        else:
            parsed = parse_datetimes(text)
            bad = _first_failure(text, parsed)
            if bad is not None:
                if _first_failure(text, numbers) is None:
                    raise ValueError(f"{op}: column {name!r} holds numbers, but this model's timestamps are "
                                     f"{spec.describe()}: pass date-times (ISO-8601, e.g. 2024-05-01T13:00:00Z)")
                raise ValueError(f"{op}: column {name!r}: timestamps expected {spec.describe().split(',')[0]} "
                                 f"(ISO-8601), got {bad!r}")
            column = parsed
    if isinstance(column.dtype, pl.Date):
        column = column.cast(pl.Datetime("us"))
    if isinstance(column.dtype, pl.Datetime):
        if column.dtype.time_zone is None and spec.time_zone is not None:
            local = column.dt.replace_time_zone(spec.time_zone, ambiguous="earliest", non_existent="null")
            bad = _first_failure(column, local)
            if bad is not None:
                raise ValueError(f"{op}: column {name!r}: {bad} does not exist in {spec.time_zone} (a clock change)")
            column = local
        micros = column.dt.epoch("us").cast(pl.Float64)
        return (micros / (spec.unit_seconds * 1e6)).alias(name)
    if column.dtype.is_numeric():
        if spec.kind != "number":
            raise ValueError(f"{op}: column {name!r} holds numbers, but this model's timestamps are "
                             f"{spec.describe()}: pass date-times or dates")
        ratio = spec.number_seconds / spec.unit_seconds
        values = column.cast(pl.Float64)
        return (values if ratio == 1.0 else values * ratio).alias(name)
    raise ValueError(f"{op}: column {name!r}: timestamps expected {spec.describe().split(',')[0]}, got "
                     f"{column.dtype}")


def time_out(model_time: pl.Series, spec: TimeSpec) -> pl.Series:
    """Model time units back to the user's timestamp type (the inverse of :func:`time_in`; nulls stay null).

    Example:
        >>> spec = TimeSpec("datetime", 3600.0, time_zone="Europe/Paris")
        >>> time_out(pl.Series("origin", [24.0]), spec).to_list()[0].isoformat()
        '1970-01-02T01:00:00+01:00'
        >>> time_out(pl.Series("origin", [3.0]), TimeSpec("date", 86400.0)).to_list()
        [datetime.date(1970, 1, 4)]
    """
    t = model_time.cast(pl.Float64)
    if spec.kind == "number":
        ratio = spec.unit_seconds / spec.number_seconds
        return (t if ratio == 1.0 else t * ratio).alias(model_time.name)
    micros = (t * (spec.unit_seconds * 1e6)).round().cast(pl.Int64).cast(pl.Datetime("us"))
    if spec.time_zone is not None:
        micros = micros.dt.replace_time_zone("UTC").dt.convert_time_zone(spec.time_zone)
    return (micros.dt.date() if spec.kind == "date" else micros).alias(model_time.name)


def _calendar(model_time: pl.Series, spec: TimeSpec) -> pl.DataFrame:
    """The :data:`CALENDAR` columns of model timestamps, in the spec's zone (UTC when it has none)."""
    frame = pl.DataFrame({"t": model_time})
    if spec.time_zone is None:
        return frame.select(calendar_columns(pl.col("t"), spec.unit_seconds))
    local = pl.col("t").map_batches(lambda s: time_out(s, TimeSpec("datetime", spec.unit_seconds, spec.time_zone)))
    frame = frame.with_columns(local.alias("local"))
    hour = pl.col("local").dt.hour() + pl.col("local").dt.minute() / 60.0 + pl.col("local").dt.second() / 3600.0
    return frame.select(_cyclic(hour.cast(pl.Float64), (pl.col("local").dt.weekday() - 1).cast(pl.Float64)))


@dataclass(frozen=True)
class Units:
    """How a runner turns the user's rows into model inputs and its answers back.

    Example:
        >>> units = Units(Scaler(("load",), (10.0,), (2.0,)), TimeSpec("datetime", 3600.0), ("hour_sin", "hour_cos"))
        >>> rows = pl.DataFrame({"stream": ["a"], "time": ["2020-01-01 06:00"], "load": [14.0]})
        >>> units.to_model(rows).select(pl.all().exclude("stream").round(6)).row(0)
        (438294.0, 2.0, 1.0, 0.0)
    """

    scaler: Scaler
    """Channel names (the encoder's order) and the global scaling."""
    time: TimeSpec
    """The user's timestamp type and the model's time unit."""
    covariates: tuple[str, ...] = ()
    """Covariates the encoder reads; :data:`CALENDAR` ones are derived from the timestamp when a batch lacks them."""
    stream_scales: StreamScales | None = None
    """Per-stream scaling (streams without their own use ``scaler``)."""

    def __post_init__(self):
        object.__setattr__(self, "covariates", tuple(self.covariates))

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> Units:
        """The units a checkpoint was trained in."""
        return cls(ckpt.scaler, ckpt.time_spec, ckpt.covariates, ckpt.stream_scales)

    @property
    def channels(self) -> tuple[str, ...]:
        return self.scaler.channels

    def scales_of(self, ids: pl.Series) -> tuple[np.ndarray, np.ndarray]:
        """``(loc, scale)`` ``[len(ids), channels]`` of each row's stream."""
        n, c = ids.len(), len(self.channels)
        loc = np.broadcast_to(np.asarray(self.scaler.loc), (n, c)).copy()
        scale = np.broadcast_to(np.asarray(self.scaler.scale), (n, c)).copy()
        own = self.stream_scales
        if own is not None and own.streams and n:
            index = ids.cast(pl.String).replace_strict(list(own.streams), list(range(len(own.streams))), default=-1,
                                                      return_dtype=pl.Int64).to_numpy()
            hit = index >= 0
            loc[hit] = np.asarray(own.loc)[index[hit]]
            scale[hit] = np.asarray(own.scale)[index[hit]]
        return loc, scale

    def to_model(self, frame: pl.DataFrame, id_column: str = "stream", time_column: str = "time",
                 op: str = "observe", converted_time: bool = False) -> pl.DataFrame:
        """Rows in the user's units to model units: timestamps converted (unless ``converted_time``: they are
        model time units already), calendar covariates derived where the batch lacks them, channels scaled. Other
        columns are kept (the frame checks name unknown ones).

        Raises ``ValueError`` naming the column (and the stream, for a value that overflows when scaled).
        """
        for col in (id_column, time_column):
            if col not in frame.columns:
                raise ValueError(f"{op}: batch lacks the column {col!r} (columns: {frame.columns})")
        if not converted_time:
            frame = frame.with_columns(time_in(frame[time_column], self.time, op))
        derive = [c for c in self.covariates if c not in frame.columns]
        if derive:
            unknown = [c for c in derive if c not in CALENDAR]
            if unknown:
                raise ValueError(f"{op}: batch lacks the covariate columns {unknown}, which cannot be derived from "
                                 "the timestamp")
            if frame[time_column].null_count() or not frame[time_column].is_finite().all():
                raise ValueError(f"{op}: column {time_column!r} expected a timestamp in every row")
            frame = frame.with_columns(_calendar(frame[time_column], self.time).select(derive))
        strings = [c for c in self.covariates if c in frame.columns and frame.schema[c] == pl.String]
        for c in strings:
            numbers = frame[c].str.strip_chars().cast(pl.Float64, strict=False)
            bad = _first_failure(frame[c], numbers)
            if bad is not None:
                raise ValueError(f"{op}: covariate column {c!r} expected numbers, got {bad!r}")
            frame = frame.with_columns(numbers.alias(c))
        present = [c for c in self.channels if c in frame.columns]
        cast = []
        for c in present:
            dtype = frame.schema[c]
            if dtype == pl.String:
                text = frame[c].str.strip_chars().replace("", None)
                numbers = text.cast(pl.Float64, strict=False)
                bad = _first_failure(text, numbers)
                if bad is not None:
                    raise ValueError(f"{op}: column {c!r} expected numbers, got {bad!r}")
                cast.append(numbers.alias(c))
            elif dtype.is_numeric() or dtype == pl.Null:
                cast.append(frame[c].cast(pl.Float64))
            else:
                raise ValueError(f"{op}: column {c!r} expected numbers, got {dtype}")
        if not present:
            return frame
        frame = frame.with_columns(cast)
        raw = frame.select(present).to_numpy().astype(np.float64, copy=False)
        loc, scale = self.scales_of(frame[id_column])
        cols = [self.channels.index(c) for c in present]
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = (raw - loc[:, cols]) / scale[:, cols]
        over = np.isfinite(raw) & ~np.isfinite(scaled)
        if over.any():
            row, j = (int(i) for i in np.argwhere(over)[0])
            raise ValueError(f"{op}: column {present[j]!r} of stream {frame[id_column][row]!r}: {raw[row, j]:g} "
                             "overflows to inf when scaled")
        return frame.with_columns(pl.Series(c, scaled[:, j]) for j, c in enumerate(present))

    def forecast_to_user(self, table: pl.DataFrame) -> pl.DataFrame:
        """A forecast table (stream, origin, target_time, step, channel, q<level>...) from model units to the user's:
        quantiles unscaled per stream and channel, times in the user's type."""
        loc, scale = self.scales_of(table["stream"])
        ch = table["channel"].replace_strict(list(self.channels), list(range(len(self.channels))),
                                             return_dtype=pl.Int64).to_numpy()
        rows = np.arange(table.height)
        l_, s_ = loc[rows, ch], scale[rows, ch]
        levels = [c for c in table.columns if c.startswith("q")]
        out = table.with_columns(pl.Series(c, table[c].to_numpy() * s_ + l_) for c in levels)
        return out.with_columns(time_out(out[c], self.time) for c in ("origin", "target_time") if c in out.columns)

    def stats_to_user(self, table: pl.DataFrame) -> pl.DataFrame:
        """Per-(stream, channel) ``mean``, ``var`` and ``std`` of model-unit values in the user's units."""
        loc, scale = self.scales_of(table["stream"])
        ch = table["channel"].replace_strict(list(self.channels), list(range(len(self.channels))),
                                             return_dtype=pl.Int64).to_numpy()
        rows = np.arange(table.height)
        l_, s_ = loc[rows, ch], scale[rows, ch]
        return table.with_columns(pl.Series("mean", table["mean"].to_numpy() * s_ + l_),
                                  pl.Series("var", table["var"].to_numpy() * s_ ** 2),
                                  pl.Series("std", table["std"].to_numpy() * s_))

    def time_out(self, model_time: pl.Series) -> pl.Series:
        """Model timestamps in the user's type (:func:`time_out`)."""
        return time_out(model_time, self.time)

    def restate_stale(self, rejected: list[tuple[str, float, str]], last: dict[str, float]
                      ) -> list[tuple[str, float, str]]:
        """Rows rejected for a timestamp not after their stream's last observation (``last``: model time per
        stream), with the reason told in the user's timestamps."""
        out = []
        for sid, t, _ in rejected:
            prev = last.get(sid, -math.inf)
            why = (f"is not after its last observation {self.format_time(prev)}" if t <= prev else
                   "repeats or precedes an earlier row of the batch")
            out.append((sid, t, f"stream {sid!r}: timestamp {self.format_time(t)} {why}"))
        return out

    def format_time(self, t: float) -> str:
        """One model timestamp in the user's type, as text (for messages)."""
        if not math.isfinite(t):
            return str(t)
        return str(time_out(pl.Series([t]), self.time)[0])


def with_forecast_times(table: pl.DataFrame, last_time, rows: np.ndarray, bad: np.ndarray, time_unit: float,
                        units: Units | None) -> pl.DataFrame:
    """A runner's forecast table with ``origin`` (each stream's last observation, from ``last_time`` ``[N]``;
    ``rows`` maps table rows to streams; null where ``bad``) and ``target_time`` (origin + step time units) after
    ``stream``, in the user's units when ``units`` are given (model units otherwise)."""
    origin = np.where(bad, np.nan, last_time.reshape(-1).cpu().double().numpy()[rows])
    target = origin + table["step"].to_numpy() * time_unit
    table = table.with_columns(pl.Series("origin", origin), pl.Series("target_time", target)).fill_nan(None)
    table = table.select("stream", "origin", "target_time", pl.exclude("stream", "origin", "target_time"))
    return table if units is None else units.forecast_to_user(table).fill_nan(None)
