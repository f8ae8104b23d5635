"""Forecast metrics against values worked out by hand on frames of a few rows."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from gdn2ts.forecasting.data import DataError
from gdn2ts.forecasting.metrics import (
    forecast_metrics,
    interval_pairs,
    quantile_levels,
    seasonal_scale,
    summarize_metrics,
)


def _frame() -> pl.DataFrame:
    """Series a: errors -1, 0, 3; series b: error -1 and two unknown actuals (null, NaN)."""
    return pl.DataFrame({
        "series": ["a", "a", "a", "b", "b", "b"], "cutoff": [10, 10, 10, 10, 10, 10], "step": [1, 2, 3, 1, 2, 3],
        "channel": "x", "actual": [1.0, 2.0, 4.0, 0.0, None, float("nan")], "point": [2.0, 2.0, 1.0, 1.0, 5.0, 5.0]})


def _get(table: pl.DataFrame, column: str, **keys) -> float:
    return table.filter(*[pl.col(k) == v for k, v in keys.items()])[column].item()


def test_mse_mae_per_series_by_hand():
    m = forecast_metrics(_frame())
    assert m.columns[:2] == ["series", "channel"]
    # a: |e| = 1, 0, 3 -> MAE 4/3, MSE (1 + 0 + 9)/3; b: |e| = 1, two rows left out
    assert _get(m, "mae", series="a") == pytest.approx(4 / 3)
    assert _get(m, "mse", series="a") == pytest.approx(10 / 3)
    assert (_get(m, "n", series="a"), _get(m, "n_unknown", series="a")) == (3, 0)
    assert (_get(m, "mae", series="b"), _get(m, "mse", series="b")) == (1.0, 1.0)
    assert (_get(m, "n", series="b"), _get(m, "n_unknown", series="b")) == (1, 2)
    assert "crps" not in m.columns and not any(c.startswith("coverage") for c in m.columns)


def test_scaled_units_by_hand():
    for scale in ({"x": 2.0}, pl.DataFrame({"channel": ["x"], "scale": [2.0]}),
                  pl.DataFrame({"series": ["a", "b"], "channel": ["x", "x"], "scale": [2.0, 2.0]})):
        m = forecast_metrics(_frame(), scale=scale)
        # a: |e| / 2 = 0.5, 0, 1.5 -> 2/3; squared 0.25, 0, 2.25 -> 5/6
        assert _get(m, "mae_scaled", series="a") == pytest.approx(2 / 3)
        assert _get(m, "mse_scaled", series="a") == pytest.approx(5 / 6)


def test_per_step_and_other_keys():
    m = forecast_metrics(_frame(), by=("series", "cutoff"), per_step=True)
    assert m.columns[:4] == ["series", "cutoff", "channel", "step"] and len(m) == 6
    assert _get(m, "mae", series="a", step=3) == 3.0
    assert _get(m, "mae", series="b", step=2) is None and _get(m, "n_unknown", series="b", step=2) == 1
    pooled = forecast_metrics(_frame(), by=(), per_step=True)
    # step 1 pools a (|e| 1) and b (|e| 1); step 3 only a's 3
    assert pooled["mae"].to_list() == [1.0, 0.0, 3.0] and pooled["n"].to_list() == [2, 1, 1]


def test_summary_rows_against_series():
    s = summarize_metrics(_frame())
    rows = s.filter(pl.col("average") == "rows")
    per_series = s.filter(pl.col("average") == "series")
    # over rows: (1 + 0 + 3 + 1) / 4; over series: (4/3 + 1) / 2
    assert rows["mae"].item() == pytest.approx(5 / 4)
    assert per_series["mae"].item() == pytest.approx(7 / 6)
    assert rows["mse"].item() == pytest.approx(11 / 4)
    assert per_series["mse"].item() == pytest.approx((10 / 3 + 1) / 2)
    for part in (rows, per_series):
        assert (part["groups"].item(), part["n"].item(), part["n_unknown"].item()) == (2, 4, 2)


def test_summary_pools_channels_and_keeps_steps():
    f = pl.concat([_frame(), _frame().with_columns(channel=pl.lit("z"), point=pl.col("point") * 10)])
    s = summarize_metrics(f, keep=(), scale={"x": 1.0, "z": 10.0})
    # z's errors in scaled units: (20 - 1)/10, (20 - 2)/10, (10 - 4)/10, (10 - 0)/10 over 4 rows
    z = (1.9 + 1.8 + 0.6 + 1.0) / 4
    assert s.filter(pl.col("average") == "rows")["mae_scaled"].item() == pytest.approx((5 / 4 + z) / 2)
    steps = summarize_metrics(_frame(), keep=("channel", "step"))
    assert steps.filter(pl.col("average") == "rows")["mae"].to_list() == [1.0, 0.0, 3.0]
    # step 1 over series: a 1, b 1; step 2: a 0 (b has none) -> one group
    assert steps.filter(pl.col("average") == "series")["groups"].to_list() == [2, 1, 1]


def _quantile_frame() -> pl.DataFrame:
    return pl.DataFrame({"series": ["a", "a"], "channel": "x", "actual": [1.0, 6.0], "point": [2.0, 3.0],
                         "q0.1": [0.0, 1.0], "q0.5": [2.0, 3.0], "q0.9": [3.0, 5.0]})


def test_crps_wql_coverage_width_by_hand():
    m = forecast_metrics(_quantile_frame(), scale={"x": 2.0})
    # row 1, y = 1: u = y - q = 1, -1, -2 -> pinball 0.1, 0.5, 0.2 -> 2x mean 1.6/3
    # row 2, y = 6: u = 5, 3, 1 -> pinball 0.5, 1.5, 0.9 -> 2x mean 5.8/3
    assert m["crps"].item() == pytest.approx((1.6 / 3 + 5.8 / 3) / 2)
    assert m["crps_scaled"].item() == pytest.approx((1.6 / 3 + 5.8 / 3) / 4)
    # weighted quantile loss: sum of the rows' scores over sum |y| = (7.4 / 3) / 7
    assert m["wql"].item() == pytest.approx(7.4 / 21)
    # q0.1..q0.9 covers 1 (in [0, 3]) and not 6 (above 5); widths 3 and 4
    assert (m["coverage_80"].item(), m["width_80"].item(), m["width_80_scaled"].item()) == (0.5, 3.5, 1.75)


def test_crps_of_a_point_forecast_is_its_absolute_error():
    rng = np.random.default_rng(0)
    y, p = rng.normal(size=50), rng.normal(size=50)
    taus = (0.1, 0.25, 0.5, 0.75, 0.9)
    f = pl.DataFrame({"series": "a", "channel": "x", "actual": y, "point": p, **{f"q{t:g}": p for t in taus}})
    m = forecast_metrics(f)
    assert m["crps"].item() == pytest.approx(m["mae"].item(), rel=1e-12)
    assert m["coverage_50"].item() == 0.0 and m["width_80"].item() == 0.0
    # levels not symmetric about 0.5: 2 mean(tau) |e| above the point, 2 (1 - mean(tau)) |e| below it
    one = pl.DataFrame({"series": "a", "channel": "x", "actual": [1.0, -1.0], "point": 0.0, "q0.1": 0.0,
                        "q0.2": 0.0})
    assert forecast_metrics(one)["crps"].item() == pytest.approx((0.3 + 1.7) / 2)


def test_interval_choice_and_quantile_columns():
    f = _quantile_frame().with_columns(pl.col("q0.1").alias("q0.05"), pl.col("q0.9").alias("q0.95"))
    assert list(quantile_levels(f)) == [0.05, 0.1, 0.5, 0.9, 0.95]
    assert [p[0] for p in interval_pairs(quantile_levels(f))] == [0.8, 0.9]
    only = forecast_metrics(f, intervals=(0.9,), quantiles=False)
    assert [c for c in only.columns if c.startswith(("coverage", "width", "crps"))] == ["coverage_90", "width_90"]
    none = forecast_metrics(f, intervals=())
    assert "crps" in none.columns and not any(c.startswith("coverage") for c in none.columns)


def test_mase_by_hand_season_1_and_24():
    t = np.arange(48)
    b = 2.0 * t
    b[30] = np.nan
    # rows out of order: the scale sorts by date within each series
    train = pl.DataFrame({"series": ["a"] * 48 + ["b"] * 48, "date": np.concatenate([t, t]),
                          "y": np.concatenate([t.astype(float), b])}).reverse()
    s1, s24 = seasonal_scale(train, 1), seasonal_scale(train, 24)
    # a = t: differences 1 (47 pairs) and 24 (24 pairs); b = 2t with row 30 missing: 2 (45 pairs), 48 (23 pairs)
    assert s1.rows() == [("a", "y", 1.0, 47), ("b", "y", 2.0, 45)]
    assert s24.rows() == [("a", "y", 24.0, 24), ("b", "y", 48.0, 23)]
    f = pl.DataFrame({"series": ["a", "a", "b", "b"], "channel": "y", "actual": [50.0, 50.0, 100.0, 100.0],
                      "point": [62.0, 14.0, 76.0, 28.0]})
    # MAE: a (12 + 36)/2 = 24, b (24 + 72)/2 = 48
    m24 = forecast_metrics(f, mase=s24)
    assert m24["mase"].to_list() == [1.0, 1.0]
    assert forecast_metrics(f, mase=train, season=1)["mase"].to_list() == [24.0, 24.0]
    long = train.unpivot(on=["y"], index=["series", "date"], variable_name="channel", value_name="v")
    assert seasonal_scale(long, 24, value="v").rows() == s24.rows()
    pooled = summarize_metrics(f, keep=(), mase=s24)
    assert pooled["mase"].to_list() == [1.0, 1.0]


def test_mase_zero_or_missing_scale_is_refused():
    train = pl.DataFrame({"series": ["a"] * 3, "date": [1, 2, 3], "y": [5.0, 5.0, 5.0]})
    f = pl.DataFrame({"series": ["a"], "channel": "y", "actual": [1.0], "point": [2.0]})
    with pytest.raises(DataError, match="zero"):
        forecast_metrics(f, mase=train, season=1)
    with pytest.raises(DataError, match="null, zero"):
        forecast_metrics(f, mase=seasonal_scale(train, 5))
    with pytest.raises(DataError, match="season"):
        forecast_metrics(f, mase=train)
    with pytest.raises(DataError, match="season"):
        seasonal_scale(train, 0)


def test_errors_name_the_problem():
    f = _quantile_frame()
    with pytest.raises(DataError, match=r"missing columns \['point'\]"):
        forecast_metrics(f.drop("point"))
    with pytest.raises(DataError, match="step"):
        forecast_metrics(f, per_step=True)
    with pytest.raises(DataError, match="quantile columns"):
        forecast_metrics(_frame(), quantiles=True)
    with pytest.raises(DataError, match=r"intervals \[0.5\]"):
        forecast_metrics(f, intervals=(0.5,))
    with pytest.raises(DataError, match="'q1.5'.*inside"):
        forecast_metrics(f.with_columns(pl.lit(1.0).alias("q1.5")))
    with pytest.raises(DataError, match="'point' has 1 missing or non-finite"):
        forecast_metrics(f.with_columns(point=pl.Series([1.0, math.nan])))
    with pytest.raises(DataError, match="'q0.9' has 1 missing or non-finite"):
        forecast_metrics(f.with_columns(pl.Series("q0.9", [1.0, math.inf])))
    with pytest.raises(DataError, match="'actual' has infinite"):
        forecast_metrics(f.with_columns(actual=pl.Series([1.0, -math.inf])))
    with pytest.raises(DataError, match="scale has no row for 1 keys"):
        forecast_metrics(f, scale={"other": 1.0})
    with pytest.raises(DataError, match="scale is null, zero"):
        forecast_metrics(f, scale={"x": 0.0})
    with pytest.raises(DataError, match="expected numbers"):
        forecast_metrics(f.with_columns(point=pl.lit("a")))
    # a quantile column is only read when quantile metrics are asked
    assert "crps" not in forecast_metrics(f.with_columns(pl.lit(1.0).alias("q1.5")), quantiles=False,
                                          intervals=()).columns


def test_the_page_examples_run():
    page = (Path(__file__).resolve().parents[2] / "docs" / "forecast-metrics.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 2
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/forecast-metrics.md example {i + 1}", "exec"), {})
