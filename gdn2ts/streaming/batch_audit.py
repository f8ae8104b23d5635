"""The eviction audit of a batch of new observations from the streams' current states, read-only: what
:meth:`~gdn2ts.streaming.OnlineRunner.audit` runs.

Each stream of the batch is audited over its rows in timestamp order, starting from its current state (from the
working set or the store; a stream never seen starts from the empty state), exactly as :meth:`observe` would
apply them, but nothing is applied: no state, journal entry, statistic or weight changes, and the working set
loads nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import polars as pl
import torch

from gdn2ts.streaming.audit import StateAudit, audit_encoder
from gdn2ts.streaming.frames import as_table

__all__ = ["audit_batch"]


def audit_batch(runner, batch: pl.DataFrame | Mapping | Iterable[Mapping],
                tags: Mapping[str, tuple[str, float]] | str | None = None) -> StateAudit:
    """Audit ``batch`` (long format, as :meth:`OnlineRunner.observe` takes it) for its streams.

    Args:
        runner: the :class:`~gdn2ts.streaming.OnlineRunner` whose encoder and states are audited.
        batch: the observations; validated like :meth:`observe` (``ValueError`` naming the column).
        tags: events whose written association is followed: a mapping ``name -> (stream id, timestamp)`` of rows
            of the batch, or the name of a boolean column of the batch (each true row is an event named
            ``"<stream>@<timestamp>"``; the column is not a channel).

    Returns:
        :class:`~gdn2ts.streaming.audit.StateAudit` with the batch's streams (in sorted order) and, per stream,
        steps ``0 .. rows - 1`` in timestamp order. A row whose timestamp is not after its stream's last
        observation (or repeats one) raises ``ValueError`` naming the stream; so does a tag that names no row.

    Example:
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> from gdn2ts.streaming import MemoryStore, OnlineRunner
        >>> enc = StreamEncoder(EncoderConfig(n_channels=1, hidden_size=8, num_heads=2, head_dim=4, horizon=2))
        >>> runner = OnlineRunner(enc, MemoryStore(), ["load"])
        >>> _ = runner.observe({"stream": ["a", "a"], "time": [1.0, 2.0], "load": [0.1, 0.2]})
        >>> batch = {"stream": ["a", "b", "a"], "time": [3.0, 1.0, 4.0], "load": [0.3, 0.5, None]}
        >>> audit = runner.audit(batch, tags={"spike": ("a", 3.0)})
        >>> audit.energy.height, audit.associations["tag"].unique().to_list(), runner.info(["a"])["steps"][0]
        (12, ['spike'], 2)
    """
    raw = as_table(batch, "audit")
    flags = None
    if isinstance(tags, str):
        if tags not in raw.columns or raw.schema[tags] not in (pl.Boolean, pl.Null):
            raise ValueError(f"audit: tags expected a boolean column of the batch, got {tags!r} (columns: "
                             f"{raw.columns})")
        flags = raw[tags].fill_null(False).alias("__tag")
        raw = raw.drop(tags)
    elif tags is not None and not isinstance(tags, Mapping):
        raise ValueError(f"audit: tags expected a mapping name -> (stream, timestamp), a column name or None, got "
                         f"{type(tags).__name__}")
    frame = runner.schema.read(raw, "audit")
    if flags is not None:
        frame = frame.with_columns(flags)
    frame = frame.sort([runner.id_column, runner.time_column], maintain_order=True)
    if frame.height == 0:
        raise ValueError("audit: the batch holds no rows")
    ids_col, times = frame[runner.id_column], frame[runner.time_column].to_numpy()
    first = ids_col.ne_missing(ids_col.shift(1)).to_numpy()
    group = np.cumsum(first) - 1
    streams = ids_col.filter(pl.Series(first)).to_list()
    state, _ = runner._states_of(streams)
    last = state.last_time.cpu().numpy()[group]
    prev = np.where(first, last, np.concatenate([[-np.inf], times[:-1]]))
    bad = np.flatnonzero(times <= prev)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"audit: stream {streams[group[i]]!r}: timestamp {times[i]} is not after its last "
                         f"observation {prev[i]}")
    step = np.arange(frame.height) - np.flatnonzero(first)[group]
    B, T = len(streams), int(step.max()) + 1
    C, K = len(runner.channels), len(runner.covariates)
    values = np.full((B, T, C), np.nan)
    values[group, step] = frame.select(runner.channels).fill_null(float("nan")).to_numpy()
    # padding after a stream's rows: unobserved steps (identity steps), dropped from the tables below
    grid_times = np.repeat(times[np.flatnonzero(first)][:, None], T, axis=1)
    grid_times[group, step] = times
    grid_times = np.maximum.accumulate(grid_times, axis=1)
    covs = None
    if K:
        covs = np.zeros((B, T, K))
        covs[group, step] = frame.select(runner.covariates).to_numpy()
    where = {(streams[g], float(t)): (int(g), int(s)) for g, t, s in zip(group, times, step, strict=True)}
    events = {}
    if flags is not None:
        for i in np.flatnonzero(frame["__tag"].to_numpy()).tolist():
            events[f"{streams[group[i]]}@{times[i]:g}"] = (int(group[i]), int(step[i]))
    elif tags is not None:
        for name, at in tags.items():
            if not (isinstance(at, (tuple, list)) and len(at) == 2 and (at[0], float(at[1])) in where):
                raise ValueError(f"audit: tag {name!r} expected a (stream, timestamp) of a row of the batch, got "
                                 f"{at!r}")
            events[name] = where[(at[0], float(at[1]))]
    dev, dt = runner.device, runner.dtype
    audit = audit_encoder(runner.encoder, torch.from_numpy(values).to(dev, dt), torch.from_numpy(grid_times).to(dev),
                          None if covs is None else torch.from_numpy(covs).to(dev, dt), state, events or None,
                          streams)
    n_rows = pl.col("stream").replace_strict(streams, np.bincount(group, minlength=B).tolist(),
                                             return_dtype=pl.Int32)

    def keep(table: pl.DataFrame) -> pl.DataFrame:
        return table.filter(pl.col("step") < n_rows)

    return StateAudit(keep(audit.energy), keep(audit.channels), audit.associations, keep(audit.recall))
