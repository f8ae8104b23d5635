"""The observation journal and the commit policy of the online runner.

A journal entry is one :meth:`~gdn2ts.streaming.OnlineRunner.observe` call's accepted rows, exactly as they were
applied: the streams in the order they were stepped, the size of every round, and the rows in round-major order.
Replaying an entry therefore runs the same steps on the same batches in the same order as the call did, and
reproduces its states bit for bit. Entries are safetensors (tensors plus string metadata; nothing is pickled),
numbered, checksummed by the store, and tagged with the fingerprint of the model that wrote them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as st_load

from gdn2ts.streaming.errors import CorruptJournalError, FingerprintMismatchError
from gdn2ts.streaming.records import read_metadata, save_tensors

__all__ = ["CommitPolicy", "Entry", "encode_entry", "decode_entry"]

FORMAT = "gdn2ts.journal.v1"


@dataclass(frozen=True)
class CommitPolicy:
    """When an :class:`~gdn2ts.streaming.OnlineRunner` makes its work durable.

    With a journal, every ``observe`` call commits one journal entry (its accepted rows) before it returns, and
    the full states of the streams that changed are written now and then (a snapshot), after which the journal is
    truncated. Without one, every call writes the states of the streams it touched.

    Example:
        >>> CommitPolicy(snapshot_every=100).snapshot_rows
        2000000
    """

    journal: bool | None = None
    """Journal the observations (True), write states on every call (False), or journal when the store is a
    durable :class:`~gdn2ts.streaming.JournaledStore` (None)."""
    snapshot_every: int = 256
    """Snapshot after this many journaled calls."""
    snapshot_rows: int = 2_000_000
    """... or once the journal holds this many rows (bounds the replay time after a crash)."""
    snapshot_seconds: float | None = 300.0
    """... or when this many seconds have passed since the last snapshot (None: no time limit)."""

    def __post_init__(self):
        if self.journal is not None and not isinstance(self.journal, bool):
            raise ValueError(f"CommitPolicy: 'journal' expected True, False or None, got {self.journal!r}")
        for name in ("snapshot_every", "snapshot_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CommitPolicy: '{name}' expected a positive int, got {value!r}")
        s = self.snapshot_seconds
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not (s > 0 and
                                                                                           math.isfinite(s))):
            raise ValueError(f"CommitPolicy: 'snapshot_seconds' expected a positive number or None, got {s!r}")


@dataclass(frozen=True)
class Entry:
    """One journaled call: ``M`` streams, ``R`` rows, ``C`` channels, ``K`` covariates."""

    seq: int
    """The entry's number."""
    fingerprint: str
    """Fingerprint of the model that applied it."""
    columns: tuple[tuple[str, ...], tuple[str, ...]]
    """Channel and covariate names, in the order of the ``values`` and ``covariates`` columns."""
    stream_ids: list[str]
    """``M`` stream ids in the order they were stepped (round r steps the first ``sizes[r]`` of them)."""
    sizes: np.ndarray
    """``[rounds]`` int64, non-increasing: streams stepped in each round."""
    times: np.ndarray
    """``[R]`` float64 timestamps, round-major."""
    values: np.ndarray
    """``[R, C]`` float64, NaN for missing."""
    covariates: np.ndarray
    """``[R, K]`` float64."""


def encode_entry(entry: Entry) -> bytes:
    """safetensors bytes of an entry.

    Example:
        >>> import numpy as np
        >>> e = Entry(3, "m", (("load",), ()), ["a", "β"], np.array([2, 1]), np.array([1.0, 1.5, 2.0]),
        ...           np.array([[0.1], [np.nan], [0.3]]), np.zeros((3, 0)))
        >>> d = decode_entry(3, encode_entry(e), "m")
        >>> d.stream_ids, d.sizes.tolist(), d.values[:, 0].tolist()
        (['a', 'β'], [2, 1], [0.1, nan, 0.3])
    """
    raw = [s.encode() for s in entry.stream_ids]
    offsets = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, raw), dtype=np.int64, count=len(raw)), out=offsets[1:])
    tensors = {
        "ids.bytes": torch.frombuffer(bytearray(b"".join(raw)) or bytearray(1), dtype=torch.uint8)[:offsets[-1]],
        "ids.offsets": torch.from_numpy(offsets),
        "sizes": torch.from_numpy(np.ascontiguousarray(entry.sizes, dtype=np.int64)),
        "times": torch.from_numpy(np.ascontiguousarray(entry.times, dtype=np.float64)),
        "values": torch.from_numpy(np.ascontiguousarray(entry.values, dtype=np.float64)),
        "covariates": torch.from_numpy(np.ascontiguousarray(entry.covariates, dtype=np.float64)),
    }
    metadata = {"format": FORMAT, "seq": str(entry.seq), "fingerprint": entry.fingerprint,
                "columns": json.dumps([list(entry.columns[0]), list(entry.columns[1])])}
    return save_tensors(tensors, metadata)


def decode_entry(seq: int, payload: bytes, fingerprint: str | None = None) -> Entry:
    """The entry in ``payload``; :class:`CorruptJournalError` names an entry that cannot be decoded and
    :class:`FingerprintMismatchError` one written by another model (when ``fingerprint`` is given)."""
    try:
        t = st_load(payload)
        meta = read_metadata(payload)
        if meta.get("format") != FORMAT or int(meta["seq"]) != seq:
            raise ValueError(f"format {meta.get('format')!r}, number {meta.get('seq')!r}")
        raw, offsets = t["ids.bytes"].numpy().tobytes(), t["ids.offsets"].tolist()
        ids = [raw[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        channels, covariates = json.loads(meta["columns"])
        entry = Entry(seq, meta["fingerprint"], (tuple(channels), tuple(covariates)), ids, t["sizes"].numpy(),
                      t["times"].numpy(), t["values"].numpy(), t["covariates"].numpy())
        sizes = entry.sizes
        if (sizes.ndim != 1 or (sizes.size and (sizes[0] > len(ids) or (np.diff(sizes) > 0).any() or sizes[-1] < 1))
                or entry.times.shape != (int(sizes.sum()),) or entry.values.shape[0] != entry.times.shape[0]
                or entry.covariates.shape[0] != entry.times.shape[0]):
            raise ValueError("inconsistent shapes")
    except Exception as e:  # any decoding failure is a corrupt entry, named
        raise CorruptJournalError(f"journal entry {seq}: cannot be decoded ({e})") from None
    if fingerprint is not None and entry.fingerprint != fingerprint:
        raise FingerprintMismatchError(f"journal entry {seq}: written by model {entry.fingerprint!r}, not by this "
                                       f"model {fingerprint!r}")
    return entry
