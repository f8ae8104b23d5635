"""The public benchmark series of the forecasting literature: where each file lives online, what it holds, and the
splits of the online protocol (``docs/evidence.md``).

Only ETTh1 ships beside this repository (``../shared/data/ett/``). The others are named here with their public URL
so that a user online can fetch them (``load_series(name, path, download=True)``); a downloaded file is kept only
if it has the published number of rows and columns (and the SHA-256, where one is recorded). Nothing downloads
unless asked.

Online protocol borders (OnlineTSF / Proceed, from their public description): the train, validation and online
test parts are 20 %, 5 % and 75 % of the rows in time order. On the ETT series this is taken of the 20 months
the ETT benchmarks use (14,400 hourly or 57,600 quarter-hourly rows; the file's last rows stay unused as in the
long-horizon protocol), elsewhere of the whole file (train ``int(0.2 n)`` rows, test ``int(0.75 n)`` rows, the
rest validation).
"""

from __future__ import annotations

import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from gdn2ts.forecasting.data import ETT_CHANNELS, ETTH1_SHA256, DataError, _sha256, load_table

__all__ = ["SeriesSource", "SOURCES", "online_borders", "load_series", "download_series", "series_values"]

_ETT = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/"
_TSLIB = "https://huggingface.co/datasets/thuml/Time-Series-Library/resolve/main/"


@dataclass(frozen=True)
class SeriesSource:
    """One public series (a CSV with a ``date`` column and numeric channels)."""

    name: str
    """Its name in the literature."""
    url: str
    """Public URL of the CSV file."""
    rows: int
    """Rows of the published file."""
    n_channels: int
    """Numeric columns beside the time column."""
    step_minutes: float
    """Minutes between rows."""
    period: int
    """Rows in a day (the seasonal-naive period)."""
    ett_months: bool = False
    """The online split is taken of the 20 months of the ETT benchmarks instead of the whole file."""
    channels: tuple[str, ...] | None = None
    """Channel columns in order (None: every column but ``date``, in file order)."""
    sha256: str | None = None
    """SHA-256 of the published file, where recorded here."""


SOURCES: dict[str, SeriesSource] = {s.name: s for s in (
    SeriesSource("ETTh1", _ETT + "ETTh1.csv", 17420, 7, 60, 24, True, ETT_CHANNELS, ETTH1_SHA256),
    SeriesSource("ETTh2", _ETT + "ETTh2.csv", 17420, 7, 60, 24, True, ETT_CHANNELS),
    SeriesSource("ETTm1", _ETT + "ETTm1.csv", 69680, 7, 15, 96, True, ETT_CHANNELS),
    SeriesSource("ETTm2", _ETT + "ETTm2.csv", 69680, 7, 15, 96, True, ETT_CHANNELS),
    SeriesSource("Weather", _TSLIB + "weather/weather.csv", 52696, 21, 10, 144),
    SeriesSource("ECL", _TSLIB + "electricity/electricity.csv", 26304, 321, 60, 24),
    SeriesSource("Traffic", _TSLIB + "traffic/traffic.csv", 17544, 862, 60, 24),
)}


def _source(name: str) -> SeriesSource:
    if name not in SOURCES:
        raise DataError(f"series: unknown series {name!r}; expected one of {sorted(SOURCES)}")
    return SOURCES[name]


def online_borders(name: str, n_rows: int | None = None) -> tuple[int, int, int]:
    """End rows of train, validation and online test of the 20 : 5 : 75 protocol for series ``name`` (of
    ``n_rows`` rows; default its published length).

    Example:
        >>> online_borders("ETTh1"), online_borders("ETTm1")
        ((2880, 3600, 14400), (11520, 14400, 57600))
        >>> online_borders("Weather")
        (10539, 13174, 52696)
    """
    s = _source(name)
    n = s.rows if n_rows is None else n_rows
    if s.ett_months:
        month = 30 * 24 * 60 // int(s.step_minutes)
        borders = (4 * month, 5 * month, 20 * month)
    else:
        borders = (int(0.2 * n), n - int(0.75 * n), n)
    if borders[2] > n or not 0 < borders[0] < borders[1] < borders[2]:
        raise DataError(f"online_borders: {name} needs {borders[2]} rows for its split, got {n}")
    return borders


def _check(frame: pl.DataFrame, s: SeriesSource, where: str, strict: bool = True) -> pl.DataFrame:
    if "date" not in frame.columns:
        raise DataError(f"{where}: expected a 'date' column, got columns {frame.columns[:8]}")
    channels = list(s.channels) if s.channels is not None else [c for c in frame.columns if c != "date"]
    missing = [c for c in channels if c not in frame.columns]
    if missing or len(channels) != s.n_channels:
        raise DataError(f"{where}: expected {s.n_channels} channels of {s.name}, got {len(channels)} "
                        f"(missing {missing})")
    if strict and frame.height != s.rows:
        raise DataError(f"{where}: expected the {s.rows} rows of the published {s.name}, got {frame.height}")
    if frame.schema["date"] == pl.String:
        frame = frame.with_columns(pl.col("date").str.to_datetime())
    return frame.select("date", *channels)


def download_series(name: str, dest: str | Path) -> Path:
    """Fetch series ``name`` from its public URL to ``dest`` (a file path); the file is kept only if its rows and
    channels (and SHA-256, where recorded) are the published ones."""
    s = _source(name)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, suffix=".part", delete=False) as tmp:
        part = Path(tmp.name)
    try:
        urllib.request.urlretrieve(s.url, part)
        if s.sha256 is not None and _sha256(part) != s.sha256:
            raise DataError(f"download_series: {s.url} has sha256 {_sha256(part)}, expected {s.sha256}")
        _check(load_table(part, "csv"), s, f"download_series: {s.url}")
        part.replace(dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def load_series(name: str, path: str | Path, download: bool = False, strict: bool = True) -> pl.DataFrame:
    """Series ``name`` from the CSV at ``path``: ``date`` (parsed) and its channels in order, checked against the
    published shape (``strict=False``: any number of rows, as in a test file of the same layout). With
    ``download=True`` a missing file is first fetched from the public URL (see :func:`download_series`); without it
    nothing is downloaded."""
    path = Path(path)
    if not path.is_file():
        if not download:
            raise DataError(f"load_series: no file at {str(path)!r} ({name} is public at {_source(name).url}; "
                            f"pass download=True to fetch it)")
        download_series(name, path)
    return _check(load_table(path, "csv"), _source(name), f"load_series: {str(path)!r}", strict)


def series_values(frame: pl.DataFrame):
    """The channels of a loaded series as a float64 array ``[rows, channels]`` (NaN for missing)."""
    return frame.drop("date").cast(pl.Float64).fill_null(float("nan")).to_numpy()
