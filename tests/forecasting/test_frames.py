"""The practitioners' path: fit on a polars frame, forecast with the future's known covariates as a frame,
categorical and past-only covariates, the target transform, and timestamps in the data's own type."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import polars as pl
import pytest
import torch

from gdn2ts.forecasting.data import DataConfig, DataError
from gdn2ts.forecasting.fit import FitConfig, check_accelerator, fit
from gdn2ts.forecasting.frames import fit_forecaster, forecast
from gdn2ts.forecasting.lightning import ForecastDataModule, ForecastModule, ModelConfig, TrainConfig

from forecast_frames import counts_frame

TINY = ModelConfig(kind="gdn2", hidden_size=8, num_heads=2, head_dim=4)
QUICK = TrainConfig(lr=0.01, max_epochs=1, limit_train_batches=3, accelerator="cpu")
H = 12


def counts_config(**data) -> FitConfig:
    base = {"layout": "long", "id_column": "store", "time_column": "time", "targets": ("visits",),
            "known": ("hour", "weekday", "promo"), "past": ("temp",), "static": ("region",),
            "categorical": ("hour",), "lookback": 24, "horizon": H, "fractions": (0.7, 0.3, 0.0),
            "target_transform": "log1p", "nonnegative": True}
    return FitConfig(data=DataConfig(**{**base, **data}), model=TINY, train=QUICK)


@pytest.fixture(scope="module")
def fitted():
    """A model fit on the first 216 hours of two stores; the next 12 hours' known covariates as the future."""
    frame = counts_frame(n_series=2, n_hours=240, seed=1)
    cut = frame["time"].min() + timedelta(hours=216)
    history = frame.filter(pl.col("time") < cut)
    future = frame.filter(pl.col("time") >= cut).select("store", "time", "hour", "weekday", "promo")
    torch.manual_seed(0)
    return fit_forecaster(history, counts_config(), quiet=True), history, future


def _points(f: pl.DataFrame) -> np.ndarray:
    return f.sort("series", "step")["point"].to_numpy()


def test_forecast_reads_the_future_frame_and_keeps_the_time_type(fitted):
    module, history, future = fitted
    f = forecast(module, history, future)
    assert f.columns == ["series", "step", "time", "channel", "actual", "point", "q0.1", "q0.5", "q0.9"]
    assert f.height == 2 * H and f["actual"].null_count() == f.height
    assert f.schema["time"] == history.schema["time"] == pl.Datetime("ms", "Australia/Melbourne")
    last = history["time"].max()
    for sid in ("store0", "store1"):
        times = f.filter(pl.col("series") == sid).sort("step")["time"]
        assert times.to_list() == [last + timedelta(hours=h) for h in range(1, H + 1)]
    # the known covariates of the future reach the forecast
    flipped = future.with_columns(promo=1 - pl.col("promo"))
    assert not np.allclose(_points(forecast(module, history, flipped)), _points(f))
    # past-only covariates (temp) are not asked of the future; the future's extra rows and columns are ignored
    more = pl.concat([future, future.with_columns(pl.col("time") + timedelta(days=1))]).with_columns(extra=1)
    assert np.allclose(_points(forecast(module, history, more)), _points(f))
    assert f.to_pandas().shape == (2 * H, 9)


def test_known_covariates_are_required_and_checked(fitted):
    module, history, future = fitted
    with pytest.raises(DataError, match=r"fit with known covariates \['hour', 'weekday', 'promo'\]; expected future="):
        forecast(module, history)
    short = future.filter(pl.col("time") < future["time"].min() + timedelta(hours=6))
    with pytest.raises(DataError, match=r"series 'store0' lacks 6 of its 12 forecast steps .*got 6 rows"):
        forecast(module, history, short)
    shifted = future.with_columns(pl.col("time") + timedelta(minutes=30))
    with pytest.raises(DataError, match="lacks 12 of its 12 forecast steps"):
        forecast(module, history, shifted)
    with pytest.raises(DataError, match=r"future frame lacks columns \['promo'\]"):
        forecast(module, history, future.drop("promo"))
    with pytest.raises(DataError, match="time_zone=.UTC.*, expected .*Australia/Melbourne.* as in the history"):
        forecast(module, history, future.with_columns(pl.col("time").dt.convert_time_zone("UTC")))
    with pytest.raises(DataError, match="missing value of known covariate 'promo'"):
        forecast(module, history, future.with_columns(promo=pl.when(pl.col("hour") == 3).then(None)
                                                      .otherwise(pl.col("promo"))))
    with pytest.raises(DataError, match="more than once"):
        forecast(module, history, pl.concat([future, future.head(1)]))


def test_categories_are_embedded_and_unseen_ones_read_as_unknown(fitted):
    module, history, future = fitted
    codec = module.codec
    # numbers first, then categories (the model's column order); strings and the named int column are categories
    assert codec.known == ("promo", "hour", "weekday") and codec.static == ("region",)
    assert codec.vocab["region"] == ("north", "south") and len(codec.vocab["hour"]) == 24
    assert codec.cardinalities("known") == (25, len(codec.vocab["weekday"]) + 1)
    assert module.net.config.known_categories == codec.cardinalities("known")
    # two categories never seen in training are the same 'unknown' input; a seen one is not
    a = forecast(module, history, future.with_columns(weekday=pl.lit("Holiday")))
    b = forecast(module, history, future.with_columns(weekday=pl.lit("Closed")))
    assert np.array_equal(_points(a), _points(b))
    assert not np.allclose(_points(a), _points(forecast(module, history, future)))
    # a store the model never saw, in a region it never saw: static category 0, and it is forecast
    new = history.filter(pl.col("store") == "store0").with_columns(store=pl.lit("store9"), region=pl.lit("east"))
    f = forecast(module, new, future.filter(pl.col("store") == "store0").with_columns(store=pl.lit("store9")))
    assert f["series"].unique().to_list() == ["store9"] and f["point"].is_finite().all()
    assert codec.series("store9", new, module.data_config).static.tolist() == [0.0]


def test_past_covariates_are_read_over_the_lookback_only(fitted):
    module, history, future = fitted
    base = _points(forecast(module, history, future))
    last = history.group_by("store").agg(pl.col("time").max().alias("end"))
    h = history.join(last, on="store")
    inside = h.with_columns(temp=pl.when(pl.col("time") > pl.col("end") - timedelta(hours=24)).then(40.0)
                            .otherwise(pl.col("temp"))).drop("end")
    before = h.with_columns(temp=pl.when(pl.col("time") <= pl.col("end") - timedelta(hours=24)).then(40.0)
                            .otherwise(pl.col("temp"))).drop("end")
    assert not np.allclose(_points(forecast(module, inside, future)), base)
    assert np.allclose(_points(forecast(module, before, future)), base)


def test_log1p_and_nonnegative_give_no_negative_quantile_on_counts(fitted):
    module, history, future = fitted
    f = forecast(module, history, future)
    q = f.select("q0.1", "q0.5", "q0.9").to_numpy()
    assert (q >= 0).all() and (np.diff(q, axis=1) >= 0).all()
    # the inverse transform clamps: even a very negative scaled output comes back as 0
    assert (module.codec.decode(np.full((3, 1), -50.0)) == 0).all()
    # log1p of a negative target is refused, naming the column
    bad = history.with_columns(visits=pl.when(pl.col("hour") == 5).then(-1).otherwise(pl.col("visits")))
    with pytest.raises(DataError, match="'log1p' expected non-negative targets.*'visits'"):
        ForecastDataModule(counts_config().data, bad).setup()


def _untrained(frame: pl.DataFrame, **data) -> ForecastModule:
    cfg = DataConfig(**{"layout": "long", "id_column": "id", "time_column": "t", "targets": ("y",), "lookback": 6,
                        "horizon": 3, "fractions": (0.6, 0.4, 0.0), **data})
    dm = ForecastDataModule(cfg, frame)
    return ForecastModule.create(TINY, dm, QUICK)


@pytest.mark.parametrize("kind", ["datetime_tz_ns", "date", "int"])
def test_forecast_times_are_the_users_type(kind):
    n = 40
    if kind == "date":
        t = pl.date_range(date(2020, 1, 1), date(2020, 1, 1) + timedelta(days=n - 1), "1d", eager=True)
    elif kind == "int":
        t = pl.Series(np.arange(n) * 5 + 1000)
    else:
        t = (pl.datetime_range(pl.datetime(2021, 3, 27, 12), pl.datetime(2021, 3, 29, 3), "1h", eager=True,
                               time_unit="ns", time_zone="Europe/Paris"))
    frame = pl.DataFrame({"id": ["a"] * len(t), "t": t, "y": np.sin(np.arange(len(t)) / 3.0)})
    module = _untrained(frame)
    f = forecast(module, frame)
    assert f.schema["time"] == frame.schema["t"]
    if kind == "int":
        assert module.codec.freq == 5 and f["time"].to_list() == [frame["t"][-1] + 5 * h for h in (1, 2, 3)]
    elif kind == "date":
        assert module.codec.freq == "1d" and f["time"].to_list() == [date(2020, 2, 10), date(2020, 2, 11),
                                                                     date(2020, 2, 12)]
    else:
        # the series crosses the change to summer time: the grid is of elapsed hours, in the series' zone
        assert module.codec.freq == "1h"
        assert f.schema["time"] == pl.Datetime("ns", "Europe/Paris")
        assert (f["time"] - frame["t"][-1]).to_list() == [timedelta(hours=h) for h in (1, 2, 3)]


def test_a_short_history_reads_as_missing_steps_and_an_empty_one_is_refused():
    frame = pl.DataFrame({"id": ["a"] * 30, "t": np.arange(30), "y": np.cos(np.arange(30.0))})
    module = _untrained(frame)
    assert forecast(module, frame.tail(2))["time"].to_list() == [30, 31, 32]
    gap = frame.with_columns(y=pl.when(pl.col("t") >= 20).then(None).otherwise(pl.col("y")))
    with pytest.raises(DataError, match="series 'a' has no observed target in its last 6 steps"):
        forecast(module, gap)


def test_a_frame_needs_no_path_and_a_missing_gpu_is_named(tmp_path):
    frame = counts_frame(n_series=1, n_hours=120, seed=2)
    cfg = counts_config(lookback=12, horizon=4)
    assert cfg.data.path is None
    with pytest.raises(DataError, match="expected a frame or DataConfig.path"):
        ForecastDataModule(cfg.data).setup()
    if not torch.cuda.is_available():
        for name in ("gpu", "cuda"):
            with pytest.raises(ValueError, match=f"accelerator '{name}': torch .* sees no CUDA GPU"):
                check_accelerator(name)
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            fit(TINY, ForecastDataModule(cfg.data, frame), TrainConfig(accelerator="gpu"), out=tmp_path)
