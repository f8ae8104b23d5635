"""The GDN-2 forecaster: missing values, irregular timestamps, covariates, the encoder's state API and the online
runner, named errors."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from gdn2ts.models.forecaster import ForecasterConfig, GDN2Forecaster, forecast_loss
from gdn2ts.streaming import MemoryStore, OnlineRunner


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_channels=3, lookback=12, horizon=5, hidden_size=16, num_heads=2, head_dim=8)
    return GDN2Forecaster(ForecasterConfig(**{**cfg, **kw}))


@pytest.mark.parametrize("independent", [False, True])
def test_missing_values_and_irregular_times_give_finite_outputs_and_gradients(independent):
    model = _model(channel_independent=independent, n_known=2, n_static=1)
    values = torch.randn(4, 12, 3)
    values[0, 3] = float("nan")           # a step with nothing observed
    values[1, :, 2] = float("nan")        # a channel missing over the whole window
    values[2, ::2, 0] = float("nan")
    times = torch.cumsum(torch.rand(4, 12).double() * 3 + 0.1, dim=1)
    out = model(values, times, known=torch.randn(4, 17, 2), static=torch.randn(4, 1))
    assert out["forecast"].shape == (4, 5, 3, 3) and torch.isfinite(out["forecast"]).all()
    assert (out["forecast"].diff(dim=-1) >= 0).all()
    target = torch.randn(4, 5, 3)
    target[0, 1] = float("nan")
    loss = forecast_loss(out["forecast"], target, (0.1, 0.5, 0.9), quantile_weight=0.5)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_elapsed_time_reaches_the_recurrent_path_only():
    values = torch.randn(2, 12, 3)
    regular = torch.arange(12.0).double().expand(2, 12)
    irregular = regular.clone()
    irregular[:, 6:] += 5.0               # a five-step gap in the middle
    rec = _model()
    torch.nn.init.normal_(rec.head.weight)   # the recurrent head starts at zero: give it weights to read
    assert not torch.allclose(rec(values, regular)["point"], rec(values, irregular)["point"], atol=1e-5)
    skip_only = _model(recurrent=False)
    assert torch.equal(skip_only(values, regular)["point"], skip_only(values, irregular)["point"])


def test_instance_normalization_ignores_missing_values():
    model = _model(recurrent=True)
    values = torch.randn(1, 12, 3)
    values[0, 4, 1] = float("nan")
    out = model(values)
    observed = values[0, :, 1][~torch.isnan(values[0, :, 1])]
    assert torch.allclose(out["loc"][0, 0, 1], observed.mean())
    # the forecast is equivariant to shifting and scaling the window (RevIN), missing values included
    shifted = model(values * 3 + 7)["point"]
    assert torch.allclose(shifted, out["point"] * 3 + 7, atol=1e-3)


def test_recurrent_ablation_has_no_encoder_effect():
    model = _model(recurrent=False)
    out = model(torch.randn(2, 12, 3))
    assert out["next_step"] is None
    loss = out["point"].sum()
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())


def test_state_api_steps_agree_with_the_window():
    model = _model().eval()
    x = torch.randn(2, 12, 3)
    x[1, 2] = float("nan")
    t = torch.cumsum(torch.rand(2, 12).double() + 0.5, dim=1)
    with torch.no_grad():
        window = model.encoder(x, t)
        state = model.init_state(2)
        for i in range(12):
            out = model.step(x[:, i], t[:, i], state=state)
            state = out["state"]
    assert torch.allclose(state.last_output, window["state"].last_output, atol=1e-4)
    assert torch.allclose(out["forecast"], window["forecast"][:, -1], atol=1e-4)


def test_fitted_encoder_runs_in_the_online_runner():
    model = _model(revin=False).eval()
    x = torch.randn(1, 12, 3)
    x[0, 5, 1] = float("nan")
    t = torch.arange(12.0).double()[None] * 2
    runner = OnlineRunner(model.encoder, MemoryStore(), channels=["a", "b", "c"])
    rows = {"stream": ["s"] * 12, "time": t[0].tolist()}
    for j, name in enumerate("abc"):
        rows[name] = [None if v != v else v for v in x[0, :, j].tolist()]
    assert runner.observe(pl.DataFrame(rows)).accepted == 12
    got = runner.forecast(["s"])
    with torch.no_grad():
        want = model.encoder(x, t)["forecast"][0, -1]  # [1, C, Q]: the encoder's one-step quantiles
    # the quantile columns, then the per-stream error column (null: the stream's record was read)
    assert got.height == 3 and got.columns[-4:] == ["q0.1", "q0.5", "q0.9", "error"]
    assert got["error"].null_count() == 3
    assert torch.allclose(torch.tensor(got.select(["q0.1", "q0.5", "q0.9"]).to_numpy()).float(), want[0], atol=1e-4)


@pytest.mark.parametrize("change, message", [
    (dict(values=torch.randn(2, 11, 3)), "'values' expected"),
    (dict(values=torch.full((2, 12, 3), float("inf"))), "got inf"),
    (dict(timestamps=torch.zeros(2, 5).double()), "'timestamps' expected"),
    (dict(known=torch.randn(2, 17, 1)), "'known' expected None"),
])
def test_bad_input_is_named(change, message):
    model = _model()
    args = {"values": torch.randn(2, 12, 3), "timestamps": None, "known": None, **change}
    with pytest.raises(ValueError, match=message):
        model(**args)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="including 0.5"):
        ForecasterConfig(n_channels=1, lookback=4, horizon=2, quantiles=(0.1, 0.9))
    with pytest.raises(ValueError, match="at least one of 'recurrent' and 'linear_skip'"):
        ForecasterConfig(n_channels=1, lookback=4, horizon=2, recurrent=False, linear_skip=False)
    with pytest.raises(ValueError, match="'lookback' expected a positive int"):
        ForecasterConfig(n_channels=1, lookback=0, horizon=2)
