"""What a state store holds, read straight from its files: for tests that a fault leaves every stored state as it
was."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

TABLES = ("meta", "streams", "journal", "blobs")


def dump(path: str | Path) -> dict:
    """Every table of the store's database and, per stream, its record bytes from the slab."""
    path = Path(path)
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = {t: con.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in TABLES}
        meta = dict(tables["meta"])
    finally:
        con.close()
    records = {}
    slab = Path(f"{path}-slab")
    if "layout" in meta and slab.exists():
        from gdn2ts.streaming.records import RecordLayout

        size = RecordLayout.from_json(meta["layout"]).nbytes
        with slab.open("rb") as f:
            for sid, slot, *_ in tables["streams"]:
                f.seek(slot * size)
                records[sid] = f.read(size)
    # slots are where records happen to live: what is stored is each stream's index row (less its slot) and bytes
    tables["streams"] = [(sid, *rest) for sid, _, *rest in tables["streams"]]
    return {**tables, "records": records}


def digest(path: str | Path) -> str:
    """SHA-256 over :func:`dump`."""
    return hashlib.sha256(repr(sorted(dump(path).items())).encode()).hexdigest()


def dump_postgres(dsn: str, name: str) -> dict:
    """Every table of a PostgreSQL store (the schema ``name``), read on a connection of its own; the lease note
    (who opened it last) is not part of what the store holds."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as con:
        return {t: [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in con.execute(
                    sql.SQL("SELECT * FROM {}.{} ORDER BY 1").format(sql.Identifier(name), sql.Identifier(t)))]
                for t in TABLES}


def digest_postgres(dsn: str, name: str) -> str:
    """SHA-256 over :func:`dump_postgres`."""
    return hashlib.sha256(repr(sorted(dump_postgres(dsn, name).items())).encode()).hexdigest()
