"""The state stores' errors: every failure of a store is a :class:`StoreError` that names the store and the cause."""

from __future__ import annotations

__all__ = ["StoreError", "CorruptRecordError", "CorruptJournalError", "FingerprintMismatchError",
           "StoreLockedError", "ReadOnlyStoreError"]


class StoreError(Exception):
    """Base class of the state stores' errors (an unusable file, a full disk, a read-only location, ...)."""


class CorruptRecordError(StoreError):
    """A stored record failed its checksum or could not be decoded."""


class CorruptJournalError(StoreError):
    """A journal entry failed its checksum or could not be decoded."""


class FingerprintMismatchError(StoreError):
    """A store, record or journal entry was written by a different model."""


class StoreLockedError(StoreError):
    """Another writer holds the store's lease.

    ``holder`` is what the holder wrote when it took the lease (``pid``, ``host``, ``since``), when readable.
    """

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


class ReadOnlyStoreError(StoreError):
    """A write to a store opened read-only."""
