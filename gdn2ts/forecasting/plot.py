"""One-call plot of a window's history, forecast and quantile band (matplotlib's object API: no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gdn2ts.forecasting.data import DataError
from gdn2ts.forecasting.lightning import ForecastDataModule, ForecastModule

__all__ = ["plot_forecast"]


def _axis(times):
    # matplotlib takes numpy datetimes without a zone: a zoned series is drawn at its local wall times
    if isinstance(times.dtype, pl.Datetime) and times.dtype.time_zone is not None:
        times = times.dt.replace_time_zone(None)
    return times.to_numpy()


def plot_forecast(module: ForecastModule, dm: ForecastDataModule, path: str | Path, window: int = -1,
                  split: str = "test", channels: tuple[str, ...] | None = None, future=None) -> Path:
    """Draw the lookback history, the actual values, the point forecast and the outermost quantile band of one
    window (one panel per channel, against the data's own timestamps) and save it to ``path`` (PNG).

    Args:
        module: a fitted module.
        dm: its data module.
        path: output file.
        window: index of the window in ``split`` (negative counts from the end).
        split: ``val``, ``test`` or ``latest`` (the forecast after each series' last rows; window 0 is the first
            series).
        channels: channels to draw (default: all targets).
        future: for ``latest`` with known covariates, the future frame
            (:func:`~gdn2ts.forecasting.frames.forecast`).
    """
    from gdn2ts.forecasting.frames import forecast_origins, future_series

    dm.setup()
    cfg = dm.config
    channels = tuple(channels or cfg.targets)
    unknown = [c for c in channels if c not in cfg.targets]
    if unknown:
        raise DataError(f"plot_forecast: unknown channels {unknown}; expected some of {list(cfg.targets)}")
    if split == "latest":
        series, origins = future_series(module, dm.frame, future)
    elif split in ("val", "test"):
        series = dm.datasets[split].series
        origins = [(i, t + cfg.lookback - 1) for i, t in dm.datasets[split].index]
    else:
        series, origins = [], []
    n = len(origins)
    if split not in ("val", "test", "latest") or not -n <= window < n:
        raise DataError(f"plot_forecast: window {window} is not in split {split!r} ({n} windows)")
    i, origin = origins[window % n]
    s = series[i]
    frame = forecast_origins(module, [s], [(0, origin)])
    lo = max(0, origin - cfg.lookback + 1)
    history, hist_t = s.actual[lo:origin + 1], _axis(s.stamps.slice(lo, origin + 1 - lo))
    qcols = sorted((c for c in frame.columns if c.startswith("q")), key=lambda c: float(c[1:]))
    fig = Figure(figsize=(9, 2.2 * len(channels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(channels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, channels, strict=True):
        c = cfg.targets.index(name)
        f = frame.filter(frame["channel"] == name).sort("step")
        t = _axis(f["time"])
        ax.plot(hist_t, history[:, c], color="0.3", lw=1, label="history")
        if f["actual"].null_count() < f.height:
            ax.plot(t, f["actual"].to_numpy(), color="0.3", lw=1, ls="--", label="actual")
        if len(qcols) >= 2:
            ax.fill_between(t, f[qcols[0]].to_numpy(), f[qcols[-1]].to_numpy(), alpha=0.25,
                            color="tab:blue", label=f"{qcols[0][1:]}-{qcols[-1][1:]} band")
        ax.plot(t, f["point"].to_numpy(), color="tab:blue", lw=1.2, label="forecast")
        ax.set_ylabel(name)
        ax.axvline(hist_t[-1], color="0.6", lw=0.6)
    axes[0].legend(loc="upper left", fontsize=7, ncol=4)
    zone = getattr(s.stamps.dtype, "time_zone", None)
    axes[-1].set_xlabel(cfg.time_column + (f" (local time, {zone})" if zone else ""))
    fig.suptitle(f"{module.model_config.kind}: series {s.id}, forecast from {s.stamps[origin]}", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
