"""Crash safety with online learning: a process that observes and learns, killed with SIGKILL at random points,
loses no acknowledged call and half-applies none, learned weights included.

As in test_crash.py: each trial forks a child from a fork server that has already imported torch; it opens the
learning runner on one SQLite file (replaying the previous victim's journal with the learned weights), continues
with the next call and appends each call's number to an acknowledgement file after the call returns. The parent
kills it after a random delay, opens a runner on a copy of the database and requires the states and the weights
to be bit for bit those of an uninterrupted run over exactly the acknowledged calls, or those plus the one in
flight.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import torch

from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.streaming import CommitPolicy, LearnConfig, MemoryStore, OnlineRunner, SQLiteStore

CHANNELS = ["a", "b"]
STREAMS = ["s0", "s1", "s2", "s3"]
LEARN = LearnConfig(history=12, context=8, min_context=1, lr=1e-3, target_tolerance=0.0)
POLICY = CommitPolicy(snapshot_every=3)


def encoder():
    torch.manual_seed(0)
    return StreamEncoder(EncoderConfig(n_channels=2, hidden_size=8, n_layers=1, num_heads=2, head_dim=4, horizon=2))


def make_calls() -> list[tuple[str, object]]:
    """Observe two streams at a time on an hourly grid; every third call learns from those two."""
    rng = np.random.default_rng(3)
    calls = []
    for hour in range(1, 13):
        for pair in (STREAMS[:2], STREAMS[2:]):
            calls.append(("observe", [{"stream": s, "time": float(hour), "a": float(rng.standard_normal()),
                                       "b": None if rng.random() < 0.3 else float(rng.standard_normal())}
                                      for s in pair]))
            if hour >= 4 and hour % 2 == 0:
                calls.append(("learn", pair))
    return calls


CALLS = make_calls()


def apply(runner, call) -> None:
    op, arg = call
    runner.observe(arg) if op == "observe" else runner.learn(arg)


def counts(k: int) -> tuple[int, int]:
    """(observe calls, learn calls) among the first k calls."""
    ops = [op for op, _ in CALLS[:k]]
    return ops.count("observe"), ops.count("learn")


def victim(db: str, acks: str) -> None:
    torch.set_num_threads(1)
    fd = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"start\n")
    runner = OnlineRunner(encoder(), SQLiteStore(db), CHANNELS, capacity=3, policy=POLICY, learning=LEARN)
    os.write(fd, b"ready\n")
    # every observe is one journal entry and every learn one weight version: together they say where to go on
    done = next(k for k in range(len(CALLS) + 1) if counts(k) == (runner.seq, runner.version))
    for i in range(done, len(CALLS)):
        apply(runner, CALLS[i])
        os.write(fd, f"{i + 1}\n".encode())
    runner.close()


def snapshot(runner) -> tuple:
    runner.flush()
    records = runner.store.get(STREAMS)
    states = {s: None if r is None else (r.steps, {k: t.clone() for k, t in r.tensors.items()})
              for s, r in records.items()}
    return states, {k: v.detach().clone() for k, v in runner.encoder.state_dict().items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    # bit for bit, NaN (a missing value in a history) included
    return t.contiguous().view(torch.uint8)


def same(a: tuple, b: tuple) -> bool:
    (sa, wa), (sb, wb) = a, b
    return all(torch.equal(wa[k], wb[k]) for k in wa) and all(
        (sa[s] is None) == (sb[s] is None) and (sa[s] is None or (
            sa[s][0] == sb[s][0] and all(torch.equal(bits(sa[s][1][k]), bits(sb[s][1][k])) for k in sa[s][1])))
        for s in STREAMS)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1] if path.exists() else []


def acknowledged(path: Path) -> int:
    return max((int(x) for x in lines(path) if x.isdigit()), default=0)


def test_sigkill_while_observing_and_learning(tmp_path):
    ctx = mp.get_context("forkserver")
    # torch._dynamo: the first optimizer of a process imports it (seconds); once in the server, not per child
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "polars", "gdn2ts.streaming", victim.__module__])
    rng = random.Random(5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = OnlineRunner(encoder(), MemoryStore(), CHANNELS, capacity=len(STREAMS), learning=LEARN)
        reference = [snapshot(ref)]
        for call in CALLS:
            apply(ref, call)
            reference.append(snapshot(ref))
        assert ref.version == counts(len(CALLS))[1]  # every learn call took a step
        db, acks, done, seen = tmp_path / "v.db", tmp_path / "v.acks", 0, {"learned": 0, "kills": 0}
        for trial in range(12):
            # one kill in four lands while the runner opens (and replays); the others after one to three more
            # calls have returned, then a random moment later: progress does not depend on the machine's load
            start_up = rng.random() < 0.25
            mark = b"start" if start_up else b"ready"
            earlier = lines(acks).count(mark)
            goal = 0 if start_up else done + rng.randint(1, 3)
            child = ctx.Process(target=victim, args=(str(db), str(acks)))
            child.start()
            deadline = time.monotonic() + 120
            while (lines(acks).count(mark) <= earlier or acknowledged(acks) < goal) and child.is_alive():
                assert time.monotonic() < deadline, "the child made no progress"
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.03))
            child.kill()
            child.join()
            assert child.exitcode in (0, -signal.SIGKILL)
            seen["kills"] += child.exitcode != 0
            acked = acknowledged(acks)
            copy = tmp_path / f"check{trial}.db"
            for suffix in ("", "-wal", "-slab"):  # the database, its log and the records' slab
                if Path(f"{db}{suffix}").exists():
                    shutil.copyfile(f"{db}{suffix}", f"{copy}{suffix}")
            con = sqlite3.connect(copy)
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            con.close()
            runner = OnlineRunner(encoder(), SQLiteStore(copy), CHANNELS, capacity=len(STREAMS))
            applied = next(k for k in range(len(CALLS) + 1) if counts(k) == (runner.seq, runner.version))
            state = snapshot(runner)
            runner.close()
            assert applied in (acked, acked + 1), f"trial {trial}: {applied} calls applied, {acked} acknowledged"
            assert applied >= done and same(state, reference[applied]), f"trial {trial}: differs after {applied}"
            seen["learned"] += counts(applied)[1] > counts(done)[1]
            done = applied
            if applied == len(CALLS):
                break
    finally:
        torch.set_num_threads(threads)
    assert seen["kills"] >= 3 and seen["learned"] >= 1, seen


def test_learning_calls_map_to_journal_and_versions():
    # the (observe, learn) counts of every prefix are distinct, so a store's (journal head, version) names it
    assert len({counts(k) for k in range(len(CALLS) + 1)}) == len(CALLS) + 1
