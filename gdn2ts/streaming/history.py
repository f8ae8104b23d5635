"""Per-stream learning histories and the windows learned from them (see :mod:`gdn2ts.streaming.learn`).

With learning on, every stream's state carries its last ``history`` observed rows and ``learn.through``, the
timestamp of the last forecast origin already used for learning: components of the working set like the layer
states, journaled, snapshotted, spilled and replayed with them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    from gdn2ts.streaming.learn import LearnConfig

__all__ = ["THROUGH", "history_template", "append_history", "LearnPlan", "plan_windows"]

THROUGH = "learn.through"
"""State component: timestamp of the last forecast origin used for learning (``-inf`` before the first)."""


def history_template(config: LearnConfig, n_channels: int, n_covariates: int, device) -> dict[str, torch.Tensor]:
    """The learning components of a stream that has seen nothing, each ``[1, *shape]``: ``hist.time``
    ``[history]``, ``hist.values`` ``[history, channels]``, ``hist.covariates`` ``[history, covariates]`` (only
    with covariates), all float64, and :data:`THROUGH` ``[]`` float64.

    Example:
        >>> from gdn2ts.streaming.learn import LearnConfig
        >>> t = history_template(LearnConfig(history=8, context=4, min_context=1), 2, 0, "cpu")
        >>> {k: tuple(v.shape) for k, v in t.items()}
        {'hist.time': (1, 8), 'hist.values': (1, 8, 2), 'learn.through': (1,)}
    """
    f64 = dict(dtype=torch.float64, device=device)
    out = {"hist.time": torch.full((1, config.history), -math.inf, **f64),
           "hist.values": torch.full((1, config.history, n_channels), math.nan, **f64)}
    if n_covariates:
        out["hist.covariates"] = torch.zeros(1, config.history, n_covariates, **f64)
    out[THROUGH] = torch.full((1,), -math.inf, **f64)
    return out


def append_history(hist: dict[str, torch.Tensor], times: torch.Tensor, values: torch.Tensor,
                   covariates: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The histories of ``n`` streams after one more row each: ``times`` ``[n]``, ``values`` ``[n, C]`` (NaN
    missing), ``covariates`` ``[n, K]`` or None. A row with nothing observed is not kept (the encoder skips it).

    Example:
        >>> import torch
        >>> from gdn2ts.streaming.learn import LearnConfig
        >>> h = history_template(LearnConfig(history=3, context=2, min_context=0), 1, 0, "cpu")
        >>> h = append_history(h, torch.tensor([5.0]).double(), torch.tensor([[0.5]]).double(), None)
        >>> h["hist.time"].tolist(), h["hist.values"][0, :, 0].tolist()
        ([[-inf, -inf, 5.0]], [nan, nan, 0.5])
    """
    observed = ~torch.isnan(values).all(-1)
    rows = {"hist.time": times, "hist.values": values}
    if "hist.covariates" in hist:
        rows["hist.covariates"] = covariates
    out = {}
    for name, row in rows.items():
        old = hist[name]
        # oldest first: drop the first slot, append the row at the end
        shifted = torch.cat([old[:, 1:], row.to(old.dtype)[:, None]], dim=1)
        keep = observed.view(-1, *([1] * (old.dim() - 1)))
        out[name] = torch.where(keep, shifted, old)
    return out


class LearnPlan(NamedTuple):
    """Padded learning windows of ``B`` streams (``T`` rows, ``H`` steps, ``C`` channels)."""

    rows: np.ndarray
    """``[B]`` index of each window's stream among the streams planned."""
    values: torch.Tensor
    """``[B, T, C]`` inputs (NaN missing; padding rows in front are all NaN: identity steps)."""
    times: torch.Tensor
    """``[B, T]`` float64."""
    covariates: torch.Tensor | None
    """``[B, T, K]`` or None."""
    targets: torch.Tensor
    """``[B, T, H, C]`` step k's target of each scored position (NaN: unknown or not scored)."""
    through: np.ndarray
    """``[M]`` every planned stream's new ``learn.through``."""


def plan_windows(hist: dict[str, np.ndarray], last_time: np.ndarray, config: LearnConfig, horizon: int,
                 time_unit: float) -> LearnPlan | None:
    """The windows of ``M`` streams from their histories (``hist.*`` and ``learn.through`` as arrays with a
    leading ``[M]`` axis) and last observation times ``[M]``; None when no stream has a matured position.

    Example:
        >>> import numpy as np
        >>> from gdn2ts.streaming.learn import LearnConfig
        >>> cfg = LearnConfig(history=10, context=6, min_context=0, target_tolerance=0.0)
        >>> t = np.arange(10.0)[None]; hist = {"hist.time": t, "hist.values": t[..., None] / 10,
        ...                                   "learn.through": np.array([-np.inf])}
        >>> plan = plan_windows(hist, np.array([9.0]), cfg, horizon=2, time_unit=1.0)
        >>> plan.times[0].tolist(), plan.targets[0, -1, :, 0].tolist(), plan.through.tolist()
        ([2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [0.8, 0.9], [7.0])
    """
    span = (horizon + config.target_tolerance) * time_unit
    tol = config.target_tolerance * time_unit
    H, M = horizon, len(last_time)
    through = hist[THROUGH].reshape(M).copy()
    windows = []
    for m in range(M):
        ht = hist["hist.time"][m]
        valid = np.isfinite(ht)
        ready = valid & (ht + span <= last_time[m]) & (ht > through[m])
        if not ready.any():
            continue
        o = int(np.flatnonzero(ready)[-1])
        start = max(int(np.flatnonzero(valid)[0]), o - config.context + 1)
        idx = np.arange(start, o + 1)
        scored = ready[idx] & (idx - start >= config.min_context)
        through[m] = ht[o]
        if not scored.any():
            continue
        # step k's target: the row nearest to origin + k units (histories are sorted, empty slots at -inf first)
        want = ht[idx][:, None] + time_unit * np.arange(1, H + 1)  # [P, H]
        hi = np.clip(np.searchsorted(ht, want), 0, len(ht) - 1)
        lo = np.clip(hi - 1, 0, len(ht) - 1)
        pick = np.where(np.abs(ht[lo] - want) <= np.abs(ht[hi] - want), lo, hi)
        hit = (np.abs(ht[pick] - want) <= tol) & scored[:, None]
        targets = np.where(hit[..., None], hist["hist.values"][m][pick], np.nan)  # [P, H, C]
        if np.isnan(targets).all():
            continue
        windows.append((m, idx, targets))
    if not windows:
        return None
    T = max(len(idx) for _, idx, _ in windows)
    B, C = len(windows), hist["hist.values"].shape[-1]
    cov = hist.get("hist.covariates")
    values = np.full((B, T, C), np.nan)
    times = np.zeros((B, T))
    covs = None if cov is None else np.zeros((B, T, cov.shape[-1]))
    targets = np.full((B, T, H, C), np.nan)
    for b, (m, idx, tgt) in enumerate(windows):
        pad = T - len(idx)
        values[b, pad:] = hist["hist.values"][m][idx]
        # padding rows are unobserved (skipped exactly); any finite time will do
        times[b, :pad], times[b, pad:] = hist["hist.time"][m][idx[0]], hist["hist.time"][m][idx]
        if covs is not None:
            covs[b, pad:] = cov[m][idx]
        targets[b, pad:] = tgt
    return LearnPlan(np.array([m for m, _, _ in windows]), torch.from_numpy(values), torch.from_numpy(times),
                None if covs is None else torch.from_numpy(covs), torch.from_numpy(targets), through)
