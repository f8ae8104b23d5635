"""Lightning pieces: the data module over polars data (long format or the ETT CSV layout) and the module that fits
the GDN-2 forecaster or a baseline.

The data module puts each series on its grid, splits it chronologically, fits the codec (target transform and
scaler, covariate scalers, category vocabularies) on training rows only, and keeps every validation and test
window with an observed value in its lookback and its horizon (no ``drop_last``). The module's hyperparameters are
plain dicts, so its checkpoints load with ``torch.load(weights_only=True)``. Metrics (MSE and MAE on scaled
values) are sums over every window, step and channel divided by their count, as the benchmark protocol defines
them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import lightning as L
import polars as pl
import torch
from torch.utils.data import DataLoader

from gdn2ts.forecasting.baselines import DLinear, DLinearConfig, GRUConfig, GRUForecaster
from gdn2ts.forecasting.codec import Codec, check_columns, resolve_freq, series_frames
from gdn2ts.forecasting.data import (
    DataConfig,
    DataError,
    Scaler,
    Series,
    WindowDataset,
    load_ett,
    load_table,
    split_bounds,
)
from gdn2ts.models.forecaster import ForecasterConfig, GDN2Forecaster, forecast_loss
from gdn2ts.models.schedule import WarmupCosine

__all__ = ["ModelConfig", "TrainConfig", "ForecastDataModule", "ForecastModule", "evaluate"]

MODELS = ("gdn2", "dlinear", "gru")


@dataclass(frozen=True)
class ModelConfig:
    """Which model and its size (fields not used by a kind are ignored)."""

    kind: str = "gdn2"
    """gdn2 (the GDN-2 forecaster), dlinear or gru."""
    hidden_size: int = 32
    """gdn2: encoder width; gru: GRU width."""
    n_layers: int = 1
    """gdn2: GDN-2 blocks; gru: GRU layers."""
    num_heads: int = 2
    """gdn2: heads per mixer."""
    head_dim: int = 16
    """gdn2: key and value size per head."""
    variant: str = "gdn2"
    """gdn2: mixer preset."""
    channel_independent: bool = False
    """gdn2: each channel its own sequence (True) or all channels in one token."""
    revin: bool = True
    """gdn2: per-window instance normalization."""
    linear_skip: bool = True
    """gdn2: linear lookback-to-horizon skip path."""
    recurrent: bool = True
    """gdn2: the GDN-2 encoder path (False: ablation)."""
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    """gdn2: quantile levels (with 0.5)."""
    patch_len: int = 1
    """gdn2: steps per encoder token (1: one per step; 16 with stride 8 is PatchTST's patching)."""
    patch_stride: int = 1
    """gdn2: steps between consecutive tokens."""
    head: str = "last"
    """gdn2: horizon head over the last token's encoder output (last) or every token's (flatten)."""
    dropout: float = 0.0
    """gdn2: dropout before the horizon head."""
    head_basis: str = "free"
    """gdn2: the horizon head writes every horizon step (free) or a lookback adjustment carried to the horizon by
    the skip path's linear map (skip)."""
    center: str = "none"
    """gdn2: constraint on the encoder's median correction over the horizon: none, mean (zero mean: the level is
    the skip path's) or trend (zero mean and slope)."""
    correction_reach: float | None = None
    """gdn2: steps over which the encoder's median correction fades by e (``exp(-h / reach)`` at step h); None:
    no fading."""
    kernel: int = 25
    """dlinear: moving-average window."""
    embedding_size: int = 4
    """gdn2: width of each categorical covariate's embedding."""

    def __post_init__(self):
        if self.kind not in MODELS:
            raise ValueError(f"ModelConfig: 'kind' expected one of {MODELS}, got {self.kind!r}")

    def build(self, n_channels: int, lookback: int, horizon: int, n_known: int = 0, n_static: int = 0,
              n_past: int = 0, categories: dict[str, tuple[int, ...]] | None = None):
        """The model for these data dimensions (``categories``: role -> category counts of its categorical
        columns, which come last among that role's columns)."""
        cats = categories or {}
        if self.kind == "dlinear":
            return DLinear(DLinearConfig(n_channels, lookback, horizon, kernel=self.kernel))
        if self.kind == "gru":
            return GRUForecaster(GRUConfig(n_channels, lookback, horizon, hidden_size=self.hidden_size,
                                           n_layers=self.n_layers))
        return GDN2Forecaster(ForecasterConfig(
            n_channels=n_channels, lookback=lookback, horizon=horizon, n_known=n_known, n_static=n_static,
            n_past=n_past, known_categories=tuple(cats.get("known", ())),
            past_categories=tuple(cats.get("past", ())), static_categories=tuple(cats.get("static", ())),
            embedding_size=self.embedding_size,
            quantiles=tuple(self.quantiles), hidden_size=self.hidden_size, n_layers=self.n_layers,
            num_heads=self.num_heads, head_dim=self.head_dim, variant=self.variant,
            channel_independent=self.channel_independent, revin=self.revin, linear_skip=self.linear_skip,
            recurrent=self.recurrent, patch_len=self.patch_len, patch_stride=self.patch_stride, head=self.head,
            dropout=self.dropout, head_basis=self.head_basis, center=self.center,
            correction_reach=self.correction_reach))


@dataclass(frozen=True)
class TrainConfig:
    """How a model is fit."""

    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    max_epochs: int = 10
    """Epochs at most."""
    patience: int = 3
    """Early stopping: epochs without a better validation MSE."""
    max_minutes: float | None = None
    """Stop fitting after this many minutes."""
    limit_train_batches: int | None = None
    """Training batches per epoch at most (a random subset each epoch; None: all)."""
    point_loss: str = "mse"
    """Point loss on the median: mse or mae."""
    quantile_weight: float = 0.1
    """Weight of the pinball loss over the quantile levels (gdn2)."""
    aux_weight: float = 0.1
    """Weight of the encoder's one-step loss over the lookback (gdn2; trains the head the online runner reads)."""
    recurrent_lr_scale: float = 1.0
    """gdn2: learning-rate multiplier of the encoder path (encoder and horizon head); the skip path and the
    covariate head keep ``lr``. Below 1 the encoder learns its correction while the linear path converges."""
    recurrent_weight_decay: float | None = None
    """gdn2: Adam's L2 weight decay on the encoder path (encoder and horizon head) in place of ``weight_decay``
    (None: ``weight_decay``): shrinks the encoder's correction toward the skip path's forecast."""
    lr_schedule: str = "constant"
    """constant, or cosine: a linear warmup over the first 5 % of ``max_epochs``' steps, then a cosine to 5 % of
    ``lr`` at the last (:class:`~gdn2ts.models.schedule.WarmupCosine`; early stopping may end the fit before)."""
    seed: int = 0
    """Seed of the weights and the sampler."""
    accelerator: str = "auto"
    """Lightning accelerator (auto: a GPU when present)."""

    def __post_init__(self):
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"TrainConfig: 'lr_schedule' expected 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.point_loss not in ("mse", "mae"):
            raise ValueError(f"TrainConfig: 'point_loss' expected 'mse' or 'mae', got {self.point_loss!r}")
        if not self.lr > 0 or not self.recurrent_lr_scale > 0 or self.max_epochs < 1 or self.patience < 1:
            raise ValueError(f"TrainConfig: expected lr > 0, max_epochs >= 1 and patience >= 1, got {self!r}")
        if not (self.weight_decay >= 0 and (self.recurrent_weight_decay or 0) >= 0):
            raise ValueError(f"TrainConfig: 'weight_decay' and 'recurrent_weight_decay' expected numbers >= 0, got "
                             f"{self.weight_decay!r} and {self.recurrent_weight_decay!r}")


def _to_dict(cfg) -> dict:
    # tuples become lists: checkpoints hold only plain containers (weights_only-safe)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _from_dict(cls, d: dict):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class ForecastDataModule(L.LightningDataModule):
    """Windows of a polars frame or file, split chronologically, scaled by training rows only.

    Args:
        config: where and how (:class:`DataConfig`).
        frame: the data itself (polars DataFrame); when omitted, read from ``config.path``.

    After :meth:`setup`: ``frame`` (the data), ``codec`` (:class:`~gdn2ts.forecasting.codec.Codec`, fit on the
    training rows), ``scaler`` (targets), ``known_scaler``, ``series`` (every series whole, encoded), ``splits``
    (name -> list of encoded :class:`Series`), ``datasets`` (name -> :class:`WindowDataset`).
    """

    def __init__(self, config: DataConfig, frame: pl.DataFrame | None = None):
        super().__init__()
        if not isinstance(config, DataConfig):
            raise DataError(f"ForecastDataModule: 'config' expected a DataConfig, got {type(config).__name__}")
        self.config, self.frame = config, frame
        self.scaler = self.known_scaler = self.codec = None
        self.series: list[Series] = []
        self.splits: dict[str, list[Series]] = {}
        self.datasets: dict[str, WindowDataset] = {}

    @property
    def n_channels(self) -> int:
        return len(self.config.targets)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        cfg = self.config
        frame = self.frame
        if frame is None:
            if cfg.path is None:
                raise DataError("ForecastDataModule: expected a frame or DataConfig.path, got neither")
            frame = load_ett(cfg.path) if cfg.layout == "ett" else load_table(cfg.path)
        check_columns(frame, cfg)
        freq = resolve_freq(frame, cfg)
        groups = series_frames(frame, cfg, freq)
        bounds = [split_bounds(g.height, cfg) for _, g in groups]
        train = pl.concat([g.slice(b["train"][0], b["train"][1] - b["train"][0]) for (_, g), b in
                           zip(groups, bounds, strict=True)])
        if train.height == 0:
            raise DataError("data: no training rows (each series' train share is empty)")
        self.frame, self.codec = frame, Codec.fit(train, cfg, freq)
        self.scaler, self.known_scaler = self.codec.target_scaler, self.codec.known_scaler
        self.series = [self.codec.series(sid, g, cfg) for sid, g in groups]
        for name in ("train", "val", "test"):
            self.splits[name] = [s.rows(*b[name]) for s, b in zip(self.series, bounds, strict=True)]
            self.datasets[name] = WindowDataset(self.splits[name], cfg.lookback, cfg.horizon)
        if len(self.datasets["train"]) == 0:
            raise DataError(f"data: no training window: each series needs more than lookback + horizon = "
                            f"{cfg.lookback + cfg.horizon} training steps, with observed values in both")

    def train_dataloader(self):
        return DataLoader(self.datasets["train"], batch_size=self.config.batch_size, shuffle=True, drop_last=False)

    def _eval(self, name):
        return DataLoader(self.datasets[name], batch_size=self.config.eval_batch_size, shuffle=False,
                          drop_last=False)

    def val_dataloader(self):
        return self._eval("val")

    def test_dataloader(self):
        return self._eval("test")

    def predict_dataloader(self):
        return self._eval("test")


def _inputs(batch, n_known, n_static, n_past=0):
    return (batch["values"], batch["times"].to(torch.float64), batch["known"] if n_known else None,
            batch["static"] if n_static else None, batch["past"] if n_past else None)


class ForecastModule(L.LightningModule):
    """Fits a forecaster (gdn2, dlinear or gru) on :class:`ForecastDataModule` windows.

    Args:
        model: :class:`ModelConfig` as a dict.
        data: the data module's :class:`DataConfig` as a dict (kept for prediction).
        train: :class:`TrainConfig` as a dict.
        scaler: ``{"mean": [...], "std": [...]}`` of the targets (kept to report unscaled forecasts).
        n_known, n_static, n_past: covariate counts.
        codec: the data module's :class:`~gdn2ts.forecasting.codec.Codec` as a dict (covariate scalers, category
            vocabularies, target transform, frequency); None for a checkpoint that predates it.

    Use :meth:`create` to build one from the configs and a set-up data module.
    """

    def __init__(self, model: dict, data: dict, train: dict, scaler: dict, n_known: int = 0, n_static: int = 0,
                 n_past: int = 0, codec: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.model_config = _from_dict(ModelConfig, model)
        self.data_config = _from_dict(DataConfig, data)
        self.train_config = _from_dict(TrainConfig, train)
        self.scaler = Scaler(tuple(scaler["mean"]), tuple(scaler["std"]))
        d = self.data_config
        self.codec = Codec.from_dict(codec) if codec else Codec(tuple(d.targets), tuple(d.known), (),
                                                                   tuple(d.static), {}, self.scaler)
        cats = {role: self.codec.cardinalities(role) for role in ("known", "past", "static")}
        self.net = self.model_config.build(len(d.targets), d.lookback, d.horizon, n_known, n_static, n_past, cats)
        self._sums: dict[str, list[float]] = {}

    @classmethod
    def create(cls, model: ModelConfig, dm: ForecastDataModule, train: TrainConfig) -> ForecastModule:
        dm.setup()
        return cls(_to_dict(model), _to_dict(dm.config), _to_dict(train),
                   {"mean": list(dm.scaler.mean), "std": list(dm.scaler.std)}, len(dm.config.known),
                   len(dm.config.static), len(dm.config.past), dm.codec.to_dict())

    def forward(self, batch) -> dict:
        return self.net(*_inputs(batch, self.hparams.n_known, self.hparams.n_static, self.hparams.n_past))

    def training_step(self, batch, batch_idx):
        t = self.train_config
        out = self(batch)
        if "forecast" in out:
            qs = self.model_config.quantiles
            loss = forecast_loss(out["forecast"], batch["target"], qs, t.quantile_weight, t.point_loss)
            if t.aux_weight and out.get("next_step") is not None:
                x = out["next_target"]
                loss = loss + t.aux_weight * forecast_loss(out["next_step"][:, :-1], x[:, 1:], qs,
                                                           t.quantile_weight, t.point_loss)
        else:
            loss = forecast_loss(out["point"][..., None], batch["target"], (0.5,), 0.0, t.point_loss)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["values"].shape[0])
        return loss

    def _accumulate(self, name, batch):
        point = self(batch)["point"]
        err = point - batch["target"]
        ok = ~torch.isnan(err)
        s = self._sums.setdefault(name, [0.0, 0.0, 0])
        s[0] += float(torch.where(ok, err.square(), 0).sum())
        s[1] += float(torch.where(ok, err.abs(), 0).sum())
        s[2] += int(ok.sum())

    def _finish(self, name):
        sse, sae, n = self._sums.pop(name, [0.0, 0.0, 0])
        if n:
            self.log(f"{name}_mse", sse / n, prog_bar=True)
            self.log(f"{name}_mae", sae / n)

    def validation_step(self, batch, batch_idx):
        self._accumulate("val", batch)

    def on_validation_epoch_end(self):
        self._finish("val")

    def test_step(self, batch, batch_idx):
        self._accumulate("test", batch)

    def on_test_epoch_end(self):
        self._finish("test")

    def predict_step(self, batch, batch_idx):
        out = self(batch)
        return {"point": out["point"], "forecast": out.get("forecast"), "series": batch["series"],
                "start": batch["start"]}

    def configure_optimizers(self):
        t = self.train_config
        params = list(self.parameters())
        slow_decay = t.weight_decay if t.recurrent_weight_decay is None else t.recurrent_weight_decay
        if self.model_config.kind == "gdn2" and (t.recurrent_lr_scale != 1.0 or slow_decay != t.weight_decay):
            slow = {id(p) for m in (self.net.encoder, self.net.head) for p in m.parameters()}
            groups = [{"params": [p for p in params if id(p) in slow], "lr": t.lr * t.recurrent_lr_scale,
                       "weight_decay": slow_decay},
                      {"params": [p for p in params if id(p) not in slow]}]
            optimizer = torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
        if t.lr_schedule == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        factor = WarmupCosine(max(1, total // 20), total, 0.05)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}}


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader: DataLoader, n_known: int = 0, n_static: int = 0, n_past: int = 0
             ) -> dict:
    """MSE and MAE of the point forecast over every window, step and channel of ``loader`` (scaled values).

    Returns ``{"mse", "mae", "windows", "values"}``.
    """
    was = net.training
    net.eval()
    device = next(net.parameters()).device
    sse = sae = 0.0
    n = windows = 0
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        point = net(*_inputs(batch, n_known, n_static, n_past))["point"]
        err = (point - batch["target"]).double()
        ok = ~torch.isnan(err)
        sse += float(torch.where(ok, err.square(), 0).sum())
        sae += float(torch.where(ok, err.abs(), 0).sum())
        n += int(ok.sum())
        windows += point.shape[0]
    net.train(was)
    if n == 0:
        raise DataError("evaluate: no observed target value in the loader")
    return {"mse": sse / n, "mae": sae / n, "windows": windows, "values": n}
