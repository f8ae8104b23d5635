"""Baselines run in the same harness as the GDN-2 forecaster (same splits, scaler, windows and metrics).

* :class:`DLinear` (Zeng et al., 2023): a moving-average split of the lookback into trend and remainder, one
  linear map over time for each, shared by the channels (the published ETTh1 setting).
* :class:`GRUForecaster`: a GRU over the lookback (values and observation masks per step), its last hidden state
  mapped to every horizon step at once.

Both take the forecaster's call signature ``(values, timestamps, known, static, past)`` (covariates unused) and
return ``{"point": [B, H, C]}``; missing values (NaN) are read as the training mean (zero after scaling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DLinearConfig", "DLinear", "GRUConfig", "GRUForecaster"]


@dataclass(frozen=True)
class DLinearConfig:
    """Shape of a :class:`DLinear`."""

    n_channels: int
    """Channels in and out."""
    lookback: int
    """Steps L read."""
    horizon: int
    """Steps H forecast."""
    kernel: int = 25
    """Moving-average window of the trend (odd)."""

    def __post_init__(self):
        for name in ("n_channels", "lookback", "horizon", "kernel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DLinearConfig: '{name}' expected a positive int, got {value!r}")
        if self.kernel % 2 == 0:
            raise ValueError(f"DLinearConfig: 'kernel' expected an odd window, got {self.kernel}")


class DLinear(nn.Module):
    """Trend and remainder, each through a linear map from the lookback to the horizon.

    Example:
        >>> m = DLinear(DLinearConfig(n_channels=7, lookback=96, horizon=24))
        >>> m(torch.randn(4, 96, 7))["point"].shape
        torch.Size([4, 24, 7])
    """

    def __init__(self, config: DLinearConfig):
        super().__init__()
        self.config = cfg = config
        self.seasonal = nn.Linear(cfg.lookback, cfg.horizon)
        self.trend = nn.Linear(cfg.lookback, cfg.horizon)
        # the published initialization: each output starts as the lookback's mean
        for lin in (self.seasonal, self.trend):
            nn.init.constant_(lin.weight, 1.0 / cfg.lookback)

    def forward(self, values, timestamps=None, known=None, static=None, past=None) -> dict:
        x = torch.nan_to_num(values).transpose(1, 2)  # [B, C, L]
        pad = (self.config.kernel - 1) // 2
        # edges repeat the first and last value so the average keeps the lookback's length
        padded = torch.cat([x[..., :1].expand(-1, -1, pad), x, x[..., -1:].expand(-1, -1, pad)], dim=-1)
        trend = F.avg_pool1d(padded, self.config.kernel, stride=1)
        out = self.seasonal(x - trend) + self.trend(trend)
        return {"point": out.transpose(1, 2)}


@dataclass(frozen=True)
class GRUConfig:
    """Shape of a :class:`GRUForecaster`."""

    n_channels: int
    """Channels in and out."""
    lookback: int
    """Steps L read."""
    horizon: int
    """Steps H forecast."""
    hidden_size: int = 64
    """GRU width."""
    n_layers: int = 1
    """Stacked GRU layers."""

    def __post_init__(self):
        for name in ("n_channels", "lookback", "horizon", "hidden_size", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GRUConfig: '{name}' expected a positive int, got {value!r}")


class GRUForecaster(nn.Module):
    """A GRU over the lookback, direct multi-horizon head on its last state.

    Example:
        >>> m = GRUForecaster(GRUConfig(n_channels=3, lookback=10, horizon=5, hidden_size=8))
        >>> x = torch.randn(2, 10, 3); x[0, 3, 1] = float("nan")
        >>> m(x)["point"].shape
        torch.Size([2, 5, 3])
    """

    def __init__(self, config: GRUConfig):
        super().__init__()
        self.config = cfg = config
        self.gru = nn.GRU(2 * cfg.n_channels, cfg.hidden_size, num_layers=cfg.n_layers, batch_first=True)
        self.head = nn.Linear(cfg.hidden_size, cfg.horizon * cfg.n_channels)

    def forward(self, values, timestamps=None, known=None, static=None, past=None) -> dict:
        present = (~torch.isnan(values)).to(values.dtype)
        _, h = self.gru(torch.cat([torch.nan_to_num(values), present], dim=-1))
        out = self.head(h[-1]).view(values.shape[0], self.config.horizon, self.config.n_channels)
        return {"point": out}
