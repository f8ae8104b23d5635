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
