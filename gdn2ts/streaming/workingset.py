"""A bounded working set of stream states: preallocated tensor pools on the model's device, slots, LRU eviction.

Every component of a stream's state (each layer's recurrent state and conv tail, the last timestamp and output,
the per-channel scaling statistics) lives in one pool ``[capacity, *shape]``; a stream owns one slot index in all
of them. Streams not in the working set live in the store. A miss loads the stream's record into a free slot; when
none is free, the least recently used streams (never those of the call being served) are evicted, and those whose
state changed since it was last written (dirty) are first written to the store, bit for bit, and committed.

Bookkeeping that the host reads often (last timestamps, step counts, dirty flags, recency) is kept in NumPy
arrays next to the pools, so that grouping and rejection never wait on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from gdn2ts.models import EncoderState
from gdn2ts.streaming.store import CorruptRecordError, StateStore, StreamRecord

__all__ = ["StateLayout", "WorkingSet", "STATS"]

STATS = ("stats.count", "stats.mean", "stats.m2")
"""Per-channel scaling statistics of every stream (Welford: count, running mean, sum of squared deviations)."""

_SPILL_CHUNK = 4096  # records encoded and committed per transaction when writing many streams


class StateLayout:
    """The flat, named components of an :class:`~gdn2ts.models.EncoderState` plus the scaling statistics.

    Names: ``layer{i}.{field}`` for each field of each layer's state, ``last_time``, ``last_output``, and
    ``stats.count`` / ``stats.mean`` / ``stats.m2`` (``[channels]`` float64). Shapes are per stream; records
    store every component with a leading axis of 1.

    Example:
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> enc = StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, num_heads=2, head_dim=8))
        >>> layout = StateLayout(enc.init_state(1), n_channels=2)
        >>> layout.shapes["layer0.recurrent"], layout.shapes["last_time"], layout.shapes["stats.mean"]
        ((2, 8, 8), (), (2,))
    """

    def __init__(self, template: EncoderState, n_channels: int):
        self.state_type = type(template)
        self.layer_types = [type(layer) for layer in template.layers]
        flat = self.flatten(template)
        for name in STATS:
            flat[name] = torch.zeros(1, n_channels, dtype=torch.float64, device=template.last_time.device)
        self.template = flat
        """Each component's value for a stream that has seen nothing, ``[1, *shape]``."""
        self.shapes = {name: tuple(t.shape[1:]) for name, t in flat.items()}
        self.dtypes = {name: t.dtype for name, t in flat.items()}

    def add(self, components: dict[str, torch.Tensor]) -> None:
        """Add components (each ``[1, *shape]``, its value for a new stream), such as learning histories."""
        self.template.update(components)
        self.shapes.update({k: tuple(t.shape[1:]) for k, t in components.items()})
        self.dtypes.update({k: t.dtype for k, t in components.items()})

    @staticmethod
    def flatten(state: EncoderState) -> dict[str, torch.Tensor]:
        """``{name: [N, *shape]}`` views of a state of N streams (no copies). A layer's state is a named tuple of
        tensors (``layer{i}.{field}``) or one tensor (``layer{i}``)."""
        flat = {}
        for i, layer in enumerate(state.layers):
            if isinstance(layer, torch.Tensor):
                flat[f"layer{i}"] = layer
            else:
                flat.update({f"layer{i}.{f}": t for f, t in zip(layer._fields, layer, strict=True)})
        flat["last_time"] = state.last_time
        flat["last_output"] = state.last_output
        return flat

    def unflatten(self, flat: dict[str, torch.Tensor]) -> EncoderState:
        """The state (of the template's type) made of the state components of ``flat`` (statistics left out)."""
        layers = tuple(flat[f"layer{i}"] if issubclass(kind, torch.Tensor) else
                       kind(*(flat[f"layer{i}.{f}"] for f in kind._fields)) for i, kind in enumerate(self.layer_types))
        return self.state_type(layers, flat["last_time"], flat["last_output"])

    def check(self, stream_id: str, record: StreamRecord) -> None:
        """Raise :class:`CorruptRecordError` naming the stream when a record's tensors do not fit this layout."""
        names = set(record.tensors)
        if names != set(self.shapes):
            raise CorruptRecordError(
                f"stream {stream_id!r}: stored record holds tensors {sorted(names)}, expected {sorted(self.shapes)}")
        for name, t in record.tensors.items():
            if tuple(t.shape) != (1, *self.shapes[name]) or t.dtype != self.dtypes[name]:
                raise CorruptRecordError(
                    f"stream {stream_id!r}: stored tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected "
                    f"{self.dtypes[name]} {(1, *self.shapes[name])}")


class WorkingSet:
    """At most ``capacity`` streams' states in pools on ``device``, over a :class:`StateStore`.

    Args:
        layout: the state components (:class:`StateLayout`).
        capacity: slots in every pool (the most streams held in memory at once, and in one call).
        store: where streams outside the working set live.
        fingerprint: the model's fingerprint; records are read with it and written under it.

    ``seq`` is the number of the last journal entry the held states reflect; records written by the working set
    carry it (see ``docs/streaming-durability.md``).

    Example:
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> from gdn2ts.streaming import MemoryStore
        >>> enc = StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, num_heads=2, head_dim=8))
        >>> ws = WorkingSet(StateLayout(enc.init_state(1), 2), capacity=2, store=MemoryStore(), fingerprint="m")
        >>> ws.acquire(["a", "b"]).tolist(), ws.pools["layer0.recurrent"].shape
        ([0, 1], torch.Size([2, 2, 8, 8]))
    """

    def __init__(self, layout: StateLayout, capacity: int, store: StateStore, fingerprint: str):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"WorkingSet: 'capacity' expected a positive int, got {capacity!r}")
        self.layout, self.capacity, self.store, self.fingerprint = layout, capacity, store, fingerprint
        self.pools = {name: t.new_empty((capacity, *t.shape[1:])) for name, t in layout.template.items()}
        for name, pool in self.pools.items():
            pool.copy_(layout.template[name].expand_as(pool))
        self.last_time = np.full(capacity, -math.inf)
        self.steps = np.zeros(capacity, dtype=np.int64)
        self.seqs = np.zeros(capacity, dtype=np.int64)  # journal entry each held state reflects
        self.dirty = np.zeros(capacity, dtype=bool)
        self.occupied = np.zeros(capacity, dtype=bool)
        self.used = np.zeros(capacity, dtype=np.int64)  # recency: the tick of the last call that touched a slot
        self.tick = 0
        self.slot_of: dict[str, int] = {}
        self.id_of: list[str | None] = [None] * capacity
        self.seq = 0

    def __len__(self) -> int:
        return len(self.slot_of)

    # ------------------------------------------------------------------------------------------------------------

    def acquire(self, stream_ids: Sequence[str]) -> np.ndarray:
        """Slots of distinct ``stream_ids``, loading misses from the store (new streams start from the template).

        Nothing held changes when a record is refused (fingerprint, checksum, layout): the error is raised first.
        """
        self.tick += 1
        slots = np.fromiter((self.slot_of.get(s, -1) for s in stream_ids), dtype=np.int64, count=len(stream_ids))
        hit = slots >= 0
        self.used[slots[hit]] = self.tick
        miss = np.flatnonzero(~hit)
        if miss.size == 0:
            return slots
        if len(stream_ids) > self.capacity:
            raise ValueError(f"a call touches {len(stream_ids)} streams, more than the working set's capacity "
                             f"{self.capacity}: split the batch or raise 'capacity'")
        ids = [stream_ids[i] for i in miss]
        records = self.store.get(ids, fingerprint=self.fingerprint)
        for sid, rec in records.items():
            if rec is not None:
                self.layout.check(sid, rec)
        new = self._allocate(len(ids))
        self._fill(new, ids, records)
        slots[miss] = new
        return slots

    def resident(self, stream_ids: Sequence[str]) -> np.ndarray:
        """Slots of ``stream_ids`` held now (-1 for the others); loads nothing."""
        return np.fromiter((self.slot_of.get(s, -1) for s in stream_ids), dtype=np.int64, count=len(stream_ids))

    def drop(self, stream_ids: Sequence[str]) -> None:
        """Let go of the held copies of ``stream_ids`` without writing them (their slots become free; ids not held
        are skipped): for streams the store has just removed."""
        for sid in stream_ids:
            s = self.slot_of.pop(sid, None)
            if s is not None:
                self.id_of[s] = None
                self.occupied[s] = self.dirty[s] = False

    def gather(self, slots: np.ndarray, copy: bool = True) -> dict[str, torch.Tensor]:
        """``{name: [len(slots), *shape]}`` of the slots' components: copies, or with ``copy=False`` views of the
        pools when the slots are consecutive (the caller must then not write to them)."""
        run = _consecutive(slots)
        if run is not None and not copy:
            return {name: pool[run] for name, pool in self.pools.items()}
        index = torch.from_numpy(slots).to(next(iter(self.pools.values())).device)
        return {name: pool.index_select(0, index) for name, pool in self.pools.items()}

    def scatter(self, slots: np.ndarray, flat: dict[str, torch.Tensor], steps: np.ndarray, seq: int,
                dirty: bool) -> None:
        """Write ``flat`` (rows in the order of ``slots``) back into the pools; add ``steps`` to the step counts."""
        if slots.size == 0:
            return
        run = _consecutive(slots)
        index = torch.from_numpy(slots).to(next(iter(self.pools.values())).device)
        for name, pool in self.pools.items():
            if run is not None:
                pool[run].copy_(flat[name])
            else:
                pool.index_copy_(0, index, flat[name])
        self.last_time[slots] = flat["last_time"].cpu().numpy()
        self.steps[slots] += steps
        self.seqs[slots] = seq
        self.dirty[slots] = dirty

    def records(self, slots: np.ndarray, journal_seq: int) -> dict[str, StreamRecord]:
        """Records of the held streams in ``slots`` (views of a host copy of their rows)."""
        host = {name: t.cpu() for name, t in self.gather(slots).items()}
        return {self.id_of[s]: StreamRecord({name: t[j:j + 1] for name, t in host.items()},
                                            last_timestamp=float(self.last_time[s]), steps=int(self.steps[s]),
                                            fingerprint=self.fingerprint, journal_seq=journal_seq)
                for j, s in enumerate(slots.tolist())}

    def write_dirty(self, slots: np.ndarray | None = None) -> int:
        """Write the dirty streams among ``slots`` (all held, by default) to the store, a chunk per committed
        transaction, under journal entry ``seq``; returns how many were written."""
        dirty = np.flatnonzero(self.dirty & self.occupied) if slots is None else slots[self.dirty[slots]]
        for start in range(0, dirty.size, _SPILL_CHUNK):
            part = dirty[start:start + _SPILL_CHUNK]
            try:
                self.store.put(self.records(part, self.seq))
                self.store.commit()
            except BaseException:
                self.store.rollback()
                raise
            self.dirty[part] = False
            self.seqs[part] = self.seq
        return int(dirty.size)

    # ------------------------------------------------------------------------------------------------------------

    def _allocate(self, n: int) -> np.ndarray:
        """``n`` free slots, evicting the least recently used streams (none touched by the current call)."""
        free = np.flatnonzero(~self.occupied)[:n]
        if free.size == n:
            return free
        need = n - free.size
        candidates = np.flatnonzero(self.occupied & (self.used < self.tick))
        if candidates.size < need:
            raise ValueError(f"the working set's capacity {self.capacity} cannot hold the streams of one call: "
                             "split the batch or raise 'capacity'")
        order = np.argpartition(self.used[candidates], need - 1)[:need] if need < candidates.size else \
            np.arange(candidates.size)
        victims = candidates[order]
        # a dirty victim is committed to the store before its slot is reused: nothing is lost if that fails
        self.write_dirty(victims)
        for s in victims.tolist():
            del self.slot_of[self.id_of[s]]
            self.id_of[s] = None
        self.occupied[victims] = False
        return np.concatenate([free, victims])

    def _fill(self, slots: np.ndarray, ids: list[str], records: dict[str, StreamRecord | None]) -> None:
        device = next(iter(self.pools.values())).device
        index = torch.from_numpy(slots).to(device)
        loaded = [j for j, sid in enumerate(ids) if records[sid] is not None]
        for name, pool in self.pools.items():
            pool.index_copy_(0, index, self.layout.template[name].expand(len(ids), *pool.shape[1:]))
            if loaded:
                rows = torch.cat([records[ids[j]].tensors[name] for j in loaded]).to(device)
                pool.index_copy_(0, index[loaded], rows)
        self.last_time[slots] = -math.inf
        self.steps[slots] = 0
        self.seqs[slots] = 0
        for j in loaded:
            rec = records[ids[j]]
            self.last_time[slots[j]] = float(rec.tensors["last_time"].reshape(-1)[0])
            self.steps[slots[j]] = rec.steps
            self.seqs[slots[j]] = rec.journal_seq
        self.dirty[slots] = False
        self.occupied[slots] = True
        self.used[slots] = self.tick
        for sid, s in zip(ids, slots.tolist(), strict=True):
            self.slot_of[sid] = s
            self.id_of[s] = sid


def _consecutive(slots: np.ndarray) -> slice | None:
    """``slots`` as a slice when they are consecutive and increasing (a call over streams created together)."""
    if slots.size and slots[-1] - slots[0] == slots.size - 1 and (slots.size == 1 or (np.diff(slots) == 1).all()):
        return slice(int(slots[0]), int(slots[-1]) + 1)
    return None
