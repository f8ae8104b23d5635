"""The methods run on the online protocol (:mod:`gdn2ts.apps.online_protocol`), each reading rows only through the
protocol's :class:`~gdn2ts.apps.online_protocol.Feed`:

- :class:`SeasonalNaive`: the last observed day repeated.
- :class:`WindowModel`: a window forecaster fit offline (the GDN-2 forecaster of ``gdn2ts.forecasting``) over the
  last ``lookback`` rows, frozen, or with online gradient descent: at each origin ``o`` one Adam step on the window
  that has just matured (origin ``o - H``: inputs up to ``o - H``, targets ``o - H + 1 .. o``).
- :class:`RunnerModel`: the streaming encoder in an :class:`~gdn2ts.streaming.OnlineRunner` (per-stream state
  carried across the whole series, one ``observe`` per row), frozen, or learning through ``runner.learn`` from the
  windows the runner itself finds matured (``LearnConfig.target_tolerance`` 0: on the hourly grid exactly those
  of origin ``o - H`` and before).
"""

from __future__ import annotations

import copy

import numpy as np
import polars as pl
import torch

from gdn2ts.apps.online_protocol import Feed
from gdn2ts.models import StreamEncoder
from gdn2ts.models.forecaster import forecast_loss
from gdn2ts.streaming import LearnConfig, MemoryStore, OnlineRunner

__all__ = ["SeasonalNaive", "WindowModel", "RunnerModel"]


class SeasonalNaive:
    """Step ``k`` of the forecast at ``o`` is the value one period before its target, within the last observed
    period: row ``o - period + 1 + (k - 1) % period``.

    Example:
        >>> from gdn2ts.apps.online_protocol import Feed, Ledger
        >>> feed = Feed(np.arange(10.0)[:, None], limit=10, ledger=Ledger(horizon=3)); feed.advance(6)
        >>> SeasonalNaive(period=2, horizon=3).forecast(feed, 6)[:, 0].tolist()
        [5.0, 6.0, 5.0]
    """

    def __init__(self, period: int, horizon: int, name: str = "seasonal_naive"):
        self.period, self.horizon, self.name = period, horizon, name

    def start(self, feed: Feed) -> None:
        pass

    def observe(self, feed: Feed, now: int) -> None:
        pass

    def update(self, feed: Feed, now: int) -> None:
        return None

    def forecast(self, feed: Feed, now: int) -> np.ndarray:
        last = feed.rows(now - self.period + 1, now + 1)
        return last[np.arange(self.horizon) % self.period]


class WindowModel:
    """A window forecaster (``net(values [1, L, C], times [1, L])`` returning ``forecast`` ``[1, H, C, Q]`` and
    ``point`` ``[1, H, C]``), frozen (``lr`` None) or updated online by one Adam step per matured window on the
    loss it was fit with (MSE on the median plus ``quantile_weight`` times the pinball loss).

    The net is copied: the one given is never changed. ``seed`` fixes the dropout masks of the updates, so a run
    repeats exactly.
    """

    def __init__(self, net: torch.nn.Module, lookback: int, horizon: int, quantiles, lr: float | None = None,
                 quantile_weight: float = 0.1, seed: int = 0, name: str = "forecaster"):
        self.net = copy.deepcopy(net).eval()
        self.L, self.H, self.quantiles, self.lr = lookback, horizon, tuple(quantiles), lr
        self.quantile_weight, self.seed, self.name = quantile_weight, seed, name
        self.times = torch.arange(lookback, dtype=torch.float64)[None]
        self.opt = None if lr is None else torch.optim.Adam(self.net.parameters(), lr=lr)
        self.dtype = next(self.net.parameters()).dtype

    def start(self, feed: Feed) -> None:
        torch.manual_seed(self.seed)

    def observe(self, feed: Feed, now: int) -> None:
        pass

    def _window(self, feed: Feed, origin: int) -> torch.Tensor:
        return torch.from_numpy(feed.rows(origin - self.L + 1, origin + 1)).to(self.dtype)[None]

    def update(self, feed: Feed, now: int) -> tuple[int, int] | None:
        origin = now - self.H
        if self.opt is None or origin - self.L + 1 < 0:
            return None
        x = self._window(feed, origin)
        y = torch.from_numpy(feed.rows(origin + 1, now + 1)).to(self.dtype)[None]
        self.net.train()
        with torch.enable_grad():
            out = self.net(x, self.times)
            loss = forecast_loss(out["forecast"], y, self.quantiles, self.quantile_weight, "mse")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self.opt.step()
        self.net.eval()
        return origin, origin

    @torch.no_grad()
    def forecast(self, feed: Feed, now: int) -> np.ndarray:
        return self.net(self._window(feed, now), self.times)["point"][0].double().numpy()


class RunnerModel:
    """The streaming encoder served by an :class:`OnlineRunner` over a :class:`MemoryStore`, one stream: the rows
    before the first origin are observed in one call (the runner's prefill), then one ``observe`` per origin and
    the median of ``forecast``. With ``learning`` the runner calls ``learn`` at every origin and the origins it took
    are read back with ``learned_through``. The encoder is copied: the one given is never changed.
    """

    def __init__(self, encoder: StreamEncoder, channels, learning: LearnConfig | None = None, name: str = "runner"):
        self.encoder, self.channels, self.learning, self.name = copy.deepcopy(encoder), list(channels), learning, name
        self.runner: OnlineRunner | None = None
        self.through = -np.inf

    def _frame(self, times: np.ndarray, values: np.ndarray) -> pl.DataFrame:
        return pl.DataFrame({"stream": ["s"] * len(times), "time": times.astype(np.float64),
                             **{c: values[:, i] for i, c in enumerate(self.channels)}})

    def start(self, feed: Feed) -> None:
        self.runner = OnlineRunner(self.encoder, MemoryStore(), self.channels, learning=self.learning)
        if feed.now >= 0:
            self.runner.observe(self._frame(np.arange(feed.now + 1.0), feed.rows(0, feed.now + 1)))

    def observe(self, feed: Feed, now: int) -> None:
        self.runner.observe(self._frame(np.array([float(now)]), feed.rows(now, now + 1)))

    def update(self, feed: Feed, now: int) -> tuple[int, int] | None:
        if self.learning is None or self.runner.learn(["s"]).steps == 0:
            return None
        before, self.through = self.through, float(self.runner.learned_through(["s"])[0])
        first = max(before + 1, self.through - self.learning.context + 1, 0)
        return int(first), int(self.through)

    def forecast(self, feed: Feed, now: int) -> np.ndarray:
        H = self.encoder.config.horizon
        return self.runner.forecast(["s"])["q0.5"].to_numpy().reshape(H, len(self.channels))
