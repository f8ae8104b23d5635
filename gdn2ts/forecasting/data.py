"""Forecasting data: the ETT loader (with the public URL and its checksum), a generic CSV/Parquet loader, series in
long format, chronological splits, the training-rows scaler and every sliding window.

Long format: one row per (series, timestamp) with target columns (null or NaN for missing), known covariates
(given for the future too) and static covariates (constant per series). The ETT CSV layout (``date`` plus seven
channels) is one series. Windows are taken by row: ``lookback`` rows in, the next ``horizon`` rows out, every
start kept (a split of ``n`` rows has ``n - lookback - horizon + 1`` windows); the rows' timestamps travel with
the window, so irregular sampling reaches the model as elapsed time.
"""

from __future__ import annotations

import hashlib
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset

__all__ = ["ETT_URL", "ETTH1_SHA256", "ETT_CHANNELS", "DataError", "DataConfig", "Series", "Scaler",
           "load_ett", "download_ett", "load_table", "ett_borders", "series_from_frame", "split_series",
           "WindowDataset", "window_count"]

ETT_URL = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/ETTh1.csv"
ETTH1_SHA256 = "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066"
ETT_CHANNELS = ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
# the standard ETTh1 protocol: 12 / 4 / 4 months of hourly rows
ETTH1_BORDERS = (8640, 11520, 14400)


class DataError(ValueError):
    """Forecasting data that cannot be used as given (a ``ValueError``); the message names what and why."""


@dataclass(frozen=True)
class DataConfig:
    """Where the data is, how it is laid out and how it is cut into windows."""

    path: str
    """CSV or Parquet file."""
    layout: str = "ett"
    """``ett`` (a ``date`` column and channel columns, one series, the standard splits) or ``long``."""
    targets: tuple[str, ...] = ETT_CHANNELS
    """Target columns (read over the lookback, forecast over the horizon)."""
    id_column: str = "series"
    """Series id column (layout long)."""
    time_column: str = "date"
    """Timestamp column: datetime, or numbers already in time units."""
    known: tuple[str, ...] = ()
    """Known covariate columns (also given over the horizon)."""
    static: tuple[str, ...] = ()
    """Static covariate columns (constant per series)."""
    lookback: int = 96
    """Rows per window read by the model."""
    horizon: int = 96
    """Rows per window forecast."""
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    """Train, val and test shares of each series' rows (layout long)."""
    borders: tuple[int, int, int] = ETTH1_BORDERS
    """End rows of train, val and test (layout ett; the ETTh1 protocol by default)."""
    time_unit_seconds: float = 3600.0
    """Seconds per time unit when the time column is a datetime."""
    batch_size: int = 32
    """Training batch size."""
    eval_batch_size: int = 256
    """Validation, test and prediction batch size (never drops a window)."""

    def __post_init__(self):
        if self.layout not in ("ett", "long"):
            raise DataError(f"DataConfig: 'layout' expected 'ett' or 'long', got {self.layout!r}")
        for name in ("lookback", "horizon", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"DataConfig: '{name}' expected a positive int, got {value!r}")
        if not self.targets:
            raise DataError("DataConfig: 'targets' expected at least one column")
        f = tuple(self.fractions)
        if len(f) != 3 or any(x <= 0 for x in f) or abs(sum(f) - 1) > 1e-6:
            raise DataError(f"DataConfig: 'fractions' expected three positive shares summing to 1, got {f!r}")
        b = tuple(self.borders)
        if len(b) != 3 or not 0 < b[0] < b[1] < b[2]:
            raise DataError(f"DataConfig: 'borders' expected three increasing positive row numbers, got {b!r}")
        if not self.time_unit_seconds > 0:
            raise DataError(f"DataConfig: 'time_unit_seconds' expected a positive number, got "
                            f"{self.time_unit_seconds!r}")


@dataclass
class Series:
    """One series: ``values`` ``[N, C]`` float32 (NaN missing), ``times`` ``[N]`` float64 (time units),
    ``known`` ``[N, K]`` float32, ``static`` ``[S]`` float32, ``row0`` its first row's index in the source."""

    id: str
    values: np.ndarray
    times: np.ndarray
    known: np.ndarray
    static: np.ndarray
    row0: int = 0

    def rows(self, start: int, stop: int) -> Series:
        return Series(self.id, self.values[start:stop], self.times[start:stop], self.known[start:stop],
                      self.static, self.row0 + start)


@dataclass(frozen=True)
class Scaler:
    """Per-column standardization fit on training rows only (NaN ignored).

    Example:
        >>> s = Scaler.fit(np.array([[1.0, 10.0], [3.0, np.nan], [5.0, 30.0]]))
        >>> s.mean, [round(x, 4) for x in s.std]
        ((3.0, 20.0), [1.633, 10.0])
        >>> s.transform(np.array([[3.0, 20.0]])).tolist()
        [[0.0, 0.0]]
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, rows: np.ndarray) -> Scaler:
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise DataError(f"Scaler: expected training rows [N > 0, C], got shape {rows.shape}")
        mean = np.nanmean(rows, axis=0)
        std = np.nanstd(rows, axis=0)
        if not np.isfinite(mean).all():
            raise DataError("Scaler: a column has no observed value in the training rows")
        # a constant column keeps unit scale instead of dividing by zero
        std = np.where(std > 1e-8, std, 1.0)
        return cls(tuple(float(x) for x in mean), tuple(float(x) for x in std))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)

    def inverse(self, x):
        return x * np.asarray(self.std) + np.asarray(self.mean)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_ett(dest: str | Path, url: str = ETT_URL, sha256: str = ETTH1_SHA256) -> Path:
    """Download ETTh1 from its public URL to ``dest`` (a file path) and verify its SHA-256 before it is kept."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, suffix=".part", delete=False) as tmp:
        part = Path(tmp.name)
    try:
        urllib.request.urlretrieve(url, part)
        got = _sha256(part)
        if got != sha256:
            raise DataError(f"download_ett: {url} has sha256 {got}, expected {sha256} (datasets/ETTh1.md)")
        part.replace(dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def load_table(path: str | Path, format: str | None = None) -> pl.DataFrame:
    """A CSV or Parquet file as a polars DataFrame (format by suffix unless given).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.csv"; _ = p.write_text("a,b\\n1,2\\n")
        >>> load_table(p).shape
        (1, 2)
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"load_table: no file at {str(path)!r}")
    fmt = format or {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(path.suffix.lower())
    if fmt == "csv":
        return pl.read_csv(path, try_parse_dates=True)
    if fmt == "parquet":
        return pl.read_parquet(path)
    raise DataError(f"load_table: expected a .csv or .parquet file (or format='csv'/'parquet'), got {str(path)!r}")


def load_ett(path: str | Path, download: bool = False) -> pl.DataFrame:
    """An ETT-format CSV (``date`` and the seven channels) with the date parsed; ``download=True`` fetches ETTh1
    to ``path`` first when it is missing (checksum verified)."""
    path = Path(path)
    if download and not path.is_file():
        download_ett(path)
    df = load_table(path, "csv")
    missing = [c for c in ("date", *ETT_CHANNELS) if c not in df.columns]
    if missing:
        raise DataError(f"load_ett: {str(path)!r} lacks columns {missing}; expected date, {', '.join(ETT_CHANNELS)}")
    if df.schema["date"] == pl.String:
        df = df.with_columns(pl.col("date").str.to_datetime())
    return df


def ett_borders(lookback: int, n_rows: int, borders: tuple[int, int, int] = ETTH1_BORDERS
                ) -> dict[str, tuple[int, int]]:
    """Row ranges of the ETTh1 protocol: train [0, 8640), val [8640 - L, 11520), test [11520 - L, 14400)
    (other ``borders`` move the three ends).

    Example:
        >>> ett_borders(96, 17420)
        {'train': (0, 8640), 'val': (8544, 11520), 'test': (11424, 14400)}
    """
    a, b, c = borders
    if n_rows < c:
        raise DataError(f"ett_borders: the split borders {tuple(borders)} need {c} rows, the file has {n_rows}")
    if a - lookback < 0 or a <= lookback:
        raise DataError(f"ett_borders: lookback {lookback} does not fit before the train border {a}")
    return {"train": (0, a), "val": (a - lookback, b), "test": (b - lookback, c)}


def _times(col: pl.Series, unit_seconds: float) -> np.ndarray:
    if col.dtype.is_temporal():
        return col.dt.epoch("ms").to_numpy().astype(np.float64) / (1000.0 * unit_seconds)
    if col.dtype.is_numeric():
        return col.cast(pl.Float64).to_numpy()
    raise DataError(f"time column {col.name!r} expected datetimes or numbers, got {col.dtype}")


def series_from_frame(df: pl.DataFrame, cfg: DataConfig) -> list[Series]:
    """Split a frame into sorted :class:`Series` (one for layout ett), checking columns and timestamps."""
    need = [cfg.time_column, *cfg.targets, *cfg.known, *cfg.static] + ([cfg.id_column] if cfg.layout == "long"
                                                                        else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"data: missing columns {missing}; expected {need}")
    for c in (*cfg.targets, *cfg.known, *cfg.static):
        if not df.schema[c].is_numeric():
            raise DataError(f"data: column {c!r} expected numbers, got {df.schema[c]}")
    groups = [("ETT", df)] if cfg.layout == "ett" else \
        [(str(k[0]), g) for k, g in df.sort(cfg.id_column, maintain_order=True).group_by(cfg.id_column,
                                                                                          maintain_order=True)]
    out = []
    for sid, g in groups:
        g = g.sort(cfg.time_column)
        times = _times(g[cfg.time_column], cfg.time_unit_seconds)
        if not np.isfinite(times).all() or (np.diff(times) <= 0).any():
            raise DataError(f"data: series {sid!r} has missing or repeated timestamps in {cfg.time_column!r}")
        values = g.select(cfg.targets).cast(pl.Float32).fill_null(float("nan")).to_numpy().astype(np.float32)
        if np.isinf(values).any():
            raise DataError(f"data: series {sid!r} has an infinite target value")
        known = g.select(cfg.known).cast(pl.Float32).to_numpy().astype(np.float32).reshape(len(g), len(cfg.known))
        if not np.isfinite(known).all():
            raise DataError(f"data: series {sid!r} has a missing or infinite known covariate (known covariates "
                            f"must be given for every row)")
        static = g.select(cfg.static).cast(pl.Float32).to_numpy().astype(np.float32).reshape(len(g), len(cfg.static))
        if len(g) and (not np.isfinite(static).all() or (static != static[:1]).any()):
            raise DataError(f"data: series {sid!r} expected static covariates constant and given on every row")
        out.append(Series(sid, values, times, known, static[0] if len(g) else np.zeros(len(cfg.static), np.float32)))
    return out


def split_series(series: list[Series], cfg: DataConfig) -> dict[str, list[Series]]:
    """Chronological splits; val and test start ``lookback`` rows before their border so their first window's
    forecast starts at the border. Layout ett follows the ETTh1 protocol; long cuts each series by ``fractions``."""
    L = cfg.lookback
    splits: dict[str, list[Series]] = {"train": [], "val": [], "test": []}
    for s in series:
        n = len(s.times)
        if cfg.layout == "ett":
            borders = ett_borders(L, n, tuple(cfg.borders))
        else:
            a = int(n * cfg.fractions[0])
            b = a + int(n * cfg.fractions[1])
            borders = {"train": (0, a), "val": (max(a - L, 0), b), "test": (max(b - L, 0), n)}
        for name, (lo, hi) in borders.items():
            splits[name].append(s.rows(lo, hi))
    return splits


def window_count(n_rows: int, lookback: int, horizon: int) -> int:
    """Windows in ``n_rows`` consecutive rows, every start kept: ``max(0, n - L - H + 1)``."""
    return max(0, n_rows - lookback - horizon + 1)


class WindowDataset(Dataset):
    """Every (lookback, horizon) window of a list of series.

    Items: ``values`` ``[L, C]``, ``times`` ``[L]`` (relative to the window's first step), ``target`` ``[H, C]``,
    ``known`` ``[L + H, K]``, ``static`` ``[S]``, ``series`` (index into the list), ``start`` (row of the window's
    first step in its series' source).
    """

    def __init__(self, series: list[Series], lookback: int, horizon: int):
        self.series, self.L, self.H = series, lookback, horizon
        self.index = [(i, t) for i, s in enumerate(series) for t in range(window_count(len(s.times), lookback,
                                                                                         horizon))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        i, t = self.index[k]
        s, L, H = self.series[i], self.L, self.H
        times = s.times[t:t + L]
        return {"values": torch.from_numpy(s.values[t:t + L]), "times": torch.from_numpy(times - times[0]),
                "target": torch.from_numpy(s.values[t + L:t + L + H]),
                "known": torch.from_numpy(s.known[t:t + L + H]), "static": torch.from_numpy(s.static),
                "series": i, "start": s.row0 + t}
