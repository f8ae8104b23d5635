"""What a stream carries between observations, and how many streams' records travel at once.

A record holds named tensors (layer states, conv tails, scaling statistics, ...) plus three numbers: the last
timestamp, the step count and the last journal entry it reflects. Every record of one store has the same
:class:`RecordLayout` (the tensors' names, dtypes and shapes, in order), so a record is a fixed number of bytes and
many records move as one ``uint8`` matrix (:class:`Rows`), one row per stream: no per-record encoding on the hot
path. Each row carries a 64-bit XXH3 checksum, verified on every read. Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import xxhash
from safetensors import TensorSpec, serialize

from gdn2ts.streaming.errors import CorruptRecordError

__all__ = ["StreamRecord", "RecordLayout", "Rows", "row_checksums", "payload_checksum", "check_ids", "save_tensors",
           "read_metadata"]

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


@dataclass(frozen=True)
class StreamRecord:
    """Everything a stream carries between observations.

    Example:
        >>> import torch
        >>> r = StreamRecord({"layer0.recurrent": torch.zeros(1, 2, 4, 4)}, last_timestamp=3.5, steps=7,
        ...                  fingerprint="abc")
        >>> r.steps, r.fingerprint
        (7, 'abc')
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Named tensors ``[1, *shape]`` (layer states, conv tails, scaling statistics); any dtype, on the CPU."""
    last_timestamp: float = float("-inf")
    """Timestamp of the last observation applied (``-inf`` before the first)."""
    steps: int = 0
    """Number of observations applied."""
    fingerprint: str = ""
    """Fingerprint of the model that wrote the record."""
    journal_seq: int = 0
    """The record reflects every journal entry numbered up to this one (0: it was written without a journal)."""

    def __post_init__(self):
        if not isinstance(self.tensors, dict):
            raise ValueError(f"StreamRecord: 'tensors' expected a dict of name -> tensor, got "
                             f"{type(self.tensors).__name__}")
        for name, t in self.tensors.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"StreamRecord: tensor names expected non-empty strings, got {name!r}")
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"StreamRecord: tensor {name!r} expected a torch.Tensor, got {type(t).__name__}")
        if isinstance(self.last_timestamp, bool) or not isinstance(self.last_timestamp, (int, float)) or \
                math.isnan(self.last_timestamp) or self.last_timestamp == math.inf:
            raise ValueError(f"StreamRecord: 'last_timestamp' expected a number (or -inf), got "
                             f"{self.last_timestamp!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"StreamRecord: 'steps' expected a non-negative int, got {self.steps!r}")
        if not isinstance(self.fingerprint, str):
            raise ValueError(f"StreamRecord: 'fingerprint' expected a string, got {type(self.fingerprint).__name__}")
        if isinstance(self.journal_seq, bool) or not isinstance(self.journal_seq, int) or self.journal_seq < 0:
            raise ValueError(f"StreamRecord: 'journal_seq' expected a non-negative int, got {self.journal_seq!r}")


class RecordLayout:
    """The fixed byte layout of a store's records: each tensor's name, dtype and per-stream shape, in order,
    packed back to back in a row of ``nbytes`` bytes (a multiple of 8).

    Example:
        >>> import torch
        >>> layout = RecordLayout([("h", torch.float32, (2,)), ("n", torch.int64, ())])
        >>> layout.nbytes
        16
        >>> rows = layout.pack({"h": torch.tensor([[1.0, 2.0]]), "n": torch.tensor([7])})
        >>> out = layout.unpack(rows)
        >>> out["h"].tolist(), out["n"].tolist()
        ([[1.0, 2.0]], [7])
    """

    def __init__(self, fields: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.fields = tuple((str(n), d, tuple(int(s) for s in shape)) for n, d, shape in fields)
        names = [n for n, _, _ in self.fields]
        if not names or len(set(names)) != len(names) or not all(names):
            raise ValueError(f"RecordLayout: expected distinct non-empty tensor names, got {names}")
        for n, d, _ in self.fields:
            if d not in _DTYPES.values():
                raise ValueError(f"RecordLayout: tensor {n!r} has dtype {d}, which a record cannot hold")
        # every tensor starts at a multiple of 8 bytes, so that a column of rows views as the tensor's dtype
        self.offsets, off = {}, 0
        for n, d, shape in self.fields:
            size = math.prod(shape) * d.itemsize
            self.offsets[n] = (off, size)
            off += -(-size // 8) * 8
        self.nbytes = max(8, off)
        covered = sorted((o, o + size) for o, size in self.offsets.values())
        ends = [0] + [e for _, e in covered]
        starts = [o for o, _ in covered] + [self.nbytes]
        self.gaps = [(a, b) for a, b in zip(ends, starts, strict=True) if b > a]
        """Byte ranges of a row that no tensor covers (kept zero, so that equal records have equal bytes)."""
        self._index = {n: i for i, (n, _, _) in enumerate(self.fields)}
        self.spec = json.dumps([[n, str(d).removeprefix("torch."), list(shape)] for n, d, shape in self.fields])
        """The layout as JSON (what a store keeps)."""

    @classmethod
    def from_json(cls, spec: str) -> RecordLayout:
        return cls([(n, _DTYPES[d], tuple(shape)) for n, d, shape in json.loads(spec)])

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> RecordLayout:
        """The layout of a record's tensors (each ``[1, *shape]``)."""
        return cls([(n, t.dtype, tuple(t.shape[1:])) for n, t in tensors.items()])

    def __eq__(self, other) -> bool:
        return isinstance(other, RecordLayout) and self.fields == other.fields

    def __hash__(self) -> int:
        return hash(self.fields)

    def __repr__(self) -> str:
        return f"RecordLayout({self.spec})"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.spec.encode()).hexdigest()[:16]

    def check(self, tensors: Mapping[str, torch.Tensor], n: int | None = None, what: str = "record") -> int:
        """Raise ``ValueError`` unless ``tensors`` are exactly this layout's, each ``[n, *shape]``; return n."""
        if set(tensors) != {f for f, _, _ in self.fields}:
            raise ValueError(f"{what}: tensors {sorted(tensors)} do not match the store's layout "
                             f"{sorted(f for f, _, _ in self.fields)}")
        for name, dtype, shape in self.fields:
            t = tensors[name]
            n = t.shape[0] if n is None and t.dim() else n
            if tuple(t.shape) != (n, *shape) or t.dtype != dtype:
                raise ValueError(f"{what}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, the store's layout has "
                                 f"{dtype} {(n, *shape)}")
        return int(n or 0)

    def pack(self, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
        """``[n, nbytes]`` uint8 rows of ``tensors`` (``{name: [n, *shape]}``, any device)."""
        n = self.check(tensors, what="pack")
        first = next(iter(tensors.values()))
        rows = torch.empty((n, self.nbytes), dtype=torch.uint8, device=first.device)
        for a, b in self.gaps:
            rows[:, a:b] = 0
        for name, _, _ in self.fields:
            columns = self.columns(rows, name)
            if columns.numel():
                columns.copy_(tensors[name].detach().reshape(columns.shape))
        return rows.cpu().numpy()

    def unpack(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """``{name: [n, *shape]}`` CPU tensors viewing ``[n, nbytes]`` uint8 rows (no copies: they share the rows'
        memory)."""
        rows = torch.from_numpy(np.ascontiguousarray(rows))
        return {name: self.columns(rows, name) for name, _, _ in self.fields}

    def columns(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        """``[n, *shape]`` view of tensor ``name`` in ``rows`` (a contiguous ``[n, nbytes]`` uint8 tensor)."""
        _, dtype, shape = self.fields[self._index[name]]
        off, size = self.offsets[name]
        n = rows.shape[0]
        if size == 0 or n == 0:
            return torch.empty((n, *shape), dtype=dtype, device=rows.device)
        # offsets and the row size are multiples of 8: the columns view as the dtype with no copy
        return rows[:, off:off + size].view(dtype).view(n, *shape)


class Rows(NamedTuple):
    """The records of ``n`` streams in one layout, as a store reads or stages them."""

    found: np.ndarray
    """``[n]`` bool: the stream has a record (a corrupt one counts as not found and is in ``failed``)."""
    data: np.ndarray
    """``[n, nbytes]`` uint8 record bytes (zeros where not found)."""
    steps: np.ndarray
    """``[n]`` int64 observations applied."""
    last_timestamp: np.ndarray
    """``[n]`` float64 (``-inf`` before the first observation)."""
    journal_seq: np.ndarray
    """``[n]`` int64: the last journal entry each record reflects."""
    failed: dict[int, str]
    """Index of each stream whose record cannot be used -> why (checksum, decoding); the others are good."""

    @classmethod
    def empty(cls, n: int, nbytes: int) -> Rows:
        return cls(np.zeros(n, dtype=bool), np.zeros((n, nbytes), dtype=np.uint8), np.zeros(n, dtype=np.int64),
                   np.full(n, -math.inf), np.zeros(n, dtype=np.int64), {})

    def raise_failed(self, ids: Sequence[str]) -> None:
        """Raise :class:`CorruptRecordError` naming the first failed stream (and how many failed)."""
        if self.failed:
            i = min(self.failed)
            more = f" (and {len(self.failed) - 1} more streams)" if len(self.failed) > 1 else ""
            raise CorruptRecordError(f"stream {ids[i]!r}: {self.failed[i]}{more}")


def row_checksums(data: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """64-bit XXH3 checksum of every row of ``data`` ``[n, nbytes]`` uint8 (or of its rows ``rows``), as int64 (the
    bits of the unsigned digest, as a database stores them).

    Example:
        >>> import numpy as np
        >>> sums = row_checksums(np.frombuffer(b"123456789abcdefg", dtype=np.uint8).reshape(2, 8))
        >>> sums.dtype, len(set(sums.tolist()))
        (dtype('int64'), 2)
    """
    data = np.ascontiguousarray(data)
    it = data if rows is None else (data[r] for r in np.asarray(rows).tolist())
    count = data.shape[0] if rows is None else len(rows)
    return np.fromiter((xxhash.xxh3_64_intdigest(row) for row in it), dtype=np.uint64, count=count).view(np.int64)


def payload_checksum(payload: bytes) -> int:
    """The checksum of a journal entry or blob (as :func:`row_checksums`)."""
    return int(np.array(xxhash.xxh3_64_intdigest(payload), dtype=np.uint64).view(np.int64))


def check_ids(stream_ids) -> list[str]:
    """``stream_ids`` as a list of strings (a bare string or a non-string id is a ValueError)."""
    if isinstance(stream_ids, str):
        raise ValueError("stream_ids expected a sequence of strings, got a single string (wrap it in a list)")
    ids = list(stream_ids)
    for sid in ids:
        if not isinstance(sid, str):
            raise ValueError(f"stream ids expected strings, got {type(sid).__name__} {sid!r}")
    return ids


def save_tensors(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes of ``tensors`` (any device, views allowed) with string ``metadata`` (journal entries,
    learned weights).

    Goes through safetensors' ``serialize`` with the tensors' own buffers: views that share one storage, which
    ``safetensors.torch.save`` would refuse, are written as they are.

    Example:
        >>> import torch
        >>> from safetensors.torch import load
        >>> pool = torch.arange(12.0).view(3, 4)
        >>> load(save_tensors({"row": pool[1]}, {"k": "v"}))["row"].tolist()
        [4.0, 5.0, 6.0, 7.0]
    """
    keep = {name: t if t.device.type == "cpu" and t.is_contiguous() else t.detach().cpu().contiguous()
            for name, t in tensors.items()}
    specs = {name: TensorSpec(dtype=str(t.dtype).removeprefix("torch."), shape=t.shape, data_ptr=t.data_ptr(),
                              data_len=t.nbytes)
             for name, t in keep.items()}
    # `keep` holds every buffer alive until serialize has copied it
    payload = bytes(serialize(specs, metadata=metadata))
    del keep
    return payload


def read_metadata(payload: bytes) -> dict[str, str]:
    """The string metadata of safetensors bytes."""
    # safetensors layout: 8-byte little-endian header length, then the JSON header holding the metadata
    header_len = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + header_len]).get("__metadata__", {})
