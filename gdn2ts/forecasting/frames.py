"""Polars in, polars out: fit a forecaster on a long-format frame and forecast the next horizon of every series,
with the known covariates of the future given as a frame, timestamps in the data's own type.

    module = fit_forecaster(history, FitConfig(data=DataConfig(layout="long", ...)))
    frame = forecast(module, history, future)     # future: per series, the next H steps of the known columns

A forecast frame has one row per (series, step, channel): ``series``, ``step`` (1..H), ``time``, ``channel``,
``actual`` (null: the future is unknown), ``point`` and ``q<level>`` per quantile, in the data's units (the
target transform undone, clamped at 0 with ``nonnegative``). A backtest frame (``rolling.py``) has the same
columns plus ``cutoff``.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace

import numpy as np
import polars as pl
import torch

from gdn2ts.forecasting.codec import check_columns, series_frames
from gdn2ts.forecasting.data import DataError, Series, window_item
from gdn2ts.forecasting.fit import FitConfig, fit
from gdn2ts.forecasting.lightning import ForecastDataModule, ForecastModule, _inputs
from gdn2ts.forecasting.timegrid import future_times

__all__ = ["fit_forecaster", "forecast", "future_series", "forecast_origins"]


def fit_forecaster(frame: pl.DataFrame, config: FitConfig, out: str | None = None, quiet: bool = False
                   ) -> ForecastModule:
    """Fit the forecaster of ``config`` on ``frame`` (each series cut by ``config.data.fractions`` into train,
    validation for early stopping, and test) and return it with its best validation weights, in eval mode.

    Args:
        frame: long format (``config.data``: id, time, targets, known, past and static columns).
        config: data, model and training (``config.out`` is not used: see ``out``).
        out: folder for ``best.ckpt`` (None: a temporary folder, removed after the weights are loaded).
        quiet: no progress bar.

    The fit's summary (epochs, best validation MSE, seconds, checkpoint) is the module's ``summary``.

    Example:
        >>> from gdn2ts.forecasting.data import DataConfig
        >>> from gdn2ts.forecasting.lightning import ModelConfig, TrainConfig
        >>> t = list(range(120))
        >>> df = pl.DataFrame({"id": ["a"] * 120, "t": t, "y": [float(i % 6) for i in t]})
        >>> cfg = FitConfig(data=DataConfig(layout="long", id_column="id", time_column="t", targets=("y",),
        ...                                 lookback=12, horizon=3, fractions=(0.7, 0.3, 0.0)),
        ...                 model=ModelConfig(hidden_size=8, head_dim=4), train=TrainConfig(max_epochs=1))
        >>> module = fit_forecaster(df, cfg, quiet=True)
        >>> forecast(module, df)["time"].to_list()
        [120, 121, 122]
    """
    if not isinstance(config, FitConfig):
        raise DataError(f"fit_forecaster: 'config' expected a FitConfig, got {type(config).__name__}")
    dm = ForecastDataModule(config.data, frame)
    with tempfile.TemporaryDirectory(prefix="gdn2ts-fit-") as tmp:
        module, info = fit(config.model, dm, config.train, out=out or tmp, quiet=quiet)
    module.summary = {**info, "checkpoint": info["checkpoint"] if out else None}
    return module.eval()


def _future_rows(sid, times: pl.Series, got: pl.DataFrame | None, known: tuple[str, ...], cfg, H: int,
                 last) -> pl.DataFrame:
    """The ``H`` future rows of one series: its forecast times and, when the model has known covariates, their
    values from ``got`` (the future frame's rows of this series)."""
    rows = times.to_frame()
    if not known:
        return rows
    got = got.select(cfg.time_column, *known)
    dup = got[cfg.time_column].is_duplicated()
    if dup.any():
        raise DataError(f"forecast: future frame: series {sid!r} has time {got[cfg.time_column].filter(dup)[0]} "
                        f"more than once; expected one row per series and step")
    joined = rows.join(got.with_columns(__given=pl.lit(True)), on=cfg.time_column, how="left").sort(cfg.time_column)
    lacking = joined["__given"].is_null()
    if lacking.any():
        seen = got[cfg.time_column].sort()
        span = f"{seen.len()} rows, from {seen[0]} to {seen[-1]}" if seen.len() else "no rows"
        raise DataError(f"forecast: future frame: series {sid!r} lacks {int(lacking.sum())} of its {H} forecast steps "
                        f"(first {joined[cfg.time_column].filter(lacking)[0]}); expected the {H} steps of "
                        f"{cfg.freq or 'the data frequency'} after its last history time {last}, from {times[0]} to "
                        f"{times[-1]}, got {span}")
    for c in known:
        if joined[c].null_count() or (joined.schema[c].is_float() and joined[c].is_nan().any()):
            raise DataError(f"forecast: future frame: series {sid!r} has a missing value of known covariate {c!r}")
    return joined.drop("__given")


def future_series(module: ForecastModule, history: pl.DataFrame, future: pl.DataFrame | None = None
                  ) -> tuple[list[Series], list[tuple[int, int]]]:
    """Each series of ``history`` on its grid, encoded by the module's codec and extended by the ``horizon``
    steps after its last row (known covariates from ``future``); returns the series and the forecast origins
    ``(series index, row of the last history step)``."""
    cfg, codec = module.data_config, module.codec
    H, L = cfg.horizon, cfg.lookback
    if codec.freq is None:
        raise DataError("forecast: the model's data has no inferable frequency; give DataConfig.freq and refit")
    cfg = replace(cfg, freq=codec.freq)
    groups = series_frames(history, cfg, codec.freq, where="history")
    known = tuple(cfg.known)
    if known:
        if future is None:
            raise DataError(f"forecast: the model was fit with known covariates {list(known)}; expected future= a "
                            f"frame with, per series, the next {H} steps ({codec.freq}) of "
                            f"{[cfg.id_column] if cfg.layout == 'long' else []}{[cfg.time_column, *known]}")
        need = ([cfg.id_column] if cfg.layout == "long" else []) + [cfg.time_column, *known]
        missing = [c for c in need if c not in future.columns]
        if missing:
            raise DataError(f"forecast: future frame lacks columns {missing}; expected {need}, got {future.columns}")
        want, got = history.schema[cfg.time_column], future.schema[cfg.time_column]
        if want != got:
            raise DataError(f"forecast: future frame's {cfg.time_column!r} is {got}, expected {want} as in the "
                            f"history")
    by_id = {}
    if known:
        by_id = ({k[0]: f for k, f in future.group_by(cfg.id_column, maintain_order=True)} if cfg.layout == "long"
                 else {"ETT": future})
    series, origins = [], []
    for sid, g in groups:
        last = g[cfg.time_column].tail(1)
        got = by_id.get(sid, future.clear() if known else None)
        fut = _future_rows(sid, future_times(last, codec.freq, H), got, known, cfg, H, last[0])
        ext = pl.concat([g, fut], how="diagonal_relaxed")
        s = codec.series(sid, ext, cfg)
        lo = max(0, g.height - L)
        if np.isnan(s.values[lo:g.height]).all():
            raise DataError(f"forecast: series {sid!r} has no observed target in its last {L} steps (the lookback)")
        series.append(s)
        origins.append((len(series) - 1, g.height - 1))
    return series, origins


@torch.no_grad()
def forecast_origins(module: ForecastModule, series: list[Series], origins: list[tuple[int, int]],
                     batch_size: int | None = None) -> pl.DataFrame:
    """The forecast from each origin ``(series index, row of the last lookback step)``: one row per (origin,
    step, channel) with ``series``, ``cutoff`` (the origin's timestamp), ``step``, ``time``, ``channel``,
    ``actual`` (the series' value, null where missing or beyond its rows), ``point`` and ``q<level>``."""
    cfg = module.data_config
    L, H, C = cfg.lookback, cfg.horizon, len(cfg.targets)
    qs = module.model_config.quantiles if module.model_config.kind == "gdn2" else ()
    module.eval()
    hp = module.hparams
    batch_size = batch_size or cfg.eval_batch_size
    cols: dict[str, list] = {"point": [], **{f"q{q:g}": [] for q in qs}}
    for lo in range(0, len(origins), batch_size):
        items = [window_item(series[i], o - L + 1, L, H) for i, o in origins[lo:lo + batch_size]]
        batch = {k: torch.stack([it[k] for it in items]).to(module.device)
                 for k in ("values", "times", "known", "static", "past")}
        out = module.net(*_inputs(batch, hp.n_known, hp.n_static, hp.get("n_past", 0)))
        cols["point"].append(module.codec.decode(out["point"].cpu().numpy()))
        for j, q in enumerate(qs):
            cols[f"q{q:g}"].append(module.codec.decode(out["forecast"][..., j].cpu().numpy()))
    n = len(origins)
    actual = np.full((n, H, C), np.nan)
    times, cutoffs = [], []
    for k, (i, o) in enumerate(origins):
        s = series[i]
        got = s.actual[o + 1:o + 1 + H]
        actual[k, :len(got)] = got
        times.append(s.stamps.slice(o + 1, H))
        cutoffs.append(s.stamps.slice(o, 1))
    if n == 0:
        return pl.DataFrame()
    per = np.repeat(np.arange(n), H * C)
    time = pl.concat(times).gather(np.repeat(np.arange(n * H), C))
    frame = pl.DataFrame({
        "series": pl.Series([series[i].id for i, _ in origins]).gather(per),
        "cutoff": pl.concat(cutoffs).gather(per),
        "step": np.tile(np.repeat(np.arange(1, H + 1), C), n),
        "time": time,
        "channel": np.tile(np.asarray(cfg.targets), n * H),
        "actual": pl.Series(actual.reshape(-1)).fill_nan(None),
        **{k: np.concatenate(v).reshape(-1).astype(np.float64) for k, v in cols.items()},
    })
    return frame


def forecast(module: ForecastModule, history: pl.DataFrame, future: pl.DataFrame | None = None) -> pl.DataFrame:
    """The next ``horizon`` steps of every series of ``history`` after its last row.

    Args:
        module: a fitted module (:func:`fit_forecaster`, or :func:`~gdn2ts.forecasting.fit.load_module`).
        history: frame in the training data's layout and columns (id, time, targets, known, past, static); the
            last ``lookback`` steps of each series are read (a shorter history reads as missing steps before it).
            Series need not have been seen in training.
        future: needed when the model has known covariates: id, time and the known columns, with a row for each
            of the next ``horizon`` grid steps after each series' last history time (other rows are ignored;
            missing, short or misaligned rows are an error naming the series and the steps expected). Past-only
            covariates are never needed here.

    Returns a polars frame: ``series``, ``step``, ``time`` (the history's timestamp type), ``channel``,
    ``actual`` (null), ``point``, ``q<level>``.
    """
    if not isinstance(module, ForecastModule):
        raise DataError(f"forecast: 'module' expected a fitted ForecastModule, got {type(module).__name__}")
    check_columns(history, module.data_config, "history")
    series, origins = future_series(module, history, future)
    return forecast_origins(module, series, origins).drop("cutoff")
