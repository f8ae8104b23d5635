"""Recovery: replaying the journal entries written after the stored snapshots (the work of a process that stopped
without closing its runner), each with the same streams, rounds and batches as the original call, so that the
states come out bit for bit as they were."""

from __future__ import annotations

import numpy as np
import torch

from gdn2ts.streaming.frames import ObservationSchema
from gdn2ts.streaming.journal import decode_entry
from gdn2ts.streaming.rounds import Stepper
from gdn2ts.streaming.store import JournaledStore
from gdn2ts.streaming.workingset import WorkingSet

__all__ = ["replay_journal"]


def replay_journal(store: JournaledStore, ws: WorkingSet, stepper: Stepper, schema: ObservationSchema,
                   fingerprint: str) -> int:
    """Apply the journal's entries to the working set (as dirty states); returns how many were replayed. The
    caller sets ``ws.seq`` afterwards (it is the entry being replayed meanwhile).

    A stream whose stored record already reflects an entry (``journal_seq`` at or after it: evicted or snapshotted
    after that call) still rides along in the entry's batches, and its result is dropped. An entry written by
    another model, with other columns or failing its checksum raises, naming the entry.
    """
    replayed = 0
    for seq, payload in store.read_journal(0):
        entry = decode_entry(seq, payload, fingerprint)
        if entry.columns != (schema.channels, schema.covariates):
            raise ValueError(f"journal entry {seq}: written with channels {list(entry.columns[0])} and covariates "
                             f"{list(entry.columns[1])}, this runner has {list(schema.channels)} and "
                             f"{list(schema.covariates)}")
        ws.seq = seq - 1
        slots = ws.acquire(entry.stream_ids)
        skip = ws.seqs[slots] >= seq
        flat, steps = stepper.run(ws.gather(slots), entry, skip)
        keep = np.flatnonzero(~skip)
        index = torch.from_numpy(keep).to(stepper.device)
        ws.scatter(slots[keep], {k: v.index_select(0, index) for k, v in flat.items()}, steps[keep], seq, dirty=True)
        replayed += 1
    return replayed
