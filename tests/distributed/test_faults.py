"""Shards killed in the middle of a call (Ray's kill, and SIGKILL of the shard's process): Ray restarts them, they
reopen their partitions from the stores (the journals replayed, the writer leases free again), the driver sends
the lost call once more and no partition applies it twice. After every call the forecasts equal an uninterrupted
run's, and at the end every stored state does, bit for bit."""

from __future__ import annotations

import os
import random
import signal
import threading

import pytest

from gdn2ts.distributed import ShardedRunner

from fleet_data import batches, spec, states

PAUSE = 0.15  # each shard pauses this long after each of its partitions: a kill lands between two commits


def seen(parts, i) -> list[str]:
    """The streams observed in the first ``i + 1`` calls."""
    return sorted({sid for b in parts[:i + 1] for sid in b["stream"].to_list()})


def reference(root, parts):
    with ShardedRunner(spec(), root, shards=1, partitions=4, local=True) as fleet:
        forecasts = []
        for i, b in enumerate(parts):
            fleet.observe(b)
            forecasts.append(fleet.forecast(seen(parts, i)))
    return forecasts, states(root)


def kill(ray, fleet, shard: int, how: str, pid: int) -> None:
    if how == "ray":
        ray.kill(fleet.handles[shard].actor, no_restart=False)
    else:
        os.kill(pid, signal.SIGKILL)


def trials(ray, tmp_path, calls: int, seed: int, both: float = 1.0) -> int:
    """``calls`` observe calls; in each, both shards (with probability ``both``) or one are killed, each a random
    moment after the call was sent (one by Ray's kill, the other by SIGKILL, alternately). Returns the number of
    kills."""
    rng = random.Random(seed)
    parts = batches(n_streams=24, rows=3 * calls, calls=calls, seed=seed)
    expected, expected_states = reference(tmp_path / "reference", parts)
    root = tmp_path / "fleet"
    kills, duplicates = 0, 0
    with ShardedRunner(spec(), root, shards=2, partitions=4, pause=PAUSE) as fleet:
        for i, batch in enumerate(parts):
            victims = [0, 1] if rng.random() < both else [rng.randrange(2)]
            timers = [threading.Timer(rng.uniform(0.02, 2.5 * PAUSE), kill,
                                      (ray, fleet, s, ("ray", "sigkill")[(i + s) % 2], fleet.handles[s].pid()))
                      for s in victims]
            pids = {s: t.args[4] for s, t in zip(victims, timers, strict=True)}
            for t in timers:
                t.start()
            result = fleet.observe(batch)
            for t in timers:
                t.join()
            kills += len(victims)
            duplicates += result.duplicate > 0
            # acknowledged: the forecasts are those of a run that was never interrupted
            assert fleet.forecast(seen(parts, i)).equals(expected[i]), f"call {i + 1}"
            for s in victims:
                # (Ray's kill is asynchronous: the old process may still answer a moment; SIGKILL is not)
                if ("ray", "sigkill")[(i + s) % 2] == "sigkill":
                    assert fleet.handles[s].pid() != pids[s], f"call {i + 1}: shard {s} was not restarted"
    assert states(root) == expected_states
    # some kills landed after a partition had committed the call: its retry was recognised, not applied again
    assert duplicates >= 1
    return kills


def test_twenty_shard_kills_in_the_middle_of_calls(tmp_path, ray_cluster):
    assert trials(ray_cluster, tmp_path, calls=10, seed=0) == 20


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 6))
def test_many_shard_kills(tmp_path, ray_cluster, seed):
    assert trials(ray_cluster, tmp_path, calls=30, seed=seed, both=0.3) >= 30
