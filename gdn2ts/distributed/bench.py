"""Throughput of a sharded store: obs/s and p50/p99 per observe call for the plain runner, 1 shard in the
driver's process, and 1 and 2 shards on Ray; and the driver's own cost per observation (checking the batch,
routing it to partitions, serializing each shard's part).

    python -m gdn2ts.distributed.bench          # writes docs/results/bench_distributed.json and prints the table

Every case: a new store, ``streams`` streams observed once (untimed), then ``calls`` timed ``observe`` calls of one
observation per stream, durability on (SQLite, journal, the default snapshot policy). The encoder is the
streaming benchmark's (``gdn2ts bench streaming``). See ``docs/streaming-distributed.md``.
"""

from __future__ import annotations

import json
import os
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from gdn2ts.distributed.driver import ShardedRunner
from gdn2ts.distributed.partition import partition_column
from gdn2ts.distributed.spec import RunnerSpec
from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.streaming import OnlineRunner, SQLiteStore
from gdn2ts.streaming.frames import screen_values

__all__ = ["bench_distributed", "route_cost"]


def _batch(streams: int, call: int, names: list[str], rng: np.random.Generator) -> pl.DataFrame:
    return pl.DataFrame({"stream": [f"meter-{i}" for i in range(streams)], "time": np.full(streams, float(call)),
                         **{c: rng.normal(size=streams) for c in names}})


def _timed(observe, streams: int, calls: int, names: list[str]) -> dict:
    rng = np.random.default_rng(0)
    batches = [_batch(streams, c, names, rng) for c in range(calls + 1)]
    observe(batches[0])  # every stream created (untimed)
    wall, cpu = [], 0.0
    for b in batches[1:]:
        c0, t0 = time.process_time(), time.perf_counter()
        observe(b)
        wall.append(time.perf_counter() - t0)
        cpu += time.process_time() - c0
    ms = np.array(wall) * 1e3
    return {"obs_per_s": streams * calls / sum(wall), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "driver_cpu_us_per_obs": cpu / (streams * calls) * 1e6}


def route_cost(fleet: ShardedRunner, batch: pl.DataFrame, repeats: int = 5) -> dict:
    """The driver's work per observation for ``batch`` (best of ``repeats``), in microseconds: checking it,
    routing its rows to partitions and shards, pickling each shard's part (what Ray sends; unpickling on the
    shard too), and the bytes sent per observation."""
    best = {"check_us": np.inf, "route_us": np.inf, "serialize_us": np.inf, "deserialize_us": np.inf}
    nbytes = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        frame = fleet.schema.read(batch)
        screen_values(frame, fleet.schema, None, torch.finfo(fleet.dtype).max)
        t1 = time.perf_counter()
        parts = partition_column(frame["stream"], fleet.partitions)
        groups = batch.with_columns(parts.alias("__part")).partition_by("__part", as_dict=True, include_key=False)
        by: dict[int, dict[int, pl.DataFrame]] = {}
        for (p,), rows in groups.items():
            by.setdefault(fleet.manifest.owners[p], {})[p] = rows
        t2 = time.perf_counter()
        blobs = [pickle.dumps((1, b), protocol=5) for b in by.values()]
        t3 = time.perf_counter()
        for blob in blobs:
            pickle.loads(blob)
        t4 = time.perf_counter()
        nbytes = sum(len(b) for b in blobs)
        for key, dt in zip(best, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            best[key] = min(best[key], dt / batch.height * 1e6)
    return {**best, "bytes_per_obs": nbytes / batch.height}


def _ray_ping_ms(fleet: ShardedRunner, n: int = 50) -> float:
    """Median round trip of an empty call to a shard actor."""
    handle, times = fleet.handles[0], []
    for _ in range(n):
        t0 = time.perf_counter()
        handle.result(handle.submit("ping"))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_distributed(streams: int = 10_000, calls: int = 20, shards: tuple[int, ...] = (1, 2), partitions: int = 16,
                      hidden: int = 32, heads: int = 2, head_dim: int = 16, layers: int = 2, channels: int = 4,
                      json_path: str | None = "docs/results/bench_distributed.json", quiet: bool = False) -> dict:
    """Run the cases (see the module docstring); returns the record written to ``json_path``."""
    import ray

    from gdn2ts.bench.common import environment

    torch.manual_seed(0)
    enc = StreamEncoder(EncoderConfig(n_channels=channels, hidden_size=hidden, n_layers=layers, num_heads=heads,
                                      head_dim=head_dim, horizon=8))
    names = [f"c{j}" for j in range(channels)]
    spec = RunnerSpec(encoder=enc, channels=tuple(names), capacity=max(4096, streams))
    load_before = os.getloadavg()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows, routing, ping = [], None, None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runner = OnlineRunner(enc, SQLiteStore(Path(tmp) / "one.db"), names, capacity=max(4096, streams))
            rows.append({"case": "runner (one store)", **_timed(runner.observe, streams, calls, names)})
            runner.close()
            with ShardedRunner(spec, Path(tmp) / "local", shards=1, partitions=partitions, local=True) as fleet:
                rows.append({"case": "1 shard, in process", **_timed(fleet.observe, streams, calls, names)})
                routing = route_cost(fleet, _batch(streams, 0, names, np.random.default_rng(1)))
            if not ray.is_initialized():
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            for n in shards:
                with ShardedRunner(spec, Path(tmp) / f"ray{n}", shards=n, partitions=partitions) as fleet:
                    rows.append({"case": f"{n} shard{'s' * (n > 1)}, Ray", **_timed(fleet.observe, streams, calls,
                                                                                  names)})
                    ping = ping or _ray_ping_ms(fleet)
                if not quiet:
                    print(rows[-1], flush=True)
    finally:
        torch.set_num_threads(threads)
    record = {"bench": "distributed", "date": time.strftime("%Y-%m-%d"),
              "env": {**environment(), "threads": 1, "ray": ray.__version__,
                      "load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg())},
              "config": {"streams": streams, "calls": calls, "partitions": partitions, "hidden": hidden,
                         "heads": heads, "head_dim": head_dim, "layers": layers, "channels": channels,
                         "store": "SQLiteStore per partition (WAL, NORMAL), journal"},
              "results": rows, "driver_per_obs": routing, "ray_ping_ms": ping}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(record, indent=1))
    if not quiet:
        for r in rows:
            print(f"{r['case']:>22}: {r['obs_per_s']:>9,.0f} obs/s  p50 {r['p50_ms']:7.1f} ms  "
                  f"p99 {r['p99_ms']:7.1f} ms  driver CPU {r['driver_cpu_us_per_obs']:.1f} us/obs")
        print("driver per observation (us):", {k: round(v, 2) for k, v in routing.items()},
              f"ray ping {ping:.2f} ms")
    return record


if __name__ == "__main__":
    bench_distributed()
