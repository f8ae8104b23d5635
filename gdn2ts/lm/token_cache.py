"""A tokenized corpus on disk: tokenize once, pack many times (every pass, every resume, every share) from a
memory map instead of re-running the tokenizer.

The file is a safetensors file (readable by ``safetensors.numpy.load_file``) with three tensors:

- ``tokens``: every document's tokens, concatenated in source order, no special tokens (``uint16`` when the
  vocabulary fits, else ``uint32``);
- ``offsets``: ``uint64 [N + 1]``, document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``;
- ``keys``: ``uint64 [N]``, the holdout key of each document's text (:func:`~gdn2ts.lm.data.holdout_key`), so a
  held-out split from the cache is the same as from the text;

and metadata naming the tokenizer (``vocab_size``, ``bos_id``, ``eos_id``, ``tokenizer``) and the source
(``source``: what the writer was told it came from). Writing streams: tokens go to a side file as documents are
tokenized and are copied behind the header at the end, so a corpus larger than memory can be cached. Reading maps
the file (``numpy.memmap``): opening a cache costs nothing, whatever its size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gdn2ts.lm.sources import DocumentSource
from gdn2ts.lm.tokenizer import Tokenizer, encode_all

__all__ = ["TokenCache", "holdout_key", "write_token_cache"]

_DTYPES = {"U16": np.uint16, "U32": np.uint32, "U64": np.uint64}
_ENCODE_GROUP = 256


def holdout_key(text: str) -> int:
    """A document's holdout key: the first 8 bytes of the BLAKE2b digest of its UTF-8 text, as an integer in
    ``[0, 2**64)``; it depends on the text alone.

    Example:
        >>> holdout_key("a") == holdout_key("a") != holdout_key("b")
        True
    """
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def write_token_cache(source: DocumentSource, tokenizer: Tokenizer, path: str | Path, *, describe: str = "",
                      progress=None) -> TokenCache:
    """Tokenize every document of ``source`` into a cache file at ``path`` (written to a temporary name, then
    renamed, so a cache file is never half written); ``progress(documents, tokens)`` is called after each group.

    Example:
        >>> import tempfile, pathlib
        >>> from gdn2ts.lm.sources import Documents
        >>> from gdn2ts.lm.tokenizer import ByteTokenizer
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "c.safetensors"
        >>> cache = write_token_cache(Documents(["ab", "", "cde"]), ByteTokenizer(), path)
        >>> len(cache), cache.num_tokens, [ids.tolist() for _, _, ids in cache.token_documents(1)]
        (3, 5, [[], [99, 100, 101]])
    """
    path = Path(path)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    tmp_tokens = path.with_name(path.name + ".tokens.tmp")
    tmp = path.with_name(path.name + ".tmp")
    offsets, keys = [0], []
    try:
        with open(tmp_tokens, "wb") as out:
            group: list[str] = []
            for text in _then_none(source.documents(0)):
                if text is not None:
                    group.append(text)
                if group and (text is None or len(group) == _ENCODE_GROUP):
                    for t, ids in zip(group, encode_all(tokenizer, group), strict=True):
                        out.write(np.asarray(ids, dtype=dtype).tobytes())
                        offsets.append(offsets[-1] + len(ids))
                        keys.append(holdout_key(t))
                    group = []
                    if progress is not None:
                        progress(len(keys), offsets[-1])
        if not keys:
            raise ValueError(f"write_token_cache: empty corpus: {type(source).__name__} gave no documents")
        meta = {"format": "gdn2ts-token-cache-1", "vocab_size": str(tokenizer.vocab_size),
                "bos_id": str(tokenizer.bos_id), "eos_id": str(tokenizer.eos_id), "tokenizer": repr(tokenizer),
                "source": describe}
        arrays = {"offsets": np.asarray(offsets, dtype=np.uint64), "keys": np.asarray(keys, dtype=np.uint64)}
        _write(tmp, tmp_tokens, dtype, offsets[-1], arrays, meta)
        os.replace(tmp, path)
    finally:
        for p in (tmp_tokens, tmp):
            p.unlink(missing_ok=True)
    return TokenCache(path)


def _then_none(it: Iterator[str]) -> Iterator[str | None]:
    yield from it
    yield None


def _write(path: Path, tokens_file: Path, dtype, n_tokens: int, arrays: dict, meta: dict) -> None:
    """A safetensors file: 8-byte little-endian header size, the JSON header (padded to 8 bytes), the data."""
    entries, start = {}, 0
    code = {np.uint16: "U16", np.uint32: "U32"}[dtype]
    size = n_tokens * np.dtype(dtype).itemsize
    entries["tokens"] = {"dtype": code, "shape": [n_tokens], "data_offsets": [start, start + size]}
    start += size
    for name, arr in arrays.items():
        entries[name] = {"dtype": "U64", "shape": list(arr.shape), "data_offsets": [start, start + arr.nbytes]}
        start += arr.nbytes
    header = json.dumps({"__metadata__": meta, **entries}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as out:
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        with open(tokens_file, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
        for arr in arrays.values():
            out.write(arr.tobytes())


class TokenCache:
    """A cache file written by :func:`write_token_cache`, memory-mapped; a pre-tokenized document source for
    :class:`~gdn2ts.lm.data.PackedBlocks` (it packs exactly the blocks the text source packs with that tokenizer).

    Example:
        >>> import tempfile, pathlib
        >>> from gdn2ts.lm.sources import Documents
        >>> from gdn2ts.lm.tokenizer import ByteTokenizer
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "c.safetensors"
        >>> _ = write_token_cache(Documents(["hi"]), ByteTokenizer(), path, describe="greeting")
        >>> cache = TokenCache(path)
        >>> cache.meta["source"], cache.vocab_size, len(cache)
        ('greeting', 258, 1)
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"TokenCache: argument 'path' expected a token cache file, got {str(path)!r} "
                             f"(no such file)")
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                # Any other file's first 8 bytes read as a header size can be huge: check before reading it.
                if not 0 < n <= path.stat().st_size - 8:
                    raise ValueError(f"header size {n} does not fit the file")
                header = json.loads(f.read(n))
            meta = header.pop("__metadata__")
            if meta.get("format") != "gdn2ts-token-cache-1":
                raise KeyError("format")
            base = 8 + n
            arrays = {}
            for name in ("tokens", "offsets", "keys"):
                e = header[name]
                dtype = _DTYPES[e["dtype"]]
                lo, hi = e["data_offsets"]
                count = (hi - lo) // np.dtype(dtype).itemsize
                # np.memmap refuses an empty mapping; an empty corpus of tokens is still a valid cache.
                arrays[name] = (np.memmap(path, dtype=dtype, mode="r", offset=base + lo, shape=(count,)) if count
                                else np.zeros(0, dtype=dtype))
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"TokenCache: {str(path)!r} expected a gdn2ts token cache (safetensors with tokens, "
                             f"offsets, keys and its metadata), got an unreadable file ({err!r})") from err
        self.path, self.meta = path, meta
        self.tokens, self.offsets, self.keys = arrays["tokens"], arrays["offsets"], arrays["keys"]
        self.vocab_size, self.bos_id, self.eos_id = (int(meta[k]) for k in ("vocab_size", "bos_id", "eos_id"))

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self):
        # DataLoader workers started by spawn reopen the map rather than receive a copy of the corpus.
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def token_documents(self, start: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(index, holdout key, tokens)`` of the documents from ``start`` on."""
        offsets = self.offsets
        for i in range(start, len(self.keys)):
            yield i, int(self.keys[i]), self.tokens[int(offsets[i]):int(offsets[i + 1])]

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """ValueError unless ``tokenizer`` has the cache's vocabulary size and BOS/EOS ids."""
        got = (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
        if got != (self.vocab_size, self.bos_id, self.eos_id):
            raise ValueError(f"TokenCache: {str(self.path)!r} was written with {self.meta['tokenizer']} "
                             f"(vocab_size, bos_id, eos_id = {(self.vocab_size, self.bos_id, self.eos_id)}), "
                             f"expected the same tokenizer, got {tokenizer!r} with {got}")

    def __repr__(self) -> str:
        return f"TokenCache({str(self.path)!r})"
