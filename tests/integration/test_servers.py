"""ledger.app.servers: real local servers that stop, crash, restart and are found again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis as redis_lib
import structlog

from ledger.app.servers import (
    PostgresServer,
    RedisServer,
    ServerError,
    ensure_private_postgres,
    ensure_private_redis,
    find_binary,
    free_port,
    start_postgres,
    start_redis,
    url_answers,
)
from ledger.app.service import warn_about_redis
from ledger.config import DEFAULT_DURABILITY, ConfigError, Durability, Settings, read_private_url

pytestmark = pytest.mark.integration


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ledger-test-servers-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _get(url: str, key: str) -> str | None:
    client = redis_lib.Redis.from_url(url, decode_responses=True)
    try:
        return client.get(key)
    finally:
        client.close()


def _set(url: str, key: str, value: str) -> None:
    client = redis_lib.Redis.from_url(url, decode_responses=True)
    try:
        client.set(key, value)
    finally:
        client.close()


def _pg_value(url: str, sql: str) -> object:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0]


def test_find_binary_and_free_port() -> None:
    assert Path(find_binary("redis-server")).name == "redis-server"
    assert Path(find_binary("initdb")).name == "initdb"
    with pytest.raises(ServerError, match=r"'no-such-binary-xyz' not found .*make install"):
        find_binary("no-such-binary-xyz")
    port = free_port()
    assert 1024 <= port <= 65535


def test_redis_stop_kill_restart_keep_data_with_aof(workdir: Path) -> None:
    server = start_redis(workdir)
    try:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.pid is not None and server.is_running()
        _set(server.url, "k", "0.1")

        server.stop()
        assert server.pid is None and not server.is_running()
        server.start()
        assert _get(server.url, "k") == "0.1"

        _set(server.url, "k2", "2")
        server.kill()  # SIGKILL: the AOF was already written by the time SET replied
        assert not server.is_running()
        server.restart()
        assert _get(server.url, "k") == "0.1"
        assert _get(server.url, "k2") == "2"
    finally:
        server.stop()
    assert not url_answers(server.url)


def test_redis_start_fails_clearly_on_a_busy_port(workdir: Path) -> None:
    first = start_redis(workdir / "a")
    try:
        with pytest.raises(ServerError, match=f"port {first.port} .* already in use"):
            start_redis(workdir / "b", port=first.port)
    finally:
        first.stop()


def test_postgres_stop_kill_restart_keep_data(workdir: Path) -> None:
    server = start_postgres(workdir)
    try:
        assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        assert (server.datadir / "PG_VERSION").read_text().strip().isdigit()
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (v NUMERIC)")
            conn.execute("INSERT INTO t VALUES (0.000000000123456789)")

        server.stop()
        assert server.pid is None and not url_answers(server.url)
        server.start()  # no initdb again: the table is still there
        assert _pg_value(server.url, "SELECT v FROM t") == Decimal("0.000000000123456789")

        server.kill()
        assert server.pid is None and not url_answers(server.url)
        server.start()  # crash recovery
        assert _pg_value(server.url, "SELECT count(*) FROM t") == 1
    finally:
        server.stop()


def test_private_servers_are_reused_and_outlive_their_starter(workdir: Path) -> None:
    base = workdir / ".ledger"
    assert read_private_url(base, "redis") is None
    with pytest.raises(ValueError):
        read_private_url(base, "mysql")

    # Started from another process that exits at once, with a relative base as `ledger serve`
    # uses (./.ledger): the servers must keep running.
    code = (
        "import sys; from pathlib import Path;"
        "from ledger.app.servers import ensure_private_redis, ensure_private_postgres;"
        "b = Path(sys.argv[1]);"
        "print(ensure_private_redis(b)); print(ensure_private_postgres(b))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, ".ledger"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    redis_url, pg_url = result.stdout.split()
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    pg_port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
    try:
        assert read_private_url(base, "redis") == redis_url
        assert read_private_url(base, "postgres") == pg_url
        assert url_answers(redis_url) and url_answers(pg_url)

        # Reused, not restarted.
        _set(redis_url, "still", "here")
        assert ensure_private_redis(base) == redis_url
        assert ensure_private_postgres(base) == pg_url
        assert _get(redis_url, "still") == "here"

        # Stopped: started again on the recorded port, with its data.
        RedisServer(workdir=base / "redis", port=redis_port).stop()
        PostgresServer(workdir=base / "postgres", port=pg_port).stop()
        assert not url_answers(redis_url) and not url_answers(pg_url)
        assert ensure_private_redis(base) == redis_url
        assert ensure_private_postgres(base) == pg_url
        assert _get(redis_url, "still") == "here"
        assert _pg_value(pg_url, "SELECT 1") == 1
    finally:
        RedisServer(workdir=base / "redis", port=redis_port).stop()
        PostgresServer(workdir=base / "postgres", port=pg_port).stop()
    assert not url_answers(redis_url) and not url_answers(pg_url)
    assert os.path.isdir(base / "postgres" / "data")


def _redis_config(url: str, name: str) -> str:
    client = redis_lib.Redis.from_url(url, decode_responses=True)
    try:
        return str(client.config_get(name)[name])
    finally:
        client.close()


def test_servers_are_durable_unless_asked_otherwise(workdir: Path) -> None:
    """Defect 13: the private servers ran with PostgreSQL fsync=off and Redis appendfsync everysec."""
    assert DEFAULT_DURABILITY is Durability.ALWAYS
    assert [(d.appendfsync, d.fsync) for d in Durability] == [("always", "on"), ("everysec", "on"), ("no", "off")]
    server = RedisServer(workdir=workdir, port=1)
    assert server.command_line()[7:11] == ["--appendonly", "yes", "--appendfsync", "always"]
    base = workdir / ".ledger"
    redis_url = ensure_private_redis(base, Durability.OFF)
    pg_url = ensure_private_postgres(base, Durability.OFF)
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    pg_port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
    try:
        assert _redis_config(redis_url, "appendfsync") == "no"
        assert _pg_value(pg_url, "SHOW fsync") == "off"
        _set(redis_url, "kept", "1")
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (v int)")

        # Reused by a later start with the default: made durable in place, same URLs, same data.
        assert ensure_private_redis(base) == redis_url
        assert ensure_private_postgres(base) == pg_url
        assert _redis_config(redis_url, "appendfsync") == "always"
        assert _pg_value(pg_url, "SHOW fsync") == "on"
        assert _pg_value(pg_url, "SHOW synchronous_commit") == "on"
        assert _get(redis_url, "kept") == "1"
        assert _pg_value(pg_url, "SELECT count(*) FROM kept") == 0

        assert ensure_private_redis(base, Durability.EVERYSEC) == redis_url
        assert _redis_config(redis_url, "appendfsync") == "everysec"
    finally:
        RedisServer(workdir=base / "redis", port=redis_port).stop()
        PostgresServer(workdir=base / "postgres", port=pg_port).stop()


def test_durability_is_a_setting() -> None:
    assert Settings().durability is Durability.ALWAYS
    assert Settings.from_env({"LEDGER_DURABILITY": "everysec"}).durability is Durability.EVERYSEC
    with pytest.raises(ConfigError, match=r"^LEDGER_DURABILITY: must be one of always, everysec, off \(got 'no'\)$"):
        Settings.from_env({"LEDGER_DURABILITY": "no"})


@pytest.mark.parametrize("rate", ["-0.0005", "1", "2"])
def test_a_paper_fee_rate_is_from_0_up_to_1(rate: str) -> None:
    message = f"LEDGER_PAPER_FEE_RATE: must be from 0 up to 1, such as 0.0005 (got '{rate}')"
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"LEDGER_PAPER_FEE_RATE": rate})
    assert str(caught.value) == message
    assert Settings.from_env({"LEDGER_PAPER_FEE_RATE": "0"}).paper_fee_rate == 0


EVICTION_WARNING = (
    "redis may evict ledger keys: set maxmemory-policy noeviction (CONFIG SET maxmemory-policy noeviction, "
    "and in redis.conf) and give Redis enough memory"
)
NO_AOF_WARNING = (
    "redis keeps no append-only file, so a restart loses the ledger: set appendonly yes (CONFIG SET "
    "appendonly yes, and in redis.conf)"
)


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl", "noeviction"])
async def test_serve_warns_when_redis_may_evict_ledger_keys(redis: Any, policy: str) -> None:
    await redis.config_set("maxmemory-policy", policy)
    try:
        with structlog.testing.capture_logs() as logs:
            unsafe = await warn_about_redis(redis)
    finally:
        await redis.config_set("maxmemory-policy", "noeviction")
    if policy == "noeviction":
        assert (unsafe, logs) == ({}, [])
    else:
        assert unsafe == {"maxmemory_policy": policy}
        assert logs == [{"event": EVICTION_WARNING, "maxmemory_policy": policy, "log_level": "warning"}]


async def test_serve_warns_when_redis_keeps_no_aof(redis: Any) -> None:
    await redis.config_set("appendonly", "no")
    try:
        with structlog.testing.capture_logs() as logs:
            unsafe = await warn_about_redis(redis)
    finally:
        await redis.config_set("appendonly", "yes")
    assert unsafe == {"aof_enabled": "0"}
    assert logs == [{"event": NO_AOF_WARNING, "aof_enabled": "0", "log_level": "warning"}]


async def test_the_redis_warnings_read_every_cluster_node(redis_cluster: Any) -> None:
    """The test cluster runs without AOF; one of its nodes is given an evicting policy."""
    node = redis_cluster.get_primaries()[1]
    await redis_cluster.config_set("maxmemory-policy", "allkeys-random", target_nodes=node)
    try:
        with structlog.testing.capture_logs() as logs:
            unsafe = await warn_about_redis(redis_cluster)
    finally:
        await redis_cluster.config_set("maxmemory-policy", "noeviction", target_nodes=node)
    assert unsafe == {"maxmemory_policy": "allkeys-random", "aof_enabled": "0"}
    assert [entry["event"] for entry in logs] == [EVICTION_WARNING, NO_AOF_WARNING]
    assert await warn_about_redis(redis_cluster) == {"aof_enabled": "0"}
