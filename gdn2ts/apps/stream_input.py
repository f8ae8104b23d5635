"""Observations in for ``gdn2ts stream``: whole files, and standard input or a growing file in micro-batches.

A micro-batch closes when it holds ``max_rows`` rows or ``max_seconds`` have passed since its first row arrived,
whichever comes first, so a slow producer sees each row applied within about ``max_seconds`` and a fast one is
applied ``max_rows`` at a time. Lines are read by a thread into a queue, so waiting for the next line never
delays a batch that is due. CSV and JSON lines stream; Parquet is read whole. CSV cells are read as text and
converted by the runner's units (so every batch gets the same types, whatever its first rows hold).
"""

from __future__ import annotations

import io
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import polars as pl

__all__ = ["FORMATS", "format_of", "read_observations", "parse_lines", "LineFeed", "micro_batches", "write_table",
           "split_by_streams"]

FORMATS = ("csv", "parquet", "jsonl")
_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_END = object()


def format_of(path: str, given: str | None, default: str | None = None) -> str:
    """The format of ``path``: ``given`` if set, else from its suffix (else ``default``)."""
    if given is not None:
        if given not in FORMATS:
            raise ValueError(f"format expected one of {FORMATS}, got {given!r}")
        return given
    fmt = _SUFFIXES.get(Path(path).suffix.lower(), default)
    if fmt is None:
        raise ValueError(f"cannot tell the format of {path!r} from its suffix (expected one of {sorted(_SUFFIXES)}); "
                         "pass --format")
    return fmt


def parse_lines(data: bytes, fmt: str, name: str = "input") -> pl.DataFrame:
    """CSV (with its header line) or JSON lines as a table; CSV cells stay text.

    Example:
        >>> parse_lines(b"stream,time,load\\na,2024-05-01,3.5\\n", "csv").rows()
        [('a', '2024-05-01', '3.5')]
    """
    try:
        if fmt == "csv":
            return pl.read_csv(io.BytesIO(data), infer_schema=False)
        if fmt == "jsonl":
            return pl.read_ndjson(io.BytesIO(data))
        return pl.read_parquet(io.BytesIO(data))
    except (pl.exceptions.PolarsError, OSError, ValueError) as e:
        raise ValueError(f"{name} cannot be read as {fmt} ({type(e).__name__}: {e})") from None


def read_observations(source: str = "-", format: str | None = None) -> pl.DataFrame:
    """Read long-format observations from a file or ``"-"`` (standard input; CSV unless ``format`` says
    otherwise), whole.

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/obs.jsonl"
        >>> _ = open(path, "w").write('{"stream": "a", "time": 1.0, "load": 3.5}\\n')
        >>> read_observations(path).rows()
        [('a', 1.0, 3.5)]
    """
    fmt = format_of(source, format, default="csv" if source == "-" else None)
    if source == "-":
        return parse_lines(sys.stdin.buffer.read(), fmt, "standard input")
    if not Path(source).is_file():
        raise ValueError(f"input file {source!r} does not exist")
    return parse_lines(Path(source).read_bytes(), fmt, repr(source))


class LineFeed:
    """Complete lines of a binary stream, read by a daemon thread into a queue.

    Args:
        stream: the source (standard input, or an open file).
        follow: at the end of the stream, wait for it to grow (``tail -f``) instead of stopping.
        idle_exit: with ``follow``, stop after this many seconds without a new line (None: never).
        poll: seconds between looks at a followed file that has not grown.
    """

    def __init__(self, stream: BinaryIO, follow: bool = False, idle_exit: float | None = None, poll: float = 0.05):
        self.lines: queue.Queue = queue.Queue(maxsize=100_000)
        self._stream, self._follow, self._idle, self._poll = stream, follow, idle_exit, poll
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gdn2ts-stream-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        partial, quiet_since = b"", time.monotonic()
        try:
            while True:
                line = self._stream.readline()
                if line:
                    quiet_since = time.monotonic()
                    partial += line
                    if partial.endswith(b"\n"):
                        self.lines.put(partial)
                        partial = b""
                    continue
                if not self._follow or (self._idle is not None and time.monotonic() - quiet_since >= self._idle):
                    break
                time.sleep(self._poll)
            if partial.strip():
                self.lines.put(partial + b"\n")
        except BaseException as e:  # reported to the consumer, which raises it
            self.error = e
        finally:
            self.lines.put(_END)


def micro_batches(feed: LineFeed, max_rows: int, max_seconds: float) -> Iterator[list[bytes]]:
    """Lists of lines from ``feed``: each closes at ``max_rows`` lines or ``max_seconds`` after its first line,
    whichever comes first (blank lines skipped). Ends when the feed does.

    Example:
        >>> feed = LineFeed(io.BytesIO(b"a\\nb\\nc\\n"))
        >>> list(micro_batches(feed, max_rows=2, max_seconds=10.0))
        [[b'a\\n', b'b\\n'], [b'c\\n']]
    """
    done = interrupted = False
    while not done:
        first = feed.lines.get()
        if first is _END:
            break
        if not first.strip():
            continue
        lines, due = [first], time.monotonic() + max_seconds
        while len(lines) < max_rows:
            left = due - time.monotonic()
            if left <= 0:
                break
            try:
                item = feed.lines.get(timeout=left)
            except queue.Empty:
                break
            except KeyboardInterrupt:
                # an interrupt (SIGINT, or SIGTERM as gdn2ts stream maps it) while a batch is open: the lines
                # already read are still handed on, then the interrupt goes on
                done = interrupted = True
                break
            if item is _END:
                done = True
                break
            if item.strip():
                lines.append(item)
        yield lines
    if interrupted:
        raise KeyboardInterrupt
    if feed.error is not None:
        raise ValueError(f"reading the input failed ({type(feed.error).__name__}: {feed.error})")


def split_by_streams(frame: pl.DataFrame, id_column: str, capacity: int) -> list[pl.DataFrame]:
    """``frame`` in parts of at most ``capacity`` distinct streams each, every stream's rows in one part (in their
    order), so that each part fits the runner's working set and no stream is applied half in one call.

    Example:
        >>> frame = pl.DataFrame({"stream": ["a", "b", "c", "a"], "x": [1, 2, 3, 4]})
        >>> [p["x"].to_list() for p in split_by_streams(frame, "stream", 2)]
        [[1, 2, 4], [3]]
    """
    ids = frame[id_column]
    streams = ids.unique(maintain_order=True)
    if streams.len() <= capacity:
        return [frame]
    part = pl.Series(range(streams.len())) // capacity
    index = ids.replace_strict(streams, part, return_dtype=pl.Int64)
    return [frame.filter(index == p) for p in range(int(part.max()) + 1)]


def write_table(frame: pl.DataFrame, path: str) -> None:
    """Write ``frame`` as CSV, Parquet or JSON lines, by the suffix of ``path``."""
    fmt = format_of(path, None)
    if fmt == "csv":
        frame.write_csv(path)
    elif fmt == "parquet":
        frame.write_parquet(path)
    else:
        frame.write_ndjson(path)
