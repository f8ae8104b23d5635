"""Sharded runs: 1 and 2 shards (in one process or on Ray) give the same states and forecasts bit for bit, a bad
batch changes nothing anywhere, the verbs answer as the single runner does, and rebalancing moves partitions with
their states."""

from __future__ import annotations

import polars as pl
import pytest

from gdn2ts.distributed import Manifest, ShardedRunner, partition_of
from gdn2ts.streaming import MemoryStore, OnlineRunner

from fleet_data import CHANNELS, batches, encoder, ids, spec, states


def run(root, parts, **kwargs):
    with ShardedRunner(spec(), root, partitions=4, **kwargs) as fleet:
        results = [fleet.observe(b) for b in parts]
        forecast = fleet.forecast(ids())
        info, stats = fleet.info(ids()), fleet.stats(ids())
    return results, forecast, info, stats, states(root)


def test_one_and_two_shards_give_the_same_states_and_forecasts_bit_for_bit(tmp_path, ray_cluster):
    parts = batches()
    one = run(tmp_path / "local", parts, shards=1, local=True)
    for name, kwargs in [("local2", {"shards": 2, "local": True}), ("ray2", {"shards": 2})]:
        got = run(tmp_path / name, parts, **kwargs)
        assert [(r.accepted, sorted(r.rejected), r.counts) for r in got[0]] == \
            [(r.accepted, sorted(r.rejected), r.counts) for r in one[0]]
        for a, b in zip(got[1:4], one[1:4], strict=True):
            assert a.equals(b)
        assert got[4] == one[4]  # every stream's record bytes, steps and last timestamp
    assert sum(r.counts.get("not_after_last", 0) for r in one[0]) > 0  # the late rows were rejected
    assert len(one[4]) == len(ids())


def test_sharded_agrees_with_one_runner_to_rounding(tmp_path):
    """One runner over one store steps every stream of a call in one batch; partitions step smaller batches, and
    the encoder's CPU arithmetic on a row depends on the rows beside it: equal to float rounding, and exactly
    the same rows accepted."""
    parts = batches()
    single = OnlineRunner(encoder(), MemoryStore(), CHANNELS, capacity=64)
    expected = [single.observe(b) for b in parts]
    with ShardedRunner(spec(), tmp_path, shards=2, partitions=4, local=True) as fleet:
        got = [fleet.observe(b) for b in parts]
        a, b = fleet.forecast(ids()), single.forecast(ids())
        assert fleet.info(ids()).equals(single.info(ids()))
    assert [r.accepted for r in got] == [r.accepted for r in expected]
    assert a.select("stream", "step", "channel", "origin").equals(b.select("stream", "step", "channel", "origin"))
    for q in ("q0.1", "q0.5", "q0.9"):
        assert (a[q] - b[q]).abs().max() < 1e-5


def test_a_bad_batch_changes_nothing_on_any_shard(tmp_path):
    parts = batches()
    with ShardedRunner(spec(), tmp_path, shards=2, partitions=4, local=True) as fleet:
        fleet.observe(parts[0])
        before = fleet.info(ids())
        bad = parts[1].with_columns(pl.when(pl.col("stream") == "s3").then(float("inf")).otherwise(pl.col("load"))
                                    .alias("load"))
        with pytest.raises(ValueError, match="inf"):
            fleet.observe(bad)
        with pytest.raises(ValueError, match="unknown columns"):
            fleet.observe(parts[1].with_columns(pl.lit(1.0).alias("pressure")))
        assert fleet.info(ids()).equals(before)
        assert fleet.observe(parts[1]).accepted > 0


def test_verbs_answer_in_the_order_asked_and_unknown_streams_are_named(tmp_path):
    parts = batches()
    with ShardedRunner(spec(), tmp_path, shards=2, partitions=4, local=True) as fleet:
        for b in parts:
            fleet.observe(b)
        asked = ["s5", "s0", "s17"]
        assert fleet.forecast(asked)["stream"].unique(maintain_order=True).to_list() == asked
        assert fleet.stream_ids() == sorted(ids())
        assert fleet.reset(["s5", "nobody"]) == ["s5"]
        assert fleet.info(["s5"])["steps"].to_list() == [0]
        with pytest.raises(KeyError, match="nobody"):
            fleet.delete(["s0", "nobody"])
        assert fleet.info(["s0"])["steps"].item() > 0  # nothing deleted
        fleet.delete(["s0"])
        with pytest.raises(KeyError, match="s0"):
            fleet.forecast(["s0"])


def test_partitions_are_a_stable_hash_of_the_utf8_id():
    # pinned values: a change of hash would move every stream of every existing store (XXH3-64 of the empty
    # input is 0x2D06800538D394C2, so "" falls in partition 2 of 16)
    assert partition_of(["meter-7", "β", ""], 16).tolist() == [9, 8, 2]
    assert partition_of(["meter-7"], 1).tolist() == [0]


def test_rebalance_two_to_three_moves_partitions_with_their_states(tmp_path, ray_cluster):
    parts = batches()
    root = tmp_path / "fleet"
    with ShardedRunner(spec(), root, shards=2, partitions=6) as fleet:
        for b in parts[:3]:
            fleet.observe(b)
        fleet.flush()
        before = states(root)
        moved = fleet.rebalance(3)
        assert moved == [4, 5] and fleet.owners() == [0, 1, 0, 1, 2, 2]
        assert states(root) == before  # moved with their states, nothing changed
        held = fleet._gather("held", {s: () for s in range(3)})
        assert held == {0: [0, 2], 1: [1, 3], 2: [4, 5]}
        for b in parts[3:]:
            fleet.observe(b)
        forecast = fleet.forecast(ids())
    assert Manifest.load(root).owners == [0, 1, 0, 1, 2, 2]
    # 6 partitions hash the streams otherwise than the reference's 4, so the states compare with a 6-partition run
    with ShardedRunner(spec(), tmp_path / "ref6", shards=1, partitions=6, local=True) as ref6:
        for b in parts:
            ref6.observe(b)
        assert forecast.equals(ref6.forecast(ids()))
    assert states(root) == states(tmp_path / "ref6")
    assert len(states(root)) == len(ids())


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("step", range(4))
def test_a_rebalance_cut_short_leaves_every_stream_in_one_store_and_is_completed(tmp_path, monkeypatch, step,
                                                                                 when):
    """The driver dies before or after each step of the two moves of 2 -> 3 shards (0: partition 4 released by
    its old owner, 1: opened by the new one, 2 and 3: partition 5 likewise)."""
    parts = batches()
    root = tmp_path / "fleet"
    fleet = ShardedRunner(spec(), root, shards=2, partitions=6, local=True)
    for b in parts[:3]:
        fleet.observe(b)
    fleet.flush()
    before = states(root)
    real, calls = ShardedRunner._gather, []

    def dies(self, method, args):
        if method in ("release", "acquire"):
            calls.append(method)
            if len(calls) - 1 == step and when == "before":
                raise RuntimeError("driver died")
        out = real(self, method, args)
        if method in ("release", "acquire") and len(calls) - 1 == step:
            raise RuntimeError("driver died")
        return out

    monkeypatch.setattr(ShardedRunner, "_gather", dies)
    with pytest.raises(RuntimeError, match="driver died"):
        fleet.rebalance(3)
    monkeypatch.setattr(ShardedRunner, "_gather", real)
    fleet.close()
    manifest = Manifest.load(root)
    # the plan was recorded first; a partition's new owner is recorded once its old owner has let it go
    assert manifest.target == [0, 1, 0, 1, 2, 2]
    assert manifest.owners == [0, 1, 0, 1, 2 if step >= 1 else 0, 2 if step >= 3 else 1]
    assert states(root) == before  # every stream in exactly one store, with its state
    # the next driver finishes the move, then continues as if nothing happened
    with ShardedRunner(spec(), root, local=True) as again:
        assert again.owners() == [0, 1, 0, 1, 2, 2] and Manifest.load(root).target is None
        for b in parts[3:]:
            again.observe(b)
        forecast = again.forecast(ids())
    with ShardedRunner(spec(), tmp_path / "ref", shards=3, partitions=6, local=True) as ref:
        for b in parts:
            ref.observe(b)
        assert forecast.equals(ref.forecast(ids()))
