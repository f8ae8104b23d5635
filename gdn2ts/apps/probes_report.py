"""The ``gdn2ts probe`` command: run the recall probes of :mod:`gdn2ts.apps.probes`, print a table, write a
JSON record and a plot (error against time since last seen, one line per model, mean and spread over seeds)."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gdn2ts.apps.baselines import encoder_state_floats
from gdn2ts.apps.probes import (
    TASKS,
    ProbeEvalConfig,
    ProbeModelConfig,
    ProbeTrainConfig,
    TaskResult,
    build_model,
    run_task,
)
from gdn2ts.apps.probes_data import NeedleConfig, RegimeConfig
from gdn2ts.bench.common import environment

__all__ = ["probe", "run_probes", "plot_record", "PLOTTED"]

# the metric drawn (and tabulated first) for each task, and its label
PLOTTED = {"regimes": ("mae", "MAE of the onset forecast"), "needle": ("mse", "squared error of the recalled value")}


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _summary(result: TaskResult) -> dict:
    metrics = {}
    for name, per_seed in result.metrics.items():
        cols = list(zip(*per_seed, strict=True))
        mean = [statistics.fmean(c) if all(math.isfinite(v) for v in c) else math.nan for c in cols]
        std = [statistics.pstdev(c) if all(math.isfinite(v) for v in c) else math.nan for c in cols]
        metrics[name] = {"per_seed": [[_finite_or_none(v) for v in row] for row in per_seed],
                         "mean": [_finite_or_none(v) for v in mean], "std": [_finite_or_none(v) for v in std]}
    return {"metrics": metrics, "train_seconds": result.train_seconds, "final_loss": result.final_loss}


def run_probes(regimes: RegimeConfig, needle: NeedleConfig, model: ProbeModelConfig, train: ProbeTrainConfig,
               evaluation: ProbeEvalConfig, tasks: tuple[str, ...] = TASKS, quiet: bool = False,
               command: str = "") -> dict:
    """Every task of ``tasks`` for every model and seed; returns the JSON-ready record (no NaN: empty bins are
    ``None``).

    Example:
        >>> from gdn2ts.apps.probes_data import NeedleConfig, RegimeConfig
        >>> rec = run_probes(RegimeConfig(length=24, min_gap=4, max_gap=8), NeedleConfig(), ProbeModelConfig(
        ...     models=("gdn", "gru"), hidden_size=8, head_dim=4), ProbeTrainConfig(steps=1, batch=2, seeds=(0,)),
        ...     ProbeEvalConfig(n_streams=4), tasks=("regimes",), quiet=True)
        >>> sorted(rec["tasks"]["regimes"]["models"]), rec["tasks"]["regimes"]["bins"][-1]
        (['gdn', 'gru'], 'first')
    """
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad or len(set(tasks)) != len(tasks):
        raise ValueError(f"run_probes: 'tasks' expected distinct names from {TASKS}, got {tasks!r}")
    configs = {"regimes": regimes, "needle": needle}
    record = {
        "probe": "recall",
        "command": command,
        "config": {"regimes": asdict(regimes), "needle": asdict(needle), "model": asdict(model),
                   "train": asdict(train), "evaluation": asdict(evaluation), "tasks": list(tasks)},
        "models": {},
        "tasks": {},
    }
    for name in model.models:
        enc = model.encoder(regimes.n_channels)
        record["models"][name] = {
            "state_floats_per_layer": encoder_state_floats(enc),
            "parameters": {t: sum(p.numel() for p in build_model(name, model.encoder(
                configs[t].n_channels, "gdn2" if name == "gru" else name)).parameters()) for t in tasks},
        }
    start = time.perf_counter()
    progress = None
    if not quiet:
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        bar = progress.add_task("probes", total=None)
    try:
        for task in tasks:
            def report(desc, done, total):
                if progress is not None:
                    progress.update(bar, description=desc, completed=done, total=total)

            results = run_task(task, configs[task], model, train, evaluation, progress=report)
            first = next(iter(results.values()))
            record["tasks"][task] = {"bins": first.bins, "counts": first.counts,
                                     "models": {name: _summary(r) for name, r in results.items()}}
    finally:
        if progress is not None:
            progress.stop()
    record["seconds"] = time.perf_counter() - start
    record["environment"] = environment()
    return record


def print_table(record: dict) -> None:
    """One rich table per task: each model's metrics per bin, mean ± spread over seeds."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for task, data in record["tasks"].items():
        seeds = len(record["config"]["train"]["seeds"])
        for metric in next(iter(data["models"].values()))["metrics"]:
            table = Table(title=f"{task}: {metric} by time since last seen (mean ± std over {seeds} seeds)")
            table.add_column("model")
            for label, count in zip(data["bins"], data["counts"], strict=True):
                table.add_column(f"{label}\nn={count}", justify="right")
            table.add_column("train s", justify="right")
            for name, res in data["models"].items():
                m = res["metrics"][metric]
                cells = ["-" if mu is None else f"{mu:.3f} ± {sd:.3f}" for mu, sd in zip(m["mean"], m["std"],
                                                                                         strict=True)]
                table.add_row(name, *cells, f"{statistics.fmean(res['train_seconds']):.0f}")
            console.print(table)


def plot_record(record: dict, path: str | Path) -> None:
    """Error against time since last seen, one panel per task, one line per model (error bars: spread over
    seeds); the regimes' first occurrences are the rightmost point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(record["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        data = record["tasks"][task]
        metric, label = PLOTTED[task]
        x = list(range(len(data["bins"])))
        for name, res in data["models"].items():
            m = res["metrics"][metric]
            y = [math.nan if v is None else v for v in m["mean"]]
            e = [0.0 if v is None else v for v in m["std"]]
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=name)
        ax.set_xticks(x, [f"{b}\nn={c}" for b, c in zip(data["bins"], data["counts"], strict=True)], fontsize=7)
        ax.set_xlabel("time since last seen" if task == "regimes" else "query delay (time since the pair)")
        ax.set_ylabel(label)
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# the configs are frozen, so one shared default instance each is safe
_REGIMES, _NEEDLE, _MODEL = RegimeConfig(), NeedleConfig(), ProbeModelConfig()
_TRAIN, _EVALUATION = ProbeTrainConfig(), ProbeEvalConfig()


def probe(regimes: RegimeConfig = _REGIMES, needle: NeedleConfig = _NEEDLE, model: ProbeModelConfig = _MODEL,
          train: ProbeTrainConfig = _TRAIN, evaluation: ProbeEvalConfig = _EVALUATION, tasks: tuple[str, ...] = TASKS,
          json: str | None = None, plot: str | None = None, threads: int | None = None,
          quiet: bool = False) -> dict:
    """Rare-regime recall probes: GDN-2, KDA, GDN and a GRU of equal state size, one training budget.

    Args:
        regimes: the rare-regime streams.
        needle: the delayed multi-key lookup.
        model: the models compared and their size.
        train: the training budget (the same for every model).
        evaluation: held-out streams and score bins.
        tasks: which tasks to run (regimes, needle).
        json: path of the JSON record to write.
        plot: path of the plot (PNG) to write.
        threads: torch CPU threads (default: torch's choice).
        quiet: print nothing.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    command = "gdn2ts probe"
    record = run_probes(regimes, needle, model, train, evaluation, tuple(tasks), quiet=quiet, command=command)
    if json is not None:
        Path(json).parent.mkdir(parents=True, exist_ok=True)
        Path(json).write_text(_json_dumps(record) + "\n")
    if plot is not None:
        plot_record(record, plot)
    if not quiet:
        print_table(record)
    return record


def _json_dumps(record: dict) -> str:
    # strict JSON: a NaN that slipped through is an error here, not an invalid file later
    return json.dumps(record, indent=1, allow_nan=False)
