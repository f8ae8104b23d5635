"""Forecast metrics on a predict frame, in the data's units and in scaled units.

A predict frame (:func:`gdn2ts.forecasting.fit.predict_frame`, or a backtest's frame) has one row per (series,
window, step, channel) with ``channel``, ``actual`` (null or NaN when unknown), ``point`` and one ``q<level>``
column per quantile level. The metrics: MSE, MAE, MASE, the quantile-score approximation of CRPS, the weighted
quantile loss, and the coverage and mean width of the central intervals formed by quantile pairs (``q0.1`` and
``q0.9`` make the 80 % interval). :func:`forecast_metrics` gives them per group (the caller's keys, the channel
and, if asked, the step); :func:`summarize_metrics` gives the mean over all rows and the mean over series.
Rows whose actual is unknown are left out of every metric and counted in ``n_unknown``. Formulas, units and
examples: docs/forecast-metrics.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import polars as pl

from gdn2ts.forecasting.data import DataError

__all__ = ["quantile_levels", "interval_pairs", "seasonal_scale", "forecast_metrics", "summarize_metrics"]

_QCOL = re.compile(r"^q([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$")
# what the scale tables carry beside their keys and the scale
_DIAGNOSTICS = ("pairs",)


def quantile_levels(frame: pl.DataFrame) -> dict[float, str]:
    """The quantile columns of a frame: ``{level: column}`` in increasing level, from the names ``q<level>``.

    Example:
        >>> quantile_levels(pl.DataFrame({"point": [1.0], "q0.9": [2.0], "q0.1": [0.0]}))
        {0.1: 'q0.1', 0.9: 'q0.9'}
    """
    found: dict[float, str] = {}
    for c in frame.columns:
        m = _QCOL.match(c)
        if m is None:
            continue
        level = float(m.group(1))
        if not 0 < level < 1:
            raise DataError(f"quantile column {c!r}: level {level:g} expected inside (0, 1)")
        if level in found:
            raise DataError(f"quantile columns {found[level]!r} and {c!r} name the same level {level:g}")
        found[level] = c
    return dict(sorted(found.items()))


def _percent(nominal: float) -> str:
    return f"{round(100 * nominal, 6):g}"


def interval_pairs(levels: Mapping[float, str]) -> list[tuple[float, str, str]]:
    """Central intervals formed by quantile pairs ``(tau, 1 - tau)``: ``(nominal, lower, upper)`` by increasing
    nominal coverage ``1 - 2 tau``.

    Example:
        >>> interval_pairs({0.05: "q0.05", 0.1: "q0.1", 0.5: "q0.5", 0.9: "q0.9", 0.95: "q0.95"})
        [(0.8, 'q0.1', 'q0.9'), (0.9, 'q0.05', 'q0.95')]
    """
    pairs = []
    for lo, lo_col in levels.items():
        for hi, hi_col in levels.items():
            if lo < 0.5 and abs(lo + hi - 1) < 1e-9:
                pairs.append((round(hi - lo, 10), lo_col, hi_col))
    return sorted(pairs)


def _need(frame: pl.DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{where}: missing columns {missing}; expected {list(columns)}, got {frame.columns}")


def _numeric(frame: pl.DataFrame, columns: Sequence[str], where: str) -> pl.DataFrame:
    for c in columns:
        if not frame.schema[c].is_numeric():
            raise DataError(f"{where}: column {c!r} expected numbers, got {frame.schema[c]}")
    return frame.with_columns([pl.col(c).cast(pl.Float64) for c in columns])


def _finite(frame: pl.DataFrame, columns: Sequence[str], where: str) -> None:
    for c in columns:
        bad = int(frame.select((pl.col(c).is_null() | ~pl.col(c).is_finite()).sum()).item())
        if bad:
            raise DataError(f"{where}: column {c!r} has {bad} missing or non-finite forecasts of {len(frame)}; "
                            f"every forecast must be a finite number")


def seasonal_scale(train: pl.DataFrame, season: int, *, by: Sequence[str] = ("series",), time: str | None = "date",
                   channels: Sequence[str] | None = None, value: str | None = None) -> pl.DataFrame:
    """MASE's scale: per series and channel, the mean absolute error of the seasonal-naive forecast on the
    training values, ``mean_t |y[t] - y[t - season]|`` over the rows where both values are observed.

    The lag is taken by row (after sorting by ``time``), as the windows are; a series with fewer than
    ``season + 1`` observed pairs gets a null scale and a constant one a zero scale: :func:`forecast_metrics`
    refuses both by name where they are needed.

    Args:
        train: the training rows: wide (``by``, ``time`` and one column per channel, the data's own layout) or,
            with ``value``, long (``by``, ``time``, ``channel`` and ``value``).
        season: the seasonal lag in rows (1: the naive forecast; 24: the same hour yesterday for hourly rows).
        by: the series keys (``()`` for a frame of one series, such as the ETT layout).
        time: the column to sort by within each series (None: the rows are in time order already).
        channels: the channel columns of a wide frame (default: every numeric column outside ``by`` and ``time``).
        value: the value column of a long frame.

    Returns: ``by``, ``channel``, ``scale`` and ``pairs`` (the number of differences averaged).

    Example:
        >>> train = pl.DataFrame({"series": ["a"] * 4, "date": [1, 2, 3, 4], "x": [1.0, 3.0, 2.0, 6.0]})
        >>> seasonal_scale(train, 1).rows()  # (2 + 1 + 4) / 3
        [('a', 'x', 2.3333333333333335, 3)]
        >>> seasonal_scale(train, 2).rows()  # (1 + 3) / 2
        [('a', 'x', 2.0, 2)]
    """
    if isinstance(season, bool) or not isinstance(season, int) or season < 1:
        raise DataError(f"seasonal_scale: 'season' expected a positive int, got {season!r}")
    by, order = list(by), [time] if time is not None else []
    if value is None:
        if channels is None:
            channels = [c for c in train.columns if c not in (*by, *order) and train.schema[c].is_numeric()]
        _need(train, [*by, *order, *channels], "seasonal_scale")
        if not channels:
            raise DataError(f"seasonal_scale: no channel columns in {train.columns}")
        train = _numeric(train, channels, "seasonal_scale")
        long = train.unpivot(on=list(channels), index=[*by, *order], variable_name="channel", value_name="_v")
    else:
        _need(train, [*by, *order, "channel", value], "seasonal_scale")
        long = _numeric(train, [value], "seasonal_scale").rename({value: "_v"})
        if channels is not None:
            long = long.filter(pl.col("channel").is_in(list(channels)))
    keys = [*by, "channel"]
    if order:
        long = long.sort([*keys, *order], maintain_order=True)
    v = pl.col("_v").fill_nan(None)
    out = (long.with_columns((v - v.shift(season)).abs().over(keys).alias("_d"))
           .group_by(keys, maintain_order=True)
           .agg(pl.col("_d").mean().alias("scale"), pl.col("_d").count().cast(pl.Int64).alias("pairs")))
    return out.sort(keys, maintain_order=True)


def _scale_column(frame: pl.DataFrame, scale, name: str, where: str, what: str) -> pl.DataFrame:
    """Join a scale (a mapping channel -> scale, or a frame of key columns and ``scale``) as column ``name``."""
    if isinstance(scale, Mapping):
        scale = pl.DataFrame({"channel": [str(k) for k in scale], "scale": [float(v) for v in scale.values()]})
    if not isinstance(scale, pl.DataFrame) or "scale" not in scale.columns:
        raise DataError(f"{where}: {what} expected a mapping channel -> scale or a frame with a 'scale' column, "
                        f"got {type(scale).__name__}")
    keys = [c for c in scale.columns if c not in ("scale", *_DIAGNOSTICS)]
    absent = [c for c in keys if c not in frame.columns]
    if not keys or absent:
        raise DataError(f"{where}: {what}'s key columns {keys} expected among the forecast's columns "
                        f"{frame.columns}" + (f" (missing {absent})" if absent else ""))
    try:
        table = scale.select(*[pl.col(c).cast(frame.schema[c]) for c in keys], pl.col("scale").cast(pl.Float64))
    except pl.exceptions.PolarsError as e:
        raise DataError(f"{where}: {what}'s keys {keys} do not match the forecast's column types: {e}") from None
    if table.select(keys).is_duplicated().any():
        raise DataError(f"{where}: {what} has several rows for one key of {keys}")
    table = table.rename({"scale": name}).with_columns(pl.lit(True).alias("_listed"))
    joined = frame.join(table, on=keys, how="left", maintain_order="left")
    s = pl.col(name)
    lost = joined.filter(pl.col("_listed").is_null()).select(*keys).unique(maintain_order=True)
    if len(lost):
        raise DataError(f"{where}: {what} has no row for {len(lost)} keys {keys} of the forecast, e.g. "
                        f"{lost.head(5).rows()}")
    joined = joined.drop("_listed")
    bad = joined.filter(s.is_null() | s.is_nan() | s.is_infinite() | (s <= 0)).select(*keys, name)
    if len(bad):
        bad = bad.unique(maintain_order=True)
        raise DataError(f"{where}: {what} is null, zero, negative or not finite for {len(bad)} keys {keys} "
                        f"(+ scale), e.g. {bad.head(5).rows()}; a metric divided by it is undefined there: give a "
                        f"positive finite scale or leave those rows out")
    return joined


def _rows(frame: pl.DataFrame, keys: list[str], where: str, scale, mase, season, train_by, quantiles,
          intervals) -> tuple[pl.DataFrame, list[str]]:
    """Per-row scores (null where the actual is unknown) and the names of the metric columns to average."""
    _need(frame, [*keys, "actual", "point"], where)
    levels = quantile_levels(frame) if quantiles is not False or intervals != () else {}
    if quantiles and not levels:
        raise DataError(f"{where}: CRPS needs quantile columns q<level>, got {frame.columns}")
    pairs = interval_pairs(levels)
    if intervals is not None:
        want = [round(float(x), 10) for x in intervals]
        have = {p[0]: p for p in pairs}
        lacking = [x for x in want if x not in have]
        if lacking:
            raise DataError(f"{where}: intervals {lacking} need quantile pairs (tau, 1 - tau); the frame has levels "
                            f"{list(levels)} (intervals {sorted(have)})")
        pairs = [have[x] for x in want]
    qcols = list(levels.values()) if quantiles is not False else []
    frame = _numeric(frame, ["actual", "point", *levels.values()], where)
    _finite(frame, list(dict.fromkeys(["point", *qcols, *(c for p in pairs for c in p[1:])])), where)
    if int(frame.select(pl.col("actual").is_infinite().sum()).item()):
        raise DataError(f"{where}: column 'actual' has infinite values")
    if scale is not None:
        frame = _scale_column(frame, scale, "_scale", where, "scale")
    if mase is not None:
        if not isinstance(mase, pl.DataFrame):
            raise DataError(f"{where}: 'mase' expected a scale table or a training frame, got {type(mase).__name__}")
        if "scale" not in mase.columns:
            if season is None:
                raise DataError(f"{where}: MASE from a training frame needs 'season'")
            mase = seasonal_scale(mase, season, by=train_by, channels=frame["channel"].unique().to_list())
        frame = _scale_column(frame, mase, "_mase", where, "MASE scale")
    y = pl.when(pl.col("actual").is_not_null() & ~pl.col("actual").is_nan()).then(pl.col("actual"))
    err = y - pl.col("point")
    cols = {"mse": err.pow(2), "mae": err.abs()}
    if scale is not None:
        cols |= {"mse_scaled": (err / pl.col("_scale")).pow(2), "mae_scaled": err.abs() / pl.col("_scale")}
    if mase is not None:
        cols["mase"] = err.abs() / pl.col("_mase")
    if qcols:
        # 2 x pinball loss per level, averaged over the levels
        crps = pl.sum_horizontal([2 * pl.max_horizontal(tau * (y - pl.col(c)), (tau - 1) * (y - pl.col(c)))
                                  for tau, c in levels.items()]) / len(qcols)
        cols["crps"] = pl.when(y.is_not_null()).then(crps)
        if scale is not None:
            cols["crps_scaled"] = cols["crps"] / pl.col("_scale")
        cols["_abs_actual"] = y.abs()
    for nominal, lo, hi in pairs:
        tag = _percent(nominal)
        cols[f"coverage_{tag}"] = ((y >= pl.col(lo)) & (y <= pl.col(hi))).cast(pl.Float64)
        cols[f"width_{tag}"] = pl.when(y.is_not_null()).then(pl.col(hi) - pl.col(lo))
        if scale is not None:
            cols[f"width_{tag}_scaled"] = cols[f"width_{tag}"] / pl.col("_scale")
    rows = frame.select(*keys, **cols)
    return rows, [c for c in cols if not c.startswith("_")]


def _aggregate(rows: pl.DataFrame, keys: list[str], metrics: list[str]) -> pl.DataFrame:
    exprs = [pl.col("mae").count().cast(pl.Int64).alias("n"), pl.col("mae").null_count().cast(pl.Int64)
             .alias("n_unknown")]
    for c in metrics:
        exprs.append(pl.col(c).mean())
        if c == "crps":
            # a ratio of sums, not a mean of rows; null where every scored actual is 0
            denom = pl.col("_abs_actual").sum()
            exprs.append(pl.when(denom > 0).then(pl.col("crps").sum() / denom).alias("wql"))
    if not keys:
        return rows.select(exprs)
    return rows.group_by(keys, maintain_order=True).agg(exprs).sort(keys, maintain_order=True)


def _keys(by: Sequence[str], extra: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*by, *extra]))


def forecast_metrics(frame: pl.DataFrame, *, by: Sequence[str] = ("series",), per_step: bool = False,
                     scale=None, mase: pl.DataFrame | None = None, season: int | None = None,
                     quantiles: bool | None = None, intervals: Sequence[float] | None = None) -> pl.DataFrame:
    """Metrics per group: the keys ``by``, the channel and (``per_step``) the step; other columns are ignored.

    Args:
        frame: a predict frame (``by``, ``channel``, ``actual``, ``point``, ``q<level>``; ``step`` if per_step).
        by: the grouping columns besides the channel (``()``: one group per channel).
        per_step: one group per forecast step as well.
        scale: a scale per channel for the ``*_scaled`` metrics (the error divided by it), as a mapping
            ``{channel: scale}`` or a frame of key columns (``channel``, optionally ``series``...) and ``scale``;
            for the training scaler: ``dict(zip(cfg.targets, module.scaler.std))``.
        mase: MASE's scale table (:func:`seasonal_scale`), or the training frame to make it from (its wide
            layout with a ``date`` column, series keys ``by``) with ``season``.
        season: the seasonal lag in rows when ``mase`` is a training frame.
        quantiles: CRPS and the weighted quantile loss from the ``q<level>`` columns (None: when there are some;
            True: required; False: not computed).
        intervals: nominal coverages to report, e.g. ``(0.8,)`` for ``q0.1``/``q0.9`` (None: every pair found;
            ``()``: none).

    Returns: the keys, ``n`` (rows scored), ``n_unknown`` (rows left out: actual null or NaN), ``mse``, ``mae``,
    ``mse_scaled``, ``mae_scaled`` (with ``scale``), ``mase`` (with ``mase``), ``crps``, ``crps_scaled``,
    ``wql`` (with quantiles), ``coverage_<pct>``, ``width_<pct>``, ``width_<pct>_scaled`` per interval: means over
    the group's scored rows (``wql`` a ratio of sums); null where a group has no scored row.

    Example:
        >>> f = pl.DataFrame({"series": ["a", "a", "b"], "channel": "x", "actual": [1.0, None, 4.0],
        ...                   "point": [2.0, 0.0, 1.0], "q0.1": [0.0, 0.0, 2.0], "q0.9": [3.0, 0.0, 3.0]})
        >>> forecast_metrics(f, scale={"x": 2.0}).select("series", "n", "n_unknown", "mae", "mae_scaled",
        ...                                              "coverage_80", "width_80").rows()
        [('a', 1, 1, 1.0, 0.5, 1.0, 3.0), ('b', 1, 0, 3.0, 1.5, 0.0, 1.0)]
    """
    keys = _keys(by, ["channel", *(["step"] if per_step else [])])
    rows, metrics = _rows(frame, keys, "forecast_metrics", scale, mase, season, by, quantiles, intervals)
    return _aggregate(rows, keys, metrics)


def summarize_metrics(frame: pl.DataFrame, *, by: Sequence[str] = ("series",), keep: Sequence[str] = ("channel",),
                      scale=None, mase: pl.DataFrame | None = None, season: int | None = None,
                      quantiles: bool | None = None, intervals: Sequence[float] | None = None) -> pl.DataFrame:
    """Aggregated metrics per ``keep`` group, two ways: ``average`` ``rows`` is the mean over all scored rows,
    ``series`` the mean over the ``by`` groups (each series weighs the same, however many rows it has).

    Metrics in the data's units are only comparable within a channel, hence ``keep=("channel",)`` by default;
    ``keep=()`` pools every channel, which makes sense for the scaled metrics, MASE and coverage.
    ``keep=("channel", "step")`` gives the curves over the horizon. Arguments and columns as in
    :func:`forecast_metrics`, plus ``groups`` (``by`` groups with a scored row, which the ``series`` mean
    averages). ``wql`` over rows is the ratio of sums over all rows (GluonTS's ``mean_wQuantileLoss``).

    Example:
        >>> f = pl.DataFrame({"series": ["a", "a", "b"], "channel": "x", "actual": [1.0, 3.0, 4.0],
        ...                   "point": [2.0, 2.0, 0.0]})
        >>> summarize_metrics(f).select("channel", "average", "groups", "n", "mae").rows()  # (1+1+4)/3, (1+4)/2
        [('x', 'rows', 2, 3, 2.0), ('x', 'series', 2, 3, 2.5)]
    """
    keep = list(keep)
    groups = _keys(by, keep)
    rows, metrics = _rows(frame, groups, "summarize_metrics", scale, mase, season, by, quantiles, intervals)
    micro = _aggregate(rows, keep, metrics)
    per_group = _aggregate(rows, groups, metrics)
    averaged = [c for c in per_group.columns if c not in (*groups, "n", "n_unknown")]
    exprs = [(pl.col("n") > 0).sum().cast(pl.Int64).alias("groups"), pl.col("n").sum(), pl.col("n_unknown").sum(),
             *[pl.col(c).mean() for c in averaged]]
    macro = per_group.select(exprs) if not keep else per_group.group_by(keep, maintain_order=True).agg(exprs)
    counts = macro.select(*keep, "groups")
    micro = micro.join(counts, on=keep, maintain_order="left") if keep else pl.concat([micro, counts], how="horizontal")
    order = [*keep, "average", "groups", "n", "n_unknown", *averaged]
    out = pl.concat([micro.with_columns(average=pl.lit("rows")).select(order),
                     macro.with_columns(average=pl.lit("series")).select(order)], how="vertical_relaxed")
    return out.sort([*keep, "average"], maintain_order=True)
