"""Fitting a :class:`StreamEncoder` on windows of regularly gridded series.

The data are ``S`` series on a regular grid of one time unit: values ``[S, N, channels]`` (already scaled; NaN
where a channel is missing, a whole NaN row where nothing was observed, which the encoder skips exactly), times
``[S, N]`` and optional covariates ``[S, N, n_covariates]``. A window is ``context`` consecutive grid rows fed to
the encoder. The forecast issued at window position ``t`` is scored against the grid rows ``t + 1 .. t + horizon``
(pinball loss over the quantile levels), only where the row at ``t`` was observed and the target value is
known. The encoder is causal, so the forecast at ``t`` reads inputs up to ``t`` only: no target is ever an
input of the forecast it scores, and windows are drawn so that every target lies inside the series given (pass
the training part only; nothing after it is read).

The reconstruction head learns from masked inputs: a fraction of the observed cells is hidden from the encoder
and the head is scored (squared error) on recovering them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from gdn2ts.models import StreamEncoder
from gdn2ts.models.schedule import encoder_schedule

__all__ = ["TrainConfig", "Windows", "make_windows", "pinball_loss", "window_loss", "sample_windows", "fit"]


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`fit` trains."""

    context: int = 256
    """Grid rows per window (the encoder's input length)."""
    batch_size: int = 16
    """Windows per optimizer step."""
    steps: int = 600
    """Optimizer steps."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warm-up over the first 5% of steps, cosine decay to 10%)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    mask_prob: float = 0.15
    """Fraction of observed input cells hidden for the reconstruction loss."""
    recon_weight: float = 0.5
    """Weight of the reconstruction loss beside the forecast loss."""
    grad_clip: float = 1.0
    """Gradient norm clip."""
    max_seconds: float = math.inf
    """Stop early once this much wall time has passed (the steps done are reported)."""
    seed: int = 0
    """Seed of the window sampler and the input masks."""

    def __post_init__(self):
        for name in ("context", "batch_size", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig: '{name}' expected a positive int, got {value!r}")
        for name in ("lr", "max_seconds", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig: '{name}' expected a positive number, got {getattr(self, name)!r}")
        if not 0 <= self.mask_prob < 1:
            raise ValueError(f"TrainConfig: 'mask_prob' expected a fraction in [0, 1), got {self.mask_prob!r}")
        if not (self.recon_weight >= 0 and self.weight_decay >= 0):
            raise ValueError("TrainConfig: 'recon_weight' and 'weight_decay' expected non-negative numbers")


class Windows(NamedTuple):
    """A batch of ``B`` windows of ``L`` grid rows with their forecast targets (``H`` = horizon)."""

    values: torch.Tensor
    """``[B, L, C]`` encoder inputs (NaN = missing)."""
    times: torch.Tensor
    """``[B, L]`` float64 timestamps of the inputs."""
    covariates: torch.Tensor | None
    """``[B, L, K]`` or None."""
    targets: torch.Tensor
    """``[B, L, H, C]`` the values at rows ``t + 1 .. t + H`` for position ``t`` (NaN = unknown)."""
    target_times: torch.Tensor
    """``[B, L, H]`` float64 timestamps of the targets."""


def make_windows(values: torch.Tensor, times: torch.Tensor, covariates: torch.Tensor | None, index: torch.Tensor,
                 context: int, horizon: int) -> Windows:
    """Cut windows at ``index`` ``[B, 2]`` (series, first row) out of ``values`` ``[S, N, C]``.

    Example:
        >>> import torch
        >>> values = torch.arange(20.0).reshape(1, 20, 1); times = torch.arange(20.0).double()[None]
        >>> w = make_windows(values, times, None, torch.tensor([[0, 5]]), context=4, horizon=3)
        >>> w.values[0, :, 0].tolist(), w.targets[0, -1, :, 0].tolist()
        ([5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0])
    """
    S, N = values.shape[:2]
    series, start = index[:, 0], index[:, 1]
    if bool(((start < 0) | (start + context + horizon > N) | (series < 0) | (series >= S)).any()):
        raise ValueError(f"make_windows: windows expected inside the series (rows 0..{N - 1}, series 0..{S - 1}) "
                         f"with their {horizon} targets, got index {index.tolist()}")
    pos = start[:, None] + torch.arange(context)  # [B, L]
    tpos = pos[..., None] + 1 + torch.arange(horizon)  # [B, L, H]
    s2, s3 = series[:, None], series[:, None, None]
    return Windows(values[s2, pos], times[s2, pos], None if covariates is None else covariates[s2, pos],
                   values[s3, tpos], times[s3, tpos])


def sample_windows(n_rows: int, n_series: int, batch: int, context: int, horizon: int,
                   generator: torch.Generator) -> torch.Tensor:
    """``[batch, 2]`` random (series, first row) pairs whose windows and targets fit in ``n_rows`` rows."""
    last = n_rows - context - horizon
    if last < 0:
        raise ValueError(f"sample_windows: a window of {context} rows with {horizon} targets needs at least "
                         f"{context + horizon} rows, the series have {n_rows}")
    return torch.stack([torch.randint(0, n_series, (batch,), generator=generator),
                        torch.randint(0, last + 1, (batch,), generator=generator)], dim=1)


def pinball_loss(forecast: torch.Tensor, targets: torch.Tensor, quantiles, valid: torch.Tensor) -> torch.Tensor:
    """Mean pinball loss of ``forecast`` ``[..., Q]`` against ``targets`` ``[...]`` over the ``valid`` ``[...]``
    entries (0 when none is valid).

    Example:
        >>> import torch
        >>> f = torch.tensor([[0.0, 1.0, 2.0]]); y = torch.tensor([1.5])
        >>> round(float(pinball_loss(f, y, (0.1, 0.5, 0.9), torch.tensor([True]))), 4)
        0.15
    """
    q = torch.tensor(quantiles, dtype=forecast.dtype, device=forecast.device)
    err = torch.nan_to_num(targets, nan=0.0)[..., None] - forecast
    per = torch.maximum(q * err, (q - 1) * err).mean(-1)
    weight = valid.to(per.dtype)
    return (per * weight).sum() / weight.sum().clamp(min=1.0)


def window_loss(encoder: StreamEncoder, w: Windows, mask_prob: float = 0.0, recon_weight: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Forecast (pinball) plus masked reconstruction loss of one batch of windows.

    Returns the total and its parts ``{"forecast": float, "reconstruction": float}``.
    """
    present = ~torch.isnan(w.values)
    hide = (torch.rand(w.values.shape, generator=generator) < mask_prob) & present if mask_prob > 0 else \
        torch.zeros_like(present)
    out = encoder(w.values.masked_fill(hide, float("nan")), w.times, w.covariates)
    # a forecast counts only where it was issued from an observation at that very position (elsewhere it is
    # the last observation's forecast, whose targets are other rows)
    valid = out["observed"][..., None, None] & ~torch.isnan(w.targets)
    forecast = pinball_loss(out["forecast"], w.targets, encoder.config.quantiles, valid)
    if hide.any():
        diff = (out["reconstruction"] - torch.nan_to_num(w.values, nan=0.0)) ** 2
        recon = (diff * hide).sum() / hide.sum()
    else:
        recon = forecast.new_zeros(())
    total = forecast + recon_weight * recon
    return total, {"forecast": float(forecast.detach()), "reconstruction": float(recon.detach())}


def fit(encoder: StreamEncoder, values: torch.Tensor, times: torch.Tensor, covariates: torch.Tensor | None,
        config: TrainConfig = TrainConfig(), quiet: bool = True) -> list[dict]:
    """Train ``encoder`` in place on windows of the series ``values`` ``[S, N, C]`` (scaled, NaN = missing),
    ``times`` ``[S, N]`` (a regular grid of one time unit) and ``covariates`` ``[S, N, K]`` or None.

    Returns the history: one ``{"step", "loss", "forecast", "reconstruction", "seconds"}`` per step.

    Example:
        >>> import torch
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> enc = StreamEncoder(EncoderConfig(n_channels=1, hidden_size=8, head_dim=4, horizon=2))
        >>> t = torch.arange(40.0).double()[None]
        >>> history = fit(enc, torch.sin(t / 3).float()[..., None], t, None,
        ...               TrainConfig(context=8, batch_size=2, steps=3))
        >>> len(history), history[-1]["loss"] > 0
        (3, True)
    """
    if values.dim() != 3 or tuple(times.shape) != tuple(values.shape[:2]):
        raise ValueError(f"fit: expected values [S, N, C] and times [S, N], got {tuple(values.shape)} and "
                         f"{tuple(times.shape)}")
    cfg = encoder.config
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, encoder_schedule(config.steps))
    encoder.train()
    history, start = [], time.perf_counter()
    progress = None
    if not quiet:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"))
        task = progress.add_task("train", total=config.steps, loss=float("nan"))
        progress.start()
    try:
        for step in range(config.steps):
            index = sample_windows(values.shape[1], values.shape[0], config.batch_size, config.context,
                                   cfg.horizon, gen)
            w = make_windows(values, times, covariates, index, config.context, cfg.horizon)
            loss, parts = window_loss(encoder, w, config.mask_prob, config.recon_weight, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), config.grad_clip)
            opt.step()
            sched.step()
            elapsed = time.perf_counter() - start
            history.append({"step": step + 1, "loss": float(loss.detach()), **parts, "seconds": elapsed})
            if progress is not None:
                progress.update(task, advance=1, loss=history[-1]["loss"])
            if elapsed > config.max_seconds:
                break
    finally:
        if progress is not None:
            progress.stop()
        encoder.eval()
    return history
