"""Streaming: persistent per-stream GDN-2 state and the online runner."""

from gdn2ts.streaming.errors import (
    CorruptJournalError,
    CorruptRecordError,
    FingerprintMismatchError,
    ReadOnlyStoreError,
    StoreError,
    StoreLockedError,
)
from gdn2ts.streaming.journal import CommitPolicy
from gdn2ts.streaming.learn import LearnConfig, LearnResult
from gdn2ts.streaming.memory_store import MemoryStore
from gdn2ts.streaming.records import RecordLayout, Rows, StreamRecord
from gdn2ts.streaming.runner import ObserveResult, OnlineRunner, UnknownStreamError, model_fingerprint
from gdn2ts.streaming.sqlite_store import SQLiteStore
from gdn2ts.streaming.store import BlobStore, JournaledStore, StateStore

__all__ = [
    "BlobStore",
    "CommitPolicy",
    "CorruptJournalError",
    "CorruptRecordError",
    "FingerprintMismatchError",
    "JournaledStore",
    "LearnConfig",
    "LearnResult",
    "MemoryStore",
    "ObserveResult",
    "OnlineRunner",
    "ReadOnlyStoreError",
    "RecordLayout",
    "Rows",
    "SQLiteStore",
    "StateStore",
    "StoreError",
    "StoreLockedError",
    "StreamRecord",
    "UnknownStreamError",
    "model_fingerprint",
]
