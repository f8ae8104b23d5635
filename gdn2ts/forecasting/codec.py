"""From a polars frame to model inputs and back: checked columns, series on their grid, and the :class:`Codec`
that turns a series' rows into scaled arrays and forecasts back into the data's units.

The codec is fit on training rows only: the target transform and scaler, the scalers of numeric known and
past-only covariates, and a vocabulary per categorical covariate. Category index 0 is reserved for 'unknown':
a category first seen after training (in validation, test or prediction rows), a null category and the categories
of the grid's inserted rows all read as 0. The codec is plain data (:meth:`Codec.to_dict`), so it travels in a
checkpoint read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from gdn2ts.forecasting.data import DataConfig, DataError, Scaler, Series
from gdn2ts.forecasting.timegrid import check_order, check_time_dtype, infer_freq, parse_freq, regular_grid

__all__ = ["Codec", "series_frames", "resolve_freq", "categorical_columns"]

def _is_category(dtype: pl.DataType) -> bool:
    return dtype == pl.String or isinstance(dtype, pl.Categorical | pl.Enum)


def categorical_columns(frame: pl.DataFrame, cfg: DataConfig) -> tuple[str, ...]:
    """The covariates read as categories: string, categorical and enum columns and those named in
    ``cfg.categorical``; other covariates must be numbers or booleans."""
    out = []
    for c in cfg.covariates:
        dtype = frame.schema[c]
        if _is_category(dtype) or c in cfg.categorical:
            out.append(c)
        elif not (dtype.is_numeric() or dtype == pl.Boolean):
            raise DataError(f"data: covariate {c!r} expected numbers, booleans or categories (strings), got {dtype}")
    return tuple(out)


def resolve_freq(frame: pl.DataFrame, cfg: DataConfig) -> str | int | None:
    """The grid's frequency: ``cfg.freq`` checked against the time column, or inferred (layout long); for layout
    ett the inferred step, or None when it cannot be inferred (the rows are read as they are)."""
    dtype = frame.schema[cfg.time_column]
    if cfg.layout == "ett":
        if cfg.freq is not None:
            return parse_freq(cfg.freq, dtype)
        try:
            return infer_freq([frame[cfg.time_column]]) if dtype.is_temporal() or dtype.is_integer() else None
        except DataError:
            return None
    check_time_dtype(dtype, cfg.time_column)
    if cfg.freq is not None:
        return parse_freq(cfg.freq, dtype)
    return infer_freq([g[cfg.time_column] for _, g in frame.group_by(cfg.id_column, maintain_order=True)])


def check_columns(frame: pl.DataFrame, cfg: DataConfig, where: str = "data") -> None:
    """The columns the configuration names are in ``frame``, with targets of numbers."""
    if not isinstance(frame, pl.DataFrame):
        raise DataError(f"{where}: expected a polars DataFrame, got {type(frame).__name__}")
    need = [cfg.time_column, *cfg.targets, *cfg.covariates] + ([cfg.id_column] if cfg.layout == "long" else [])
    missing = [c for c in dict.fromkeys(need) if c not in frame.columns]
    if missing:
        raise DataError(f"{where}: unknown columns {missing} (not in the frame); expected {need}, the frame has "
                        f"{frame.columns}")
    for c in cfg.targets:
        if not frame.schema[c].is_numeric():
            raise DataError(f"{where}: target column {c!r} expected numbers, got {frame.schema[c]}")


def series_frames(frame: pl.DataFrame, cfg: DataConfig, freq=None, where: str = "data"
                  ) -> list[tuple[object, pl.DataFrame]]:
    """``(id, rows)`` per series, ids sorted; each series' rows checked (timestamps present and increasing in row
    order, known covariates given, static ones constant) and, for layout long, put on the grid of ``freq``."""
    check_columns(frame, cfg, where)
    cols = list(dict.fromkeys([cfg.time_column, *cfg.targets, *cfg.covariates]))
    if cfg.layout == "ett":
        groups = [("ETT", frame.select(cols))]
    else:
        keep = list(dict.fromkeys([cfg.id_column, *cols]))
        groups = [(k[0], g.select(keep)) for k, g in
                  frame.sort(cfg.id_column, maintain_order=True).group_by(cfg.id_column, maintain_order=True)]
    out = []
    for sid, g in groups:
        check_order(g[cfg.time_column], sid)
        for c in cfg.known:
            if g[c].null_count() or (g.schema[c].is_float() and g[c].is_nan().any()):
                raise DataError(f"{where}: series {sid!r} has a missing known covariate {c!r} (known covariates must "
                                f"be given on every row)")
        for c in cfg.static:
            if g[c].null_count() or g[c].n_unique() > 1:
                raise DataError(f"{where}: series {sid!r}: static covariate {c!r} expected one value on every row, "
                                f"got {g[c].unique().to_list()[:5]}")
        if cfg.layout == "long":
            g = regular_grid(g, cfg.time_column, freq, sid)
            g = g.with_columns([pl.col(c).fill_null(strategy="forward").fill_null(strategy="backward")
                                for c in {*cfg.static, cfg.id_column}])
        out.append((sid, g))
    return out


def _model_times(col: pl.Series, cfg: DataConfig) -> np.ndarray:
    # the encoder's time: grid steps for layout long; for layout ett the time column in time units (hours by
    # default), as the ETT benchmarks were fit
    if cfg.layout == "long":
        return np.arange(len(col), dtype=np.float64)
    if col.dtype.is_temporal():
        return col.dt.epoch("ms").to_numpy().astype(np.float64) / (1000.0 * cfg.time_unit_seconds)
    if col.dtype.is_numeric():
        return col.cast(pl.Float64).to_numpy()
    raise DataError(f"time column {col.name!r} expected datetimes or numbers, got {col.dtype}")


def _scaler(d):
    return None if d is None else Scaler(tuple(d["mean"]), tuple(d["std"]))


@dataclass(frozen=True)
class Codec:
    """Rows of a series to model inputs and forecasts to the data's units; fit with :meth:`fit` on training rows.

    ``known`` and ``past`` list their numeric columns first, then the categorical ones (the order the model's
    inputs have); ``static`` likewise. ``vocab`` maps each categorical column to its training categories (as
    strings; index ``i + 1`` for ``vocab[c][i]``, 0 for unknown).
    """

    targets: tuple[str, ...]
    known: tuple[str, ...]
    past: tuple[str, ...]
    static: tuple[str, ...]
    vocab: dict
    target_scaler: Scaler
    known_scaler: Scaler | None = None
    past_scaler: Scaler | None = None
    transform: str = "none"
    nonnegative: bool = False
    freq: str | int | None = None
    time_column: str = "date"

    # -- fitting ------------------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, train: pl.DataFrame, cfg: DataConfig, freq=None) -> Codec:
        """The codec of ``cfg`` fit on ``train`` (every series' training rows, gridded)."""
        cats = categorical_columns(train, cfg)

        def order(cols):
            return tuple(c for c in cols if c not in cats) + tuple(c for c in cols if c in cats)

        vocab = {c: tuple(sorted(train[c].drop_nulls().cast(pl.String).unique().to_list())) for c in cats}
        raw = train.select(cfg.targets).cast(pl.Float64).fill_null(float("nan")).to_numpy()
        values = _forward(raw, cfg.target_transform, cfg.targets)
        known, past = order(cfg.known), order(cfg.past)

        def numeric_scaler(cols):
            num = [c for c in cols if c not in cats]
            if not cols:
                return None
            mean, std = (), ()
            if num:
                s = Scaler.fit(train.select(num).cast(pl.Float64).fill_null(float("nan")).to_numpy())
                mean, std = s.mean, s.std
            # category columns pass through unscaled
            k = len(cols) - len(num)
            return Scaler(mean + (0.0,) * k, std + (1.0,) * k)

        return cls(tuple(cfg.targets), known, past, order(cfg.static), vocab, Scaler.fit(values),
                   numeric_scaler(known), numeric_scaler(past), cfg.target_transform, cfg.nonnegative, freq,
                   cfg.time_column)

    # -- rows to arrays -----------------------------------------------------------------------------------------

    def _columns(self, g: pl.DataFrame, cols, scaler) -> np.ndarray:
        exprs = []
        for c in cols:
            if c in self.vocab:
                v = self.vocab[c]
                exprs.append(pl.col(c).cast(pl.String).replace_strict(v, list(range(1, len(v) + 1)), default=0,
                                                                      return_dtype=pl.Float64).fill_null(0))
            else:
                exprs.append(pl.col(c).cast(pl.Float64).fill_nan(None))
        if not exprs:
            return np.zeros((g.height, 0), np.float32)
        x = g.select(exprs).to_numpy().astype(np.float64).reshape(g.height, len(cols))
        if scaler is not None:
            x = (x - np.asarray(scaler.mean)) / np.asarray(scaler.std)
        # a missing numeric covariate (an inserted step, a null past value) reads as the training mean
        return np.nan_to_num(x, nan=0.0).astype(np.float32)

    def series(self, sid, g: pl.DataFrame, cfg: DataConfig, row0: int = 0) -> Series:
        """One series' (gridded) rows as a :class:`Series`; target columns absent from ``g`` read as missing."""
        n = g.height
        raw = np.stack([g[c].cast(pl.Float64).fill_null(float("nan")).to_numpy() if c in g.columns
                        else np.full(n, np.nan) for c in self.targets], axis=1).reshape(n, len(self.targets))
        if np.isinf(raw).any():
            raise DataError(f"data: series {sid!r} has an infinite target value")
        values = self.target_scaler.transform(_forward(raw, self.transform, self.targets, sid))
        first = g.head(1) if n else g
        static = self._columns(first, self.static, None)[0] if n else np.zeros(len(self.static), np.float32)
        return Series(sid, values, _model_times(g[self.time_column], cfg), self._columns(g, self.known,
                      self.known_scaler), static, row0, self._columns(g, self.past, self.past_scaler), raw,
                      g[self.time_column])

    # -- forecasts back to the data's units ---------------------------------------------------------------------

    def decode(self, x: np.ndarray) -> np.ndarray:
        """Scaled model outputs ``[..., C]`` (C targets last) in the data's units: unscaled, the target transform
        undone, clamped at 0 when ``nonnegative``. Monotone, so quantiles stay quantiles and stay ordered."""
        y = np.asarray(x, np.float64) * np.asarray(self.target_scaler.std) + np.asarray(self.target_scaler.mean)
        if self.transform == "log1p":
            y = np.expm1(y)
        return np.maximum(y, 0.0) if self.nonnegative else y

    def cardinalities(self, role: str) -> tuple[int, ...]:
        """Category counts (with 'unknown') of the categorical columns of ``known``, ``past`` or ``static``."""
        return tuple(len(self.vocab[c]) + 1 for c in getattr(self, role) if c in self.vocab)

    # -- plain data (checkpoints) -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        def sc(s):
            return None if s is None else {"mean": list(s.mean), "std": list(s.std)}

        return {"targets": list(self.targets), "known": list(self.known), "past": list(self.past),
                "static": list(self.static), "vocab": {k: list(v) for k, v in self.vocab.items()},
                "target_scaler": sc(self.target_scaler), "known_scaler": sc(self.known_scaler),
                "past_scaler": sc(self.past_scaler), "transform": self.transform, "nonnegative": self.nonnegative,
                "freq": self.freq, "time_column": self.time_column}

    @classmethod
    def from_dict(cls, d: dict) -> Codec:
        return cls(tuple(d["targets"]), tuple(d["known"]), tuple(d["past"]), tuple(d["static"]),
                   {k: tuple(v) for k, v in d["vocab"].items()}, _scaler(d["target_scaler"]),
                   _scaler(d["known_scaler"]), _scaler(d["past_scaler"]), d["transform"], d["nonnegative"],
                   d["freq"], d["time_column"])


def _forward(raw: np.ndarray, transform: str, targets, sid=None) -> np.ndarray:
    if transform == "none":
        return raw
    bad = np.argwhere(raw < 0)
    if len(bad):
        where = "" if sid is None else f"series {sid!r}, "
        raise DataError(f"data: target_transform 'log1p' expected non-negative targets, got {raw[tuple(bad[0])]} "
                        f"({where}column {targets[bad[0][1]]!r})")
    return np.log1p(raw)
