"""``gdn2ts lm tokenize``: tokenize a corpus once into a token cache (:mod:`gdn2ts.lm.token_cache`) that
``build_dataset(cache=...)`` and the training recipes' ``data: {cache: ...}`` then pack from."""

from __future__ import annotations

import json
import time

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from gdn2ts.lm.data import build_dataset

__all__ = ["lm_tokenize"]


def lm_tokenize(out: str, source: str = "text", paths: tuple[str, ...] = (), text_split: str = "blank_lines",
                field: str = "text", fineweb_config: str = "sample-10BT", fineweb_shards: int | None = None,
                fineweb_root: str | None = None, tokenizer: str = "mistral", quiet: bool = False) -> dict:
    """Tokenize every document of a source into the token cache ``out`` and print what was written.

    Args:
        out: the cache file to write (``.safetensors``); an existing one of the same source is kept as is.
        source: ``text``, ``jsonl``, ``parquet`` or ``fineweb-edu``.
        paths: files or globs of a ``text`` / ``jsonl`` / ``parquet`` source.
        text_split: ``text``: a document per paragraph (``blank_lines``) or per file (``file``).
        field: ``jsonl``: the string field; ``parquet``: the string column.
        fineweb_config: ``fineweb-edu``: the dataset config (``sample-10BT``, ...).
        fineweb_shards: ``fineweb-edu``: only the first shards (None: all).
        fineweb_root: ``fineweb-edu``: a local copy of the dataset repository instead of the Hub.
        tokenizer: ``mistral`` (32,000-token SentencePiece), ``bytes`` or a SentencePiece model file.
        quiet: no progress and no summary line.

    Returns ``{"out", "documents", "tokens", "seconds", "tokens_per_s"}``.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "a.txt").write_text("one\\n\\ntwo\\n")
        >>> r = lm_tokenize(str(d / "a.cache"), paths=(str(d / "a.txt"),), tokenizer="bytes", quiet=True)
        >>> r["documents"], r["tokens"]
        (2, 6)
    """
    progress = None if quiet else Progress(SpinnerColumn(), TextColumn("tokenize {task.fields[info]}"),
                                           TimeElapsedColumn())
    task = None

    def report(documents: int, tokens: int) -> None:
        if progress is not None:
            progress.update(task, info=f"{documents:,} documents, {tokens:,} tokens")

    t0 = time.perf_counter()
    if progress is not None:
        progress.start()
        task = progress.add_task("tokenize", total=None, info="")
    try:
        ds = build_dataset(source=source, paths=tuple(paths), text_split=text_split, field=field,
                           fineweb_config=fineweb_config, fineweb_shards=fineweb_shards, fineweb_root=fineweb_root,
                           tokenizer=tokenizer, block_len=1, cache=out, progress=report)
    finally:
        if progress is not None:
            progress.stop()
    seconds = time.perf_counter() - t0
    cache = ds.source
    result = {"out": out, "documents": len(cache), "tokens": cache.num_tokens, "seconds": round(seconds, 3),
              "tokens_per_s": round(cache.num_tokens / max(seconds, 1e-9))}
    if not quiet:
        print(json.dumps(result))
    return result
