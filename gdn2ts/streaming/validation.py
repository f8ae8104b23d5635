"""Validation of a trained streaming encoder on each stream's held-out tail, against a seasonal-naive baseline.

Every observed grid row of a stream's tail is a forecast origin. The encoder runs over the tail from a zero state
that has first read the ``context`` grid rows before the earliest tail (as in training). Step ``k`` from origin
``t`` targets grid row ``t + k``; the seasonal-naive forecast of it is the value ``m * ceil(k / m)`` rows earlier
(``m`` rows per season: the last season's value at the same phase, known at the origin). Both are scored, in the
user's units, on the same targets: where the target and the baseline value were both observed.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import torch

from gdn2ts.models import StreamEncoder
from gdn2ts.streaming.fit_data import Grid

__all__ = ["validate", "summarize_validation"]


@torch.no_grad()
def validate(encoder: StreamEncoder, grid: Grid, tail: torch.Tensor, loc: np.ndarray, scale: np.ndarray,
             context: int, season: int, channels: tuple[str, ...], batch: int = 64,
             curves: list[pl.DataFrame] | None = None) -> pl.DataFrame:
    """Errors of the encoder and of the seasonal-naive baseline on the tail rows.

    Args:
        grid: all rows (training and tail), model units.
        tail: ``[S, N]`` bool, grid rows in their stream's held-out tail.
        loc, scale: ``[S, C]`` each stream's scaling (to score in the user's units).
        context: grid rows read before the earliest tail row.
        season: rows per season of the baseline.

    Returns one row per (stream, channel, step): ``n`` scored targets, ``abs_err`` and ``naive_abs_err`` (sums),
    ``covered`` (targets inside the outermost quantile band). With ``curves`` (a list), the one-step forecasts
    are appended to it as tables (stream, channel, time: the target's model time, actual, low, median, high), for
    plots.
    """
    S, N, C = grid.values.shape
    H, Q = encoder.config.horizon, len(encoder.config.quantiles)
    observed = ~torch.isnan(grid.values).all(-1)
    origins = observed & tail
    if not bool(origins.any()):
        return pl.DataFrame(schema={"stream": pl.String, "channel": pl.String, "step": pl.Int64, "n": pl.Int64,
                                    "abs_err": pl.Float64, "naive_abs_err": pl.Float64, "covered": pl.Int64})
    start = max(0, int(origins.any(0).nonzero()[0, 0]) - context)
    raw = grid.values.double() * torch.from_numpy(scale)[:, None] + torch.from_numpy(loc)[:, None]  # [S, N, C]
    sums = np.zeros((S, C, H, 4))  # n, abs_err, naive_abs_err, covered
    dtype = next(encoder.parameters()).dtype
    for s0 in range(0, S, batch):
        part = slice(s0, min(S, s0 + batch))
        cov = None if grid.covariates is None else grid.covariates[part, start:].to(dtype)
        out = encoder(grid.values[part, start:].to(dtype), grid.times[part, start:], cov)
        fc = out["forecast"].double()  # [B, L, H, C, Q]
        fc = fc * torch.from_numpy(scale[part])[:, None, None, :, None] + torch.from_numpy(loc[part])[:, None, None, :,
                                                                                                    None]
        L = fc.shape[1]
        x = raw[part, start:]
        for k in range(1, H + 1):
            back = season * math.ceil(k / season)
            pos = torch.arange(L)
            ok = (pos + k < L) & (pos + k - back >= -start)
            tgt = torch.full_like(x, math.nan)
            naive = torch.full_like(x, math.nan)
            tgt[:, : max(0, L - k)] = x[:, k:]
            src = pos + k - back + start  # index into the full grid
            keep = ok & (src >= 0) & (src < N)
            naive[:, keep] = raw[part][:, src[keep]]
            valid = origins[part, start:, None] & ~torch.isnan(tgt) & ~torch.isnan(naive)
            f = fc[:, :, k - 1]  # [B, L, C, Q]
            median = f[..., Q // 2]
            err = torch.where(valid, (median - tgt).abs(), 0.0)
            nerr = torch.where(valid, (naive - tgt).abs(), 0.0)
            inside = valid & (tgt >= f[..., 0]) & (tgt <= f[..., -1])
            sums[part, :, k - 1, 0] += valid.sum(1).numpy()
            sums[part, :, k - 1, 1] += err.sum(1).numpy()
            sums[part, :, k - 1, 2] += nerr.sum(1).numpy()
            sums[part, :, k - 1, 3] += inside.sum(1).numpy()
            if curves is not None and k == 1:
                b, t, c = (i.numpy() for i in valid.nonzero(as_tuple=True))
                curves.append(pl.DataFrame({
                    "stream": pl.Series(grid.streams[part]).gather(b), "channel": pl.Series(list(channels)).gather(c),
                    "time": grid.times[part, start:][b, t + 1].numpy(), "actual": tgt[b, t, c].numpy(),
                    "low": f[b, t, c, 0].numpy(), "median": median[b, t, c].numpy(), "high": f[b, t, c, -1].numpy()}))
    s_idx, c_idx, k_idx = np.meshgrid(np.arange(S), np.arange(C), np.arange(H), indexing="ij")
    flat = sums.reshape(-1, 4)
    return pl.DataFrame({"stream": pl.Series(grid.streams).gather(s_idx.reshape(-1)),
                         "channel": pl.Series(list(channels)).gather(c_idx.reshape(-1)),
                         "step": k_idx.reshape(-1) + 1, "n": flat[:, 0].astype(np.int64), "abs_err": flat[:, 1],
                         "naive_abs_err": flat[:, 2], "covered": flat[:, 3].astype(np.int64)})


def summarize_validation(table: pl.DataFrame, horizon: int) -> list[dict]:
    """Per channel: MAE of the median forecast and of the seasonal-naive baseline at step 1, at step ``horizon``
    and over all steps, their ratio and the coverage of the outermost quantile band.

    Example:
        >>> t = pl.DataFrame({"stream": ["a", "a"], "channel": ["x", "x"], "step": [1, 2], "n": [2, 2],
        ...                   "abs_err": [2.0, 4.0], "naive_abs_err": [4.0, 4.0], "covered": [2, 1]})
        >>> summarize_validation(t, 2)[0]["all"]
        {'targets': 4, 'mae': 1.5, 'naive_mae': 2.0, 'ratio': 0.75, 'coverage': 0.75}
    """
    rows = []
    for channel in table["channel"].unique(maintain_order=True).to_list():
        part = table.filter(pl.col("channel") == channel)
        row = {"channel": channel}
        for tag, sub in (("step_1", part.filter(pl.col("step") == 1)),
                         (f"step_{horizon}", part.filter(pl.col("step") == horizon)), ("all", part)):
            n = int(sub["n"].sum())
            mae = float(sub["abs_err"].sum()) / n if n else None
            naive = float(sub["naive_abs_err"].sum()) / n if n else None
            row[tag] = {"targets": n, "mae": mae, "naive_mae": naive,
                        "ratio": None if not (n and naive) else mae / naive,
                        "coverage": float(sub["covered"].sum()) / n if n else None}
        rows.append(row)
    return rows
