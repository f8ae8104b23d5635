"""The delayed-feedback protocol of online forecasting (OnlineTSF / Proceed, written from their public
descriptions): one series in time order, a forecast of the next ``H`` rows at every step, and updates only from
windows whose whole horizon has been observed.

Rows, in time order, with borders ``(b0, b1, b2)``: train ``[0, b0)``, validation ``[b0, b1)``, online test
``[b1, b2)`` (20 : 5 : 75, :func:`gdn2ts.forecasting.catalog.online_borders`); values scaled by statistics of
the train rows only. Models are fit offline on the train rows (validation for early stopping), then the online
phase walks the origins ``o = b0 - 1, b0, ...`` in time order. At origin ``o``:

1. row ``o`` is observed (from then on it may be read);
2. the method may update from matured windows: the newest is the window at origin ``o - H``, whose targets are
   rows ``o - H + 1 .. o``; a window at origin ``m`` may be used only once ``m + H <= o``;
3. the method forecasts rows ``o + 1 .. o + H`` from rows up to ``o``.

A forecast is scored on **validation** when its targets lie in validation (origins ``b0 - 1 .. b1 - H - 1``,
``b1 - b0 - H + 1`` forecasts) and on **test** when they lie in test (origins ``b1 - 1 .. b2 - H - 1``,
``b2 - b1 - H + 1`` forecasts); the few forecasts whose horizon straddles the border are made but not scored.
Cumulative MSE and MAE over a part are the sums of squared and absolute errors over its forecasts, steps and
channels divided by their count, on scaled values. A *selection* run stops after the last validation origin and
cannot read any row from ``b1`` on, so hyperparameters are chosen on validation alone; a *test* run continues
through the test part.

Instrumentation: a method reads rows only through a :class:`Feed`, which raises :class:`LeakError` on a row not yet
observed (or, in a selection run, past validation); every update is entered in a :class:`Ledger` with the origins
it learned from, and an update that names a window whose horizon is not yet observed raises :class:`LeakError`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["Split", "LeakError", "Feed", "Ledger", "Update", "OnlineMethod", "PartMetrics", "PhaseResult",
           "run_phase", "select"]


class LeakError(RuntimeError):
    """A method asked for a row that has not been observed at that time (or lies past a selection run's end)."""


@dataclass(frozen=True)
class Split:
    """Borders and horizon of one protocol run.

    Example:
        >>> s = Split(n_rows=14400, borders=(2880, 3600, 14400), horizon=96)
        >>> len(s.val_origins), len(s.test_origins), s.val_origins[0], s.test_origins[-1]
        (625, 10705, 2879, 14303)
    """

    n_rows: int
    """Rows of the series."""
    borders: tuple[int, int, int]
    """End rows of train, validation and test."""
    horizon: int
    """Rows forecast at each step."""

    def __post_init__(self):
        b0, b1, b2 = self.borders
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"Split: 'horizon' expected a positive int, got {self.horizon!r}")
        if not 0 < b0 < b1 < b2 <= self.n_rows:
            raise ValueError(f"Split: 'borders' expected 0 < b0 < b1 < b2 <= {self.n_rows} rows, got {self.borders}")
        if b1 - b0 < self.horizon or b2 - b1 < self.horizon:
            raise ValueError(f"Split: validation ({b1 - b0} rows) and test ({b2 - b1} rows) must each hold a "
                             f"horizon of {self.horizon} rows")

    @property
    def val_origins(self) -> range:
        """Origins whose targets lie in validation."""
        return range(self.borders[0] - 1, self.borders[1] - self.horizon)

    @property
    def test_origins(self) -> range:
        """Origins whose targets lie in test."""
        return range(self.borders[1] - 1, self.borders[2] - self.horizon)

    def origins(self, phase: str) -> range:
        """Every origin of a ``select`` run (through validation) or a ``test`` run (through test)."""
        if phase not in ("select", "test"):
            raise ValueError(f"Split: 'phase' expected 'select' or 'test', got {phase!r}")
        end = self.val_origins if phase == "select" else self.test_origins
        return range(self.borders[0] - 1, end.stop)

    def limit(self, phase: str) -> int:
        """First row a run of ``phase`` may never read."""
        return self.borders[1] if phase == "select" else self.borders[2]


@dataclass(frozen=True)
class Update:
    """One update: at time ``now`` the method learned from the windows at origins ``first .. last``."""

    now: int
    first: int
    last: int


@dataclass
class Ledger:
    """Every update of a run, and the newest row any read asked for."""

    horizon: int
    updates: list[Update] = field(default_factory=list)
    max_read_lag: int = -(10 ** 9)
    """Largest (row read - rows observed) over the run: at most 0 when nothing unobserved was read."""

    def update(self, now: int, first: int, last: int) -> None:
        """Enter an update; :class:`LeakError` when a window's horizon is not yet observed at ``now``."""
        if last + self.horizon > now or first > last:
            raise LeakError(f"update at time {now} learned from origins {first}..{last}: the targets of origin "
                            f"{last} end at row {last + self.horizon}, not yet observed")
        self.updates.append(Update(now, first, last))


class Feed:
    """The rows a method may read: those up to ``now``, never from ``limit`` on.

    Example:
        >>> feed = Feed(np.arange(10.0)[:, None], limit=8, ledger=Ledger(horizon=2))
        >>> feed.advance(4); feed.rows(2, 5)[:, 0].tolist()
        [2.0, 3.0, 4.0]
        >>> feed.rows(4, 6)
        Traceback (most recent call last):
        ...
        gdn2ts.apps.online_protocol.LeakError: rows 4..5 read at time 4: row 5 is not yet observed
    """

    def __init__(self, values: np.ndarray, limit: int, ledger: Ledger):
        self._values, self.limit, self.ledger, self.now = values, limit, ledger, -1

    @property
    def n_channels(self) -> int:
        return self._values.shape[1]

    def advance(self, now: int) -> None:
        """Row ``now`` is observed (time only moves forward; never to or past ``limit``)."""
        if now < self.now or now >= self.limit:
            raise LeakError(f"time {now} is outside this run (now {self.now}, rows below {self.limit})")
        self.now = now

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo .. hi - 1`` (a copy); :class:`LeakError` when one is not yet observed."""
        if lo < 0 or hi <= lo:
            raise ValueError(f"Feed.rows: expected 0 <= lo < hi, got {lo}, {hi}")
        self.ledger.max_read_lag = max(self.ledger.max_read_lag, hi - 1 - self.now)
        if hi - 1 > self.now:
            raise LeakError(f"rows {lo}..{hi - 1} read at time {self.now}: row {hi - 1} is not yet observed")
        return self._values[lo:hi].copy()


class OnlineMethod(Protocol):
    """What the protocol drives: a warm start, then observe, update and forecast at each origin."""

    name: str

    def start(self, feed: Feed) -> None:
        """Before the first origin (rows up to ``feed.now`` = b0 - 2 are readable)."""

    def observe(self, feed: Feed, now: int) -> None:
        """Row ``now`` has just been observed."""

    def update(self, feed: Feed, now: int) -> tuple[int, int] | None:
        """Learn from windows matured by ``now``; returns the origins (first, last) learned from, or None."""

    def forecast(self, feed: Feed, now: int) -> np.ndarray:
        """``[H, C]`` forecast of rows ``now + 1 .. now + H``."""


@dataclass
class PartMetrics:
    """Cumulative errors of the forecasts scored on one part (validation or test)."""

    horizon: int
    sse: float = 0.0
    sae: float = 0.0
    n: int = 0
    forecasts: int = 0
    step_sse: np.ndarray | None = None
    step_n: np.ndarray | None = None
    curve: list[float] = field(default_factory=list)
    """Cumulative MSE after every ``curve_every``-th forecast (and the last)."""
    daily: list[float] = field(default_factory=list)
    """MSE of each block of ``curve_every`` consecutive forecasts."""
    _block: list[float] = field(default_factory=lambda: [0.0, 0])

    def add(self, err: np.ndarray, curve_every: int) -> None:
        ok = ~np.isnan(err)
        e = np.where(ok, err, 0.0)
        if self.step_sse is None:
            self.step_sse, self.step_n = np.zeros(self.horizon), np.zeros(self.horizon, dtype=np.int64)
        sq = float((e * e).sum())
        self.sse, self.sae, self.n = self.sse + sq, self.sae + float(np.abs(e).sum()), self.n + int(ok.sum())
        self.step_sse += (e * e).sum(1)
        self.step_n += ok.sum(1)
        self.forecasts += 1
        self._block[0] += sq
        self._block[1] += int(ok.sum())
        if self.forecasts % curve_every == 0:
            self.curve.append(self.mse)
            self.daily.append(self._block[0] / max(self._block[1], 1))
            self._block = [0.0, 0]

    @property
    def mse(self) -> float:
        return self.sse / self.n if self.n else float("nan")

    @property
    def mae(self) -> float:
        return self.sae / self.n if self.n else float("nan")

    def summary(self) -> dict:
        step_mse = (self.step_sse / np.maximum(self.step_n, 1)).tolist() if self.step_sse is not None else []
        return {"mse": self.mse, "mae": self.mae, "forecasts": self.forecasts, "values": self.n,
                "step_mse": step_mse, "cumulative_mse": self.curve + ([self.mse] if self.forecasts else []),
                "block_mse": self.daily}


@dataclass
class PhaseResult:
    """What one run of a method gave."""

    name: str
    phase: str
    val: PartMetrics
    test: PartMetrics | None
    ledger: Ledger
    seconds: float
    forecasts: np.ndarray | None = None
    """``[origins, H, C]`` every forecast of the run, in origin order (only with ``keep_forecasts``)."""

    def summary(self) -> dict:
        ups = self.ledger.updates
        out = {"method": self.name, "phase": self.phase, "seconds": self.seconds, "val": self.val.summary(),
               "updates": len(ups), "max_read_lag": self.ledger.max_read_lag,
               "max_update_lag": max((u.last + self.ledger.horizon - u.now for u in ups), default=None)}
        if self.test is not None:
            out["test"] = self.test.summary()
        return out


def run_phase(method: OnlineMethod, values: np.ndarray, split: Split, phase: str = "test", curve_every: int = 24,
              keep_forecasts: bool = False, progress=None) -> PhaseResult:
    """Drive ``method`` over the online phase of ``values`` ``[rows, C]`` (scaled): a ``select`` run through
    validation or a ``test`` run through test. ``progress(done, total)`` is called every ``curve_every`` origins.

    Example:
        >>> from gdn2ts.apps.online_methods import SeasonalNaive
        >>> x = np.tile(np.arange(4.0), 10)[:, None]             # a period of 4, repeated
        >>> r = run_phase(SeasonalNaive(period=4, horizon=2), x, Split(40, (12, 20, 40), 2))
        >>> r.val.forecasts, r.test.forecasts, r.test.mse
        (7, 19, 0.0)
    """
    if values.ndim != 2 or values.shape[0] != split.n_rows:
        raise ValueError(f"run_phase: expected values [{split.n_rows}, C], got {values.shape}")
    H = split.horizon
    ledger = Ledger(H)
    feed = Feed(values, split.limit(phase), ledger)
    val, test = PartMetrics(H), PartMetrics(H) if phase == "test" else None
    val_set, test_set = split.val_origins, split.test_origins
    origins = split.origins(phase)
    kept = np.empty((len(origins), H, values.shape[1])) if keep_forecasts else None
    start = time.perf_counter()
    feed.advance(split.borders[0] - 2)
    method.start(feed)
    for i, o in enumerate(origins):
        feed.advance(o)
        method.observe(feed, o)
        learned = method.update(feed, o)
        if learned is not None:
            ledger.update(o, *learned)
        f = np.asarray(method.forecast(feed, o), dtype=np.float64)
        if f.shape != (H, values.shape[1]):
            raise ValueError(f"{method.name}: forecast expected shape {(H, values.shape[1])}, got {f.shape}")
        if kept is not None:
            kept[i] = f
        # the scorer (not the method) reads the targets
        part = val if o in val_set else test if test is not None and o in test_set else None
        if part is not None:
            part.add(f - values[o + 1:o + 1 + H], curve_every)
        if progress is not None and (i + 1) % curve_every == 0:
            progress(i + 1, len(origins))
    return PhaseResult(method.name, phase, val, test, ledger, time.perf_counter() - start, kept)


def select(make, grid, values: np.ndarray, split: Split, curve_every: int = 24) -> tuple[float, list[dict]]:
    """The value of ``grid`` whose ``select`` run has the lowest validation MSE (the first on a tie), and every
    candidate's validation metrics; ``make(value)`` builds a fresh method."""
    table = []
    for value in grid:
        r = run_phase(make(value), values, split, "select", curve_every)
        table.append({"value": value, "val_mse": r.val.mse, "val_mae": r.val.mae, "seconds": r.seconds,
                      "updates": len(r.ledger.updates)})
    best = min(range(len(table)), key=lambda i: (table[i]["val_mse"], i))
    return table[best]["value"], table
