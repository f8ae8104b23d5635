"""Rolling-origin backtests: keys, cutoffs and row counts by hand, what each fit saw, and the frame's columns."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl
import pytest

import gdn2ts.forecasting.rolling as rolling
from gdn2ts.forecasting.data import DataConfig, DataError
from gdn2ts.forecasting.fit import FitConfig
from gdn2ts.forecasting.lightning import ModelConfig, TrainConfig
from gdn2ts.forecasting.rolling import backtest, cross_validation, cutoff_rows

from forecast_frames import counts_frame

TINY = ModelConfig(kind="gdn2", hidden_size=8, num_heads=2, head_dim=4)
QUICK = TrainConfig(lr=0.01, max_epochs=1, limit_train_batches=2, accelerator="cpu")


def _frame() -> pl.DataFrame:
    # two series on integer time (step 5) of 60 and 70 steps, starting at different times, one gap in "b"
    parts = []
    for sid, n, t0 in (("a", 60, 100), ("b", 70, 0)):
        t = t0 + 5 * np.arange(n)
        parts.append(pl.DataFrame({"id": [sid] * n, "t": t, "y": np.sin(t / 15.0) + (sid == "b"),
                                   "k": (t // 5) % 7}))
    frame = pl.concat(parts)
    return frame.filter(~((pl.col("id") == "b") & pl.col("t").is_between(200, 220)))


def _config(**data) -> FitConfig:
    return FitConfig(data=DataConfig(**{"layout": "long", "id_column": "id", "time_column": "t", "targets": ("y",),
                                        "known": ("k",), "lookback": 8, "horizon": 4, "fractions": (0.7, 0.2, 0.1),
                                        **data}), model=TINY, train=QUICK)


@pytest.fixture
def fits(monkeypatch):
    """Every fit of a backtest: the last history time of each series it saw."""
    seen = []
    real = rolling.fit

    def spy(model, dm, train, **kw):
        dm.setup()
        seen.append({s.id: s.stamps[-1] for s in dm.series})
        return real(model, dm, train, **kw)

    monkeypatch.setattr(rolling, "fit", spy)
    return seen


def test_backtest_frame_by_hand(fits):
    frame = _frame()
    bt = backtest(frame, _config(), n_windows=3, step_size=2)
    assert bt.columns == ["series", "cutoff", "step", "time", "channel", "actual", "point", "q0.1", "q0.5", "q0.9"]
    assert bt.height == 2 * 3 * 4 and bt.schema["time"] == bt.schema["cutoff"] == pl.Int64
    # cutoff rows N - H - 1 - (n_windows - 1 - j) * step: a (60 rows from t=100): 51, 53, 55; b (70 rows from 0)
    assert cutoff_rows(60, 4, 3, 2) == [51, 53, 55] and cutoff_rows(70, 4, 3, 2) == [61, 63, 65]
    cutoffs = bt.group_by("series", maintain_order=True).agg(pl.col("cutoff").unique(maintain_order=True))
    assert cutoffs.rows() == [("a", [355, 365, 375]), ("b", [305, 315, 325])]
    assert (bt["time"] == bt["cutoff"] + 5 * bt["step"]).all()
    # the actuals are the frame's values at those times
    joined = bt.join(frame, left_on=["series", "time"], right_on=["id", "t"])
    assert joined.height == bt.height and np.allclose(joined["actual"], joined["y"])
    # one fit (refit=False), on each series' rows up to its first cutoff
    assert fits == [{"a": 355, "b": 305}]


def test_refit_every_and_every_kth_cutoff(fits):
    frame = _frame()
    bt = backtest(frame, _config(), n_windows=3, step_size=2, refit=True)
    assert len(fits) == 3 and [f["a"] for f in fits] == [355, 365, 375] and [f["b"] for f in fits] == [305, 315, 325]
    assert bt.height == 24
    fits.clear()
    cv = cross_validation(frame, _config(), n_windows=3, step_size=2, refit=2)
    assert [f["a"] for f in fits] == [355, 375] and cv.height == 24


def test_windows_across_a_gap_count_steps_of_time_and_keep_the_missing_actuals(fits):
    frame = _frame()
    # b's gap (t 200..220) in the horizon of its last window when b is cut at t = 225: the steps are grid steps
    # (the gap is not closed up), the missing actuals are null
    frame_b = frame.filter((pl.col("id") == "b") & (pl.col("t") <= 225))
    gap = backtest(frame_b, _config(horizon=6), n_windows=1).sort("step")
    assert gap["cutoff"][0] == 195 and gap["time"].to_list() == [200, 205, 210, 215, 220, 225]
    assert gap["actual"].null_count() == 5 and gap["actual"][-1] == pytest.approx(
        frame_b.filter(pl.col("t") == 225)["y"][0])


def test_backtest_keeps_datetimes_and_counts_no_negative_quantile():
    frame = counts_frame(n_series=2, n_hours=200, seed=3, gaps=((150, 160),))
    cfg = FitConfig(data=DataConfig(layout="long", id_column="store", time_column="time", targets=("visits",),
                                    known=("hour", "weekday"), static=("region",), lookback=24, horizon=12,
                                    target_transform="log1p", nonnegative=True), model=TINY, train=QUICK)
    bt = backtest(frame, cfg, n_windows=2)
    assert bt.schema["cutoff"] == bt.schema["time"] == frame.schema["time"]
    assert ((bt["time"] - bt["cutoff"]) == bt["step"].cast(pl.Int64) * timedelta(hours=1)).all()
    assert (bt.select("q0.1", "q0.5", "q0.9").to_numpy() >= 0).all()


def test_backtest_arguments_are_checked():
    frame = _frame()
    with pytest.raises(DataError, match="'n_windows' expected a positive int, got 0"):
        backtest(frame, _config(), n_windows=0)
    with pytest.raises(DataError, match="'refit' expected a positive int, got -1"):
        backtest(frame, _config(), refit=-1)
    with pytest.raises(DataError, match=r"series 'a' has 60 steps of 5; 30 windows of horizon 4 every 2 steps need "
                                        r"at least 63"):
        backtest(frame, _config(), n_windows=30, step_size=2)
    with pytest.raises(DataError, match="expected layout 'long'"):
        backtest(frame, _config(layout="ett"))
