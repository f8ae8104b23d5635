"""Which partition a stream belongs to, and which shard owns each partition.

A stream belongs to partition ``xxh3_64(utf8(stream_id)) % partitions``: XXH3's 64-bit hash (seed 0) of the id's
UTF-8 bytes, the same on every machine, Python version and run (Python's own ``hash`` of a string is salted per
process; polars' hashes may change between versions). The number of partitions is fixed when a sharded store is
created; the number of shards is not. Each partition has its own store (an SQLite file, or a PostgreSQL schema)
and its own runner, and a shard owns whole partitions, so:

* a stream's calls are the same whatever the number of shards (each partition's runner gets the rows of its own
  streams, in the same calls), which makes 1 and N shards give the same states and forecasts bit for bit (the
  encoder's CPU arithmetic on one stream depends on which other streams share its batch: see
  ``docs/streaming-distributed.md``);
* changing the number of shards moves whole partitions, each with its store, and never splits one.

This is Flink's key groups (a fixed maximum parallelism, key groups assigned to operators) or Kafka's partitions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import xxhash

__all__ = ["partition_of", "partition_column", "assign"]


def partition_of(stream_ids: Sequence[str], partitions: int) -> np.ndarray:
    """``[N]`` int64: the partition of each stream id.

    Example:
        >>> partition_of(["meter-7", "meter-9", "β"], 16).tolist()
        [9, 15, 8]
    """
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partition_of: 'partitions' expected a positive int, got {partitions!r}")
    digest = xxhash.xxh3_64_intdigest
    return np.fromiter((digest(s.encode()) % partitions for s in stream_ids), dtype=np.int64,
                       count=len(stream_ids))


def partition_column(ids: pl.Series, partitions: int) -> pl.Series:
    """The partition of each row's stream id (``ids`` a String column), hashing each distinct id once.

    Example:
        >>> partition_column(pl.Series(["meter-7", "β", "meter-7"]), 16).to_list()
        [9, 8, 9]
    """
    distinct = ids.unique()
    parts = pl.Series(partition_of(distinct.to_list(), partitions))
    return ids.replace_strict(distinct, parts, return_dtype=pl.Int64)


def assign(partitions: int, shards: int, current: Sequence[int] | None = None) -> list[int]:
    """The owner shard of each partition: balanced (each shard ``partitions // shards`` or one more, the lower
    shards the more), keeping every partition whose ``current`` owner still exists and has room, so that a change
    of shard count moves as few partitions as a balanced assignment allows.

    Example:
        >>> assign(6, 2)
        [0, 1, 0, 1, 0, 1]
        >>> assign(6, 3, [0, 1, 0, 1, 0, 1])      # 2 -> 3 shards: two partitions move, to the new shard
        [0, 1, 0, 1, 2, 2]
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= partitions:
        raise ValueError(f"assign: 'shards' expected an int in [1, partitions={partitions}], got {shards!r}")
    quota = [partitions // shards + (s < partitions % shards) for s in range(shards)]
    owner = [-1] * partitions
    if current is None:
        current = [p % shards for p in range(partitions)]
    if len(current) != partitions:
        raise ValueError(f"assign: 'current' expected {partitions} owners, got {len(current)}")
    for p, s in enumerate(current):
        if 0 <= s < shards and quota[s] > 0:
            owner[p], quota[s] = s, quota[s] - 1
    for p in range(partitions):
        if owner[p] < 0:
            s = next(i for i, q in enumerate(quota) if q > 0)
            owner[p], quota[s] = s, quota[s] - 1
    return owner
