"""Streaming: persistent per-stream GDN-2 state and the online runner."""

from gdn2ts.streaming.journal import CommitPolicy
from gdn2ts.streaming.learn import LearnConfig, LearnResult
from gdn2ts.streaming.runner import ObserveResult, OnlineRunner, UnknownStreamError, model_fingerprint
from gdn2ts.streaming.store import (
    BlobStore,
    CorruptJournalError,
    CorruptRecordError,
    FingerprintMismatchError,
    JournaledStore,
    MemoryStore,
    SQLiteStore,
    StateStore,
    StoreError,
    StreamRecord,
)

__all__ = [
    "BlobStore",
    "CommitPolicy",
    "LearnConfig",
    "LearnResult",
    "UnknownStreamError",
    "CorruptJournalError",
    "JournaledStore",
    "ObserveResult",
    "OnlineRunner",
    "model_fingerprint",
    "CorruptRecordError",
    "FingerprintMismatchError",
    "MemoryStore",
    "SQLiteStore",
    "StateStore",
    "StoreError",
    "StreamRecord",
]
