"""Scoring, printing and plotting for ``gdn2ts quickstart``.

Forecasts are logged as one row per (stream, origin, step, channel) with a column per quantile, in raw units; the
origin is the timestamp of the stream's last observation when the forecast was read, so step ``k`` targets
``origin + k`` time units. Each forecast is scored against the actual value (the full data, before any row was
dropped or cell hidden), beside two seasonal-naive baselines for the same target: the value one day and one week
before it (both at or before the origin for steps up to a day).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

__all__ = ["score", "summarize", "rolling_error", "print_report", "rolling_line", "plot_forecasts", "audit_window",
           "plot_rolling_error"]

DAY, WEEK = 24.0, 168.0


def score(forecasts: pl.DataFrame, actual: pl.DataFrame, channels, median: str = "q0.5", low: str = "q0.1",
          high: str = "q0.9") -> pl.DataFrame:
    """Join each forecast with its target's actual value and the seasonal-naive baselines.

    ``actual`` is long: stream, time, channel, value. Returns the forecast rows with ``target_time``, ``actual``,
    ``abs_err``, ``naive_day_err``, ``naive_week_err`` and ``covered`` (actual within [low, high]); forecasts whose
    target or baselines are unknown are dropped.

    Example:
        >>> import polars as pl
        >>> actual = pl.DataFrame({"stream": ["a"] * 200, "time": [float(t) for t in range(200)],
        ...                        "channel": ["x"] * 200, "value": [float(t % 24) for t in range(200)]})
        >>> fc = pl.DataFrame({"stream": ["a"], "origin": [180.0], "step": [2], "channel": ["x"],
        ...                    "q0.1": [0.0], "q0.5": [12.0], "q0.9": [20.0]})
        >>> score(fc, actual, ["x"]).select("actual", "abs_err", "naive_day_err", "covered").row(0)
        (14.0, 2.0, 0.0, True)
    """
    truth = actual.select("stream", "channel", pl.col("time").alias("target_time"), pl.col("value").alias("actual"))
    day = actual.select("stream", "channel", (pl.col("time") + DAY).alias("target_time"),
                        pl.col("value").alias("naive_day"))
    week = actual.select("stream", "channel", (pl.col("time") + WEEK).alias("target_time"),
                         pl.col("value").alias("naive_week"))
    keys = ["stream", "channel", "target_time"]
    out = (forecasts.filter(pl.col("channel").is_in(list(channels)))
           .with_columns((pl.col("origin") + pl.col("step").cast(pl.Float64)).alias("target_time"))
           .join(truth, on=keys).join(day, on=keys).join(week, on=keys)
           .drop_nulls(["actual", "naive_day", "naive_week"]))
    return out.with_columns(
        (pl.col(median) - pl.col("actual")).abs().alias("abs_err"),
        (pl.col("naive_day") - pl.col("actual")).abs().alias("naive_day_err"),
        (pl.col("naive_week") - pl.col("actual")).abs().alias("naive_week_err"),
        ((pl.col("actual") >= pl.col(low)) & (pl.col("actual") <= pl.col(high))).alias("covered"),
    )


def summarize(scored: pl.DataFrame, horizon: int) -> list[dict]:
    """MAE of the median and of both baselines at step 1, at step ``horizon`` and over all steps, with the
    coverage of the quantile band: one dict per (stream, channel)."""
    rows = []
    for (stream, channel), part in sorted(scored.group_by(["stream", "channel"]), key=lambda kv: kv[0]):
        row = {"stream": stream, "channel": channel, "forecasts": part.height}
        for tag, sub in (("h1", part.filter(pl.col("step") == 1)),
                         (f"h{horizon}", part.filter(pl.col("step") == horizon)), ("all", part)):
            for col, name in (("abs_err", "model"), ("naive_day_err", "naive_day"),
                              ("naive_week_err", "naive_week")):
                row[f"mae_{name}_{tag}"] = float(sub[col].mean()) if sub.height else None
        row["coverage"] = float(part["covered"].mean())
        rows.append(row)
    return rows


def rolling_error(scored: pl.DataFrame, channel: str, step: int, days: int = 7) -> pl.DataFrame:
    """Daily MAE of the model and the daily seasonal-naive at one step, smoothed over ``days`` days: columns
    stream, day, model, naive_day."""
    daily = (scored.filter((pl.col("channel") == channel) & (pl.col("step") == step))
             .with_columns((pl.col("target_time") // DAY).alias("day"))
             .group_by(["stream", "day"]).agg(pl.col("abs_err").mean().alias("model"),
                                              pl.col("naive_day_err").mean().alias("naive_day"))
             .sort(["stream", "day"]))
    return daily.with_columns(pl.col("model", "naive_day").rolling_mean(days, min_samples=1).over("stream"))


def print_report(console, rows: list[dict], horizon: int, units: dict[str, str]) -> None:
    """A rich table of :func:`summarize`'s rows."""
    from rich.table import Table

    unit_text = ", ".join(f"{c} in {u}" for c, u in units.items())
    table = Table(title=f"held-out MAE of the median forecast ({unit_text})")
    for col in ("stream", "channel", "step", "model", "naive 1 day", "naive 1 week", "q0.1-q0.9 coverage"):
        table.add_column(col, justify="left" if col in ("stream", "channel") else "right")
    for r in rows:
        for tag, label in (("h1", "1"), (f"h{horizon}", str(horizon)), ("all", f"1-{horizon}")):
            vals = [r[f"mae_{name}_{tag}"] for name in ("model", "naive_day", "naive_week")]
            cells = ["-" if v is None else f"{v:,.1f}" for v in vals]
            table.add_row(r["stream"], r["channel"], label, *cells, f"{r['coverage']:.0%}" if tag == "all" else "")
    console.print(table)


def rolling_line(scored: pl.DataFrame, channel: str, horizon: int) -> str:
    """One line: the model's and the daily seasonal-naive's MAE at step 1 and ``horizon`` over ``scored``."""
    parts = []
    for step in (1, horizon):
        sub = scored.filter((pl.col("channel") == channel) & (pl.col("step") == step))
        if sub.height:
            parts.append(f"step {step}: model {sub['abs_err'].mean():,.2f} vs naive {sub['naive_day_err'].mean():,.2f}")
    return f"{channel} MAE " + "; ".join(parts) if parts else f"{channel}: nothing to score yet"


def plot_forecasts(scored: pl.DataFrame, channel: str, path: Path, days: int = 7, horizon: int = 24) -> Path:
    """Per stream, the last ``days`` days: the actual values, the one-step median with its q0.1-q0.9 band, and
    the median ``horizon`` steps ahead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = sorted(scored["stream"].unique().to_list())
    fig, axes = plt.subplots(len(streams), 1, figsize=(11, 3.2 * len(streams)), squeeze=False)
    for ax, stream in zip(axes[:, 0], streams, strict=True):
        part = scored.filter((pl.col("stream") == stream) & (pl.col("channel") == channel))
        end = part["target_time"].max()
        part = part.filter(pl.col("target_time") > end - days * DAY)
        one = part.filter(pl.col("step") == 1).sort("target_time")
        far = part.filter(pl.col("step") == horizon).sort("target_time")
        ax.set_title(f"{stream}: {channel}")
        if one.height == 0:
            ax.text(0.5, 0.5, "no one-step forecast scored yet", ha="center", transform=ax.transAxes)
            continue
        x0 = float(one["target_time"].min())
        days_one = ((one["target_time"] - x0) / DAY).to_numpy()
        days_far = ((far["target_time"] - x0) / DAY).to_numpy()
        ax.plot(days_one, one["actual"].to_numpy(), color="black", lw=1.2, label="actual")
        ax.fill_between(days_one, one["q0.1"].to_numpy(), one["q0.9"].to_numpy(), color="tab:blue", alpha=0.25,
                        label="q0.1-q0.9, 1 step ahead")
        ax.plot(days_one, one["q0.5"].to_numpy(), color="tab:blue", lw=1, label="median, 1 step")
        ax.plot(days_far, far["q0.5"].to_numpy(), color="tab:orange", lw=1, ls="--", label=f"median, {horizon} steps")
        ax.set_xlabel("days")
        ax.legend(loc="upper left", fontsize=8, ncols=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rolling_error(scored: pl.DataFrame, channel: str, path: Path, steps=(1, 24)) -> Path:
    """Seven-day rolling MAE of the model against the daily seasonal-naive, per stream and step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(steps), figsize=(11, 3.5), squeeze=False)
    for ax, step in zip(axes[0], steps, strict=True):
        roll = rolling_error(scored, channel, step)
        if roll.height == 0:
            ax.text(0.5, 0.5, "no scored forecast yet", ha="center", transform=ax.transAxes)
        for i, stream in enumerate(sorted(roll["stream"].unique().to_list())):
            part = roll.filter(pl.col("stream") == stream)
            day = (part["day"] - part["day"].min()).to_numpy()
            ax.plot(day, part["model"].to_numpy(), color=f"C{i}", label=f"{stream} model")
            ax.plot(day, part["naive_day"].to_numpy(), color=f"C{i}", ls=":", label=f"{stream} naive 1 day")
        ax.set_title(f"{channel}: 7-day rolling MAE, {step} step{'s' if step > 1 else ''} ahead")
        ax.set_xlabel("day of held-out period")
        if roll.height:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def audit_window(runner, window: pl.DataFrame, channel: str, path: Path) -> str:
    """Audit ``window`` (the runner's input rows of the next held-out hours) read-only from each stream's current
    state, with each stream's highest ``channel`` value in the window's first half tagged (a rare regime's onset,
    as far as a price spike is one; the second half shows how long the state recalls it); write the audit plot to
    ``path`` and return the summary text."""
    from gdn2ts.apps.audit_report import audit_summary_text, plot_audit

    start, end = float(window["time"].min()), float(window["time"].max())
    first_half = window.filter(pl.col("time") <= (start + end) / 2)
    peaks = (first_half.drop_nulls(channel).sort(channel, descending=True, maintain_order=True)
             .unique("stream", keep="first", maintain_order=True).sort("stream"))
    tags = {f"{r['stream']} {channel} peak": (r["stream"], r["time"]) for r in peaks.iter_rows(named=True)}
    audit = runner.audit(window, tags=tags)
    plot_audit(audit, path)
    # the model counts time in hours: the half-lives come in hours, and the horizon is horizon * time_unit of them
    cfg = runner.encoder.config
    return (f"eviction audit of the next {end - start + 1:g} held-out hours ({window.height} rows) from each "
            f"stream's state (read-only; tags: each stream's highest {channel} in the first half; plot: {path})\n"
            + audit_summary_text(audit, unit="h", horizon=cfg.horizon * cfg.time_unit))
