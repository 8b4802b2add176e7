"""Real-server test harness.

Redis and PostgreSQL are real servers, started lazily (only when a test asks for one) and
stopped at the end of the session. For each kind of server the first available source wins:

1. an external server from the environment: ``LEDGER_TEST_REDIS_URL``,
   ``LEDGER_TEST_DATABASE_URL`` (a superuser URL), ``LEDGER_TEST_REDIS_CLUSTER_URL``;
2. a testcontainers container, only if a Docker engine answers within ~2 s;
3. a private local server from ``ledger.app.servers`` in a temp dir on a free port.

Fixtures (function-scoped unless noted):

- ``redis_url`` -> str: the server URL after ``FLUSHALL`` (each test starts empty).
- ``redis`` -> ``redis.asyncio.Redis`` (``decode_responses=True``) on ``redis_url``.
- ``database_url`` -> str: a fresh database created from the template ``ledger_template``
  (schema.sql loaded), dropped after the test.
- ``empty_database_url`` -> str: a fresh database without any table, dropped after the test.
- ``pg`` -> ``psycopg.AsyncConnection`` (autocommit) on ``database_url``.
- ``redis_cluster_url`` (session) -> str: a 3-master Redis Cluster.
- ``redis_cluster`` -> ``redis.asyncio.RedisCluster`` (``decode_responses=True``), every
  master flushed first.
- ``okx``, ``binance``, ``upbit`` -> ``tests.venue_server.LoopbackExchange``: that exchange's
  stateful loopback venue (real ccxt classes talk to it), serving for the whole test.
- ``redis_server`` / ``postgres_server`` (session) -> the locally managed
  ``RedisServer`` / ``PostgresServer`` for fault tests (stop/kill/restart); the test is skipped
  when the server is external. A test that stops or kills a server need not restart it: the
  next test's fixtures start it again.

Markers: tests using any server fixture get ``integration`` (plus ``cluster`` for the cluster
fixtures); all others get ``unit``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis as redis_lib
import redis.asyncio as aioredis

from ledger.app.servers import PostgresServer, RedisServer, start_postgres, start_redis
from ledger.config import Durability
from projections.schema import schema_sql
from tests.cluster import RedisCluster, start_redis_cluster
from tests.venue_server import LoopbackExchange, loopback_exchange

TEMPLATE_DB = "ledger_template"

REDIS_FIXTURES = {"redis_url", "redis", "redis_server"}
POSTGRES_FIXTURES = {"database_url", "empty_database_url", "pg", "postgres_server"}
CLUSTER_FIXTURES = {"redis_cluster_url", "redis_cluster"}
SERVER_FIXTURES = REDIS_FIXTURES | POSTGRES_FIXTURES | CLUSTER_FIXTURES


# --------------------------------------------------------------------------- markers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests that use a server fixture ``integration`` (and ``cluster``), others ``unit``."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & CLUSTER_FIXTURES:
            item.add_marker(pytest.mark.cluster)
        if names & SERVER_FIXTURES:
            item.add_marker(pytest.mark.integration)
        elif not any(item.get_closest_marker(name) for name in ("integration", "cluster")):
            item.add_marker(pytest.mark.unit)


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """Where a kind of server comes from: its URL and, when managed here, the server."""

    url: str
    source: str  # "env", "docker" or "local"
    server: Any = None


@functools.cache
def docker_available() -> bool:
    """True when a Docker engine answers a ping within ~2 s (never raises)."""
    try:
        import docker

        client = docker.from_env(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _tempdir(prefix: str) -> Path:
    # Directly under /tmp (not pytest's 0700 tmp tree) so the postgres OS user can reach it.
    return Path(tempfile.mkdtemp(prefix=prefix))


@pytest.fixture(scope="session")
def _redis_backend() -> Iterator[Backend]:
    url = os.environ.get("LEDGER_TEST_REDIS_URL")
    if url:
        yield Backend(url, "env")
        return
    if docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield Backend(f"redis://{host}:{port}/0", "docker")
        return
    workdir = _tempdir("ledger-test-redis-")
    server = start_redis(workdir, durability=Durability.OFF)  # throwaway: no fsync (a kill -9 loses nothing)
    try:
        yield Backend(server.url, "local", server)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def _postgres_backend() -> Iterator[Backend]:
    url = os.environ.get("LEDGER_TEST_DATABASE_URL")
    if url:
        yield Backend(url, "env")
        return
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer(
            "postgres:15", username="postgres", password="postgres", dbname="postgres", driver=None
        ) as container:
            yield Backend(container.get_connection_url(), "docker")
        return
    workdir = _tempdir("ledger-test-pg-")
    server = start_postgres(workdir, durability=Durability.OFF)  # throwaway, as before
    try:
        yield Backend(server.url, "local", server)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if server.socketdir is not None:
            shutil.rmtree(server.socketdir, ignore_errors=True)


def _ensure_running(backend: Backend) -> None:
    """Bring a locally managed server back up if a fault test left it stopped or killed."""
    server = backend.server
    if server is not None and not server.is_running():
        server.start()


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server(_redis_backend: Backend) -> RedisServer:
    """The locally managed RedisServer (for stop/kill/restart); skips if Redis is external."""
    if not isinstance(_redis_backend.server, RedisServer):
        pytest.skip(f"Redis is external ({_redis_backend.source}); fault tests need a local one")
    return _redis_backend.server


@pytest.fixture
def redis_url(_redis_backend: Backend) -> str:
    """The Redis URL, flushed (FLUSHALL) so the test starts with an empty server."""
    _ensure_running(_redis_backend)
    client = redis_lib.Redis.from_url(_redis_backend.url)
    try:
        client.flushall()
    finally:
        client.close()
    return _redis_backend.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An async Redis client (decode_responses=True) on the flushed server."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- Redis Cluster


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """URL of one node of a Redis Cluster with 3 masters (env or a local cluster)."""
    url = os.environ.get("LEDGER_TEST_REDIS_CLUSTER_URL")
    if url:
        yield url
        return
    workdir = _tempdir("ledger-test-cluster-")
    cluster: RedisCluster = start_redis_cluster(workdir, masters=3)
    try:
        yield cluster.url
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def redis_cluster(redis_cluster_url: str) -> AsyncIterator[aioredis.RedisCluster]:
    """An async RedisCluster client (decode_responses=True); every master flushed first."""
    client = aioredis.RedisCluster.from_url(redis_cluster_url, decode_responses=True)
    try:
        await client.flushall(target_nodes=aioredis.RedisCluster.PRIMARIES)
        yield client
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- PostgreSQL


def database_url_for(url: str, dbname: str) -> str:
    """``url`` with its database name replaced by ``dbname``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


def _admin(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(database_url_for(url, "postgres"), autocommit=True)


@pytest.fixture(scope="session")
def postgres_server(_postgres_backend: Backend) -> PostgresServer:
    """The locally managed PostgresServer (stop/kill/restart); skips if PostgreSQL is
    external."""
    if not isinstance(_postgres_backend.server, PostgresServer):
        pytest.skip(f"PostgreSQL is external ({_postgres_backend.source}); fault tests need a local one")
    return _postgres_backend.server


@pytest.fixture(scope="session")
def _postgres_template(_postgres_backend: Backend) -> Iterator[str]:
    """Create ``ledger_template`` once per session, loaded with schema.sql."""
    _ensure_running(_postgres_backend)
    url = _postgres_backend.url
    with _admin(url) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {TEMPLATE_DB} TEMPLATE template0 ENCODING 'UTF8'")
    with psycopg.connect(database_url_for(url, TEMPLATE_DB), autocommit=True) as conn:
        conn.execute(schema_sql().encode("utf-8"))
    yield TEMPLATE_DB
    with contextlib.suppress(psycopg.Error), _admin(url) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)")


@contextlib.contextmanager
def _scratch_database(backend: Backend, template: str) -> Iterator[str]:
    """Create a uniquely named database from ``template``; drop it (FORCE) afterwards."""
    _ensure_running(backend)
    name = "t_" + uuid.uuid4().hex[:20]
    with _admin(backend.url) as admin:
        admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    try:
        yield database_url_for(backend.url, name)
    finally:
        _ensure_running(backend)  # the test may have stopped or killed a local server
        with _admin(backend.url) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def database_url(_postgres_backend: Backend, _postgres_template: str) -> Iterator[str]:
    """A fresh database with the ledger schema (copied from ``ledger_template``)."""
    with _scratch_database(_postgres_backend, _postgres_template) as url:
        yield url


@pytest.fixture
def empty_database_url(_postgres_backend: Backend) -> Iterator[str]:
    """A fresh database with no tables (for tests that apply schema.sql themselves)."""
    with _scratch_database(_postgres_backend, "template0") as url:
        yield url


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """An async psycopg connection (autocommit) on the test's fresh database."""
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


# --------------------------------------------------------------------------- loopback venues


def _loopback_venue(exchange: str) -> Any:
    """The fixture named ``exchange``: its loopback venue, serving for the whole test."""

    @pytest.fixture(name=exchange)
    def venue() -> Iterator[LoopbackExchange]:
        with loopback_exchange(exchange) as loopback:
            yield loopback

    return venue


okx = _loopback_venue("okx")
binance = _loopback_venue("binance")
upbit = _loopback_venue("upbit")
