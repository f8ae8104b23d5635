"""Streaming: persistent per-stream GDN-2 state."""

from gdn2ts.streaming.store import (
    CorruptRecordError,
    FingerprintMismatchError,
    MemoryStore,
    SQLiteStore,
    StateStore,
    StoreError,
    StreamRecord,
)

__all__ = [
    "CorruptRecordError",
    "FingerprintMismatchError",
    "MemoryStore",
    "SQLiteStore",
    "StateStore",
    "StoreError",
    "StreamRecord",
]
