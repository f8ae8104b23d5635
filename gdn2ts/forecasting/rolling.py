"""Rolling-origin backtests: forecast each series from several cutoffs, as it would have been forecast then.

Cutoffs are counted back from each series' end on its grid: window ``j`` of ``n_windows`` (0 the earliest) has
its cutoff at row ``N - H - 1 - (n_windows - 1 - j) * step_size`` of a series of ``N`` grid rows, so the last
window's horizon ends at the series' last row. The cutoff is the last history timestamp of that origin: the
forecast reads the ``lookback`` steps up to it and the known covariates of the ``horizon`` steps after it (from
the frame itself), and is scored against the frame's values there.

``refit=False`` fits once, on each series' rows up to its first cutoff; ``refit=True`` fits at every cutoff on
the rows up to it; ``refit=k`` fits at every k-th cutoff (windows ``0, k, 2k, ...``) and forecasts the windows
in between with the latest fit. Each fit cuts its history into train and validation (early stopping) in the
ratio ``fractions[0] : fractions[1]`` of the data configuration; the backtest windows are its test.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace

import polars as pl

from gdn2ts.forecasting.codec import check_columns, resolve_freq, series_frames
from gdn2ts.forecasting.data import DataError
from gdn2ts.forecasting.fit import FitConfig, fit
from gdn2ts.forecasting.frames import forecast_origins
from gdn2ts.forecasting.lightning import ForecastDataModule

__all__ = ["backtest", "cross_validation", "cutoff_rows"]


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"backtest: '{name}' expected a positive int, got {value!r}")
    return value


def cutoff_rows(n_rows: int, horizon: int, n_windows: int, step_size: int) -> list[int]:
    """Grid rows of the cutoffs of a series of ``n_rows`` rows, earliest first (the last window's horizon ends at
    the last row).

    Example:
        >>> cutoff_rows(100, 24, 3, 12)
        [51, 63, 75]
    """
    return [n_rows - horizon - 1 - (n_windows - 1 - j) * step_size for j in range(n_windows)]


def backtest(frame: pl.DataFrame, config: FitConfig, n_windows: int = 1, step_size: int | None = None,
             refit: bool | int = False, quiet: bool = False) -> pl.DataFrame:
    """Rolling-origin backtest of the forecaster of ``config`` on ``frame`` (layout long).

    Args:
        frame: long format with every column of ``config.data`` (the known covariates over the whole span).
        config: data, model and training.
        n_windows: cutoffs per series.
        step_size: grid steps between consecutive cutoffs (default: the horizon, so the windows tile the end of
            each series).
        refit: False (one fit, on the rows up to the first cutoff), True (a fit at every cutoff) or k (a fit at
            every k-th cutoff).
        quiet: no progress bar (each fit shows Lightning's otherwise).

    Returns a polars frame with one row per (series, cutoff, step, channel): ``series``, ``cutoff`` (the user's
    timestamp type), ``step``, ``time``, ``channel``, ``actual`` (null where the frame has no value), ``point``
    and ``q<level>``: a forecast frame's columns plus ``cutoff``, sorted by series, cutoff and step.
    """
    if not isinstance(config, FitConfig):
        raise DataError(f"backtest: 'config' expected a FitConfig, got {type(config).__name__}")
    cfg = config.data
    if cfg.layout != "long":
        raise DataError("backtest: expected layout 'long' (an ett-layout frame is one series: add an id column, "
                        "e.g. frame.with_columns(series=pl.lit('ETT')), and use layout long)")
    H = cfg.horizon
    n_windows = _positive("n_windows", n_windows)
    step_size = _positive("step_size", H if step_size is None else step_size)
    every = 0 if refit is False else 1 if refit is True else _positive("refit", refit)
    check_columns(frame, cfg, "backtest")
    freq = resolve_freq(frame, cfg)
    groups = series_frames(frame, cfg, freq, where="backtest")
    cuts = {}
    for sid, g in groups:
        rows = cutoff_rows(g.height, H, n_windows, step_size)
        if rows[0] < 0:
            raise DataError(f"backtest: series {sid!r} has {g.height} steps of {freq}; {n_windows} windows of horizon "
                            f"{H} every {step_size} steps need at least {H + 1 + (n_windows - 1) * step_size}")
        cuts[sid] = rows
    a, b = cfg.fractions[0], cfg.fractions[1]
    fit_data = replace(cfg, freq=freq, fractions=(a / (a + b), b / (a + b), 0.0))
    starts = [j for j in range(n_windows) if j == 0 or (every and j % every == 0)]
    parts = []
    for k, j0 in enumerate(starts):
        j1 = starts[k + 1] if k + 1 < len(starts) else n_windows
        ends = pl.DataFrame({cfg.id_column: [sid for sid, _ in groups],
                             "__cutoff": [g[cfg.time_column][cuts[sid][j0]] for sid, g in groups]},
                            schema_overrides={cfg.id_column: frame.schema[cfg.id_column],
                                              "__cutoff": frame.schema[cfg.time_column]})
        # each series' rows in their order (the fit checks that time increases row by row)
        history = frame.join(ends, on=cfg.id_column, maintain_order="left").filter(
            pl.col(cfg.time_column) <= pl.col("__cutoff"))
        dm = ForecastDataModule(fit_data, history.drop("__cutoff"))
        with tempfile.TemporaryDirectory(prefix="gdn2ts-backtest-") as tmp:
            module, _ = fit(config.model, dm, config.train, out=tmp, quiet=quiet)
        module.eval()
        series = [module.codec.series(sid, g, fit_data) for sid, g in groups]
        origins = [(i, cuts[sid][j]) for j in range(j0, j1) for i, (sid, _) in enumerate(groups)]
        parts.append(forecast_origins(module, series, origins))
    return pl.concat(parts).sort(["series", "cutoff", "step"], maintain_order=True)


def cross_validation(frame: pl.DataFrame, config: FitConfig, n_windows: int = 1, step_size: int | None = None,
                     refit: bool | int = False, quiet: bool = False) -> pl.DataFrame:
    """:func:`backtest` under the name other forecasting libraries give it (same arguments, same frame)."""
    return backtest(frame, config, n_windows, step_size, refit, quiet)
