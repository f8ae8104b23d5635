"""``gdn2ts stream``: observations from a file or standard input through a checkpoint's encoder into a state store.

Input is long format: a stream id column, a timestamp column (numbers in the checkpoint's time unit, or
ISO-8601 date-times / date-time columns, read as UTC) and one column per channel in raw units, empty for missing.
Calendar covariates the checkpoint names are derived from the timestamp when the input lacks them.

Semantics: the whole input is read and validated before anything is applied (a missing or unknown column, a
non-numeric channel, an inf value or a bad timestamp stops the command with an error naming it, and the store is
left as it was). Rows are then applied in batches of ``batch_rows`` through :class:`OnlineRunner`; each batch is
one commit. A row whose timestamp is not after its stream's last applied observation is rejected and reported
(the other rows proceed), as the runner does.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import polars as pl
import torch

from gdn2ts.models.checkpoint import Checkpoint, load_checkpoint
from gdn2ts.streaming.features import prepare_rows, unscale_forecast
from gdn2ts.streaming.learn import LearnConfig
from gdn2ts.streaming.runner import OnlineRunner
from gdn2ts.streaming.store import SQLiteStore

__all__ = ["FORMATS", "read_observations", "write_table", "open_runner", "run_stream"]

FORMATS = ("csv", "parquet", "jsonl")
_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def _format_of(path: str, given: str | None, default: str | None = None) -> str:
    if given is not None:
        if given not in FORMATS:
            raise ValueError(f"format expected one of {FORMATS}, got {given!r}")
        return given
    fmt = _SUFFIXES.get(Path(path).suffix.lower(), default)
    if fmt is None:
        raise ValueError(f"cannot tell the format of {path!r} from its suffix (expected one of {sorted(_SUFFIXES)}); "
                         "pass --format")
    return fmt


def read_observations(source: str = "-", format: str | None = None) -> pl.DataFrame:
    """Read long-format observations from a file or ``"-"`` (standard input; CSV unless ``format`` says otherwise).

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/obs.jsonl"
        >>> _ = open(path, "w").write('{"stream": "a", "time": 1.0, "load": 3.5}\\n')
        >>> read_observations(path).rows()
        [('a', 1.0, 3.5)]
    """
    fmt = _format_of(source, format, default="csv" if source == "-" else None)
    name = "standard input" if source == "-" else repr(source)
    if source == "-":
        data = io.BytesIO(sys.stdin.buffer.read())
    else:
        if not Path(source).is_file():
            raise ValueError(f"input file {source!r} does not exist")
        data = source
    try:
        if fmt == "csv":
            return pl.read_csv(data)
        if fmt == "parquet":
            return pl.read_parquet(data)
        return pl.read_ndjson(data)
    except (pl.exceptions.PolarsError, OSError, ValueError) as e:
        raise ValueError(f"{name} cannot be read as {fmt} ({type(e).__name__}: {e})") from None


def write_table(frame: pl.DataFrame, path: str) -> None:
    """Write ``frame`` as CSV, Parquet or JSON lines, by the suffix of ``path``."""
    fmt = _format_of(path, None)
    if fmt == "csv":
        frame.write_csv(path)
    elif fmt == "parquet":
        frame.write_parquet(path)
    else:
        frame.write_ndjson(path)


def _validate(frame: pl.DataFrame, channels, covariates, id_column: str, time_column: str) -> None:
    """Whole-input checks, so that a bad row late in a file stops the command before any batch is applied."""
    known = {id_column, time_column, *channels, *covariates}
    unknown = [c for c in frame.columns if c not in known]
    if unknown:
        raise ValueError(f"input has unknown columns {unknown} (expected {id_column!r}, {time_column!r}, channels "
                         f"{list(channels)} and optionally covariates {list(covariates)})")
    for c in channels:
        if c in frame.columns and not (frame.schema[c].is_numeric() or frame.schema[c] == pl.Null):
            raise ValueError(f"channel column {c!r} expected numbers, got {frame.schema[c]}")
        if c in frame.columns and frame.schema[c].is_float() and frame[c].is_infinite().any():
            bad = frame.filter(pl.col(c).is_infinite())[id_column][0]
            raise ValueError(f"channel column {c!r} holds inf for stream {bad!r} (missing values are empty or NaN; "
                             "inf is an error)")
    if frame[id_column].null_count():
        raise ValueError(f"column {id_column!r}: every row needs a stream id")
    t = frame[time_column]
    if t.null_count() or t.is_nan().any() or t.is_infinite().any():
        raise ValueError(f"column {time_column!r}: every row needs a finite timestamp")


def open_runner(ckpt: Checkpoint, store: str | Path, id_column: str = "stream", time_column: str = "time",
                learning: LearnConfig | None = None) -> OnlineRunner:
    """An :class:`OnlineRunner` of the checkpoint's encoder over the SQLite store at ``store`` (closed again if the
    runner refuses it, e.g. a store written by another model). A store that learns loads its learned weights into
    the checkpoint's encoder (``learning`` None continues as the store does)."""
    db = SQLiteStore(store)
    try:
        return OnlineRunner(ckpt.encoder, db, ckpt.scaler.channels, ckpt.covariates, id_column, time_column,
                            learning=learning)
    except BaseException:
        db.close()
        raise


def run_stream(checkpoint: str, store: str, input: str = "-", format: str | None = None, batch_rows: int = 10_000,
               forecast_out: str | None = None, id_column: str = "stream", time_column: str = "time",
               quiet: bool = False, threads: int | None = 1) -> dict:
    """Apply the observations of ``input`` to the states in ``store`` and optionally write forecasts.

    Returns ``{"rows", "accepted", "rejected", "streams", "seconds"}``; rejected rows are listed on standard error.
    ``forecast_out`` (CSV, Parquet or JSON lines, by suffix) receives, for every stream of the input that has a
    state, the forecast from its last observation: stream, origin (its last timestamp, in time units), step,
    channel and one column per quantile, in raw units. ``threads``: torch CPU threads while applying (None: torch's
    choice); one by default, since a call steps small matrices and a second intra-op thread made each step several
    times slower on a busy 2-core machine (measured).
    """
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows expected a positive int, got {batch_rows!r}")
    if forecast_out is not None:
        _format_of(forecast_out, None)
    ckpt = load_checkpoint(checkpoint)
    frame = read_observations(input, format)
    prepared = prepare_rows(frame, ckpt, id_column, time_column)
    _validate(prepared, ckpt.scaler.channels, ckpt.covariates, id_column, time_column)
    started = time.perf_counter()
    runner = open_runner(ckpt, store, id_column, time_column)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        accepted, rejected = 0, []
        for start in range(0, prepared.height, batch_rows):
            result = runner.observe(prepared.slice(start, batch_rows))
            accepted += result.accepted
            rejected += result.rejected
        for _, _, reason in rejected[:20]:
            print(f"rejected: {reason}", file=sys.stderr)
        if len(rejected) > 20:
            print(f"rejected: ... and {len(rejected) - 20} more rows", file=sys.stderr)
        streams = list(dict.fromkeys(prepared[id_column].cast(pl.String).to_list()))
        if forecast_out is not None:
            info = runner.info(streams).filter(pl.col("steps") > 0)
            known = info["stream"].to_list()
            origin = dict(zip(known, info["last_time"].to_list(), strict=True))
            table = unscale_forecast(runner.forecast(known), ckpt.scaler)
            table = table.with_columns(pl.col("stream").replace_strict(origin, return_dtype=pl.Float64)
                                       .alias("origin")).select("stream", "origin", pl.exclude("stream", "origin"))
            write_table(table, forecast_out)
    finally:
        runner.close()
        torch.set_num_threads(previous_threads)
    summary = {"rows": prepared.height, "accepted": accepted, "rejected": len(rejected), "streams": len(streams),
               "seconds": round(time.perf_counter() - started, 3)}
    if not quiet:
        print(f"applied {accepted} of {prepared.height} rows from {len(streams)} streams to {store} "
              f"({len(rejected)} rejected) in {summary['seconds']} s", file=sys.stderr)
    return summary
