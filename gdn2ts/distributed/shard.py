"""A shard: the runners of the partitions it owns, each over its partition's store, and the record of which
driver calls each partition has applied.

A :class:`Shard` is a plain object; :mod:`gdn2ts.distributed.cluster` runs it as a Ray actor, and the driver
(:class:`~gdn2ts.distributed.ShardedRunner`) can also hold shards in its own process. A shard opens a partition
when it is first asked for it (taking the store's writer lease, waiting while a shard that died still holds it,
and replaying the store's journal), so a shard that Ray restarted recovers its partitions on the next call.

**Calls are applied at most once.** Every observe call of the driver carries a number, increasing over the
driver's calls. Each partition's runner commits the number (blob ``distributed.call``) in the same transaction as
the call's journal entry (``OnlineRunner.observe(..., blobs=)``), or alone when the call accepts no row (which
changes no state). A call whose number the partition has already reached is not applied again: a driver that
retries a call whose reply it lost (the shard died after the commit) gets ``duplicate`` for those partitions.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping

import polars as pl
import torch

from gdn2ts.distributed import learning
from gdn2ts.distributed.spec import RunnerSpec, StoreSpec
from gdn2ts.streaming import OnlineRunner, StoreLockedError

__all__ = ["Shard", "CALL_BLOB"]

CALL_BLOB = "distributed.call"
"""The store blob holding the number of the last driver call a partition applied (JSON)."""


class Shard:
    """The runners of some partitions of a sharded store.

    Args:
        runner: how each partition's runner is opened.
        stores: where the partitions' stores are.
        lease_wait: seconds to wait for a partition's writer lease that another process still holds (a shard
            that died releases it when its process ends).
        pause: seconds to pause after each partition of an observe call, for fault tests: a shard killed in the
            pause has applied the call to some of its partitions and not to the others.
    """

    def __init__(self, runner: RunnerSpec, stores: StoreSpec, lease_wait: float = 60.0, pause: float = 0.0):
        if runner.threads is not None:
            torch.set_num_threads(runner.threads)
        self.spec, self.stores, self.lease_wait, self.pause = runner, stores, lease_wait, pause
        self.runners: dict[int, OnlineRunner] = {}
        self.calls: dict[int, int] = {}

    def ping(self) -> int:
        """The shard's process id (the driver waits on it for a restarted shard)."""
        return os.getpid()

    # -- partitions ------------------------------------------------------------------------------------------------

    def acquire(self, partitions: Iterable[int]) -> dict[int, int]:
        """Open ``partitions`` (those not open yet); returns the last call each has applied."""
        for p in partitions:
            self._open(p)
        return {p: self.calls[p] for p in partitions}

    def release(self, partitions: Iterable[int]) -> None:
        """Snapshot and close ``partitions`` (those open here), releasing their stores' writer leases."""
        for p in partitions:
            runner = self.runners.pop(p, None)
            self.calls.pop(p, None)
            if runner is not None:
                runner.close()

    def held(self) -> list[int]:
        """The partitions open here."""
        return sorted(self.runners)

    def _open(self, p: int) -> OnlineRunner:
        if p in self.runners:
            return self.runners[p]
        deadline = time.monotonic() + self.lease_wait
        while True:
            try:
                store = self.stores.open(p)
                break
            except StoreLockedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        runner = self.spec.open(store)
        payload = runner.store.get_blob(CALL_BLOB)
        self.calls[p] = 0 if payload is None else int(json.loads(payload)["call"])
        self.runners[p] = runner
        return runner

    # -- verbs -----------------------------------------------------------------------------------------------------

    def observe(self, call: int, batches: Mapping[int, pl.DataFrame]) -> dict[int, dict]:
        """Apply call number ``call``: each partition's rows (``{partition: frame}``) in one observe call of its
        runner. Returns per partition ``{"accepted", "rejected", "counts"}``, or ``{"duplicate": rows}`` for a
        partition that had already applied this call (or a later one)."""
        out = {}
        for p in sorted(batches):
            frame = batches[p]
            runner = self._open(p)
            if call <= self.calls[p]:
                out[p] = {"duplicate": frame.height}
                continue
            blob = {CALL_BLOB: json.dumps({"call": call}).encode()}
            result = runner.observe(frame, blobs=blob)
            if result.accepted == 0:
                # nothing was committed with the call: record it alone (the state did not change)
                try:
                    runner.store.put_blob(CALL_BLOB, blob[CALL_BLOB])
                    runner.store.commit()
                except BaseException:
                    runner.store.rollback()
                    raise
            self.calls[p] = call
            out[p] = {"accepted": result.accepted, "rejected": result.rejected, "counts": result.counts}
            if self.pause:
                time.sleep(self.pause)
        return out

    def forecast(self, ids: Mapping[int, list[str]]) -> pl.DataFrame | None:
        """Forecasts of ``{partition: stream ids}`` (one table, partitions in order)."""
        parts = [self._open(p).forecast(ids[p]) for p in sorted(ids) if ids[p]]
        return pl.concat(parts) if parts else None

    def info(self, ids: Mapping[int, list[str]]) -> pl.DataFrame | None:
        """Steps and last timestamps of ``{partition: stream ids}``."""
        parts = [self._open(p).info(ids[p]) for p in sorted(ids) if ids[p]]
        return pl.concat(parts) if parts else None

    def stats(self, ids: Mapping[int, list[str]]) -> pl.DataFrame | None:
        """Per-channel statistics of ``{partition: stream ids}``."""
        parts = [self._open(p).stats(ids[p]) for p in sorted(ids) if ids[p]]
        return pl.concat(parts) if parts else None

    def stream_ids(self, partitions: Iterable[int]) -> list[str]:
        """The known streams of ``partitions``, sorted."""
        return sorted(sid for p in partitions for sid in self._open(p).stream_ids())

    def forget(self, ids: Mapping[int, list[str]], delete: bool = False) -> list[str]:
        """Reset (or delete) the known streams among ``{partition: ids}``; unknown ids are skipped, so a retried
        call changes nothing more. Returns the ids forgotten."""
        done = []
        for p in sorted(ids):
            runner = self._open(p)
            if delete:
                info = runner.info(ids[p])
                known = info.filter(pl.col("steps") > 0)["stream"].to_list()
                if known:
                    runner.delete(known)
                done += known
            else:
                done += runner.reset(ids[p])
        return done

    def gradients(self, ids: Mapping[int, list[str]]) -> dict[int, dict]:
        """Step 1 of a learn round for every partition of ``{partition: stream ids}`` (see
        :mod:`gdn2ts.distributed.learning`)."""
        return {p: learning.gradients(self._open(p), ids[p]) for p in sorted(ids)}

    def install(self, ids: Mapping[int, list[str]], blob: bytes) -> dict[int, int]:
        """Step 3 of a learn round: every partition of ``{partition: learned stream ids}`` commits and serves the
        new weights ``blob``; returns the version each serves."""
        return {p: learning.install(self._open(p), ids[p], blob) for p in sorted(ids)}

    def blob(self, partition: int) -> bytes:
        """The partition's learned-weights blob."""
        return learning.blob_of(self._open(partition))

    def versions(self, partitions: Iterable[int]) -> dict[int, int]:
        """The weight version each partition's runner serves."""
        return {p: self._open(p).version for p in partitions}

    def flush(self) -> None:
        """Snapshot every partition held here."""
        for runner in self.runners.values():
            runner.flush()

    def close(self) -> None:
        """Snapshot and close every partition held here."""
        self.release(list(self.runners))
