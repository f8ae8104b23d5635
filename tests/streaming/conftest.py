"""Fixtures of the streaming tests: a PostgreSQL server for the PostgreSQL store (skipped without one, except where
GDN2TS_REQUIRE_POSTGRES=1, as in CI), and one durable store of each backend for the tests that run on both."""

from __future__ import annotations

import itertools
import os

import pytest

from stored import digest, digest_postgres, dump, dump_postgres

HOW_TO_START = (
    "set GDN2TS_POSTGRES_DSN to a database in which the tests may create and drop schemas; a throwaway server "
    "(Debian's postgresql package, a cluster in a temporary folder on a unix socket): "
    "eval \"$(bash .ci/postgres start)\", and afterwards bash .ci/postgres stop \"$GDN2TS_POSTGRES_DIR\"")


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The test server's connection string; a missing server skips the test, or fails it under
    GDN2TS_REQUIRE_POSTGRES=1."""
    dsn = os.environ.get("GDN2TS_POSTGRES_DSN")
    problem = None
    try:
        import psycopg
    except ImportError:
        problem = "psycopg is not installed (pip install -e '.[dev,postgres]')"
    if problem is None and not dsn:
        problem = "no PostgreSQL server: GDN2TS_POSTGRES_DSN is not set"
    if problem is None:
        try:
            psycopg.connect(dsn, connect_timeout=5).close()
        except psycopg.Error as e:
            problem = f"cannot reach the PostgreSQL server of GDN2TS_POSTGRES_DSN ({str(e).strip()})"
    if problem is not None:
        if os.environ.get("GDN2TS_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{problem}; GDN2TS_REQUIRE_POSTGRES=1 requires the PostgreSQL tests to run: {HOW_TO_START}")
        pytest.skip(f"{problem}; to run these tests, {HOW_TO_START}")
    return dsn


class PostgresServer:
    """Fresh store names in the test database, each dropped (with whatever still holds it) when the test ends."""

    _count = itertools.count()

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.names: list[str] = []

    def name(self) -> str:
        name = f"test_{os.getpid()}_{next(self._count)}"
        self.names.append(name)
        self.drop(name)
        return name

    def store(self, name: str, **kwargs):
        from gdn2ts.streaming.postgres_store import PostgresStore

        return PostgresStore(self.dsn, name=name, **kwargs)

    def connect(self):
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True)

    def drop(self, name: str) -> None:
        from psycopg import sql

        with self.connect() as con:
            con.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                        (f"gdn2ts store {name}",))
            con.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))

    def dump(self, name: str) -> dict:
        return dump_postgres(self.dsn, name)

    def digest(self, name: str) -> str:
        return digest_postgres(self.dsn, name)


@pytest.fixture
def postgres(postgres_dsn):
    server = PostgresServer(postgres_dsn)
    yield server
    for name in server.names:
        server.drop(name)


class Durable:
    """One durable store of a backend: ``open()`` opens it (again), ``dump()``/``digest()`` read what it holds."""

    def __init__(self, backend: str, tmp_path, request):
        self.backend = backend
        if backend == "sqlite":
            self.path = tmp_path / "s.db"
        else:
            self.server = request.getfixturevalue("postgres")
            self.name = self.server.name()

    def open(self, readonly: bool = False):
        from gdn2ts.streaming import SQLiteStore

        if self.backend == "sqlite":
            return SQLiteStore(self.path, readonly=readonly)
        return self.server.store(self.name, readonly=readonly)

    def dump(self) -> dict:
        return dump(self.path) if self.backend == "sqlite" else self.server.dump(self.name)

    def digest(self) -> str:
        return digest(self.path) if self.backend == "sqlite" else self.server.digest(self.name)


@pytest.fixture(params=["sqlite", "postgres"])
def durable(request, tmp_path) -> Durable:
    """A durable store of each backend (SQLite, PostgreSQL)."""
    return Durable(request.param, tmp_path, request)
