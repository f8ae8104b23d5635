"""Seeded synthetic streams for the recall probes: rare regimes that recur after long gaps, and a delayed
cross-channel lookup (a numeric multi-key needle task).

Both generators are pure functions of ``(config, seed, n_streams)``: the same arguments give the same tensors,
bit for bit. Values are ``[N, T, channels]`` float32 with NaN for missing channels; timestamps ``[N, T]`` float64,
strictly increasing, with intervals drawn uniformly from ``[dt_min, dt_max]`` (irregular sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["RegimeConfig", "RegimeBatch", "make_regimes", "regime_codes", "NeedleConfig", "NeedleBatch", "make_needles"]


def _positive_int(owner: str, name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: '{name}' expected an int >= {minimum}, got {value!r}")


def _check_dt(owner: str, dt_min, dt_max) -> None:
    if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float)) and math.isfinite(dt_max)
            and 0 < dt_min <= dt_max):
        raise ValueError(f"{owner}: 'dt_min', 'dt_max' expected 0 < dt_min <= dt_max (finite), "
                         f"got {dt_min!r}, {dt_max!r}")


def _times(rng: np.random.Generator, n: int, length: int, dt_min: float, dt_max: float) -> np.ndarray:
    """``[n, length]`` float64 timestamps from 0 with uniform intervals in ``[dt_min, dt_max]``."""
    dt = rng.uniform(dt_min, dt_max, size=(n, length))
    dt[:, 0] = 0.0
    return np.cumsum(dt, axis=1)


# ----------------------------------------------------------------------------------------------------------------
# rare regimes


@dataclass(frozen=True)
class RegimeConfig:
    """Streams of a background process with rare regimes (one fixed cross-channel pattern each, drawn per stream)
    that recur after long, random gaps.

    An episode of a regime lasts ``episode_steps`` steps. Its first step (the onset) shows only the cue channels
    (``0 .. n_cue_channels - 1``) at the regime's pattern; the following steps show the whole pattern plus noise.
    Forecasting the other channels from the onset means recalling the stream's own earlier episode of that regime:
    patterns are drawn per stream, so no weight can memorize them.
    """

    n_channels: int = 6
    """Observed channels per step."""
    n_cue_channels: int = 2
    """Channels shown at an episode's onset (they identify the regime); the rest are the recalled channels."""
    n_regimes: int = 3
    """Distinct regimes per stream."""
    length: int = 256
    """Steps per stream."""
    episode_steps: int = 4
    """Steps per episode (the onset plus ``episode_steps - 1`` steps at the full pattern)."""
    min_gap: int = 16
    """Fewest background steps between two consecutive episodes (of any regimes), and before the first."""
    max_gap: int = 64
    """Most background steps between two consecutive episodes; gaps are uniform in ``[min_gap, max_gap]``."""
    dt_min: float = 0.5
    """Shortest interval between two timestamps."""
    dt_max: float = 1.5
    """Longest interval between two timestamps."""
    missing_rate: float = 0.2
    """Chance that a channel is missing at a step, independently; onsets show exactly the cue channels, and every
    other step keeps at least one recalled channel observed (so an onset is recognisable from the mask)."""
    amplitude: float = 2.0
    """Standard deviation of the regime patterns' entries."""
    background_std: float = 1.0
    """Stationary standard deviation of the background AR(1) process (per channel)."""
    background_phi: float = 0.9
    """Background autocorrelation over one unit of time (over ``dt`` it is ``phi ** dt``)."""
    noise_std: float = 0.1
    """Observation noise added to every value."""
    shared_cues: bool = False
    """The cue channels of regime ``r`` take the same values in every stream and seed (a fixed code per regime,
    drawn once with the amplitude); only the recalled channels are drawn per stream. The onset then names its
    regime in a way the weights can learn, and the probe measures the recall of the stream's own pattern alone.
    False: cue values are drawn per stream too, so recognising the regime is itself a lookup of earlier values."""
    quiet_cues: bool = False
    """The cue channels are missing between episodes: they light up only while a regime is on (like an event
    flag), so the steps of an episode stand out by which channels are observed. False: they carry the background
    between episodes like every channel."""

    def __post_init__(self):
        owner = "RegimeConfig"
        for name in ("shared_cues", "quiet_cues"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}: '{name}' expected a bool, got {getattr(self, name)!r}")
        for name in ("n_channels", "n_regimes", "length", "min_gap", "max_gap"):
            _positive_int(owner, name, getattr(self, name))
        _positive_int(owner, "n_cue_channels", self.n_cue_channels)
        _positive_int(owner, "episode_steps", self.episode_steps, 2)
        if self.n_cue_channels >= self.n_channels:
            raise ValueError(f"{owner}: 'n_cue_channels' expected fewer than n_channels={self.n_channels}, "
                             f"got {self.n_cue_channels}")
        if self.max_gap < self.min_gap:
            raise ValueError(f"{owner}: 'max_gap' expected >= min_gap={self.min_gap}, got {self.max_gap}")
        _check_dt(owner, self.dt_min, self.dt_max)
        if not 0.0 <= self.missing_rate < 1.0:
            raise ValueError(f"{owner}: 'missing_rate' expected a value in [0, 1), got {self.missing_rate!r}")
        if not 0.0 <= self.background_phi < 1.0:
            raise ValueError(f"{owner}: 'background_phi' expected a value in [0, 1), got {self.background_phi!r}")
        for name in ("amplitude", "background_std", "noise_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{owner}: '{name}' expected a finite number >= 0, got {value!r}")


class RegimeBatch(NamedTuple):
    """``N`` streams of :func:`make_regimes`."""

    values: torch.Tensor
    """``[N, T, C]`` float32 observations, NaN where missing."""
    times: torch.Tensor
    """``[N, T]`` float64 timestamps, strictly increasing."""
    regime: torch.Tensor
    """``[N, T]`` int64 regime of each step (``-1``: background)."""
    onset: torch.Tensor
    """``[N, T]`` bool: first step of an episode."""
    since_last: torch.Tensor
    """``[N, T]`` float64 at onsets: time since the last step of the previous episode of the same regime
    (``inf`` at its first occurrence); NaN elsewhere."""
    patterns: torch.Tensor
    """``[N, R, C]`` float32 each stream's regime patterns (the noiseless values of an episode)."""


# the generator of the shared cue codes: fixed, apart from every stream's seed
_CODE_SEED = 20_261_208


def regime_codes(config: RegimeConfig) -> np.ndarray:
    """``[n_regimes, n_cue_channels]`` the cue values every stream shares with ``shared_cues``: Gaussian with the
    patterns' amplitude, from a fixed generator (the same for every seed).

    Example:
        >>> regime_codes(RegimeConfig()).shape
        (3, 2)
    """
    rng = np.random.default_rng(_CODE_SEED)
    return rng.normal(size=(config.n_regimes, config.n_cue_channels)) * config.amplitude


def make_regimes(config: RegimeConfig, seed: int, n_streams: int) -> RegimeBatch:
    """``n_streams`` streams of rare, recurring regimes over an AR(1) background.

    Example:
        >>> b = make_regimes(RegimeConfig(length=64, min_gap=8, max_gap=16), seed=0, n_streams=3)
        >>> b.values.shape, b.times.dtype, bool(b.onset.any())
        (torch.Size([3, 64, 6]), torch.float64, True)
        >>> bool(torch.equal(b.regime, make_regimes(RegimeConfig(length=64, min_gap=8, max_gap=16), 0, 3).regime))
        True
    """
    cfg = config
    _positive_int("make_regimes", "n_streams", n_streams)
    rng = np.random.default_rng(seed)
    n, T, C, R, E = n_streams, cfg.length, cfg.n_channels, cfg.n_regimes, cfg.episode_steps
    times = _times(rng, n, T, cfg.dt_min, cfg.dt_max)
    patterns = rng.normal(size=(n, R, C)) * cfg.amplitude
    if cfg.shared_cues:
        patterns[:, :, :cfg.n_cue_channels] = regime_codes(cfg)

    # background AR(1) sampled at irregular times: x_t = phi^dt x_{t-1} + innovation, stationary std kept
    dt = np.diff(times, axis=1, prepend=times[:, :1])
    decay = cfg.background_phi ** dt
    innov = rng.normal(size=(n, T, C)) * cfg.background_std * np.sqrt(1.0 - decay**2)[..., None]
    background = np.empty((n, T, C))
    background[:, 0] = rng.normal(size=(n, C)) * cfg.background_std
    for t in range(1, T):
        background[:, t] = decay[:, t, None] * background[:, t - 1] + innov[:, t]

    regime = np.full((n, T), -1, dtype=np.int64)
    onset = np.zeros((n, T), dtype=bool)
    since_last = np.full((n, T), np.nan)
    for s in range(n):
        pos = int(rng.integers(cfg.min_gap, cfg.max_gap + 1))
        last_end = np.full(R, np.nan)  # time of the last step of each regime's previous episode
        while pos + E <= T:
            r = int(rng.integers(R))
            regime[s, pos:pos + E] = r
            onset[s, pos] = True
            since_last[s, pos] = times[s, pos] - last_end[r] if np.isfinite(last_end[r]) else np.inf
            last_end[r] = times[s, pos + E - 1]
            pos += E + int(rng.integers(cfg.min_gap, cfg.max_gap + 1))

    in_episode = regime >= 0
    clean = np.where(in_episode[..., None], np.take_along_axis(patterns, regime.clip(min=0)[..., None], 1),
                     background)
    values = clean + rng.normal(size=(n, T, C)) * cfg.noise_std
    missing = rng.random((n, T, C)) < cfg.missing_rate
    cue = np.arange(C) < cfg.n_cue_channels
    missing[onset] = ~cue
    if cfg.quiet_cues:
        missing[~in_episode] |= cue
    # off the onsets at least one recalled channel stays observed, so "only cues observed" marks an onset
    rest = ~onset & missing[..., ~cue].all(-1)
    keep = rng.integers(cfg.n_cue_channels, C, size=(n, T))
    rows, cols = np.nonzero(rest)
    missing[rows, cols, keep[rows, cols]] = False
    values[missing] = np.nan
    return RegimeBatch(torch.from_numpy(values.astype(np.float32)), torch.from_numpy(times),
                       torch.from_numpy(regime), torch.from_numpy(onset), torch.from_numpy(since_last),
                       torch.from_numpy(patterns.astype(np.float32)))


# ----------------------------------------------------------------------------------------------------------------
# delayed cross-channel lookup


@dataclass(frozen=True)
class NeedleConfig:
    """A numeric multi-key lookup: ``n_pairs`` key -> value associations shown at the start, queried much later.

    Channels: ``n_key_channels`` key channels, then ``n_value_channels`` value channels, then one distractor.
    Steps ``0 .. n_pairs - 1`` show a key and its value (distractor missing). Every later step shows only the
    distractor (noise), except query steps, which show a key that was paired earlier with its value missing:
    the answer is the value paired with that key (read from the reconstruction of the missing channels).
    """

    n_key_channels: int = 4
    """Channels of a key (a Gaussian vector)."""
    n_value_channels: int = 1
    """Channels of a value (Gaussian)."""
    n_pairs: int = 4
    """Associations shown per stream."""
    n_queries: int = 8
    """Query steps per stream (each asks for one of the pairs, at distinct steps)."""
    min_delay: int = 8
    """Fewest steps between a pair's step and a query of it (at least n_pairs)."""
    max_delay: int = 128
    """Most steps between a pair's step and a query of it."""
    dt_min: float = 0.5
    """Shortest interval between two timestamps."""
    dt_max: float = 1.5
    """Longest interval between two timestamps."""
    distractor_std: float = 1.0
    """Standard deviation of the distractor channel."""

    def __post_init__(self):
        owner = "NeedleConfig"
        for name in ("n_key_channels", "n_value_channels", "n_pairs", "n_queries", "min_delay", "max_delay"):
            _positive_int(owner, name, getattr(self, name))
        if self.min_delay < self.n_pairs:
            raise ValueError(f"{owner}: 'min_delay' expected >= n_pairs={self.n_pairs} (queries come after every "
                             f"pair), got {self.min_delay}")
        if self.max_delay < self.min_delay:
            raise ValueError(f"{owner}: 'max_delay' expected >= min_delay={self.min_delay}, got {self.max_delay}")
        if self.n_queries > self.max_delay - self.min_delay + 1:
            raise ValueError(f"{owner}: 'n_queries' expected at most max_delay - min_delay + 1 = "
                             f"{self.max_delay - self.min_delay + 1} (distinct query steps), got {self.n_queries}")
        _check_dt(owner, self.dt_min, self.dt_max)
        if not (math.isfinite(self.distractor_std) and self.distractor_std >= 0):
            raise ValueError(f"{owner}: 'distractor_std' expected a finite number >= 0, got {self.distractor_std!r}")

    @property
    def n_channels(self) -> int:
        """Keys, values and the distractor."""
        return self.n_key_channels + self.n_value_channels + 1

    @property
    def length(self) -> int:
        """Steps per stream: the pairs plus the longest delay."""
        return self.n_pairs + self.max_delay


class NeedleBatch(NamedTuple):
    """``N`` streams of :func:`make_needles`."""

    values: torch.Tensor
    """``[N, T, C]`` float32 observations, NaN where missing."""
    times: torch.Tensor
    """``[N, T]`` float64 timestamps, strictly increasing."""
    query: torch.Tensor
    """``[N, T]`` bool: query steps."""
    pair: torch.Tensor
    """``[N, T]`` int64: the pair asked for at a query step (``-1`` elsewhere)."""
    target: torch.Tensor
    """``[N, T, n_value_channels]`` float32: the value asked for at query steps, NaN elsewhere."""
    delay: torch.Tensor
    """``[N, T]`` float64 at query steps: time since the pair was shown; NaN elsewhere."""
    delay_steps: torch.Tensor
    """``[N, T]`` int64 at query steps: steps since the pair was shown; ``-1`` elsewhere."""
    pair_values: torch.Tensor
    """``[N, n_pairs, n_value_channels]`` float32: every pair's value (to score nearest-value accuracy)."""


def make_needles(config: NeedleConfig, seed: int, n_streams: int) -> NeedleBatch:
    """``n_streams`` streams of the delayed multi-key lookup.

    Example:
        >>> b = make_needles(NeedleConfig(n_pairs=2, n_queries=3, min_delay=4, max_delay=10), seed=1, n_streams=2)
        >>> b.values.shape, int(b.query.sum()), int(b.delay_steps.max()) <= 10
        (torch.Size([2, 12, 6]), 6, True)
    """
    cfg = config
    _positive_int("make_needles", "n_streams", n_streams)
    rng = np.random.default_rng(seed)
    n, T, P, K, V = n_streams, cfg.length, cfg.n_pairs, cfg.n_key_channels, cfg.n_value_channels
    times = _times(rng, n, T, cfg.dt_min, cfg.dt_max)
    keys = rng.normal(size=(n, P, K))
    vals = rng.normal(size=(n, P, V))
    values = np.full((n, T, cfg.n_channels), np.nan)
    values[:, :P, :K] = keys
    values[:, :P, K:K + V] = vals
    values[:, P:, -1] = rng.normal(size=(n, T - P)) * cfg.distractor_std

    query = np.zeros((n, T), dtype=bool)
    pair = np.full((n, T), -1, dtype=np.int64)
    for s in range(n):
        asked = 0
        while asked < cfg.n_queries:
            j = int(rng.integers(P))
            pos = j + int(rng.integers(cfg.min_delay, cfg.max_delay + 1))
            if query[s, pos]:
                continue
            query[s, pos], pair[s, pos] = True, j
            asked += 1
    rows, cols = np.nonzero(query)
    values[rows, cols, :] = np.nan
    values[rows, cols, :K] = keys[rows, pair[rows, cols]]
    target = np.full((n, T, V), np.nan)
    target[rows, cols] = vals[rows, pair[rows, cols]]
    delay = np.full((n, T), np.nan)
    delay[rows, cols] = times[rows, cols] - times[rows, pair[rows, cols]]
    delay_steps = np.full((n, T), -1, dtype=np.int64)
    delay_steps[rows, cols] = cols - pair[rows, cols]
    return NeedleBatch(torch.from_numpy(values.astype(np.float32)), torch.from_numpy(times),
                       torch.from_numpy(query), torch.from_numpy(pair), torch.from_numpy(target.astype(np.float32)),
                       torch.from_numpy(delay), torch.from_numpy(delay_steps),
                       torch.from_numpy(vals.astype(np.float32)))
