"""The forecasting commands: ``gdn2ts forecast fit | predict | backtest`` (``gdn2ts fit`` and ``gdn2ts predict``
are the first two) and ``gdn2ts bench forecast``."""

from __future__ import annotations

import json as jsonlib
from dataclasses import replace
from pathlib import Path

import torch

from gdn2ts.forecasting.data import ETTH1_BORDERS, DataConfig, DataError
from gdn2ts.forecasting.lightning import ModelConfig, TrainConfig

__all__ = ["fit", "predict", "backtest", "bench_forecast", "FORECAST_COMMANDS"]

_MODEL = ModelConfig()
_TRAIN = TrainConfig()


def fit(data: DataConfig, model: ModelConfig = _MODEL, train: TrainConfig = _TRAIN, out: str = "runs/forecast",
        threads: int | None = 1, plot: bool = True, quiet: bool = False) -> dict:
    """Fit a forecaster with Lightning from a recipe: ``gdn2ts fit tasks/forecasting/tiny.yaml``.

    Writes the best checkpoint, the validation and test metrics and a forecast plot to ``out``.

    Args:
        data: the data and its windows.
        model: the model (gdn2, dlinear, gru).
        train: the fit.
        out: output folder (best.ckpt, metrics.json, forecast.png).
        threads: torch CPU threads (None: torch's choice).
        plot: draw the last test window.
        quiet: print nothing.
    """
    from gdn2ts.forecasting.fit import fit as run_fit
    from gdn2ts.forecasting.lightning import ForecastDataModule, evaluate

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dm = ForecastDataModule(data)
        module, info = run_fit(model, dm, train, out=out, quiet=quiet)
        metrics = {split: evaluate(module.net, dm._eval(split), len(data.known), len(data.static), len(data.past))
                   for split in ("val", "test") if len(dm.datasets[split])}
    except (ValueError, OSError) as e:
        raise SystemExit(f"gdn2ts fit: {e}") from None
    record = {**info, "metrics": metrics, "model": model.kind}
    Path(out, "metrics.json").write_text(jsonlib.dumps(record, indent=1) + "\n")
    if plot and len(dm.datasets["test"]):
        from gdn2ts.forecasting.plot import plot_forecast

        plot_forecast(module, dm, Path(out, "forecast.png"), window=-1, split="test")
    if not quiet:
        text = ", ".join(f"{s} MSE {m['mse']:.4f} MAE {m['mae']:.4f} ({m['windows']} windows)"
                         for s, m in metrics.items())
        print(f"fit {model.kind}: {info['epochs']} epochs in {info['seconds']:.0f} s; {text}; checkpoint "
              f"{info['checkpoint']}")
    return record


def _write(frame, out: str, command: str) -> None:
    suffix = Path(out).suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise SystemExit(f"gdn2ts {command}: 'out' expected a .csv or .parquet path, got {out!r}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(out) if suffix == ".parquet" else frame.write_csv(out)


def predict(checkpoint: str, data: str | None = None, split: str = "latest", futr: str | None = None,
            out: str = "forecast.csv", plot: str | None = None, quiet: bool = False) -> None:
    """Forecast with a fitted checkpoint: a table with a column per quantile, timestamps in the data's type.

    ``latest`` gives one row per (series, step, channel) after each series' last row; ``test`` and ``val`` one
    row per (series, window, step, channel) with the actual values. Written as ``.csv`` or ``.parquet``.

    Args:
        checkpoint: a best.ckpt written by gdn2ts fit (read with weights_only=True).
        data: history file (default: the one the model was fit on), same layout and columns.
        split: latest (the horizon after each series' last rows), test or val (every window, with actuals).
        futr: for latest, a file (.csv, .parquet) with the known covariates of the next horizon steps of each
            series: id, time and the known columns (needed when the model has known covariates).
        out: output table (.csv or .parquet).
        plot: PNG of the first window (optional).
        quiet: print nothing.
    """
    from gdn2ts.forecasting.data import load_table
    from gdn2ts.forecasting.fit import load_module, predict_frame
    from gdn2ts.forecasting.lightning import ForecastDataModule

    try:
        module = load_module(checkpoint)
        cfg = module.data_config if data is None else replace(module.data_config, path=data)
        if cfg.path is None:
            raise DataError("the checkpoint names no data file (it was fit on a frame); expected --data")
        future = load_table(futr) if futr else None
        dm = ForecastDataModule(cfg)
        frame = predict_frame(module, dm, split, future=future)
        if split == "latest":
            frame = frame.drop("start")
        if plot:
            from gdn2ts.forecasting.plot import plot_forecast

            plot_forecast(module, dm, plot, window=0, split=split, future=future)
    except (ValueError, OSError) as e:
        raise SystemExit(f"gdn2ts predict: {e}") from None
    _write(frame, out, "predict")
    if not quiet:
        print(f"predict: {frame.height} rows ({split}) to {out}")


def backtest(data: DataConfig, model: ModelConfig = _MODEL, train: TrainConfig = _TRAIN, n_windows: int = 1,
             step_size: int | None = None, refit: bool | int = False, out: str = "runs/forecast",
             threads: int | None = 1, quiet: bool = False) -> dict:
    """Rolling-origin backtest from a recipe: ``gdn2ts forecast backtest tasks/forecasting/tiny.yaml``.

    Forecasts every series from ``n_windows`` cutoffs ``step_size`` steps apart (the last window ends at each
    series' end), fitting once (``refit false``), at every cutoff (``true``) or at every k-th (``k``); writes
    ``backtest.parquet`` (series, cutoff, step, time, channel, actual, point, quantiles) to ``out`` and prints the
    MAE and the coverage of the outer quantile interval.

    Args:
        data: the data (layout long) and its windows.
        model: the model.
        train: each fit.
        n_windows: cutoffs per series.
        step_size: grid steps between cutoffs (default: the horizon).
        refit: false, true or k.
        out: output folder.
        threads: torch CPU threads (None: torch's choice).
        quiet: print nothing.
    """
    from gdn2ts.forecasting.data import load_table
    from gdn2ts.forecasting.fit import FitConfig
    from gdn2ts.forecasting.rolling import backtest as run_backtest

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if data.path is None:
            raise DataError("expected --data.path (the data file)")
        frame = run_backtest(load_table(data.path), FitConfig(data=data, model=model, train=train), n_windows,
                             step_size, refit, quiet=quiet)
    except (ValueError, OSError) as e:
        raise SystemExit(f"gdn2ts forecast backtest: {e}") from None
    path = Path(out, "backtest.parquet")
    _write(frame, str(path), "forecast backtest")
    scored = frame.drop_nulls("actual")
    summary = {"rows": frame.height, "scored": scored.height, "table": str(path),
               "mae": float((scored["actual"] - scored["point"]).abs().mean()) if scored.height else None}
    qcols = sorted((c for c in frame.columns if c.startswith("q")), key=lambda c: float(c[1:]))
    if len(qcols) >= 2 and scored.height:
        inside = (scored["actual"] >= scored[qcols[0]]) & (scored["actual"] <= scored[qcols[-1]])
        summary["coverage"] = {f"{qcols[0][1:]}-{qcols[-1][1:]}": float(inside.mean())}
    if not quiet:
        cover = "".join(f", {k} interval covers {v:.1%}" for k, v in summary.get("coverage", {}).items())
        mae = "n/a" if summary["mae"] is None else f"{summary['mae']:.4g}"
        print(f"backtest: {n_windows} windows, {frame.height} rows ({scored.height} with actuals), MAE {mae}"
              f"{cover}; table {path}")
    return summary


def bench_forecast(data: str = "../shared/data/ett/ETTh1.csv", lookback: tuple[int, ...] = (96,),
                   horizons: tuple[int, ...] = (96, 192, 336, 720),
                   models: tuple[str, ...] = ("gdn2", "dlinear", "gru"),
                   epochs: int = 10, patience: int = 3, max_minutes: float | None = None,
                   limit_train_batches: int | None = None, device: str = "auto", threads: int | None = 1,
                   json: str | None = "docs/results/forecast_etth1.json", progress: bool = False,
                   quiet: bool = False, ensemble: int = 1,
                   borders: tuple[int, int, int] = ETTH1_BORDERS) -> dict:
    """Long-horizon benchmark on an ETT-layout file: GDN-2 forecaster, DLinear and a GRU under the standard protocol.

    One harness for all models (same splits, scaler, windows and metric); MSE/MAE per horizon and averaged,
    labelled with the file's name; beside the published averages when the file is ETTh1 (by checksum or name).

    Args:
        data: path of an ETT-layout CSV (ETTh1.csv by default).
        lookback: lookbacks L (96 is the unified protocol; add a longer one for the tuned figure).
        horizons: horizons H.
        models: gdn2, gdn2_ci (channel-independent patched form), gdn2_skip_only (ablation: recurrent path
            off), dlinear, gru.
        epochs: epochs at most per fit (early stopping on validation MSE).
        patience: early-stopping patience in epochs.
        max_minutes: stop each fit after this many minutes.
        limit_train_batches: training batches per epoch at most (None: all).
        device: auto (a GPU when present), cpu or gpu (an error naming the problem where there is none).
        threads: torch CPU threads (None: torch's choice).
        json: path of the JSON record (rewritten after each fit).
        progress: show the progress bar of each fit.
        quiet: print nothing.
        ensemble: fits per model and horizon (seeds 0, 1, ...) whose forecasts are averaged.
        borders: end rows of train, val and test (train [0, b0), val [b0 - L, b1), test [b1 - L, b2)); the
            protocol's by default, e.g. [11520, 14400, 17280] to test on ETTh1 rows the protocol leaves unused.
    """
    from gdn2ts.forecasting.bench import run_bench

    if not Path(data).is_file():
        raise SystemExit(f"gdn2ts bench forecast: no file at {data!r} (ETTh1.csv; see datasets/ETTh1.md)")
    try:
        train = TrainConfig(max_epochs=epochs, patience=patience, max_minutes=max_minutes,
                            limit_train_batches=limit_train_batches, accelerator=device)
        return run_bench(data, lookbacks=tuple(lookback), horizons=tuple(horizons), models=tuple(models), train=train,
                         threads=threads, json_path=json, quiet=quiet, progress=progress, borders=borders,
                         model_overrides={m: {"ensemble": ensemble} for m in models} if ensemble != 1 else None)
    except (ValueError, DataError) as e:
        raise SystemExit(f"gdn2ts bench forecast: {e}") from None


# ``gdn2ts forecast <command>``
FORECAST_COMMANDS = {"_help": "fit a forecaster on a long-format file, forecast with future covariates, backtest",
                     "fit": fit, "predict": predict, "backtest": backtest}
