"""How the encoder's correction reaches the horizon: the skip-basis head (a lookback adjustment carried by the skip
map), the centered correction (level, or level and slope, left to the skip path), the fading correction, the
encoder path's own weight decay, and the named errors of bad values."""

from __future__ import annotations

import pytest
import torch

from gdn2ts.forecasting.data import DataConfig
from gdn2ts.forecasting.fit import fit, load_module
from gdn2ts.forecasting.lightning import ForecastDataModule, ForecastModule, ModelConfig, TrainConfig, evaluate
from gdn2ts.models.forecaster import ForecasterConfig, GDN2Forecaster

from forecast_frames import ett_frame

SMALL = dict(n_channels=3, lookback=12, hidden_size=16, num_heads=2, head_dim=8, channel_independent=True,
             patch_len=4, patch_stride=2)


def _pair(seed=0, **kw):
    """The model with a random head and the same model with its head at zero (the skip path's forecast)."""
    torch.manual_seed(seed)
    model = GDN2Forecaster(ForecasterConfig(**{**SMALL, **kw})).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    torch.nn.init.normal_(model.head.bias, std=0.1)
    plain = GDN2Forecaster(model.config).eval()
    plain.load_state_dict(model.state_dict())
    torch.nn.init.zeros_(plain.head.weight)
    torch.nn.init.zeros_(plain.head.bias)
    return model, plain


@pytest.mark.parametrize("independent", [True, False])
def test_skip_basis_head_is_sized_by_the_lookback_and_its_correction_lies_in_the_skip_span(independent):
    model, plain = _pair(horizon=30, head_basis="skip", channel_independent=independent)
    free, free_plain = _pair(horizon=30, channel_independent=independent)
    c_out = 1 if independent else 3
    assert model.head.out_features == 12 * c_out * 3 and free.head.out_features == 30 * c_out * 3
    x = torch.randn(4, 12, 3)
    out, base = model(x), plain(x)
    correction = (out["point"] - base["point"]) / out["scale"]  # [B, H, C] in normalized units
    # H = 30 > L = 12: a correction made by the skip map has no part outside the span of its 12 columns
    w = model.skip.weight.detach()
    residual = correction - torch.einsum("hl,blc->bhc", w, torch.linalg.lstsq(w, correction.transpose(0, 1)
                                                                              .reshape(30, -1)).solution
                                          .reshape(12, 4, 3).transpose(0, 1))
    assert correction.abs().max() > 1e-2 and residual.abs().max() < 1e-4
    # the free head's correction is not confined to that span
    free_corr = (free(x)["point"] - free_plain(x)["point"]).transpose(0, 1).reshape(30, -1)
    coef = torch.linalg.lstsq(free.skip.weight.detach(), free_corr).solution
    assert (free_corr - free.skip.weight.detach() @ coef).abs().max() > 1e-2
    assert (out["forecast"].diff(dim=-1) >= 0).all()


@pytest.mark.parametrize("center", ["mean", "trend"])
def test_centered_correction_leaves_the_level_and_slope_to_the_skip_path(center):
    model, plain = _pair(horizon=20, center=center)
    x = torch.randn(3, 12, 3)
    out, base = model(x), plain(x)
    correction = (out["point"] - base["point"]) / out["scale"]
    t = torch.arange(20.0) - 9.5
    slope = (correction * t[None, :, None]).sum(1) / t.square().sum()
    assert correction.abs().max() > 1e-2 and correction.mean(1).abs().max() < 1e-5
    if center == "trend":
        assert slope.abs().max() < 1e-6
    else:
        assert slope.abs().max() > 1e-4
    # the quantile spreads are the head's, not centered; quantiles still never cross
    spread = out["forecast"][..., 2] - out["forecast"][..., 0]
    assert not torch.allclose(spread, base["forecast"][..., 2] - base["forecast"][..., 0])
    assert (out["forecast"].diff(dim=-1) >= 0).all()
    # one horizon step: the centered median correction is zero, the forecast is the skip path's median
    one, one_plain = _pair(horizon=1, center=center)
    assert torch.allclose(one(x)["point"], one_plain(x)["point"], atol=1e-6)


def test_fading_correction_shrinks_by_e_every_reach_steps_and_leaves_the_spreads():
    model, plain = _pair(horizon=20, correction_reach=4.0)
    free = GDN2Forecaster(ForecasterConfig(**{**SMALL, "horizon": 20})).eval()
    free.load_state_dict(model.state_dict())
    x = torch.randn(3, 12, 3)
    base = plain(x)["point"]
    faded, full = model(x)["point"] - base, free(x)["point"] - base
    fade = torch.exp(-torch.arange(1.0, 21.0) / 4.0)[None, :, None]
    assert full.abs().max() > 1e-2 and torch.allclose(faded, full * fade, atol=1e-5)
    lo = model(x)["forecast"][..., 0] - model(x)["point"]
    assert torch.allclose(lo, free(x)["forecast"][..., 0] - free(x)["point"], atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(head_basis="lookback"), "'head_basis' expected 'free' or 'skip'"),
    (dict(head_basis="skip", linear_skip=False), "head_basis 'skip' expected linear_skip on"),
    (dict(center="median"), "'center' expected 'none', 'mean' or 'trend'"),
    (dict(center="trend", linear_skip=False), "center 'trend' expected linear_skip on"),
    (dict(correction_reach=0.0), "'correction_reach' expected a positive number of steps or None"),
    (dict(correction_reach="96"), "'correction_reach' expected a positive number of steps or None"),
    (dict(correction_reach=96, linear_skip=False), "correction_reach expected linear_skip on"),
])
def test_bad_correction_configs_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        ForecasterConfig(**{**SMALL, "horizon": 4, **change})


def test_recurrent_weight_decay_acts_on_the_encoder_path_only(tmp_path):
    path = tmp_path / "ETTsynth.csv"
    ett_frame(700).write_csv(path)
    dm = ForecastDataModule(DataConfig(path=str(path), lookback=24, horizon=8, borders=(400, 520, 640)))
    model = ModelConfig(kind="gdn2", hidden_size=8, num_heads=2, head_dim=4, channel_independent=True,
                        patch_len=8, patch_stride=4)
    module = ForecastModule.create(model, dm, TrainConfig(lr=0.01, weight_decay=1e-4, recurrent_weight_decay=0.5))
    slow, fast = module.configure_optimizers().param_groups
    assert slow["weight_decay"] == 0.5 and fast["weight_decay"] == 1e-4 and slow["lr"] == fast["lr"] == 0.01
    assert {id(p) for p in slow["params"]} == {id(p) for m in (module.net.encoder, module.net.head)
                                                for p in m.parameters()}
    # None (the default) keeps one group with the shared weight decay, as before the option existed
    (group,) = ForecastModule.create(model, dm, TrainConfig(weight_decay=1e-4)).configure_optimizers().param_groups
    assert group["weight_decay"] == 1e-4
    with pytest.raises(ValueError, match="'recurrent_weight_decay' expected numbers >= 0"):
        TrainConfig(recurrent_weight_decay=-0.1)


def test_corrected_forms_fit_reload_and_predict(tmp_path):
    path = tmp_path / "ETTsynth.csv"
    ett_frame(700).write_csv(path)
    dm = ForecastDataModule(DataConfig(path=str(path), lookback=24, horizon=8, borders=(400, 520, 640),
                                       eval_batch_size=64))
    model = ModelConfig(kind="gdn2", hidden_size=8, num_heads=2, head_dim=4, channel_independent=True,
                        patch_len=8, patch_stride=4, head_basis="skip", center="trend")
    module, info = fit(model, dm, TrainConfig(lr=0.01, max_epochs=2, limit_train_batches=8, patience=1,
                                              recurrent_weight_decay=0.01), out=tmp_path / "run", quiet=True)
    zero = torch.cat([b["target"] for b in dm.test_dataloader()]).square().mean()
    assert evaluate(module.net, dm.test_dataloader())["mse"] < float(zero)
    reloaded = load_module(info["checkpoint"])
    assert reloaded.net.config.head_basis == "skip" and reloaded.net.config.center == "trend"
    assert reloaded.train_config.recurrent_weight_decay == 0.01
    batch = next(iter(dm.test_dataloader()))
    assert torch.equal(reloaded.net(batch["values"])["point"], module.net.eval()(batch["values"])["point"])
