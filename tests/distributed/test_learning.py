"""One weight lineage across shards: a learn round is one AdamW step from every partition's matured windows,
the same whatever the number of shards (bit for bit) and equal to one step of a single runner over the same
windows (to rounding); every partition then serves the new version, and none goes back to an older one after
acknowledging it, through shard kills and a round cut short."""

from __future__ import annotations

import os
import random
import signal
import threading

import pytest
import torch

from gdn2ts.distributed import ShardedRunner
from gdn2ts.streaming import LearnConfig, MemoryStore, OnlineRunner
from gdn2ts.streaming.learn import decode_learned

from fleet_data import CHANNELS, batches, encoder, ids, spec

LEARN = LearnConfig(history=48, context=32, min_context=4, lr=1e-3, batch_streams=64)
N = 16


def data():
    return batches(n_streams=N, rows=40, calls=4, seed=3)


def blob(fleet, p=0) -> bytes:
    owner = fleet.owners()[p]
    return fleet._gather("blob", {owner: (p,)})[owner]


def play(fleet, parts):
    """Observe two batches, learn, observe two more, learn: the results, forecasts and weight blobs."""
    out = []
    for half in (parts[:2], parts[2:]):
        for b in half:
            fleet.observe(b)
        out.append(fleet.learn(ids(N)))
    return out, fleet.forecast(ids(N)), [blob(fleet, p) for p in range(fleet.partitions)], fleet.versions()


def test_one_lineage_whatever_the_shards(tmp_path):
    """1 and 2 shards (here in one process; on Ray below, with shards killed) learn the same weights."""
    parts = data()
    with ShardedRunner(spec(learning=LEARN), tmp_path / "one", shards=1, partitions=4, local=True) as fleet:
        one = play(fleet, parts)
    with ShardedRunner(spec(learning=LEARN), tmp_path / "two", shards=2, partitions=4, local=True) as fleet:
        two = play(fleet, parts)
    assert [r.steps for r in one[0]] == [1, 1] and one[3] == [2, 2, 2, 2]
    assert one[0] == two[0]  # windows, targets, loss, version
    assert one[1].equals(two[1])
    # every partition holds the same weights and optimizer state, bit for bit (the blob's bytes themselves may
    # differ: safetensors writes its metadata in no fixed order)
    assert len(set(one[2])) == 1 and len(set(two[2])) == 1
    a, b = decode_learned(one[2][0]), decode_learned(two[2][0])
    assert (a.lineage, a.version, a.weights, a.config) == (b.lineage, b.version, b.weights, b.config)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_a_round_is_one_step_over_all_windows(tmp_path):
    """The same update as a single runner's learn over the same streams, when its windows fit one batch."""
    parts = data()
    single = OnlineRunner(encoder(), MemoryStore(), CHANNELS, capacity=64, learning=LEARN)
    for b in parts:
        single.observe(b)
    expected = single.learn(ids(N))
    with ShardedRunner(spec(learning=LEARN), tmp_path, shards=2, partitions=4, local=True) as fleet:
        for b in parts:
            fleet.observe(b)
        got = fleet.learn(ids(N))
        weights = decode_learned(blob(fleet)).tensors
    assert (got.steps, got.windows, got.targets, got.version) == (1, expected.windows, expected.targets, 1)
    assert got.loss == pytest.approx(expected.loss, rel=1e-5)
    moved = 0.0
    for name, value in single.encoder.state_dict().items():
        torch.testing.assert_close(weights[f"w.{name}"], value, atol=2e-6, rtol=1e-5)
        moved = max(moved, float((value - encoder().state_dict()[name]).abs().max()))
    assert moved > 1e-4  # the step did move the weights


def test_no_partition_serves_an_older_version_after_acknowledging_a_newer_one(tmp_path, ray_cluster):
    parts = batches(n_streams=N, rows=48, calls=6, seed=4)
    with ShardedRunner(spec(learning=LEARN), tmp_path / "ref", shards=1, partitions=4, local=True) as ref:
        expected = []
        for b in parts:
            ref.observe(b)
            expected.append((ref.learn(ids(N)).version, ref.forecast(ids(N))))
    rng = random.Random(0)
    with ShardedRunner(spec(learning=LEARN), tmp_path / "fleet", shards=2, partitions=4) as fleet:
        acknowledged = 0
        for i, b in enumerate(parts):
            fleet.observe(b)
            kill = None
            if i % 2 == 1:  # a shard killed at a random moment of the round (gradients, step or install)
                shard = rng.randrange(2)
                pid = fleet.handles[shard].pid()
                kill = threading.Timer(rng.uniform(0.0, 0.2), os.kill, (pid, signal.SIGKILL))
                kill.start()
            version = fleet.learn(ids(N)).version
            if kill is not None:
                kill.join()
                assert fleet.handles[shard].pid() != pid
            assert version >= acknowledged
            acknowledged = version
            assert fleet.versions() == [version] * 4
            assert version == expected[i][0] and fleet.forecast(ids(N)).equals(expected[i][1])
        assert acknowledged == expected[-1][0]


def test_a_round_cut_short_is_completed_by_the_next_driver(tmp_path, monkeypatch):
    parts = data()
    root = tmp_path / "fleet"
    fleet = ShardedRunner(spec(learning=LEARN), root, shards=2, partitions=4, local=True)
    for b in parts:
        fleet.observe(b)
    real = ShardedRunner._gather

    def install_on_shard_zero_only(self, method, args):
        if method == "install":
            real(self, method, {0: args[0]})
            raise RuntimeError("driver died")
        return real(self, method, args)

    monkeypatch.setattr(ShardedRunner, "_gather", install_on_shard_zero_only)
    with pytest.raises(RuntimeError, match="driver died"):
        fleet.learn(ids(N))
    monkeypatch.setattr(ShardedRunner, "_gather", real)
    assert fleet.versions() == [1, 0, 1, 0]
    fleet.close()
    with ShardedRunner(spec(learning=LEARN), root, local=True) as again:
        assert again.versions() == [1, 1, 1, 1]
        assert len({blob(again, p) for p in range(4)}) == 1
        assert again.learn(ids(N)).version == 2
