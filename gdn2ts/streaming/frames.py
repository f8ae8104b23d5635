"""The edge where observations enter the runner: a batch in long format (a stream id column, a timestamp column,
one column per channel with nulls for missing, the covariate columns) checked once and brought to one schema.

Everything below this edge (round planning, the encoder, the op) trusts the frame: the checks here are the
only per-value checks of an ``observe`` call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import polars as pl

__all__ = ["ObservationSchema", "as_table"]


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
        need = [id_col, time_col, *self.covariates]
        missing = [c for c in need if c not in frame.columns]
        if missing:
            raise ValueError(f"{op}: batch lacks required columns {missing}")
        known = set(need) | set(self.channels)
        unknown = [c for c in frame.columns if c not in known]
        if unknown:
            raise ValueError(f"{op}: unknown columns {unknown} (channels are {list(self.channels)})")
        numeric = (time_col, *self.channels, *self.covariates)
        for c in numeric:
            if c in frame.columns and frame.height and not frame.schema[c].is_numeric() and \
                    frame.schema[c] != pl.Null:
                raise ValueError(f"{op}: column {c!r} expected numbers, got {frame.schema[c]}")
        frame = frame.select(pl.col(id_col).cast(pl.String),
                             *[pl.col(c).cast(pl.Float64) if c in frame.columns else
                               pl.lit(None, dtype=pl.Float64).alias(c) for c in numeric])
        if frame[id_col].null_count():
            raise ValueError(f"{op}: stream ids must not be null")
        for c in (time_col, *self.covariates):
            if frame[c].null_count() or frame[c].is_nan().any() or frame[c].is_infinite().any():
                raise ValueError(f"{op}: column {c!r} expected finite values in every row")
        for c in self.channels:
            bad = frame.filter(pl.col(c).is_infinite())
            if bad.height:
                raise ValueError(f"{op}: column {c!r} holds inf for stream {bad[id_col][0]!r} "
                                 "(missing values are null or NaN; inf is an error)")
        return frame
