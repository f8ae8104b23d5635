"""Split-conformal intervals: the finite-sample rank by hand, coverage on exchangeable synthetic residuals, CQR
widening a model's too-narrow quantiles, and the errors."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from gdn2ts.forecasting.conformal import apply_calibration, calibrate, conformal_rank, conformalize
from gdn2ts.forecasting.data import DataError
from gdn2ts.forecasting.metrics import forecast_metrics


def _residual_frame(n: int, seed: int, sd=(1.0,), width: float | None = None) -> pl.DataFrame:
    """``n`` rows per step, point 0 and actual ~ N(0, sd[step - 1]); with ``width`` the model's pair
    ``q0.05``/``q0.95`` at -+ width (too narrow when below 1.645 sd)."""
    rng = np.random.default_rng(seed)
    parts = []
    for step, s in enumerate(sd, start=1):
        cols = {"series": "s", "step": step, "channel": "x", "actual": s * rng.standard_normal(n), "point": 0.0}
        if width is not None:
            cols |= {"q0.05": -width, "q0.5": 0.0, "q0.95": width}
        parts.append(pl.DataFrame(cols))
    return pl.concat(parts)


def _tolerance(n: int, level: float) -> float:
    # the test rows' binomial spread and the calibration's (coverage given n scores is Beta(k, n + 1 - k)), 4 sd
    return 4 * math.sqrt(2 * level * (1 - level) / n)


def test_rank_by_hand():
    # ceil((n + 1) * level): 10 * 0.9 = 9, 20 * 0.9 = 18, 5 * 0.8 = 4, 3 * 0.5 = 1.5 -> 2
    assert [conformal_rank(9, 0.9), conformal_rank(19, 0.9), conformal_rank(4, 0.8), conformal_rank(2, 0.5)] == \
        [9, 18, 4, 2]
    with pytest.raises(DataError, match=r"infinite 90 % interval \(rank 9 > 8\); level 0.9 needs at least 9"):
        conformal_rank(8, 0.9)
    with pytest.raises(DataError, match="rank 4 > 3"):
        conformal_rank(3, 0.8)
    with pytest.raises(DataError, match="'level'"):
        conformal_rank(10, 1.0)


def test_calibrate_picks_the_rank_by_hand():
    # step 1: scores 1..19 shuffled, one unknown actual -> rank 18 -> 18; step 2: scores 2, 4, .., 38 -> 36
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 20.0))
    cal = pl.concat([pl.DataFrame({"channel": "x", "step": 1, "actual": [*scores, None], "point": 0.0}),
                     pl.DataFrame({"channel": "x", "step": 2, "actual": -2 * scores, "point": 0.0})])
    table = calibrate(cal, 0.9)
    assert table.select("step", "n", "n_unknown", "rank", "score").rows() == [(1, 19, 1, 18, 18.0),
                                                                               (2, 19, 0, 18, 36.0)]
    # pooled over the steps: 38 scores, rank ceil(39 * 0.9) = 36: the 36th smallest of {1..19} u {2, 4, .., 38}
    pooled = calibrate(cal, 0.9, per_step=False)
    assert pooled.select("n", "rank", "score").rows() == [(38, 36, 34.0)]
    target = pl.DataFrame({"channel": "x", "step": [1, 2], "actual": [0.0, 0.0], "point": [1.0, -1.0],
                           "q0.5": [9.0, 9.0]})
    out = apply_calibration(table, target)
    # the target's own quantile columns give way to the conformal pair
    assert out.columns == ["channel", "step", "actual", "point", "q0.05", "q0.95"]
    assert out.select("q0.05", "q0.95").rows() == [(-17.0, 19.0), (-37.0, 35.0)]


def test_coverage_near_nominal_on_exchangeable_residuals():
    n = 2000
    cal, test = _residual_frame(n, 1, sd=(1.0, 3.0)), _residual_frame(n, 2, sd=(1.0, 3.0))
    out = conformalize(cal, test, (0.8, 0.9))
    m = forecast_metrics(out, by=(), per_step=True)
    for level, tag in ((0.8, "80"), (0.9, "90")):
        for cover in m[f"coverage_{tag}"]:
            assert abs(cover - level) < _tolerance(n, level)
    # the half-widths estimate the normal quantiles (1.645 sd at 90 %), each step its own
    assert m["width_90"].to_list() == pytest.approx([2 * 1.645, 2 * 3 * 1.645], rel=0.08)


def test_cqr_widens_too_narrow_quantiles():
    n = 2000
    cal, test = _residual_frame(n, 3, width=0.5), _residual_frame(n, 4, width=0.5)
    raw = forecast_metrics(test, by=(), intervals=(0.9,))
    # q0.05/q0.95 at -+0.5 cover P(|Z| < 0.5) = 38 % only
    assert raw["coverage_90"].item() < 0.45
    table = calibrate(cal, 0.9, method="cqr")
    # the scores are |y| - 0.5 where positive: the correction is about 1.645 - 0.5
    assert table["score"].item() == pytest.approx(1.645 - 0.5, abs=0.12)
    out = apply_calibration(table, test)
    fixed = forecast_metrics(out, by=())
    assert abs(fixed["coverage_90"].item() - 0.9) < _tolerance(n, 0.9)
    assert fixed["width_90"].item() > raw["width_90"].item()
    assert out["q0.05"].max() < -0.5 < 0.5 < out["q0.95"].min()


def test_cqr_scores_by_hand():
    # y against [lo, hi] = [0, 2]: y = 3 -> 1 (above), y = -1 -> 1 (below), y = 1 -> -1 (inside by 1)
    cal = pl.DataFrame({"channel": "x", "step": 1, "actual": [3.0, -1.0, 1.0, 1.5], "point": 1.0,
                        "q0.25": 0.0, "q0.75": 2.0})
    # rank ceil(5 * 0.5) = 3 of the scores (-1, -0.5, 1, 1) -> 1
    table = calibrate(cal, 0.5, method="cqr")
    assert table.select("n", "rank", "score").rows() == [(4, 3, 1.0)]
    out = apply_calibration(table, cal.head(1))
    assert out.select("q0.25", "q0.75").rows() == [(-1.0, 3.0)]


def test_per_series_groups():
    cal = pl.concat([_residual_frame(9, 5).with_columns(series=pl.lit("a")),
                     _residual_frame(9, 6, sd=(5.0,)).with_columns(series=pl.lit("b"))])
    table = calibrate(cal, 0.9, by=("series",))
    assert table.columns[:3] == ["series", "channel", "step"] and len(table) == 2
    # 9 rows each: rank 9, the largest absolute residual of each series
    for s in ("a", "b"):
        assert table.filter(pl.col("series") == s)["score"].item() == \
            cal.filter(pl.col("series") == s)["actual"].abs().max()


def test_errors_name_the_problem():
    cal = _residual_frame(20, 7, sd=(1.0, 1.0))
    with pytest.raises(DataError, match=r"group \{'channel': 'x', 'step': 1\}.*infinite 99 % interval"):
        calibrate(cal, 0.99)
    with pytest.raises(DataError, match="'method'"):
        calibrate(cal, method="quantile")
    with pytest.raises(DataError, match=r"'q0.05' and 'q0.95'"):
        calibrate(cal, 0.9, method="cqr")
    with pytest.raises(DataError, match=r"missing columns \['step'\]"):
        calibrate(cal.drop("step"))
    with pytest.raises(DataError, match="'point' has 1 missing or non-finite"):
        calibrate(cal.with_columns(point=pl.when(pl.int_range(pl.len()) == 3).then(math.nan).otherwise(0.0)))
    table = calibrate(cal, 0.9)
    other_channel = cal.with_columns(channel=pl.lit("z"))
    with pytest.raises(DataError, match=r"1 target groups \['channel', 'step'\] have no calibration.*\('z', 1\)"):
        apply_calibration(table, other_channel.filter(pl.col("step") == 1))
    longer = cal.with_columns(step=pl.col("step") + 1)
    with pytest.raises(DataError, match=r"\('x', 3\)"):
        apply_calibration(table, longer)
    with pytest.raises(DataError, match="no rows"):
        calibrate(cal.head(0))
