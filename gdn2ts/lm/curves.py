"""Learning curves of LM training runs: the metrics of every launch of a run (``out/logs/version_<n>/metrics.csv``)
merged into one table, a plot of several runs side by side, and a table of their final figures."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

__all__ = ["final_table", "markdown_table", "plot_curves", "read_metrics"]


def read_metrics(out: str | Path) -> pl.DataFrame:
    """One row per logged step of the run in folder ``out`` (columns ``step`` and every metric: ``train/loss``,
    ``val/loss``, ``val/ppl``, ``tokens_per_s``, ``mfu``, ``lr``, ``tokens``, ...), sorted by step.

    The launches' files are read in order; a resumed launch that logs a step again replaces the earlier value, and
    a metric logged at a step on its own row (validation) joins the other metrics of that step.

    Example:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> (run / "logs/version_0").mkdir(parents=True)
        >>> csv = "step,train/loss,val/loss\\n2,3.0,\\n2,,2.9\\n4,2.5,\\n"
        >>> _ = (run / "logs/version_0/metrics.csv").write_text(csv)
        >>> (run / "logs/version_1").mkdir()
        >>> _ = (run / "logs/version_1/metrics.csv").write_text("step,train/loss\\n4,2.4\\n6,2.0\\n")
        >>> read_metrics(run).rows()
        [(2, 3.0, 2.9), (4, 2.4, None), (6, 2.0, None)]
    """
    folder = Path(out) / "logs"
    files = sorted(folder.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1]))
    if not files:
        raise ValueError(f"read_metrics: argument 'out' expected a training run folder with "
                         f"logs/version_<n>/metrics.csv, found none under {str(folder)!r}")
    frames = [pl.read_csv(f, infer_schema_length=None).with_columns(pl.lit(i).alias("_launch"))
              for i, f in enumerate(files)]
    frame = pl.concat(frames, how="diagonal_relaxed")
    metrics = [c for c in frame.columns if c not in ("step", "_launch")]
    frame = frame.cast({c: pl.Float64 for c in metrics}).sort(["step", "_launch"], maintain_order=True)
    # per step and metric: the last non-null value (the latest launch's)
    merged = frame.group_by("step", maintain_order=True).agg([pl.col(c).drop_nulls().last() for c in metrics])
    return merged.sort("step").select(["step", *metrics])


def final_table(runs: dict[str, str | Path]) -> pl.DataFrame:
    """The last value of ``train/loss``, ``val/loss``, ``val/ppl``, ``tokens_per_s`` and ``mfu`` of each run
    (null where never logged), one row per run name.

    Example:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> (run / "logs/version_0").mkdir(parents=True)
        >>> _ = (run / "logs/version_0/metrics.csv").write_text("step,val/loss\\n5,2.0\\n10,1.5\\n")
        >>> final_table({"a": run})["val/loss"].to_list()
        [1.5]
    """
    rows = []
    for name, out in runs.items():
        m = read_metrics(out)
        row = {"run": name, "steps": int(m["step"].max())}
        for col in ("train/loss", "val/loss", "val/ppl", "tokens_per_s", "mfu"):
            vals = m[col].drop_nulls() if col in m.columns else pl.Series([], dtype=pl.Float64)
            row[col] = float(vals[-1]) if len(vals) else None
        rows.append(row)
    return pl.DataFrame(rows, schema={"run": pl.String, "steps": pl.Int64, "train/loss": pl.Float64,
                                      "val/loss": pl.Float64, "val/ppl": pl.Float64, "tokens_per_s": pl.Float64,
                                      "mfu": pl.Float64})


def plot_curves(runs: dict[str, str | Path], path: str | Path, metrics: tuple[str, ...] = ("train/loss", "val/loss"),
                title: str | None = None) -> Path:
    """One panel per metric (by optimizer step), one line per run; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("plot_curves: argument 'runs' expected at least one run, got none")
    tables = {name: read_metrics(out) for name, out in runs.items()}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for name, m in tables.items():
            if metric not in m.columns:
                continue
            part = m.select("step", metric).drop_nulls()
            ax.plot(part["step"].to_list(), part[metric].to_list(), label=name,
                    marker="o" if part.height < 30 else None, markersize=3)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(v: float | None, digits: int) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


def markdown_table(table: pl.DataFrame) -> str:
    """:func:`final_table` as a Markdown table (losses to 3 decimals, perplexity to 2, tokens/s whole, MFU in %).

    Example:
        >>> t = pl.DataFrame({"run": ["a"], "steps": [10], "train/loss": [1.23456], "val/loss": [None],
        ...                   "val/ppl": [3.5], "tokens_per_s": [1234.5], "mfu": [None]})
        >>> print(markdown_table(t))
        | run | steps | train loss | val loss | val ppl | tokens/s | MFU |
        |---|---|---|---|---|---|---|
        | a | 10 | 1.235 |  | 3.50 | 1,234 |  |
    """
    lines = ["| run | steps | train loss | val loss | val ppl | tokens/s | MFU |", "|---|---|---|---|---|---|---|"]
    for r in table.iter_rows(named=True):
        mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        lines.append(f"| {r['run']} | {r['steps']} | {_fmt(r['train/loss'], 3)} | {_fmt(r['val/loss'], 3)} | "
                     f"{_fmt(r['val/ppl'], 2)} | {_fmt(r['tokens_per_s'], 0)} | {mfu} |")
    return "\n".join(lines)
