"""Throughput of the online runner with durability on: GDN-2 encoder against a GRU of equal state size, and the
same runner with streams well past its working set next to all streams in memory.

Both models go through the same ingestion path (validation, grouping into rounds, the working set, the SQLite
journal and snapshots); they are the same encoder but for the mixer of each block (GDN-2, or
:class:`~gdn2ts.models.encoder.GRUEncoder`'s GRU). For each number of streams the runner first sees every
stream once (untimed), then ``calls`` timed ``observe`` calls of one observation per stream, then one timed
snapshot (``flush``). The scale cases (:mod:`gdn2ts.bench.streaming_scale`) stream every stream through the
working set pass after pass, each case in a fresh process.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from gdn2ts.bench.common import environment
from gdn2ts.bench.streaming_scale import scale_cases
from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.models.encoder import GRUEncoder
from gdn2ts.streaming import CommitPolicy, OnlineRunner, SQLiteStore

__all__ = ["bench_streaming", "layer_state_floats"]


def layer_state_floats(encoder: StreamEncoder) -> int:
    """Floats of state one stream carries per GDN-2 layer (recurrent state plus conv tail).

    Example:
        >>> layer_state_floats(StreamEncoder(EncoderConfig(n_channels=2, hidden_size=32, num_heads=2, head_dim=16)))
        800
    """
    layer = encoder.init_state(1).layers[0]
    return sum(t.numel() for t in layer)


def _frames(n_streams: int, n_calls: int, channels: list[str], seed: int) -> list[pl.DataFrame]:
    """One observation per stream per call at irregular times, 20% of the values missing."""
    rng = np.random.default_rng(seed)
    ids = pl.Series("stream", [f"meter-{i:07d}" for i in range(n_streams)])
    frames = []
    for c in range(n_calls):
        values = rng.standard_normal((n_streams, len(channels)))
        values[rng.random(values.shape) < 0.2] = np.nan
        cols = {name: pl.Series(name, values[:, j]).fill_nan(None) for j, name in enumerate(channels)}
        frames.append(pl.DataFrame([ids, pl.Series("time", c + rng.uniform(0.0, 0.5, n_streams)), *cols.values()]))
    return frames


def _measure(model: nn.Module, n_streams: int, calls: int, channels: list[str], root: Path, name: str,
             policy: CommitPolicy) -> dict:
    frames = _frames(n_streams, calls + 1, channels, seed=n_streams)
    runner = OnlineRunner(model, SQLiteStore(root / f"{name}-{n_streams}.db"), channels, capacity=max(n_streams, 1),
                          policy=policy)
    runner.observe(frames[0])  # every stream's first observation: creates the streams
    latencies = []
    for frame in frames[1:]:
        t0 = time.perf_counter()
        result = runner.observe(frame)
        latencies.append(time.perf_counter() - t0)
        if result.accepted != frame.height:
            raise RuntimeError(f"bench: {frame.height - result.accepted} rows were rejected")
    t0 = time.perf_counter()
    runner.flush()
    flush_s = time.perf_counter() - t0
    layout = runner.ws.record_layout
    runner.close()
    lat = np.array(latencies)
    per_call = float(lat.mean())
    every = policy.snapshot_every
    return {
        "model": name, "streams": n_streams, "calls": calls, "observations": n_streams * calls,
        "obs_per_s": n_streams * calls / float(lat.sum()),
        "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "snapshot_ms": flush_s * 1e3,
        # a snapshot every `every` calls (the policy), its cost spread over them
        "obs_per_s_with_snapshots": n_streams * every / (every * per_call + flush_s),
        "state_bytes_per_stream": sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in layout.fields),
        "record_bytes_per_stream": layout.nbytes,
    }


SCALE_CASES = ((10_000, 10_000, 11), (1_000_000, 4096, 2))
"""``(streams, capacity, passes)``: all streams in memory, then a million streams through 4,096 slots."""


def bench_streaming(streams: tuple[int, ...] = (1, 10_000), calls: int = 20, single_calls: int = 300,
                    hidden: int = 32, heads: int = 2, head_dim: int = 16, layers: int = 2, channels: int = 4,
                    models: tuple[str, ...] = ("gdn2", "gru"), threads: int | None = 1,
                    scale: tuple[tuple[int, int, int], ...] = SCALE_CASES, batch: int = 4096,
                    json_path: str | None = None, quiet: bool = False) -> dict:
    """Observations per second, latency of one ``observe`` call and bytes of state per stream, durability on.

    Args:
        streams: numbers of streams (one observation each per call).
        calls: timed calls per stream count above one.
        single_calls: timed calls with one stream.
        hidden, heads, head_dim, layers: the encoder (the GRU gets the same blocks and equal state per layer).
        channels: observed channels per row.
        models: ``gdn2`` and/or ``gru``.
        threads: torch CPU threads during the run (None: leave torch's setting).
        scale: ``(streams, capacity, passes)`` cases of streams through a working set (GDN-2; empty: none); each
            case's reload rate is also given over the first case's (``ratio_to_first``).
        batch: streams per ``observe`` call in the scale cases.
        json_path: where to write the record.
        quiet: print nothing.
    """
    cfg = EncoderConfig(n_channels=channels, hidden_size=hidden, n_layers=layers, num_heads=heads,
                        head_dim=head_dim, horizon=8)
    torch.manual_seed(0)
    gdn2 = StreamEncoder(cfg)
    state_size = layer_state_floats(gdn2)
    built = {"gdn2": gdn2, "gru": GRUEncoder(cfg, state_size)}
    names = [f"c{j}" for j in range(channels)]
    policy = CommitPolicy()
    before = torch.get_num_threads()
    load_before = os.getloadavg()[0]  # the machine is shared: its load goes with the figures
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in streams:
                for name in models:
                    rows.append(_measure(built[name], n, single_calls if n == 1 else calls, names, Path(tmp), name,
                                         policy))
                    if not quiet:
                        r = rows[-1]
                        print(f"{name:>5} {n:>7} streams: {r['obs_per_s']:>10,.0f} obs/s  p50 {r['p50_ms']:.2f} ms  "
                              f"p99 {r['p99_ms']:.2f} ms  snapshot {r['snapshot_ms']:.0f} ms  "
                              f"{r['state_bytes_per_stream']} B/stream", flush=True)
    finally:
        torch.set_num_threads(before)
    scaled = scale_cases(tuple(scale), batch=batch, hidden=hidden, heads=heads, head_dim=head_dim, layers=layers,
                         channels=channels, threads=threads or before, quiet=quiet) if scale else []
    for n in streams:
        by = {r["model"]: r for r in rows if r["streams"] == n}
        if "gdn2" in by and "gru" in by:
            by["gdn2"]["speedup_over_gru"] = by["gdn2"]["obs_per_s"] / by["gru"]["obs_per_s"]
    record = {"bench": "streaming", "env": {**environment(), "threads": threads or before,
                                            "load_avg_1min": [load_before, os.getloadavg()[0]]},
              "config": {"hidden": hidden, "heads": heads, "head_dim": head_dim, "layers": layers,
                         "channels": channels, "gru_state_per_layer": state_size,
                         "policy": {"snapshot_every": policy.snapshot_every, "snapshot_rows": policy.snapshot_rows,
                                    "snapshot_seconds": policy.snapshot_seconds}, "store": "SQLiteStore (WAL, NORMAL)"},
              "results": rows, "median_p50_ms": statistics.median(r["p50_ms"] for r in rows) if rows else None,
              "scale": scaled}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(record, indent=1))
    if not quiet:
        if rows:
            _print_table(rows)
        if scaled:
            _print_scale(scaled)
    return record


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="online runner, durability on (SQLite journal + snapshots)")
    for col in ("model", "streams", "obs/s", "obs/s incl. snapshots", "p50 ms", "p99 ms", "snapshot ms",
                "state B/stream", "x GRU"):
        table.add_column(col, justify="right")
    for r in rows:
        speedup = f"{r['speedup_over_gru']:.1f}" if "speedup_over_gru" in r else ""
        table.add_row(r["model"], f"{r['streams']:,}", f"{r['obs_per_s']:,.0f}",
                      f"{r['obs_per_s_with_snapshots']:,.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['snapshot_ms']:.0f}", f"{r['state_bytes_per_stream']:,}", speedup)
    Console(width=130).print(table)


def _print_scale(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="streams through the working set, durability on (reload: every later pass)")
    for col in ("streams", "capacity", "first pass obs/s", "reload obs/s", "reload / first case", "p50 ms",
                "p99 ms", "snapshot s", "peak RSS MB", "store MB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['streams']:,}", f"{r['capacity']:,}", f"{r['first_pass_obs_per_s']:,.0f}",
                      f"{r.get('reload_obs_per_s', float('nan')):,.0f}", f"{r.get('ratio_to_first', float('nan')):.2f}",
                      f"{r.get('reload_p50_ms', float('nan')):.0f}", f"{r.get('reload_p99_ms', float('nan')):.0f}",
                      f"{r['snapshot_s']:.2f}", f"{r['rss_peak_mb']:,.0f}", f"{r['store_mb']:,.0f}")
    Console(width=140).print(table)
