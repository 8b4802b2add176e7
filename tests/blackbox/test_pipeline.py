"""Issue 3: the event store and command pipeline on Redis Streams, and ``ledger serve``.

Black-box where CONTRACT §2-§5 speaks: commands are raw XADDs of hand-written JSON, replies are
read with BLPOP/LINDEX on ``ledger:{s}:reply:{user_id}:{command_id}``, events with XRANGE on
``ledger:{s}:events``, shards computed here with ``zlib.crc32``. The handler under test runs
in-process (``serve`` in a background task, or ``StreamConsumer`` + ``CommandHandler``) or as a
``ledger`` subprocess.

Tests taking ``ledger_redis`` run twice: on a plain Redis with 1 shard (2 where a test needs
several) and on a local 3-master Redis Cluster with 4 shards (marked ``cluster``); the runner
tests use it for a plain and a cluster client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from consumers.command_handler import GROUP, CommandHandler
from consumers.entries import Entry
from consumers.runner import ConsumerSettings, StreamConsumer
from ledger.store.eventstore import AppendResult, EventStore
from ledger.store.redis_conn import ShardCountMismatch, connect, ensure_shard_count
from tests.pipeline_helpers import (
    ENTRY_ID_RE,
    SYMBOL,
    UUID7,
    UUID_RE,
    all_events,
    assert_gapless,
    assert_no_duplicates,
    blpop_reply,
    check_envelope,
    commands_key,
    dead_key,
    events_key,
    events_per_command,
    fill_json,
    outcomes_key,
    peek_reply,
    place_order_json,
    read_events,
    reply_key,
    run_ledger,
    serve_processes_fixture,  # noqa: F401 - the fixture serve_processes
    serving,
    shard_of,
    start_serve,
    users_on_shard,
    wait_until,
)

REPLY_KEYS = ["command_id", "status", "error", "order_id", "position_id", "events"]


@dataclass
class LedgerRedis:
    kind: str  # "plain" or "cluster"
    url: str
    redis: Any  # the test's own client (decode_responses=True)
    shards: int
    home: Path

    async def raw_client(self) -> Any:
        """A client without decoding (for entries holding bytes that are not UTF-8)."""
        if self.kind == "cluster":
            return aioredis.RedisCluster.from_url(self.url)
        return aioredis.Redis.from_url(self.url)


@pytest.fixture(
    params=[
        pytest.param("plain", marks=pytest.mark.integration),
        pytest.param("cluster", marks=[pytest.mark.integration, pytest.mark.cluster]),
    ]
)
def ledger_redis(request: pytest.FixtureRequest, tmp_path: Path) -> LedgerRedis:
    """A flushed Redis and the shard count to use on it: plain with 1, cluster with 4."""
    if request.param == "plain":
        url = request.getfixturevalue("redis_url")
        return LedgerRedis("plain", url, request.getfixturevalue("redis"), 1, tmp_path / "home")
    url = request.getfixturevalue("redis_cluster_url")
    return LedgerRedis("cluster", url, request.getfixturevalue("redis_cluster"), 4, tmp_path / "home")


# --------------------------------------------------------------------------- 1. raw publish


async def test_raw_xadd_command_gets_contract_reply_and_events(ledger_redis: LedgerRedis) -> None:
    r, shards = ledger_redis.redis, ledger_redis.shards
    user = "strat-7@desk_1.x"
    shard = shard_of(user, shards)
    commands = f"ledger:{{{shard}}}:commands"
    if shards == 1:
        assert commands == "ledger:{0}:commands"
    async with serving(ledger_redis.url, shards, ledger_redis.home):
        await r.xadd(
            commands,
            {
                "type": "place_order",
                "data": '{"command_id": "cmd:0001", "user_id": "strat-7@desk_1.x", "exchange": "okx",'
                ' "symbol": "BTC-USDT-SWAP", "side": "buy", "order_type": "limit",'
                ' "quantity": "0.50", "price": "27000.1", "client_order_id": "my-1"}',
            },
        )
        raw, reply = await blpop_reply(r, f"ledger:{{{shard}}}:reply:strat-7@desk_1.x:cmd:0001")
        assert await r.exists(f"ledger:{{{shard}}}:reply:strat-7@desk_1.x:cmd:0001") == 0  # one element

        assert sorted(reply) == sorted(REPLY_KEYS)
        assert reply["command_id"] == "cmd:0001"
        assert reply["status"] == "accepted"
        assert reply["error"] is None
        assert UUID_RE.fullmatch(reply["order_id"])
        assert reply["position_id"] is None
        log = await r.xrange(events_key(shard), "-", "+")
        assert [{"type": f["type"], "id": i} for i, f in log] == reply["events"]
        assert [e["type"] for e in reply["events"]] == ["OrderPlaced"]

        (placed,) = await read_events(r, shard)
        check_envelope(placed, command_id="cmd:0001", user_id=user, version=1)
        assert placed.data["stream"] == reply["order_id"]
        assert placed.data["quantity"] == "0.50"  # a string, trailing zero kept
        assert placed.data["price"] == "27000.1"
        assert placed.data["side"] == "buy"
        assert placed.data["client_order_id"] == "my-1"

        # A fill: one event on the order (version 2), one opening a position (version 1).
        order_id = reply["order_id"]
        await r.xadd(
            commands,
            {
                "type": "record_fill",
                "data": '{"command_id": "cmd:0002", "user_id": "strat-7@desk_1.x", "order_id": "'
                + order_id
                + '", "fill_id": "T-1", "quantity": "0.5", "price": "27000.1", "fee": "0.5"}',
            },
        )
        key = f"ledger:{{{shard}}}:reply:{user}:cmd:0002"
        reply2 = await peek_reply(r, key)
        assert await r.llen(key) == 1
        assert 60 <= await r.ttl(key) <= 3600  # expires after 60 s or more
        assert sorted(reply2) == sorted(REPLY_KEYS)
        assert (reply2["command_id"], reply2["status"], reply2["error"]) == ("cmd:0002", "accepted", None)
        assert reply2["order_id"] == order_id
        assert UUID_RE.fullmatch(reply2["position_id"])
        assert [e["type"] for e in reply2["events"]] == ["OrderFilled", "PositionOpened"]

    events = await read_events(r, shard)
    assert [{"type": e.type, "id": e.entry_id} for e in events[1:]] == reply2["events"]
    filled, opened = events[1:]
    check_envelope(filled, command_id="cmd:0002", user_id=user, version=2)
    check_envelope(opened, command_id="cmd:0002", user_id=user, version=1)
    assert (filled.data["stream"], opened.data["stream"]) == (order_id, reply2["position_id"])
    assert (filled.data["fill_id"], filled.data["filled_qty"], filled.data["status"]) == ("T-1", "0.5", "filled")
    assert (opened.data["side"], opened.data["size"], opened.data["entry_price"]) == ("long", "0.5", "27000.1")
    assert len({e.data["event_id"] for e in events}) == 3
    # Nothing went anywhere else.
    for other in range(shards):
        if other != shard:
            assert await r.xlen(events_key(other)) == 0
    assert await r.xlen(dead_key(shard)) == 0


# --------------------------------------------------------------------------- 2. deduplication


async def test_same_command_id_twice_appends_once_and_replays_the_outcome(ledger_redis: LedgerRedis) -> None:
    r, shards = ledger_redis.redis, ledger_redis.shards
    user, other_user = users_on_shard(0, shards, 2, "dup")
    events, outcomes = events_key(0), outcomes_key(0)
    async with serving(ledger_redis.url, shards, ledger_redis.home):
        place = {"type": "place_order", "data": place_order_json(user, "dup-1", quantity="2")}
        await r.xadd(commands_key(0), place)
        raw1, first = await blpop_reply(r, reply_key(0, user, "dup-1"))
        assert first["status"] == "accepted"
        assert await r.xlen(events) == 1

        await r.xadd(commands_key(0), place)
        raw2, second = await blpop_reply(r, reply_key(0, user, "dup-1"))
        assert raw2 == raw1 and second == first
        assert await r.xlen(events) == 1

        # The same command id with other content is still the first command.
        changed = {"type": "place_order", "data": place_order_json(user, "dup-1", quantity="9", price="1")}
        await r.xadd(commands_key(0), changed)
        raw3, _ = await blpop_reply(r, reply_key(0, user, "dup-1"))
        assert raw3 == raw1

        # A fill (two events) twice; the second time after the reply expired.
        order_id = first["order_id"]
        fill = {"type": "record_fill", "data": fill_json(user, "dup-2", order_id, "F-1", quantity="1")}
        await r.xadd(commands_key(0), fill)
        fill_reply = await peek_reply(r, reply_key(0, user, "dup-2"))
        raw_fill = await r.lindex(reply_key(0, user, "dup-2"), 0)
        assert [e["type"] for e in fill_reply["events"]] == ["OrderFilled", "PositionOpened"]
        assert await r.xlen(events) == 3
        await r.pexpire(reply_key(0, user, "dup-2"), 1)
        await wait_until(lambda: _gone(r, reply_key(0, user, "dup-2")), what="the reply to expire")
        await r.xadd(commands_key(0), fill)
        raw_again, _ = await blpop_reply(r, reply_key(0, user, "dup-2"))
        assert raw_again == raw_fill
        assert await r.xlen(events) == 3

        # A rejection is an outcome too: replayed, not decided again.
        cancel = json.dumps({"command_id": "dup-3", "user_id": user, "order_id": str(uuid.uuid4())})
        await r.xadd(commands_key(0), {"type": "cancel_order", "data": cancel})
        raw_rejected, rejected = await blpop_reply(r, reply_key(0, user, "dup-3"))
        assert (rejected["status"], rejected["error"]["code"]) == ("rejected", "UNKNOWN_ORDER")
        await r.delete(reply_key(0, user, "dup-3"))
        await r.xadd(commands_key(0), {"type": "cancel_order", "data": cancel})
        assert (await blpop_reply(r, reply_key(0, user, "dup-3")))[0] == raw_rejected

        # Command ids are per user: another user's "dup-1" is a command of its own.
        await r.xadd(commands_key(0), {"type": "place_order", "data": place_order_json(other_user, "dup-1")})
        _, theirs = await blpop_reply(r, reply_key(0, other_user, "dup-1"))
        assert theirs["status"] == "accepted" and theirs["order_id"] != order_id
        assert await r.xlen(events) == 4

    log = await read_events(r, 0)
    assert events_per_command(log) == Counter({(user, "dup-1"): 1, (user, "dup-2"): 2, (other_user, "dup-1"): 1})
    assert_gapless(log)
    assert await r.hlen(outcomes) == 4  # dup-1, dup-2, dup-3 of user; dup-1 of other_user
    assert json.loads(await r.hget(outcomes, f"{user}:dup-1")) == first
    assert await r.xlen(dead_key(0)) == 0


async def _gone(r: Any, key: str) -> bool:
    return await r.exists(key) == 0


# --------------------------------------------------------------------------- 3. concurrency


class CountingStore(EventStore):
    """An EventStore that counts the appends refused for a moved concurrency token."""

    def __init__(self, *args: Any, stats: Counter[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stats = stats

    async def append_many(self, appends: Any) -> list[AppendResult]:
        results = await super().append_many(appends)
        self.stats.update(r.status for r in results)
        return results


async def test_two_handlers_on_one_shard_keep_versions_gapless_under_load(ledger_redis: LedgerRedis) -> None:
    r, shards = ledger_redis.redis, ledger_redis.shards
    shard = shards - 1
    users = users_on_shard(shard, shards, 30, "load")
    orders_per_user, fills_per_order = 10, 3
    stats: Counter[str] = Counter()
    clients = [await connect(ledger_redis.url) for _ in range(2)]
    consumers = [
        StreamConsumer(
            client,
            stream=commands_key(shard),
            group=GROUP,
            handler=CommandHandler(CountingStore(client, shard, stats=stats), shards).handle,
            dead_stream=dead_key(shard),
            name=f"handler-{n}",
            settings=ConsumerSettings(batch_size=8, block_ms=100, claim_idle_ms=60_000),
        )
        for n, client in enumerate(clients)
    ]
    await consumers[0].ensure_group()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop)) for c in consumers]
    commands: list[tuple[str, str, str]] = []  # (user, command_id, kind)
    order_ids: dict[str, list[str]] = {u: [] for u in users}

    async def strategy(user: str) -> None:
        for k in range(orders_per_user):
            cid = f"{user}:place:{k}"
            commands.append((user, cid, "place"))
            await r.xadd(commands_key(shard), {"type": "place_order", "data": place_order_json(user, cid)})
            reply = await peek_reply(r, reply_key(shard, user, cid), timeout=30)
            assert reply["status"] == "accepted", reply
            order_ids[user].append(reply["order_id"])
            for f in range(fills_per_order):
                cid = f"{user}:fill:{k}:{f}"
                commands.append((user, cid, "fill"))
                data = fill_json(user, cid, reply["order_id"], f"T{k}.{f}", quantity="0.25")
                await r.xadd(commands_key(shard), {"type": "record_fill", "data": data})
            await asyncio.sleep(random.random() / 100)

    try:
        await asyncio.gather(*(strategy(u) for u in users))
        total = len(users) * orders_per_user * (1 + fills_per_order)
        assert len(commands) == total == 1200
        await wait_until(lambda: _hlen_is(r, outcomes_key(shard), total), timeout=60, what="all outcomes")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for client in clients:
            await client.aclose()

    # Every command has exactly one reply, and it is an acceptance.
    for user, cid, kind in commands:
        key = reply_key(shard, user, cid)
        assert await r.llen(key) == 1, key
        reply = json.loads(await r.lindex(key, 0))
        assert (reply["command_id"], reply["status"]) == (cid, "accepted"), reply
        assert len(reply["events"]) == (1 if kind == "place" else 2)
    log = await read_events(r, shard)
    assert len(log) == 300 + 900 * 2
    entry_ids = {e.entry_id: e.type for e in log}
    assert_no_duplicates(log)
    versions = assert_gapless(log)
    assert events_per_command(log) == Counter({(u, c): (1 if kind == "place" else 2) for u, c, kind in commands})
    for user in users:
        for order_id in order_ids[user]:
            assert versions[order_id] == 1 + fills_per_order
    positions = {e.data["stream"] for e in log if e.type.startswith("Position")}
    assert len(positions) == len(users)  # one long per user, opened once, increased after
    for position_id in positions:
        assert versions[position_id] == orders_per_user * fills_per_order
        last = [e for e in log if e.data["stream"] == position_id][-1]
        assert Decimal(last.data["size"]) == Decimal("7.5")
        assert Decimal(last.data["entry_price"]) == 100
        assert Decimal(last.data["fees"]) == Decimal("0.30")
    for user, cid, _kind in commands:
        reply = json.loads(await r.lindex(reply_key(shard, user, cid), 0))
        assert all(entry_ids.get(e["id"]) == e["type"] for e in reply["events"])
    groups = {g["name"]: g for g in await r.xinfo_groups(commands_key(shard))}
    assert groups[GROUP]["pending"] == 0
    assert await r.xlen(dead_key(shard)) == 0
    # Both handlers did work, and appends did race (refused on the user's token, then redone).
    assert stats["ok"] == total
    assert stats["conflict"] > 0, dict(stats)  # typically > 100 refused appends, all redone


async def _hlen_is(r: Any, key: str, n: int) -> bool:
    return await r.hlen(key) >= n


@pytest.mark.parametrize("pause", ["before_append", "between_reads"])
async def test_conflicting_append_is_decided_again_on_fresh_state(ledger_redis: LedgerRedis, pause: str) -> None:
    """Handler A handles a fill; while it is paused (after reading the user's token or state,
    or just before appending), handler B appends another fill of the same user. A's append is
    refused on the user's token and A decides again on the state B left: no version is lost or
    written twice."""
    r, shards = ledger_redis.redis, ledger_redis.shards
    (user,) = users_on_shard(0, shards, 1, "race")
    a_waiting, b_done = asyncio.Event(), asyncio.Event()
    stats_a: Counter[str] = Counter()

    class SlowStore(CountingStore):
        armed = False

        async def _pause(self, point: str) -> None:
            if self.armed and point == pause:
                self.armed = False
                a_waiting.set()
                await b_done.wait()

        async def load(self, book: Any, missing: Any, tokens_of: Any = ()) -> dict[str, str]:
            tokens = await super().load(book, missing, tokens_of)
            await self._pause("between_reads")
            return tokens

        async def append_many(self, appends: Any) -> list[AppendResult]:
            await self._pause("before_append")
            return await super().append_many(appends)

    class FastStore(EventStore):
        async def append_many(self, appends: Any) -> list[AppendResult]:
            results = await super().append_many(appends)
            b_done.set()
            return results

    client_a, client_b = await connect(ledger_redis.url), await connect(ledger_redis.url)
    try:
        settings = ConsumerSettings(batch_size=1, claim_idle_ms=60_000)

        def consumer(client: Any, store: EventStore, name: str) -> StreamConsumer:
            return StreamConsumer(
                client,
                stream=commands_key(0),
                group=GROUP,
                handler=CommandHandler(store, shards).handle,
                dead_stream=dead_key(0),
                name=name,
                settings=settings,
            )

        slow_store = SlowStore(client_a, 0, stats=stats_a)
        a = consumer(client_a, slow_store, "a")
        b = consumer(client_b, FastStore(client_b, 0), "b")
        # Placed through B: A knows nothing of the user and reads its state; B decides f2 from
        # the memory of its own append.
        await r.xadd(commands_key(0), {"type": "place_order", "data": place_order_json(user, "p1")})
        assert await b.burst() == 1
        b_done.clear()  # set by that append: A waits for B's next one
        order_id = (await peek_reply(r, reply_key(0, user, "p1")))["order_id"]
        slow_store.armed = True
        for n in (1, 2):
            data = fill_json(user, f"f{n}", order_id, f"T-{n}", quantity="0.25", price=str(100 * n))
            await r.xadd(commands_key(0), {"type": "record_fill", "data": data})
        stats_a.clear()
        task_a = asyncio.create_task(a.step(block=False))  # reads f1, decides, waits before appending
        await asyncio.wait_for(a_waiting.wait(), 5)
        assert await b.step(block=False) == 1  # reads f2 and appends it
        assert await asyncio.wait_for(task_a, 5) == 1
        assert await a.burst() == await b.burst() == 0  # each acknowledges what it handled
    finally:
        await client_a.aclose()
        await client_b.aclose()

    assert stats_a["conflict"] == 1 and stats_a["ok"] == 1
    f1 = await peek_reply(r, reply_key(0, user, "f1"))
    f2 = await peek_reply(r, reply_key(0, user, "f2"))
    assert f1["status"] == f2["status"] == "accepted"
    log = await read_events(r, 0)
    assert_no_duplicates(log)
    versions = assert_gapless(log)
    assert versions[order_id] == 3
    assert versions[f1["position_id"]] == 2 and f1["position_id"] == f2["position_id"]
    # f2 was appended first: f1 was decided again on top of it.
    order_events = [e for e in log if e.data["stream"] == order_id]
    assert [(e.data["command_id"], e.data["filled_qty"]) for e in order_events[1:]] == [("f2", "0.25"), ("f1", "0.50")]
    position_events = [e for e in log if e.data["stream"] == f1["position_id"]]
    assert [e.type for e in position_events] == ["PositionOpened", "PositionIncreased"]
    assert Decimal(position_events[-1].data["entry_price"]) == 150
    assert (await r.xinfo_groups(commands_key(0)))[0]["pending"] == 0


# --------------------------------------------------------------------------- 5. malformed input


@dataclass
class Case:
    name: str
    fields: dict[str, Any]
    code: str
    reply_to: tuple[str, str] | None  # (user_id, command_id) of the rejection reply, if any
    dead: bool
    hint: str = ""
    shard: int | None = None  # where it is published (default: the user's shard, else 0)
    entry_id: str = ""


async def test_every_malformed_command_is_answered_and_the_stream_moves_on(ledger_redis: LedgerRedis) -> None:
    r, url = ledger_redis.redis, ledger_redis.url
    shards = max(2, ledger_redis.shards)  # WRONG_SHARD needs several shards
    alice, bob = users_on_shard(0, shards, 2, "mal")
    (carol,) = users_on_shard(1, shards, 1, "mal-other")
    raw = await ledger_redis.raw_client()

    def data(user: str, cid: str, **fields: Any) -> str:
        return json.dumps({"command_id": cid, "user_id": user, **fields})

    order = {"exchange": "okx", "symbol": SYMBOL, "side": "buy", "order_type": "limit", "price": "100"}

    try:
        async with serving(url, shards, ledger_redis.home):
            # Setup: alice's order o1 filled (final), alice's order o2 pending.
            await r.xadd(commands_key(0), {"type": "place_order", "data": data(alice, "s1", quantity="1", **order)})
            o1 = (await peek_reply(r, reply_key(0, alice, "s1")))["order_id"]
            await r.xadd(commands_key(0), {"type": "place_order", "data": data(alice, "s2", quantity="1", **order)})
            o2 = (await peek_reply(r, reply_key(0, alice, "s2")))["order_id"]
            fill = {"order_id": o1, "fill_id": "F-1", "quantity": "1", "price": "100"}
            await r.xadd(commands_key(0), {"type": "record_fill", "data": data(alice, "s3", **fill)})
            assert (await peek_reply(r, reply_key(0, alice, "s3")))["status"] == "accepted"
            assert await r.xlen(events_key(0)) == 4

            cases = [
                Case(
                    "bad JSON",
                    {"type": "place_order", "data": '{"command_id": "m1", "user_id": "mal-0",'},
                    "INVALID_JSON",
                    None,
                    True,
                    "JSON",
                ),
                Case(
                    "not UTF-8",
                    {"type": "place_order", "data": b'{"command_id": "m1b", "user_id": "\xff"}'},
                    "INVALID_JSON",
                    None,
                    True,
                ),
                Case(
                    "data is an array", {"type": "place_order", "data": "[1, 2]"}, "INVALID_JSON", None, True, "object"
                ),
                Case(
                    "data is a string",
                    {"type": "cancel_order", "data": '"cancel everything"'},
                    "INVALID_JSON",
                    None,
                    True,
                    "object",
                ),
                Case(
                    "unknown type",
                    {"type": "teleport_order", "data": data(alice, "m2", **order, quantity="1")},
                    "UNKNOWN_TYPE",
                    (alice, "m2"),
                    True,
                    "teleport_order",
                ),
                Case(
                    "missing type",
                    {"data": data(alice, "m3", **order, quantity="1")},
                    "MISSING_FIELD",
                    (alice, "m3"),
                    True,
                    "type",
                ),
                Case("missing data", {"type": "place_order"}, "MISSING_FIELD", None, True, "data"),
                Case(
                    "missing required field",
                    {"type": "place_order", "data": data(alice, "m4", **order)},
                    "MISSING_FIELD",
                    (alice, "m4"),
                    True,
                    "quantity",
                ),
                Case(
                    "decimal as a JSON number",
                    {"type": "place_order", "data": data(alice, "m5", **{**order, "quantity": 0.1})},
                    "INVALID_FIELD",
                    (alice, "m5"),
                    True,
                    "string",
                ),
                Case(
                    "user_id with a space",
                    {"type": "place_order", "data": data("mal 0", "m6", **order, quantity="1")},
                    "INVALID_FIELD",
                    None,
                    True,
                    "user_id",
                ),
                Case(
                    "user_id of 65 characters",
                    {"type": "place_order", "data": data("u" * 65, "m7", **order, quantity="1")},
                    "INVALID_FIELD",
                    None,
                    True,
                    "user_id",
                ),
                Case(
                    "command_id with a brace",
                    {"type": "place_order", "data": data(alice, "m{8}", **order, quantity="1")},
                    "INVALID_FIELD",
                    None,
                    True,
                    "command_id",
                ),
                Case(
                    "symbol with a bad character",
                    {"type": "place_order", "data": data(alice, "m9", **{**order, "symbol": "BTC USDT"}, quantity="1")},
                    "INVALID_FIELD",
                    (alice, "m9"),
                    True,
                    "symbol",
                ),
                Case(
                    "unknown exchange",
                    {
                        "type": "place_order",
                        "data": data(alice, "m10", **{**order, "exchange": "kraken"}, quantity="1"),
                    },
                    "INVALID_FIELD",
                    (alice, "m10"),
                    True,
                    "exchange",
                ),
                Case(
                    "unknown field",
                    {"type": "place_order", "data": data(alice, "m11", **order, quantity="1", colour="red")},
                    "INVALID_FIELD",
                    (alice, "m11"),
                    True,
                    "colour",
                ),
                Case(
                    "decimal with an exponent",
                    {"type": "place_order", "data": data(alice, "m12", **order, quantity="1E+1")},
                    "INVALID_FIELD",
                    (alice, "m12"),
                    True,
                    "quantity",
                ),
                Case(
                    "unknown order id",
                    {"type": "cancel_order", "data": data(alice, "m13", order_id=str(uuid.uuid4()))},
                    "UNKNOWN_ORDER",
                    (alice, "m13"),
                    False,
                ),
                Case(
                    "another user's order id",
                    {"type": "cancel_order", "data": data(bob, "m14", order_id=o2)},
                    "UNKNOWN_ORDER",
                    (bob, "m14"),
                    False,
                    o2,
                ),
                Case(
                    "another user's order id, filled",
                    {
                        "type": "record_fill",
                        "data": data(bob, "m15", order_id=o2, fill_id="X", quantity="1", price="1"),
                    },
                    "UNKNOWN_ORDER",
                    (bob, "m15"),
                    False,
                ),
                Case(
                    "wrong shard",
                    {"type": "place_order", "data": data(carol, "m16", **order, quantity="1")},
                    "WRONG_SHARD",
                    (carol, "m16"),
                    True,
                    "ledger:{1}:commands",
                    shard=0,
                ),
                Case(
                    "duplicate fill_id",
                    {"type": "record_fill", "data": data(alice, "m17", **{**fill, "quantity": "0.5"})},
                    "DUPLICATE_FILL",
                    (alice, "m17"),
                    False,
                    "F-1",
                ),
                Case(
                    "impossible transition",
                    {"type": "cancel_order", "data": data(alice, "m18", order_id=o1)},
                    "INVALID_TRANSITION",
                    (alice, "m18"),
                    False,
                    "filled",
                ),
                Case(
                    "impossible transition (accept a filled order)",
                    {"type": "order_accepted", "data": data(alice, "m19", order_id=o1, exchange_order_id="E1")},
                    "INVALID_TRANSITION",
                    (alice, "m19"),
                    False,
                ),
                Case(
                    "negative quantity",
                    {"type": "place_order", "data": data(alice, "m20", **order, quantity="-1")},
                    "INVALID_COMMAND",
                    (alice, "m20"),
                    False,
                    "quantity",
                ),
            ]
            for case in cases:
                target = (
                    case.shard
                    if case.shard is not None
                    else (shard_of(case.reply_to[0], shards) if case.reply_to else 0)
                )
                case.shard = target
                case.entry_id = _s(await raw.xadd(commands_key(target), case.fields))
            good = data(bob, "after", **order, quantity="1")
            await r.xadd(commands_key(0), {"type": "place_order", "data": good})
            good_reply = await peek_reply(r, reply_key(0, bob, "after"))
            assert good_reply["status"] == "accepted" and good_reply["error"] is None
            expected_dead = sum(c.dead for c in cases)

            async def all_dead() -> bool:
                return await r.xlen(dead_key(0)) >= expected_dead

            await wait_until(all_dead, what="the dead letters")

        dead_entries = {
            _s(f[b"dead_entry_id"]): {_s(k): v for k, v in f.items()} for _i, f in await raw.xrange(dead_key(0))
        }
        for case in cases:
            entry_id = case.entry_id
            label = f"{case.name}: "
            if case.reply_to is not None:
                user, cid = case.reply_to
                reply = await peek_reply(r, reply_key(case.shard, user, cid), timeout=2)
                assert sorted(reply) == sorted(REPLY_KEYS), label
                assert (reply["command_id"], reply["status"], reply["events"]) == (cid, "rejected", []), label
                assert reply["error"]["code"] == case.code, label + str(reply)
                assert case.hint in reply["error"]["message"], label + reply["error"]["message"]
            dead = dead_entries.pop(entry_id, None)
            if not case.dead:
                assert dead is None, label + str(dead)
                continue
            assert dead is not None, label + "no dead letter"
            original = {k: v.encode() if isinstance(v, str) else v for k, v in case.fields.items()}
            assert {k: dead[k] for k in original} == original, label  # the original fields, byte for byte
            assert _s(dead["dead_code"]) == case.code, label + str(dead)
            assert case.hint in _s(dead["dead_reason"]), label + str(dead)
            assert _s(dead["dead_stream"]) == commands_key(0), label
        assert dead_entries == {}
        # No reply was written under an invalid name, and no bad command left an event.
        assert await r.exists(reply_key(0, alice, "m1")) == 0
        log = await all_events(r, shards)
        assert {e.data["command_id"] for e in log} == {"s1", "s2", "s3", "after"}
        assert_gapless(log)
        assert await r.hlen(outcomes_key(0)) == 3 + 7 + 1  # setup, decider rejections, good one
        for shard in range(shards):
            groups = await r.xinfo_groups(commands_key(shard)) if await r.exists(commands_key(shard)) else []
            assert all(g["pending"] == 0 and g["lag"] == 0 for g in groups)
    finally:
        await raw.aclose()


def _s(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- 6. shards


async def test_four_shards_route_by_crc32_and_record_the_count(redis: Any, redis_url: str, tmp_path: Path) -> None:
    users = [f"shard-user-{n}" for n in range(12)]
    per_shard = Counter(shard_of(u, 4) for u in users)
    assert len(per_shard) == 4  # every shard gets some
    async with serving(redis_url, 4, tmp_path / "home"):
        for user in users:
            shard = shard_of(user, 4)
            await r_xadd(redis, shard, "place_order", place_order_json(user, "c1"))
        for user in users:
            reply = await peek_reply(redis, reply_key(shard_of(user, 4), user, "c1"))
            assert reply["status"] == "accepted"
    assert await redis.hgetall("ledger:meta") == {"shards": "4"}
    for shard in range(4):
        log = await read_events(redis, shard)
        assert sorted(e.data["user_id"] for e in log) == sorted(u for u in users if shard_of(u, 4) == shard)
        assert await redis.xlen(commands_key(shard)) == per_shard[shard]

    # Another count is refused, naming the recorded one.
    with pytest.raises(ShardCountMismatch, match="4 shards"):
        await ensure_shard_count(redis, 2)
    refused = run_ledger(redis_url, "serve", "--role", "handler", LEDGER_SHARDS="2", timeout=30)
    assert refused.returncode != 0
    assert "4 shards" in refused.stderr and "LEDGER_SHARDS=4" in refused.stderr
    assert await redis.hget("ledger:meta", "shards") == "4"

    status = run_ledger(redis_url, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["shards"] == 4
    rows = {(row["shard"], row["stream"], row.get("group")): row for row in report["streams"]}
    for shard in range(4):
        commands = rows[(shard, "commands", GROUP)]
        assert (commands["length"], commands["pending"], commands["lag"]) == (per_shard[shard], 0, 0)
        assert commands["consumers"] >= 1
        assert rows[(shard, "events", None)]["length"] == per_shard[shard]
        assert rows[(shard, "dead", None)]["length"] == 0
    assert {row["shard"] for row in report["streams"]} == {0, 1, 2, 3}


async def r_xadd(redis: Any, shard: int, type_: str, data: str) -> str:
    return str(await redis.xadd(f"ledger:{{{shard}}}:commands", {"type": type_, "data": data}))


async def test_status_reports_pending_and_lag(redis: Any, redis_url: str, tmp_path: Path) -> None:
    """Entries nobody has read are lag; entries read and not acknowledged are pending."""
    await ensure_shard_count(redis, 1)
    await redis.xgroup_create(commands_key(0), GROUP, id="0", mkstream=True)
    for n in range(5):
        await r_xadd(redis, 0, "place_order", place_order_json("st", f"c{n}"))
    await redis.xreadgroup(GROUP, "someone", {commands_key(0): ">"}, count=2)
    result = run_ledger(redis_url, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["shards"] == 1
    (commands,) = [row for row in report["streams"] if row["stream"] == "commands"]
    assert (commands["length"], commands["group"], commands["consumers"]) == (5, GROUP, 1)
    assert (commands["pending"], commands["lag"]) == (2, 3)
    text = run_ledger(redis_url, "status")
    assert text.returncode == 0 and "shards: 1" in text.stdout and GROUP in text.stdout


# --------------------------------------------------------------------------- 7. the runner


async def test_runner_dead_letters_an_entry_after_max_deliveries_and_moves_on(ledger_redis: LedgerRedis) -> None:
    redis = ledger_redis.redis
    stream, dead, group = "t:{r}:in", "t:{r}:dead", "g"
    attempts: Counter[str] = Counter()
    handled: list[str] = []

    async def handler(entries: list[Entry]) -> None:
        for entry in entries:
            if entry.fields["kind"] == "poison":
                attempts[entry.id] += 1
                raise ValueError(f"poisoned, attempt {attempts[entry.id]}")
        handled.extend(e.fields["n"] for e in entries)

    consumer = StreamConsumer(
        redis,
        stream=stream,
        group=group,
        handler=handler,
        dead_stream=dead,
        name="only",
        settings=ConsumerSettings(max_deliveries=2, claim_idle_ms=200, block_ms=50),
    )
    await consumer.ensure_group()
    await redis.xadd(stream, {"kind": "ok", "n": "1"})
    poison = await redis.xadd(stream, {"kind": "poison", "n": "p", "note": "é"})
    await redis.xadd(stream, {"kind": "ok", "n": "2"})
    await consumer.burst()
    await redis.xadd(stream, {"kind": "ok", "n": "3"})
    await consumer.burst()

    assert handled == ["1", "2", "3"]
    ((_, letter),) = await redis.xrange(dead)
    assert {k: letter[k] for k in ("kind", "n", "note")} == {"kind": "poison", "n": "p", "note": "é"}
    assert letter["dead_code"] == "DELIVERY_LIMIT"
    assert letter["dead_reason"].endswith(f"last error: ValueError('poisoned, attempt {attempts[poison]}')")
    assert (letter["dead_entry_id"], letter["dead_stream"], letter["dead_group"]) == (poison, stream, group)
    # It was tried on max_deliveries deliveries (once or twice each: in its batch, then alone), then never again.
    assert 2 <= attempts[poison] <= 4
    before = attempts[poison]
    await redis.xadd(stream, {"kind": "ok", "n": "4"})
    await consumer.burst()
    assert attempts[poison] == before and handled[-1] == "4"
    assert (await redis.xpending(stream, group))["pending"] == 0


async def test_consumer_takes_over_pending_entries_of_a_dead_consumer(ledger_redis: LedgerRedis) -> None:
    redis = ledger_redis.redis
    stream, group, claim_idle_ms = "t:{c}:in", "g", 300
    handled: dict[str, float] = {}

    async def hang(entries: list[Entry]) -> None:
        await asyncio.Event().wait()

    async def record(entries: list[Entry]) -> None:
        for entry in entries:
            handled[entry.fields["n"]] = time.monotonic()

    def consumer(name: str, handler: Any) -> StreamConsumer:
        settings = ConsumerSettings(claim_idle_ms=claim_idle_ms, block_ms=50, batch_size=10)
        return StreamConsumer(
            redis, stream=stream, group=group, handler=handler, dead_stream="t:{c}:dead", name=name, settings=settings
        )

    doomed = consumer("doomed", hang)
    await doomed.ensure_group()
    for n in range(5):
        await redis.xadd(stream, {"n": str(n)})
    stop = asyncio.Event()
    dying = asyncio.create_task(doomed.run(stop))
    await wait_until(lambda: _pending_of(redis, stream, group, "doomed", 5), what="the doomed consumer's read")
    dying.cancel()  # it dies holding 5 entries
    with contextlib.suppress(asyncio.CancelledError):
        await dying
    died = time.monotonic()

    heir = consumer("heir", record)
    task = asyncio.create_task(heir.run(stop))
    try:
        await wait_until(lambda: _true(len(handled) == 5), timeout=5, what="the takeover")
    finally:
        stop.set()
        await task
    taken_after = max(handled.values()) - died
    assert sorted(handled) == ["0", "1", "2", "3", "4"]
    assert 0.2 <= taken_after < claim_idle_ms / 1000 + 1.0  # not before the entries were idle, soon after
    assert (await redis.xpending(stream, group))["pending"] == 0
    assert await redis.xlen("t:{c}:dead") == 0


async def _pending_of(redis: Any, stream: str, group: str, name: str, n: int) -> bool:
    for row in await redis.xinfo_consumers(stream, group):
        if row["name"] == name:
            return int(row["pending"]) == n
    return False


async def _true(value: bool) -> bool:
    return value


# --------------------------------------------------------------------------- 9. the CLI


async def test_submit_and_status_against_a_running_serve(
    redis: Any, redis_url: str, tmp_path: Path, serve_processes: list[Any]
) -> None:
    serve = start_serve(redis_url, tmp_path)
    serve_processes.append(serve)
    order = {
        "command_id": "cli-1",
        "user_id": "cli-user",
        "exchange": "okx",
        "symbol": SYMBOL,
        "side": "buy",
        "order_type": "market",
        "quantity": "0.1",
    }
    accepted = await asyncio.to_thread(
        run_ledger, redis_url, "submit", "place_order", "--data", json.dumps(order), "--wait", "20"
    )
    assert accepted.returncode == 0, accepted.stderr + serve.output()
    reply = json.loads(accepted.stdout)
    assert sorted(reply) == sorted(REPLY_KEYS)
    assert (reply["command_id"], reply["status"], reply["error"]) == ("cli-1", "accepted", None)
    assert [e["type"] for e in reply["events"]] == ["OrderPlaced"]
    assert all(ENTRY_ID_RE.fullmatch(e["id"]) for e in reply["events"])

    cancel = {"user_id": "cli-user", "order_id": str(uuid.uuid4())}  # command_id generated
    rejected = await asyncio.to_thread(run_ledger, redis_url, "submit", "cancel_order", "--data", json.dumps(cancel))
    assert rejected.returncode == 1, rejected.stderr
    reply = json.loads(rejected.stdout)
    assert (reply["status"], reply["error"]["code"]) == ("rejected", "UNKNOWN_ORDER")
    assert re.fullmatch(f"cli-{UUID7}", reply["command_id"])

    broken = await asyncio.to_thread(run_ledger, redis_url, "submit", "place_order", "--data", "{nope")
    assert broken.returncode == 2 and broken.stdout == ""
    assert broken.stderr.startswith("ledger: ") and len(broken.stderr.strip().splitlines()) == 1

    status = await asyncio.to_thread(run_ledger, redis_url, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["shards"] == 1
    rows = {(row["stream"], row.get("group")): row for row in report["streams"]}
    commands = rows[("commands", GROUP)]
    assert (commands["length"], commands["pending"], commands["lag"], commands["consumers"]) == (2, 0, 0, 1)
    assert rows[("events", None)]["length"] == 1
    assert rows[("dead", None)]["length"] == 0
    assert serve.stop() == 0
