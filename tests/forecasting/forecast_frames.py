"""Small forecasting data made in the test: ETT-format frames and long-format frames with missing values,
irregular timestamps and covariates (pure functions of their arguments). Imported by bare name (pytest puts this
folder on ``sys.path``); a module of its own, since a bare ``conftest`` import would find whichever test folder's
conftest was imported first."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl

from gdn2ts.forecasting.data import ETT_CHANNELS

REAL_ETTH1 = "../shared/data/ett/ETTh1.csv"


def ett_frame(n_rows: int = 600, seed: int = 0) -> pl.DataFrame:
    """An ETT-layout frame: hourly ``date`` and the seven channels (daily cycles, a trend and noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_rows)
    cols = {name: (3 + i) + np.sin(2 * np.pi * (t + 3 * i) / 24) + 0.001 * t + 0.1 * rng.standard_normal(n_rows)
            for i, name in enumerate(ETT_CHANNELS)}
    dates = pl.datetime_range(datetime(2016, 7, 1), datetime(2016, 7, 1) + timedelta(hours=n_rows - 1), "1h",
                              eager=True)
    return pl.DataFrame({"date": dates, **cols})


def long_frame(n_series: int = 2, n_rows: int = 200, seed: int = 0, missing: float = 0.05,
               drop: float = 0.1) -> pl.DataFrame:
    """Long format: ``series``, irregular hourly ``date`` (a share of rows dropped), targets ``HUFL`` and ``OT``
    (a share hidden as null), a known covariate ``hour`` and a static ``size``."""
    rng = np.random.default_rng(seed)
    parts = []
    for s in range(n_series):
        hours = np.sort(rng.choice(int(n_rows / (1 - drop)) + 1, n_rows, replace=False))
        hufl = (s + 1) * np.sin(2 * np.pi * hours / 24) + 0.1 * rng.standard_normal(n_rows)
        ot = 10 + s + np.cos(2 * np.pi * hours / 24) + 0.1 * rng.standard_normal(n_rows)
        hidden = rng.random((2, n_rows)) < missing
        parts.append(pl.DataFrame({
            "series": [f"s{s}"] * n_rows,
            "date": [datetime(2020, 1, 1) + timedelta(hours=int(h)) for h in hours],
            "HUFL": [None if m else float(v) for v, m in zip(hufl, hidden[0], strict=True)],
            "OT": [None if m else float(v) for v, m in zip(ot, hidden[1], strict=True)],
            "hour": (hours % 24).astype(np.float64),
            "size": [float(s + 1)] * n_rows,
        }))
    return pl.concat(parts)


def counts_frame(n_series: int = 2, n_hours: int = 240, seed: int = 0, gaps: tuple[tuple[int, int], ...] = (),
                 time_zone: str | None = "Australia/Melbourne", time_unit: str = "ms") -> pl.DataFrame:
    """Hourly counts of a few stores in long format, as a practitioner has them: ``store`` (id), ``time``
    (Datetime in ``time_zone`` at ``time_unit`` precision), ``visits`` (Poisson counts with a daily cycle, many
    near zero at night), known covariates ``hour`` (int), ``weekday`` (string) and ``promo`` (0/1, raising the
    counts), a past-only ``temp`` (observed, with nulls) and a static ``region`` (string). ``gaps``: hour ranges
    ``[a, b)`` left out of every series (the rows are absent, not null)."""
    rng = np.random.default_rng(seed)
    start = datetime(2021, 3, 1)
    hours = np.arange(n_hours)
    keep = np.ones(n_hours, bool)
    for a, b in gaps:
        keep[a:b] = False
    parts = []
    for s in range(n_series):
        stamps = [start + timedelta(hours=int(h)) for h in hours]
        hour = np.array([t.hour for t in stamps])
        promo = (rng.random(n_hours) < 0.2).astype(np.int64)
        rate = (2 + s) * (1 + np.sin(2 * np.pi * (hour - 6) / 24)) ** 2 * (1 + 2 * promo) + 0.05
        temp = 15 + 5 * np.sin(2 * np.pi * hours / 24) + rng.standard_normal(n_hours)
        frame = pl.DataFrame({
            "store": [f"store{s}"] * n_hours,
            "time": pl.Series(stamps).cast(pl.Datetime(time_unit)),
            "visits": rng.poisson(rate).astype(np.int64),
            "hour": hour.astype(np.int64),
            "weekday": [t.strftime("%a") for t in stamps],
            "promo": promo,
            "temp": [None if rng.random() < 0.05 else float(v) for v in temp],
            "region": ["north" if s % 2 == 0 else "south"] * n_hours,
        }).filter(pl.Series(keep))
        parts.append(frame)
    frame = pl.concat(parts)
    if time_zone is not None:
        frame = frame.with_columns(pl.col("time").dt.replace_time_zone("UTC").dt.convert_time_zone(time_zone))
    return frame
