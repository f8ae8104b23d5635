"""The report of the MQAR grid: the learning rate of each (mixer, width) chosen on the validation sets, the test
accuracy at that rate per level with a 95 % t-interval over seeds, a markdown table and a figure.

Selection. For each (mixer, width) and learning rate, the score is the validation accuracy averaged over the test
levels and then over the seeds that have run; the chosen rate has the highest score (ties: the first in the
config's order). Test accuracy never enters the choice.

Interval. Over the ``n`` seeds' test accuracies at the chosen rate: ``mean ± t(0.975, n - 1) * s / sqrt(n)`` with
``s`` the sample standard deviation, clipped to [0, 1]; none for one seed. Five seeds that split between "found the
recall circuit" and "stayed on the plateau" give a wide interval, which is the honest answer.
"""

from __future__ import annotations

import functools
import math
import statistics
from pathlib import Path

__all__ = ["t_quantile", "t_interval", "select_learning_rates", "summarize_grid", "grid_markdown", "plot_grid"]


def _t_density(x: float, df: int) -> float:
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1 + x * x / df) ** (-(df + 1) / 2)


def _t_cdf(x: float, df: int, intervals: int = 4000) -> float:
    # Simpson's rule on [0, x]; the density is smooth, so 4,000 intervals give about 1e-12 for the x used here
    h = x / intervals
    total = _t_density(0.0, df) + _t_density(x, df)
    total += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, intervals))
    return 0.5 + total * h / 3


@functools.lru_cache(maxsize=64)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``0.5 <= p < 1``) of Student's t with ``df`` degrees of freedom, by bisection on its
    distribution function (no SciPy needed).

    Example:
        >>> round(t_quantile(0.975, 4), 4), round(t_quantile(0.975, 1), 3)
        (2.7764, 12.706)
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"t_quantile: argument 'df' expected an int >= 1, got {df!r}")
    if not 0.5 <= p < 1:
        raise ValueError(f"t_quantile: argument 'p' expected a float in [0.5, 1), got {p!r}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: list[float], confidence: float = 0.95) -> dict:
    """``{"n", "mean", "sd", "low", "high"}``: the mean of ``values`` with its two-sided t-interval at
    ``confidence``, clipped to [0, 1] (accuracies); ``sd``, ``low`` and ``high`` are None for one value.

    Example:
        >>> r = t_interval([0.9, 0.1, 0.5])
        >>> round(r["mean"], 3), round(r["sd"], 3), round(r["low"], 3), r["high"]
        (0.5, 0.4, 0.0, 1.0)
        >>> r = t_interval([0.90, 0.92, 0.94, 0.96, 0.98])
        >>> round(r["low"], 4), round(r["high"], 4)
        (0.9007, 0.9793)
    """
    values = [v for v in values if v is not None]
    if not values:
        raise ValueError("t_interval: argument 'values' expected at least one accuracy, got none")
    n, mean = len(values), statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "low": None, "high": None}
    sd = statistics.stdev(values)
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": max(0.0, mean - half), "high": min(1.0, mean + half)}


def _cells(runs: list[dict]) -> dict:
    """``{(mixer, width): {lr_index: [run, ...]}}``."""
    out: dict = {}
    for run in runs:
        out.setdefault((run["mixer"], run["width"]), {}).setdefault(run["lr_index"], []).append(run)
    return out


def _mean_valid(run: dict) -> float | None:
    values = [v for v in run["valid"].values() if v is not None]
    return statistics.fmean(values) if values else None


def select_learning_rates(runs: list[dict], lrs: list[float]) -> dict:
    """``{(mixer, width): {"lr_index", "lr", "scores": [score or None per rate], "seeds": [n per rate]}}``:
    the rate with the highest validation score (the mean over levels, then over seeds), ties to the first rate.
    Test accuracy is not read.

    Example:
        >>> runs = [{"mixer": "gdn2", "width": 64, "lr_index": i, "seed": 0, "valid": {"a": v}, "test": {"a": t}}
        ...         for i, v, t in ((0, 0.2, 0.9), (1, 0.6, 0.1))]
        >>> select_learning_rates(runs, [1e-3, 1e-2])[("gdn2", 64)]["lr"]
        0.01
    """
    out = {}
    for key, by_lr in _cells(runs).items():
        scores, seeds = [], []
        for i in range(len(lrs)):
            # a run whose loss went to NaN scores None at every level: it counts as accuracy 0
            per_seed = [_mean_valid(r) or 0.0 for r in by_lr.get(i, [])]
            scores.append(statistics.fmean(per_seed) if per_seed else None)
            seeds.append(len(per_seed))
        best = max((i for i, s in enumerate(scores) if s is not None), key=lambda i: (scores[i], -i))
        out[key] = {"lr_index": best, "lr": lrs[best], "scores": scores, "seeds": seeds}
    return out


def summarize_grid(runs: list[dict], lrs: list[float], levels: list[str], num_seeds: int) -> dict:
    """``{"selection": {...}, "cells": [{"mixer", "width", "lr", "level", "complete", "per_seed", "n", "mean",
    "sd", "low", "high"}, ...]}``: test accuracy at each (mixer, width)'s chosen rate, per level, with its
    t-interval over seeds; ``complete`` when all ``num_seeds`` seeds ran at that rate."""
    selection = select_learning_rates(runs, lrs)
    cells = _cells(runs)
    out = []
    for (mixer, width), chosen in selection.items():
        chosen_runs = sorted(cells[(mixer, width)][chosen["lr_index"]], key=lambda r: r["seed"])
        for level in levels:
            per_seed = {r["seed"]: (r["test"].get(level) or {}).get("accuracy") for r in chosen_runs}
            acc = [a if a is not None else 0.0 for a in per_seed.values()]
            out.append({"mixer": mixer, "width": width, "lr": chosen["lr"], "level": level,
                        "complete": len(acc) == num_seeds, "per_seed": per_seed, **t_interval(acc)})
    return {"selection": {f"{m}/{w}": v for (m, w), v in selection.items()}, "cells": out}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def grid_markdown(record: dict) -> str:
    """Per width: the matched models (block parameters, MLP size, state) with the chosen rate and the test
    accuracy per level (``mean [low, high] (n)``, %), then every rate's validation score."""
    config, models = record["config"], record["models"]
    levels = record["levels"]
    cells = {(c["mixer"], c["width"], c["level"]): c for c in record["summary"]["cells"]}
    selection = record["summary"]["selection"]
    lrs = config["train"]["lrs"]
    lines = [f"Runs: {record['runs_done']} of {record['runs_total']}. Test accuracy (%) at the learning rate chosen "
             f"on the validation sets: mean over seeds [95 % t-interval] (seeds).", ""]
    for shape in config["widths"]:
        width = shape["hidden_size"]
        keys = shape["num_heads"] * shape["head_k_dim"]
        lines += [f"### d_model {width}: {shape['num_heads']} heads x {shape['head_k_dim']} x {shape['head_v_dim']} "
                  f"({keys} key directions)", "",
                  "| mixer | block params | MLP | state / layer | lr | " + " | ".join(levels) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(levels)]
        for mixer in config["mixers"]:
            info = models[str(width)][mixer]
            state = info["state_floats_per_layer"]
            state = f"{state:,}" if state is not None else f"KV {info['kv_floats_per_token_per_layer']}/token"
            sel = selection.get(f"{mixer}/{width}")
            row = []
            for level in levels:
                c = cells.get((mixer, width, level))
                row.append("-" if c is None else f"{_pct(c['mean'])} [{_pct(c['low'])}, {_pct(c['high'])}] "
                           f"({c['n']})")
            lr = "-" if sel is None else f"{sel['lr']:.3g}"
            lines.append(f"| {mixer} | {info['parameters']:,} | {info['intermediate_size']} | {state} | {lr} | "
                         + " | ".join(row) + " |")
        lines += ["", "Validation accuracy (%, mean over levels and seeds) at every learning rate; * the chosen:", "",
                  "| mixer | " + " | ".join(f"{lr:.3g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
        for mixer in config["mixers"]:
            sel = selection.get(f"{mixer}/{width}")
            if sel is None:
                lines.append(f"| {mixer} | " + " | ".join("-" for _ in lrs) + " |")
                continue
            row = [f"{_pct(s)}{'*' if i == sel['lr_index'] else ''} ({n})"
                   for i, (s, n) in enumerate(zip(sel["scores"], sel["seeds"], strict=True))]
            lines.append(f"| {mixer} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_grid(record: dict, path: str | Path) -> None:
    """Top row: test accuracy against key-value pairs at the chosen rate, one panel per width, one line per mixer
    with its 95 % intervals, the dashed line at the state's key directions. Bottom row: validation score against
    learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = record["config"]
    widths = config["widths"]
    pairs = {lv["name"] or f"{lv['num_pairs']} pairs / {lv['seq_len']} tokens": lv["num_pairs"]
             for lv in config["task"]["test_levels"]}
    cells = {(c["mixer"], c["width"], c["level"]): c for c in record["summary"]["cells"]}
    selection = record["summary"]["selection"]
    fig, axes = plt.subplots(2, len(widths), figsize=(5 * len(widths), 8), squeeze=False)
    for col, shape in enumerate(widths):
        width = shape["hidden_size"]
        ax = axes[0, col]
        for mixer in config["mixers"]:
            points = sorted((pairs[level], cells[(mixer, width, level)]) for level in record["levels"]
                            if (mixer, width, level) in cells)
            if not points:
                continue
            x = [p for p, _ in points]
            y = [100 * c["mean"] for _, c in points]
            err = [[100 * (c["mean"] - c["low"]) if c["low"] is not None else 0.0 for _, c in points],
                   [100 * (c["high"] - c["mean"]) if c["high"] is not None else 0.0 for _, c in points]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=mixer,
                        linestyle="--" if mixer == "attention" else "-")
        ax.axvline(shape["num_heads"] * shape["head_k_dim"], color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("key-value pairs (dotted: key directions of the state)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"d_model {width}, state {shape['num_heads']} x {shape['head_k_dim']} x {shape['head_v_dim']}")
        ax.grid(alpha=0.3)
        ax = axes[1, col]
        for mixer in config["mixers"]:
            sel = selection.get(f"{mixer}/{width}")
            if sel is None:
                continue
            lr_points = [(lr, 100 * s) for lr, s in zip(config["train"]["lrs"], sel["scores"], strict=True)
                         if s is not None]
            ax.plot(*zip(*lr_points, strict=True), marker="o", label=mixer)
        ax.set_xscale("log")
        ax.set_ylim(-2, 102)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("validation accuracy (%, mean)")
        ax.grid(alpha=0.3)
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
