"""``gdn2ts stream``: observations from a file or standard input through a checkpoint's encoder into a state store;
forecasts out; streams reset or deleted.

Input is long format: a stream id column, a timestamp column and one column per channel in the user's units,
empty for missing (the id and time column names default to those the checkpoint was trained with). Timestamps
are what the checkpoint's time spec says: date-times (ISO-8601; naive ones in the checkpoint's zone, or UTC),
dates, or numbers in the stated unit. Calendar covariates the checkpoint names are derived from the timestamp
when the input lacks them. The runner scales the values and answers in the user's units (see
:mod:`gdn2ts.streaming.units`).

Semantics:

* A file is read and checked whole before anything is applied (a missing or unknown column, a non-numeric
  value, inf, a bad timestamp: the command stops naming it and the store is as it was), then applied in calls of
  ``batch_rows`` rows.
* Standard input (and a file followed with ``follow``) is applied in micro-batches: a batch closes at
  ``batch_rows`` rows or ``batch_ms`` milliseconds after its first row, whichever comes first, so a slow
  producer's rows are applied promptly. A batch that cannot be read stops the command, naming its lines; it
  changes nothing, the batches before it stay applied.
* A call never touches more streams than the working set holds (``capacity``): larger batches are split by
  stream, every stream's rows in one call, each call all or nothing.
* A row that would harm its stream is rejected and the other rows proceed: a timestamp not after the stream's
  last one, a value beyond ``max_abs``, a timestamp jump beyond ``max_gap``. Rejections are listed on standard
  error with a count per reason; the command's exit status is then 3 (1 for an error, 0 when all rows applied).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import torch

from gdn2ts.apps.stream_input import (
    LineFeed,
    format_of,
    micro_batches,
    parse_lines,
    read_observations,
    split_by_streams,
    write_table,
)
from gdn2ts.models.checkpoint import Checkpoint, Limits, load_checkpoint
from gdn2ts.models.units import parse_duration
from gdn2ts.streaming import SQLiteStore
from gdn2ts.streaming.frames import screen_values
from gdn2ts.streaming.learn import LearnConfig
from gdn2ts.streaming.runner import OnlineRunner

__all__ = ["open_runner", "run_stream", "run_forecast", "run_forget", "read_observations", "write_table",
           "limits_of"]


def open_runner(ckpt: Checkpoint, store: str | Path, id_column: str = "stream", time_column: str = "time",
                learning: LearnConfig | None = None, *, units: bool = False, capacity: int = 4096,
                limits: Limits | None = None, readonly: bool = False) -> OnlineRunner:
    """An :class:`OnlineRunner` of the checkpoint's encoder over the SQLite store at ``store`` (closed again if the
    runner refuses it, e.g. a store written by another model). ``units``: the runner reads and answers in the
    user's units (:meth:`OnlineRunner.from_checkpoint`); otherwise it works in model units. A store that learns
    loads its learned weights into the checkpoint's encoder (``learning`` None continues as the store does).
    ``readonly``: a view beside the store's writer (no lease; forecast, stats, info and audit only)."""
    db = SQLiteStore(store, readonly=readonly)
    try:
        if units:
            return OnlineRunner.from_checkpoint(ckpt, db, capacity=capacity, learning=learning, limits=limits,
                                                id_column=id_column, time_column=time_column)
        return OnlineRunner(ckpt.encoder, db, ckpt.scaler.channels, ckpt.covariates, id_column, time_column,
                            capacity=capacity, learning=learning, limits=limits)
    except BaseException:
        db.close()
        raise


def limits_of(ckpt: Checkpoint, max_gap: str | float | None = None, max_abs: float | None = None) -> Limits:
    """The checkpoint's input bounds with overrides: ``max_gap`` in time units or as a duration (``"90d"``), or
    ``"none"``; ``max_abs`` in standard deviations (model units), 0 for none."""
    limits = ckpt.limits
    if max_gap is not None:
        if isinstance(max_gap, str) and max_gap.strip().lower() == "none":
            gap = None
        else:
            try:
                gap = float(max_gap)
            except ValueError:
                gap = parse_duration(str(max_gap)) / ckpt.time_unit_seconds
        limits = Limits(limits.max_abs, gap, limits.time_range)
    if max_abs is not None:
        limits = Limits(None if max_abs == 0 else max_abs, limits.max_gap, limits.time_range)
    return limits


@contextmanager
def _interruptible(threads: int | None):
    """One torch thread (by default) and SIGTERM as an interrupt, while applying."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)
        torch.set_num_threads(previous)


class _Tally:
    """What the command applied, for the summary and the per-batch acknowledgements."""

    def __init__(self, acks: bool):
        self.rows = self.accepted = self.batches = 0
        self.rejected: list[tuple[str, float, str]] = []
        self.reasons: dict[str, int] = {}
        self.streams: dict[str, None] = {}
        self.acks = acks

    def apply(self, runner: OnlineRunner, frame: pl.DataFrame, capacity: int) -> None:
        accepted, rejected = 0, 0
        for part in split_by_streams(frame, runner.id_column, capacity):
            result = runner.observe(part)
            accepted += result.accepted
            rejected += len(result.rejected)
            self.rejected += result.rejected[:max(0, 20 - len(self.rejected))]
            for code, n in result.reasons.items():
                self.reasons[code] = self.reasons.get(code, 0) + n
        self.rows += frame.height
        self.accepted += accepted
        self.batches += 1
        self.streams.update(dict.fromkeys(frame[runner.id_column].cast(pl.String).to_list()))
        if self.acks:
            print(json.dumps({"batch": self.batches, "rows": frame.height, "accepted": accepted,
                              "rejected": rejected, "total_accepted": self.accepted}), flush=True)


def run_stream(checkpoint: str, store: str, input: str = "-", format: str | None = None, batch_rows: int = 1000,
               batch_ms: float = 200.0, follow: bool = False, idle_exit: float | None = None, capacity: int = 4096,
               forecast_out: str | None = None, id_column: str | None = None, time_column: str | None = None,
               max_gap: str | float | None = None, max_abs: float | None = None, acks: bool = False,
               quiet: bool = False, threads: int | None = 1, workers: int = 0, partitions: int | None = None,
               local: bool = False) -> dict:
    """Apply the observations of ``input`` to the states in ``store`` (see the module docstring) and optionally
    write forecasts.

    Returns ``{"rows", "accepted", "rejected", "reasons", "streams", "batches", "seconds", "interrupted"}``.
    ``forecast_out`` (CSV, Parquet or JSON lines, by suffix) receives, for every stream of the input that has a
    state, the forecast from its last observation (:meth:`OnlineRunner.forecast`, in the user's units).
    ``acks``: print one JSON line per applied batch on standard output. ``threads``: torch CPU threads while
    applying (None: torch's choice); one by default, since a call steps small matrices and a second intra-op
    thread made each step several times slower on a busy 2-core machine (measured).

    ``workers`` N >= 1: ``store`` is a sharded store (a folder: a store per partition and a manifest, see
    :class:`~gdn2ts.distributed.ShardedRunner`) served by N shards on Ray (in this process with ``local``); a store
    served by another number of shards is rebalanced first. ``partitions``: of a new sharded store (default 16).
    Every N gives the same states and forecasts, bit for bit.
    """
    for name, value in (("batch_rows", batch_rows), ("capacity", capacity)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"'{name}' expected a positive int, got {value!r}")
    if not batch_ms > 0:
        raise ValueError(f"'batch_ms' expected a positive number of milliseconds, got {batch_ms!r}")
    if forecast_out is not None:
        format_of(forecast_out, None)
    streaming = input == "-" or follow
    fmt = format_of(input, format, default="csv" if input == "-" else None)
    if streaming and fmt == "parquet":
        raise ValueError("Parquet cannot be streamed: pass a file without --follow, or CSV / JSON lines")
    if input != "-" and not Path(input).is_file():
        raise ValueError(f"input file {input!r} does not exist")
    ckpt = load_checkpoint(checkpoint)
    limits = limits_of(ckpt, max_gap, max_abs)
    whole = None if streaming else read_observations(input, fmt)
    started = time.perf_counter()
    if workers:
        from gdn2ts.distributed import RunnerSpec, ShardedRunner

        spec = RunnerSpec(checkpoint=checkpoint, id_column=id_column, time_column=time_column, capacity=capacity,
                          limits=limits, threads=threads)
        runner = ShardedRunner(spec, store, shards=workers, partitions=partitions, local=local)
    else:
        runner = open_runner(ckpt, store, ckpt.columns[0] if id_column is None else id_column,
                             ckpt.columns[1] if time_column is None else time_column, units=True,
                             capacity=capacity, limits=limits)
    tally, interrupted = _Tally(acks), False
    try:
        with _interruptible(threads):
            try:
                if whole is not None:
                    # the whole file is checked before any of it is applied
                    _check(runner, whole)
                    for start in range(0, whole.height, batch_rows):
                        tally.apply(runner, whole.slice(start, batch_rows), capacity)
                else:
                    _apply_stream(runner, tally, input, fmt, batch_rows, batch_ms / 1e3, follow, idle_exit,
                                  capacity)
            except KeyboardInterrupt:
                interrupted = True
        if forecast_out is not None and tally.streams:
            info = runner.info(list(tally.streams)).filter(pl.col("steps") > 0)
            write_table(runner.forecast(info["stream"].to_list()), forecast_out)
    finally:
        runner.close()
    rejected = tally.rows - tally.accepted
    summary = {"rows": tally.rows, "accepted": tally.accepted, "rejected": rejected, "reasons": tally.reasons,
               "streams": len(tally.streams), "batches": tally.batches,
               "seconds": round(time.perf_counter() - started, 3), "interrupted": interrupted}
    for _, _, reason in tally.rejected:
        print(f"rejected: {reason}", file=sys.stderr)
    if rejected > len(tally.rejected):
        print(f"rejected: ... and {rejected - len(tally.rejected)} more rows", file=sys.stderr)
    if rejected:
        why = ", ".join(f"{code} {n}" for code, n in sorted(tally.reasons.items()))
        print(f"rejected {rejected} of {tally.rows} rows: {why}", file=sys.stderr)
    if not quiet:
        print(f"applied {tally.accepted} of {tally.rows} rows from {len(tally.streams)} streams to {store} in "
              f"{tally.batches} batches ({rejected} rejected) in {summary['seconds']} s"
              + (" (interrupted)" if interrupted else ""), file=sys.stderr)
    return summary


def _check(runner: OnlineRunner, frame: pl.DataFrame) -> None:
    """Raise ``ValueError`` for anything that would stop an observe call of ``frame``'s rows (so that a batch
    split by stream is never applied in part)."""
    read = runner.schema.read(frame, "input")
    screen_values(read, runner.schema, None, torch.finfo(runner.dtype).max, op="input")


def _apply_stream(runner: OnlineRunner, tally: _Tally, source: str, fmt: str, batch_rows: int, seconds: float,
                  follow: bool, idle_exit: float | None, capacity: int) -> None:
    stream = sys.stdin.buffer if source == "-" else open(source, "rb")  # noqa: SIM115 (closed below)
    name = "standard input" if source == "-" else repr(source)
    try:
        feed = LineFeed(stream, follow=follow, idle_exit=idle_exit)
        header, line = None, 0
        for lines in micro_batches(feed, batch_rows, seconds):
            if fmt == "csv" and header is None:
                header, lines = lines[0], lines[1:]
                line += 1
                if not lines:
                    continue
            first, line = line + 1, line + len(lines)
            where = f"{name} lines {first}-{line}" if len(lines) > 1 else f"{name} line {first}"
            try:
                frame = parse_lines((header or b"") + b"".join(lines), fmt, where)
                _check(runner, frame)
            except ValueError as e:
                raise ValueError(f"{where}: {e} (nothing of these lines was applied; the {tally.accepted} rows "
                                 "accepted before them stay applied)") from None
            tally.apply(runner, frame, capacity)
    finally:
        if source != "-":
            stream.close()


def run_forecast(checkpoint: str, store: str, streams: list[str] | None = None, out: str | None = None) -> pl.DataFrame:
    """Forecasts of ``streams`` (all the store's streams by default) from their last observations, in the user's
    units; written to ``out`` (CSV, Parquet or JSON lines) when given."""
    if out is not None:
        format_of(out, None)
    ckpt = load_checkpoint(checkpoint)
    # a read-only view: it answers beside a writer that holds the store (gdn2ts stream apply, running)
    runner = open_runner(ckpt, store, *ckpt.columns, units=True, readonly=True)
    try:
        ids = list(streams) if streams is not None else runner.stream_ids()
        if not ids:
            raise ValueError(f"the store {str(store)!r} holds no streams")
        known = runner.info(ids)
        unknown = known.filter(pl.col("steps") == 0)["stream"].to_list()
        if unknown:
            raise ValueError(f"unknown streams {unknown} (the store has no observation of them)")
        table = runner.forecast(ids)
    finally:
        runner.close()
    if out is not None:
        write_table(table, out)
    return table


def run_forget(checkpoint: str, store: str, streams: list[str], delete: bool = False) -> list[str]:
    """Reset (or, with ``delete``, delete) ``streams`` in ``store`` (see :meth:`OnlineRunner.reset` and
    :meth:`OnlineRunner.delete`); returns the ids changed."""
    ckpt = load_checkpoint(checkpoint)
    runner = open_runner(ckpt, store, *ckpt.columns, units=True)
    try:
        if delete:
            runner.delete(list(streams))
            return list(dict.fromkeys(streams))
        return runner.reset(list(streams))
    finally:
        runner.close()
