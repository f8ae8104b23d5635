"""Rare-regime recall probes: train the GDN-2 mixer's presets (GDN-2, its two ablations, KDA, GDN, Mamba-2), a
block-diagonal GRU and two controls, matched in state and parameters (:mod:`gdn2ts.apps.probes_models`), on the
seeded tasks of :mod:`gdn2ts.apps.probes_data` with one budget and curriculum (:mod:`gdn2ts.apps.probes_curriculum`),
then score recall against the time since the thing recalled was last seen.

* regimes: the forecast made at a regime's onset (only its cue channels observed) for the rest of the episode,
  on the recalled channels: mean absolute error against the stream's noiseless pattern, binned by the time since
  that regime's previous episode ("first": never seen before, the no-memory reference).
* needle: the reconstruction of the missing value channels at a query step: squared error against the paired
  value and nearest-value accuracy (the prediction is closer to the right value than to the other pairs'),
  binned by the time since the pair was shown.

Training losses (the same for every model): regimes, the pinball loss of every forecast whose target was observed,
with the onsets' forecasts weighted ``onset_weight`` times (they are rare and carry the recall); needle, the
squared error of the reconstruction at query steps.

One (task, model, seed) is one job (:func:`train_and_score`): a pure function of its arguments, so jobs can run in
any order or in separate processes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gdn2ts.apps.probes_curriculum import CurriculumConfig, reach, task_at
from gdn2ts.apps.probes_data import NeedleConfig, RegimeConfig, make_needles, make_regimes
from gdn2ts.apps.probes_models import (
    CONTROLS,
    MIXERS,
    MODELS,
    ProbeModelConfig,
    build_model,
    count_parameters,
    matched_mlp_widths,
)
from gdn2ts.models.schedule import encoder_schedule

__all__ = ["ProbeModelConfig", "ProbeTrainConfig", "ProbeEvalConfig", "TaskResult", "build_model", "model_widths",
           "run_task", "train_and_score", "MODELS", "MIXERS", "CONTROLS", "TASKS"]

TASKS = ("regimes", "needle")


def _check_edges(owner: str, name: str, edges) -> None:
    e = list(edges)
    if len(e) < 2 or any(not math.isfinite(x) for x in e) or e != sorted(set(e)):
        raise ValueError(f"{owner}: '{name}' expected at least two finite, increasing bin edges, got {edges!r}")


def _positive_ints(owner: str, obj, names) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: '{name}' expected a positive int, got {value!r}")


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
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Training seeds: each sets the initial weights and the training batches (the same for every model)."""
    onset_weight: float = 10.0
    """Weight of the forecasts made at regime onsets in the regimes task's loss (others weigh 1)."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """How the recall distances of the training streams grow (the held-out streams always use the full task)."""

    def __post_init__(self):
        _positive_ints("ProbeTrainConfig", self, ("steps", "batch"))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or \
                any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.seeds):
            raise ValueError(f"ProbeTrainConfig: 'seeds' expected distinct non-negative ints, got {self.seeds!r}")
        for name in ("lr", "grad_clip", "onset_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ProbeTrainConfig: '{name}' expected a positive number, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"ProbeTrainConfig: 'weight_decay' expected >= 0, got {self.weight_decay!r}")
        if not isinstance(self.curriculum, CurriculumConfig):
            raise ValueError(f"ProbeTrainConfig: 'curriculum' expected a CurriculumConfig, got "
                             f"{type(self.curriculum).__name__}")


@dataclass(frozen=True)
class ProbeEvalConfig:
    """The held-out streams, the bins of the scores and the intervals across seeds."""

    n_streams: int = 256
    """Held-out streams per task (the same for every model and seed)."""
    seed: int = 1_000_003
    """Seed of the held-out streams (apart from the training seeds)."""
    since_bins: tuple[float, ...] = (0.0, 32.0, 64.0, 128.0, 256.0, 512.0)
    """Edges of the bins of time since a regime was last seen (its first occurrences form one more bin)."""
    delay_bins: tuple[float, ...] = (0.0, 16.0, 32.0, 64.0, 128.0, 256.0)
    """Edges of the bins of needle query delay (time since the pair was shown)."""
    level: float = 0.95
    """Coverage of the Student t intervals over seeds (:mod:`gdn2ts.apps.probes_stats`)."""

    def __post_init__(self):
        _positive_ints("ProbeEvalConfig", self, ("n_streams",))
        _check_edges("ProbeEvalConfig", "since_bins", self.since_bins)
        _check_edges("ProbeEvalConfig", "delay_bins", self.delay_bins)
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"ProbeEvalConfig: 'level' expected a number in (0, 1), got {self.level!r}")


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
    cpu_seconds: list[float] = field(default_factory=list)
    """CPU time of each seed's training (the training process's)."""
    final_loss: list[float] = field(default_factory=list)
    """Mean training loss over each seed's last 10% of steps."""
    loss_curve: list[list[float]] = field(default_factory=list)
    """Each seed's mean training loss over 20 consecutive slices of its steps (fewer with fewer steps)."""


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


def _task_parts(task: str, task_config, model_config: ProbeModelConfig):
    """``(make, n_channels, loss(model, batch, config, train), score)`` of a task, after checking its config."""
    if task == "regimes":
        if not isinstance(task_config, RegimeConfig):
            raise ValueError(f"run_task: 'task_config' expected a RegimeConfig for 'regimes', got "
                             f"{type(task_config).__name__}")
        if model_config.horizon < task_config.episode_steps - 1:
            raise ValueError(f"run_task: model 'horizon' expected >= episode_steps - 1 = "
                             f"{task_config.episode_steps - 1} (the onset forecast covers the episode), got "
                             f"{model_config.horizon}")
        return make_regimes, task_config.n_channels, _regime_loss, _score_regimes
    if task == "needle":
        if not isinstance(task_config, NeedleConfig):
            raise ValueError(f"run_task: 'task_config' expected a NeedleConfig for 'needle', got "
                             f"{type(task_config).__name__}")
        return make_needles, task_config.n_channels, (lambda m, b, c, t: _needle_loss(m, b, c)), _score_needle
    raise ValueError(f"run_task: 'task' expected one of {TASKS}, got {task!r}")


def model_widths(task: str, task_config, model_config: ProbeModelConfig) -> dict[str, tuple[int, int]]:
    """``{model: (mlp_width, parameters)}`` for ``task``: matched to the largest model when
    ``model_config.match_parameters``, else every model at ``mlp_ratio``."""
    _, n_channels, _, _ = _task_parts(task, task_config, model_config)
    if model_config.match_parameters:
        return matched_mlp_widths(model_config, n_channels)
    width = model_config.base_width
    return {n: (width, count_parameters(build_model(n, model_config, n_channels, width))) for n in model_config.models}


def train_and_score(task: str, task_config, model_config: ProbeModelConfig, train: ProbeTrainConfig,
                    evaluation: ProbeEvalConfig, name: str, seed: int, mlp_width: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Train model ``name`` on ``task`` with training seed ``seed``, then score it on the held-out streams.

    The training batch of step ``i`` is drawn from ``(seed, i)`` with the curriculum's task at that step, so every
    model sees the same data for a given seed.

    Returns:
        dict with ``bins``, ``counts``, ``metrics`` (name -> one score per bin), ``train_seconds``,
        ``cpu_seconds``, ``final_loss`` and ``loss_curve``.
    """
    make, n_channels, loss_fn, score = _task_parts(task, task_config, model_config)
    if name not in model_config.models:
        raise ValueError(f"train_and_score: 'name' expected one of {model_config.models}, got {name!r}")
    torch.manual_seed(seed)
    model = build_model(name, model_config, n_channels, mlp_width)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    lr_at = encoder_schedule(train.steps, peak=train.lr)
    losses = []
    start, cpu = time.perf_counter(), time.process_time()
    for step in range(train.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        config = task_at(task_config, reach(train.curriculum, step, train.steps))
        # the batches depend on (seed, step) only: every model sees the same data
        loss = loss_fn(model, make(config, seed * 1_000_000 + step, train.batch), config, train)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, train.steps)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    bins, counts, metrics = score(model, make(task_config, evaluation.seed, evaluation.n_streams), task_config,
                                  evaluation)
    tail = losses[-max(1, len(losses) // 10):]
    k = min(20, len(losses))
    curve = [sum(c) / len(c) for c in (losses[i * len(losses) // k:(i + 1) * len(losses) // k] for i in range(k))]
    return {"bins": bins, "counts": counts, "metrics": metrics, "train_seconds": seconds, "cpu_seconds": cpu,
            "final_loss": sum(tail) / len(tail), "loss_curve": curve}


def collect(runs: list[dict]) -> TaskResult:
    """One model's :class:`TaskResult` from its seeds' :func:`train_and_score` results (in seed order)."""
    first = runs[0]
    result = TaskResult(first["bins"], first["counts"], {k: [] for k in first["metrics"]})
    for run in runs:
        for k, v in run["metrics"].items():
            result.metrics[k].append(v)
        result.train_seconds.append(run["train_seconds"])
        result.cpu_seconds.append(run["cpu_seconds"])
        result.final_loss.append(run["final_loss"])
        result.loss_curve.append(run["loss_curve"])
    return result


def run_task(task: str, task_config: RegimeConfig | NeedleConfig, model_config: ProbeModelConfig,
             train: ProbeTrainConfig, evaluation: ProbeEvalConfig,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, TaskResult]:
    """Train every model of ``model_config`` on ``task`` for every seed, in this process, then score it on the
    held-out streams.

    Args:
        task: ``regimes`` or ``needle``.
        task_config: the task's generator configuration.
        progress: called as ``progress(description, done, total)`` after each optimizer step.

    Returns:
        ``{model name: TaskResult}``.

    Example:
        >>> from gdn2ts.apps.probes_data import NeedleConfig
        >>> r = run_task("needle", NeedleConfig(n_pairs=2, n_queries=2, min_delay=2, max_delay=6),
        ...              ProbeModelConfig(models=("gdn2", "gru"), hidden_size=8, head_dim=4),
        ...              ProbeTrainConfig(steps=2, batch=2, seeds=(0,)), ProbeEvalConfig(n_streams=4))
        >>> r["gdn2"].bins[0], len(r["gru"].metrics["accuracy"][0])
        ('[0, 16)', 5)
    """
    widths = model_widths(task, task_config, model_config)
    total = len(model_config.models) * len(train.seeds) * train.steps
    done = 0
    results: dict[str, TaskResult] = {}
    for name in model_config.models:
        runs = []
        for seed in train.seeds:
            def report(step, steps, name=name, seed=seed, offset=done):
                if progress is not None:
                    progress(f"{task}: {name}, seed {seed}", offset + step, total)

            runs.append(train_and_score(task, task_config, model_config, train, evaluation, name, seed,
                                        widths[name][0], report))
            done += train.steps
        results[name] = collect(runs)
    return results
