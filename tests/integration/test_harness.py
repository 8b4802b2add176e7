"""The harness gives real servers, and each test starts from a clean state."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import psycopg
import redis as redis_lib
import redis.asyncio as aioredis

# Filled by test_isolation_first_writes_state, checked by test_isolation_second_sees_nothing.
_FIRST: dict[str, str] = {}

PROBE_KEY = "harness:isolation:probe"
PROBE_TABLE = "harness_isolation_probe"


async def test_redis_set_get_reaches_the_server(redis: aioredis.Redis, redis_url: str) -> None:
    assert await redis.set("harness:k", "0.1") is True
    assert await redis.get("harness:k") == "0.1"

    # A second, independent (synchronous) connection sees the value: it is on the server.
    other = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert other.get("harness:k") == "0.1"
    finally:
        other.close()

    info = await redis.info("server")
    assert isinstance(info["redis_version"], str)
    assert info["redis_version"].split(".")[0].isdigit()
    assert info["tcp_port"] == urlsplit(redis_url).port


async def test_postgres_table_is_visible_from_a_second_connection(
    pg: psycopg.AsyncConnection[Any], database_url: str
) -> None:
    await pg.execute("CREATE TABLE harness_visible (id INT PRIMARY KEY, note TEXT NOT NULL)")
    await pg.execute("INSERT INTO harness_visible VALUES (1, 'one'), (2, 'two')")

    async with await psycopg.AsyncConnection.connect(database_url) as other:
        cur = await other.execute("SELECT id, note FROM harness_visible ORDER BY id")
        assert await cur.fetchall() == [(1, "one"), (2, "two")]
        cur = await other.execute("SELECT current_database()")
        row = await cur.fetchone()
        assert row is not None
        assert row[0] == urlsplit(database_url).path.lstrip("/")


async def test_isolation_first_writes_state(
    redis: aioredis.Redis, pg: psycopg.AsyncConnection[Any], database_url: str
) -> None:
    await redis.set(PROBE_KEY, "leaked")
    await pg.execute(f"CREATE TABLE {PROBE_TABLE} (x INT)")
    _FIRST["database_url"] = database_url
    assert await redis.dbsize() == 1


async def test_isolation_second_sees_nothing(
    redis: aioredis.Redis, pg: psycopg.AsyncConnection[Any], database_url: str
) -> None:
    assert _FIRST, "test_isolation_first_writes_state must run first (run the whole module)"
    assert database_url != _FIRST["database_url"]

    assert await redis.exists(PROBE_KEY) == 0
    assert await redis.dbsize() == 0

    cur = await pg.execute("SELECT to_regclass(%s)::text", (PROBE_TABLE,))
    assert await cur.fetchone() == (None,)
    # ...but the fresh database does have the ledger schema from the template.
    cur = await pg.execute("SELECT to_regclass('positions')::text")
    assert await cur.fetchone() == ("positions",)

    # The first test's database has been dropped.
    first_db = urlsplit(_FIRST["database_url"]).path.lstrip("/")
    cur = await pg.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (first_db,))
    assert await cur.fetchone() == (0,)


async def test_cluster_has_three_masters_and_hash_tags_share_a_slot(
    redis_cluster: aioredis.RedisCluster,
) -> None:
    primaries = redis_cluster.get_primaries()
    assert len(primaries) == 3

    info = await redis_cluster.cluster_info()
    assert info["cluster_state"] == "ok"
    assert int(info["cluster_size"]) == 3
    assert int(info["cluster_slots_assigned"]) == 16384

    slot_a = await redis_cluster.cluster_keyslot("{0}:a")
    slot_b = await redis_cluster.cluster_keyslot("{0}:b")
    assert slot_a == slot_b == redis_cluster.keyslot("{0}")

    await redis_cluster.set("{0}:a", "1")
    await redis_cluster.set("{0}:b", "2")
    # A multi-key command across the two keys is only allowed because they share the slot.
    node = redis_cluster.get_node_from_key("{0}:a")
    assert await redis_cluster.execute_command("MGET", "{0}:a", "{0}:b", target_nodes=node) == [
        "1",
        "2",
    ]
    count = await redis_cluster.execute_command("CLUSTER COUNTKEYSINSLOT", slot_a, target_nodes=node)
    assert count == 2
