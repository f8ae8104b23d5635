"""Forecasting data: the ETT loader (with the public URL and its checksum), a generic CSV/Parquet loader, the data
configuration, chronological splits, the training-rows scaler and every sliding window.

Long format: one row per (series, timestamp) with target columns (null or NaN for missing), known covariates
(given for the future too), past-only covariates (observed over the history only) and static covariates (constant
per series); covariates are numbers or categories. Each series lies on a regular grid of the data's frequency
(``gdn2ts/forecasting/timegrid.py``): a missing step is a row with missing values, so lookbacks and horizons count
steps of time. The ETT CSV layout (``date`` plus seven channels) is one series read by rows. Windows: ``lookback``
rows in, the next ``horizon`` rows out, every start kept (a split of ``n`` rows has ``n - lookback - horizon + 1``
windows) except those with no observed value in their lookback or in their horizon.
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
           "load_ett", "download_ett", "load_table", "ett_borders", "split_bounds",
           "WindowDataset", "window_count", "TRANSFORMS"]

ETT_URL = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/ETTh1.csv"
ETTH1_SHA256 = "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066"
ETT_CHANNELS = ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
# the standard ETTh1 protocol: 12 / 4 / 4 months of hourly rows
ETTH1_BORDERS = (8640, 11520, 14400)


class DataError(ValueError):
    """Forecasting data that cannot be used as given (a ``ValueError``); the message names what and why."""


TRANSFORMS = ("none", "log1p")


@dataclass(frozen=True)
class DataConfig:
    """Where the data is, how it is laid out and how it is cut into windows."""

    path: str | None = None
    """CSV or Parquet file (None when the frame is given in Python)."""
    layout: str = "ett"
    """``ett`` (a ``date`` column and channel columns, one series, the standard splits) or ``long``."""
    targets: tuple[str, ...] = ETT_CHANNELS
    """Target columns (read over the lookback, forecast over the horizon); numbers, null or NaN for missing."""
    id_column: str = "series"
    """Series id column (layout long)."""
    time_column: str = "date"
    """Timestamp column: datetimes or dates (any precision and time zone) or integers; layout ett also takes
    floats."""
    freq: str | int | None = None
    """Step of the regular grid (layout long): a duration such as ``1h``, ``30m``, ``1d``, ``1w``, ``1mo`` for
    datetimes and dates, a positive int for integer times; None: the most common difference between consecutive
    timestamps. Lookback and horizon count steps of it; a step the data lacks is a missing row."""
    known: tuple[str, ...] = ()
    """Known covariate columns (given over the lookback and, at prediction, over the horizon: the future frame)."""
    past: tuple[str, ...] = ()
    """Past-only covariate columns (read over the lookback; never needed for the future; null allowed)."""
    static: tuple[str, ...] = ()
    """Static covariate columns (constant per series; the id column may be one)."""
    categorical: tuple[str, ...] = ()
    """Covariates read as categories although their values are numbers (string, categorical and enum columns
    always are): each is embedded; a category not seen in the training rows reads as 'unknown'."""
    target_transform: str = "none"
    """``none`` or ``log1p`` (the model learns ``log(1 + y)``, forecasts come back through ``expm1``; targets must be
    non-negative): for counts and other skewed positive targets."""
    nonnegative: bool = False
    """Clamp forecasts (point and every quantile) at 0: for counts and other non-negative targets."""
    lookback: int = 96
    """Steps per window read by the model (rows of the grid; rows of the file for layout ett)."""
    horizon: int = 96
    """Steps per window forecast."""
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    """Train, val and test shares of each series' rows (layout long); the test share may be 0."""
    borders: tuple[int, int, int] = ETTH1_BORDERS
    """End rows of train, val and test (layout ett; the ETTh1 protocol by default)."""
    time_unit_seconds: float = 3600.0
    """Seconds per time unit when an ett-layout time column is a datetime (the model's elapsed time)."""
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
        if len(f) != 3 or f[0] <= 0 or f[1] <= 0 or f[2] < 0 or abs(sum(f) - 1) > 1e-6:
            raise DataError(f"DataConfig: 'fractions' expected train and val shares > 0 and a test share >= 0 "
                            f"summing to 1, got {f!r}")
        b = tuple(self.borders)
        if len(b) != 3 or not 0 < b[0] < b[1] < b[2]:
            raise DataError(f"DataConfig: 'borders' expected three increasing positive row numbers, got {b!r}")
        if not self.time_unit_seconds > 0:
            raise DataError(f"DataConfig: 'time_unit_seconds' expected a positive number, got "
                            f"{self.time_unit_seconds!r}")
        if self.target_transform not in TRANSFORMS:
            raise DataError(f"DataConfig: 'target_transform' expected one of {TRANSFORMS}, got "
                            f"{self.target_transform!r}")
        if self.freq is not None and (isinstance(self.freq, bool) or not isinstance(self.freq, str | int)):
            raise DataError(f"DataConfig: 'freq' expected a duration string, an int or None, got {self.freq!r}")
        roles = {"targets": self.targets, "known": self.known, "past": self.past, "static": self.static}
        seen: dict[str, str] = {}
        for role, cols in roles.items():
            for c in cols:
                if c in seen or (role != "static" and c == self.time_column):
                    other = seen.get(c, "time_column")
                    raise DataError(f"DataConfig: column {c!r} is in both {other!r} and {role!r}; expected each "
                                    f"column in one role")
                seen[c] = role
        stray = [c for c in self.categorical if seen.get(c) not in ("known", "past", "static")]
        if stray:
            raise DataError(f"DataConfig: 'categorical' names {stray}, expected columns of known, past or static")

    @property
    def covariates(self) -> tuple[str, ...]:
        """Every covariate column: known, past and static."""
        return (*self.known, *self.past, *self.static)


@dataclass
class Series:
    """One series as the model reads it: ``values`` ``[N, C]`` float32 (transformed and scaled, NaN missing),
    ``times`` ``[N]`` float64 (the model's time: grid steps, or time units for layout ett), ``known`` ``[N, K]``
    float32 (numbers scaled, then category indices), ``static`` ``[S]`` float32, ``row0`` its first row's index in
    the (gridded) source, ``past`` ``[N, P]`` float32, ``actual`` ``[N, C]`` float64 (the targets as given, NaN
    missing) and ``stamps`` (the N timestamps in the user's type, a polars Series)."""

    id: object
    values: np.ndarray
    times: np.ndarray
    known: np.ndarray
    static: np.ndarray
    row0: int = 0
    past: np.ndarray | None = None
    actual: np.ndarray | None = None
    stamps: pl.Series | None = None

    def rows(self, start: int, stop: int) -> Series:
        start, stop = max(start, 0), min(stop, len(self.times))
        return Series(self.id, self.values[start:stop], self.times[start:stop], self.known[start:stop],
                      self.static, self.row0 + start,
                      None if self.past is None else self.past[start:stop],
                      None if self.actual is None else self.actual[start:stop],
                      None if self.stamps is None else self.stamps.slice(start, stop - start))


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


def split_bounds(n_rows: int, cfg: DataConfig) -> dict[str, tuple[int, int]]:
    """Row ranges of the chronological splits of one series of ``n_rows`` rows; val and test start ``lookback``
    rows before their border so their first window's forecast starts at the border. Layout ett follows the ETTh1
    protocol (``borders``); long cuts each series by ``fractions``.

    Example:
        >>> split_bounds(100, DataConfig(layout="long", lookback=8, horizon=4, fractions=(0.6, 0.2, 0.2)))
        {'train': (0, 60), 'val': (52, 80), 'test': (72, 100)}
    """
    L = cfg.lookback
    if cfg.layout == "ett":
        return ett_borders(L, n_rows, tuple(cfg.borders))
    a = int(n_rows * cfg.fractions[0])
    b = a + int(n_rows * cfg.fractions[1])
    if cfg.fractions[2] == 0:
        b = n_rows
    return {"train": (0, a), "val": (max(a - L, 0), b), "test": (max(b - L, 0), n_rows)}


def window_count(n_rows: int, lookback: int, horizon: int) -> int:
    """Windows in ``n_rows`` consecutive rows, every start kept: ``max(0, n - L - H + 1)``."""
    return max(0, n_rows - lookback - horizon + 1)


def window_item(s: Series, start: int, lookback: int, horizon: int) -> dict:
    """The window of ``s`` whose lookback starts at its row ``start``: ``values`` ``[L, C]``, ``times`` ``[L]``
    (relative to the window's first step), ``target`` ``[H, C]``, ``known`` ``[L + H, K]``, ``past`` ``[L, P]``,
    ``static`` ``[S]``. Rows before the series' first (a history shorter than the lookback) are missing steps:
    NaN values, known and past covariates at 0 (the training mean, or the 'unknown' category), times one step
    apart."""
    L, H = lookback, horizon
    pad = max(0, -start)
    lo = start + pad
    values, known = s.values[lo:start + L], s.known[lo:start + L + H]
    past = s.past[lo:start + L] if s.past is not None else np.zeros((L - pad, 0), np.float32)
    times = s.times[lo:start + L]
    if pad:
        values = np.concatenate([np.full((pad, values.shape[1]), np.nan, np.float32), values])
        known = np.concatenate([np.zeros((pad, known.shape[1]), np.float32), known])
        past = np.concatenate([np.zeros((pad, past.shape[1]), np.float32), past])
        times = np.concatenate([times[0] - np.arange(pad, 0, -1, dtype=np.float64), times])
    return {"values": torch.from_numpy(np.ascontiguousarray(values)), "times": torch.from_numpy(times - times[0]),
            "target": torch.from_numpy(s.values[start + L:start + L + H]), "known": torch.from_numpy(known),
            "past": torch.from_numpy(np.ascontiguousarray(past)), "static": torch.from_numpy(s.static)}


def _window_starts(s: Series, lookback: int, horizon: int) -> np.ndarray:
    # starts whose lookback and horizon each hold an observed value (a window with nothing to read or to score is
    # left out: a gap longer than the lookback or the horizon yields no window)
    n = window_count(len(s.times), lookback, horizon)
    if n == 0:
        return np.zeros(0, np.int64)
    seen = np.concatenate([[0], np.cumsum(~np.isnan(s.values).all(1))])
    t = np.arange(n)
    ok = (seen[t + lookback] > seen[t]) & (seen[t + lookback + horizon] > seen[t + lookback])
    return t[ok]


class WindowDataset(Dataset):
    """Every (lookback, horizon) window of a list of series with an observed value in its lookback and in its
    horizon.

    Items: :func:`window_item`'s, plus ``series`` (index into the list) and ``start`` (row of the window's first
    step in its series' source).
    """

    def __init__(self, series: list[Series], lookback: int, horizon: int):
        self.series, self.L, self.H = series, lookback, horizon
        self.index = [(i, int(t)) for i, s in enumerate(series) for t in _window_starts(s, lookback, horizon)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        i, t = self.index[k]
        s = self.series[i]
        return {**window_item(s, t, self.L, self.H), "series": i, "start": s.row0 + t}
