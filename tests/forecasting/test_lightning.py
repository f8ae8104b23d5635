"""The Lightning path: fit and predict on ETT-format and long-format data, checkpoints without pickle, the plot."""

from __future__ import annotations

import matplotlib
import polars as pl
import pytest
import torch

from gdn2ts.forecasting.data import DataConfig, DataError
from gdn2ts.forecasting.fit import fit, load_module, predict_frame
from gdn2ts.forecasting.lightning import ForecastDataModule, ModelConfig, TrainConfig, evaluate
from gdn2ts.forecasting.plot import plot_forecast

from forecast_frames import long_frame

TINY = ModelConfig(kind="gdn2", hidden_size=8, num_heads=2, head_dim=4)
QUICK = TrainConfig(lr=0.01, max_epochs=2, limit_train_batches=12, patience=1)


@pytest.fixture(scope="module")
def fitted_ett(tmp_path_factory):
    from forecast_frames import ett_frame

    path = tmp_path_factory.mktemp("ett") / "ETTsynth.csv"
    ett_frame(700).write_csv(path)
    # the ETT layout and protocol with borders scaled to a small file: train [0, 400), val [400 - L, 520),
    # test [520 - L, 640)
    dm = ForecastDataModule(DataConfig(path=str(path), lookback=16, horizon=8, borders=(400, 520, 640),
                                       eval_batch_size=50))
    module, info = fit(TINY, dm, QUICK, out=tmp_path_factory.mktemp("run"), quiet=True)
    return module, dm, info


def test_fit_and_predict_on_ett_format(fitted_ett):
    module, dm, info = fitted_ett
    assert 1 <= info["epochs"] <= 2 and info["best_val_mse"] > 0
    metrics = evaluate(module.net, dm.test_dataloader())
    assert metrics["windows"] == 640 - 520 - 8 + 1 and metrics["values"] == metrics["windows"] * 8 * 7
    # better than forecasting the training mean (0 after scaling) on this seasonal data
    zero = torch.cat([b["target"] for b in dm.test_dataloader()]).square().mean()
    assert metrics["mse"] < float(zero)
    frame = predict_frame(module, dm, "test", windows=[0, 5])
    assert frame.columns == ["series", "start", "step", "time", "channel", "actual", "point", "q0.1", "q0.5",
                             "q0.9"]
    assert frame.height == 2 * 8 * 7 and frame["start"].unique().sort().to_list() == [520 - 16, 520 - 11]
    assert (frame["q0.1"] <= frame["q0.5"]).all() and (frame["q0.5"] <= frame["q0.9"]).all()
    assert (frame["point"] == frame["q0.5"]).all()
    # forecasts are in the data's units: the actuals are the file's values
    raw = pl.read_csv(dm.config.path)
    first = frame.filter((pl.col("start") == 520 - 16) & (pl.col("step") == 1) & (pl.col("channel") == "OT"))
    assert first["actual"][0] == pytest.approx(raw["OT"][520], rel=1e-5)
    latest = predict_frame(module, dm, "latest")
    assert latest.height == 8 * 7 and latest["actual"].null_count() == latest.height


def test_checkpoint_loads_with_weights_only(fitted_ett):
    module, dm, info = fitted_ett
    ckpt = torch.load(info["checkpoint"], weights_only=True)
    assert set(ckpt["hyper_parameters"]) >= {"model", "data", "train", "scaler"}
    reloaded = load_module(info["checkpoint"])
    batch = next(iter(dm.test_dataloader()))
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(batch)["forecast"], reloaded(batch)["forecast"])
    with pytest.raises(DataError, match="no checkpoint"):
        load_module(info["checkpoint"] + ".missing")


def test_plot_draws_history_forecast_and_band_without_pyplot_state(fitted_ett, tmp_path):
    import matplotlib.pyplot as plt

    module, dm, _ = fitted_ett
    before = plt.get_fignums()
    path = plot_forecast(module, dm, tmp_path / "f.png", window=-1, channels=("OT", "HUFL"))
    assert path.stat().st_size > 10_000 and plt.get_fignums() == before
    assert matplotlib.get_backend()  # the global backend was never needed
    with pytest.raises(DataError, match="unknown channels"):
        plot_forecast(module, dm, tmp_path / "g.png", channels=("nope",))
    with pytest.raises(DataError, match="is not in split"):
        plot_forecast(module, dm, tmp_path / "g.png", window=10**6)


@pytest.mark.parametrize("kind", ["gdn2", "dlinear", "gru"])
def test_long_format_with_covariates_missing_values_and_irregular_times(kind, tmp_path):
    frame = long_frame(n_series=2, n_rows=160, missing=0.1, seed=2)
    cfg = DataConfig(path="unused", layout="long", targets=("HUFL", "OT"), known=("hour",), static=("size",),
                     lookback=16, horizon=4, batch_size=16)
    dm = ForecastDataModule(cfg, frame=frame)
    model = ModelConfig(kind=kind, hidden_size=8, num_heads=2, head_dim=4)
    module, info = fit(model, dm, TrainConfig(max_epochs=1, limit_train_batches=2), out=tmp_path, quiet=True)
    metrics = evaluate(module.net, dm.test_dataloader(), 1, 1)
    # test rows: the last 20 % of each series' hourly grid (dropped hours are missing steps) plus the lookback
    rows = [len(s.times) - int(len(s.times) * 0.7) - int(len(s.times) * 0.1) + 16 for s in dm.series]
    assert metrics["windows"] == sum(r - 16 - 4 + 1 for r in rows) and metrics["mse"] > 0
    frame = predict_frame(module, dm, "val")
    assert frame.height == len(dm.datasets["val"]) * 4 * 2
    assert ("q0.9" in frame.columns) == (kind == "gdn2")
    with pytest.raises(DataError, match=r"fit with known covariates \['hour'\]; expected future="):
        predict_frame(module, dm, "latest")
