"""The ``gdn2ts lm mqar`` command: every (level, mixer, seed) run of :mod:`gdn2ts.lm.eval.mqar_run`, a JSON record
written after each run (a rerun with the same config skips the runs it holds), a markdown table of held-out
accuracy (mean ± sample std over seeds) and a figure (accuracy against difficulty; training-loss curves)."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gdn2ts.lm.eval.mqar import MQARConfig, make_mqar
from gdn2ts.lm.eval.mqar_run import MQAREvalConfig, MQARModelConfig, MQARTrainConfig, train_mqar_run
from gdn2ts.models.lm import CausalLM
from gdn2ts.models.lm_config import MIXERS

__all__ = ["mqar", "run_mqar", "summarize", "markdown_table", "plot_mqar", "MQAR_MIXERS"]

# the comparison of the paper (GDN2.md section 5): GDN-2, its two ablations and the three baselines
MQAR_MIXERS = ("gdn2", "erase_only", "write_only", "kda", "gdn", "mamba2")


def _clean(x):
    """JSON-ready: a NaN or an infinity becomes None, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def summarize(record: dict) -> dict:
    """``{level label: {mixer: {"mean", "std", "n", "per_seed"}}}`` of held-out accuracy; ``std`` is the sample
    standard deviation over seeds (0 for one seed).

    Example:
        >>> rec = {"runs": {"a/gdn2/0": {"level": "a", "mixer": "gdn2", "seed": 0, "accuracy": 0.5},
        ...                 "a/gdn2/1": {"level": "a", "mixer": "gdn2", "seed": 1, "accuracy": 0.7}}}
        >>> s = summarize(rec)["a"]["gdn2"]
        >>> round(s["mean"], 3), round(s["std"], 3), s["n"]
        (0.6, 0.141, 2)
    """
    out: dict = {}
    for run in record["runs"].values():
        cell = out.setdefault(run["level"], {}).setdefault(run["mixer"], {"per_seed": {}})
        cell["per_seed"][run["seed"]] = run["accuracy"]
    for level in out.values():
        for cell in level.values():
            acc = [a for a in cell["per_seed"].values() if a is not None]
            cell["n"] = len(acc)
            cell["mean"] = statistics.fmean(acc) if acc else None
            cell["std"] = statistics.stdev(acc) if len(acc) > 1 else (0.0 if acc else None)
    return out


def markdown_table(record: dict) -> str:
    """Held-out accuracy (%) of every mixer at every level, ``mean ± std (n seeds)``, with the block (non-embedding)
    parameters and the recurrent state per layer."""
    summary = summarize(record)
    levels = record["levels"]
    lines = ["| mixer | block parameters | state floats / layer | " + " | ".join(levels) + " |",
             "|---|---:|---:|" + "---:|" * len(levels)]
    for mixer, info in record["models"].items():
        cells = []
        for level in levels:
            c = summary.get(level, {}).get(mixer)
            cells.append("-" if c is None or c["mean"] is None else
                         f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f} ({c['n']})")
        state = info["state_floats_per_layer"]
        lines.append(f"| {mixer} | {info['parameters']:,} | {'KV cache' if state is None else f'{state:,}'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_mqar(record: dict, path: str | Path) -> None:
    """Accuracy against difficulty (one line per mixer, error bars: std over seeds), then one panel of mean
    training loss against step per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, levels = summarize(record), record["levels"]
    fig, axes = plt.subplots(1, 1 + len(levels), figsize=(5 * (1 + len(levels)), 4), squeeze=False)
    ax = axes[0, 0]
    x = list(range(len(levels)))
    for mixer in record["models"]:
        cells = [summary.get(level, {}).get(mixer) for level in levels]
        y = [math.nan if c is None or c["mean"] is None else 100 * c["mean"] for c in cells]
        e = [0.0 if c is None or c["std"] is None else 100 * c["std"] for c in cells]
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=mixer)
    ax.set_xticks(x, levels, fontsize=8)
    ax.set_xlabel("difficulty")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("MQAR accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for ax, level in zip(axes[0, 1:], levels, strict=True):
        for mixer in record["models"]:
            runs = [r for r in record["runs"].values() if r["level"] == level and r["mixer"] == mixer]
            if not runs:
                continue
            steps = runs[0]["curve"]["step"]
            losses = [[math.nan if v is None else v for v in r["curve"]["loss"]] for r in runs]
            ax.plot(steps, [statistics.fmean(col) for col in zip(*losses, strict=True)], label=mixer)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (answers)")
        ax.set_title(level)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _config(levels, model, mixers, train, evaluation) -> dict:
    config = {"levels": [asdict(lv) for lv in levels], "model": asdict(model), "mixers": list(mixers),
              "train": asdict(train), "evaluation": asdict(evaluation)}
    # as it reads back from JSON (tuples become lists), so that a rerun recognizes its own config
    return json.loads(json.dumps(config))


def run_mqar(levels: tuple[MQARConfig, ...], model: MQARModelConfig, mixers: tuple[str, ...],
             train: MQARTrainConfig, evaluation: MQAREvalConfig, out: str | Path, device: str | None = None,
             fresh: bool = False, quiet: bool = False, command: str = "") -> dict:
    """Every run of the grid; ``out/mqar.json`` is rewritten after each run and ``out/mqar.md`` and
    ``out/mqar.png`` at the end. With an existing ``mqar.json`` of the same config the runs it holds are kept
    and skipped (an interrupted grid continues); of another config it is a ValueError unless ``fresh``.

    Example:
        >>> import tempfile
        >>> rec = run_mqar((MQARConfig(vocab_size=16, num_pairs=2, seq_len=10),), MQARModelConfig(
        ...     hidden_size=16, num_layers=1, intermediate_size=16, num_heads=2, head_k_dim=8, head_v_dim=8,
        ...     gate_low_rank=4, attn_head_dim=8), ("gdn2",), MQARTrainConfig(steps=2, batch_size=2,
        ...     warmup_steps=1, seeds=(0,)), MQAREvalConfig(num_examples=4, curve_examples=2), tempfile.mkdtemp(),
        ...     device="cpu", quiet=True)
        >>> list(rec["runs"]), sorted(rec["summary"]["2 pairs / 10 tokens"])
        (['2 pairs / 10 tokens/gdn2/0'], ['gdn2'])
    """
    levels, mixers = tuple(levels), tuple(mixers)
    if not levels or not all(isinstance(lv, MQARConfig) for lv in levels):
        raise ValueError(f"run_mqar: argument 'levels' expected a non-empty list of MQARConfig, got {levels!r}")
    labels = [lv.label for lv in levels]
    if len(set(labels)) != len(labels):
        raise ValueError(f"run_mqar: argument 'levels' expected distinct levels (names), got {labels}")
    if not mixers or len(set(mixers)) != len(mixers) or any(m not in MIXERS for m in mixers):
        raise ValueError(f"run_mqar: argument 'mixers' expected distinct names from {MIXERS}, got {mixers!r}")
    dev = torch.device(device if device else ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    path = out / "mqar.json"
    config = _config(levels, model, mixers, train, evaluation)
    runs: dict = {}
    if path.is_file() and not fresh:
        old = json.loads(path.read_text())
        if old.get("config") != config:
            raise ValueError(f"run_mqar: '{path}' holds runs of another config; pass fresh=True (--fresh true) to "
                             f"start over, or another 'out' folder")
        runs = old.get("runs", {})
    with torch.device("meta"):
        models = {m: CausalLM(model.lm_config(m, levels[0].vocab_size)) for m in mixers}
    record = {"task": "mqar", "command": command, "config": config, "device": str(dev), "levels": labels,
              "models": {m: {"parameters": lm.num_parameters()["blocks"],
                             "state_floats_per_layer": None if m in ("swa", "attention")
                             else model.state_floats_per_layer} for m, lm in models.items()},
              "runs": runs}
    total = len(levels) * len(mixers) * len(train.seeds)
    done, start = 0, time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for level in levels:
        eval_ids, eval_labels = make_mqar(level, evaluation.num_examples, seed=evaluation.seed)
        eval_ids, eval_labels = eval_ids.to(dev), eval_labels.to(dev)
        for mixer in mixers:
            for seed in train.seeds:
                done += 1
                key = f"{level.label}/{mixer}/{seed}"
                if key in runs:
                    continue

                run_start = time.perf_counter()

                def report(step, loss, key=key, n=done, t0=run_start):
                    if not quiet and (step % (train.log_every * 4) == 0 or step == train.steps):
                        print(f"  [{n}/{total}] {key} step {step}/{train.steps} loss {loss:.4f} "
                              f"({time.perf_counter() - t0:.1f} s)", flush=True)

                result = train_mqar_run(level, mixer, seed, model, train, eval_ids, eval_labels,
                                        evaluation.batch_size, evaluation.curve_examples, dev, report)
                runs[key] = _clean({"level": level.label, "mixer": mixer, "seed": seed, **result})
                record["seconds"] = time.perf_counter() - start
                path.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
                if not quiet:
                    print(f"[{done}/{total}] {key}: accuracy {result['accuracy']:.3f} (sequences "
                          f"{result['sequence_accuracy']:.3f}) in {result['train_seconds']:.1f} s, "
                          f"{result['steps_per_second']:.1f} steps/s; {time.perf_counter() - start:.0f} s so far",
                          flush=True)
    from gdn2ts.bench.common import environment

    record["summary"] = summarize(record)
    record["environment"] = environment()
    record["seconds"] = time.perf_counter() - start
    path.write_text(json.dumps(_clean(record), indent=1, allow_nan=False) + "\n")
    (out / "mqar.md").write_text(markdown_table(record))
    plot_mqar(record, out / "mqar.png")
    return record


# the configs are frozen, so one shared default instance each is safe
_LEVELS = (MQARConfig(num_pairs=16, seq_len=128), MQARConfig(num_pairs=64, seq_len=256))
_MODEL, _TRAIN, _EVALUATION = MQARModelConfig(), MQARTrainConfig(), MQAREvalConfig()


def mqar(levels: tuple[MQARConfig, ...] = _LEVELS, model: MQARModelConfig = _MODEL,
         mixers: tuple[str, ...] = MQAR_MIXERS, train: MQARTrainConfig = _TRAIN,
         evaluation: MQAREvalConfig = _EVALUATION, out: str = "mqar-results", device: str | None = None,
         threads: int | None = None, fresh: bool = False, quiet: bool = False) -> dict:
    """MQAR at matched state size: train each mixer at each difficulty level and seed, score held-out recall.

    Args:
        levels: the difficulty levels (pairs, sequence length, vocabulary, queries).
        model: the model shape shared by every mixer (the recurrent state is the same for all).
        mixers: mixer names (gdn2, erase_only, write_only, kda, gdn, mamba2; swa, attention as references).
        train: the training budget, the same for every run.
        evaluation: the held-out sequences.
        out: folder of mqar.json (rewritten after every run), mqar.md and mqar.png.
        device: cuda or cpu (default: cuda when available).
        threads: torch CPU threads (default: torch's choice).
        fresh: discard the runs of an existing mqar.json in out.
        quiet: print nothing.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        record = run_mqar(tuple(levels), model, tuple(mixers), train, evaluation, out, device=device, fresh=fresh,
                          quiet=quiet, command="gdn2ts lm mqar")
    except ValueError as e:
        raise SystemExit(f"gdn2ts lm mqar: {e}") from None
    if not quiet:
        print(markdown_table(record), end="")
        print(f"wrote {Path(out) / 'mqar.json'}, {Path(out) / 'mqar.md'}, {Path(out) / 'mqar.png'} "
              f"({record['seconds']:.0f} s)")
    return record
