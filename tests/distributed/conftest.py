"""One local Ray cluster (2 CPUs) for every distributed test of the session: starting one takes seconds."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # a call to a shard that died waits up to 1 s (Ray's default) for the cause of death before it fails: a tenth
    # of that halves a shard restart's time here (the fault tests' time is mostly restarts)
    os.environ.setdefault("RAY_timeout_ms_task_wait_for_death_info", "100")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def postgres_stores(tmp_path):
    """A StoreSpec of partitions in the test PostgreSQL server (GDN2TS_POSTGRES_DSN, as for the store's own tests:
    .ci/postgres starts one), its schemas dropped afterwards; skipped without a server, failed instead under
    GDN2TS_REQUIRE_POSTGRES=1 (CI)."""
    from gdn2ts.distributed import StoreSpec

    dsn = os.environ.get("GDN2TS_POSTGRES_DSN")
    if not dsn:
        why = ("no PostgreSQL server: GDN2TS_POSTGRES_DSN is not set; start one with eval \"$(bash .ci/postgres "
               "start)\"")
        if os.environ.get("GDN2TS_REQUIRE_POSTGRES") == "1":
            pytest.fail(why)
        pytest.skip(why)
    from gdn2ts.streaming.postgres_store import PostgresStore

    stores = StoreSpec(str(tmp_path / "manifest"), dsn=dsn, prefix=f"fleet_{os.getpid()}")
    yield stores
    for p in range(16):
        PostgresStore.drop(dsn, stores.describe(p))
