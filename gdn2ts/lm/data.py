"""Packed training blocks for the causal LM: documents -> tokens -> fixed blocks with document boundaries.

The packing rule: each document is tokenized (no special tokens), optionally prefixed with BOS, followed by EOS,
and the documents are concatenated in source order into one token stream that is cut into consecutive,
non-overlapping blocks of ``block_len + 1`` tokens; a block gives ``input_ids = block[:-1]`` and
``labels = block[1:]``. A document may run across blocks. The tokens left over at the end of a pass that do not
fill a block are dropped (or, with ``repeat``, continue into the next pass over the same documents).

Sharding: a dataset iterated by ``S`` shares (``world_size`` ranks x DataLoader workers per rank, share
``rank * workers + worker``) gives share ``s`` the documents whose index ``i`` has ``i % S == s``; each share packs
its own documents into its own blocks. Shares are disjoint, and each share's blocks depend only on (corpus,
tokenizer, block_len, S, s).

Position and resume: a share's position is ``(pass, document index, token offset)`` of the next block's first token.
:meth:`PackedBlocks.state_dict` holds the position of each share of this rank, plain ints (safe for
``torch.load(weights_only=True)``); :meth:`PackedBlocks.load_state_dict` makes the next iteration start there, so a
resumed run yields exactly the blocks an uninterrupted run would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gdn2ts.lm.sources import DocumentSource, build_source
from gdn2ts.lm.token_cache import TokenCache, holdout_key, write_token_cache
from gdn2ts.lm.tokenizer import Tokenizer, encode_all, load_tokenizer

__all__ = ["PackedBlocks", "build_dataset", "collate_packed", "in_holdout"]

SPLITS = ("all", "train", "val")
# Documents tokenized per call of the tokenizer: amortizes its per-call cost without holding much text.
_ENCODE_GROUP = 256


def in_holdout(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out (validation) part: its :func:`holdout_key` (the first 8 bytes of
    the BLAKE2b digest of its text) falls below ``fraction * 2**64``. It depends on the text alone, not on order or
    source.

    Example:
        >>> in_holdout("some document", 0.0), in_holdout("some document", 1.0)
        (False, True)
    """
    return holdout_key(text) < fraction * 2.0**64


def _current_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PackedBlocks(IterableDataset):
    """Fixed-length training blocks packed from a document source (the rule is in the module docstring).

    Each item is ``{"input_ids": Long[block_len], "labels": Long[block_len], "doc_starts": Long[D],
    "position": Long[5]}``: ``labels[t] = input_ids[t + 1]`` of the same stream; ``doc_starts`` are the positions in
    ``[0, block_len)`` where a document begins, always including 0; ``position`` is ``(share, shares, pass,
    document, offset)`` after this block (what :meth:`advance` takes).

    Args:
        source: documents in a fixed order (:class:`~gdn2ts.lm.sources.DocumentSource`).
        tokenizer: :class:`~gdn2ts.lm.tokenizer.Tokenizer`.
        block_len: tokens per row ``T``.
        bos: prefix every document with BOS (the EOS that ends the previous document already marks the boundary,
            so it is off by default).
        split: ``"all"``, ``"train"`` (documents outside the holdout) or ``"val"`` (inside it); see :func:`in_holdout`.
        holdout: fraction of documents held out for validation.
        repeat: start another pass over the documents when they run out, endlessly (same order every pass).
        rank, world_size: this process's share of a distributed run; ``None`` reads torch.distributed at iteration.

    Example:
        >>> from gdn2ts.lm.sources import Documents
        >>> from gdn2ts.lm.tokenizer import ByteTokenizer
        >>> ds = PackedBlocks(Documents(["abc", "defgh"]), ByteTokenizer(), block_len=4)
        >>> [(b["input_ids"].tolist(), b["doc_starts"].tolist()) for b in ds]
        [([97, 98, 99, 257], [0]), ([101, 102, 103, 104], [0])]
        >>> _ = next(iter(ds))  # one block taken: the next starts at token 1 of document 1 (pass 0)
        >>> ds.state_dict()["positions"]
        [[0, 1, 1]]
    """

    def __init__(self, source: DocumentSource, tokenizer: Tokenizer, block_len: int, *, bos: bool = False,
                 split: str = "all", holdout: float = 0.0, repeat: bool = False, rank: int | None = None,
                 world_size: int | None = None):
        super().__init__()
        if not hasattr(source, "documents") and not isinstance(source, TokenCache):
            raise ValueError(f"PackedBlocks: argument 'source' expected a document source with documents(start) "
                             f"or a TokenCache, got {type(source).__name__}")
        if isinstance(source, TokenCache):
            source.check_tokenizer(tokenizer)
        if isinstance(block_len, bool) or not isinstance(block_len, int) or block_len < 1:
            raise ValueError(f"PackedBlocks: argument 'block_len' expected an int >= 1, got {block_len!r}")
        if split not in SPLITS:
            raise ValueError(f"PackedBlocks: argument 'split' expected one of {SPLITS}, got {split!r}")
        if not 0.0 <= holdout < 1.0 or (split == "val" and holdout == 0.0):
            raise ValueError(f"PackedBlocks: argument 'holdout' expected a fraction in [0, 1) (> 0 for split='val'), "
                             f"got {holdout!r}")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(f"PackedBlocks: arguments 'rank', 'world_size' expected both None or 0 <= rank < "
                             f"world_size, got rank={rank!r}, world_size={world_size!r}")
        self.source, self.tokenizer, self.block_len = source, tokenizer, block_len
        self.bos, self.split, self.holdout, self.repeat = bos, split, holdout, repeat
        self.rank, self.world_size = rank, world_size
        # share -> (pass, document, offset) of the next block; a missing share starts at (0, 0, 0).
        self._positions: dict[int, tuple[int, int, int]] = {}
        self._shares: int | None = None
        # DataLoader hands batches out round-robin from worker 0; after a resume, worker w takes local share
        # (w + _next_local) % workers, so the share whose batch was due next is served first again.
        self._next_local = 0

    def _rank(self) -> tuple[int, int]:
        return (self.rank, self.world_size) if self.world_size is not None else _current_rank()

    def _layout(self) -> tuple[int, int]:
        """The share ``s`` iterated here (this rank's, or this worker's of this rank) and the number of shares."""
        rank, world = self._rank()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        shares = world * workers
        # Only recorded positions tie the dataset to a number of shares; with none, any layout starts afresh.
        if self._positions and self._shares is not None and self._shares != shares:
            raise ValueError(f"PackedBlocks: the loaded state was saved with {self._shares} shares (ranks x "
                             f"workers), but this iteration has {shares}; resume with the same ranks and workers")
        return rank * workers + (worker + self._next_local) % workers, shares

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        share, shares = self._layout()
        self._shares = shares
        for item in self._pack(share, shares, *self._positions.get(share, (0, 0, 0))):
            self._positions[share] = tuple(item["position"][2:].tolist())
            yield item
        # A pass read to its end (only without repeat) is done: the next iteration starts a new one.
        self._positions.pop(share, None)

    def shard(self, share: int, shares: int) -> PackedBlocks:
        """The same blocks' share ``share`` of ``shares`` (documents ``i`` with ``i % shares == share``), read
        whatever the process: a fresh dataset at the first block of that share.

        Example:
            >>> from gdn2ts.lm.sources import Documents
            >>> from gdn2ts.lm.tokenizer import ByteTokenizer
            >>> ds = PackedBlocks(Documents(["ab", "cd", "ef"]), ByteTokenizer(), block_len=2)
            >>> [b["input_ids"].tolist() for b in ds.shard(1, 2)]
            [[99, 100]]
        """
        return PackedBlocks(self.source, self.tokenizer, self.block_len, bos=self.bos, split=self.split,
                            holdout=self.holdout, repeat=self.repeat, rank=share, world_size=shares)

    def reset(self) -> None:
        """Forget the recorded position: the next iteration starts at the first block."""
        self._positions, self._shares, self._next_local = {}, None, 0

    def _kept(self, share: int, shares: int, start: int) -> Iterator[tuple[int, list[int]]]:
        """``(index, tokens)`` of this share's documents in the split, from index ``start`` to the end (one pass)."""
        val = self.split == "val"
        if isinstance(self.source, TokenCache):
            bound = self.holdout * 2.0**64
            for index, key, ids in self.source.token_documents(start):
                if index % shares == share and (self.split == "all" or (key < bound) == val):
                    yield index, ids.tolist()
            return
        group: list[tuple[int, str]] = []
        for index, text in enumerate(self.source.documents(start), start):
            if index % shares == share and (self.split == "all" or in_holdout(text, self.holdout) == val):
                group.append((index, text))
            if len(group) == _ENCODE_GROUP:
                yield from zip([i for i, _ in group], encode_all(self.tokenizer, [t for _, t in group]), strict=True)
                group = []
        yield from zip([i for i, _ in group], encode_all(self.tokenizer, [t for _, t in group]), strict=True)

    def _documents(self, share: int, shares: int, epoch: int, start: int) -> Iterator[tuple[int, int, list[int]]]:
        """``(pass, index, tokens with BOS/EOS)`` of this share's documents from ``(epoch, start)`` on."""
        head = [self.tokenizer.bos_id] if self.bos else []
        tail = [self.tokenizer.eos_id]
        while True:
            kept = 0
            for index, ids in self._kept(share, shares, start):
                kept += 1
                yield epoch, index, head + list(ids) + tail
            # Only a whole pass can prove the corpus empty (a resumed one may start past its last document).
            if kept == 0 and start == 0:
                raise ValueError(f"PackedBlocks: empty corpus: share {share} of {shares} (ranks x workers) got no "
                                 f"documents from {type(self.source).__name__} (split={self.split!r}, "
                                 f"holdout={self.holdout})")
            if not self.repeat:
                return
            epoch, start = epoch + 1, 0

    def _pack(self, share: int, shares: int, epoch: int, doc: int, offset: int) -> Iterator[dict[str, torch.Tensor]]:
        size = self.block_len + 1
        block: list[int] = []
        starts: list[int] = []
        for e, index, ids in self._documents(share, shares, epoch, doc):
            # Only the first document resumed can start inside; every later one starts at token 0.
            o = offset if (e, index) == (epoch, doc) else 0
            while o < len(ids):
                if o == 0 and len(block) < self.block_len:
                    starts.append(len(block))
                take = min(size - len(block), len(ids) - o)
                block += ids[o:o + take]
                o += take
                if len(block) == size:
                    nxt = (e, index, o) if o < len(ids) else (e, index + 1, 0)
                    yield self._item(block, starts, share, shares, nxt)
                    block, starts = [], []

    def _item(self, block: list[int], starts: list[int], share: int, shares: int, nxt: tuple[int, int, int]):
        ids = torch.tensor(block, dtype=torch.long)
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        return {"input_ids": ids[:-1], "labels": ids[1:], "doc_starts": torch.tensor(starts, dtype=torch.long),
                "position": torch.tensor([share, shares, *nxt], dtype=torch.long)}

    def advance(self, position: torch.Tensor) -> None:
        """Record consumed blocks from their ``position`` rows (``[5]`` or ``[B, 5]``, as in the items and in
        :func:`collate_packed`'s batches); needed when DataLoader workers iterate copies of this dataset.

        Example:
            >>> from gdn2ts.lm.sources import Documents
            >>> from gdn2ts.lm.tokenizer import ByteTokenizer
            >>> ds = PackedBlocks(Documents(["abcdefgh"]), ByteTokenizer(), block_len=3)
            >>> ds.advance(torch.tensor([[0, 1, 0, 0, 4]]))
            >>> [b["input_ids"].tolist() for b in ds]
            [[101, 102, 103]]
        """
        workers = None
        for share, shares, *pos in position.reshape(-1, 5).tolist():
            self._shares = int(shares)
            self._positions[int(share)] = tuple(int(p) for p in pos)
            workers = max(1, shares // self._rank()[1])
            self._next_local = (share % workers + 1) % workers

    def loader(self, batch_size: int, num_workers: int = 0, **kwargs) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of :func:`collate_packed` from a DataLoader over this dataset, recording each batch as consumed
        when it is handed out, so :meth:`state_dict` is exact with ``num_workers > 0`` too.

        Example:
            >>> from gdn2ts.lm.sources import Documents
            >>> from gdn2ts.lm.tokenizer import ByteTokenizer
            >>> ds = PackedBlocks(Documents(["abcdefgh", "ij"]), ByteTokenizer(), block_len=3)
            >>> [b["cu_seqlens"].tolist() for b in ds.loader(batch_size=2)]
            [[0, 3, 6], [0, 1, 3]]
        """
        for batch in DataLoader(self, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_packed,
                                **kwargs):
            self.advance(batch["position"])
            yield batch
        self.reset()

    def state_dict(self) -> dict:
        """The position of this rank's shares, plain ints only: ``{"block_len": T, "shares": S, "share_ids": [s, ...],
        "positions": [[pass, doc, offset], ...], "next_share": w}`` (``w``: the worker-local share due next).

        Example:
            >>> from gdn2ts.lm.sources import Documents
            >>> from gdn2ts.lm.tokenizer import ByteTokenizer
            >>> ds = PackedBlocks(Documents(["abcdefgh"]), ByteTokenizer(), block_len=3)
            >>> _ = next(iter(ds))
            >>> ds.state_dict()
            {'block_len': 3, 'shares': 1, 'share_ids': [0], 'positions': [[0, 0, 4]], 'next_share': 0}
        """
        rank, world = self._rank()
        shares = self._shares if self._shares is not None else world
        keys = sorted(self._positions) or [rank * (shares // world)]
        positions = [list(self._positions.get(k, (0, 0, 0))) for k in keys]
        return {"block_len": self.block_len, "shares": shares, "share_ids": keys, "positions": positions,
                "next_share": self._next_local}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`; the next iteration (with the same ranks and workers) starts there."""
        try:
            block_len, shares = int(state["block_len"]), int(state["shares"])
            keys, positions = list(state["share_ids"]), [tuple(int(v) for v in p) for p in state["positions"]]
            next_local = int(state.get("next_share", 0))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"PackedBlocks.load_state_dict: argument 'state' expected a dict from state_dict() "
                             f"(block_len, shares, share_ids, positions), got {state!r}") from err
        if block_len != self.block_len:
            raise ValueError(f"PackedBlocks.load_state_dict: state expected block_len {self.block_len}, "
                             f"got {block_len}")
        if len(keys) != len(positions) or any(len(p) != 3 or min(p) < 0 for p in positions):
            raise ValueError(f"PackedBlocks.load_state_dict: state expected one [pass, doc, offset] of ints >= 0 per "
                             f"share id, got share_ids={keys}, positions={positions}")
        if not 0 <= next_local < max(1, shares):
            raise ValueError(f"PackedBlocks.load_state_dict: state expected next_share in [0, {shares}), "
                             f"got {next_local}")
        self._shares, self._next_local = shares, next_local
        self._positions = {int(k): p for k, p in zip(keys, positions, strict=True)}


def collate_packed(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack packed blocks into a batch for ``CausalLM.forward(input_ids.reshape(1, -1), cu_seqlens=...)``.

    Returns ``{"input_ids": Long[B, T], "labels": Long[B, T], "cu_seqlens": Int32[N + 1]}`` where ``cu_seqlens`` are
    the document boundaries over the flattened ``B * T`` tokens (every row start is one; the last is ``B * T``),
    and ``"position": Long[B, 5]`` when the items carry it.

    Example:
        >>> import torch
        >>> items = [{"input_ids": torch.arange(4), "labels": torch.arange(1, 5), "doc_starts": torch.tensor([0, 2])},
        ...          {"input_ids": torch.arange(4), "labels": torch.arange(1, 5), "doc_starts": torch.tensor([0])}]
        >>> batch = collate_packed(items)
        >>> batch["input_ids"].shape, batch["cu_seqlens"].tolist()
        (torch.Size([2, 4]), [0, 2, 4, 8])
    """
    if not items:
        raise ValueError("collate_packed: argument 'items' expected at least one block, got none")
    T = items[0]["input_ids"].numel()
    bounds = []
    for row, item in enumerate(items):
        if item["input_ids"].shape != (T,) or item["labels"].shape != (T,):
            raise ValueError(f"collate_packed: item {row} expected input_ids and labels of shape ({T},), got "
                             f"{tuple(item['input_ids'].shape)} and {tuple(item['labels'].shape)}")
        starts = item["doc_starts"].to(torch.long)
        if starts.numel() == 0 or int(starts[0]) != 0 or int(starts[-1]) >= T or bool((starts.diff() <= 0).any()):
            raise ValueError(f"collate_packed: item {row} expected doc_starts increasing from 0 and below {T}, got "
                             f"{starts.tolist()}")
        bounds.append(starts + row * T)
    bounds.append(torch.tensor([len(items) * T]))
    batch = {"input_ids": torch.stack([i["input_ids"] for i in items]),
             "labels": torch.stack([i["labels"] for i in items]),
             "cu_seqlens": torch.cat(bounds).to(torch.int32)}
    if all("position" in i for i in items):
        batch["position"] = torch.stack([i["position"] for i in items])
    return batch


def build_dataset(*, source: str = "text", paths: str | tuple[str, ...] | list[str] = (),
                  text_split: str = "blank_lines", field: str = "text", fineweb_config: str = "sample-10BT",
                  fineweb_shards: int | None = None, fineweb_root: str | None = None, tokenizer: str = "mistral",
                  block_len: int = 2048, bos: bool = False, holdout: float = 0.0, split: str = "all",
                  repeat: bool = False, cache: str | None = None, rank: int | None = None,
                  world_size: int | None = None, progress=None) -> PackedBlocks:
    """:class:`PackedBlocks` from a description in plain values (the keywords of a ``data:`` section of a YAML
    recipe).

    Args:
        source: ``text``, ``jsonl``, ``parquet`` or ``fineweb-edu`` (:func:`~gdn2ts.lm.sources.build_source`).
        paths: files or globs of a ``text`` / ``jsonl`` / ``parquet`` source.
        text_split: ``text``: a document per paragraph (``blank_lines``) or per file (``file``).
        field: ``jsonl``: the string field; ``parquet``: the string column.
        fineweb_config: ``fineweb-edu``: ``sample-10BT``, ``sample-100BT``, ``sample-350BT``, ``default`` or a dump.
        fineweb_shards: ``fineweb-edu``: only the first shards (None: all).
        fineweb_root: ``fineweb-edu``: a local copy of the dataset repository instead of the Hub.
        tokenizer: ``mistral``, ``bytes`` or a SentencePiece model file
            (:func:`~gdn2ts.lm.tokenizer.load_tokenizer`).
        block_len, bos, holdout, split, repeat, rank, world_size: as :class:`PackedBlocks`.
        cache: a token cache file (:mod:`gdn2ts.lm.token_cache`): used when it exists (it must have been written
            from this same source and tokenizer), else written first from the source.
        progress: called as ``progress(documents, tokens)`` while a cache is written.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "a.txt").write_text("To be.\\n\\nOr not.\\n")
        >>> ds = build_dataset(paths=[str(d / "a.txt")], tokenizer="bytes", block_len=4,
        ...                    cache=str(d / "a.safetensors"))
        >>> [b["input_ids"].tolist() for b in ds][:2]
        [[84, 111, 32, 98], [46, 257, 79, 114]]
    """
    tok = load_tokenizer(tokenizer)
    paths = (paths,) if isinstance(paths, str) else tuple(paths)
    describe = json.dumps({"source": source, "paths": list(paths), "text_split": text_split, "field": field,
                           "fineweb_config": fineweb_config, "fineweb_shards": fineweb_shards,
                           "fineweb_root": fineweb_root})
    if cache is not None and Path(cache).is_file():
        docs = TokenCache(cache)
        if docs.meta.get("source") != describe:
            raise ValueError(f"build_dataset: argument 'cache' expected a token cache of this source {describe}, "
                             f"got {cache!r} written from {docs.meta.get('source')}")
    else:
        kwargs = {"text_split": text_split, "field": field, "fineweb_config": fineweb_config,
                  "fineweb_shards": fineweb_shards, "fineweb_root": fineweb_root}
        docs = build_source(source, paths, **kwargs)
        if cache is not None:
            docs = write_token_cache(docs, tok, cache, describe=describe, progress=progress)
    return PackedBlocks(docs, tok, block_len, bos=bos, split=split, holdout=holdout, repeat=repeat, rank=rank,
                        world_size=world_size)
