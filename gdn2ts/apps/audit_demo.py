"""The reproducible audit behind docs/audit.md: seeded synthetic streams with rare regimes, a small encoder
trained on them for a few seconds, and the audit of held-out streams with every regime onset tagged."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from gdn2ts.apps.audit_report import append_audit_log, audit_summary_text, plot_audit
from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.streaming.audit import StateAudit, audit_encoder

__all__ = ["regime_streams", "quantile_loss", "run_audit_demo"]

PERIOD = 24.0
REGIME_LENGTH = 15


def regime_streams(n_streams: int, n_steps: int, seed: int, regimes: int = 3) -> dict:
    """Seeded synthetic streams of 3 channels at irregular times, with missing values and rare regimes.

    Normal behaviour: a daily-like cycle (period 24 time units) on channels 0 and 1 and a slow random walk on
    channel 2. A rare regime (``regimes`` per stream, ``REGIME_LENGTH`` steps each, far apart) triples the cycle's
    amplitude on channel 0 and lifts channel 2 by 3. Gaps are exponential (mean 1) with occasional long ones;
    15% of values and 3% of whole steps are missing, never at a regime onset. A pure function of its arguments.

    Returns:
        dict with ``values`` ``[B, T, 3]`` float32 (NaN missing), ``timestamps`` ``[B, T]`` float64 and
        ``onsets``, a list of ``(row, step)`` of every regime's first step.

    Example:
        >>> data = regime_streams(2, 100, seed=0)
        >>> data["values"].shape, data["timestamps"].dtype, len(data["onsets"])
        (torch.Size([2, 100, 3]), torch.float64, 6)
    """
    rng = np.random.default_rng(seed)
    B, T = n_streams, n_steps
    gaps = rng.exponential(1.0, (B, T)) + 0.05
    gaps *= np.where(rng.random((B, T)) < 0.02, 8.0, 1.0)
    times = np.cumsum(gaps, axis=1)
    phase = rng.uniform(0, 2 * math.pi, (B, 1))
    cycle = np.sin(2 * math.pi * times / PERIOD + phase)
    walk = np.cumsum(rng.normal(0, 0.1, (B, T)), axis=1)
    regime = np.zeros((B, T), dtype=bool)
    onsets = []
    slot = T // regimes
    for row in range(B):
        for j in range(regimes):
            # one onset per slot, away from the slot's edges, so regimes recur after long gaps
            start = j * slot + int(rng.integers(slot // 4, max(slot // 4 + 1, slot - REGIME_LENGTH)))
            regime[row, start:start + REGIME_LENGTH] = True
            onsets.append((row, start))
    amp = np.where(regime, 3.0, 1.0)
    values = np.stack([amp * cycle, 0.5 * np.cos(2 * math.pi * times / PERIOD + phase), walk + 3.0 * regime], -1)
    values += rng.normal(0, 0.15, values.shape)
    missing = rng.random(values.shape) < 0.15
    missing |= (rng.random((B, T)) < 0.03)[..., None]
    for row, step in onsets:
        missing[row, step] = False
    values[missing] = np.nan
    return {"values": torch.tensor(values, dtype=torch.float32), "timestamps": torch.tensor(times),
            "onsets": onsets}


def quantile_loss(forecast: torch.Tensor, values: torch.Tensor, quantiles: tuple[float, ...]) -> torch.Tensor:
    """Mean pinball loss of ``forecast`` ``[B, T, H, C, Q]`` against the next ``H`` steps of ``values``
    ``[B, T, C]`` (missing and beyond-the-window targets are left out).

    Example:
        >>> f, v = torch.zeros(1, 4, 2, 1, 3), torch.ones(1, 4, 1)
        >>> round(float(quantile_loss(f, v, (0.1, 0.5, 0.9))), 4)
        0.5
    """
    B, T, H, C, Q = forecast.shape
    padded = torch.cat([values, values.new_full((B, H, C), math.nan)], dim=1)
    target = torch.stack([padded[:, h + 1:h + 1 + T] for h in range(H)], dim=2)  # [B, T, H, C]
    keep = ~torch.isnan(target)
    err = torch.nan_to_num(target)[..., None] - forecast
    q = forecast.new_tensor(quantiles)
    loss = torch.maximum(q * err, (q - 1) * err).mean(-1)
    return (loss * keep).sum() / keep.sum().clamp(min=1)


def run_audit_demo(out: str | Path = "docs/figures/audit.png", seed: int = 0, steps: int = 600,
                   train_steps: int = 150, streams: int = 4, parquet: str | Path | None = None,
                   threads: int = 1, quiet: bool = False) -> StateAudit:
    """Train a small encoder on seeded regime streams, audit ``streams`` held-out streams of ``steps`` steps
    with every regime onset tagged, print the summary, and draw the plot to ``out``.

    On 2 CPU cores the defaults take about 20 seconds. ``parquet`` (a folder) also appends the tables to its
    audit logs. ``threads`` sets torch's CPU threads for the run (restored after): at this size one thread is
    fastest, and several slow down badly when other processes share the cores.
    """
    for name, value in (("steps", steps), ("streams", streams), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"run_audit_demo: argument '{name}' expected a positive int, got {value!r}")
    if isinstance(train_steps, bool) or not isinstance(train_steps, int) or train_steps < 0:
        raise ValueError(f"run_audit_demo: argument 'train_steps' expected a non-negative int, got {train_steps!r}")
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(out, seed, steps, train_steps, streams, parquet, quiet, start)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out, seed, steps, train_steps, streams, parquet, quiet, start) -> StateAudit:
    torch.manual_seed(seed)
    cfg = EncoderConfig(n_channels=3, hidden_size=32, n_layers=2, num_heads=2, head_dim=16, horizon=8)
    encoder = StreamEncoder(cfg)
    train = regime_streams(16, 512, seed=seed + 1)
    opt = torch.optim.AdamW(encoder.parameters(), lr=3e-3)
    for i in range(train_steps):
        # random windows of the training streams, so every step sees new positions
        off = int(np.random.default_rng(seed + i).integers(0, 384))
        v, t = train["values"][:, off:off + 128], train["timestamps"][:, off:off + 128]
        loss = quantile_loss(encoder(v, t)["forecast"], v, cfg.quantiles)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if not quiet and (i + 1) % 20 == 0:
            print(f"train step {i + 1}/{train_steps}: pinball loss {loss.item():.4f}")
    held_out = regime_streams(streams, steps, seed=seed)
    ids = [f"stream-{i}" for i in range(streams)]
    tags = {f"{ids[row]} regime {n % 3 + 1}": (row, step) for n, (row, step) in enumerate(held_out["onsets"])}
    audit = audit_encoder(encoder, held_out["values"], held_out["timestamps"], tags=tags, stream_ids=ids)
    plot_audit(audit, out)
    if parquet is not None:
        append_audit_log(audit, parquet)
    if not quiet:
        print(audit_summary_text(audit, horizon=cfg.horizon * cfg.time_unit))
        print(f"plot: {out}" + (f"; Parquet logs in {parquet}" if parquet is not None else "")
              + f"; {time.perf_counter() - start:.1f} s")
    return audit
