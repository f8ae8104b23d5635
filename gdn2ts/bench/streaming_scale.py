"""Streaming at scale: the durable online runner with streams well past its working set, next to all streams in
memory, in one run.

Each case (``streams`` through a working set of ``capacity``) runs in a fresh process, so that its peak resident
memory is its own: a runner over a new SQLite store, then ``passes`` passes over every stream, one observation per
stream per pass, in calls of ``batch`` streams (irregular times, 20 % of the values missing). The first pass
creates the streams; every later pass reloads them (from the pools when they fit, else from the store, evicting
others). Timed: each ``observe`` call (durable when it returns: journal on, snapshots by the default policy), and
the final snapshot. Not timed: making the batches. Each call's CPU time is recorded too (``obs_per_cpu_s``): on a
machine shared with other jobs it moves far less than the wall time, but it leaves out waiting for the disk.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["run_case", "scale_cases"]


def _batch(ids: np.ndarray, t0: float, channels: list[str], rng: np.random.Generator):
    import polars as pl

    values = rng.standard_normal((ids.size, len(channels)))
    values[rng.random(values.shape) < 0.2] = np.nan
    cols = [pl.Series(name, values[:, j]).fill_nan(None) for j, name in enumerate(channels)]
    return pl.DataFrame([pl.Series("stream", ids), pl.Series("time", t0 + rng.uniform(0.0, 0.5, ids.size)), *cols])


def _rss_peak_mb() -> float:
    """Peak resident memory of this process (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_case(streams: int, capacity: int, passes: int, batch: int, hidden: int, heads: int, head_dim: int,
             layers: int, channels: int, threads: int, root: str) -> dict:
    """One case in this process; returns its figures."""
    import torch

    from gdn2ts.models import EncoderConfig, StreamEncoder
    from gdn2ts.streaming import CommitPolicy, OnlineRunner, SQLiteStore

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    encoder = StreamEncoder(EncoderConfig(n_channels=channels, hidden_size=hidden, n_layers=layers,
                                          num_heads=heads, head_dim=head_dim, horizon=8))
    names = [f"c{j}" for j in range(channels)]
    ids = np.array([f"meter-{i:07d}" for i in range(streams)], dtype=object)
    rng = np.random.default_rng(streams)
    path = Path(root) / f"scale-{streams}-{capacity}.db"
    runner = OnlineRunner(encoder, SQLiteStore(path), names, capacity=capacity, policy=CommitPolicy())
    out = {"streams": streams, "capacity": capacity, "batch": batch, "passes": []}
    for p in range(passes):
        latencies, cpu = [], 0.0
        for start in range(0, streams, batch):
            frame = _batch(ids[start:start + batch], float(p), names, rng)
            t, c = time.perf_counter(), time.process_time()
            result = runner.observe(frame)
            latencies.append(time.perf_counter() - t)
            cpu += time.process_time() - c
            if result.accepted != frame.height:
                raise RuntimeError(f"bench: {frame.height - result.accepted} rows were rejected")
        lat = np.array(latencies)
        out["passes"].append({"pass": p, "calls": lat.size, "obs_per_s": streams / float(lat.sum()),
                              "obs_per_cpu_s": streams / cpu,
                              "p50_ms": float(np.percentile(lat, 50) * 1e3),
                              "p99_ms": float(np.percentile(lat, 99) * 1e3)})
    t = time.perf_counter()
    runner.flush()
    out["snapshot_s"] = time.perf_counter() - t
    out["record_bytes"] = runner.ws.record_layout.nbytes
    runner.close()
    out["store_mb"] = sum(f.stat().st_size for f in Path(root).glob(f"{path.name}*")) / 2**20
    out["rss_peak_mb"] = _rss_peak_mb()
    first, later = out["passes"][0], out["passes"][1:]
    out["first_pass_obs_per_s"] = first["obs_per_s"]
    if later:
        calls = sum(q["calls"] for q in later)
        out["reload_obs_per_s"] = (streams * len(later)) / sum(streams / q["obs_per_s"] for q in later)
        out["reload_obs_per_cpu_s"] = (streams * len(later)) / sum(streams / q["obs_per_cpu_s"] for q in later)
        out["reload_p50_ms"] = float(np.median([q["p50_ms"] for q in later]))
        out["reload_p99_ms"] = max(q["p99_ms"] for q in later)
        out["reload_calls"] = calls
    for f in Path(root).glob(f"{path.name}*"):
        f.unlink()
    return out


def _child(queue, kwargs):
    try:
        queue.put(("ok", run_case(**kwargs)))
    except BaseException as e:  # reported to the parent, which raises it
        queue.put(("error", f"{type(e).__name__}: {e}"))


def scale_cases(cases: tuple[tuple[int, int, int], ...], batch: int = 4096, hidden: int = 32, heads: int = 2,
                head_dim: int = 16, layers: int = 2, channels: int = 4, threads: int = 1, root: str | None = None,
                quiet: bool = False) -> list[dict]:
    """Run each ``(streams, capacity, passes)`` case in a fresh process; returns their figures, with the reload
    rate of each case over that of the first case (``ratio_to_first``)."""
    rows = []
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        ctx = mp.get_context("spawn")
        for streams, capacity, passes in cases:
            queue = ctx.Queue()
            kwargs = dict(streams=streams, capacity=capacity, passes=passes, batch=batch, hidden=hidden,
                          heads=heads, head_dim=head_dim, layers=layers, channels=channels, threads=threads,
                          root=tmp)
            child = ctx.Process(target=_child, args=(queue, kwargs))
            child.start()
            status, value = queue.get()
            child.join()
            if status != "ok":
                raise RuntimeError(f"bench streaming: the case of {streams} streams through {capacity} failed: "
                                   f"{value}")
            rows.append(value)
            if not quiet:
                print(f"{streams:>9,} streams, capacity {capacity:>6,}: first pass "
                      f"{value['first_pass_obs_per_s']:>8,.0f} obs/s, reload "
                      f"{value.get('reload_obs_per_s', float('nan')):>8,.0f} obs/s, "
                      f"p99 {value.get('reload_p99_ms', float('nan')):.0f} ms, RSS {value['rss_peak_mb']:.0f} MB, "
                      f"store {value['store_mb']:.0f} MB", flush=True)
    base, base_cpu = rows[0].get("reload_obs_per_s"), rows[0].get("reload_obs_per_cpu_s")
    for r in rows:
        if base and "reload_obs_per_s" in r:
            r["ratio_to_first"] = r["reload_obs_per_s"] / base
            r["cpu_ratio_to_first"] = r["reload_obs_per_cpu_s"] / base_cpu
    return rows

