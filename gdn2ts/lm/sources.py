"""Document sources for the LM data pipeline: each yields documents (``str``) in one fixed order, from any index on.

A source is anything with ``documents(start=0)``, an iterator over the documents from index ``start`` on
(:class:`DocumentSource`). The order is fixed by the source's arguments: files in the order given, each glob's matches
sorted by path, and rows/lines/paragraphs in file order. That fixed order is what makes packing deterministic and
resumable: a position in the corpus is a document index.

Sources here: :class:`Documents` (a list in memory), :class:`TextFiles` (one document per file, or paragraphs split
on blank lines), :class:`JsonLines` (a string field per line), :class:`ParquetFiles` (a string column, read in slices
so a shard is never held whole) and :func:`fineweb_edu` (the public FineWeb-Edu parquet shards, read over ``hf://``
by polars). Nothing is read or downloaded when a source is built, only when it is iterated.
"""

from __future__ import annotations

import glob
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["FINEWEB_EDU_CONFIGS", "SOURCE_TYPES", "DocumentSource", "Documents", "JsonLines", "ParquetFiles",
           "TextFiles", "build_source", "expand_paths", "fineweb_edu", "list_hf_files"]

# A paragraph break: one or more lines holding nothing but whitespace.
_BLANK_LINE = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")

FINEWEB_EDU_REPO = "HuggingFaceFW/fineweb-edu"
# The dataset's named configs -> the folder of their parquet shards in the dataset repository.
FINEWEB_EDU_CONFIGS = {"sample-10BT": "sample/10BT", "sample-100BT": "sample/100BT",
                       "sample-350BT": "sample/350BT", "default": "data"}


@runtime_checkable
class DocumentSource(Protocol):
    """Documents in a fixed order; ``documents(start)`` yields those with index ``>= start``."""

    def documents(self, start: int = 0) -> Iterator[str]: ...


def expand_paths(paths: str | Path | Sequence[str | Path], what: str = "paths") -> list[str]:
    """Paths as given, with each glob (``*``, ``?``, ``[``) replaced by its sorted matches; remote URLs
    (``scheme://``) pass through unchecked.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("b.txt", "a.txt"):
        ...     _ = (d / name).write_text(name)
        >>> [pathlib.Path(p).name for p in expand_paths(str(d / "*.txt"))]
        ['a.txt', 'b.txt']
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise ValueError(f"source: argument '{what}' expected at least one path or glob, got none")
    out: list[str] = []
    for item in items:
        item = str(item)
        if "://" in item:
            out.append(item)
        elif any(c in item for c in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise ValueError(f"source: argument '{what}' expected the glob {item!r} to match files, "
                                 f"it matches none")
            out.extend(matches)
        elif not Path(item).is_file():
            raise ValueError(f"source: argument '{what}' expected existing files, got {item!r} (no such file)")
        else:
            out.append(item)
    return out


class Documents:
    """Documents held in memory, in list order.

    Example:
        >>> list(Documents(["a", "b", "c"]).documents(1))
        ['b', 'c']
    """

    def __init__(self, texts: Sequence[str]):
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"Documents: argument 'texts' expected strings, got {type(t).__name__} at {i}")
        self.texts = list(texts)

    def documents(self, start: int = 0) -> Iterator[str]:
        yield from self.texts[start:]


class TextFiles:
    """Plain UTF-8 text files: ``split="file"`` makes each file one document; ``split="blank_lines"`` makes each
    paragraph one (text between lines that are empty or whitespace only, with its surrounding newlines removed;
    paragraphs that are only whitespace are dropped).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.txt"
        >>> _ = p.write_text("First para,\\nline two.\\n\\n  \\nSecond.\\n")
        >>> list(TextFiles(p, split="blank_lines").documents())
        ['First para,\\nline two.', 'Second.']
        >>> len(list(TextFiles(p).documents()))
        1
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], split: str = "file"):
        if split not in ("file", "blank_lines"):
            raise ValueError(f"TextFiles: argument 'split' expected 'file' or 'blank_lines', got {split!r}")
        self.paths = expand_paths(paths)
        self.split = split

    def documents(self, start: int = 0) -> Iterator[str]:
        index = 0
        for path in self.paths:
            text = Path(path).read_text(encoding="utf-8")
            if self.split == "file":
                docs = [text]
            else:
                docs = [p.strip("\r\n") for p in _BLANK_LINE.split(text) if p.strip()]
            for doc in docs:
                if index >= start:
                    yield doc
                index += 1


class JsonLines:
    """JSON-lines files, one object per non-empty line; the document is its string field ``field``.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
        >>> _ = p.write_text('{"text": "one", "id": 1}\\n{"text": "two", "id": 2}\\n')
        >>> list(JsonLines(p).documents())
        ['one', 'two']
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], field: str = "text"):
        self.paths = expand_paths(paths)
        self.field = field

    def documents(self, start: int = 0) -> Iterator[str]:
        index = 0
        for path in self.paths:
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if index >= start:
                        yield self._text(path, line_no, line)
                    index += 1

    def _text(self, path: str, line_no: int, line: str) -> str:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"JsonLines: {path}:{line_no} expected a JSON object, got invalid JSON ({err})") from err
        if not isinstance(record, dict) or self.field not in record:
            keys = sorted(record) if isinstance(record, dict) else []
            raise ValueError(f"JsonLines: {path}:{line_no} expected an object with the field {self.field!r}, "
                             f"got {type(record).__name__} with keys {keys}")
        text = record[self.field]
        if not isinstance(text, str):
            raise ValueError(f"JsonLines: {path}:{line_no} expected the field {self.field!r} to be a string (text), "
                             f"got {type(text).__name__}")
        return text


class ParquetFiles:
    """Parquet files (local paths, ``https://`` or ``hf://`` URLs); the document is the string column ``column``.

    Only that column is read, ``batch_rows`` rows at a time, so a multi-gigabyte shard is never held whole; a start
    index skips whole files by their row counts (file metadata only) before reading.

    Example:
        >>> import tempfile, pathlib, polars as pl
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> pl.DataFrame({"text": ["a", "b"], "score": [3.1, 2.7]}).write_parquet(d / "0.parquet")
        >>> pl.DataFrame({"text": ["c"], "score": [4.0]}).write_parquet(d / "1.parquet")
        >>> list(ParquetFiles(str(d / "*.parquet")).documents(1))
        ['b', 'c']
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], column: str = "text", batch_rows: int = 2048):
        if batch_rows < 1:
            raise ValueError(f"ParquetFiles: argument 'batch_rows' expected >= 1, got {batch_rows}")
        self.paths = expand_paths(paths)
        self.column = column
        self.batch_rows = batch_rows

    def _scan(self, path: str):
        import polars as pl  # (imported when Parquet is read: importing gdn2ts.lm stays light)

        frame = pl.scan_parquet(path)
        schema = frame.collect_schema()
        if self.column not in schema:
            raise ValueError(f"ParquetFiles: {path} expected a column {self.column!r}, got columns {list(schema)}")
        if schema[self.column] != pl.String:
            raise ValueError(f"ParquetFiles: {path} expected the column {self.column!r} to be text (String), "
                             f"got {schema[self.column]}")
        return frame.select(self.column)

    def documents(self, start: int = 0) -> Iterator[str]:
        index = 0
        import polars as pl

        for path in self.paths:
            frame = self._scan(path)
            rows = frame.select(pl.len()).collect().item()
            if index + rows <= start:
                index += rows
                continue
            offset = max(0, start - index)
            while offset < rows:
                batch = frame.slice(offset, self.batch_rows).collect().to_series()
                # A null cell is a missing document, not an empty one: it is read as "" and packs to nothing.
                yield from (t if t is not None else "" for t in batch.to_list())
                offset += len(batch)
            index += rows


def _hub_open(url: str, timeout: float):
    """GET ``url``, with the ``HF_TOKEN`` of the environment as a bearer token when it is set."""
    token = os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def list_hf_files(repo: str, folder: str, suffix: str = ".parquet", endpoint: str = "https://huggingface.co",
                  opener=_hub_open) -> list[str]:
    """Sorted paths of the files under ``folder`` (recursively) of a public Hugging Face dataset repository, from
    the Hub's tree API (pages followed through the ``Link: rel="next"`` header). Network access happens here.

    Example:
        >>> import io, json
        >>> class Reply(io.BytesIO):
        ...     headers = {}
        >>> listing = [{"type": "file", "path": "sample/10BT/001_00000.parquet"},
        ...            {"type": "file", "path": "sample/10BT/000_00000.parquet"}, {"type": "directory", "path": "x"}]
        >>> list_hf_files("HuggingFaceFW/fineweb-edu", "sample/10BT",
        ...               opener=lambda url, timeout: Reply(json.dumps(listing).encode()))
        ['sample/10BT/000_00000.parquet', 'sample/10BT/001_00000.parquet']
    """
    url: str | None = f"{endpoint}/api/datasets/{repo}/tree/main/{folder}?recursive=true"
    files: list[str] = []
    while url:
        try:
            with opener(url, timeout=60) as reply:
                entries = json.loads(reply.read())
                link = reply.headers.get("Link", "") or ""
        except urllib.error.URLError as err:
            raise ConnectionError(f"list_hf_files: could not list {folder!r} of {repo} at {endpoint} "
                                  f"({getattr(err, 'reason', err)}); reading from the Hub needs the network, "
                                  f"or give fineweb_edu a local copy with root=") from err
        files += [e["path"] for e in entries if e.get("type") == "file" and e["path"].endswith(suffix)]
        match = re.search(r'<([^>]+)>;\s*rel="next"', link)
        url = match.group(1) if match else None
    return sorted(files)


def fineweb_edu(config: str = "sample-10BT", shards: int | None = None, root: str | None = None,
                batch_rows: int = 2048, lister=list_hf_files) -> ParquetFiles:
    """FineWeb-Edu's ``text`` column, shard by shard in shard-name order, from the public dataset
    ``HuggingFaceFW/fineweb-edu`` (read over ``hf://`` by polars; set ``HF_TOKEN`` for higher rate limits).

    Args:
        config: a named config of the dataset: one of :data:`FINEWEB_EDU_CONFIGS` (``sample-10BT``, ...) or a
            crawl dump such as ``CC-MAIN-2024-10``.
        shards: read only the first ``shards`` shards (``None``: all).
        root: a local copy of the dataset repository (same folder layout) instead of the Hub.
        batch_rows: rows read per request.
        lister: lists the shard paths on the Hub (:func:`list_hf_files`); called only when ``root`` is None.

    Example:
        >>> import tempfile, pathlib, polars as pl
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "sample" / "10BT").mkdir(parents=True)
        >>> pl.DataFrame({"text": ["doc"], "id": ["<urn:1>"]}).write_parquet(root / "sample/10BT/000_00000.parquet")
        >>> list(fineweb_edu("sample-10BT", root=str(root)).documents())
        ['doc']
    """
    if not isinstance(config, str) or not (config in FINEWEB_EDU_CONFIGS or re.fullmatch(r"CC-MAIN-\d{4}-\d{2}",
                                                                                           config)):
        raise ValueError(f"fineweb_edu: argument 'config' expected one of {sorted(FINEWEB_EDU_CONFIGS)} or a dump "
                         f"name CC-MAIN-YYYY-WW, got {config!r}")
    if shards is not None and shards < 1:
        raise ValueError(f"fineweb_edu: argument 'shards' expected None or >= 1, got {shards}")
    folder = FINEWEB_EDU_CONFIGS.get(config, f"data/{config}")
    if root is not None:
        paths = sorted(glob.glob(str(Path(root) / folder / "**" / "*.parquet"), recursive=True))
        if not paths:
            where = str(Path(root) / folder)
            raise ValueError(f"fineweb_edu: argument 'root' expected parquet shards under {where!r}, found none")
    else:
        paths = [f"hf://datasets/{FINEWEB_EDU_REPO}/{p}" for p in lister(FINEWEB_EDU_REPO, folder)]
        if not paths:
            raise ValueError(f"fineweb_edu: config {config!r} expected parquet shards under {folder!r} in "
                             f"{FINEWEB_EDU_REPO}, the Hub lists none")
    return ParquetFiles(paths[:shards], column="text", batch_rows=batch_rows)


SOURCE_TYPES = ("text", "jsonl", "parquet", "fineweb-edu")


def build_source(source: str, paths: str | Sequence[str] = (), *, text_split: str = "blank_lines",
                 field: str = "text", fineweb_config: str = "sample-10BT", fineweb_shards: int | None = None,
                 fineweb_root: str | None = None) -> DocumentSource:
    """A document source by type: ``text`` (:class:`TextFiles` split by ``text_split``), ``jsonl``
    (:class:`JsonLines`, string ``field``), ``parquet`` (:class:`ParquetFiles`, string column ``field``) over
    ``paths`` (files or globs), or ``fineweb-edu`` (:func:`fineweb_edu`, lists the Hub's shards unless
    ``fineweb_root`` is given).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> _ = p.write_text("one\\n\\ntwo\\n")
        >>> list(build_source("text", [str(p)]).documents())
        ['one', 'two']
    """
    if source not in SOURCE_TYPES:
        raise ValueError(f"build_source: argument 'source' expected one of {SOURCE_TYPES}, got {source!r}")
    if source == "fineweb-edu":
        return fineweb_edu(fineweb_config, shards=fineweb_shards, root=fineweb_root)
    if source == "text":
        return TextFiles(paths, split=text_split)
    if source == "jsonl":
        return JsonLines(paths, field=field)
    return ParquetFiles(paths, column=field)
