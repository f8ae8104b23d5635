"""Inputs and checks shared by the distributed tests: a small encoder, irregular streams cut into batches, and
every stored state of a sharded store read back from its partitions' stores."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from gdn2ts.distributed import Manifest, RunnerSpec, StoreSpec
from gdn2ts.models import EncoderConfig, StreamEncoder

CHANNELS = ("load", "temp")


def encoder(seed: int = 0) -> StreamEncoder:
    torch.manual_seed(seed)
    return StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, n_layers=2, num_heads=2, head_dim=8,
                                       horizon=3))


def spec(capacity: int = 64, **kwargs) -> RunnerSpec:
    return RunnerSpec(encoder=encoder(), channels=CHANNELS, capacity=capacity, **kwargs)


def batches(n_streams: int = 24, rows: int = 16, calls: int = 6, seed: int = 0) -> list[pl.DataFrame]:
    """Irregular, interleaved observations with missing values, some stale rows, cut into ``calls`` batches."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_streams):
        t = 0.0
        for _ in range(int(rng.integers(1, rows + 1))):
            t += float(rng.random()) * 2 + 0.1
            out.append({"stream": f"s{s}", "time": t, "load": None if rng.random() < 0.2 else float(rng.normal()),
                        "temp": None if rng.random() < 0.3 else float(rng.normal())})
    frame = pl.DataFrame(out).sort("time")
    # a few rows arrive late (their timestamps are not after their stream's last): rejected, the rest proceed
    late = frame.sample(n=max(1, frame.height // 30), seed=seed)
    frame = pl.concat([frame, late]).sort("time")
    k = -(-frame.height // calls)
    return [frame.slice(i * k, k) for i in range(calls)]


def ids(n_streams: int = 24) -> list[str]:
    return [f"s{s}" for s in range(n_streams)]


def states(root, stores: StoreSpec | None = None) -> dict[str, tuple]:
    """Every stream's stored state (record bytes, steps, last timestamp), read from its partition's store (the
    fleet closed: everything snapshotted); also checks that no stream is in two partitions."""
    stores = stores or StoreSpec(str(root))
    manifest = Manifest.load(stores.root)
    out: dict[str, tuple] = {}
    for p in range(manifest.partitions):
        store = stores.open(p, readonly=True)
        try:
            sids = list(store.iterate())
            rows = store.read_rows(sids)
            for i, sid in enumerate(sids):
                assert sid not in out, f"stream {sid!r} is in two partitions"
                out[sid] = (rows.data[i].tobytes(), int(rows.steps[i]), float(rows.last_timestamp[i]))
        finally:
            store.close()
    return out
