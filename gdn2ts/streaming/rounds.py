"""Round planning and stepping: how one ``observe`` call's rows become encoder steps.

Rows are applied per stream in timestamp order. Round r steps the r-th accepted row of every stream that has one,
all at once; streams are ordered by descending row count, so that round r's streams are the first ``sizes[r]`` of
the call. The plan is a journal :class:`~gdn2ts.streaming.journal.Entry`, so that a replay runs the very same
steps on the very same batches.

Prefill, then decode: a run of many rounds over nearly the same streams (a backfill, many rows per stream in one
call) goes through the encoder's masked parallel forward, rows beyond a stream's last padded with NaN (steps the
encoder skips exactly), instead of one ``encoder.step`` per round, where that is cheaper by a cost model measured
on the CPU (:class:`PrefillRule`): a stepped round has a fixed cost that a prefill pays once per piece, while per
stream and row the batched step is about as cheap as the chunked forward. Which rounds are prefilled, and in which
pieces, is a function of the entry's ``sizes`` alone (:func:`schedule`), so a replay of the entry takes the very
same path and repeats the call's arithmetic bit for bit. The two paths agree to float rounding (the chunked and
the step form of the recurrence add in different orders).

On CUDA the stepped rounds read nothing back from the device: the call's rows go to the device once (pinned,
asynchronous), and the encoder reads no values for validation there (the frame was checked at the ``observe``
edge). A prefill reads a few sizes back per layer and piece (the layer packs each stream's observed rows), never
per round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from gdn2ts.models import StreamEncoder
from gdn2ts.streaming.frames import ObservationSchema
from gdn2ts.streaming.history import append_history
from gdn2ts.streaming.journal import Entry
from gdn2ts.streaming.workingset import STATS, StateLayout

__all__ = ["Groups", "Plan", "group_streams", "plan_rounds", "PrefillRule", "schedule", "stepped", "Stepper"]

_MIN_SPAN = 64  # rounds a prefill piece spans unless its run is shorter (whole chunks of the chunked op)


@dataclass(frozen=True)
class PrefillRule:
    """When :func:`schedule` prefills: the costs (microseconds) it weighs, and the memory bound of one forward.

    The costs were measured on the 2-core CPU with one thread for the encoder of the streaming benchmark (hidden
    32, 2 layers of 2 heads of 16; each the best of 3 runs of ``Stepper.run``, 2026-12-07): a stepped round of n
    streams costs about ``round_us + row_us * n``, a prefill piece of n streams and L rounds about
    ``forward_us + cell_us * n * L'``, with L' rounded up to whole chunks of ``chunk`` rounds. So one stream with 8
    rows or more prefills (5 ms against 3 ms a round: 4.9 times faster at 8 rows, 75 at 128), and 10,000 streams
    with 100 rows each step (9.0 s against 10.3 s measured). Other models and devices (a GPU's launches make a
    round dearer) move the balance; whatever the constants, the rule stays a function of the sizes alone.
    """

    round_us: float = 3000.0
    """Fixed cost of one stepped round."""
    row_us: float = 9.0
    """Each stream stepped in a round."""
    forward_us: float = 5000.0
    """Fixed cost of one prefill forward."""
    cell_us: float = 11.0
    """Each padded (stream, round) cell of a prefill forward (7 to 11 measured, more with more streams)."""
    chunk: int = 32
    """Rounds of one chunk of the chunked op (the CPU's; padding to whole chunks is paid for)."""
    cells: int = 65_536
    """Padded cells of one forward at most: bounds its memory (a longer run is cut into pieces)."""
    min_rounds: int = 8
    """A run shorter than this is always stepped (below it the gain is small at best, and calls of a few rows per
    stream, the common case, keep the step path)."""


@dataclass(frozen=True)
class Groups:
    """The streams of a frame sorted by (stream, time): ``first[i]`` marks each stream's first row, ``group[i]``
    is row i's stream index into ``streams`` (distinct ids in sorted order)."""

    streams: list[str]
    first: np.ndarray
    group: np.ndarray


def group_streams(frame: pl.DataFrame, id_column: str) -> Groups:
    """Group the rows of ``frame`` (sorted by id, then time) by stream."""
    ids = frame[id_column]
    first = ids.ne_missing(ids.shift(1)).to_numpy()
    return Groups(ids.filter(pl.Series(first)).to_list(), first, np.cumsum(first) - 1)


@dataclass
class Plan:
    """What a call will apply: the journal entry (None when no row is accepted), the stepping order as indices
    into the groups' streams, and the rejected rows."""

    entry: Entry | None
    order: np.ndarray
    accepted: int = 0
    rejected: list[tuple[str, float, str]] = field(default_factory=list)


def plan_rounds(frame: pl.DataFrame, groups: Groups, last_time: np.ndarray, schema: ObservationSchema, seq: int,
                fingerprint: str) -> Plan:
    """Reject stale rows and order the rest into rounds.

    Args:
        frame: the call's rows, sorted by (stream, time), as :meth:`ObservationSchema.read` gives them.
        groups: :func:`group_streams` of ``frame``.
        last_time: ``[len(groups.streams)]`` each stream's last applied timestamp (-inf before the first).
        schema: the column names.
        seq, fingerprint: the journal entry's number and model fingerprint.
    """
    first, group, streams = groups.first, groups.group, groups.streams
    times = frame[schema.time_column].to_numpy()
    last = last_time[group]
    repeat = np.zeros_like(first)
    repeat[1:] = ~first[1:] & (times[1:] == times[:-1])
    reject = (times <= last) | repeat
    plan = Plan(None, np.zeros(0, dtype=np.int64))
    for i in np.flatnonzero(reject).tolist():
        sid, prev = streams[group[i]], float(last[i] if times[i] <= last[i] else times[i - 1])
        plan.rejected.append((sid, float(times[i]), f"stream {sid!r}: timestamp {times[i]} is not after its last "
                                                    f"observation {prev}"))
    accepted = np.flatnonzero(~reject)
    if accepted.size == 0:
        return plan
    # rank of each accepted row within its stream
    done = np.cumsum(~reject)
    starts = np.flatnonzero(first)
    rank = done - 1 - (done - ~reject)[starts][group]
    counts = np.bincount(group[accepted], minlength=len(streams))
    active = np.flatnonzero(counts)
    order = active[np.argsort(-counts[active], kind="stable")]
    pos = np.empty(len(streams), dtype=np.int64)
    pos[order] = np.arange(order.size)
    rows = accepted[np.lexsort((pos[group[accepted]], rank[accepted]))]
    values = frame.select(schema.channels).fill_null(float("nan")).to_numpy().astype(np.float64, copy=False)
    covs = (frame.select(schema.covariates).to_numpy().astype(np.float64, copy=False) if schema.covariates
            else np.zeros((frame.height, 0)))
    plan.entry = Entry(seq, fingerprint, (schema.channels, schema.covariates), [streams[g] for g in order.tolist()],
                       np.bincount(rank[accepted]), times[rows], np.ascontiguousarray(values[rows]),
                       np.ascontiguousarray(covs[rows]))
    plan.order, plan.accepted = order, int(accepted.size)
    return plan


def schedule(sizes: np.ndarray, rule: PrefillRule = PrefillRule()) -> list[tuple[int, int, int, int, bool]]:
    """How an entry's rounds are applied: pieces ``(r0, r1, s0, s1, prefill)``, in order, each covering rounds
    ``[r0, r1)`` of streams ``[s0, s1)``; a stepped piece is one round of its first ``sizes[r0]`` streams.

    Rounds are cut into runs over which the stream count stays at or above half of the run's first (so padding
    stays at most half of a prefill). A run is cut into prefill pieces of at most ``rule.cells`` padded (stream,
    round) cells (or one stream), in time (at least 64 rounds a piece) and then over streams, and prefilled when
    that costs less than stepping its rounds by ``rule`` (and it has at least ``rule.min_rounds`` rounds).

    Example:
        >>> schedule(np.array([3, 1]))
        [(0, 1, 0, 3, False), (1, 2, 0, 1, False)]
        >>> schedule(np.array([4] * 3 + [1] * 9))
        [(0, 1, 0, 4, False), (1, 2, 0, 4, False), (2, 3, 0, 4, False), (3, 12, 0, 1, True)]
        >>> schedule(np.array([2] * 100), PrefillRule(cells=128))
        [(0, 64, 0, 2, True), (64, 100, 0, 2, True)]
        >>> schedule(np.full(100, 10_000))[:2]
        [(0, 1, 0, 10000, False), (1, 2, 0, 10000, False)]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    # sizes never increase: the first round of a run with fewer than half the run's first streams ends it
    neg = -2 * sizes
    out: list[tuple[int, int, int, int, bool]] = []
    r, R = 0, sizes.size
    while r < R:
        n = int(sizes[r])
        end = int(np.searchsorted(neg, -n, side="right"))
        pieces = []
        # cut time first (pieces of at least _MIN_SPAN rounds), then streams
        span = min(end - r, max(_MIN_SPAN, rule.cells // n))
        for t0 in range(r, end, span):
            t1 = min(t0 + span, end)
            m, per = int(sizes[t0]), max(1, rule.cells // (t1 - t0))
            pieces.extend((t0, t1, s0, min(s0 + per, m), True) for s0 in range(0, m, per))
        stepping = (end - r) * rule.round_us + rule.row_us * float(sizes[r:end].sum())
        prefill = sum(rule.forward_us + rule.cell_us * (s1 - s0) * -(-(t1 - t0) // rule.chunk) * rule.chunk
                      for t0, t1, s0, s1, _ in pieces)
        if end - r >= rule.min_rounds and prefill < stepping:
            out.extend(pieces)
        else:
            out.extend((t, t + 1, 0, int(sizes[t]), False) for t in range(r, end))
        r = end
    return out


def stepped(sizes: np.ndarray) -> list[tuple[int, int, int, int, bool]]:
    """Every round a step, as :func:`schedule` gives its pieces (the path without prefill).

    Example:
        >>> stepped(np.array([2, 1]))
        [(0, 1, 0, 2, False), (1, 2, 0, 1, False)]
    """
    return [(r, r + 1, 0, int(n), False) for r, n in enumerate(np.asarray(sizes).tolist())]


class Stepper:
    """Steps streams' flat states (:class:`~gdn2ts.streaming.workingset.StateLayout` components) through an
    entry's rounds with the encoder, updating the scaling statistics and, when learning, the histories.

    Runs of many rounds are prefilled with the encoder's parallel forward (:func:`schedule`); an encoder other
    than a :class:`StreamEncoder` (the GRU baselines) is always stepped.
    """

    def __init__(self, encoder: StreamEncoder, layout: StateLayout, learning: bool):
        p = next(encoder.parameters())
        self.encoder, self.layout, self.learning = encoder, layout, learning
        self.device, self.dtype = p.device, p.dtype
        self.native = isinstance(encoder, StreamEncoder)
        self.plan = schedule if self.native else stepped
        """The rule that cuts an entry's rounds into pieces (:func:`schedule`; :func:`stepped` never prefills). A
        function of the entry's sizes alone: a replay must apply the same rule as the call it repeats."""

    @torch.no_grad()
    def run(self, flat: dict[str, torch.Tensor], entry: Entry, skip: np.ndarray | None = None
            ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """Step ``flat`` (``{name: [M, *shape]}``, M = the entry's streams, in its order) through the entry's rounds;
        returns the new components and the rows applied per stream. ``flat`` may be updated in place when it was
        gathered as a copy; with one round it is only read. ``skip`` marks streams (a replay) whose results will be
        dropped: they ride along from a state that accepts any timestamp, so every batch keeps its shape."""
        M = len(entry.stream_ids)
        if skip is not None and skip.any():
            flat["last_time"] = torch.where(self._device(skip), -math.inf, flat["last_time"])
        sizes = entry.sizes
        pieces = self.plan(sizes)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        stepped = [p for p in pieces if not p[4]]
        if stepped:
            # the rows of the stepped rounds go to the device once; each round is then a slice of them
            rows = np.concatenate([np.arange(starts[p[0]], starts[p[1]]) for p in stepped])
            whole = rows.size == entry.times.size
            values = self._device(entry.values if whole else entry.values[rows])
            times = self._device(entry.times if whole else entry.times[rows])
            covs = (self._device(entry.covariates if whole else entry.covariates[rows])
                    if entry.covariates.shape[1] else None)
            values_in = values.to(self.dtype)
            covs_in = None if covs is None else covs.to(self.dtype)
        at = 0
        for r0, r1, s0, s1, prefill in pieces:
            if prefill:
                self._prefill(flat, entry, starts, r0, r1, s0, s1)
                continue
            n, part = s1, slice(at, at + s1)
            at += n
            state = self.layout.unflatten({k: v[:n] for k, v in flat.items()})
            kwargs = {"predict": False} if self.native else {}
            out = self.encoder.step(values_in[part], times[part], None if covs_in is None else covs_in[part], state,
                                    **kwargs)
            new = self.layout.flatten(out["state"])
            new.update(welford({k: flat[k][:n] for k in STATS}, values[part]))
            if self.learning:
                hist = {k: flat[k][:n] for k in flat if k.startswith("hist.")}
                new.update(append_history(hist, times[part], values[part], None if covs is None else covs[part]))
            self._write(flat, new, 0, n, M)
        rounds = np.bincount(sizes, minlength=M + 1)
        steps = np.cumsum(rounds[::-1])[::-1][1:M + 1]  # streams i < sizes[r] step in round r
        return flat, steps

    def _prefill(self, flat: dict[str, torch.Tensor], entry: Entry, starts: np.ndarray, r0: int, r1: int, s0: int,
                 s1: int) -> None:
        """Rounds ``[r0, r1)`` of streams ``[s0, s1)`` in one masked parallel forward (NaN rows pad each stream
        past its last row of the piece; the encoder skips them exactly), the statistics and histories at once."""
        sizes = entry.sizes
        rounds, streams = np.arange(r0, r1), np.arange(s0, s1)
        real = streams[:, None] < sizes[rounds][None, :]  # [g, L]
        index = np.where(real, starts[rounds][None, :] + streams[:, None], 0)
        values = np.where(real[..., None], entry.values[index], np.nan)
        if np.isnan(values).all():
            return  # nothing observed: every state, statistic and history stays as it is
        times = np.where(real, entry.times[index], 0.0)
        values_t, times_t = self._device(values), self._device(times)
        covs_t = self._device(entry.covariates[index]) if entry.covariates.shape[1] else None
        part = {k: v[s0:s1] for k, v in flat.items()}
        out = self.encoder(values_t.to(self.dtype), times_t, None if covs_t is None else covs_t.to(self.dtype),
                           self.layout.unflatten(part), predict=False)
        new = self.layout.flatten(out["state"])
        new.update(welford_rows({k: part[k] for k in STATS}, values_t))
        if self.learning:
            hist = {k: part[k] for k in part if k.startswith("hist.")}
            new.update(append_history_rows(hist, times_t, values_t, covs_t))
        self._write(flat, new, s0, s1, len(entry.stream_ids))

    @staticmethod
    def _write(flat: dict[str, torch.Tensor], new: dict[str, torch.Tensor], s0: int, s1: int, M: int) -> None:
        for k, t in new.items():
            if s0 == 0 and s1 == M:
                flat[k] = t
            else:
                flat[k][s0:s1] = t

    def _device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the model's device; to CUDA through pinned memory, asynchronously (no host sync)."""
        t = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)


def welford(stats: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step of Welford's update per channel, skipping missing (NaN) values: ``x`` ``[n, C]`` float64.

    Example:
        >>> import torch
        >>> s = {"stats.count": torch.zeros(1, 1, dtype=torch.float64), "stats.mean": torch.zeros(1, 1,
        ...      dtype=torch.float64), "stats.m2": torch.zeros(1, 1, dtype=torch.float64)}
        >>> for v in (1.0, float("nan"), 3.0):
        ...     s = welford(s, torch.tensor([[v]], dtype=torch.float64))
        >>> [float(s[k]) for k in ("stats.count", "stats.mean", "stats.m2")]
        [2.0, 2.0, 2.0]
    """
    present = ~torch.isnan(x)
    count = stats["stats.count"] + present
    delta = torch.where(present, x - stats["stats.mean"], 0.0)
    mean = stats["stats.mean"] + delta / count.clamp(min=1)
    m2 = stats["stats.m2"] + delta * torch.where(present, x - mean, 0.0)
    return {"stats.count": count, "stats.mean": mean, "stats.m2": m2}


def welford_rows(stats: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics after ``L`` more rows per stream at once (Chan's parallel merge of the rows' count, mean and
    sum of squared deviations into the running ones), skipping missing (NaN) values: ``x`` ``[n, L, C]`` float64.
    Equal to ``L`` :func:`welford` steps up to float rounding.

    Example:
        >>> import torch
        >>> zero = {k: torch.zeros(1, 1, dtype=torch.float64) for k in ("stats.count", "stats.mean", "stats.m2")}
        >>> s = welford_rows(zero, torch.tensor([[[1.0], [float("nan")], [3.0]]], dtype=torch.float64))
        >>> [float(s[k]) for k in ("stats.count", "stats.mean", "stats.m2")]
        [2.0, 2.0, 2.0]
    """
    present = ~torch.isnan(x)
    n_b = present.sum(1).to(x.dtype)
    mean_b = torch.where(present, x, 0.0).sum(1) / n_b.clamp(min=1)
    m2_b = torch.where(present, x - mean_b[:, None], 0.0).square().sum(1)
    n_a, mean_a = stats["stats.count"], stats["stats.mean"]
    count = n_a + n_b
    share = n_b / count.clamp(min=1)
    delta = mean_b - mean_a
    return {"stats.count": count, "stats.mean": mean_a + delta * share,
            "stats.m2": stats["stats.m2"] + m2_b + delta.square() * n_a * share}


def append_history_rows(hist: dict[str, torch.Tensor], times: torch.Tensor, values: torch.Tensor,
                        covariates: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The histories of ``n`` streams after ``L`` more rows each, equal to ``L`` calls of
    :func:`~gdn2ts.streaming.history.append_history`: ``times`` ``[n, L]``, ``values`` ``[n, L, C]`` (a row with
    nothing observed is not kept), ``covariates`` ``[n, L, K]`` or None. Each history keeps the last of its old
    entries and the new observed rows, in order.

    Example:
        >>> import torch
        >>> from gdn2ts.streaming.history import history_template
        >>> from gdn2ts.streaming.learn import LearnConfig
        >>> h = history_template(LearnConfig(history=3, context=2, min_context=0), 1, 0, "cpu")
        >>> rows = torch.tensor([[[0.5], [float("nan")], [0.7]]], dtype=torch.float64)
        >>> h = append_history_rows(h, torch.tensor([[5.0, 6.0, 7.0]]).double(), rows, None)
        >>> h["hist.time"].tolist()
        [[-inf, 5.0, 7.0]]
    """
    n, H = hist["hist.time"].shape
    observed = ~torch.isnan(values).all(-1)
    keep = torch.cat([observed.new_ones(n, H), observed], dim=1)
    # a stable sort puts the dropped rows first and keeps the order of the rest: the last H are the history
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, -H:]
    rows = {"hist.time": times, "hist.values": values}
    if "hist.covariates" in hist:
        rows["hist.covariates"] = covariates
    out = {}
    for name, row in rows.items():
        both = torch.cat([hist[name], row.to(hist[name].dtype)], dim=1)
        pick = order.view(n, H, *([1] * (both.dim() - 2))).expand(n, H, *both.shape[2:])
        out[name] = both.gather(1, pick)
    return out
