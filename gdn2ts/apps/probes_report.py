"""The ``gdn2ts probe`` command: run the recall probes of :mod:`gdn2ts.apps.probes` (on one process or several),
print tables, write a JSON record and a plot (each score against time since last seen, one line per model, with
its interval across seeds)."""

from __future__ import annotations

import json
import math
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import torch

from gdn2ts.apps.probes import (
    CONTROLS,
    TASKS,
    ProbeEvalConfig,
    ProbeModelConfig,
    ProbeTrainConfig,
    TaskResult,
    collect,
    model_widths,
    train_and_score,
)
from gdn2ts.apps.probes_data import NeedleConfig, RegimeConfig
from gdn2ts.apps.probes_models import state_floats
from gdn2ts.apps.probes_stats import mean_interval
from gdn2ts.bench.common import environment

__all__ = ["probe", "run_probes", "plot_record", "print_table", "markdown_tables", "PLOTTED"]

# the metrics drawn, one panel each: (task, metric, axis label)
PLOTTED = (("regimes", "mae", "regimes: MAE of the onset forecast"),
           ("needle", "accuracy", "needle: nearest-value accuracy"),
           ("needle", "mse", "needle: squared error of the recalled value"))
INTERVAL = ("Student t interval over seeds of the per-seed bin scores: mean ± t_{(1+level)/2, n-1} * sd / sqrt(n), "
            "sd with n - 1")


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _summary(result: TaskResult, level: float) -> dict:
    metrics = {}
    for name, per_seed in result.metrics.items():
        cols = [mean_interval(c, level) for c in zip(*per_seed, strict=True)]
        std = [statistics.stdev(c) if len(c) > 1 and all(math.isfinite(v) for v in c) else math.nan
               for c in zip(*per_seed, strict=True)]
        metrics[name] = {"per_seed": [[_finite_or_none(v) for v in row] for row in per_seed],
                         "mean": [_finite_or_none(m) for m, _, _ in cols],
                         "low": [_finite_or_none(lo) for _, lo, _ in cols],
                         "high": [_finite_or_none(hi) for _, _, hi in cols],
                         "std": [_finite_or_none(v) for v in std]}
    return {"metrics": metrics, "train_seconds": result.train_seconds, "cpu_seconds": result.cpu_seconds,
            "final_loss": result.final_loss, "loss_curve": result.loss_curve}


def _init_worker(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _load_journal(path: Path, key: str) -> dict[tuple[str, str, int], dict]:
    """The finished jobs a journal holds for the configuration ``key`` (lines of other configurations, and a last
    line cut short by a killed run, are skipped)."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("config") == key:
                done[tuple(entry["job"])] = entry["run"]
    return done


def run_probes(regimes: RegimeConfig, needle: NeedleConfig, model: ProbeModelConfig, train: ProbeTrainConfig,
               evaluation: ProbeEvalConfig, tasks: tuple[str, ...] = TASKS, quiet: bool = False,
               command: str = "", workers: int = 1, threads: int | None = None,
               journal: str | Path | None = None) -> dict:
    """Every task of ``tasks`` for every model and seed; returns the JSON-ready record (no NaN: empty bins are
    ``None``). With ``workers > 1`` the (task, model, seed) jobs run on that many processes (each with
    ``threads`` torch threads); the results do not depend on how they were spread. With ``journal``, each finished
    job is appended to that JSON-lines file, and the jobs it already holds for the same configuration are not run
    again (a run that was killed resumes where it stopped; ``resumed_jobs`` in the record counts them).

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
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"run_probes: 'workers' expected a positive int, got {workers!r}")
    configs = {"regimes": regimes, "needle": needle}
    widths = {t: model_widths(t, configs[t], model) for t in tasks}
    record = {
        "probe": "recall",
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"regimes": asdict(regimes), "needle": asdict(needle), "model": asdict(model),
                   "train": asdict(train), "evaluation": asdict(evaluation), "tasks": list(tasks)},
        "interval": f"{INTERVAL}; level {evaluation.level}",
        "models": {},
        "tasks": {},
    }
    lengths = {"regimes": regimes.length, "needle": needle.length}
    for name in model.models:
        record["models"][name] = {
            "role": "control" if name in CONTROLS else "mixer",
            "parameters": {t: widths[t][name][1] for t in tasks},
            "mlp_width": {t: widths[t][name][0] for t in tasks},
            # per layer and stream, at the end of a stream (only the attention control's grows with it)
            "state_floats_per_layer": {t: state_floats(name, model, configs[t].n_channels, lengths[t]) for t in tasks},
        }
    # the slowest jobs first, so that the last ones to finish are short
    jobs = sorted(((t, n, s) for t in tasks for n in model.models for s in train.seeds),
                  key=lambda j: (j[1] != "gru", j[0] != "regimes"))
    start, cpu = time.perf_counter(), _cpu_seconds()
    key = json.dumps(record["config"], sort_keys=True)
    runs: dict[tuple[str, str, int], dict] = {}
    if journal is not None:
        journal = Path(journal)
        runs = {j: r for j, r in _load_journal(journal, key).items() if j in set(jobs)}
        journal.parent.mkdir(parents=True, exist_ok=True)
    resumed = len(runs)
    jobs = [j for j in jobs if j not in runs]

    def finished(job, run):
        runs[job] = run
        if journal is not None:
            with journal.open("a") as f:
                f.write(json.dumps({"config": key, "job": list(job), "run": run}, allow_nan=True) + "\n")

    progress = None
    if not quiet:
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        bar = progress.add_task("probes", total=(len(jobs) + resumed) * train.steps, completed=resumed * train.steps)
    try:
        if workers == 1:
            _init_worker(threads)
            for i, (t, n, s) in enumerate(jobs):
                def report(step, steps, i=i, t=t, n=n, s=s):
                    if progress is not None:
                        progress.update(bar, description=f"{t}: {n}, seed {s}",
                                        completed=(resumed + i) * train.steps + step)

                finished((t, n, s), train_and_score(t, configs[t], model, train, evaluation, n, s,
                                                    widths[t][n][0], report))
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                     initargs=(threads,)) as pool:
                futures = {pool.submit(train_and_score, t, configs[t], model, train, evaluation, n, s,
                                       widths[t][n][0]): (t, n, s) for t, n, s in jobs}
                for future in as_completed(futures):
                    t, n, s = futures[future]
                    finished((t, n, s), future.result())
                    if progress is not None:
                        progress.update(bar, description=f"{t}: {n}, seed {s} done",
                                        completed=len(runs) * train.steps)
    finally:
        if progress is not None:
            progress.stop()
    for t in tasks:
        results = {n: collect([runs[t, n, s] for s in train.seeds]) for n in model.models}
        first = next(iter(results.values()))
        record["tasks"][t] = {"bins": first.bins, "counts": first.counts,
                              "models": {n: _summary(r, evaluation.level) for n, r in results.items()}}
    record["seconds"] = time.perf_counter() - start
    record["cpu_seconds"] = _cpu_seconds() - cpu
    record["workers"] = workers
    record["resumed_jobs"] = resumed
    record["environment"] = environment()
    return record


def print_table(record: dict) -> None:
    """One rich table per task and metric: each model's mean per bin with its interval across seeds."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    level = record["config"]["evaluation"]["level"]
    seeds = len(record["config"]["train"]["seeds"])
    for task, data in record["tasks"].items():
        for metric in next(iter(data["models"].values()))["metrics"]:
            table = Table(title=f"{task}: {metric} by time since last seen (mean [{level:.0%} interval] over "
                                f"{seeds} seeds)")
            table.add_column("model")
            for label, count in zip(data["bins"], data["counts"], strict=True):
                table.add_column(f"{label}\nn={count}", justify="right")
            table.add_column("train s", justify="right")
            for name, res in data["models"].items():
                m = res["metrics"][metric]
                cells = [_cell(mu, lo, hi) for mu, lo, hi in zip(m["mean"], m["low"], m["high"], strict=True)]
                table.add_row(name, *cells, f"{statistics.fmean(res['train_seconds']):.0f}")
            console.print(table)


def markdown_tables(record: dict, digits: int = 3) -> str:
    """The record's scores as Markdown tables (one per task and metric: a row per model, a column per bin, each
    cell ``mean [low, high]``), as docs/probes.md shows them.

    Example:
        >>> rec = {"config": {"evaluation": {"level": 0.95}, "train": {"seeds": [0, 1]}}, "tasks": {"needle": {
        ...     "bins": ["[0, 16)"], "counts": [5], "models": {"gdn2": {"metrics": {"accuracy": {
        ...         "mean": [0.5], "low": [0.25], "high": [0.75]}}}}}}}
        >>> print(markdown_tables(rec))
        **needle: accuracy** (mean [95% interval] over 2 seeds)
        <BLANKLINE>
        | model | [0, 16) n=5 |
        |---|---|
        | gdn2 | 0.500 [0.250, 0.750] |
        <BLANKLINE>
    """
    level = record["config"]["evaluation"]["level"]
    seeds = len(record["config"]["train"]["seeds"])
    out = []
    for task, data in record["tasks"].items():
        for metric in next(iter(data["models"].values()))["metrics"]:
            out.append(f"**{task}: {metric}** (mean [{level:.0%} interval] over {seeds} seeds)\n")
            heads = [f"{b} n={c}" for b, c in zip(data["bins"], data["counts"], strict=True)]
            out.append("| model | " + " | ".join(heads) + " |")
            out.append("|---|" + "---|" * len(heads))
            for name, res in data["models"].items():
                m = res["metrics"][metric]
                cells = [_cell(mu, lo, hi, digits) for mu, lo, hi in zip(m["mean"], m["low"], m["high"], strict=True)]
                out.append(f"| {name} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def _cell(mu, lo, hi, digits: int = 3) -> str:
    if mu is None:
        return "-"
    return f"{mu:.{digits}f}" if lo is None else f"{mu:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def plot_record(record: dict, path: str | Path) -> None:
    """One panel per plotted metric (:data:`PLOTTED`) of the record's tasks: the mean against the bin, one line
    per model with its interval across seeds as error bars; controls dashed; the regimes' first occurrences are
    the rightmost point, the needle's chance accuracy a grey line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PLOTTED if p[0] in record["tasks"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    names = list(record["models"])
    for ax, (task, metric, label) in zip(axes[0], panels, strict=True):
        data = record["tasks"][task]
        x = list(range(len(data["bins"])))
        for k, (name, res) in enumerate(data["models"].items()):
            m = res["metrics"][metric]
            y = [math.nan if v is None else v for v in m["mean"]]
            lo = [0.0 if v is None or lo is None else v - lo for v, lo in zip(m["mean"], m["low"], strict=True)]
            hi = [0.0 if v is None or hi is None else hi - v for v, hi in zip(m["mean"], m["high"], strict=True)]
            # a small offset per model keeps the error bars of one bin apart
            offset = (k - (len(names) - 1) / 2) * 0.06
            control = record["models"][name]["role"] == "control"
            ax.errorbar([xi + offset for xi in x], y, yerr=[lo, hi], marker="s" if control else "o", markersize=4,
                        capsize=2, linestyle="--" if control else "-", linewidth=1.2, label=name)
        if metric == "accuracy":
            pairs = record["config"]["needle"]["n_pairs"]
            ax.axhline(1 / pairs, color="grey", linewidth=0.8, linestyle=":", label=f"chance (1/{pairs})")
        ax.set_xticks(x, [f"{b}\nn={c}" for b, c in zip(data["bins"], data["counts"], strict=True)], fontsize=7)
        ax.set_xlabel("time since last seen" if task == "regimes" else "query delay (time since the pair)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    level = record["config"]["evaluation"]["level"]
    fig.suptitle(f"recall against time since last seen: mean over {len(record['config']['train']['seeds'])} "
                 f"seeds, {level:.0%} t intervals", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# the configs are frozen, so one shared default instance each is safe
_REGIMES, _NEEDLE, _MODEL = RegimeConfig(), NeedleConfig(), ProbeModelConfig()
_TRAIN, _EVALUATION = ProbeTrainConfig(), ProbeEvalConfig()


def probe(regimes: RegimeConfig = _REGIMES, needle: NeedleConfig = _NEEDLE, model: ProbeModelConfig = _MODEL,
          train: ProbeTrainConfig = _TRAIN, evaluation: ProbeEvalConfig = _EVALUATION, tasks: tuple[str, ...] = TASKS,
          json: str | None = None, plot: str | None = None, threads: int | None = None, workers: int = 1,
          journal: str | None = None, quiet: bool = False) -> dict:
    """Rare-regime recall probes: GDN-2, its two ablations, KDA, GDN, Mamba-2 and a block-diagonal GRU matched
    in state and parameters, beside an attention (positive) and a memoryless (negative) control; one budget.

    Args:
        regimes: the rare-regime streams.
        needle: the delayed multi-key lookup.
        model: the models compared and their size.
        train: the training budget and curriculum (the same for every model).
        evaluation: held-out streams, score bins and the intervals' level.
        tasks: which tasks to run (regimes, needle).
        json: path of the JSON record to write.
        plot: path of the plot (PNG) to write.
        threads: torch CPU threads per process (default: torch's choice).
        workers: processes that share the (task, model, seed) jobs.
        journal: JSON-lines file of finished jobs: each is appended as it ends, and a rerun of the same
            configuration skips the jobs it holds (resuming a killed run).
        quiet: print nothing.
    """
    command = "gdn2ts probe"
    record = run_probes(regimes, needle, model, train, evaluation, tuple(tasks), quiet=quiet, command=command,
                        workers=workers, threads=threads, journal=journal)
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
