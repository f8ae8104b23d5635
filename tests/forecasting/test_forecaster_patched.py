"""The channel-independent, patched form of the GDN-2 forecaster (PatchTST-style tokens through the streaming
encoder): shapes, token layout, missing values and irregular times, quantiles, channel independence, named
errors, and a short fit through the Lightning path."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from gdn2ts.forecasting.bench import run_bench
from gdn2ts.forecasting.data import DataConfig
from gdn2ts.forecasting.fit import fit, load_module, predict_frame
from gdn2ts.forecasting.lightning import ForecastDataModule, ForecastModule, ModelConfig, TrainConfig, evaluate
from gdn2ts.models.forecaster import ForecasterConfig, GDN2Forecaster, forecast_loss
from gdn2ts.streaming import MemoryStore, OnlineRunner

from forecast_frames import ett_frame, long_frame

PATCHED = dict(channel_independent=True, patch_len=4, patch_stride=2, head="flatten", dropout=0.1)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_channels=3, lookback=12, horizon=5, hidden_size=16, num_heads=2, head_dim=8)
    model = GDN2Forecaster(ForecasterConfig(**{**cfg, **kw}))
    torch.nn.init.normal_(model.head.weight, std=0.1)  # the head starts at zero: give the encoder a voice
    return model


@pytest.mark.parametrize("head", ["last", "flatten"])
@pytest.mark.parametrize("independent", [False, True])
def test_shapes_missing_values_irregular_times_and_covariates(head, independent):
    model = _model(**{**PATCHED, "head": head, "channel_independent": independent}, n_known=2, n_static=1)
    assert model.config.n_tokens == 5 and model.encoder.config.n_channels == 4 * (1 if independent else 3)
    values = torch.randn(4, 12, 3)
    values[0, 6:10] = float("nan")        # a whole patch (steps 6..9) with nothing observed
    values[1, :, 2] = float("nan")        # a channel missing over the whole window
    values[2, ::3, 0] = float("nan")
    times = torch.cumsum(torch.rand(4, 12).double() * 3 + 0.1, dim=1)
    out = model(values, times, known=torch.randn(4, 17, 2), static=torch.randn(4, 1))
    assert out["forecast"].shape == (4, 5, 3, 3) and torch.isfinite(out["forecast"]).all()
    assert (out["forecast"].diff(dim=-1) >= 0).all() and torch.equal(out["point"], out["forecast"][..., 1])
    assert out["next_step"].shape == (4, 5, 12, 3) and out["next_target"].shape == (4, 5, 12)
    target = torch.randn(4, 5, 3)
    target[0, 1] = float("nan")
    loss = forecast_loss(out["forecast"], target, (0.1, 0.5, 0.9), quantile_weight=0.5)
    loss = loss + forecast_loss(out["next_step"][:, :-1], out["next_target"][:, 1:], (0.1, 0.5, 0.9))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        if "reconstruct_head" in name:  # the encoder's reconstruction head is not used by forecasts
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.encoder.embed.weight.grad.abs().sum() > 0


def test_tokens_are_patches_ending_at_the_last_step():
    model = _model(**PATCHED, revin=False, linear_skip=False).eval()
    x = torch.randn(2, 12, 3)
    out = model(x)
    # channel-major tokens of 4 steps every 2 steps; the last one is steps 8..11 of each channel
    assert torch.equal(out["next_target"][:, -1], x[:, 8:12].transpose(1, 2).reshape(2, 12))
    assert torch.equal(out["next_target"][:, 0], x[:, 0:4].transpose(1, 2).reshape(2, 12))
    # lookback 13: one step left over at the start, which the encoder never reads
    model = _model(**PATCHED, lookback=13, revin=False, linear_skip=False).eval()
    y = torch.randn(1, 13, 3)
    changed = y.clone()
    changed[0, 0] += 5.0
    assert torch.equal(model(y)["point"], model(changed)["point"])
    changed[0, 1] += 5.0
    assert not torch.allclose(model(y)["point"], model(changed)["point"])


def test_channels_are_independent_only_in_the_independent_form():
    x = torch.randn(2, 12, 3)
    other = x.clone()
    other[:, :, 1] = torch.randn(2, 12) * 4
    independent = _model(**PATCHED).eval()
    a, b = independent(x)["point"], independent(other)["point"]
    assert torch.allclose(a[..., [0, 2]], b[..., [0, 2]], atol=1e-5) and not torch.allclose(a[..., 1], b[..., 1])
    mixing = _model(**{**PATCHED, "channel_independent": False}).eval()
    assert not torch.allclose(mixing(x)["point"][..., 0], mixing(other)["point"][..., 0], atol=1e-5)


def test_missing_values_are_missing_and_elapsed_time_matters():
    model = _model(**PATCHED, revin=False, linear_skip=False).eval()
    x = torch.randn(1, 12, 3)
    x[0, 7, 0] = float("nan")
    zero = torch.nan_to_num(x)
    # a missing value is not a zero: the encoder sees its mask
    assert not torch.allclose(model(x)["point"], model(zero)["point"])
    regular = torch.arange(12.0).double()[None]
    gap = regular.clone()
    gap[0, 6:] += 10.0
    assert not torch.allclose(model(x, regular)["point"], model(x, gap)["point"])
    # a fully missing window leaves only the known parts: finite forecasts
    assert torch.isfinite(model(torch.full((1, 12, 3), float("nan")))["forecast"]).all()


def test_dropout_acts_in_training_only():
    model = _model(**{**PATCHED, "dropout": 0.5})
    x = torch.randn(2, 12, 3)
    model.eval()
    assert torch.equal(model(x)["point"], model(x)["point"])
    model.train()
    assert not torch.equal(model(x)["point"], model(x)["point"])


@pytest.mark.parametrize("change, message", [
    (dict(patch_len=2, patch_stride=3), "patch_stride <= patch_len <= lookback"),
    (dict(patch_len=13), "patch_stride <= patch_len <= lookback"),
    (dict(patch_len=0), "'patch_len' expected a positive int"),
    (dict(head="mean"), "'head' expected 'last' or 'flatten'"),
    (dict(dropout=1.0), "'dropout' expected a number in"),
])
def test_bad_patch_configs_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        ForecasterConfig(n_channels=3, lookback=12, horizon=2, **change)


def test_patched_form_fits_and_predicts_in_the_lightning_path(tmp_path):
    path = tmp_path / "ETTsynth.csv"
    ett_frame(700).write_csv(path)
    dm = ForecastDataModule(DataConfig(path=str(path), lookback=24, horizon=8, borders=(400, 520, 640),
                                       eval_batch_size=50))
    model = ModelConfig(kind="gdn2", hidden_size=8, num_heads=2, head_dim=4, channel_independent=True,
                        patch_len=8, patch_stride=4, head="flatten", dropout=0.1)
    module, info = fit(model, dm, TrainConfig(lr=0.01, max_epochs=2, limit_train_batches=10, patience=1),
                       out=tmp_path / "run", quiet=True)
    metrics = evaluate(module.net, dm.test_dataloader())
    zero = torch.cat([b["target"] for b in dm.test_dataloader()]).square().mean()
    assert metrics["windows"] == 640 - 520 - 8 + 1 and metrics["mse"] < float(zero)
    reloaded = load_module(info["checkpoint"])
    assert reloaded.net.config.patch_len == 8 and reloaded.net.config.head == "flatten"
    frame = predict_frame(reloaded, dm, "test", windows=[0, 3])
    assert frame.height == 2 * 8 * 7
    assert (frame["q0.1"] <= frame["q0.5"]).all() and (frame["q0.5"] <= frame["q0.9"]).all()
    assert (frame["q0.9"] - frame["q0.1"]).min() > 0


def test_patched_form_with_covariates_and_missing_values_on_long_data(tmp_path):
    frame = long_frame(n_series=2, n_rows=160, missing=0.1, seed=3)
    cfg = DataConfig(path="unused", layout="long", targets=("HUFL", "OT"), known=("hour",), static=("size",),
                     lookback=16, horizon=4, batch_size=16)
    dm = ForecastDataModule(cfg, frame=frame)
    model = ModelConfig(kind="gdn2", hidden_size=8, num_heads=2, head_dim=4, channel_independent=True,
                        patch_len=4, patch_stride=4)
    module, _ = fit(model, dm, TrainConfig(max_epochs=1, limit_train_batches=2), out=tmp_path, quiet=True)
    metrics = evaluate(module.net, dm.test_dataloader(), 1, 1)
    # test rows: the last 20 % of each series' hourly grid (dropped hours are missing steps) plus the lookback
    rows = [len(s.times) - int(len(s.times) * 0.7) - int(len(s.times) * 0.1) + 16 for s in dm.series]
    assert metrics["windows"] == sum(r - 16 - 4 + 1 for r in rows) and metrics["mse"] > 0


def test_recurrent_lr_scale_slows_the_encoder_path_only(tmp_path):
    path = tmp_path / "ETTsynth.csv"
    ett_frame(700).write_csv(path)
    dm = ForecastDataModule(DataConfig(path=str(path), lookback=24, horizon=8, borders=(400, 520, 640)))
    dm.setup()
    model = ModelConfig(kind="gdn2", hidden_size=8, num_heads=2, head_dim=4, channel_independent=True,
                        patch_len=8, patch_stride=4)
    module = ForecastModule.create(model, dm, TrainConfig(lr=0.01, recurrent_lr_scale=0.1))
    slow, fast = module.configure_optimizers().param_groups
    assert slow["lr"] == pytest.approx(0.001) and fast["lr"] == pytest.approx(0.01)
    assert {id(p) for p in slow["params"]} == {id(p) for m in (module.net.encoder, module.net.head)
                                                for p in m.parameters()}
    assert {id(p) for p in fast["params"]} == {id(p) for p in module.net.skip.parameters()}
    with pytest.raises(ValueError, match="recurrent_lr_scale"):
        TrainConfig(recurrent_lr_scale=0.0)


def test_bench_runs_the_patched_form_with_its_fit_settings(ett_csv, tmp_path):
    record = run_bench(str(ett_csv), lookbacks=(24,), horizons=(4,), models=("gdn2_ci_overlap",),
                       train=TrainConfig(max_epochs=1, limit_train_batches=2),
                       model_overrides={"gdn2_ci_overlap": {"hidden_size": 8, "head_dim": 4,
                                                            "recurrent_lr_scale": 0.5}},
                       json_path=str(tmp_path / "b.json"), quiet=True)
    (row,) = record["results"]
    assert row["train_overrides"] == {"lr": 1e-3, "recurrent_lr_scale": 0.5}
    assert row["model_config"]["patch_len"] == 16 and row["model_config"]["channel_independent"]
    assert row["test_windows"] == 2880 + 24 - 24 - 4 + 1 and row["mse"] > 0


def test_channel_independent_encoder_serves_one_stream_per_variable_in_the_online_runner():
    model = _model(channel_independent=True, revin=False).eval()   # patch_len 1: one step per token
    x = torch.randn(12, 3)
    x[5, 1] = float("nan")
    t = torch.arange(12.0).double() * 2
    runner = OnlineRunner(model.encoder, MemoryStore(), channels=["value"])
    rows = {"stream": [f"var{j}" for j in range(3) for _ in range(12)], "time": t.tolist() * 3,
            "value": [None if v != v else v for j in range(3) for v in x[:, j].tolist()]}
    assert runner.observe(pl.DataFrame(rows)).accepted == 36   # the null is accepted as a missing value
    got = runner.forecast(["var0", "var1", "var2"]).sort("stream")
    with torch.no_grad():
        want = model(x[None], t[None])["next_step"][0, -1]  # [C, Q]: each variable's one-step quantiles
    assert torch.allclose(torch.tensor(got.select(["q0.1", "q0.5", "q0.9"]).to_numpy()).float(), want, atol=1e-4)
