"""River-style verbs for one stream at a time, the bodies of :class:`~gdn2ts.streaming.OnlineRunner`'s
``observe_one``, ``learn_one`` (observe one row, then learn from what matured) and ``forecast_one``.

They take plain Python values (a timestamp, a dict of channel values) rather than batches, check them with errors
that name the channel, covariate or stream, and go through the runner's public batched calls only, so they keep
every guarantee of those (durable when they return; a rejected row changes nothing).
"""

from __future__ import annotations

import datetime as dt
import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING

import polars as pl

from gdn2ts.streaming.learn import LearnResult

if TYPE_CHECKING:
    from gdn2ts.streaming.runner import ObserveResult, OnlineRunner

__all__ = ["observe_one", "learn_one", "forecast_one"]


def learn_one(runner: OnlineRunner, stream_id: str, timestamp: float, values: Mapping[str, float | None],
              covariates: Mapping[str, float] | None = None) -> LearnResult:
    """Observe one row of one stream, then :meth:`learn` from what matured for it (river's ``learn_one``).

    ``timestamp`` is a number in model time units, or, on a runner with units (``from_checkpoint``), in the
    user's timestamp type (a ``datetime``, a ``date``, an ISO-8601 string, or a number in the stated unit);
    ``values`` maps channel names to numbers (None or NaN: missing; absent channels are missing; in the user's
    units on a runner with units);
    ``covariates`` maps every covariate name to a number. An unknown channel or covariate, a non-numeric
    value, inf, or a timestamp not after the stream's last observation raise ``ValueError`` naming it, and
    change nothing.

    Example:
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> from gdn2ts.streaming import MemoryStore, OnlineRunner
        >>> from gdn2ts.streaming.learn import LearnConfig
        >>> enc = StreamEncoder(EncoderConfig(n_channels=2, hidden_size=8, head_dim=4, horizon=2))
        >>> runner = OnlineRunner(enc, MemoryStore(), ["load", "temp"],
        ...                       learning=LearnConfig(history=16, context=8, min_context=0))
        >>> [runner.learn_one("a", float(t), {"load": t / 10, "temp": None}).steps for t in range(1, 6)]
        [0, 0, 0, 1, 1]
        >>> runner.learn_one("a", 6.0, {"pressure": 1.0})
        Traceback (most recent call last):
        ...
        ValueError: learn_one: unknown channel 'pressure' (channels are ['load', 'temp'])
    """
    if runner.learning is None:
        raise ValueError("learn_one: this runner does not learn; open it with learning=LearnConfig(...) on a new "
                         "store")
    observe_one(runner, stream_id, timestamp, values, covariates, op="learn_one")
    return runner.learn([stream_id])


def observe_one(runner: OnlineRunner, stream_id: str, timestamp: float, values: Mapping[str, float | None],
                covariates: Mapping[str, float] | None = None, op: str = "observe_one") -> ObserveResult:
    """Observe one row of one stream (arguments as :meth:`learn_one`); a rejected row raises ``ValueError``."""
    if not isinstance(stream_id, str):
        raise ValueError(f"{op}: 'stream_id' expected a string, got {type(stream_id).__name__}")
    stamp = isinstance(timestamp, (dt.date, str)) and runner.units is not None
    if not stamp and (isinstance(timestamp, bool) or not isinstance(timestamp, numbers.Real) or
                      not math.isfinite(timestamp)):
        kinds = "a finite number" if runner.units is None else "a date-time, a date, a string or a finite number"
        raise ValueError(f"{op}: 'timestamp' expected {kinds}, got {timestamp!r}")
    row = {runner.id_column: stream_id, runner.time_column: timestamp if stamp else float(timestamp)}
    for kind, given, names in (("channel", values, runner.channels), ("covariate", covariates or {},
                                                                    runner.covariates)):
        if not isinstance(given, Mapping):
            raise ValueError(f"{op}: {kind} values expected a mapping of name -> number, got "
                             f"{type(given).__name__}")
        for name, v in given.items():
            if name not in names:
                raise ValueError(f"{op}: unknown {kind} {name!r} ({kind}s are {names})")
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise ValueError(f"{op}: {kind} {name!r} expected a number or None, got {v!r}")
        # a runner with units derives the calendar covariates a row lacks
        names = [n for n in names if n in given] if kind == "covariate" and runner.units is not None else names
        row.update({name: None if given.get(name) is None else float(given[name]) for name in names})
    schema = {runner.id_column: pl.String, **dict.fromkeys(list(row)[1:], pl.Float64)}
    if stamp:
        schema[runner.time_column] = pl.String if isinstance(timestamp, str) else None
    result = runner.observe(pl.DataFrame([row], schema=schema))
    if result.rejected:
        raise ValueError(f"{op}: {result.rejected[0][2]}")
    return result


def forecast_one(runner: OnlineRunner, stream_id: str, horizon: int | None = None
                 ) -> dict[str, list[dict[float, float]]]:
    """One stream's forecast from its last observation, as ``{channel: [{level: value}, ...]}`` with one dict
    per step (the first ``horizon`` steps; all by default), in the runner's units (river's ``forecast``): the
    user's on a runner opened ``from_checkpoint``, else the model's.

    Example:
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> from gdn2ts.streaming import MemoryStore, OnlineRunner
        >>> enc = StreamEncoder(EncoderConfig(n_channels=1, hidden_size=8, head_dim=4, horizon=3))
        >>> runner = OnlineRunner(enc, MemoryStore(), ["load"])
        >>> _ = runner.observe_one("a", 1.0, {"load": 0.5})
        >>> out = runner.forecast_one("a", horizon=2)
        >>> len(out["load"]), sorted(out["load"][0])
        (2, [0.1, 0.5, 0.9])
        >>> runner.forecast_one("b")
        Traceback (most recent call last):
        ...
        gdn2ts.streaming.runner.UnknownStreamError: unknown stream 'b'
    """
    if not isinstance(stream_id, str):
        raise ValueError(f"forecast_one: 'stream_id' expected a string, got {type(stream_id).__name__}")
    H = runner.encoder.config.horizon
    if horizon is None:
        horizon = H
    if isinstance(horizon, bool) or not isinstance(horizon, int) or not 1 <= horizon <= H:
        raise ValueError(f"forecast_one: 'horizon' expected an int in [1, {H}], got {horizon!r}")
    table = runner.forecast([stream_id]).filter(pl.col("step") <= horizon)
    levels = runner.encoder.config.quantiles
    out: dict[str, list[dict[float, float]]] = {c: [] for c in runner.channels}
    for row in table.iter_rows(named=True):
        out[row["channel"]].append({q: row[f"q{q:g}"] for q in levels})
    return out
