"""One-call plot of a window's history, forecast and quantile band (matplotlib's object API: no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gdn2ts.forecasting.data import DataError
from gdn2ts.forecasting.fit import predict_frame
from gdn2ts.forecasting.lightning import ForecastDataModule, ForecastModule

__all__ = ["plot_forecast"]


def plot_forecast(module: ForecastModule, dm: ForecastDataModule, path: str | Path, window: int = -1,
                  split: str = "test", channels: tuple[str, ...] | None = None) -> Path:
    """Draw the lookback history, the actual values, the point forecast and the outermost quantile band of one
    window (one panel per channel) and save it to ``path`` (PNG).

    Args:
        module: a fitted module.
        dm: its data module.
        path: output file.
        window: index of the window in ``split`` (negative counts from the end).
        split: ``val``, ``test`` or ``latest`` (the forecast after each series' last rows; window 0 is the first
            series).
        channels: channels to draw (default: all targets).
    """
    dm.setup()
    cfg = dm.config
    channels = tuple(channels or cfg.targets)
    unknown = [c for c in channels if c not in cfg.targets]
    if unknown:
        raise DataError(f"plot_forecast: unknown channels {unknown}; expected some of {list(cfg.targets)}")
    n = len(dm.splits["test"]) if split == "latest" else len(dm.datasets[split]) if split in dm.datasets else 0
    if split not in ("val", "test", "latest") or not -n <= window < n:
        raise DataError(f"plot_forecast: window {window} is not in split {split!r} ({n} windows)")
    window = window % n
    frame = predict_frame(module, dm, split, windows=[window])
    start = int(frame["start"][0])
    series_id = frame["series"][0]
    series = next(s for s in dm.splits["test" if split == "latest" else split] if s.id == series_id)
    hist_rows = slice(start - series.row0, start - series.row0 + cfg.lookback)
    history = module.scaler.inverse(series.values[hist_rows])
    hist_t = series.times[hist_rows]
    qcols = sorted((c for c in frame.columns if c.startswith("q")), key=lambda c: float(c[1:]))
    fig = Figure(figsize=(9, 2.2 * len(channels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(channels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, channels, strict=True):
        c = cfg.targets.index(name)
        f = frame.filter(frame["channel"] == name).sort("step")
        ax.plot(hist_t, history[:, c], color="0.3", lw=1, label="history")
        if f["actual"].null_count() == 0:
            ax.plot(f["time"], f["actual"], color="0.3", lw=1, ls="--", label="actual")
        if len(qcols) >= 2:
            ax.fill_between(f["time"].to_numpy(), f[qcols[0]].to_numpy(), f[qcols[-1]].to_numpy(), alpha=0.25,
                            color="tab:blue", label=f"{qcols[0][1:]}-{qcols[-1][1:]} band")
        ax.plot(f["time"], f["point"], color="tab:blue", lw=1.2, label="forecast")
        ax.set_ylabel(name)
        ax.axvline(float(np.asarray(hist_t)[-1]), color="0.6", lw=0.6)
    axes[0].legend(loc="upper left", fontsize=7, ncol=4)
    axes[-1].set_xlabel(f"time ({cfg.time_unit_seconds:g} s units)")
    fig.suptitle(f"{module.model_config.kind}: series {series_id}, window starting at row {start}", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
