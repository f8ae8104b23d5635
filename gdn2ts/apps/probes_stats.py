"""Intervals across training seeds for the recall probes.

Each seed gives one score per bin (the mean over that bin's held-out events); seeds are independent draws of the
initial weights and the training batches, so the interval of a model's mean score is Student's t interval over
seeds: ``mean ± t_{(1 + level) / 2, n - 1} * sd / sqrt(n)`` with ``sd`` the sample standard deviation
(``n - 1`` in the denominator). The t quantile comes from the closed-form CDF of Student's t with an integer number
of degrees of freedom, inverted by bisection (no SciPy needed).
"""

from __future__ import annotations

import math
import statistics

__all__ = ["t_cdf", "t_quantile", "mean_interval"]


def t_cdf(t: float, df: int) -> float:
    """``P(T <= t)`` for Student's t with ``df`` (a positive int) degrees of freedom.

    With ``theta = atan(t / sqrt(df))`` and ``c = cos(theta) ** 2``, ``P(|T| <= |t|)`` is
    ``sin(theta) * (1 + c / 2 + 1*3 / (2*4) c**2 + ...)`` (``df - 2`` in the last factor) for even ``df``, and
    ``(2 / pi) * (theta + sin(theta) cos(theta) (1 + 2 / 3 c + 2*4 / (3*5) c**2 + ...))`` for odd ``df``.

    Example:
        >>> round(t_cdf(4.302653, 2), 6), t_cdf(0.0, 7)
        (0.975, 0.5)
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"t_cdf: 'df' expected a positive int, got {df!r}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for j in range(2, df, 2):
            term *= c * (j - 1) / j
            total += term
        inside = s * total
    else:
        total = 0.0
        if df > 1:
            term, total = 1.0, 1.0
            for j in range(3, df, 2):
                term *= c * (j - 1) / j
                total += term
        inside = 2 / math.pi * (theta + s * math.cos(theta) * total)
    return 0.5 + math.copysign(inside / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``0 < p < 1``), to about 1e-10.

    Example:
        >>> round(t_quantile(0.975, 4), 4), round(t_quantile(0.975, 1), 3), t_quantile(0.5, 3)
        (2.7764, 12.706, 0.0)
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: 'p' expected a probability in (0, 1), got {p!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def mean_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` (one per seed) and its Student t interval at ``level``.

    NaN everywhere when any value is NaN (an empty bin); the bounds are NaN with fewer than two values.

    Example:
        >>> [round(x, 4) for x in mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])]
        [3.0, 1.0368, 4.9632]
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"mean_interval: 'level' expected a number in (0, 1), got {level!r}")
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_interval: 'values' expected at least one value, got none")
    if any(math.isnan(v) for v in xs):
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, math.nan, math.nan
    half = t_quantile((1 + level) / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return mean, mean - half, mean + half
