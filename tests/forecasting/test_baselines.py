"""DLinear and the GRU baseline: shapes, the decomposition, missing values, named config errors."""

from __future__ import annotations

import pytest
import torch

from gdn2ts.forecasting.baselines import DLinear, DLinearConfig, GRUConfig, GRUForecaster


def test_dlinear_shapes_and_decomposition():
    m = DLinear(DLinearConfig(n_channels=7, lookback=96, horizon=720))
    assert m(torch.randn(3, 96, 7))["point"].shape == (3, 720, 7)
    # a constant lookback is all trend: with the published initialization (weights 1/L) both maps average it
    small = DLinear(DLinearConfig(n_channels=2, lookback=10, horizon=4, kernel=5))
    torch.nn.init.zeros_(small.seasonal.bias)
    torch.nn.init.zeros_(small.trend.bias)
    out = small(torch.full((1, 10, 2), 3.0))["point"]
    assert torch.allclose(out, torch.full((1, 4, 2), 3.0), atol=1e-5)


def test_gru_shapes_and_missing_values():
    m = GRUForecaster(GRUConfig(n_channels=7, lookback=96, horizon=192, hidden_size=16, n_layers=2))
    x = torch.randn(2, 96, 7)
    x[0, :10] = float("nan")
    out = m(x)["point"]
    assert out.shape == (2, 192, 7) and torch.isfinite(out).all()


def test_bad_baseline_configs_are_named():
    with pytest.raises(ValueError, match="'kernel' expected an odd window"):
        DLinearConfig(n_channels=1, lookback=10, horizon=2, kernel=4)
    with pytest.raises(ValueError, match="'hidden_size' expected a positive int"):
        GRUConfig(n_channels=1, lookback=10, horizon=2, hidden_size=0)
