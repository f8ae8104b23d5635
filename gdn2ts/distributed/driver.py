"""The driver of a sharded store: :class:`ShardedRunner`, the online runner's verbs over N shards.

Streams are split into a fixed number of partitions by a hash of their id (:mod:`gdn2ts.distributed.partition`);
each partition has its own store and runner, and each shard (a Ray actor, or an object in the driver's process)
owns some partitions. ``observe`` checks the whole batch first (a bad batch changes nothing anywhere), splits it
by partition, sends each shard its partitions' rows at once, and gathers the results; ``forecast``, ``info`` and
``stats`` gather from the shards and answer in the order asked.

**Faults.** A shard that dies in a call is restarted by Ray; the driver waits until it answers and sends the call
once more, with the same call number, so that partitions which had applied it before the shard died do not apply
it again (:mod:`gdn2ts.distributed.shard`). The restarted shard reopens its partitions from their stores, replaying
their journals. A driver that dies loses nothing acknowledged: a new one opens the same stores (the manifest says
who owns what) and continues; its calls are numbered after the highest number any partition applied, and
``observe(batch, call=n)`` lets a producer that numbers its batches send one again safely.

**Rebalance.** ``rebalance(n)`` records the new owners in the manifest first, then moves each moving partition:
the old owner snapshots and closes it (its lease released), the manifest names the new owner, the new owner opens
it. A partition's state never leaves its store, so at every moment each stream is in exactly one store, written by
at most one shard; a rebalance cut short is completed by the next driver (or the next ``rebalance``).
See ``docs/streaming-distributed.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from gdn2ts.distributed import learning
from gdn2ts.distributed.cluster import LocalShard, RayShard, ShardLost
from gdn2ts.distributed.partition import assign, partition_column, partition_of
from gdn2ts.distributed.spec import Manifest, RunnerSpec, StoreSpec
from gdn2ts.streaming.frames import as_table, screen_values
from gdn2ts.streaming.learn import LearnResult
from gdn2ts.streaming.records import check_ids
from gdn2ts.streaming.runner import ObserveResult, UnknownStreamError

__all__ = ["ShardedRunner", "ShardedResult"]


@dataclass
class ShardedResult(ObserveResult):
    """What one :meth:`ShardedRunner.observe` call applied (``seq`` is 0: each partition has its own journal)."""

    call: int = 0
    """The call's number."""
    duplicate: int = 0
    """Rows of partitions that had already applied this call number (a retry after a lost reply, or a batch sent
    again): not applied again, and not counted in ``accepted`` or ``rejected``."""


class ShardedRunner:
    """The online runner's verbs over a store split into partitions, served by ``shards`` shards.

    Args:
        runner: how every partition's runner is opened (:class:`RunnerSpec`).
        stores: where the partitions' stores and the manifest live (:class:`StoreSpec`, or a folder for SQLite).
        shards: shards to serve them (default: as many as the manifest names, 1 for a new store); a number other
            than the manifest's rebalances.
        partitions: partitions of a new store (fixed for its lifetime; at least the most shards you will want;
            default 16). An existing store keeps its own (another number is refused).
        local: run the shards in this process instead of on Ray (same results, bit for bit).
        actor_options: Ray options for the shard actors (added to ``ACTOR_OPTIONS``).
        lease_wait: seconds a shard waits for a partition's lease held by a shard that is dying.
        pause: the shards' pause after each partition of an observe call (fault tests; see :class:`Shard`).

    Example:
        >>> import tempfile
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> enc = StreamEncoder(EncoderConfig(n_channels=1, hidden_size=8, head_dim=4, horizon=2))
        >>> spec = RunnerSpec(encoder=enc, channels=("load",))
        >>> with ShardedRunner(spec, tempfile.mkdtemp(), shards=2, partitions=4, local=True) as fleet:
        ...     fleet.observe({"stream": ["a", "b", "c"], "time": [1.0, 1.0, 2.0], "load": [0.5, 0.1, 0.2]}).accepted
        ...     fleet.forecast(["c", "a"])["stream"].unique(maintain_order=True).to_list()
        3
        ['c', 'a']
    """

    def __init__(self, runner: RunnerSpec, stores: StoreSpec | str | Path, shards: int | None = None,
                 partitions: int | None = None, *, local: bool = False, actor_options: dict | None = None,
                 lease_wait: float = 60.0, pause: float = 0.0):
        if not isinstance(runner, RunnerSpec):
            raise ValueError(f"ShardedRunner: 'runner' expected a RunnerSpec, got {type(runner).__name__}")
        stores = stores if isinstance(stores, StoreSpec) else StoreSpec(str(stores))
        # shards run in other processes, with other working folders: every path absolute
        self.stores = StoreSpec(str(Path(stores.root).resolve()), stores.dsn, stores.prefix, stores.synchronous)
        if runner.checkpoint is not None:
            runner = RunnerSpec(**{**_fields(runner), "checkpoint": str(Path(runner.checkpoint).resolve())})
        self.spec, self.local, self.lease_wait, self.pause = runner, local, lease_wait, pause
        self.actor_options = dict(actor_options or {})
        self.schema, self.dtype = runner.schema(), runner.dtype()
        manifest = Manifest.load(self.stores.root)
        if manifest is None:
            n = 16 if partitions is None else partitions
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"ShardedRunner: 'partitions' expected a positive int, got {n!r}")
            manifest = Manifest(n, assign(n, shards or 1))
            manifest.save(self.stores.root)
        elif partitions is not None and partitions != manifest.partitions:
            raise ValueError(f"ShardedRunner: the store {self.stores.root!r} has {manifest.partitions} partitions, "
                             f"not {partitions} (the number is fixed when a store is created)")
        self.manifest = manifest
        self.handles: list = []
        self._grow(max(manifest.owners) + 1 if manifest.target is None else
                   max(max(manifest.owners), max(manifest.target)) + 1)
        try:
            if manifest.target is not None:
                self._move(manifest.target)  # a rebalance the last driver did not finish
            last = self._gather("acquire", {s: (ps,) for s, ps in self._by_shard().items()})
            self.call = max((c for calls in last.values() for c in calls.values()), default=0)
            self._catch_up()
            if shards is not None and shards != self.shards:
                self.rebalance(shards)
        except BaseException:
            self.close()
            raise

    # -- layout ----------------------------------------------------------------------------------------------------

    @property
    def partitions(self) -> int:
        """Partitions of the store (fixed)."""
        return self.manifest.partitions

    @property
    def shards(self) -> int:
        """Shards serving the partitions."""
        return max(self.manifest.owners) + 1

    @property
    def id_column(self) -> str:
        """The stream id column of a batch."""
        return self.schema.id_column

    def owners(self) -> list[int]:
        """The owner shard of each partition."""
        return list(self.manifest.owners)

    def _by_shard(self, partitions: Iterable[int] | None = None) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for p in range(self.partitions) if partitions is None else partitions:
            out.setdefault(self.manifest.owners[p], []).append(p)
        return out

    def _grow(self, n: int) -> None:
        while len(self.handles) < n:
            if self.local:
                self.handles.append(LocalShard(self.spec, self.stores, self.lease_wait, self.pause))
            else:
                try:
                    import ray
                except ImportError:
                    raise ImportError("ShardedRunner: shards on Ray need the optional extra: pip install -e "
                                      "'.[distributed]' (or local=True, for shards in this process)") from None
                if not ray.is_initialized():
                    ray.init()
                self.handles.append(RayShard(self.spec, self.stores, self.lease_wait, self.pause,
                                             self.actor_options))

    # -- calls -----------------------------------------------------------------------------------------------------

    def _gather(self, method: str, args: Mapping[int, tuple]) -> dict:
        """Send ``method(*args[s])`` to every shard s at once and gather the replies. The shards lost in the call
        are waited for (Ray restarts them meanwhile, all at once) and sent the call once more."""
        calls = {s: self.handles[s].submit(method, *a) for s, a in args.items()}
        out, lost, error = {}, [], None
        for s, call in calls.items():
            try:
                out[s] = self.handles[s].result(call)
            except ShardLost:
                lost.append(s)
            except Exception as e:  # the first error is raised once every reply is in
                error = error or e
        for s in lost:
            self.handles[s].wait()
        retries = {s: self.handles[s].submit(method, *args[s]) for s in lost}
        for s, call in retries.items():
            try:
                out[s] = self.handles[s].result(call)
            except Exception as e:
                error = error or e
        if error is not None:
            raise error
        return out

    def _split(self, ids: list[str]) -> tuple[np.ndarray, dict[int, dict[int, list[str]]]]:
        """Partition of each id, and ``{shard: {partition: ids}}``."""
        parts = partition_of(ids, self.partitions)
        by: dict[int, dict[int, list[str]]] = {}
        for sid, p in zip(ids, parts.tolist(), strict=True):
            by.setdefault(self.manifest.owners[p], {}).setdefault(p, []).append(sid)
        return parts, by

    def _table(self, method: str, stream_ids: Sequence[str]) -> pl.DataFrame:
        """A per-stream table gathered from the shards, its streams in the order asked."""
        ids = check_ids(stream_ids)
        _, by = self._split(ids)
        return in_order(self._gather(method, {s: (m,) for s, m in by.items()}).values(), ids)

    # -- verbs -----------------------------------------------------------------------------------------------------

    def observe(self, batch: pl.DataFrame | Mapping | Iterable[Mapping], call: int | None = None) -> ShardedResult:
        """Apply a batch (as :meth:`OnlineRunner.observe` takes it) across the shards; durable when it returns.

        The batch is checked whole first (a bad batch raises ``ValueError`` and changes nothing). ``call``: the
        call's number (default: one more than the last); a number some partitions have already applied is not
        applied again there (``ShardedResult.duplicate``), so a batch can be sent again after a driver crash."""
        raw = as_table(batch)
        frame = self.schema.read(raw)
        screen_values(frame, self.schema, None, torch.finfo(self.dtype).max)
        if call is None:
            call = self.call + 1
        elif isinstance(call, bool) or not isinstance(call, int) or call < 1:
            raise ValueError(f"observe: 'call' expected a positive int, got {call!r}")
        id_col = self.schema.id_column
        result = ShardedResult(call=call)
        if raw.height == 0:
            return result
        parts = partition_column(frame[id_col], self.partitions)
        groups = raw.with_columns(parts.alias("__part")).partition_by("__part", as_dict=True, include_key=False)
        by: dict[int, dict[int, pl.DataFrame]] = {}
        for (p,), rows in groups.items():
            if rows[id_col].n_unique() > self.spec.capacity:
                raise ValueError(f"observe: partition {p} gets {rows[id_col].n_unique()} streams in one call, more "
                                 f"than a partition's capacity {self.spec.capacity}: split the batch")
            by.setdefault(self.manifest.owners[p], {})[p] = rows
        self.call = max(self.call, call)
        for replies in self._gather("observe", {s: (call, b) for s, b in by.items()}).values():
            for r in replies.values():
                if "duplicate" in r:
                    result.duplicate += r["duplicate"]
                    continue
                result.accepted += r["accepted"]
                result.rejected += r["rejected"]
                for code, n in r["counts"].items():
                    result.counts[code] = result.counts.get(code, 0) + n
        return result

    def forecast(self, stream_ids: Sequence[str]) -> pl.DataFrame:
        """Forecasts of ``stream_ids`` (as :meth:`OnlineRunner.forecast`), in the order asked."""
        return self._table("forecast", stream_ids)

    def info(self, stream_ids: Sequence[str]) -> pl.DataFrame:
        """Steps applied and last timestamp per stream (as :meth:`OnlineRunner.info`)."""
        return self._table("info", stream_ids)

    def stats(self, stream_ids: Sequence[str]) -> pl.DataFrame:
        """Per-channel statistics per stream (as :meth:`OnlineRunner.stats`)."""
        return self._table("stats", stream_ids)

    def stream_ids(self) -> list[str]:
        """Every known stream, sorted."""
        lists = self._gather("stream_ids", {s: (ps,) for s, ps in self._by_shard().items()})
        return sorted(sid for ids in lists.values() for sid in ids)

    def reset(self, stream_ids: Sequence[str]) -> list[str]:
        """Forget the states of the known ``stream_ids`` (unknown ones skipped); returns those reset, in order."""
        ids = check_ids(stream_ids)
        _, by = self._split(ids)
        done = {sid for ids_ in self._gather("forget", {s: (m, False) for s, m in by.items()}).values()
                for sid in ids_}
        return [sid for sid in dict.fromkeys(ids) if sid in done]

    def delete(self, stream_ids: Sequence[str]) -> None:
        """Remove ``stream_ids`` (all known: an unknown one raises :class:`UnknownStreamError`, nothing removed)."""
        ids = check_ids(stream_ids)
        info = self.info(ids)
        for sid, n in info.select("stream", "steps").rows():
            if n == 0:
                raise UnknownStreamError(f"delete: unknown stream {sid!r}")
        _, by = self._split(ids)
        self._gather("forget", {s: (m, True) for s, m in by.items()})

    def learn(self, stream_ids: Sequence[str]) -> LearnResult:
        """One learn round over the matured windows of ``stream_ids``, whatever their shards: one AdamW step from
        all of them, then every partition serves the new weight version (the protocol:
        :mod:`gdn2ts.distributed.learning`). Durable when it returns; streams with nothing matured are left alone.
        Unknown streams raise :class:`UnknownStreamError`."""
        ids = check_ids(stream_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"learn: stream ids expected distinct, got {ids}")
        self._catch_up()
        _, by = self._split(ids)
        asked = {s: {p: by.get(s, {}).get(p, []) for p in ps} for s, ps in self._by_shard().items()}
        parts = {p: c for got in self._gather("gradients", {s: (m,) for s, m in asked.items()}).values()
                 for p, c in got.items()}
        versions = {p: c["version"] for p, c in parts.items()}
        if len(set(versions.values())) != 1:
            raise RuntimeError(f"learn: the partitions serve different weight versions {versions}")
        blob = self._gather("blob", {self.manifest.owners[0]: (0,)})[self.manifest.owners[0]]
        new, result = learning.step(self.spec.model(), blob, [parts[p] for p in range(self.partitions)])
        if new is not None:
            self._gather("install", {s: (m, new) for s, m in asked.items()})
        return result

    def _catch_up(self) -> None:
        """Install the newest weights on partitions a cut-short learn round left behind."""
        versions = dict(enumerate(self.versions()))
        if len(set(versions.values())) <= 1:
            return
        p, _ = learning.newest(versions)
        blob = self._gather("blob", {self.manifest.owners[p]: (p,)})[self.manifest.owners[p]]
        self._gather("install", {s: ({q: [] for q in ps}, blob) for s, ps in self._by_shard().items()})

    def versions(self) -> list[int]:
        """The weight version each partition serves."""
        got = self._gather("versions", {s: (ps,) for s, ps in self._by_shard().items()})
        return [got[self.manifest.owners[p]][p] for p in range(self.partitions)]

    def flush(self) -> None:
        """Snapshot every partition."""
        self._gather("flush", {s: () for s in range(len(self.handles))})

    # -- rebalance -------------------------------------------------------------------------------------------------

    def rebalance(self, shards: int) -> list[int]:
        """Serve the partitions with ``shards`` shards, moving as few partitions as a balanced assignment allows
        (see the module docstring); returns the partitions moved."""
        target = assign(self.partitions, shards, self.manifest.owners)
        moved = [p for p in range(self.partitions) if target[p] != self.manifest.owners[p]]
        self.manifest.target = target
        self.manifest.save(self.stores.root)
        self._grow(shards)
        self._move(target)
        while len(self.handles) > shards:
            self.handles.pop().stop()
        return moved

    def _move(self, target: list[int]) -> None:
        for p in range(self.partitions):
            old, new = self.manifest.owners[p], target[p]
            if old == new:
                continue
            self._gather("release", {old: ([p],)})
            self.manifest.owners[p] = new
            self.manifest.save(self.stores.root)
            self._gather("acquire", {new: ([p],)})
        self.manifest.target = None
        self.manifest.save(self.stores.root)

    # -- closing ---------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Snapshot and close every partition; stop the shards. Calling it again does nothing.

        Every partition is opened first where it is not (a shard restarted since it last served a partition holds
        it only in its store's journal), so that after ``close`` each partition's records hold all its streams'
        states."""
        error = None
        if self.handles:
            try:
                self._gather("acquire", {s: (ps,) for s, ps in self._by_shard().items() if s < len(self.handles)})
            except Exception as e:
                error = e
        handles, self.handles = self.handles, []
        for h in handles:
            try:
                h.stop()
            except Exception as e:
                error = error or e
        if error is not None:
            raise error

    def __enter__(self) -> ShardedRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def in_order(tables: Iterable[pl.DataFrame | None], ids: list[str]) -> pl.DataFrame:
    """Per-stream tables (one per partition or shard) as one, its streams in the order of ``ids``.

    Example:
        >>> in_order([pl.DataFrame({"stream": ["b", "c"], "x": [2, 3]}), pl.DataFrame({"stream": ["a"], "x": [1]})],
        ...          ["c", "a", "b"])["x"].to_list()
        [3, 1, 2]
    """
    tables = [t for t in tables if t is not None]
    if not tables:
        return pl.DataFrame()
    table = pl.concat(tables)
    order = {sid: i for i, sid in reversed(list(enumerate(ids)))}
    pos = table["stream"].replace_strict(list(order), list(order.values()), return_dtype=pl.Int64)
    return table.with_columns(pos.alias("_pos")).sort("_pos", maintain_order=True).drop("_pos")


def _fields(spec: RunnerSpec) -> dict:
    return {k: getattr(spec, k) for k in spec.__dataclass_fields__ if not k.startswith("_")}
