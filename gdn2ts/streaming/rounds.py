"""Round planning and stepping: how one ``observe`` call's rows become encoder steps.

Rows are applied per stream in timestamp order. Round r steps the r-th accepted row of every stream that has one,
all at once; streams are ordered by descending row count, so that round r's streams are the first ``sizes[r]`` of
the call. The plan is a journal :class:`~gdn2ts.streaming.journal.Entry`, so that a replay runs the very same
steps on the very same batches.
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

__all__ = ["Groups", "Plan", "group_streams", "plan_rounds", "Stepper"]


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


class Stepper:
    """Steps streams' flat states (:class:`~gdn2ts.streaming.workingset.StateLayout` components) through an
    entry's rounds with the encoder, updating the scaling statistics and, when learning, the histories."""

    def __init__(self, encoder: StreamEncoder, layout: StateLayout, learning: bool):
        p = next(encoder.parameters())
        self.encoder, self.layout, self.learning = encoder, layout, learning
        self.device, self.dtype = p.device, p.dtype

    @torch.no_grad()
    def run(self, flat: dict[str, torch.Tensor], entry: Entry, skip: np.ndarray | None = None
            ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """Step ``flat`` (``{name: [M, *shape]}``, M = the entry's streams, in its order) through the entry's rounds;
        returns the new components and the rows applied per stream. ``flat`` may be updated in place when it was
        gathered as a copy; with one round it is only read. ``skip`` marks streams (a replay) whose results will be
        dropped: they ride along from a state that accepts any timestamp, so every batch keeps its shape."""
        M = len(entry.stream_ids)
        if skip is not None and skip.any():
            flat["last_time"][torch.from_numpy(skip).to(self.device)] = -math.inf
        values = torch.from_numpy(entry.values).to(self.device)
        times = torch.from_numpy(entry.times).to(self.device)
        covs = torch.from_numpy(entry.covariates).to(self.device) if entry.covariates.shape[1] else None
        covs_in = None if covs is None else covs.to(self.dtype)
        values_in = values.to(self.dtype)
        start = 0
        for n in entry.sizes.tolist():
            rows = slice(start, start + n)
            out = self.encoder.step(values_in[rows], times[rows], None if covs_in is None else covs_in[rows],
                                    self.layout.unflatten({k: v[:n] for k, v in flat.items()}))
            new = self.layout.flatten(out["state"])
            new.update(welford({k: flat[k][:n] for k in STATS}, values[rows]))
            if self.learning:
                hist = {k: flat[k][:n] for k in flat if k.startswith("hist.")}
                new.update(append_history(hist, times[rows], values[rows], None if covs is None else covs[rows]))
            for k, t in new.items():
                if n == M:
                    flat[k] = t
                else:
                    flat[k][:n] = t
            start += n
        rounds = np.bincount(entry.sizes, minlength=M + 1)
        steps = np.cumsum(rounds[::-1])[::-1][1:M + 1]  # streams i < sizes[r] step in round r
        return flat, steps


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
