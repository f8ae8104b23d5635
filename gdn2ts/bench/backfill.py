"""Backfill throughput: one ``observe`` call with many rows per stream, stepped round by round against prefilled
(the encoder's masked parallel forward; see :mod:`gdn2ts.streaming.rounds`), durability on.

Run: ``python -m gdn2ts.bench.backfill`` (writes ``docs/results/bench_backfill.json``). Each measurement runs in a
fresh process (its peak RSS is its own): a small warm-up backfill on other streams (so the timed call does not pay
first-call costs), a new SQLite store, the streams' first rows observed untimed (so the backfill continues existing
states), then the timed call. Paths: ``step`` (every round a step), ``prefill`` (every run of rounds prefilled,
whatever the cost rule says); the record also names the path the default rule takes (what ``observe`` does).
Reported: observations per second of the whole call (validation, planning, stepping, the journal commit), of the
stepping alone (``Stepper.run``), the peak RSS, and how far the two paths' forecasts lie apart.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from gdn2ts.bench.common import environment, write_json
from gdn2ts.streaming.rounds import PrefillRule, schedule, stepped

CASES = ((1, 100_000), (10_000, 100))
"""(streams, rows per stream) of each backfill."""


def _frame(streams: int, rows: int, channels: list[str], t0: float, seed: int) -> pl.DataFrame:
    """``rows`` rows per stream at irregular times after ``t0``, 20% of the values missing, stream after stream."""
    rng = np.random.default_rng(seed)
    times = t0 + np.cumsum(rng.uniform(0.5, 1.5, (streams, rows)), axis=1)
    values = rng.standard_normal((streams * rows, len(channels)))
    values[rng.random(values.shape) < 0.2] = np.nan
    ids = pl.Series("stream", [f"meter-{i:06d}" for i in range(streams)]).gather(np.repeat(np.arange(streams), rows))
    cols = [pl.Series(name, values[:, j]).fill_nan(None) for j, name in enumerate(channels)]
    return pl.DataFrame([ids, pl.Series("time", times.ravel()), *cols])


def _one(streams: int, rows: int, path: str, queue) -> None:
    """One measurement (in its own process): ``path`` is ``prefill`` or ``step``."""
    from gdn2ts.models import EncoderConfig, StreamEncoder
    from gdn2ts.streaming import MemoryStore, OnlineRunner, SQLiteStore

    def always(sizes):
        return schedule(sizes, PrefillRule(round_us=float("inf")))

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = EncoderConfig(n_channels=4, hidden_size=32, n_layers=2, num_heads=2, head_dim=16, horizon=8)
    channels = [f"c{j}" for j in range(4)]
    first = _frame(streams, 1, channels, 0.0, seed=1)
    batch = _frame(streams, rows, channels, 10.0, seed=2)
    encoder = StreamEncoder(cfg)
    plan = stepped if path == "step" else always
    warm = OnlineRunner(encoder, MemoryStore(), channels)
    warm.stepper.plan = plan
    warm.observe(_frame(16, 64, channels, 0.0, seed=3))
    with tempfile.TemporaryDirectory() as tmp:
        runner = OnlineRunner(encoder, SQLiteStore(Path(tmp) / "s.db"), channels, capacity=max(4096, streams))
        runner.stepper.plan = plan
        runner.observe(first)
        run, stepping = runner.stepper.run, []

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = run(*args, **kwargs)
            stepping.append(time.perf_counter() - t)
            return out

        runner.stepper.run = timed
        t = time.perf_counter()
        result = runner.observe(batch)
        seconds = time.perf_counter() - t
        if result.accepted != batch.height:
            raise RuntimeError(f"bench: {batch.height - result.accepted} rows were rejected")
        ids = [f"meter-{i:06d}" for i in range(0, streams, max(1, streams // 64))]
        forecast = runner.forecast(ids).select(pl.selectors.starts_with("q")).to_numpy()
        runner.close()
    queue.put({"streams": streams, "rows_per_stream": rows, "path": path, "observations": batch.height,
               "seconds": seconds, "obs_per_s": batch.height / seconds, "stepping_seconds": stepping[0],
               "stepping_obs_per_s": batch.height / stepping[0],
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "forecast": forecast})


def bench_backfill(cases=CASES, json_path: str | None = "docs/results/bench_backfill.json", quiet: bool = False
                   ) -> dict:
    """Step path against prefill path for each (streams, rows per stream) backfill; returns the record."""
    ctx = mp.get_context("spawn")
    load_before = os.getloadavg()[0]
    rows = []
    for streams, per in cases:
        got = {}
        for path in ("prefill", "step"):
            queue = ctx.Queue()
            child = ctx.Process(target=_one, args=(streams, per, path, queue))
            child.start()
            got[path] = queue.get()
            child.join()
            if not quiet:
                r = got[path]
                print(f"{streams:>6} streams x {per:>6} rows, {path:>7}: {r['obs_per_s']:>9,.0f} obs/s "
                      f"({r['seconds']:.2f} s; stepping alone {r['stepping_obs_per_s']:,.0f} obs/s), "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        a, b = got["prefill"].pop("forecast"), got["step"].pop("forecast")
        pieces = schedule(np.full(per, streams))
        rule = "prefill" if all(p[4] for p in pieces) else "step" if not any(p[4] for p in pieces) else "mixed"
        for r in got.values():
            r["forecast_max_abs_diff"] = float(np.abs(a - b).max())
            r["prefill_over_step"] = got["prefill"]["obs_per_s"] / got["step"]["obs_per_s"]
            r["default_rule_takes"] = rule
        rows += [got["step"], got["prefill"]]
    record = {"bench": "backfill", "env": {**environment(), "threads": 1,
                                           "load_avg_1min": [load_before, os.getloadavg()[0]]},
              "config": {"hidden": 32, "heads": 2, "head_dim": 16, "layers": 2, "channels": 4, "horizon": 8,
                         "store": "SQLiteStore (WAL, NORMAL), journal", "missing": 0.2},
              "results": rows}
    write_json(json_path, record)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="docs/results/bench_backfill.json")
    parser.add_argument("--cases", default=",".join(f"{s}x{r}" for s, r in CASES),
                        help="streams x rows per stream, comma-separated (default: %(default)s)")
    args = parser.parse_args(argv)
    cases = tuple(tuple(int(x) for x in c.split("x")) for c in args.cases.split(","))
    bench_backfill(cases, args.json)


if __name__ == "__main__":
    main()
