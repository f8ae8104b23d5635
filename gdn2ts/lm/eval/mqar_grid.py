"""The ``gdn2ts lm mqar-grid`` command: MQAR as the recall literature runs it (the Zoology protocol), every
(width, mixer, learning rate, seed) of an :class:`~gdn2ts.lm.eval.mqar_grid_config.MQARGridConfig`, in shards,
resumable, with its report.

Every run writes one file, ``OUT/runs/<mixer>-d<width>-lr<i>-s<seed>.json``, when it ends; a run whose file holds
the grid's digest is never run again. So the grid can be cut into shards (``--shard i/n``: every n-th run of the
filtered list), run in any order over several machines or sessions, interrupted at any point (``--stop_after_s``
starts no run after that many seconds), and the report (``OUT/mqar_grid.json``, ``.md``, ``.png``) is rebuilt from
every run file present, whichever shard wrote it. ``--workers k`` trains k runs at a time in k processes: at these
model sizes a run keeps the GPU busy a fraction of the time, launching kernels.

The training of one run: a fresh :class:`~gdn2ts.models.lm.CausalLM` (weights seeded by the run's seed), AdamW
(betas 0.9 and ``adam_beta2``, weight decay on matrices only), linear warmup then cosine, gradient clipping,
cross-entropy at the answers only (the output head runs on the answer positions alone), bf16 autocast on CUDA;
each step's batch is fresh sequences of one train level (``task.schedule``), drawn on the device from a generator
seeded by the run's seed, so every mixer and rate sees the same stream.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from gdn2ts.lm.eval.mqar import IGNORE_INDEX, MQARConfig, make_mqar
from gdn2ts.lm.eval.mqar_grid_config import (
    MQARGridConfig,
    MQARGridEvalConfig,
    MQARGridTask,
    MQARGridTrainConfig,
    match_parameters,
)
from gdn2ts.lm.eval.mqar_grid_report import grid_markdown, plot_grid, summarize_grid
from gdn2ts.lm.eval.mqar_run import MQARModelConfig, _param_groups, answer_logits, score_answers
from gdn2ts.models.lm import CausalLM
from gdn2ts.models.schedule import WarmupCosine

__all__ = ["GridRun", "grid_runs", "shard_runs", "grid_models", "train_grid_run", "run_grid", "grid_report",
           "mqar_grid"]


@dataclass(frozen=True)
class GridRun:
    """One run of the grid."""

    mixer: str
    width: int
    lr_index: int
    lr: float
    seed: int

    @property
    def key(self) -> str:
        """``<mixer>/d<width>/lr<i>/s<seed>``."""
        return f"{self.mixer}/d{self.width}/lr{self.lr_index}/s{self.seed}"

    @property
    def filename(self) -> str:
        """``<mixer>-d<width>-lr<i>-s<seed>.json``."""
        return f"{self.mixer}-d{self.width}-lr{self.lr_index}-s{self.seed}.json"


def grid_runs(config: MQARGridConfig, only_mixers=None, only_widths=None) -> list[GridRun]:
    """Every run of the grid, width by width, then mixer, rate and seed; ``only_mixers`` / ``only_widths`` keep
    those (names of the config's mixers, hidden sizes of its widths; None: all).

    Example:
        >>> from gdn2ts.lm.eval.mqar_grid_config import MQARGridTask
        >>> lv = MQARConfig(vocab_size=32, num_pairs=2, seq_len=12)
        >>> cfg = MQARGridConfig(MQARGridTask((lv,), (lv,)), (MQARModelConfig(hidden_size=16, attn_head_dim=8),),
        ...                      ("gdn2", "gdn"), MQARGridTrainConfig(lrs=(1e-3, 1e-2), seeds=(0, 1)))
        >>> [r.key for r in grid_runs(cfg, only_mixers=["gdn"])][:3]
        ['gdn/d16/lr0/s0', 'gdn/d16/lr0/s1', 'gdn/d16/lr1/s0']
    """
    mixers = tuple(config.mixers if only_mixers is None else only_mixers)
    widths = tuple(w.hidden_size for w in config.widths) if only_widths is None else tuple(only_widths)
    unknown = [m for m in mixers if m not in config.mixers]
    if unknown or not mixers:
        raise ValueError(f"grid_runs: argument 'only_mixers' expected names from the grid's mixers "
                         f"{list(config.mixers)}, got {list(mixers)}")
    known = [w.hidden_size for w in config.widths]
    if not widths or any(w not in known for w in widths):
        raise ValueError(f"grid_runs: argument 'only_widths' expected hidden sizes from the grid's widths {known}, "
                         f"got {list(widths)}")
    return [GridRun(m, w.hidden_size, i, lr, s) for w in config.widths if w.hidden_size in widths
            for m in config.mixers if m in mixers
            for i, lr in enumerate(config.train.lrs) for s in config.train.seeds]


def shard_runs(runs: list[GridRun], shard: str) -> list[GridRun]:
    """Shard ``"i/n"`` (1-based): runs ``i - 1``, ``i - 1 + n``, ... of ``runs``, so that every shard holds a
    share of every width and mixer.

    Example:
        >>> shard_runs(list(range(7)), "2/3")
        [1, 4]
    """
    parts = shard.split("/") if isinstance(shard, str) else []
    ok = len(parts) == 2 and all(p.isdigit() for p in parts) and 1 <= int(parts[0]) <= int(parts[1])
    if not ok:
        raise ValueError(f"shard_runs: argument 'shard' expected 'i/n' with 1 <= i <= n, got {shard!r}")
    i, n = int(parts[0]), int(parts[1])
    return runs[i - 1::n]


def grid_models(config: MQARGridConfig) -> dict[str, dict[str, dict]]:
    """``{str(width): {mixer: match_parameters(...) entry}}``: the matched model of every cell of the grid."""
    return {str(w.hidden_size): match_parameters(w, config.mixers, config.task.vocab_size, config.match_tolerance)
            for w in config.widths}


def _held_out(config: MQARGridConfig, device: torch.device) -> dict[str, dict[str, tuple]]:
    """``{"valid" | "test": {level label: (ids, labels)}}`` on ``device``; level ``i`` from seed ``seed + i``."""
    e = config.evaluation
    out: dict = {"valid": {}, "test": {}}
    for i, level in enumerate(config.task.test_levels):
        for split, n, seed in (("valid", e.valid_examples, e.valid_seed), ("test", e.test_examples, e.test_seed)):
            ids, labels = make_mqar(level, n, seed=seed + i)
            out[split][level.label] = (ids.to(device), labels.to(device))
    return out


def train_grid_run(config: MQARGridConfig, run: GridRun, intermediate_size: int, held_out: dict,
                   device: torch.device) -> dict:
    """Train the model of ``run`` (its width's shape with the MLP of ``intermediate_size``) and score it on the
    validation and test sets of every test level (``held_out``, from ``_held_out``).

    Returns the run's record: its identity, ``valid`` ``{level: accuracy}``, ``test`` ``{level: {"accuracy",
    "sequence_accuracy", "loss"}}``, ``curve`` ``{"step", "loss"}`` (mean loss since the previous point),
    ``train_seconds``, ``eval_seconds``, ``steps_per_second``, ``parameters``, ``intermediate_size``.
    """
    t = config.train
    shape = replace(config.width(run.width), intermediate_size=intermediate_size)
    torch.manual_seed(run.seed)
    model = CausalLM(shape.lm_config(run.mixer, config.task.vocab_size)).to(device)
    model.train()
    opt = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=run.lr, betas=(0.9, t.adam_beta2))
    lr_at = WarmupCosine(t.warmup_steps, t.steps, t.min_lr_ratio, peak=run.lr)
    amp = torch.bfloat16 if device.type == "cuda" else None
    # the same stream for every mixer and rate of a seed: the comparison is paired
    gen = torch.Generator(device=device).manual_seed(1_000_003 * (run.seed + 1))
    levels = config.task.train_levels
    order = config.task.schedule(t.steps)
    curve = {"step": [], "loss": []}
    running, since = torch.zeros((), device=device), 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(t.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ids, labels = make_mqar(levels[order[step]], t.batch_size, gen, device)
        mask = labels != IGNORE_INDEX
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = answer_logits(model, ids, mask)
        loss = F.cross_entropy(logits.float(), labels[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        running += loss.detach()
        since += 1
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            curve["step"].append(step + 1)
            curve["loss"].append(float(running) / since)
            running.zero_()
            since = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - start
    batch = config.evaluation.batch_size
    valid = {label: score_answers(model, *data, batch, amp)["accuracy"] for label, data in held_out["valid"].items()}
    test = {label: score_answers(model, *data, batch, amp) for label, data in held_out["test"].items()}
    return {"mixer": run.mixer, "width": run.width, "lr_index": run.lr_index, "lr": run.lr, "seed": run.seed,
            "intermediate_size": intermediate_size, "parameters": model.num_parameters()["blocks"],
            "valid": valid, "test": test, "curve": curve, "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - start - train_seconds, "steps_per_second": t.steps / train_seconds,
            "device": str(device)}


def _clean(x):
    """JSON-ready: a NaN or an infinity becomes None, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _write(path: Path, data: dict) -> None:
    # write then rename: a reader (or a resumed grid) never sees half a file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _done(out: Path, digest: str) -> dict[str, dict]:
    """The finished runs in ``out/runs``, by file name; a file of another grid is a ValueError."""
    found = {}
    for path in sorted((out / "runs").glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("digest") != digest:
            raise ValueError(f"run_grid: '{path}' belongs to another grid config (digest {data.get('digest')}, "
                             f"this one {digest}); pass fresh=True (--fresh true) or another 'out' folder")
        found[path.name] = data
    return found


def _execute(config: MQARGridConfig, runs: list[GridRun], models: dict, out: Path, device: str,
             threads: int | None, stop_at: float | None, quiet: bool, tag: str, queue=None) -> int:
    """Train ``runs`` (or the runs taken from ``queue`` until None) one after the other, writing each file; stop
    taking runs after the wall time ``stop_at``. Returns how many ran."""
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    held_out = _held_out(config, dev)
    pending = iter(runs) if queue is None else iter(queue.get, None)
    count = 0
    for run in pending:
        if stop_at is not None and time.time() > stop_at:
            break
        info = models[str(run.width)][run.mixer]
        record = train_grid_run(config, run, info["intermediate_size"], held_out, dev)
        _write(out / "runs" / run.filename, {"digest": config.digest, "key": run.key, **record})
        count += 1
        if not quiet:
            v = [a for a in record["valid"].values() if a is not None]
            print(f"{tag}{run.key}: validation {100 * sum(v) / max(len(v), 1):.1f} % (mean over levels) in "
                  f"{record['train_seconds']:.1f} + {record['eval_seconds']:.1f} s, "
                  f"{record['steps_per_second']:.1f} steps/s", flush=True)
    return count


def _worker(config, models, out, device, threads, stop_at, quiet, tag, queue) -> None:
    _execute(config, [], models, Path(out), device, threads, stop_at, quiet, tag, queue)


def grid_report(config: MQARGridConfig, out: str | Path, command: str = "") -> dict:
    """Rebuild ``out/mqar_grid.json``, ``.md`` and ``.png`` from every run file in ``out/runs``."""
    out = Path(out)
    models = json.loads((out / "grid.json").read_text())["models"] if (out / "grid.json").is_file() \
        else grid_models(config)
    runs = list(_done(out, config.digest).values())
    levels = [lv.label for lv in config.task.test_levels]
    record = {"task": "mqar-grid", "command": command, "digest": config.digest, "config": config.to_dict(),
              "models": models, "levels": levels, "runs_total": len(grid_runs(config)), "runs_done": len(runs),
              "summary": summarize_grid(runs, list(config.train.lrs), levels, len(config.train.seeds))
              if runs else {"selection": {}, "cells": []},
              "runs": {r["key"]: {k: v for k, v in r.items() if k != "digest"} for r in runs}}
    from gdn2ts.bench.common import environment

    record["environment"] = environment()
    _write(out / "mqar_grid.json", record)
    (out / "mqar_grid.md").write_text(grid_markdown(record))
    plot_grid(record, out / "mqar_grid.png")
    return record


def run_grid(config: MQARGridConfig, out: str | Path, shard: str = "1/1", only_mixers=None, only_widths=None,
             workers: int = 1, device: str | None = None, threads: int | None = None,
             stop_after_s: float | None = None, fresh: bool = False, report_only: bool = False,
             quiet: bool = False, command: str = "") -> dict:
    """Run the shard's missing runs (``workers`` at a time), then rebuild the report from every run in ``out``.

    ``out/grid.json`` holds the config, its digest and the matched models; an ``out`` of another config is a
    ValueError unless ``fresh`` (which deletes its run files first). Returns the report's record.
    """
    if not isinstance(config, MQARGridConfig):
        raise ValueError(f"run_grid: argument 'config' expected an MQARGridConfig, got {type(config).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"run_grid: argument 'workers' expected an int >= 1, got {workers!r}")
    if stop_after_s is not None and (isinstance(stop_after_s, bool) or not isinstance(stop_after_s, (int, float))
                                     or stop_after_s < 0):
        raise ValueError(f"run_grid: argument 'stop_after_s' expected None or a number >= 0, got {stop_after_s!r}")
    runs = shard_runs(grid_runs(config, only_mixers, only_widths), shard)
    out = Path(out)
    grid_file = out / "grid.json"
    if fresh:
        shutil.rmtree(out / "runs", ignore_errors=True)
        grid_file.unlink(missing_ok=True)
    if grid_file.is_file() and json.loads(grid_file.read_text()).get("digest") != config.digest:
        raise ValueError(f"run_grid: '{grid_file}' holds another grid config; pass fresh=True (--fresh true) to "
                         f"delete its runs, or another 'out' folder")
    done = _done(out, config.digest)
    if grid_file.is_file():
        models = json.loads(grid_file.read_text())["models"]
    else:
        models = grid_models(config)
        (out / "runs").mkdir(parents=True, exist_ok=True)
        _write(grid_file, {"digest": config.digest, "config": config.to_dict(), "models": models})
    pending = [r for r in runs if r.filename not in done]
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not quiet:
        print(f"mqar-grid: shard {shard}: {len(runs)} runs, {len(runs) - len(pending)} done, {len(pending)} to run "
              f"on {dev} with {min(workers, max(len(pending), 1))} worker(s)", flush=True)
    stop_at = None if stop_after_s is None else time.time() + stop_after_s
    if pending and not report_only:
        if workers == 1:
            _execute(config, pending, models, out, dev, threads, stop_at, quiet, "")
        else:
            ctx = multiprocessing.get_context("spawn")
            queue = ctx.Queue()
            for run in pending:
                queue.put(run)
            procs = [ctx.Process(target=_worker, args=(config, models, str(out), dev, threads, stop_at, quiet,
                                                      f"[w{k}] ", queue)) for k in range(min(workers, len(pending)))]
            for p in procs:
                queue.put(None)
                p.start()
            for p in procs:
                p.join()
            failed = [p.exitcode for p in procs if p.exitcode]
            if failed:
                raise RuntimeError(f"run_grid: {len(failed)} worker(s) failed (exit codes {failed}); the runs "
                                   f"they finished are kept, run again to continue")
    return grid_report(config, out, command)


ZOOLOGY_TASK = MQARGridTask(
    train_levels=tuple(MQARConfig(vocab_size=8192, num_pairs=p, seq_len=t, query_power=0.01)
                       for p, t in ((4, 64), (8, 128), (16, 256), (32, 256), (64, 256))),
    test_levels=tuple(MQARConfig(vocab_size=8192, num_pairs=p, seq_len=t, query_power=0.01)
                      for p, t in ((4, 64), (8, 64), (16, 64), (32, 128), (64, 256), (128, 512))),
    train_weights=(5, 1, 1, 1, 1))
ZOOLOGY_WIDTHS = tuple(MQARModelConfig(hidden_size=d, num_layers=2, intermediate_size=2 * d, num_heads=2,
                                       head_k_dim=d // 4, head_v_dim=d // 2, gate_low_rank=d // 4,
                                       attn_num_heads=2, attn_head_dim=d // 2, window=64) for d in (64, 128, 256))
ZOOLOGY_MIXERS = ("gdn2", "erase_only", "write_only", "kda", "gdn", "mamba2", "mamba3_siso", "attention")
_TRAIN, _EVALUATION = MQARGridTrainConfig(), MQARGridEvalConfig()


def mqar_grid(task: MQARGridTask = ZOOLOGY_TASK, widths: tuple[MQARModelConfig, ...] = ZOOLOGY_WIDTHS,
              mixers: tuple[str, ...] = ZOOLOGY_MIXERS, train: MQARGridTrainConfig = _TRAIN,
              evaluation: MQARGridEvalConfig = _EVALUATION, match_tolerance: float = 0.05,
              out: str = "mqar-grid-results", shard: str = "1/1", only_mixers: tuple[str, ...] | None = None,
              only_widths: tuple[int, ...] | None = None, workers: int = 1, device: str | None = None,
              threads: int | None = None, stop_after_s: float | None = None, fresh: bool = False,
              report_only: bool = False, quiet: bool = False) -> dict:
    """MQAR as Zoology runs it: every width, mixer, learning rate and seed, parameters and state matched per
    width; the rate chosen on validation sets, test accuracy with 95 % t-intervals; shardable and resumable.

    Args:
        task: the training mixture (levels and weights) and the scored levels.
        widths: one model shape per width (heads and head sizes: the recurrent state; intermediate_size: the base
            MLP, widened per mixer to match the largest mixer's block parameters).
        mixers: the mixers compared (attention as the reference).
        train: steps, batch, the swept learning rates, seeds and the optimizer.
        evaluation: the validation and test sets.
        match_tolerance: largest allowed parameter mismatch between the mixers of a width (a fraction).
        out: folder of grid.json, runs/*.json and the report (mqar_grid.json, .md, .png).
        shard: 'i/n': run every n-th run of the (filtered) grid from the i-th (1-based).
        only_mixers: run only these of the grid's mixers now (the report still covers every run present).
        only_widths: run only these hidden sizes now.
        workers: runs trained at once, each in its own process.
        device: cuda or cpu (default: cuda when available).
        threads: torch CPU threads per process (default: torch's choice).
        stop_after_s: start no run after this many seconds (the runs under way finish); run again to continue.
        fresh: delete the run files in out first.
        report_only: train nothing; rebuild the report from the run files in out.
        quiet: print nothing.
    """
    try:
        config = MQARGridConfig(task, tuple(widths), tuple(mixers), train, evaluation, match_tolerance)
        record = run_grid(config, out, shard=shard, only_mixers=only_mixers, only_widths=only_widths,
                          workers=workers, device=device, threads=threads, stop_after_s=stop_after_s, fresh=fresh,
                          report_only=report_only, quiet=quiet, command="gdn2ts lm mqar-grid")
    except ValueError as e:
        raise SystemExit(f"gdn2ts lm mqar-grid: {e}") from None
    if not quiet:
        print(f"wrote {Path(out) / 'mqar_grid.json'}, .md, .png ({record['runs_done']} of {record['runs_total']} "
              f"runs)")
    return record
