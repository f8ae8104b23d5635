"""A read-only view of a sharded store, beside the shards that write it: each partition read through a read-only
runner (``readonly=True`` stores: no writer lease, the journal replayed in memory from one consistent read), so
that forecasts are answered as of each partition's last call while its shard keeps writing. For a forecast
server that must not wait behind the writers' calls, and for tools."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from gdn2ts.distributed.driver import in_order
from gdn2ts.distributed.partition import partition_of
from gdn2ts.distributed.spec import Manifest, RunnerSpec, StoreSpec
from gdn2ts.streaming.records import check_ids

__all__ = ["ShardedView"]


class ShardedView:
    """``forecast``, ``info`` and ``stats`` of a sharded store, read-only (each call opens the partitions it needs
    read-only and closes them again).

    Example:
        >>> import tempfile
        >>> from gdn2ts.distributed import ShardedRunner
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> spec = RunnerSpec(encoder=StreamEncoder(EncoderConfig(n_channels=1, hidden_size=8, head_dim=4)),
        ...                   channels=("load",))
        >>> root = tempfile.mkdtemp()
        >>> with ShardedRunner(spec, root, shards=2, partitions=4, local=True) as fleet:
        ...     _ = fleet.observe({"stream": ["a", "b"], "time": [1.0, 1.0], "load": [0.5, 0.1]})
        ...     ShardedView(spec, root).info(["b", "a"])["steps"].to_list()   # beside the writers
        [1, 1]
    """

    def __init__(self, runner: RunnerSpec, stores: StoreSpec | str | Path):
        self.spec = runner
        self.stores = stores if isinstance(stores, StoreSpec) else StoreSpec(str(stores))
        manifest = Manifest.load(self.stores.root)
        if manifest is None:
            raise ValueError(f"ShardedView: {self.stores.root!r} holds no sharded store (no manifest)")
        self.partitions = manifest.partitions
        self.shards = manifest.shards

    def _read(self, method: str, stream_ids: Sequence[str]) -> pl.DataFrame:
        ids = check_ids(stream_ids)
        by: dict[int, list[str]] = {}
        for sid, p in zip(ids, partition_of(ids, self.partitions).tolist(), strict=True):
            by.setdefault(p, []).append(sid)
        tables = []
        for p in sorted(by):
            runner = self.spec.open(self.stores.open(p, readonly=True))
            try:
                tables.append(getattr(runner, method)(by[p]))
            finally:
                runner.close()
        return in_order(tables, ids)

    def forecast(self, stream_ids: Sequence[str]) -> pl.DataFrame:
        """Forecasts of ``stream_ids`` (as ``OnlineRunner.forecast``), in the order asked."""
        return self._read("forecast", stream_ids)

    def info(self, stream_ids: Sequence[str]) -> pl.DataFrame:
        """Steps applied and last timestamp per stream."""
        return self._read("info", stream_ids)

    def stats(self, stream_ids: Sequence[str]) -> pl.DataFrame:
        """Per-channel statistics per stream."""
        return self._read("stats", stream_ids)
