"""Split-conformal intervals for forecasts.

On calibration windows (forecasts whose actuals are known, made by the fitted model on rows it was not trained on)
each row gets a conformity score: the absolute residual ``|y - point|`` (method ``absolute``), or the conformalized
quantile regression score ``max(lo - y, y - hi)`` against the model's own quantile pair (method ``cqr``). Per
(channel, step), and optionally per series, the score at rank ``k = ceil((n + 1) * level)`` of the ``n`` sorted
scores widens the target windows' forecasts into intervals: ``point -+ s`` or ``[lo - s, hi + s]``. When the
calibration and target rows are exchangeable, the interval covers a target row's actual with probability at
least ``level``. With ``n < level / (1 - level)`` rows (fewer than ``1 / alpha - 1``), ``k > n``: the interval
would be infinite, and :func:`calibrate` refuses the group by name.

The intervals come back as a quantile pair per level (``q0.05`` and ``q0.95`` for 90 %), so that
:func:`gdn2ts.forecasting.metrics.forecast_metrics` reports their coverage and width. Usage:
docs/forecast-metrics.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import polars as pl

from gdn2ts.forecasting.data import DataError
from gdn2ts.forecasting.metrics import _finite, _need, _numeric, quantile_levels

__all__ = ["conformal_rank", "calibrate", "apply_calibration", "conformalize"]

METHODS = ("absolute", "cqr")
# the calibration table's own columns; the rest are its keys
_TABLE = ("level", "method", "n", "n_unknown", "rank", "score")


def conformal_rank(n: int, level: float) -> int:
    """The finite-sample rank ``k = ceil((n + 1) * level)`` of the conformal quantile among ``n`` sorted scores
    (1-based); a ``DataError`` when ``k > n`` (the interval would be infinite).

    Example:
        >>> conformal_rank(9, 0.9), conformal_rank(19, 0.9), conformal_rank(100, 0.9)
        (9, 18, 91)
        >>> conformal_rank(8, 0.9)
        Traceback (most recent call last):
        ...
        gdn2ts.forecasting.data.DataError: conformal: 8 calibration rows give an infinite 90 % interval ... at least 9
    """
    _check_level(level)
    # the tolerance keeps a product such as 10 * 0.9 from rounding above its integer
    k = max(1, math.ceil((n + 1) * level - 1e-9 * (n + 1)))
    if k > n:
        need = math.ceil(level / (1 - level) - 1e-9)
        raise DataError(f"conformal: {n} calibration rows give an infinite {_pct(level)} % interval (rank {k} > {n}); "
                        f"level {level:g} needs at least {need}")
    return k


def _check_level(level) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise DataError(f"conformal: 'level' expected a coverage inside (0, 1), got {level!r}")


def _pct(level: float) -> str:
    return f"{round(100 * level, 6):g}"


def _qname(tau: float) -> str:
    return f"q{round(tau, 10):g}"


def _pair(frame: pl.DataFrame, level: float, where: str) -> tuple[str, str]:
    """The model's quantile columns at ``(1 - level) / 2`` and ``(1 + level) / 2``."""
    levels = quantile_levels(frame)
    found = [next((c for t, c in levels.items() if abs(t - tau) < 1e-9), None)
             for tau in ((1 - level) / 2, (1 + level) / 2)]
    if None in found:
        raise DataError(f"{where}: method 'cqr' at level {level:g} needs columns {_qname((1 - level) / 2)!r} and "
                        f"{_qname((1 + level) / 2)!r}; the frame has quantile columns {list(levels.values())}")
    return found[0], found[1]


def calibrate(calibration: pl.DataFrame, levels: float | Sequence[float] = 0.9, *, method: str = "absolute",
              by: Sequence[str] = (), per_step: bool = True) -> pl.DataFrame:
    """Conformal scores per group of the calibration forecasts: the channel, the step (``per_step``) and ``by``.

    Args:
        calibration: a predict frame of calibration windows (``channel``, ``actual``, ``point``, ``step`` if
            per_step, the ``by`` columns; for ``cqr`` the quantile pair of each level). Rows whose actual is null
            or NaN are left out and counted.
        levels: the nominal coverage of each interval (0.9: a 90 % interval).
        method: ``absolute`` (score ``|y - point|``) or ``cqr`` (score ``max(lo - y, y - hi)``).
        by: further grouping columns, e.g. ``("series",)`` for an interval per series.
        per_step: one score per forecast step (errors grow with the step); False pools the steps.

    Returns: the keys, ``level``, ``method``, ``n`` (scores), ``n_unknown``, ``rank`` (``ceil((n + 1) level)``)
    and ``score`` (the ``rank``-th smallest score): the half-width added to each side.

    Example:
        >>> cal = pl.DataFrame({"channel": "x", "step": 1, "actual": [float(v) for v in range(1, 10)], "point": 0.0})
        >>> calibrate(cal, 0.9).rows()  # 9 scores 1..9: rank ceil(10 * 0.9) = 9
        [('x', 1, 0.9, 'absolute', 9, 0, 9, 9.0)]
    """
    where = "calibrate"
    if method not in METHODS:
        raise DataError(f"{where}: 'method' expected one of {METHODS}, got {method!r}")
    levels = [levels] if isinstance(levels, (int, float)) else list(levels)
    for level in levels:
        _check_level(level)
    keys = list(dict.fromkeys([*by, "channel", *(["step"] if per_step else [])]))
    _need(calibration, [*keys, "actual", "point"], where)
    if not len(calibration):
        raise DataError(f"{where}: the calibration frame has no rows")
    y = pl.col("actual")
    known = y.is_not_null() & ~y.is_nan()
    parts = []
    for level in levels:
        cols = ["point"] if method == "absolute" else list(_pair(calibration, level, where))
        frame = _numeric(calibration, ["actual", *cols], where)
        _finite(frame, cols, where)
        score = (y - pl.col("point")).abs() if method == "absolute" else \
            pl.max_horizontal(pl.col(cols[0]) - y, y - pl.col(cols[1]))
        scored = frame.select(*keys, pl.when(known).then(score).alias("_s"))
        counts = scored.group_by(keys, maintain_order=True).agg(
            pl.col("_s").count().cast(pl.Int64).alias("n"), pl.col("_s").null_count().cast(pl.Int64).alias("n_unknown"))
        ranks = []
        for row in counts.iter_rows(named=True):
            try:
                ranks.append(conformal_rank(row["n"], level))
            except DataError as e:
                group = {k: row[k] for k in keys}
                raise DataError(f"{where}: group {group}: {e}; give more calibration windows, or pool groups "
                                f"(per_step=False, fewer 'by' columns)") from None
        counts = counts.with_columns(pl.Series("rank", ranks, dtype=pl.Int64))
        picked = (scored.drop_nulls("_s")
                  .with_columns(pl.col("_s").rank("ordinal").over(keys).cast(pl.Int64).alias("rank"))
                  .join(counts.select(*keys, "rank"), on=[*keys, "rank"])
                  .select(*keys, pl.col("_s").alias("score")))
        parts.append(counts.join(picked, on=keys, how="left", maintain_order="left")
                     .select(*keys, pl.lit(float(level)).alias("level"), pl.lit(method).alias("method"), "n",
                             "n_unknown", "rank", "score"))
    return pl.concat(parts).sort([*keys, "level"], maintain_order=True)


def apply_calibration(table: pl.DataFrame, target: pl.DataFrame) -> pl.DataFrame:
    """The target forecasts with a conformal interval per level of ``table`` (:func:`calibrate`).

    The target's ``q<level>`` columns are replaced by one pair per level: ``q<(1 - level) / 2>`` and
    ``q<(1 + level) / 2>``, ``point -+ score`` (method ``absolute``) or the model's pair widened by the score
    (``cqr``; a negative score narrows it). Every target row needs a calibration group with the same keys.

    Example:
        >>> table = pl.DataFrame({"channel": ["x"], "step": [1], "level": [0.9], "method": ["absolute"], "n": [9],
        ...                       "n_unknown": [0], "rank": [9], "score": [2.0]})
        >>> target = pl.DataFrame({"channel": ["x"], "step": [1], "actual": [0.5], "point": [1.0]})
        >>> apply_calibration(table, target).rows()
        [('x', 1, 0.5, 1.0, -1.0, 3.0)]
    """
    where = "apply_calibration"
    _need(table, _TABLE, where)
    keys = [c for c in table.columns if c not in _TABLE]
    _need(target, [*keys, "point"], where)
    levels = sorted(set(table["level"].to_list()))
    old = list(quantile_levels(target).values())
    if table.select(*keys, "level").is_duplicated().any():
        raise DataError(f"{where}: the table has several rows for one level and key of {keys}")
    out, new = target, []
    for level in levels:
        part = table.filter(pl.col("level") == level)
        methods = part["method"].unique().to_list()
        if len(methods) != 1 or methods[0] not in METHODS:
            raise DataError(f"{where}: level {level:g} expected one method of {METHODS}, got {methods}")
        out = out.join(part.select(*keys, pl.col("score").alias("_s")), on=keys, how="left", maintain_order="left")
        lost = out.filter(pl.col("_s").is_null()).select(*keys).unique(maintain_order=True)
        if len(lost):
            have = {k: sorted(set(part[k].to_list()))[:10] for k in keys}
            raise DataError(f"{where}: {len(lost)} target groups {keys} have no calibration at level {level:g}, "
                            f"e.g. {lost.head(5).rows()}; the calibration has {have}")
        lo, hi = ["point", "point"] if methods[0] == "absolute" else list(_pair(target, level, where))
        _finite(_numeric(target, list({lo, hi}), where), list({lo, hi}), where)
        new += [(1 - level) / 2, (1 + level) / 2]
        out = out.with_columns((pl.col(lo).cast(pl.Float64) - pl.col("_s")).alias(f"_{_qname(new[-2])}"),
                               (pl.col(hi).cast(pl.Float64) + pl.col("_s")).alias(f"_{_qname(new[-1])}")).drop("_s")
    rest = [c for c in target.columns if c not in old]
    return out.select(*rest, *[pl.col(f"_{_qname(t)}").alias(_qname(t)) for t in sorted(new)])


def conformalize(calibration: pl.DataFrame, target: pl.DataFrame, levels: float | Sequence[float] = 0.9, *,
                 method: str = "absolute", by: Sequence[str] = (), per_step: bool = True) -> pl.DataFrame:
    """:func:`calibrate` on the calibration frame, then :func:`apply_calibration` on the target frame.

    Example:
        >>> cal = pl.DataFrame({"channel": "x", "step": 1, "actual": [float(v) for v in range(1, 10)], "point": 0.0})
        >>> target = pl.DataFrame({"channel": ["x"], "step": [1], "actual": [2.0], "point": [0.5]})
        >>> conformalize(cal, target, 0.9).select("q0.05", "q0.95").rows()
        [(-8.5, 9.5)]
    """
    return apply_calibration(calibrate(calibration, levels, method=method, by=by, per_step=per_step), target)
