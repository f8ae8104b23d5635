"""``gdn2ts bench online``: the delayed-feedback online protocol (:mod:`gdn2ts.apps.online_protocol`) on one series,
for each horizon: seasonal naive; the offline GDN-2 forecaster frozen and with online gradient descent; the
streaming encoder in the online runner frozen and learning online. Hyperparameters of the online updates are
chosen on validation alone (:func:`~gdn2ts.apps.online_protocol.select`). Writes a JSON record (rewritten after
each method, so a stopped run keeps what finished) and, optionally, a plot.

The module runs as ``python -m gdn2ts.apps.online_bench`` with the same flags.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gdn2ts.apps.online_methods import RunnerModel, SeasonalNaive, WindowModel
from gdn2ts.apps.online_protocol import Split, run_phase, select
from gdn2ts.bench.common import environment
from gdn2ts.forecasting.catalog import SOURCES, load_series, online_borders, series_values
from gdn2ts.forecasting.data import DataConfig, Scaler
from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.streaming import LearnConfig

__all__ = ["METHODS", "ProtocolSettings", "ForecasterSettings", "EncoderSettings", "run_online", "bench_online"]

METHODS = ("seasonal_naive", "forecaster_frozen", "forecaster_ogd", "runner_frozen", "runner_learn")
SELECTION_RULE = ("each learning rate of lr_grid runs the online phase through validation only (rows from the "
                  "validation border on are unreadable); the one with the lowest cumulative validation MSE is "
                  "used for the test run (the smaller on a tie); frozen weights are reported beside it, not as a "
                  "candidate")


@dataclass(frozen=True)
class ProtocolSettings:
    """The series, the splits and what is run."""

    data: str = "../shared/data/ett/ETTh1.csv"
    """CSV of the series (a ``date`` column and its channels)."""
    series: str = "ETTh1"
    """Its name in :data:`gdn2ts.forecasting.catalog.SOURCES` (channels, seasonal period, online borders)."""
    borders: tuple[int, int, int] | None = None
    """End rows of train, validation and test (None: the series' 20 : 5 : 75 online borders)."""
    horizons: tuple[int, ...] = (24, 48, 96)
    """Rows forecast at each step, one run per horizon."""
    lookback: int = 96
    """Rows read by the window forecaster."""
    methods: tuple[str, ...] = METHODS
    """Which methods run (of :data:`METHODS`)."""
    lr_grid: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
    """Learning rates of the online updates tried on validation."""
    seed: int = 0
    """Seed of the offline fits and the online updates."""
    strict: bool = True
    """Refuse a file whose rows differ from the published series (False: any length, e.g. a test file)."""

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"ProtocolSettings: 'methods' expected some of {list(METHODS)}, got {list(self.methods)}")
        if self.series not in SOURCES:
            raise ValueError(f"ProtocolSettings: 'series' expected one of {sorted(SOURCES)}, got {self.series!r}")
        if not self.lr_grid or any(not (isinstance(x, (int, float)) and 0 < x < math.inf) for x in self.lr_grid):
            raise ValueError(f"ProtocolSettings: 'lr_grid' expected positive numbers, got {self.lr_grid!r}")
        if not self.horizons or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.horizons):
            raise ValueError(f"ProtocolSettings: 'horizons' expected positive ints, got {self.horizons!r}")


@dataclass(frozen=True)
class ForecasterSettings:
    """The offline window forecaster (fit with Lightning on the train rows, early stopping on validation)."""

    preset: str = "gdn2_ci_overlap"
    """A model of ``gdn2ts bench forecast`` (its configuration and learning rates); the recorded runs of
    ``docs/evidence.md`` used ``gdn2_ci_overlap``."""
    max_epochs: int = 10
    """Epochs at most."""
    patience: int = 3
    """Epochs without a better validation MSE before stopping."""
    limit_train_batches: int | None = None
    """Training batches per epoch at most (None: all)."""


@dataclass(frozen=True)
class EncoderSettings:
    """The streaming encoder (fit on windows of the train rows) and how the runner learns online."""

    hidden_size: int = 32
    """Width."""
    n_layers: int = 2
    """GDN-2 blocks."""
    num_heads: int = 2
    """Heads per mixer."""
    head_dim: int = 16
    """Key and value size per head."""
    steps: int = 600
    """Offline training steps."""
    context: int = 256
    """Rows per offline training window."""
    batch_size: int = 16
    """Windows per offline step."""
    lr: float = 3e-3
    """Offline peak learning rate."""
    learn_context: int = 128
    """Rows per online learning window (the runner's ``LearnConfig.context``)."""
    learn_min_context: int = 32
    """Rows before a position in its window for it to be scored (``LearnConfig.min_context``)."""


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _machine() -> dict:
    env = environment()
    env["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return env


def _fit_forecaster(frame, channels, borders, lookback, horizon, settings: ForecasterSettings, seed: int,
                    quiet: bool = True):
    import logging

    from gdn2ts.forecasting.bench import MODEL_DEFAULTS
    from gdn2ts.forecasting.fit import fit
    from gdn2ts.forecasting.lightning import ForecastDataModule, TrainConfig

    if settings.preset not in MODEL_DEFAULTS:
        raise ValueError(f"ForecasterSettings: 'preset' expected one of {sorted(MODEL_DEFAULTS)}, got "
                         f"{settings.preset!r}")
    model, fit_fields = MODEL_DEFAULTS[settings.preset]
    dm = ForecastDataModule(DataConfig(path="<frame>", layout="ett", targets=tuple(channels), lookback=lookback,
                                       horizon=horizon, borders=tuple(borders)), frame=frame)
    # a preset that carries its own budget (max_epochs, patience) keeps it
    train = TrainConfig(**{"max_epochs": settings.max_epochs, "patience": settings.patience,
                           "limit_train_batches": settings.limit_train_batches, "seed": seed, "accelerator": "cpu",
                           **fit_fields})
    if quiet:
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    module, info = fit(model, dm, train, quiet=True)
    info = {k: v for k, v in info.items() if k != "checkpoint"}
    info.update(params=sum(p.numel() for p in module.net.parameters()), model_config=_plain(model),
                train=_plain(train), scaler_mean=list(dm.scaler.mean), scaler_std=list(dm.scaler.std))
    return module.net, tuple(model.quantiles), train.quantile_weight, info


def _fit_encoder(values, b0, horizon, s: EncoderSettings, seed: int):
    from gdn2ts.streaming.train import TrainConfig, fit

    torch.manual_seed(seed)
    enc = StreamEncoder(EncoderConfig(n_channels=values.shape[1], hidden_size=s.hidden_size, n_layers=s.n_layers,
                                      num_heads=s.num_heads, head_dim=s.head_dim, horizon=horizon))
    cfg = TrainConfig(context=min(s.context, b0 - horizon), batch_size=s.batch_size, steps=s.steps, lr=s.lr,
                      seed=seed)
    start = time.perf_counter()
    # the train rows only: every window and its targets lie before the validation border
    history = fit(enc, torch.from_numpy(values[:b0]).float()[None], torch.arange(b0, dtype=torch.float64)[None],
                  None, cfg)
    return enc, {"seconds": time.perf_counter() - start, "steps": len(history), "final_loss": history[-1]["loss"],
                 "params": sum(p.numel() for p in enc.parameters()), "train": _plain(cfg),
                 "encoder_config": _plain(enc.config)}


def _plain(x):
    if dataclasses.is_dataclass(x):
        return {k: _plain(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _learn_config(s: EncoderSettings, horizon: int, lr: float) -> LearnConfig:
    return LearnConfig(history=s.learn_context + horizon + 8, context=s.learn_context,
                       min_context=min(s.learn_min_context, s.learn_context - 1), lr=lr, target_tolerance=0.0,
                       batch_streams=1)


def run_online(protocol: ProtocolSettings = ProtocolSettings(), forecaster: ForecasterSettings = ForecasterSettings(),
               encoder: EncoderSettings = EncoderSettings(), json_path: str | None = None, quiet: bool = False,
               command: str = "", keep_forecasts: bool = False) -> dict:
    """Every horizon and method of the protocol; returns (and writes to ``json_path``) the record. With
    ``keep_forecasts`` each test run's forecasts ``[origins, H, C]`` are returned under ``"_forecasts"`` (not
    written) beside the scaled values (``"_values"``)."""
    source = SOURCES[protocol.series]
    frame = load_series(protocol.series, protocol.data, strict=protocol.strict)
    channels = [c for c in frame.columns if c != "date"]
    raw = series_values(frame)
    borders = tuple(protocol.borders) if protocol.borders is not None else online_borders(protocol.series, len(raw))
    Split(len(raw), borders, max(protocol.horizons))  # every horizon fits the borders
    b0 = borders[0]
    # scaling statistics of the train rows only
    scaler = Scaler.fit(raw[:b0])
    values = scaler.transform(raw).astype(np.float64)
    record = {"protocol": "delayed-feedback online forecasting (OnlineTSF / Proceed), gdn2ts.apps.online_protocol",
              "series": protocol.series, "data": protocol.data, "rows": len(raw), "channels": channels,
              "borders": list(borders), "first_date": str(frame["date"][0]), "step_minutes": source.step_minutes,
              "period": source.period,
              "scaler": {"fit_rows": [0, b0], "mean": list(scaler.mean), "std": list(scaler.std)},
              "settings": {"protocol": _plain(protocol), "forecaster": _plain(forecaster), "encoder": _plain(encoder)},
              "selection_rule": SELECTION_RULE, "command": command or " ".join(sys.argv),
              "date": dt.datetime.now().isoformat(timespec="seconds"), "git": _git_commit(),
              "environment": _machine(), "horizons": {}}
    run = _Run(protocol, forecaster, encoder, frame, channels, values, scaler, record, json_path, quiet,
               keep_forecasts)
    for H in protocol.horizons:
        run.horizon(H)
    run.save()
    if keep_forecasts:
        return {**record, "_forecasts": run.forecasts, "_values": values}
    return record


@dataclass
class _Run:
    """The state of one :func:`run_online` call shared by its horizons."""

    protocol: ProtocolSettings
    forecaster: ForecasterSettings
    encoder: EncoderSettings
    frame: object
    channels: list[str]
    values: np.ndarray
    scaler: Scaler
    record: dict
    json_path: str | None
    quiet: bool
    keep_forecasts: bool
    forecasts: dict = dataclasses.field(default_factory=dict)
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def save(self) -> None:
        self.record["wall_seconds"] = time.perf_counter() - self.start
        if self.json_path:
            Path(self.json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.json_path).write_text(json.dumps(_plain(self.record), indent=1, allow_nan=False) + "\n")

    def run(self, method, split: Split, out: dict) -> None:
        """A test run of ``method``; its summary goes into ``out`` and the record is written."""
        H, name = split.horizon, method.name
        r = run_phase(method, self.values, split, "test", SOURCES[self.protocol.series].period, self.keep_forecasts,
                      _progress(name, H, self.quiet))
        out["methods"][name] = r.summary()
        if self.keep_forecasts:
            self.forecasts[(H, name)] = r.forecasts
        if not self.quiet:
            print(f"H={H:<3} {name:>18}: test MSE {r.test.mse:.4f} MAE {r.test.mae:.4f}, validation MSE "
                  f"{r.val.mse:.4f} ({len(r.ledger.updates)} updates, {r.seconds:.0f} s)", flush=True)
        self.save()

    def horizon(self, H: int) -> None:
        p, methods, values = self.protocol, set(self.protocol.methods), self.values
        borders = tuple(self.record["borders"])
        period = SOURCES[p.series].period
        split = Split(len(values), borders, H)
        out = self.record["horizons"][str(H)] = {
            "val_forecasts": len(split.val_origins), "test_forecasts": len(split.test_origins),
            "val_origins": [split.val_origins[0], split.val_origins[-1]],
            "test_origins": [split.test_origins[0], split.test_origins[-1]], "methods": {}, "fits": {},
            "selection": {}}
        if "seasonal_naive" in methods:
            self.run(SeasonalNaive(period, H, "seasonal_naive"), split, out)
        if {"forecaster_frozen", "forecaster_ogd"} & methods:
            net, qs, qw, info = _fit_forecaster(self.frame, self.channels, borders, p.lookback, H, self.forecaster,
                                                p.seed, self.quiet)
            # the forecaster's data module scaled by the same train rows
            if not (np.allclose(info["scaler_mean"], self.scaler.mean) and
                    np.allclose(info["scaler_std"], self.scaler.std)):
                raise RuntimeError("online bench: the forecaster's scaler differs from the protocol's")
            out["fits"]["forecaster"] = info

            def window(lr, name):
                return WindowModel(net, p.lookback, H, qs, lr, qw, p.seed, name)

            if "forecaster_frozen" in methods:
                self.run(window(None, "forecaster_frozen"), split, out)
            if "forecaster_ogd" in methods:
                lr, table = select(lambda v: window(v, "forecaster_ogd"), p.lr_grid, values, split, period)
                out["selection"]["forecaster_ogd"] = {"lr": lr, "candidates": table}
                self.run(window(lr, "forecaster_ogd"), split, out)
        if {"runner_frozen", "runner_learn"} & methods:
            enc, info = _fit_encoder(values, borders[0], H, self.encoder, p.seed)
            out["fits"]["encoder"] = info

            def runner(lr, name):
                learn = None if lr is None else _learn_config(self.encoder, H, lr)
                return RunnerModel(enc, self.channels, learn, name)

            if "runner_frozen" in methods:
                self.run(runner(None, "runner_frozen"), split, out)
            if "runner_learn" in methods:
                lr, table = select(lambda v: runner(v, "runner_learn"), p.lr_grid, values, split, period)
                out["selection"]["runner_learn"] = {"lr": lr, "candidates": table,
                                                    "learn": _plain(_learn_config(self.encoder, H, lr))}
                self.run(runner(lr, "runner_learn"), split, out)


def _progress(name: str, horizon: int, quiet: bool):
    if quiet:
        return None
    last = [time.perf_counter()]

    def report(done: int, total: int) -> None:
        # a line every minute at most: runs take minutes on a CPU
        if time.perf_counter() - last[0] > 60 or done == total:
            last[0] = time.perf_counter()
            print(f"  H={horizon} {name}: {done}/{total} origins", flush=True)

    return report


def bench_online(protocol: ProtocolSettings = ProtocolSettings(), forecaster: ForecasterSettings = ForecasterSettings(),
                 encoder: EncoderSettings = EncoderSettings(), json: str | None = None, plot: str | None = None,
                 threads: int | None = 1, quiet: bool = False) -> dict:
    """Online forecasting on the literature's delayed-feedback protocol (20 : 5 : 75 split, updates only from fully
    observed horizons, cumulative MSE and MAE on scaled data): seasonal naive, the GDN-2 forecaster frozen and with
    online gradient descent, the streaming encoder in the online runner frozen and learning online.

    Args:
        protocol: the series, splits, horizons, methods and the learning rates tried on validation.
        forecaster: the offline window forecaster.
        encoder: the streaming encoder and its online learning window.
        json: path of the JSON record (rewritten after each method).
        plot: path of the plot (PNG): cumulative test MSE against time, one panel per horizon.
        threads: torch CPU threads (None: torch's choice).
        quiet: print nothing.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    record = run_online(protocol, forecaster, encoder, json, quiet, command="gdn2ts bench online " +
                        " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "online"] else sys.argv[1:]))
    if plot is not None:
        from gdn2ts.apps.online_report import plot_records

        plot_records([record], plot)
    if not quiet:
        from gdn2ts.apps.online_report import print_table

        print_table([record])
    return record


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(bench_online, as_positional=False)
