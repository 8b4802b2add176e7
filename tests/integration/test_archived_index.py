"""The index of archived outcomes (``ledger.store.archived``), on a plain Redis and on a Redis
Cluster: compaction moves outcomes from the outcomes hash into buckets that split as the index
grows, every bucket stays in Redis's compact encoding, every outcome is found where a client of
any generation looks for it, and a duplicate of an archived command is recognised by the append
step and by a malformed duplicate's dead letter."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.deadletter import Reply, write_dead_letter
from ledger.domain import wire
from ledger.store.archived import LOAD, ArchivedIndex, Generation, digest, fingerprint
from ledger.store.eventstore import Append, EventStore, outcome_marker
from ledger.store.keys import ShardKeys
from projections import compact
from projections.compact import compact_shard
from tests.log_helpers import archived_digest

KEYS = ShardKeys(0)
COMMANDS = 1500  # 38 buckets at LOAD 40: level 5 (32 buckets) and 6 split


def rejected(user: str, command_id: str, expected: str = "") -> Append:
    reply = wire.Reply(
        command_id=command_id, status="rejected", error=wire.ErrorInfo("UNKNOWN_ORDER", f"no order of {user}")
    )
    return Append(user, command_id, expected, f"t-{user}-{command_id}", reply)


async def _compacted(redis: Any, database_url: str) -> dict[str, str]:
    """COMMANDS rejections of as many users, compacted; their replies by outcome field."""
    store = EventStore(redis, 0)
    appends = [rejected(f"u{n}", f"c-{n}") for n in range(COMMANDS)]
    results = await store.append_many(appends)
    assert {r.status for r in results} == {"ok"}
    await asyncio.sleep(0.01)  # the rejections' recorded times are in the past
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        (outcomes, _orders, _positions) = await compact_shard(redis, conn, 0)
    assert (outcomes.entries, outcomes.eligible, outcomes.compacted) == (COMMANDS, COMMANDS, COMMANDS)
    return {f"{a.user_id}:{a.command_id}": r.reply for a, r in zip(appends, results, strict=True)}


async def _index_holds_every_outcome(redis: Any, database_url: str) -> None:
    replies = await _compacted(redis, database_url)

    assert await redis.hlen(KEYS.outcomes) == 0
    assert await redis.zcard(KEYS.eventless) == 0
    index = ArchivedIndex(KEYS.archived)
    assert await index.read(redis) == COMMANDS
    assert math.ceil(COMMANDS / LOAD) == 38
    assert index.generation == Generation(5, 6)
    sizes = [await redis.hlen(index.bucket_at(n)) for n in range(index.generation.buckets)]
    assert sum(sizes) == COMMANDS
    assert max(sizes) <= 128
    assert {await redis.object("encoding", index.bucket_at(n)) for n in range(38)} == {"listpack"}
    assert await redis.exists(index.bucket_at(38)) == 0
    for field, reply in replies.items():
        assert await archived_digest(redis, KEYS, field) == digest(reply.encode()).hex(), field

    await redis.delete(KEYS.reply("u7", "c-7"), KEYS.reply("u9", "c-9"))  # long expired
    # A store that never read the generation (0:0) is told it is stale and retries with it.
    fresh = EventStore(redis, 0)
    duplicate, new = await fresh.append_many([rejected("u7", "c-7"), rejected("u7", "c-new", expected="t-u7-c-7")])
    marker = outcome_marker(replies["u7:c-7"].encode())
    assert (duplicate.status, duplicate.reply) == ("archived", marker)
    assert new.status == "ok"
    assert fresh.index.generation == Generation(5, 6)
    assert await redis.hgetall(KEYS.waiting) == {"u7:c-7": marker}
    assert await redis.exists(KEYS.reply("u7", "c-7")) == 0  # answered from PostgreSQL, not here

    # A malformed duplicate of an archived command: its dead letter records it as waiting too.
    stream = KEYS.commands
    entry_id = await redis.xadd(stream, {"type": "place_order", "data": "{"})
    written = await write_dead_letter(
        redis,
        KEYS.dead,
        {"type": "place_order", "data": "{"},
        stream=stream,
        entry_id=entry_id,
        group="ledger-handler",
        code="INVALID_JSON",
        reason="bad",
        reply=Reply(
            KEYS.reply("u9", "c-9"),
            b'{"status": "rejected"}',
            60,
            KEYS.outcomes,
            "u9:c-9",
            ArchivedIndex(KEYS.archived),
        ),
    )
    assert written
    assert await redis.hget(KEYS.waiting, "u9:c-9") == outcome_marker(replies["u9:c-9"].encode())
    assert await redis.exists(KEYS.reply("u9", "c-9")) == 0


@pytest.mark.parametrize("chunk", [compact.ARCHIVE_CHUNK, 7])
async def test_the_index_holds_every_compacted_outcome_in_small_buckets(
    redis: Any, database_url: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also when a page's moves take many script calls (7 items a call: the last one short)."""
    monkeypatch.setattr(compact, "ARCHIVE_CHUNK", chunk)
    await _index_holds_every_outcome(redis, database_url)


async def test_on_redis_cluster_the_index_stays_on_the_shard_slot(redis_cluster: Any, database_url: str) -> None:
    await _index_holds_every_outcome(redis_cluster, database_url)


async def test_a_marker_left_in_the_outcomes_hash_before_the_index_is_moved_into_it(
    redis: Any, database_url: str
) -> None:
    """Compaction before the index replaced an outcome by a marker in the hash: a duplicate is
    still recognised by it, and the next pass moves it into the index as it is."""
    reply = b'{"command_id":"c-1","status":"accepted","events":[]}'
    marker = outcome_marker(reply)
    await redis.hset(KEYS.outcomes, "old:c-1", marker)
    store = EventStore(redis, 0)
    assert (await store.append(rejected("old", "c-1"))).status == "archived"

    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        (outcomes, _orders, _positions) = await compact_shard(redis, conn, 0)

    assert (outcomes.entries, outcomes.already, outcomes.eligible, outcomes.compacted) == (1, 1, 0, 0)
    assert await redis.hlen(KEYS.outcomes) == 0
    assert await archived_digest(redis, KEYS, "old:c-1") == digest(reply).hex()
    await redis.delete(KEYS.waiting)
    assert (await store.append(rejected("old", "c-1"))).reply == marker


async def test_growing_before_inserting_keeps_the_average_at_most_the_load(redis: Any) -> None:
    index = ArchivedIndex("t:{g}:archived")
    await redis.hset(index.meta, "count", "100")
    assert await index.grow(redis, extra=0, load=40) == 2  # 1 -> 3 buckets
    assert index.generation == Generation(1, 1)
    assert await index.grow(redis, extra=20, load=40) == 0  # 120 fields fit in 3 buckets of 40
    assert await index.grow(redis, extra=21, load=40) == 1
    assert index.generation == Generation(2, 0)
    assert await redis.hmget(index.meta, ["level", "split"]) == ["2", "0"]


def test_a_fingerprint_s_bucket_follows_the_generation() -> None:
    fp = (5).to_bytes(4, "big") + bytes(12)  # h = 5
    assert Generation(0, 0).bucket(fp) == 0
    assert Generation(2, 0).bucket(fp) == 1  # 5 mod 4
    assert Generation(2, 2).bucket(fp) == 5  # bucket 1 is split: 5 mod 8
    assert Generation(3, 0).bucket(fp) == 5
    four = (4).to_bytes(4, "big") + bytes(12)
    assert (Generation(2, 1).bucket(four), Generation(2, 0).bucket(four)) == (4, 0)
    assert len(fingerprint("alice:c-1")) == 16 and len(digest(b"{}")) == 10


# --------------------------------------------------------------------------- the model


_SHARDS = iter(range(100, 10_000))  # a shard of its own per example: no flush between them
_USERS = ("ann", "bob", "cyd")


_Step = tuple[str, int, list[tuple[str, str]]]  # "compact" or "append", the client, (user, command id)s


@st.composite
def _sessions(draw: st.DrawFn) -> list[_Step]:
    """Batches of (user, command id) appends, each from one of three clients (ids from a small
    pool, so they repeat), and compaction passes between them."""
    steps: list[_Step] = []
    for _ in range(draw(st.integers(4, 12))):
        if draw(st.booleans()):
            steps.append(("compact", 0, []))
        size = draw(st.integers(1, 120))
        appends = [(draw(st.sampled_from(_USERS)), f"c{draw(st.integers(0, 250))}") for _ in range(size)]
        steps.append(("append", draw(st.integers(0, 2)), appends))
    return steps


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(session=_sessions())
async def test_every_repeated_command_id_is_a_duplicate_whichever_client_and_generation(
    redis: Any, database_url: str, session: list[_Step]
) -> None:
    """Model: a command id seen before is a duplicate (answered from the hash, or recorded as
    waiting once compacted into the index), one never seen is appended; three clients, each with
    the generation it last saw, append while compaction splits the buckets between batches."""
    shard = next(_SHARDS)
    keys = ShardKeys(shard)
    clients = [EventStore(redis, shard) for _ in range(3)]
    tokens: dict[str, str] = {}
    seen: set[str] = set()
    compacted: set[str] = set()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for kind, client, appends in session:
            if kind == "compact":
                await asyncio.sleep(0.002)  # the rejections' recorded times are in the past
                await compact_shard(redis, conn, shard)
                compacted |= seen
                continue
            # One batch (one script call per 256 appends) from one client.
            batch: list[Append] = []
            expected: list[str] = []
            for user, command_id in appends:
                field = f"{user}:{command_id}"
                append = rejected(user, command_id, expected=tokens.get(user, ""))
                status = "archived" if field in compacted else "duplicate" if field in seen else "ok"
                if status == "ok":
                    tokens[user] = append.new_token
                    seen.add(field)
                batch.append(append)
                expected.append(status)
            results = await clients[client].append_many(batch)
            assert [r.status for r in results] == expected
    index = ArchivedIndex(keys.archived)
    assert await index.read(redis) == len(compacted)
    assert await redis.hlen(keys.outcomes) == len(seen - compacted)
