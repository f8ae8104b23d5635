"""``gdn2ts stream train``: fit a streaming encoder on your own long-format file and write a checkpoint that
``gdn2ts stream apply`` and :meth:`OnlineRunner.from_checkpoint` use.

The file: a stream id column, a timestamp column, one column per channel (empty for missing) and optional
covariate columns, as CSV, Parquet or JSON lines; irregular times and gaps are fine. The timestamp type comes from
the data (date-times naive or with a zone, dates, or numbers whose unit you state) and so does the time unit (the
data's typical spacing) unless the recipe sets it. Each stream's tail is held out; the scaling (per stream or
global) and the weights see only the rest. The held-out tails are forecast and scored against the seasonal-naive
baseline, and the result goes into the report and the checkpoint.

The recipe (``tasks/streaming/*.yaml``) is typed: :class:`~gdn2ts.apps.train_recipe.TrainRecipe` with sections
``data``, ``model`` and ``train``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from gdn2ts.apps.stream_input import read_observations
from gdn2ts.apps.train_recipe import TrainRecipe
from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.models.checkpoint import Limits, save_checkpoint
from gdn2ts.streaming.fit_data import fit_scaling, infer_time_spec, season_of, split_tails, to_grid
from gdn2ts.streaming.train import fit
from gdn2ts.streaming.units import CALENDAR, Units
from gdn2ts.streaming.validation import summarize_validation, validate

__all__ = ["run_train"]


def run_train(input: str, out: str, recipe: TrainRecipe | None = None, id_column: str = "stream",
              time_column: str = "time", channels: tuple[str, ...] = (), covariates: tuple[str, ...] = (),
              time_numbers: str | None = None, time_zone: str | None = None, format: str | None = None,
              quiet: bool = False) -> dict:
    """Train on the file ``input``; write ``out``/model.safetensors, report.json and validation.png; return the report.

    ``channels``: the channel columns (default: every numeric column other than the id, the time and the
    covariates). ``time_numbers``: the unit numeric timestamps count (``s``, ``ms``, ``h``, ``d``) since
    1970-01-01. ``time_zone``: the zone of naive date-times (and of forecasts).
    """
    from rich.console import Console

    recipe = TrainRecipe() if recipe is None else recipe
    console = Console(stderr=True, quiet=quiet)
    started = time.perf_counter()
    raw = read_observations(input, format)
    for col in (id_column, time_column, *covariates):
        if col not in raw.columns:
            raise ValueError(f"{input}: no column {col!r} (columns: {raw.columns}); name the columns with "
                             "--id_column, --time_column, --covariates")
    channels = tuple(channels) or tuple(c for c in raw.columns if c not in (id_column, time_column, *covariates)
                                        and (raw.schema[c].is_numeric() or raw.schema[c] == pl.String and
                                             raw[c].str.strip_chars().cast(pl.Float64, strict=False).null_count()
                                             == raw[c].null_count()))
    missing = [c for c in channels if c not in raw.columns]
    if missing or not channels:
        raise ValueError(f"{input}: channel columns {missing or '(none found)'} (columns: {raw.columns})")
    raw = raw.select(id_column, time_column, *channels, *covariates).with_columns(pl.col(id_column).cast(pl.String))
    if raw[id_column].null_count():
        raise ValueError(f"{input}: column {id_column!r}: every row needs a stream id")
    spec = infer_time_spec(raw[time_column], raw[id_column], time_numbers, time_zone, recipe.data.time_unit)
    calendar = () if not recipe.data.calendar else CALENDAR if spec.unit_seconds < 86400 else CALENDAR[2:]
    cov_names = (*covariates, *calendar)
    bare = Units(_unit_scaler(channels), spec, cov_names)
    rows = bare.to_model(raw, id_column, time_column, "data").sort(id_column, time_column)
    rows = rows.filter(~pl.all_horizontal(pl.col(c).is_null() | pl.col(c).is_nan() for c in channels))
    tail = split_tails(rows, id_column, time_column, recipe.data.holdout)
    train_rows = rows.filter(~tail)
    scaler, own = fit_scaling(train_rows, id_column, channels, recipe.data.scaling == "per_stream")
    units = Units(scaler, spec, cov_names, own)
    t_lo, t_hi = float(train_rows[time_column].min()), float(train_rows[time_column].max())
    console.print(f"[bold]{input}[/]: {rows.height} rows of {rows[id_column].n_unique()} streams, channels "
                  f"{list(channels)}; timestamps: {spec.describe()}; held out each stream's last "
                  f"{recipe.data.holdout:.0%} ({int(tail.sum())} rows); scaling {recipe.data.scaling}")
    scaled = _rescale(rows, units, id_column, channels)
    grid = to_grid(scaled, units, id_column, time_column)
    tails = _tail_mask(grid, rows.with_columns(tail.alias("__tail")), id_column, time_column)
    train_values = grid.values.masked_fill(tails[..., None], float("nan"))
    last = int(np.flatnonzero((~torch.isnan(train_values).all(-1)).any(0).numpy())[-1]) + 1
    rec, m = recipe.train, recipe.model
    torch.manual_seed(rec.seed)
    enc_cfg = EncoderConfig(n_channels=len(channels), n_covariates=len(cov_names), hidden_size=m.hidden_size,
                            n_layers=m.n_layers, num_heads=m.num_heads, head_dim=m.head_dim, variant=m.variant,
                            horizon=m.horizon, quantiles=tuple(m.quantiles), time_unit=1.0)
    encoder = StreamEncoder(enc_cfg)
    context = min(rec.context, max(1, last - m.horizon))
    if last < context + m.horizon:
        raise ValueError(f"{input}: the training part spans {last} time units of "
                         f"{spec.describe().split('unit ')[-1]}, fewer than one window ({context} + horizon "
                         f"{m.horizon}); use a finer time unit, a shorter horizon or more data")
    tcfg = dataclasses.replace(rec, context=context)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        history = fit(encoder, train_values[:, :last], grid.times[:, :last],
                      None if grid.covariates is None else grid.covariates[:, :last], tcfg, quiet=quiet)
        loc, scale = _stream_scales(units, grid.streams)
        season = recipe.data.season or season_of(spec.unit_seconds)
        curves: list[pl.DataFrame] = []
        table = validate(encoder, grid, tails, loc, scale, context, season, channels, curves=curves)
    finally:
        torch.set_num_threads(threads)
    summary = summarize_validation(table, m.horizon)
    max_gap = recipe.data.max_gap if recipe.data.max_gap is not None else max(t_hi - t_lo, float(m.horizon))
    report = {"input": str(input), "rows": rows.height, "streams": rows[id_column].n_unique(),
              "channels": list(channels), "covariates": list(cov_names), "time": spec.to_json(),
              "time_described": spec.describe(), "scaling": recipe.data.scaling, "holdout_rows": int(tail.sum()),
              "season_rows": season, "recipe": _jsonable(recipe),
              "training": {"steps": len(history), "seconds": round(history[-1]["seconds"], 2),
                           "final_loss": round(float(np.mean([h["loss"] for h in history[-20:]])), 4),
                           "parameters": sum(p.numel() for p in encoder.parameters()), "context": context},
              "validation": summary}
    path = save_checkpoint(Path(out) / "model.safetensors", encoder, scaler, cov_names, time=spec, stream_scales=own,
                           limits=Limits(recipe.data.max_abs, max_gap, (t_lo, t_hi)),
                           columns=(id_column, time_column), info=report)
    report["checkpoint"] = str(path)
    if curves:
        report["plot"] = str(plot_validation(pl.concat(curves), units, Path(out) / "validation.png"))
    report["seconds"] = round(time.perf_counter() - started, 2)
    (Path(out) / "report.json").write_text(json.dumps(report, indent=1))
    _print_report(console, report, m.horizon)
    return report


def plot_validation(curves: pl.DataFrame, units: Units, path: Path, streams: int = 4) -> Path:
    """The held-out tails of up to ``streams`` streams (first channel): the actual values, the one-step median and
    its outermost quantile band, in the data's units and times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    channel = curves["channel"][0]
    names = curves["stream"].unique(maintain_order=True).to_list()[:streams]
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.4 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        part = curves.filter((pl.col("stream") == name) & (pl.col("channel") == channel)).sort("time")
        when = units.time_out(part["time"]).to_list()
        ax.fill_between(when, part["low"], part["high"], alpha=0.3, label="q-band, one step ahead")
        ax.plot(when, part["median"], lw=1, label="median, one step ahead")
        ax.plot(when, part["actual"], "k.", ms=2, label="actual")
        ax.set_title(f"{name}: {channel}, held-out tail", fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _unit_scaler(channels):
    from gdn2ts.models.checkpoint import Scaler

    return Scaler(tuple(channels), (0.0,) * len(channels), (1.0,) * len(channels))


def _rescale(rows: pl.DataFrame, units: Units, id_column: str, channels) -> pl.DataFrame:
    """Model-time rows with raw channels, scaled by ``units`` (per stream or global)."""
    loc, scale = units.scales_of(rows[id_column])
    x = rows.select(channels).fill_null(float("nan")).to_numpy().astype(np.float64)
    return rows.with_columns(pl.Series(c, (x[:, j] - loc[:, j]) / scale[:, j]) for j, c in enumerate(channels))


def _tail_mask(grid, rows: pl.DataFrame, id_column: str, time_column: str) -> torch.Tensor:
    """``[S, N]`` grid rows at or after each stream's first held-out time."""
    cut = rows.filter(pl.col("__tail")).group_by(id_column).agg(pl.col(time_column).min())
    first = dict(zip(cut[id_column].to_list(), cut[time_column].to_list(), strict=True))
    n = grid.values.shape[1]
    # a grid row belongs to the tail from the row of the first held-out time on
    start = torch.tensor([np.floor(first[s] - grid.t0 + 0.5) if s in first else n for s in grid.streams])
    return torch.arange(n)[None, :] >= start[:, None]


def _stream_scales(units: Units, streams: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return units.scales_of(pl.Series(streams, dtype=pl.String))


def _jsonable(recipe: TrainRecipe) -> dict:
    raw = dataclasses.asdict(recipe)
    raw["train"]["max_seconds"] = None if raw["train"]["max_seconds"] == float("inf") else raw["train"]["max_seconds"]
    return raw


def _print_report(console, report: dict, horizon: int) -> None:
    from rich.table import Table

    t = report["training"]
    console.print(f"trained {t['parameters']:,} parameters for {t['steps']} steps in {t['seconds']} s (loss "
                  f"{t['final_loss']}); held-out tails against the seasonal-naive baseline ({report['season_rows']} "
                  "rows per season), in the data's units:")
    def fmt(v):
        return "-" if v is None else f"{v:,.4g}"

    table = Table("channel", "steps", "targets", "model MAE", "naive MAE", "ratio", "q-band coverage")
    for row in report["validation"]:
        for tag, label in (("step_1", "1"), (f"step_{horizon}", str(horizon)), ("all", f"1-{horizon}")):
            r = row[tag]
            table.add_row(row["channel"], label, str(r["targets"]), fmt(r["mae"]), fmt(r["naive_mae"]),
                          fmt(r["ratio"]), "-" if r["coverage"] is None else f"{r['coverage']:.0%}")
    console.print(table)
    console.print(f"wrote {report['checkpoint']}, report.json and validation.png ({report['seconds']} s)")
