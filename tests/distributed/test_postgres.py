"""Partitions in PostgreSQL (any machine can open them): 2 shards on Ray over PostgreSQL stores give the states
and forecasts of 1 shard over SQLite files, bit for bit."""

from __future__ import annotations

from gdn2ts.distributed import ShardedRunner

from fleet_data import batches, ids, spec, states


def test_postgres_partitions_equal_sqlite_ones(tmp_path, ray_cluster, postgres_stores):
    parts = batches()
    with ShardedRunner(spec(), tmp_path / "sqlite", shards=1, partitions=4, local=True) as fleet:
        for b in parts:
            fleet.observe(b)
        expected = fleet.forecast(ids())
    with ShardedRunner(spec(), postgres_stores, shards=2, partitions=4) as fleet:
        for b in parts:
            fleet.observe(b)
        assert fleet.forecast(ids()).equals(expected)
    assert states(postgres_stores.root, postgres_stores) == states(tmp_path / "sqlite")
