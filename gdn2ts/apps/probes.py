"""Rare-regime recall probes: train GDN-2, KDA, GDN (the same :class:`StreamEncoder`, by ``variant``) and a GRU of
equal state size on the seeded tasks of :mod:`gdn2ts.apps.probes_data` with one budget, then score recall
against the time since the thing recalled was last seen.

* regimes: the forecast made at a regime's onset (only its cue channels observed) for the rest of the episode,
  on the recalled channels: mean absolute error against the stream's noiseless pattern, binned by the time since
  that regime's previous episode ("first": never seen before, the no-memory reference).
* needle: the reconstruction of the missing value channels at a query step: squared error against the paired
  value and nearest-value accuracy (the prediction is closer to the right value than to the other pairs'),
  binned by the time since the pair was shown.

Training losses (the same for every model): regimes, the pinball loss of every forecast whose target was observed,
with the onsets' forecasts weighted ``onset_weight`` times (they are rare and carry the recall); needle, the
squared error of the reconstruction at query steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from gdn2ts.apps.baselines import GRUEncoder, encoder_state_floats
from gdn2ts.apps.probes_data import NeedleConfig, RegimeConfig, make_needles, make_regimes
from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.models.schedule import encoder_schedule

__all__ = ["ProbeModelConfig", "ProbeTrainConfig", "ProbeEvalConfig", "build_model", "run_task", "MODELS", "TASKS"]

MODELS = ("gdn2", "kda", "gdn", "gru")
TASKS = ("regimes", "needle")


def _check_edges(owner: str, name: str, edges) -> None:
    e = list(edges)
    if len(e) < 2 or any(not math.isfinite(x) for x in e) or e != sorted(set(e)):
        raise ValueError(f"{owner}: '{name}' expected at least two finite, increasing bin edges, got {edges!r}")


@dataclass(frozen=True)
class ProbeModelConfig:
    """The models compared; each task builds them with its own channel count."""

    models: tuple[str, ...] = MODELS
    """Which models to train: encoder variants (gdn2, kda, gdn) and/or gru."""
    hidden_size: int = 32
    """Width of the residual stream (all models)."""
    n_layers: int = 1
    """Blocks per model."""
    num_heads: int = 2
    """Heads per GDN-2 mixer."""
    head_dim: int = 8
    """Key and value size per head; the GRU's state per block equals the encoder's floats per layer."""
    horizon: int = 4
    """Forecast steps (at least the regime episode's steps after the onset)."""

    def __post_init__(self):
        bad = [m for m in self.models if m not in MODELS]
        if not self.models or bad or len(set(self.models)) != len(self.models):
            raise ValueError(f"ProbeModelConfig: 'models' expected distinct names from {MODELS}, got {self.models!r}")
        for name in ("hidden_size", "n_layers", "num_heads", "head_dim", "horizon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ProbeModelConfig: '{name}' expected a positive int, got {value!r}")

    def encoder(self, n_channels: int, variant: str = "gdn2") -> EncoderConfig:
        """The :class:`EncoderConfig` of one model for a task with ``n_channels``."""
        return EncoderConfig(n_channels=n_channels, hidden_size=self.hidden_size, n_layers=self.n_layers,
                             num_heads=self.num_heads, head_dim=self.head_dim, variant=variant, horizon=self.horizon)


@dataclass(frozen=True)
class ProbeTrainConfig:
    """One training budget, the same for every model."""

    steps: int = 300
    """Optimizer steps per model and seed (each on a fresh batch)."""
    batch: int = 16
    """Streams per step."""
    lr: float = 3e-3
    """AdamW learning rate (cosine decay to 10%, after 5% warm-up)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clip."""
    seeds: tuple[int, ...] = (0, 1)
    """Training seeds: each sets the initial weights and the training batches (the same for every model)."""
    onset_weight: float = 10.0
    """Weight of the forecasts made at regime onsets in the regimes task's loss (others weigh 1)."""

    def __post_init__(self):
        for name in ("steps", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ProbeTrainConfig: '{name}' expected a positive int, got {value!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"ProbeTrainConfig: 'seeds' expected distinct ints, got {self.seeds!r}")
        for name in ("lr", "grad_clip", "onset_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ProbeTrainConfig: '{name}' expected a positive number, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"ProbeTrainConfig: 'weight_decay' expected >= 0, got {self.weight_decay!r}")


@dataclass(frozen=True)
class ProbeEvalConfig:
    """The held-out streams and the bins of the scores."""

    n_streams: int = 256
    """Held-out streams per task (the same for every model and seed)."""
    seed: int = 1_000_003
    """Seed of the held-out streams (apart from the training seeds)."""
    since_bins: tuple[float, ...] = (0.0, 32.0, 64.0, 128.0, 256.0, 512.0)
    """Edges of the bins of time since a regime was last seen (its first occurrences form one more bin)."""
    delay_bins: tuple[float, ...] = (0.0, 16.0, 32.0, 64.0, 128.0, 256.0)
    """Edges of the bins of needle query delay (time since the pair was shown)."""

    def __post_init__(self):
        if isinstance(self.n_streams, bool) or not isinstance(self.n_streams, int) or self.n_streams < 1:
            raise ValueError(f"ProbeEvalConfig: 'n_streams' expected a positive int, got {self.n_streams!r}")
        _check_edges("ProbeEvalConfig", "since_bins", self.since_bins)
        _check_edges("ProbeEvalConfig", "delay_bins", self.delay_bins)


@dataclass
class TaskResult:
    """Scores of one model on one task, per bin and training seed."""

    bins: list[str]
    """Bin labels, ``"[lo, hi)"`` (and ``"first"`` for the regimes' first occurrences)."""
    counts: list[int]
    """Held-out events per bin."""
    metrics: dict[str, list[list[float]]] = field(default_factory=dict)
    """Metric name -> ``[seeds][bins]`` (NaN where a bin is empty)."""
    train_seconds: list[float] = field(default_factory=list)
    """Wall time of each seed's training."""
    final_loss: list[float] = field(default_factory=list)
    """Mean training loss over each seed's last 10% of steps."""


def build_model(name: str, encoder_config: EncoderConfig) -> torch.nn.Module:
    """An encoder of variant ``name``, or (``gru``) a :class:`GRUEncoder` whose state per block equals the
    encoder's floats per layer.

    Example:
        >>> from gdn2ts.models import EncoderConfig
        >>> gru = build_model("gru", EncoderConfig(n_channels=3, hidden_size=16, num_heads=2, head_dim=8))
        >>> gru.state_size
        272
    """
    if name == "gru":
        return GRUEncoder(encoder_config, encoder_state_floats(encoder_config))
    if name not in MODELS:
        raise ValueError(f"build_model: 'name' expected one of {MODELS}, got {name!r}")
    return StreamEncoder(replace(encoder_config, variant=name))


def _pinball(forecast: torch.Tensor, target: torch.Tensor, quantiles, weight: torch.Tensor) -> torch.Tensor:
    """Weighted pinball loss: ``forecast`` ``[B, T, H, C, Q]``, ``target`` ``[B, T, H, C]`` (NaN: not scored),
    ``weight`` ``[B, T]``."""
    valid = ~torch.isnan(target)
    q = torch.tensor(quantiles, dtype=forecast.dtype)
    diff = torch.nan_to_num(target)[..., None] - forecast
    loss = torch.maximum(q * diff, (q - 1) * diff).mean(-1)
    w = weight[:, :, None, None] * valid
    return (loss * w).sum() / w.sum().clamp(min=1.0)


def _shifted_targets(values: torch.Tensor, horizon: int) -> torch.Tensor:
    """``[B, T, C]`` -> ``[B, T, horizon, C]``: the values ``h = 1 .. horizon`` steps ahead (NaN past the end)."""
    B, T, C = values.shape
    out = values.new_full((B, T, horizon, C), math.nan)
    for h in range(1, horizon + 1):
        out[:, :T - h, h - 1] = values[:, h:]
    return out


def _regime_loss(model, batch, cfg: RegimeConfig, train: ProbeTrainConfig):
    out = model(batch.values, batch.times)
    target = _shifted_targets(batch.values, model.config.horizon)
    weight = 1.0 + (train.onset_weight - 1.0) * batch.onset.float()
    return _pinball(out["forecast"], target, model.config.quantiles, weight)


def _needle_loss(model, batch, cfg: NeedleConfig):
    out = model(batch.values, batch.times)
    vc = slice(cfg.n_key_channels, cfg.n_key_channels + cfg.n_value_channels)
    pred = out["reconstruction"][..., vc][batch.query]
    return (pred - batch.target[batch.query]).square().mean()


def _bin_index(x: torch.Tensor, edges) -> torch.Tensor:
    """Bin of each value (``len(edges) - 1`` bins; ``-1`` outside; ``+inf`` maps to the extra last bin)."""
    e = torch.tensor(edges, dtype=torch.float64)
    idx = torch.bucketize(x, e, right=True) - 1
    idx = torch.where((x < e[0]) | (x >= e[-1]), -1, idx)
    return torch.where(torch.isinf(x), len(edges) - 1, idx)


def _bin_labels(edges) -> list[str]:
    return [f"[{lo:g}, {hi:g})" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def _binned_mean(values: torch.Tensor, idx: torch.Tensor, n_bins: int) -> tuple[list[float], list[int]]:
    means, counts = [], []
    for i in range(n_bins):
        sel = values[idx == i]
        counts.append(int(sel.numel()))
        means.append(float(sel.mean()) if sel.numel() else math.nan)
    return means, counts


@torch.no_grad()
def _score_regimes(model, batch, cfg: RegimeConfig, ev: ProbeEvalConfig):
    model.eval()
    out = model(batch.values, batch.times)
    model.train()
    mid = len(model.config.quantiles) // 2
    b, t = batch.onset.nonzero(as_tuple=True)
    # median forecast at the onset for the episode's remaining steps, on the recalled (non-cue) channels
    pred = out["forecast"][b, t, :cfg.episode_steps - 1, cfg.n_cue_channels:, mid]
    truth = batch.patterns[b, batch.regime[b, t], cfg.n_cue_channels:]
    err = (pred - truth[:, None]).abs().mean((-1, -2))
    idx = _bin_index(batch.since_last[b, t], ev.since_bins)
    mae, counts = _binned_mean(err, idx, len(ev.since_bins))
    return _bin_labels(ev.since_bins) + ["first"], counts, {"mae": mae}


@torch.no_grad()
def _score_needle(model, batch, cfg: NeedleConfig, ev: ProbeEvalConfig):
    model.eval()
    out = model(batch.values, batch.times)
    model.train()
    vc = slice(cfg.n_key_channels, cfg.n_key_channels + cfg.n_value_channels)
    b, t = batch.query.nonzero(as_tuple=True)
    pred = out["reconstruction"][b, t, vc]
    sq = (pred - batch.target[b, t]).square().mean(-1)
    # nearest-value accuracy: the right pair's value is the closest of this stream's values
    dist = (pred[:, None] - batch.pair_values[b]).square().sum(-1)
    correct = (dist.argmin(-1) == batch.pair[b, t]).float()
    idx = _bin_index(batch.delay[b, t], ev.delay_bins)
    n = len(ev.delay_bins) - 1
    mse, counts = _binned_mean(sq, idx, n)
    acc, _ = _binned_mean(correct, idx, n)
    return _bin_labels(ev.delay_bins), counts, {"mse": mse, "accuracy": acc}


def run_task(task: str, task_config: RegimeConfig | NeedleConfig, model_config: ProbeModelConfig,
             train: ProbeTrainConfig, evaluation: ProbeEvalConfig,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, TaskResult]:
    """Train every model of ``model_config`` on ``task`` for every seed, then score it on the held-out streams.

    Args:
        task: ``regimes`` or ``needle``.
        task_config: the task's generator configuration.
        progress: called as ``progress(description, done, total)`` after each optimizer step.

    Returns:
        ``{model name: TaskResult}``.

    Example:
        >>> from gdn2ts.apps.probes_data import NeedleConfig
        >>> r = run_task("needle", NeedleConfig(n_pairs=2, n_queries=2, min_delay=2, max_delay=6),
        ...              ProbeModelConfig(models=("gdn2",), hidden_size=8, head_dim=4),
        ...              ProbeTrainConfig(steps=2, batch=2, seeds=(0,)), ProbeEvalConfig(n_streams=4))
        >>> r["gdn2"].bins[0], len(r["gdn2"].metrics["accuracy"][0])
        ('[0, 16)', 5)
    """
    if task == "regimes":
        if not isinstance(task_config, RegimeConfig):
            raise ValueError(f"run_task: 'task_config' expected a RegimeConfig for 'regimes', got "
                             f"{type(task_config).__name__}")
        if model_config.horizon < task_config.episode_steps - 1:
            raise ValueError(f"run_task: model 'horizon' expected >= episode_steps - 1 = "
                             f"{task_config.episode_steps - 1} (the onset forecast covers the episode), got "
                             f"{model_config.horizon}")
        make, n_channels = make_regimes, task_config.n_channels

        def loss_fn(model, batch):
            return _regime_loss(model, batch, task_config, train)

        score = _score_regimes
    elif task == "needle":
        if not isinstance(task_config, NeedleConfig):
            raise ValueError(f"run_task: 'task_config' expected a NeedleConfig for 'needle', got "
                             f"{type(task_config).__name__}")
        make, n_channels = make_needles, task_config.n_channels

        def loss_fn(model, batch):
            return _needle_loss(model, batch, task_config)

        score = _score_needle
    else:
        raise ValueError(f"run_task: 'task' expected one of {TASKS}, got {task!r}")

    held_out = make(task_config, evaluation.seed, evaluation.n_streams)
    results: dict[str, TaskResult] = {}
    total = len(model_config.models) * len(train.seeds) * train.steps
    done = 0
    lr_at = encoder_schedule(train.steps, peak=train.lr)
    for name in model_config.models:
        result = None
        for seed in train.seeds:
            torch.manual_seed(seed)
            model = build_model(name, model_config.encoder(n_channels, "gdn2" if name == "gru" else name))
            opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
            losses = []
            start = time.perf_counter()
            for step in range(train.steps):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
                # the batches depend on (seed, step) only: every model sees the same data
                loss = loss_fn(model, make(task_config, seed * 1_000_000 + step, train.batch))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
                opt.step()
                losses.append(float(loss.detach()))
                done += 1
                if progress is not None:
                    progress(f"{task}: {name}, seed {seed}", done, total)
            seconds = time.perf_counter() - start
            bins, counts, metrics = score(model, held_out, task_config, evaluation)
            if result is None:
                result = TaskResult(bins, counts, {k: [] for k in metrics})
            for k, v in metrics.items():
                result.metrics[k].append(v)
            result.train_seconds.append(seconds)
            tail = losses[-max(1, len(losses) // 10):]
            result.final_loss.append(sum(tail) / len(tail))
        results[name] = result
    return results
