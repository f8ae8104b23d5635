"""Tables and the plot of ``gdn2ts bench online`` records (:mod:`gdn2ts.apps.online_bench`): cumulative test MSE
against time and the daily MSE of each method, one column per horizon."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["merge", "print_table", "markdown_table", "difference_interval", "differences_table", "plot_records",
           "main"]

LABELS = {"seasonal_naive": "seasonal naive", "forecaster_frozen": "GDN-2 forecaster, frozen",
          "forecaster_ogd": "GDN-2 forecaster + OGD", "runner_frozen": "streaming runner, frozen",
          "runner_learn": "streaming runner, learning"}


def merge(records: list[dict]) -> dict[int, dict]:
    """``{horizon: horizon record}`` of one or more records (a later record's horizon replaces an earlier one)."""
    out: dict[int, dict] = {}
    for rec in records:
        for h, hr in rec["horizons"].items():
            out[int(h)] = hr
    return dict(sorted(out.items()))


def _rows(records: list[dict]):
    horizons = merge(records)
    names = [m for m in LABELS if any(m in hr["methods"] for hr in horizons.values())]
    return horizons, names


def markdown_table(records: list[dict]) -> str:
    """Test MSE / MAE per method and horizon (and the validation MSE, and the learning rate chosen on
    validation), as a Markdown table.

    Example:
        >>> rec = {"horizons": {"24": {"methods": {"seasonal_naive": {"test": {"mse": 1.0, "mae": 0.5},
        ...                                                           "val": {"mse": 2.0}}}, "selection": {}}}}
        >>> print(markdown_table([rec]))
        | method | H=24 test MSE / MAE | H=24 val MSE | lr |
        |---|---|---|---|
        | seasonal naive | 1.000 / 0.500 | 2.000 | - |
    """
    horizons, names = _rows(records)
    head = ["method"] + [f"{c}" for h in horizons for c in (f"H={h} test MSE / MAE", f"H={h} val MSE")] + ["lr"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells, lrs = [LABELS[name]], []
        for hr in horizons.values():
            m = hr["methods"].get(name)
            cells += ["-", "-"] if m is None else [f"{m['test']['mse']:.3f} / {m['test']['mae']:.3f}",
                                                   f"{m['val']['mse']:.3f}"]
            if name in hr.get("selection", {}):
                lrs.append(f"{hr['selection'][name]['lr']:g}")
        lines.append("| " + " | ".join(cells + [", ".join(lrs) or "-"]) + " |")
    return "\n".join(lines)


def difference_interval(a, b, block: int = 7, n_boot: int = 2000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired days (each a day's test MSE of two methods) and its ``level`` interval by a
    circular moving-block bootstrap over blocks of ``block`` days (errors of nearby days are correlated).

    Example:
        >>> d, lo, hi = difference_interval([1.0, 2.0, 3.0, 2.0] * 10, [1.0, 1.5, 2.5, 2.0] * 10, block=4)
        >>> round(d, 3), lo <= d <= hi
        (0.25, True)
    """
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(diff)
    if n < block:
        raise ValueError(f"difference_interval: expected at least {block} paired days, got {n}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n, size=(n_boot, -(-n // block)))
    idx = (starts[..., None] + np.arange(block)).reshape(n_boot, -1)[:, :n] % n
    means = diff[idx].mean(1)
    tail = (1 - level) / 2
    return float(diff.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


# the comparisons tabulated: (method, against)
PAIRS = (("forecaster_ogd", "forecaster_frozen"), ("runner_learn", "runner_frozen"),
         ("runner_learn", "seasonal_naive"), ("forecaster_ogd", "seasonal_naive"),
         ("runner_learn", "forecaster_ogd"))


def differences_table(records: list[dict]) -> str:
    """Differences of test MSE between methods, per horizon, over the paired days of the test part, with 95 %
    block-bootstrap intervals (:func:`difference_interval`), as a Markdown table."""
    horizons, _ = _rows(records)
    head = ["difference of daily test MSE"] + [f"H={h}" for h in horizons]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a, b in PAIRS:
        cells = []
        for hr in horizons.values():
            ma, mb = hr["methods"].get(a), hr["methods"].get(b)
            if ma is None or mb is None:
                cells.append("-")
                continue
            d, lo, hi = difference_interval(ma["test"]["block_mse"], mb["test"]["block_mse"])
            cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append(f"| {LABELS[a]} - {LABELS[b]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(records: list[dict]) -> None:
    """The table of :func:`markdown_table` on the terminal."""
    from rich.console import Console
    from rich.table import Table

    horizons, names = _rows(records)
    table = Table(title="online protocol: test MSE / MAE (scaled), validation MSE")
    for col in ["method", *[f"H={h}" for h in horizons], "lr (validation)"]:
        table.add_column(col)
    for name in names:
        cells, lrs = [], []
        for hr in horizons.values():
            m = hr["methods"].get(name)
            cells.append("-" if m is None else f"{m['test']['mse']:.3f} / {m['test']['mae']:.3f} "
                                               f"(val {m['val']['mse']:.3f})")
            if name in hr.get("selection", {}):
                lrs.append(f"{hr['selection'][name]['lr']:g}")
        table.add_row(LABELS[name], *cells, ", ".join(lrs) or "-")
    Console(width=200).print(table)


def plot_records(records: list[dict], path: str | Path, smooth_days: int = 7) -> Path:
    """Cumulative test MSE against days into the test part (top) and the MSE of each day's forecasts, averaged
    over ``smooth_days`` days (bottom, log scale), one column per horizon, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    horizons, names = _rows(records)
    series, period = records[-1].get("series", ""), records[-1].get("period", 24)
    fig = Figure(figsize=(5.2 * len(horizons), 7.5), layout="constrained")
    axes = fig.subplots(2, len(horizons), squeeze=False)
    colors = dict(zip(LABELS, ("0.55", "tab:blue", "tab:cyan", "tab:red", "tab:orange"), strict=True))
    for j, (h, hr) in enumerate(horizons.items()):
        for name in names:
            m = hr["methods"].get(name)
            if m is None:
                continue
            cum, daily = np.asarray(m["test"]["cumulative_mse"]), np.asarray(m["test"]["block_mse"])
            # a point per day of forecasts (``period`` of them), and the last one
            days = np.arange(1, len(cum) + 1, dtype=float)
            days[-1] = m["test"]["forecasts"] / period
            label = f"{LABELS[name]} ({m['test']['mse']:.3f})"
            axes[0, j].plot(days, cum, color=colors[name], label=label, lw=1.4)
            if len(daily) >= smooth_days:
                k = np.ones(smooth_days) / smooth_days
                axes[1, j].plot(np.arange(smooth_days, len(daily) + 1), np.convolve(daily, k, "valid"),
                                color=colors[name], lw=1.0)
        axes[0, j].set_title(f"{series} online test, H = {h} ({hr['test_forecasts']} forecasts)")
        axes[0, j].set_ylabel("cumulative MSE (scaled)")
        axes[0, j].legend(fontsize=7)
        axes[1, j].set_yscale("log")
        axes[1, j].set_ylabel(f"MSE of a day's forecasts ({smooth_days}-day mean)")
        for ax in axes[:, j]:
            ax.set_xlabel("days into the test part")
            ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(paths: list[str], plot: str | None = None, markdown: bool = True) -> None:
    """Print the table of one or more JSON records (one per horizon run) and draw their plot.

    Args:
        paths: JSON records written by ``gdn2ts bench online``.
        plot: path of the plot (PNG).
        markdown: print the table as Markdown (else a terminal table).
    """
    records = [json.loads(Path(p).read_text()) for p in paths]
    if markdown:
        print(markdown_table(records) + "\n\n" + differences_table(records))
    else:
        print_table(records)
    if plot is not None:
        plot_records(records, plot)


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
