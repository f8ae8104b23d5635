"""A bounded working set of stream states: preallocated tensor pools on the model's device, slots, LRU eviction.

Every component of a stream's state (each layer's recurrent state and conv tail, the last timestamp and output,
the per-channel scaling statistics) lives in one pool ``[capacity, *shape]``; a stream owns one slot index in all
of them. Streams not in the working set live in the store. A miss loads the stream's record into a free slot; when
none is free, the least recently used streams (never those of the call being served) are evicted, and those whose
state changed since it was last written (dirty) are first written to the store, bit for bit, and committed.
Streams move between the pools and the store as rows (one ``uint8`` row per stream in the store's
:class:`~gdn2ts.streaming.records.RecordLayout`), many per call.

Bookkeeping that the host reads often (last timestamps, step counts, dirty flags, recency) is kept in NumPy
arrays next to the pools, so that grouping and rejection never wait on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from gdn2ts.models import EncoderState
from gdn2ts.streaming.errors import StoreError
from gdn2ts.streaming.records import RecordLayout, Rows
from gdn2ts.streaming.store import StateStore

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

    def record_layout(self) -> RecordLayout:
        """The store's record layout of these components (in this order)."""
        return RecordLayout([(name, self.dtypes[name], self.shapes[name]) for name in self.template])


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
        self.record_layout = layout.record_layout()
        # the store belongs to one model: another model's store is refused here, before any stream is touched
        store.bind(self.record_layout, fingerprint)
        # the pools are columns of one [capacity, record bytes] tensor: a held stream is its store record, so that
        # streams move between the pools and the store as whole rows
        first = next(iter(layout.template.values()))
        self.rows_pool = torch.zeros((capacity, self.record_layout.nbytes), dtype=torch.uint8, device=first.device)
        self.pools = {name: self.record_layout.columns(self.rows_pool, name) for name in layout.template}
        for name, pool in self.pools.items():
            pool.copy_(layout.template[name].expand_as(pool))
        self.template_row = self.rows_pool[:1].clone()
        """A stream that has seen nothing, as a record row ``[1, nbytes]``."""
        # rows move as int64 words (the record size is a multiple of 8): index copies of bytes are 4x slower
        self._words = self.rows_pool.view(torch.int64)
        self._spill: torch.Tensor | None = None  # reused by write_dirty for the rows it writes
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

    def acquire(self, stream_ids: Sequence[str], failed: dict[str, str] | None = None) -> np.ndarray:
        """Slots of distinct ``stream_ids``, loading misses from the store (new streams start from the template).

        A stored record that cannot be used (its checksum fails) raises :class:`CorruptRecordError` naming the
        stream, before anything held changes; with ``failed``, such streams are listed there instead (stream ->
        why), get slot -1, and the others are loaded.
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
        rows = self.store.read_rows(ids)
        if rows.failed:
            if failed is None:
                rows.raise_failed(ids)
            failed.update({ids[i]: why for i, why in rows.failed.items()})
            keep = np.array([i not in rows.failed for i in range(len(ids))], dtype=bool)
            miss, ids = miss[keep], [sid for sid, k in zip(ids, keep, strict=True) if k]
            rows = Rows(*(f[keep] for f in rows[:5]), {})
        new = self._allocate(len(ids))
        self._fill(new, ids, rows)
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
        """``{name: [len(slots), *shape]}`` of the slots' components, contiguous: copies, or with ``copy=False``
        views of the pools where the slots are consecutive and a view is contiguous (the caller must then not write
        to them). The pools are columns of the record rows, strided by the record size, so most components are
        copied either way: the encoder gets ordinary contiguous tensors (measured no slower than the strided views
        on the CPU, by CPU time, 2026-12-07)."""
        run = _consecutive(slots)
        if run is not None and not copy:
            return {name: pool[run].contiguous() for name, pool in self.pools.items()}
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

    def rows(self, slots: np.ndarray, journal_seq: int, out: torch.Tensor | None = None) -> Rows:
        """The held streams in ``slots`` as store rows (a copy; into ``out``, ``[>= n, nbytes / 8]`` int64 on the
        pools' device, when given)."""
        index = torch.from_numpy(slots).to(self.rows_pool.device)
        n = len(slots)
        words = torch.index_select(self._words, 0, index, out=None if out is None else out[:n])
        return Rows(np.ones(n, dtype=bool), words.view(torch.uint8).cpu().numpy(), self.steps[slots].copy(),
                    self.last_time[slots].copy(), np.full(n, journal_seq, dtype=np.int64), {})

    def pack(self, flat: dict[str, torch.Tensor], slots: np.ndarray, steps: np.ndarray, journal_seq: int) -> Rows:
        """Store rows of ``flat`` (``{name: [n, *shape]}``) with ``steps`` ``[n]`` (``slots`` only sizes them)."""
        n = len(slots)
        data = self.record_layout.pack(flat)
        last = flat["last_time"].reshape(n).cpu().numpy().astype(np.float64)
        return Rows(np.ones(n, dtype=bool), data, np.asarray(steps, dtype=np.int64), last,
                    np.full(n, journal_seq, dtype=np.int64), {})

    def write_dirty(self, slots: np.ndarray | None = None) -> int:
        """Write the dirty streams among ``slots`` (all held, by default) to the store, a chunk per committed
        transaction, under journal entry ``seq``; returns how many were written."""
        dirty = np.flatnonzero(self.dirty & self.occupied) if slots is None else slots[self.dirty[slots]]
        for start in range(0, dirty.size, _SPILL_CHUNK):
            part = dirty[start:start + _SPILL_CHUNK]
            try:
                if self._spill is None:
                    self._spill = self._words.new_empty((min(_SPILL_CHUNK, self.capacity), self._words.shape[1]))
                # the buffer is free again once this commit returns: committed, or rolled back below
                self.store.write_rows([self.id_of[i] for i in part.tolist()], self.rows(part, self.seq, self._spill))
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
        if self.store.readonly and self.dirty[victims].any():
            raise StoreError(f"a read-only view cannot hold every stream changed since the writer's last "
                             f"snapshot in its capacity of {self.capacity} (its replay would have to drop one it "
                             "cannot read back): raise 'capacity'")
        # a dirty victim is committed to the store before its slot is reused: nothing is lost if that fails
        self.write_dirty(victims)
        for s in victims.tolist():
            del self.slot_of[self.id_of[s]]
            self.id_of[s] = None
        self.occupied[victims] = False
        return np.concatenate([free, victims])

    def _fill(self, slots: np.ndarray, ids: list[str], rows: Rows) -> None:
        device = self.rows_pool.device
        index = torch.from_numpy(slots).to(device)
        loaded = np.flatnonzero(rows.found)
        fresh = np.flatnonzero(~rows.found)
        if fresh.size:
            at = index[torch.from_numpy(fresh).to(device)]
            self._words.index_copy_(0, at, self.template_row.view(torch.int64).expand(fresh.size, -1))
        if loaded.size:
            data = rows.data if loaded.size == len(ids) else rows.data[loaded]
            at = index if loaded.size == len(ids) else index[torch.from_numpy(loaded).to(device)]
            self._words.index_copy_(0, at, torch.from_numpy(np.ascontiguousarray(data)).view(torch.int64).to(device))
        self.last_time[slots] = np.where(rows.found, rows.last_timestamp, -math.inf)
        self.steps[slots] = np.where(rows.found, rows.steps, 0)
        self.seqs[slots] = np.where(rows.found, rows.journal_seq, 0)
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
