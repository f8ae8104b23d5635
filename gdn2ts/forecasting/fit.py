"""Fit with a Lightning ``Trainer`` (early stopping on validation MSE, best weights kept), reload a checkpoint
without unpickling, and predict to a polars DataFrame with quantile columns."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from gdn2ts.forecasting.data import DataConfig, DataError, Series, WindowDataset
from gdn2ts.forecasting.lightning import ForecastDataModule, ForecastModule, ModelConfig, TrainConfig, _inputs

__all__ = ["FitConfig", "fit", "load_module", "predict_frame"]


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


def fit(model: ModelConfig, dm: ForecastDataModule, train: TrainConfig, out: str | Path | None = None,
        quiet: bool = False) -> tuple[ForecastModule, dict]:
    """Fit ``model`` on ``dm``; return the module holding the best validation weights and a summary
    (``epochs``, ``best_val_mse``, ``seconds``, ``checkpoint``)."""
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


def _latest_windows(splits: dict[str, list[Series]], lookback: int, horizon: int) -> list[Series]:
    # the last lookback rows of each series, with horizon placeholder rows after them (regular steps forward)
    out = []
    for s in splits["test"]:
        if len(s.times) < lookback:
            continue
        step = float(np.median(np.diff(s.times))) if len(s.times) > 1 else 1.0
        times = np.concatenate([s.times[-lookback:], s.times[-1] + step * np.arange(1, horizon + 1)])
        values = np.concatenate([s.values[-lookback:], np.full((horizon, s.values.shape[1]), np.nan, np.float32)])
        known = np.concatenate([s.known[-lookback:], np.repeat(s.known[-1:], horizon, axis=0)])
        out.append(Series(s.id, values, times, known, s.static, s.row0 + len(s.times) - lookback))
    return out


@torch.no_grad()
def predict_frame(module: ForecastModule, dm: ForecastDataModule, split: str = "test",
                  windows: list[int] | None = None) -> pl.DataFrame:
    """Forecasts in the data's units, one row per (series, window, step, channel).

    Args:
        module: a fitted module.
        dm: its data module (set up on the same data).
        split: ``val``, ``test`` (every window, with the actual values) or ``latest`` (the next horizon after
            each series' last rows; needs no known covariates).
        windows: indices of the split's windows to keep (all when None).

    Columns: ``series``, ``start`` (row of the window's first lookback step), ``step`` (1..H), ``time``,
    ``channel``, ``actual`` (null for latest), ``point``, and ``q<level>`` per quantile (gdn2).
    """
    dm.setup()
    cfg = dm.config
    if split == "latest":
        if cfg.known:
            raise DataError("predict_frame: split 'latest' needs the future known covariates; use val or test")
        series = _latest_windows(dm.splits, cfg.lookback, cfg.horizon)
        ds = WindowDataset(series, cfg.lookback, cfg.horizon)
    elif split in ("val", "test"):
        ds = dm.datasets[split]
        series = ds.series
    else:
        raise DataError(f"predict_frame: 'split' expected val, test or latest, got {split!r}")
    idx = list(range(len(ds))) if windows is None else list(windows)
    module.eval()
    qs = module.model_config.quantiles if module.model_config.kind == "gdn2" else ()
    mean, std = np.asarray(module.scaler.mean), np.asarray(module.scaler.std)
    parts = []
    for lo in range(0, len(idx), cfg.eval_batch_size):
        items = [ds[i] for i in idx[lo:lo + cfg.eval_batch_size]]
        batch = {k: torch.stack([it[k] for it in items]) for k in ("values", "times", "target", "known", "static")}
        batch = {k: v.to(module.device) for k, v in batch.items()}
        out = module.net(*_inputs(batch, module.hparams.n_known, module.hparams.n_static))
        B, H, C = out["point"].shape
        cols = {"actual": batch["target"].cpu().numpy() * std + mean,
                "point": out["point"].cpu().numpy() * std + mean}
        for j, q in enumerate(qs):
            cols[f"q{q:g}"] = out["forecast"][..., j].cpu().numpy() * std + mean
        times = np.stack([series[it["series"]].times[it["start"] - series[it["series"]].row0 + cfg.lookback:][:H]
                          for it in items])
        parts.append(pl.DataFrame({
            "series": np.repeat([series[it["series"]].id for it in items], H * C),
            "start": np.repeat([it["start"] for it in items], H * C),
            "step": np.tile(np.repeat(np.arange(1, H + 1), C), B),
            "time": np.repeat(times.reshape(-1), C),
            "channel": np.tile(np.asarray(cfg.targets), B * H),
            **{k: v.reshape(-1).astype(np.float64) for k, v in cols.items()},
        }))
    frame = pl.concat(parts) if parts else pl.DataFrame()
    if split == "latest" and len(frame):
        frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias("actual"))
    return frame
