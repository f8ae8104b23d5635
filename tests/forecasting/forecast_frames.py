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
