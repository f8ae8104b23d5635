"""Older SQLite stores (schema versions 1 to 3: each record a safetensors payload with a SHA-256 in a row of the
``streams`` table) converted to the slab store in place, in the transaction that opens them for writing."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from safetensors.torch import load as st_load

from gdn2ts.streaming.errors import CorruptRecordError, FingerprintMismatchError
from gdn2ts.streaming.records import RecordLayout, StreamRecord, payload_checksum, read_metadata, row_checksums

if TYPE_CHECKING:
    from gdn2ts.streaming.sqlite_store import SQLiteStore

__all__ = ["convert_legacy", "decode_legacy", "has_table"]


def has_table(c, name: str) -> bool:
    return c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def convert_legacy(store: SQLiteStore) -> None:
    """Move the records of an older file (safetensors rows of ``legacy_streams``) into the slab, in the open
    transaction; a file holding the states of two models is refused."""
    c = store.conn
    # journal entries and blobs: verified against their old SHA-256 checksums, stored with the new ones
    for table, key in (("journal", "seq"), ("blobs", "name")):
        if has_table(c, f"legacy_{table}"):
            for name, payload, digest in c.execute(f"SELECT {key}, payload, checksum FROM legacy_{table}"
                                                   ).fetchall():
                if hashlib.sha256(payload).hexdigest() != digest:
                    what = f"journal entry {name}" if table == "journal" else f"blob {name!r}"
                    raise CorruptRecordError(f"{store.what}: {what} fails its checksum; the file is not converted")
                c.execute(f"INSERT INTO {table} VALUES (?, ?, ?)", (name, payload, payload_checksum(payload)))
            c.execute(f"DROP TABLE legacy_{table}")
    if not has_table(c, "legacy_streams"):
        return
    cursor = c.execute("SELECT stream_id, payload FROM legacy_streams ORDER BY stream_id")
    while batch := cursor.fetchmany(4096):
        records = {sid: decode_legacy(payload, sid) for sid, payload in batch}
        models = {r.fingerprint for r in records.values()} | ({store.model} if store.model else set())
        if len(models) > 1:
            raise FingerprintMismatchError(f"{store.what} holds the states of several models {sorted(models)}; "
                                           "it cannot be converted to one model's store")
        if store.layout is None:
            first = next(iter(records.values()))
            store._bind_in_transaction(RecordLayout.of(first.tensors), first.fingerprint)
        store.put(records)
        ids, rows, _ = store._staged_rows()
        new = store._allocate(len(ids))
        store.slab.write(new, rows.data)
        c.executemany("INSERT INTO streams VALUES (?, ?, ?, ?, ?, ?)",
                      zip(ids, new.tolist(), rows.steps.tolist(), rows.last_timestamp.tolist(),
                          rows.journal_seq.tolist(), row_checksums(rows.data).tolist(), strict=True))
        store.rollback()
    c.execute("DROP TABLE legacy_streams")


def decode_legacy(payload: bytes, stream_id: str) -> StreamRecord:
    """A record of an older store (safetensors with the scalars in its metadata)."""
    try:
        meta = read_metadata(payload)
        if meta.get("format") != "gdn2ts.stream.v1":
            raise ValueError(f"unknown format {meta.get('format')!r}")
        return StreamRecord(dict(st_load(payload)), float(meta["last_timestamp"]), int(meta["steps"]),
                            meta["fingerprint"], int(meta.get("journal_seq", "0")))
    except Exception as e:  # any decoding failure is a corrupt record, named
        raise CorruptRecordError(f"stream {stream_id!r}: stored record cannot be decoded ({e})") from None

