"""The online runner: observations from many streams in, per-stream state in a bounded working set over a store,
forecasts out.

Batch semantics of :meth:`OnlineRunner.observe`:

* The whole batch is validated first; a bad column, an inf value or a wrong type rejects the whole batch with a
  ``ValueError`` and changes nothing. So does a stored state that cannot be used (written by another model:
  :class:`FingerprintMismatchError`; failing its checksum: :class:`CorruptRecordError`), each naming the stream.
* Rows are applied per stream in timestamp order. A row whose timestamp is not after its stream's last applied
  observation (or repeats an earlier row's timestamp) is rejected (listed in the result, with a message naming the
  stream); the stream's other rows and all other streams proceed.
* Rounds: round r steps the r-th accepted row of every stream that has one, all at once (one ``encoder.step``).
* A call is durable when it returns, and all or nothing: with a journal (the default on a durable store) its
  accepted rows are committed as one journal entry; otherwise the states of the streams it touched are committed
  in one transaction. See ``docs/streaming-durability.md`` for the commit policy and recovery.

Learning (``learning=LearnConfig(...)``; see :mod:`gdn2ts.streaming.learn` and ``docs/streaming-learning.md``):
every stream also keeps a bounded history of its observed rows, and :meth:`OnlineRunner.learn` updates the
weights from windows whose whole forecast horizon has been observed. The store keeps the learned weights with a
version; states and journal entries stay tied to the model's lineage (its fingerprint before any learning).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from gdn2ts.models import EncoderState, StreamEncoder
from gdn2ts.streaming import lifecycle, single
from gdn2ts.streaming.commit import Durability
from gdn2ts.streaming.errors import CorruptRecordError, ReadOnlyStoreError
from gdn2ts.streaming.frames import Limits, ObservationSchema, screen_gaps, screen_values
from gdn2ts.streaming.history import THROUGH, history_template, plan_windows
from gdn2ts.streaming.journal import CommitPolicy
from gdn2ts.streaming.learn import MODEL_BLOB, LearnConfig, LearnResult, open_learning
from gdn2ts.streaming.records import Rows, check_ids
from gdn2ts.streaming.recovery import replay_journal
from gdn2ts.streaming.rounds import Stepper, group_streams, plan_rounds
from gdn2ts.streaming.store import StateStore
from gdn2ts.streaming.units import Units, with_forecast_times
from gdn2ts.streaming.workingset import STATS, StateLayout, WorkingSet

__all__ = ["OnlineRunner", "ObserveResult", "UnknownStreamError", "model_fingerprint"]

_VIEW_ATTEMPTS = 5  # fresh starts of a read-only view's replay before a failing record is reported


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the model's class, configuration and parameter bytes: states written by another model (or
    other weights) are recognised. The parameters are named as the model's ``fingerprint_state()`` names them
    where it has one (:meth:`~gdn2ts.models.StreamEncoder.fingerprint_state`: a fixed layout, so that renaming
    modules does not orphan the stores bound to a model), as its ``state_dict`` otherwise."""
    h = hashlib.sha256(type(model).__name__.encode())
    h.update(repr(getattr(model, "config", "")).encode())
    fingerprint_state = getattr(model, "fingerprint_state", model.state_dict)
    for name, t in sorted(fingerprint_state().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _closes_store_on_failure(init):
    """The runner owns the store it is given: a runner that refuses to open (another model's store, a journal it
    cannot replay, bad arguments) closes it, releasing its writer lease."""

    @functools.wraps(init)
    def opened(self, encoder, store, *args, **kwargs):
        try:
            init(self, encoder, store, *args, **kwargs)
        except BaseException:
            close = getattr(store, "close", None)
            if close is not None:
                close()
            raise

    return opened


class UnknownStreamError(KeyError, ValueError):
    """A stream id the runner has never seen (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class ObserveResult:
    """What one :meth:`OnlineRunner.observe` call applied."""

    accepted: int = 0
    """Rows applied."""
    rejected: list[tuple[str, float, str]] = field(default_factory=list)
    """``(stream_id, timestamp, reason)`` of rows not applied."""
    seq: int = 0
    """The journal entry that holds the call (0 when nothing was journaled)."""
    counts: dict[str, int] = field(default_factory=dict)
    """Rejected rows by reason code (:data:`~gdn2ts.streaming.frames.REASONS`)."""

    @property
    def reasons(self) -> dict[str, int]:
        """Rejected rows by reason code, ``other`` for the rest (such as a stream whose stored record cannot be
        used)."""
        other = len(self.rejected) - sum(self.counts.values())
        return {**self.counts, "other": other} if other else dict(self.counts)


class OnlineRunner:
    """Streams observations through a :class:`StreamEncoder`, one state per stream, kept in a bounded working set
    of tensor pools over a :class:`StateStore`.

    Args:
        encoder: the model (its device holds the working set and runs the updates).
        store: where stream states persist (``SQLiteStore`` for durability, ``MemoryStore`` otherwise).
        channels: names of the observed channels, in the encoder's channel order.
        covariates: names of covariate columns (always present in a batch), in the encoder's order.
        id_column, time_column: names of the stream id and timestamp columns.
        capacity: streams held in memory at once (and the most one call may touch); the rest live in the store.
        policy: when work is made durable (:class:`CommitPolicy`).
        learning: learn online (:class:`~gdn2ts.streaming.learn.LearnConfig`; the store must be new or already
            learning with the same configuration), or None: continue as the store does (learning if it holds
            learned weights, loaded into ``encoder``), else no learning.
        units: the user's units (:class:`~gdn2ts.streaming.units.Units`: timestamps in the user's type, raw values;
            forecasts, ``info`` and messages answer in them). None: the runner works in model units (numeric
            timestamps in model time units, scaled values) and refuses date and date-time columns.
            :meth:`from_checkpoint` opens a runner with the checkpoint's units.
        limits: bounds past which a row is rejected instead of applied (:class:`~gdn2ts.models.units.Limits`: a
            value beyond ``max_abs`` model units, a timestamp more than ``max_gap`` time units after its stream's
            last one). Default ``Limits()``: ``max_abs`` 100, no ``max_gap``.

    Opening a runner on a store that holds a journal replays it (the work of a process that stopped without
    :meth:`close`). One runner writes to a store at a time.

    Example:
        >>> import polars as pl, torch
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> from gdn2ts.streaming import MemoryStore
        >>> enc = StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, head_dim=8, horizon=3))
        >>> runner = OnlineRunner(enc, MemoryStore(), channels=["load", "temp"])
        >>> batch = pl.DataFrame({"stream": ["a", "b", "a"], "time": [1.0, 1.0, 2.0],
        ...                       "load": [0.5, None, 0.7], "temp": [20.0, 18.0, None]})
        >>> runner.observe(batch).accepted
        3
        >>> runner.forecast(["a"]).shape   # 3 steps x 2 channels, one row each
        (6, 9)
        >>> runner.stats(["a"])["mean"].to_list()
        [0.6, 20.0]
    """

    @_closes_store_on_failure
    def __init__(self, encoder: StreamEncoder, store: StateStore, channels: Sequence[str],
                 covariates: Sequence[str] = (), id_column: str = "stream", time_column: str = "time",
                 capacity: int = 4096, policy: CommitPolicy | None = None, learning: LearnConfig | None = None,
                 units: Units | None = None, limits: Limits | None = None):
        cfg = encoder.config
        if units is not None and (not isinstance(units, Units) or units.channels != tuple(channels) or
                                  units.covariates != tuple(covariates)):
            raise ValueError(f"OnlineRunner: 'units' expected Units of channels {list(channels)} and covariates "
                             f"{list(covariates)}, got {units!r}")
        if limits is not None and not isinstance(limits, Limits):
            raise ValueError(f"OnlineRunner: 'limits' expected a Limits, got {type(limits).__name__}")
        self.units, self.limits = units, Limits() if limits is None else limits
        if len(channels) != cfg.n_channels or len(set(channels)) != len(channels):
            raise ValueError(f"OnlineRunner: 'channels' expected {cfg.n_channels} distinct names, got {list(channels)}")
        if len(covariates) != cfg.n_covariates:
            raise ValueError(f"OnlineRunner: 'covariates' expected {cfg.n_covariates} names, got {list(covariates)}")
        self.durability = Durability(store, CommitPolicy() if policy is None else policy)
        self.encoder = encoder.eval()
        self.store, self.policy = store, self.durability.policy
        self.schema = ObservationSchema(channels, covariates, id_column, time_column, units)
        self.channels, self.covariates = list(channels), list(covariates)
        self.id_column, self.time_column = id_column, time_column
        self.fingerprint = model_fingerprint(encoder)
        p = next(encoder.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.layout = StateLayout(encoder.init_state(1, device=self.device, dtype=self.dtype), cfg.n_channels)
        # the lineage fingerprint stays the runner's (and every record's) while learning moves the weights
        self.learner = open_learning(encoder, store, learning, self.fingerprint, model_fingerprint)
        self.learning = None if self.learner is None else self.learner.config
        if self.learner is not None:
            self.fingerprint = self.learner.lineage
            self.layout.add(history_template(self.learning, cfg.n_channels, cfg.n_covariates, self.device))
        self.ws = WorkingSet(self.layout, capacity, store, self.fingerprint)
        self.stepper = Stepper(encoder, self.layout, learning=self.learner is not None)
        self.journaled = self.durability.journaled
        self.readonly = bool(getattr(store, "readonly", False))
        self._closed = False
        if self.durability.has_journal:
            replayed = self._replay(capacity)
            self.ws.seq = self.seq
            if replayed and not self.readonly:
                self.flush()

    def _replay(self, capacity: int) -> int:
        """Replay the journal (see :mod:`gdn2ts.streaming.recovery`). A read-only view replays the writer's journal
        in memory from one consistent read of the store; a record the writer moved meanwhile (its old slot reused)
        fails its checksum there, so the view reads again from a fresh start, a few times, before it reports it."""
        for attempt in range(_VIEW_ATTEMPTS):
            try:
                with self.store.snapshot():
                    return replay_journal(self.store, self.ws, self.stepper, self.schema, self._entry_fingerprint)
            except CorruptRecordError:
                if not self.readonly or attempt == _VIEW_ATTEMPTS - 1:
                    raise
                self.ws = WorkingSet(self.layout, capacity, self.store, self.fingerprint)
        return 0

    @property
    def seq(self) -> int:
        """The number of the last journal entry (0 without a journal)."""
        return self.durability.seq

    # ------------------------------------------------------------------------------------------------------------

    def observe(self, batch: pl.DataFrame | Mapping | Iterable[Mapping], *,
                blobs: Mapping[str, bytes] | None = None) -> ObserveResult:
        """Apply a batch of observations (long format: id, time, one column per channel, nulls for missing; a
        polars DataFrame, a dict of columns or an iterable of row dicts). Returns once the call is durable.

        ``blobs`` (a :class:`~gdn2ts.streaming.store.BlobStore`'s named payloads) are staged with the call's own
        commit, in the same transaction as its journal entry (or its rows): a caller that records which of its
        calls were applied (``gdn2ts.distributed``) finds the record exactly when the call is there. A call that
        accepts no row commits nothing, and leaves them to the caller."""
        self._check_open("observe")
        frame = self.schema.read(batch).sort([self.id_column, self.time_column], maintain_order=True)
        frame, rejected, counts = screen_values(frame, self.schema, self.limits.max_abs,
                                                torch.finfo(self.dtype).max, self._describe)
        result = ObserveResult(rejected=rejected, counts=counts)
        if frame.height == 0:
            return result
        groups = group_streams(frame, self.id_column)
        failed: dict[str, str] = {}
        slots = self.ws.acquire(groups.streams, failed)
        if failed:
            # a stream whose stored record cannot be used loses its rows of this call; the others proceed
            ids = frame[self.id_column]
            for sid, t in frame.filter(ids.is_in(list(failed))).select(self.id_column, self.time_column).rows():
                result.rejected.append((sid, t, f"stream {sid!r}: {failed[sid]}"))
            frame = frame.filter(~ids.is_in(list(failed)))
            if frame.height == 0:
                return result
            groups = group_streams(frame, self.id_column)
            slots = self.ws.acquire(groups.streams)
        frame, groups, slots = self._screen_gaps(frame, groups, slots, result)
        if frame.height == 0:
            return result
        plan = plan_rounds(frame, groups, self.ws.last_time[slots], self.schema, self.seq + 1,
                           self._entry_fingerprint)
        if plan.rejected:
            result.counts["not_after_last"] = len(plan.rejected)
            result.rejected += plan.rejected if self.units is None else self.units.restate_stale(
                plan.rejected, dict(zip(groups.streams, self.ws.last_time[slots].tolist(), strict=True)))
        entry = plan.entry
        if entry is None:
            return result
        stream_slots = slots[plan.order]
        # one round replaces every component by the step's new tensors, so it may read the pools in place
        flat, steps = self.stepper.run(self.ws.gather(stream_slots, copy=entry.sizes.size > 1), entry)
        self.durability.commit_call(entry, lambda: (entry.stream_ids, self._rows(stream_slots, flat, steps)), blobs)
        self.ws.scatter(stream_slots, flat, steps, entry.seq if self.journaled else self.ws.seq,
                        dirty=self.journaled)
        result.accepted = plan.accepted
        if self.journaled:
            self.ws.seq = result.seq = entry.seq
            if self.durability.called(entry.seq, plan.accepted):
                self.flush()
        return result

    def forecast(self, stream_ids: Sequence[str]) -> pl.DataFrame:
        """Quantile forecasts from each stream's last observation: one row per (stream, step, channel), a column
        ``q{level}`` per quantile and a column ``error``, null except for a stream whose stored record cannot be
        used (its quantiles are null and ``error`` says why; the other streams are forecast). Unknown streams
        raise ``KeyError``."""
        ids = check_ids(stream_ids)
        cfg = self.encoder.config
        failed: dict[str, str] = {}
        held = self._rows_of(ids, ["last_output", "last_time"], failed)
        h = held["last_output"]
        with torch.no_grad():
            q = self.encoder.heads(h.to(self.device, self.dtype))["forecast"].cpu().double()  # [N, H, C, Q]
        n, per = len(ids), cfg.horizon * cfg.n_channels
        rows = np.repeat(np.arange(n), per)
        bad = np.array([sid in failed for sid in ids], dtype=bool)[rows]
        table = {"stream": pl.Series(ids, dtype=pl.String).gather(rows),
                 "step": np.tile(np.repeat(np.arange(1, cfg.horizon + 1), cfg.n_channels), n),
                 "channel": pl.Series(self.channels).gather(np.tile(np.arange(cfg.n_channels), n * cfg.horizon))}
        for i, level in enumerate(cfg.quantiles):
            table[f"q{level:g}"] = np.where(bad, np.nan, q[..., i].reshape(-1).numpy())
        table["error"] = pl.Series([failed.get(sid) for sid in ids], dtype=pl.String).gather(rows)
        return with_forecast_times(pl.DataFrame(table).fill_nan(None), held["last_time"], rows, bad,
                                   cfg.time_unit, self.units)

    def stats(self, stream_ids: Sequence[str]) -> pl.DataFrame:
        """Per-stream scaling statistics: one row per (stream, channel) with the count of observed values, their
        mean, variance and standard deviation (sample, null below two values), in the runner's units. Unknown
        streams raise ``KeyError``."""
        ids = check_ids(stream_ids)
        t = {k: v.cpu().numpy().reshape(-1) for k, v in self._rows_of(ids, list(STATS)).items()}
        count = t["stats.count"]
        var = np.where(count > 1, t["stats.m2"] / np.maximum(count - 1, 1), np.nan)
        c = len(self.channels)
        table = pl.DataFrame({
            "stream": pl.Series(ids, dtype=pl.String).gather(np.repeat(np.arange(len(ids)), c)),
            "channel": pl.Series(self.channels).gather(np.tile(np.arange(c), len(ids))),
            "count": count.astype(np.int64), "mean": np.where(count > 0, t["stats.mean"], np.nan),
            "var": var, "std": np.sqrt(var)})
        return (table if self.units is None else self.units.stats_to_user(table)).fill_nan(None)

    def stream_ids(self) -> list[str]:
        """Every known stream, sorted: those in the store and those held with observations not yet written."""
        held = [sid for sid, s in self.ws.slot_of.items() if self.ws.steps[s] > 0]
        return sorted(set(self.store.iterate()).union(held))

    def info(self, stream_ids: Sequence[str]) -> pl.DataFrame:
        """One row per stream: ``steps`` (rows applied, 0 for an unknown stream) and ``last_time`` (the last
        observation's timestamp, null before the first), as of the last call, flushed or not."""
        ids = check_ids(stream_ids)
        slots = self.ws.resident(ids)
        steps = np.zeros(len(ids), dtype=np.int64)
        last = np.full(len(ids), -math.inf)
        held = np.flatnonzero(slots >= 0)
        steps[held], last[held] = self.ws.steps[slots[held]], self.ws.last_time[slots[held]]
        cold = [ids[i] for i in np.flatnonzero(slots < 0).tolist()]
        if cold:
            rows = self.store.read_rows(cold)
            rows.raise_failed(cold)
            at = np.flatnonzero(slots < 0)[rows.found]
            steps[at], last[at] = rows.steps[rows.found], rows.last_timestamp[rows.found]
        table = pl.DataFrame({"stream": pl.Series(ids, dtype=pl.String), "steps": steps,
                              "last_time": np.where(np.isfinite(last), last, np.nan)}).fill_nan(None)
        return table if self.units is None else table.with_columns(self.units.time_out(table["last_time"]))

    @classmethod
    def from_checkpoint(cls, checkpoint, store: StateStore, *, capacity: int = 4096,
                        policy: CommitPolicy | None = None, learning: LearnConfig | None = None,
                        limits: Limits | None = None, id_column: str | None = None,
                        time_column: str | None = None) -> OnlineRunner:
        """A runner in the user's units of a checkpoint (or its path); see
        :func:`gdn2ts.streaming.lifecycle.from_checkpoint`."""
        return lifecycle.from_checkpoint(cls, checkpoint, store, capacity=capacity, policy=policy,
                                         learning=learning, limits=limits, id_column=id_column,
                                         time_column=time_column)

    def reset(self, stream_ids: Sequence[str]) -> list[str]:
        """Forget the states of the known ``stream_ids``; see :func:`gdn2ts.streaming.lifecycle.reset`."""
        self._check_open("reset")
        return lifecycle.reset(self, stream_ids)

    def delete(self, stream_ids: Sequence[str]) -> None:
        """Remove the streams ``stream_ids`` (all known); see :func:`gdn2ts.streaming.lifecycle.delete`."""
        self._check_open("delete")
        lifecycle.delete(self, stream_ids)

    def learn(self, stream_ids: Sequence[str]) -> LearnResult:
        """Update the weights from the matured, not yet learned forecast positions of ``stream_ids`` (see
        :mod:`gdn2ts.streaming.learn`): one AdamW step per ``batch_streams`` windows. Durable when it returns.

        The call snapshots first (the journal so far was applied with the old weights), then commits the new
        weights, their version and the learned streams' progress in one transaction; if anything fails, the
        weights, the optimizer and every state are as they were. Streams with nothing matured are left alone.
        Unknown streams raise :class:`UnknownStreamError`; a runner without learning raises ``ValueError``.
        """
        self._check_open("learn")
        learner = self._learner("learn")
        ids = check_ids(stream_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"learn: stream ids expected distinct, got {ids}")
        if not ids:
            return LearnResult(version=learner.version)
        slots = self.ws.acquire(ids)
        for i in np.flatnonzero(self.ws.steps[slots] == 0).tolist():
            raise UnknownStreamError(f"learn: unknown stream {ids[i]!r}")
        names = [k for k in self.layout.shapes if k.startswith("hist.")] + [THROUGH]
        host = {k: v.cpu().numpy() for k, v in self.ws.gather(slots).items() if k in names}
        cfg = self.encoder.config
        plan = plan_windows(host, self.ws.last_time[slots], self.learning, cfg.horizon, cfg.time_unit)
        if plan is None:
            return LearnResult(version=learner.version)
        index = torch.from_numpy(slots).to(self.device)
        before, backup = self.ws.pools[THROUGH].index_select(0, index), learner.backup()
        try:
            steps, targets, loss = learner.step(plan)
            self.flush()
            self.ws.pools[THROUGH].index_copy_(0, index, torch.from_numpy(plan.through).to(self.device))
            self.store.write_rows(ids, self.ws.rows(slots, self.seq))
            self.store.put_blob(MODEL_BLOB, learner.encode(learner.version + 1, model_fingerprint(self.encoder)))
            self.store.commit()
        except BaseException:
            self.store.rollback()
            learner.restore(backup)
            self.ws.pools[THROUGH].index_copy_(0, index, before)
            raise
        self.ws.dirty[slots], self.ws.seqs[slots] = False, self.seq
        learner.version += 1
        return LearnResult(steps, len(plan.rows), targets, loss, learner.version)

    def learned_through(self, stream_ids: Sequence[str]) -> np.ndarray:
        """``[N]`` float64: for each stream, the timestamp (model time units) of the newest forecast origin
        :meth:`learn` has taken, ``-inf`` before the first; every origin learned from lies at or before it. Unknown
        streams raise :class:`UnknownStreamError`; a runner without learning raises ``ValueError``."""
        self._learner("learned_through")
        ids = check_ids(stream_ids)
        return self._rows_of(ids, [THROUGH])[THROUGH].cpu().numpy().astype(np.float64).reshape(len(ids))

    def observe_one(self, stream_id: str, timestamp: float, values: Mapping[str, float | None],
                    covariates: Mapping[str, float] | None = None) -> ObserveResult:
        """Observe one row of one stream; see :func:`gdn2ts.streaming.single.observe_one`."""
        self._check_open()
        return single.observe_one(self, stream_id, timestamp, values, covariates)

    def learn_one(self, stream_id: str, timestamp: float, values: Mapping[str, float | None],
                  covariates: Mapping[str, float] | None = None) -> LearnResult:
        """Observe one row of one stream, then learn from what matured; see
        :func:`gdn2ts.streaming.single.learn_one`."""
        self._check_open()
        return single.learn_one(self, stream_id, timestamp, values, covariates)

    def forecast_one(self, stream_id: str, horizon: int | None = None) -> dict[str, list[dict[float, float]]]:
        """One stream's forecast as ``{channel: [{level: value}, ...]}``; see
        :func:`gdn2ts.streaming.single.forecast_one`."""
        return single.forecast_one(self, stream_id, horizon)

    def audit(self, batch: pl.DataFrame | Mapping | Iterable[Mapping], tags=None):
        """Audit what new observations would do to their streams' states, starting from each stream's current
        state, without applying them (read-only: no state, journal or weight changes). Returns a
        :class:`~gdn2ts.streaming.audit.StateAudit` (see :func:`gdn2ts.streaming.batch_audit.audit_batch` for
        ``tags`` and the errors)."""
        from gdn2ts.streaming.batch_audit import audit_batch

        self._check_open()
        return audit_batch(self, batch, tags)

    def flush(self) -> None:
        """Snapshot: write every changed stream's state to the store and truncate the journal it reflects."""
        self._check_open("flush")
        self.durability.snapshot(self.ws)

    def close(self) -> None:
        """Flush (unless read-only) and close the store, releasing its lease, also when the flush fails (its error
        is raised; what the flush could not write is in the journal, replayed by the next open). Calling it again
        does nothing."""
        if self._closed:
            return
        try:
            if not self.readonly:
                self.flush()
        finally:
            self._closed = True
            self.store.close()

    def __enter__(self) -> OnlineRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------------------

    def _rows(self, slots: np.ndarray, flat: dict[str, torch.Tensor], steps: np.ndarray) -> Rows:
        """Store rows of streams in ``slots`` after stepping: their new components ``flat`` and ``steps`` more."""
        return self.ws.pack(flat, slots, self.ws.steps[slots] + steps, self.ws.seq)

    def _rows_of(self, ids: list[str], names: list[str], failed: dict[str, str] | None = None
                 ) -> dict[str, torch.Tensor]:
        """``{name: [N, *shape]}`` of known streams, from the working set or straight from the store (a read does
        not disturb the working set). With ``failed``, a stream whose stored record cannot be used is listed there
        (its rows are left as they are) instead of raising."""
        slots = self.ws.resident(ids)
        held = np.flatnonzero(slots >= 0)
        for i in held[self.ws.steps[slots[held]] == 0].tolist():
            raise UnknownStreamError(f"unknown stream {ids[i]!r}")
        out = {k: self.ws.pools[k].new_empty((len(ids), *self.ws.pools[k].shape[1:])) for k in names}
        if held.size:
            index, at = torch.from_numpy(slots[held]).to(self.device), torch.from_numpy(held).to(self.device)
            for k in names:
                out[k][at] = self.ws.pools[k].index_select(0, index)
        cold = np.flatnonzero(slots < 0)
        if cold.size:
            cold_ids = [ids[i] for i in cold.tolist()]
            rows = self.store.read_rows(cold_ids)
            if failed is None:
                rows.raise_failed(cold_ids)
            failed_here = {i: why for i, why in rows.failed.items()}
            for i in np.flatnonzero(~rows.found).tolist():
                if i not in failed_here:
                    raise UnknownStreamError(f"unknown stream {cold_ids[i]!r}")
            if failed is not None:
                failed.update({cold_ids[i]: why for i, why in failed_here.items()})
            good = np.flatnonzero(rows.found)
            tensors = self.ws.record_layout.unpack(rows.data[good])
            at = torch.from_numpy(cold[good]).to(self.device)
            for k in names:
                out[k][at] = tensors[k].to(self.device)
        return out

    @property
    def version(self) -> int:
        """The weights' learning version (0: as given, or no learning)."""
        return 0 if self.learner is None else self.learner.version

    @property
    def _entry_fingerprint(self) -> str:
        # journal entries name the weight version that applied them: a replay with other weights is refused
        return self.fingerprint if self.version == 0 else f"{self.fingerprint}@v{self.version}"

    def _learner(self, op: str):
        if self.learner is None:
            raise ValueError(f"{op}: this runner does not learn; open it with learning=LearnConfig(...) on a new "
                             "store")
        return self.learner

    def _states_of(self, ids: list[str]) -> tuple[EncoderState, np.ndarray]:
        """The current states of ``ids`` (known or not: unknown streams get the empty state) and their step
        counts, read without loading anything into the working set."""
        known = self.info(ids)["steps"].to_numpy()
        old = [ids[i] for i in np.flatnonzero(known > 0).tolist()]
        names = list(self.layout.template)
        flat = {k: t.expand(len(ids), *t.shape[1:]).clone() for k, t in self.layout.template.items()}
        if old:
            at = torch.from_numpy(np.flatnonzero(known > 0)).to(self.device)
            rows = self._rows_of(old, names)
            for k in names:
                flat[k][at] = rows[k]
        return self.layout.unflatten(flat), known

    def _describe(self, t: float) -> str:
        """A model timestamp for messages, in the user's type when the runner has units."""
        return repr(t) if self.units is None else self.units.format_time(t)

    def _screen_gaps(self, frame: pl.DataFrame, groups, slots: np.ndarray, result: ObserveResult):
        """Drop the rows :func:`~gdn2ts.streaming.frames.screen_gaps` rejects (recorded in ``result``)."""
        if self.limits.max_gap is None:
            return frame, groups, slots
        keep, far = screen_gaps(frame[self.time_column].to_numpy(), groups.first, groups.group,
                                self.ws.last_time[slots], groups.streams, self.limits, self._describe)
        if not far:
            return frame, groups, slots
        result.rejected += far
        result.counts["too_far"] = len(far)
        frame = frame.filter(pl.Series(keep))
        kept = group_streams(frame, self.id_column)
        index = {sid: i for i, sid in enumerate(groups.streams)}
        return frame, kept, slots[np.array([index[sid] for sid in kept.streams], dtype=np.int64)]

    def _check_open(self, op: str | None = None) -> None:
        """Raise unless the runner is open (and, for a writing ``op``, writable)."""
        if self._closed:
            raise ValueError("OnlineRunner: the runner is closed")
        if op is not None and self.readonly:
            raise ReadOnlyStoreError(f"OnlineRunner: {op} is refused: the store is open read-only (a read-only view "
                                     "answers forecast, stats, info and audit)")
