"""The edge where observations enter the runner: a batch in long format (a stream id column, a timestamp column,
one column per channel with nulls for missing, the covariate columns) converted to model units (when the schema
has :class:`~gdn2ts.streaming.units.Units`), checked once and brought to one schema.

Everything below this edge (round planning, the encoder, the op) trusts the frame: the checks here are the
only per-value checks of an ``observe`` call. Two kinds of problem are told apart:

* a batch that cannot be read (a missing or unknown column, a non-numeric value, inf, a value that overflows
  the model's float type, a bad timestamp) raises ``ValueError`` naming the column (and the stream) and changes
  nothing;
* a readable row that would harm its stream is rejected and reported (:func:`screen_values`: a value beyond
  ``Limits.max_abs``; :func:`screen_gaps`: a timestamp implausibly far after the stream's last one), while the
  batch's other rows proceed. Each rejection carries a reason code (:data:`REASONS`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from gdn2ts.models.units import Limits

if TYPE_CHECKING:
    from gdn2ts.streaming.units import Units

__all__ = ["ObservationSchema", "as_table", "screen_values", "screen_gaps", "Limits", "REASONS"]

REASONS = {
    "not_after_last": "timestamp not after the stream's last observation (or repeated in the batch)",
    "beyond_max_abs": "a channel value beyond the bound 'max_abs' (model units)",
    "too_far": "timestamp implausibly far after the stream's last observation (bound 'max_gap')",
}
"""Reason codes of rejected rows, with what each means."""


def as_table(batch: pl.DataFrame | Mapping | Iterable[Mapping], op: str = "observe") -> pl.DataFrame:
    """``batch`` as a polars DataFrame: a DataFrame as it is, a dict of columns or an iterable of row dicts.

    Example:
        >>> as_table([{"stream": "a", "time": 1.0}]).columns
        ['stream', 'time']
    """
    if isinstance(batch, pl.DataFrame):
        return batch
    try:
        return pl.DataFrame(dict(batch) if isinstance(batch, Mapping) else list(batch))
    except Exception as e:  # polars' own errors on mixed types, ragged columns, ...
        raise ValueError(f"{op}: batch cannot be read as a table ({e})") from None


@dataclass(frozen=True)
class ObservationSchema:
    """The columns of an observation batch.

    Example:
        >>> schema = ObservationSchema(("load", "temp"))
        >>> schema.read({"stream": ["a"], "time": [1], "load": [0.5]}).row(0)
        ('a', 1.0, 0.5, None)
    """

    channels: tuple[str, ...]
    """Observed channels, in the encoder's channel order (absent or null: missing)."""
    covariates: tuple[str, ...] = ()
    """Covariate columns, in the encoder's order (present and finite in every row)."""
    id_column: str = "stream"
    """The stream id column."""
    time_column: str = "time"
    """The timestamp column."""
    units: Units | None = None
    """The user's units (timestamps in the user's type, raw values); None: the batch is in model units (numeric
    timestamps in model time units, scaled values)."""

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "covariates", tuple(self.covariates))

    def read(self, batch: pl.DataFrame | Mapping | Iterable[Mapping], op: str = "observe") -> pl.DataFrame:
        """The batch with the columns id (String), time, channels and covariates (Float64), in that order.

        A missing required column, an unknown column, a non-numeric column, a null id, a non-finite timestamp or
        covariate, or an inf channel value raises ``ValueError`` naming the column (and the stream, for inf).
        """
        frame = as_table(batch, op)
        id_col, time_col = self.id_column, self.time_column
        if self.units is not None and frame.height:
            frame = self.units.to_model(frame, id_col, time_col, op)
        need = [id_col, time_col, *self.covariates]
        missing = [c for c in need if c not in frame.columns]
        if missing:
            raise ValueError(f"{op}: batch lacks required columns {missing}")
        known = set(need) | set(self.channels)
        unknown = [c for c in frame.columns if c not in known]
        if unknown:
            raise ValueError(f"{op}: unknown columns {unknown} (channels are {list(self.channels)})")
        numeric = (time_col, *self.channels, *self.covariates)
        if self.units is None and frame.height and isinstance(frame.schema[time_col], (pl.Date, pl.Datetime)):
            raise ValueError(f"{op}: column {time_col!r} holds {frame.schema[time_col]}, but this runner works in "
                             "model units (numeric timestamps in model time units, scaled values); open it with "
                             "OnlineRunner.from_checkpoint(...) or units=Units(...) to pass dates, date-times and "
                             "raw values")
        for c in numeric:
            if c in frame.columns and frame.height and not frame.schema[c].is_numeric() and \
                    frame.schema[c] != pl.Null:
                raise ValueError(f"{op}: column {c!r} expected numbers, got {frame.schema[c]}")
        frame = frame.select(pl.col(id_col).cast(pl.String),
                             *[pl.col(c).cast(pl.Float64) if c in frame.columns else
                               pl.lit(None, dtype=pl.Float64).alias(c) for c in numeric])
        if frame[id_col].null_count():
            raise ValueError(f"{op}: stream ids must not be null: every row needs a stream id (column {id_col!r} "
                             f"is empty in {frame[id_col].null_count()} rows)")
        for c in (time_col, *self.covariates):
            if frame[c].null_count() or frame[c].is_nan().any() or frame[c].is_infinite().any():
                raise ValueError(f"{op}: column {c!r} expected finite values in every row")
        for c in self.channels:
            bad = frame.filter(pl.col(c).is_infinite())
            if bad.height:
                raise ValueError(f"{op}: column {c!r} holds inf for stream {bad[id_col][0]!r} "
                                 "(missing values are null or NaN; inf is an error)")
        return frame


def screen_values(frame: pl.DataFrame, schema: ObservationSchema, max_abs: float | None, dtype_max: float,
                  describe: Callable[[float], str] = str, op: str = "observe"
                  ) -> tuple[pl.DataFrame, list[tuple[str, float, str]], dict[str, int]]:
    """Rows of a read frame (model units) whose channel values fit: a value beyond ``dtype_max`` (it would become
    inf in the model's float type) raises ``ValueError`` naming the column and the stream; rows with a value
    beyond ``max_abs`` are returned as rejected ``(stream, time, reason)`` (code ``beyond_max_abs``).

    Example:
        >>> schema = ObservationSchema(("load",))
        >>> frame = schema.read({"stream": ["a", "a"], "time": [1, 2], "load": [0.5, 1e6]})
        >>> kept, rejected, counts = screen_values(frame, schema, 100.0, 3.4e38)
        >>> kept.height, counts, rejected[0][2]
        (1, {'beyond_max_abs': 1}, "stream 'a' at 2.0: column 'load' is 1e+06 model units, beyond max_abs=100")
    """
    if not schema.channels or frame.height == 0:
        return frame, [], {}
    values = np.abs(frame.select(schema.channels).to_numpy().astype(np.float64, copy=False))
    with np.errstate(invalid="ignore"):
        over = values > dtype_max
    if over.any():
        row, j = (int(i) for i in np.argwhere(over)[0])
        raise ValueError(f"{op}: column {schema.channels[j]!r} of stream {frame[schema.id_column][row]!r}: "
                         f"{frame[schema.channels[j]][row]:g} (model units) overflows to inf in the model's float "
                         "type")
    if max_abs is None:
        return frame, [], {}
    with np.errstate(invalid="ignore"):
        big = values > max_abs
    rows = np.flatnonzero(big.any(axis=1))
    if rows.size == 0:
        return frame, [], {}
    ids, times = frame[schema.id_column], frame[schema.time_column]
    rejected = []
    for i in rows.tolist():
        j = int(np.flatnonzero(big[i])[0])
        unit = "standard deviations (model units)" if schema.units is not None else "model units"
        rejected.append((ids[i], float(times[i]), f"stream {ids[i]!r} at {describe(float(times[i]))}: column "
                         f"{schema.channels[j]!r} is {frame[schema.channels[j]][i]:g} {unit}, beyond "
                         f"max_abs={max_abs:g}"))
    keep = np.ones(frame.height, dtype=bool)
    keep[rows] = False
    return frame.filter(pl.Series(keep)), rejected, {"beyond_max_abs": len(rejected)}


def screen_gaps(times: np.ndarray, first: np.ndarray, group: np.ndarray, last_time: np.ndarray,
                streams: list[str], limits: Limits, describe: Callable[[float], str] = str
                ) -> tuple[np.ndarray, list[tuple[str, float, str]]]:
    """Rows whose timestamp jumps implausibly far: more than ``limits.max_gap`` after the latest of the stream's
    last observation and its earlier rows of the call (for a new stream, outside ``limits.time_range`` widened by
    ``max_gap``). Such a row is most often a timestamp in another unit; it and the stream's later rows of the call
    are rejected (code ``too_far``), so that the stream is not poisoned.

    Args:
        times: ``[R]`` the call's timestamps, sorted by (stream, time).
        first, group: ``[R]`` each stream's first row, and each row's index into ``streams``.
        last_time: ``[len(streams)]`` each stream's last applied timestamp (-inf before the first).

    Returns ``keep`` ``[R]`` and the rejected ``(stream, time, reason)``.

    Example:
        >>> keep, rejected = screen_gaps(np.array([5.0, 6.0, 9e9, 9e9 + 1]), np.array([True, False, False, False]),
        ...                              np.zeros(4, dtype=int), np.array([4.0]), ["a"], Limits(max_gap=1000.0))
        >>> keep.tolist(), len(rejected)
        ([True, True, False, False], 2)
    """
    keep = np.ones(times.size, dtype=bool)
    if limits.max_gap is None or times.size == 0:
        return keep, []
    gap = limits.max_gap
    last = last_time[group]
    prev = np.where(first, last, np.concatenate([[-np.inf], times[:-1]]))
    prev = np.maximum(prev, last)
    far = np.isfinite(prev) & (times - prev > gap)
    if limits.time_range is not None:
        lo, hi = limits.time_range
        new = ~np.isfinite(prev)
        far |= new & ((times < lo - gap) | (times > hi + gap))
    if not far.any():
        return keep, []
    # a far row poisons its stream's later rows of the call: reject them with it
    count = np.cumsum(far)
    before = (count - far)[np.flatnonzero(first)][group]
    keep = (count - before) == 0
    rejected = []
    for i in np.flatnonzero(~keep).tolist():
        sid, ref = streams[group[i]], prev[i]
        where = (f"after its last observation {describe(float(ref))}" if np.isfinite(ref) else
                 f"outside the training data's time range widened by max_gap ({describe(limits.time_range[0])} to "
                 f"{describe(limits.time_range[1])})")
        rejected.append((sid, float(times[i]), f"stream {sid!r}: timestamp {describe(float(times[i]))} is more than "
                         f"max_gap={gap:g} time units {where}; a timestamp in another unit? (the stream's later rows "
                         "of this call are rejected with it; reset the stream if its history is wrong)"))
    return keep, rejected
