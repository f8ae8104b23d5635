"""Fit with a Lightning ``Trainer`` (early stopping on validation MSE, best weights kept), reload a checkpoint
without unpickling, and predict a data module's windows to a polars DataFrame with quantile columns. The
practitioners' path (a frame in, forecasts with the frame's timestamps out, backtests) is
``gdn2ts/forecasting/frames.py`` and ``rolling.py``."""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from gdn2ts.forecasting.data import DataConfig, DataError
from gdn2ts.forecasting.lightning import ForecastDataModule, ForecastModule, ModelConfig, TrainConfig

__all__ = ["FitConfig", "fit", "load_module", "predict_frame", "check_accelerator"]


@dataclass(frozen=True)
class FitConfig:
    """A recipe: data, model, training and where the checkpoint goes (``tasks/forecasting/*.yaml``)."""

    data: DataConfig
    """The data and its windows."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The fit."""
    out: str = "runs/forecast"
    """Folder of the checkpoint (best.ckpt) and the test metrics (metrics.json)."""


def check_accelerator(accelerator: str) -> None:
    """A GPU accelerator asked for where torch sees none is an error that says so (not a trace from inside
    Lightning)."""
    name = str(accelerator).lower()
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"accelerator {accelerator!r}: torch {torch.__version__} sees no CUDA GPU on this machine "
                         f"(torch.cuda.is_available() is False); expected 'cpu', or 'auto' to use a GPU when present")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"accelerator 'mps': torch {torch.__version__} sees no Apple GPU here; expected 'cpu' or "
                         f"'auto'")


@contextmanager
def _lightning_quiet(quiet: bool):
    # Lightning's start-up notes (devices, tips) are INFO records of this logger: hidden while quiet
    log = logging.getLogger("lightning.pytorch")
    before = log.level
    if quiet:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(before)


def fit(model: ModelConfig, dm: ForecastDataModule, train: TrainConfig, out: str | Path | None = None,
        quiet: bool = False) -> tuple[ForecastModule, dict]:
    """Fit ``model`` on ``dm``; return the module holding the best validation weights and a summary
    (``epochs``, ``best_val_mse``, ``seconds``, ``checkpoint``). ``quiet``: no progress bar, no Lightning
    notes."""
    check_accelerator(train.accelerator)
    L.seed_everything(train.seed, verbose=False)
    dm.setup()
    if len(dm.datasets["val"]) == 0:
        raise DataError(f"fit: the validation split has no window of lookback {dm.config.lookback} + horizon "
                        f"{dm.config.horizon}")
    module = ForecastModule.create(model, dm, train)
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="gdn2ts-fit-"))
    ckpt = ModelCheckpoint(dirpath=out, filename="best", monitor="val_mse", mode="min", save_top_k=1,
                           enable_version_counter=False)
    stop = EarlyStopping("val_mse", patience=train.patience, mode="min")
    with _lightning_quiet(quiet):
        trainer = L.Trainer(max_epochs=train.max_epochs, accelerator=train.accelerator, devices=1,
                            callbacks=[ckpt, stop], logger=False, enable_progress_bar=not quiet,
                            enable_model_summary=False, num_sanity_val_steps=0,
                            max_time=None if train.max_minutes is None else {"minutes": train.max_minutes},
                            limit_train_batches=train.limit_train_batches or 1.0, default_root_dir=str(out))
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        seconds = time.perf_counter() - start
    best = torch.load(ckpt.best_model_path, map_location=module.device, weights_only=True)
    module.load_state_dict(best["state_dict"])
    return module, {"epochs": trainer.current_epoch, "best_val_mse": float(ckpt.best_model_score),
                    "seconds": seconds, "checkpoint": ckpt.best_model_path}


def load_module(path: str | Path, map_location: str = "cpu") -> ForecastModule:
    """A :class:`ForecastModule` from a checkpoint, read with ``torch.load(weights_only=True)`` (nothing
    unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"load_module: no checkpoint at {str(path)!r}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise DataError(f"load_module: {str(path)!r} is not a gdn2ts forecasting checkpoint (expected "
                        f"hyper_parameters and state_dict)")
    module = ForecastModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


@torch.no_grad()
def predict_frame(module: ForecastModule, dm: ForecastDataModule, split: str = "test",
                  windows: list[int] | None = None, future: pl.DataFrame | None = None) -> pl.DataFrame:
    """Forecasts in the data's units, one row per (series, window, step, channel).

    Args:
        module: a fitted module.
        dm: its data module (set up on the same data).
        split: ``val``, ``test`` (every scored window, with the actual values) or ``latest`` (the next horizon
            after each series' last row; :func:`gdn2ts.forecasting.frames.forecast` on the data module's frame).
        windows: indices of the split's windows to keep (all when None).
        future: for ``latest``, the known covariates of the next ``horizon`` steps (needed when the model has
            known covariates; see :func:`~gdn2ts.forecasting.frames.forecast`).

    Columns: ``series``, ``start`` (grid row of the window's first lookback step), ``step`` (1..H), ``time`` (in
    the data's timestamp type), ``channel``, ``actual`` (null where unknown), ``point``, and ``q<level>`` per
    quantile (gdn2).
    """
    from gdn2ts.forecasting.frames import forecast_origins, future_series

    dm.setup()
    L = dm.config.lookback
    if split == "latest":
        series, origins = future_series(module, dm.frame, future)
    elif split in ("val", "test"):
        series = dm.datasets[split].series
        origins = [(i, t + L - 1) for i, t in dm.datasets[split].index]
    else:
        raise DataError(f"predict_frame: 'split' expected val, test or latest, got {split!r}")
    if windows is not None:
        origins = [origins[w] for w in windows]
    frame = forecast_origins(module, series, origins)
    starts = np.asarray([series[i].row0 + o - L + 1 for i, o in origins], np.int64)
    per_window = module.data_config.horizon * len(module.data_config.targets)
    frame = frame.with_columns(start=pl.Series(np.repeat(starts, per_window)))
    return frame.select("series", "start", *[c for c in frame.columns if c not in ("series", "start", "cutoff")])
