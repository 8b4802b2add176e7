"""The event store's contract (``ledger.store.eventstore.EventStore``), run on a plain Redis and on a
Redis Cluster.

``EventStoreContract`` holds what the store promises, whatever Redis it runs on; it is not
collected by itself (its name does not start with ``Test``). Each backend subclasses it and says
only how to get a client. The appends are built by
hand (events, snapshots, slots, tokens, replies), so what is checked is the adapter alone: the
decider and the handler have their own tests.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import msgspec
import pytest

from ledger.domain import wire
from ledger.domain.decider import Requirements
from ledger.domain.enums import Exchange, OrderSide, OrderStatus, OrderType, PositionSide, PositionStatus
from ledger.domain.evolution import apply
from ledger.domain.state import Book, OrderState, PositionState, slot_field
from ledger.store import eventstore
from ledger.store.archived import fingerprint
from ledger.store.chain import genesis, link_hash
from ledger.store.eventstore import (
    ORDER_SNAPSHOT,
    POSITION_SNAPSHOT,
    Append,
    AppendResult,
    EventStore,
    Loaded,
    outcome_marker,
)

SHARD = 2
USER = "alice"
SYMBOL = "BTC-USDT-SWAP"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
TTL_S = 90
ORDER_1 = "00000000-0000-4000-8000-000000000001"
ORDER_2 = "00000000-0000-4000-8000-000000000002"
POSITION = "00000000-0000-4000-8000-0000000000a1"
SLOT = slot_field(USER, "okx", SYMBOL, "long")


def placed(order_id: str, command_id: str, *, quantity: str = "0.3", ts: int = T0) -> wire.OrderPlaced:
    return wire.OrderPlaced(
        event_id=f"e-{order_id[-2:]}-1",
        stream=order_id,
        version=1,
        command_id=command_id,
        user_id=USER,
        exchange=Exchange.OKX,
        symbol=SYMBOL,
        ts=ts,
        side=OrderSide.BUY,
        order_type=OrderType.LIMIT,
        quantity=quantity,
        price="45000",
    )


def opened(command_id: str, order_id: str) -> wire.PositionOpened:
    return wire.PositionOpened(
        event_id="e-a1-1",
        stream=POSITION,
        version=1,
        command_id=command_id,
        user_id=USER,
        exchange=Exchange.OKX,
        symbol=SYMBOL,
        ts=T0 + 1000,
        side=PositionSide.LONG,
        status=PositionStatus.OPEN,
        size="0.1",
        entry_price="45000",
        leverage=10,
        entry_qty="0.1",
        entry_basis="4500",
        exit_qty="0",
        exit_basis="0",
        gross_pnl="0",
        fees="0.45",
        realized_pnl="-0.45",
        created_at=T0 + 1000,
        updated_at=T0 + 1000,
        order_id=order_id,
        fill_id="f-1",
        change_qty="0.1",
        change_price="45000",
        change_fee="0.45",
    )


def command(
    command_id: str,
    events: list[wire.Event],
    *,
    expected: str = "",
    new: str,
    slots: dict[str, str | None] | None = None,
    user: str = USER,
) -> Append:
    """An accepted command's append: its events, the snapshots they produce, its slots."""
    orders: dict[str, OrderState] = {}
    positions: dict[str, PositionState] = {}
    for event in events:
        state = apply(orders.get(event.stream) or positions.get(event.stream), event)
        if isinstance(state, OrderState):
            orders[event.stream] = state
        else:
            positions[event.stream] = state
    order_id = next(iter(orders), None)
    position_id = next(iter(positions), None)
    reply = wire.Reply(command_id=command_id, status="accepted", order_id=order_id, position_id=position_id)
    return Append(user, command_id, expected, new, reply, events, orders, positions, slots or {})


def rejection(command_id: str, *, expected: str = "", new: str) -> Append:
    reply = wire.Reply(
        command_id=command_id, status="rejected", error=wire.ErrorInfo("UNKNOWN_ORDER", "no order 'x' of this user")
    )
    return Append(USER, command_id, expected, new, reply)


def full_reply(append: Append, entry_ids: list[str]) -> str:
    """The reply the store must record and give: the append's reply with its events' entry ids."""
    refs = [wire.EventRef(e.type, i) for e, i in zip(append.events, entry_ids, strict=True)]
    return wire.encode(msgspec.structs.replace(append.reply, events=refs)).decode()


class EventStoreContract:
    """What ``EventStore`` promises on any Redis. Subclasses provide ``client``."""

    @pytest.fixture
    def client(self) -> Any:
        raise NotImplementedError

    @pytest.fixture
    def store(self, client: Any) -> EventStore:
        return EventStore(client, SHARD, reply_ttl_s=TTL_S)

    # ----------------------------------------------------------------- the atomic append

    async def test_append_writes_events_snapshots_slots_token_outcome_and_reply(
        self, client: Any, store: EventStore
    ) -> None:
        keys = store.keys
        await client.hset(keys.slots, "alice|okx|ETH-USDT-SWAP|short", "stale-position")
        events: list[wire.Event] = [placed(ORDER_1, "c-1"), opened("c-1", ORDER_1)]
        append = command("c-1", events, new="1-0:a", slots={SLOT: POSITION, "alice|okx|ETH-USDT-SWAP|short": None})

        result = await store.append(append)

        entries = await client.xrange(keys.events)
        ids = [entry_id for entry_id, _fields in entries]
        reply = full_reply(append, ids)
        assert result == AppendResult("ok", reply)
        assert [fields["type"] for _id, fields in entries] == ["OrderPlaced", "PositionOpened"]
        assert [fields["data"] for _id, fields in entries] == [wire.encode(e).decode() for e in events]
        # Snapshots hold what differs from the state's defaults and read back as the whole state.
        assert await client.hgetall(keys.orders) == {ORDER_1: ORDER_SNAPSHOT.encode(apply(None, events[0])).decode()}
        assert await client.hgetall(keys.positions) == {
            POSITION: POSITION_SNAPSHOT.encode(apply(None, events[1])).decode()
        }
        assert await store.order(ORDER_1) == apply(None, events[0])
        assert await store.position(POSITION) == apply(None, events[1])
        assert await client.hgetall(keys.slots) == {SLOT: POSITION}
        assert await client.hgetall(keys.sequence) == {USER: "1-0:a"}
        assert await client.hgetall(keys.outcomes) == {"alice:c-1": reply}
        reply_key = keys.reply(USER, "c-1")
        assert await client.lrange(reply_key, 0, -1) == [reply]
        assert TTL_S - 2 <= await client.ttl(reply_key) <= TTL_S
        assert await client.exists(keys.eventless) == 0  # only outcomes without events are aged

    async def test_an_outcome_without_events_moves_the_token_and_records_its_time(
        self, client: Any, store: EventStore
    ) -> None:
        keys = store.keys
        before = await _redis_ms(client)

        result = await store.append(rejection("c-9", new="1-0:r"))

        after = await _redis_ms(client)
        reply = (
            '{"command_id":"c-9","status":"rejected","error":{"code":"UNKNOWN_ORDER",'
            '"message":"no order \'x\' of this user"},"order_id":null,"position_id":null,"events":[]}'
        )
        assert result == AppendResult("ok", reply)
        assert await client.xlen(keys.events) == 0
        assert await client.exists(keys.chain, keys.orders, keys.positions, keys.slots) == 0
        assert await client.hgetall(keys.sequence) == {USER: "1-0:r"}
        assert await client.hgetall(keys.outcomes) == {"alice:c-9": reply}
        assert await client.lrange(keys.reply(USER, "c-9"), 0, -1) == [reply]
        ((member, score),) = await client.zrange(keys.eventless, 0, -1, withscores=True)
        assert member == "alice:c-9"
        assert before <= score <= after

    async def test_a_moved_token_is_a_conflict_that_writes_nothing(self, client: Any, store: EventStore) -> None:
        keys = store.keys
        await store.append(command("c-1", [placed(ORDER_1, "c-1")], new="1-0:a"))
        written = {key: await _dump(client, key) for key in _shard_keys(store)}

        late = command("c-2", [placed(ORDER_2, "c-2")], expected="", new="2-0:b")
        assert await store.append(late) == AppendResult("conflict", "1-0:a")
        stale = command("c-2", [placed(ORDER_2, "c-2")], expected="0-1:z", new="2-0:b")
        assert await store.append(stale) == AppendResult("conflict", "1-0:a")

        assert {key: await _dump(client, key) for key in _shard_keys(store)} == written
        assert await client.exists(keys.reply(USER, "c-2")) == 0
        fresh = command("c-2", [placed(ORDER_2, "c-2")], expected="1-0:a", new="2-0:b")
        assert (await store.append(fresh)).status == "ok"
        assert await client.xlen(keys.events) == 2

    async def test_a_duplicate_gets_the_byte_identical_first_reply_and_appends_nothing(
        self, client: Any, store: EventStore
    ) -> None:
        keys = store.keys
        first = await store.append(command("c-1", [placed(ORDER_1, "c-1")], new="1-0:a"))
        reply_key = keys.reply(USER, "c-1")
        assert await client.blpop([reply_key], timeout=1) == (reply_key, first.reply)  # the client took it
        written = {key: await _dump(client, key) for key in _shard_keys(store)}

        # Again, with other content, a stale token and a token that would match: the first outcome.
        again = command("c-1", [placed(ORDER_2, "c-1", quantity="9")], expected="", new="9-0:x")
        assert await store.append(again) == AppendResult("duplicate", first.reply)
        matching = command("c-1", [placed(ORDER_2, "c-1")], expected="1-0:a", new="9-0:y")
        assert await store.append(matching) == AppendResult("duplicate", first.reply)

        assert {key: await _dump(client, key) for key in _shard_keys(store)} == written
        assert await client.lrange(reply_key, 0, -1) == [first.reply]
        assert TTL_S - 2 <= await client.ttl(reply_key) <= TTL_S

    async def test_a_duplicate_of_a_compacted_outcome_waits_and_is_answered_once(
        self, client: Any, store: EventStore
    ) -> None:
        keys = store.keys
        first = await store.append(command("c-1", [placed(ORDER_1, "c-1")], new="1-0:a"))
        marker = outcome_marker(first.reply.encode())
        assert marker[0] == "~" and len(marker) == 21
        await client.hset(keys.outcomes, "alice:c-1", marker)  # what compaction leaves
        await client.delete(keys.reply(USER, "c-1"))
        written = {key: await _dump(client, key) for key in _shard_keys(store)}

        result = await store.append(command("c-1", [placed(ORDER_2, "c-1")], expected="1-0:a", new="9-0:x"))

        assert result == AppendResult("archived", marker)
        assert {key: await _dump(client, key) for key in _shard_keys(store)} == written
        assert await client.exists(keys.reply(USER, "c-1")) == 0
        assert await store.waiting() == {"alice:c-1": marker}
        assert await store.answer_waiting("alice:c-1", "~00000000000000000000", first.reply) is False
        assert await client.exists(keys.reply(USER, "c-1")) == 0
        assert await store.answer_waiting("alice:c-1", marker, first.reply) is True
        assert await store.answer_waiting("alice:c-1", marker, first.reply) is False
        assert await store.waiting() == {}
        assert await client.lrange(keys.reply(USER, "c-1"), 0, -1) == [first.reply]

    async def test_append_many_runs_each_append_atomically_and_answers_in_order(
        self, client: Any, store: EventStore
    ) -> None:
        bob = command("c-b", [placed(ORDER_2, "c-b")], new="1-0:b", user="bob")
        results = await store.append_many(
            [
                command("c-1", [placed(ORDER_1, "c-1")], new="1-0:a"),
                command("c-2", [], expected="", new="2-0:a"),  # decided on the state before c-1
                bob,
            ]
        )

        entries = await client.xrange(store.keys.events)
        assert [r.status for r in results] == ["ok", "conflict", "ok"]
        assert results[1].reply == "1-0:a"
        assert [fields["data"] for _id, fields in entries] == [
            wire.encode(placed(ORDER_1, "c-1")).decode(),
            wire.encode(placed(ORDER_2, "c-b")).decode(),
        ]
        assert results[2].reply == full_reply(bob, [entries[1][0]])
        assert await client.hgetall(store.keys.sequence) == {USER: "1-0:a", "bob": "1-0:b"}
        assert sorted(await client.hkeys(store.keys.outcomes)) == ["alice:c-1", "bob:c-b"]

    async def test_one_batch_gives_each_command_its_own_outcome_in_order(self, client: Any, store: EventStore) -> None:
        keys = store.keys
        archived = await store.append(rejection("c-0", new="0-1:a"))
        marker = outcome_marker(archived.reply.encode())
        await client.hset(keys.outcomes, "alice:c-0", marker)  # what compaction leaves
        await client.delete(keys.reply(USER, "c-0"))
        c1 = command("c-1", [placed(ORDER_1, "c-1"), opened("c-1", ORDER_1)], expected="0-1:a", new="1-0:a")
        c2 = command("c-2", [placed(ORDER_2, "c-2")], expected="1-0:a", new="2-0:a")  # decided after c-1
        c3 = rejection("c-3", expected="2-0:a", new="3-0:a")
        bob_stale = command("b-1", [], expected="9-9:z", new="4-0:b", user="bob")
        bob_next = command("b-2", [], expected="4-0:b", new="5-0:b", user="bob")  # decided after b-1: conflicts too

        results = await store.append_many(
            [c1, command("c-0", [], expected="0-1:a", new="x"), c2, c1, bob_stale, c3, bob_next]
        )

        entries = await client.xrange(keys.events)
        ids = [entry_id for entry_id, _fields in entries]
        reply_1, reply_2 = full_reply(c1, ids[:2]), full_reply(c2, ids[2:])
        reply_3 = full_reply(c3, [])
        assert results == [
            AppendResult("ok", reply_1),
            AppendResult("archived", marker),
            AppendResult("ok", reply_2),
            AppendResult("duplicate", reply_1),
            AppendResult("conflict", ""),
            AppendResult("ok", reply_3),
            AppendResult("conflict", ""),
        ]
        assert [fields["n"] for _id, fields in entries] == ["1", "2", "3"]
        assert await client.hgetall(keys.chain) == {"id": ids[2], "n": "3", "hash": entries[2][1]["hash"]}
        assert await client.hgetall(keys.sequence) == {USER: "3-0:a"}
        assert await client.hgetall(keys.outcomes) == {
            "alice:c-0": marker,
            "alice:c-1": reply_1,
            "alice:c-2": reply_2,
            "alice:c-3": reply_3,
        }
        assert await store.waiting() == {"alice:c-0": marker}
        for command_id, reply in (("c-1", reply_1), ("c-2", reply_2), ("c-3", reply_3)):
            assert await client.lrange(keys.reply(USER, command_id), 0, -1) == [reply]
        assert await client.exists(keys.reply(USER, "c-0"), keys.reply("bob", "b-1"), keys.reply("bob", "b-2")) == 0
        assert await client.zrange(keys.eventless, 0, -1) == ["alice:c-0", "alice:c-3"]
        assert await store.append_many([]) == []

    async def test_a_batch_larger_than_a_chunk_goes_in_several_calls_in_order(
        self, client: Any, store: EventStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(eventstore, "APPEND_CHUNK", 2)
        orders = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 5)]
        appends = [
            command(f"c-{i}", [placed(order_id, f"c-{i}")], expected=f"{i - 1}-0:a" if i > 1 else "", new=f"{i}-0:a")
            for i, order_id in enumerate(orders, start=1)
        ]
        appends[1] = command("c-2", [placed(orders[1], "c-2")], expected="9-9:z", new="2-0:a")  # conflicts

        results = await store.append_many(appends)

        entries = await client.xrange(store.keys.events)
        assert [r.status for r in results] == ["ok", "conflict", "conflict", "conflict"]  # c-3, c-4 expected c-2's
        assert results[0] == AppendResult("ok", full_reply(appends[0], [entries[0][0]]))
        assert [r.reply for r in results[1:]] == ["1-0:a"] * 3
        assert len(entries) == 1
        retried = [
            command(f"c-{i}", [placed(orders[i - 1], f"c-{i}")], expected=f"{i - 1}-0:a", new=f"{i}-0:a")
            for i in (2, 3, 4)
        ]
        assert [r.status for r in await store.append_many(retried)] == ["ok"] * 3
        entries = await client.xrange(store.keys.events)
        assert [fields["n"] for _id, fields in entries] == ["1", "2", "3", "4"]  # one chain across calls
        assert await client.hgetall(store.keys.chain) == {"id": entries[3][0], "n": "4", "hash": entries[3][1]["hash"]}
        assert await client.hgetall(store.keys.sequence) == {USER: "4-0:a"}

    async def test_a_final_order_or_closed_position_is_recorded_for_compaction_with_its_time(
        self, client: Any, store: EventStore
    ) -> None:
        keys = store.keys
        events: list[wire.Event] = [placed(ORDER_1, "c-1"), opened("c-1", ORDER_1)]
        append = command("c-1", events, new="1-0:a")
        assert (await store.append(append)).status == "ok"
        assert (await client.zcard(keys.final_orders), await client.zcard(keys.final_positions)) == (0, 0)

        done = command("c-2", events, expected="1-0:a", new="2-0:a")
        done.orders[ORDER_1] = msgspec.structs.replace(
            done.orders[ORDER_1], status=OrderStatus.CANCELLED, updated_at=T0 + 7000
        )
        done.positions[POSITION] = msgspec.structs.replace(
            done.positions[POSITION], status=PositionStatus.CLOSED, updated_at=T0 + 8000
        )
        assert (await store.append(done)).status == "ok"

        assert await client.zrange(keys.final_orders, 0, -1, withscores=True) == [(ORDER_1, T0 + 7000)]
        assert await client.zrange(keys.final_positions, 0, -1, withscores=True) == [(POSITION, T0 + 8000)]

    async def test_load_reads_back_snapshots_slots_tokens_and_outcomes(self, client: Any, store: EventStore) -> None:
        events: list[wire.Event] = [placed(ORDER_1, "c-1"), opened("c-1", ORDER_1)]
        first = await store.append(command("c-1", events, new="1-0:a", slots={SLOT: POSITION}))
        book = Book()

        archived = "00000000-0000-4000-8000-0000000000c0"  # moved to PostgreSQL by compaction
        fp = fingerprint(archived)
        await client.hset(store.cold_index.bucket(fp), fp, "o")

        loaded = await store.load(
            book,
            Requirements(
                frozenset({ORDER_1, ORDER_2, archived}), frozenset({POSITION}), frozenset({SLOT, "alice|okx|X|short"})
            ),
            [USER, "bob", USER],
        )

        assert book.orders == {ORDER_1: apply(None, events[0]), ORDER_2: None, archived: None}
        assert loaded.cold == {archived}  # absent from the snapshots, found in the index
        assert book.positions == {POSITION: apply(None, events[1])}
        assert book.slots == {SLOT: POSITION, "alice|okx|X|short": None}
        assert await store.order(ORDER_1) == apply(None, events[0])
        assert await store.order(ORDER_2) is None
        assert await store.position(POSITION) == apply(None, events[1])
        assert loaded.tokens == {USER: "1-0:a", "bob": ""}
        assert await store.load(Book(), Requirements(frozenset(), frozenset(), frozenset())) == Loaded({}, set())
        assert await store.outcomes(["alice:c-1", "alice:c-2"]) == [first.reply, None]

    # ----------------------------------------------------------------- the hash chain

    async def test_every_event_is_chained_from_the_shards_genesis(self, client: Any, store: EventStore) -> None:
        keys = store.keys
        await store.append(command("c-1", [placed(ORDER_1, "c-1"), opened("c-1", ORDER_1)], new="1-0:a"))
        await store.append(rejection("c-2", expected="1-0:a", new="2-0:a"))  # no event: no link
        await store.append(command("c-3", [placed(ORDER_2, "c-3")], expected="2-0:a", new="3-0:a"))

        entries = await client.xrange(keys.events)
        assert [set(fields) for _id, fields in entries] == [{"type", "data", "n", "hash"}] * 3
        previous = genesis(SHARD)
        assert previous == hashlib.sha1(b"ledger:{2}:events").hexdigest()
        for n, (_id, fields) in enumerate(entries, start=1):
            assert fields["n"] == str(n)
            assert fields["hash"] == link_hash(previous, n, fields["type"], fields["data"])
            previous = fields["hash"]
        assert await client.hgetall(keys.chain) == {"id": entries[-1][0], "n": "3", "hash": previous}

    # ----------------------------------------------------------------- reads

    async def test_reads_by_range_position_page_and_aggregate(self, client: Any, store: EventStore) -> None:
        keys = store.keys
        await store.append(command("c-1", [placed(ORDER_1, "c-1"), opened("c-1", ORDER_1)], new="1-0:a"))
        # Skipped by every read: a type this version does not know, and an entry it cannot decode.
        unknown = await client.xadd(keys.events, {"type": "FutureEvent", "data": "{}"})
        broken = await client.xadd(keys.events, {"type": "OrderPlaced", "data": '{"broken": 1}'})
        await store.append(command("c-2", [placed(ORDER_2, "c-2")], expected="1-0:a", new="2-0:a"))
        ids = [entry_id for entry_id, _fields in await client.xrange(keys.events)]
        known = [i for i in ids if i not in (unknown, broken)]
        types = ["OrderPlaced", "PositionOpened", "OrderPlaced"]

        everything = await store.read_range()
        assert [(s.entry_id, s.event.type, s.event.stream) for s in everything] == list(
            zip(known, types, [ORDER_1, POSITION, ORDER_2], strict=True)
        )
        assert everything[0].event == placed(ORDER_1, "c-1")
        assert [s.entry_id for s in await store.read_range(ids[1], ids[4])] == [ids[1], ids[4]]  # both bounds in
        assert [s.entry_id for s in await store.read_range(ids[2], ids[3])] == []
        assert [s.entry_id for s in await store.read_range(count=2)] == known[:2]
        assert [s.entry_id for s in await store.read_from("0")] == known
        assert [s.entry_id for s in await store.read_from(ids[0])] == known[1:]
        assert [s.entry_id for s in await store.read_from(ids[0], count=2)] == [ids[1]]  # count is of entries
        assert await store.read_from(ids[-1]) == []
        for page in (1, 2, 3, 1000):
            assert [s.entry_id async for s in store.iterate(page=page)] == known, page
        # Pages holding only skipped entries do not end the walk.
        assert [s.entry_id async for s in store.iterate(after=ids[1], page=1)] == [ids[4]]
        assert [s.entry_id for s in await store.read_aggregate(ORDER_2, page=1)] == [ids[4]]
        assert await store.read_aggregate("00000000-0000-4000-8000-00000000ffff") == []

    async def test_subscribe_from_now_and_from_an_entry(self, client: Any, store: EventStore) -> None:
        await store.append(command("c-1", [placed(ORDER_1, "c-1")], new="1-0:a"))
        (first,) = await store.read_range()

        async def take(after: str, count: int) -> list[str]:
            seen: list[str] = []
            async for stored in store.subscribe(after, block_ms=50):
                seen.append(stored.event.stream)
                if len(seen) == count:
                    return seen
            return seen

        from_now = asyncio.create_task(take("$", 2))
        await asyncio.sleep(0.2)
        await store.append(
            command("c-2", [placed(ORDER_2, "c-2"), opened("c-2", ORDER_2)], expected="1-0:a", new="2-0:a")
        )
        assert await asyncio.wait_for(from_now, 5) == [ORDER_2, POSITION]
        assert await asyncio.wait_for(take(first.entry_id, 2), 5) == [ORDER_2, POSITION]
        assert await asyncio.wait_for(take("0", 1), 5) == [ORDER_1]

    # ----------------------------------------------------------------- the script cache

    async def test_append_after_the_script_cache_was_flushed(self, client: Any, store: EventStore) -> None:
        await store.append(command("c-1", [placed(ORDER_1, "c-1")], new="1-0:a"))
        await client.script_flush()  # a restart, or an operator (on a cluster: every master)
        assert await client.script_exists(store._sha) == [False]

        result = await store.append(command("c-2", [placed(ORDER_2, "c-2")], expected="1-0:a", new="2-0:a"))

        assert result.status == "ok"
        assert [s.event.stream for s in await store.read_range()] == [ORDER_1, ORDER_2]
        assert await client.hgetall(store.keys.sequence) == {USER: "2-0:a"}


async def _redis_ms(client: Any) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _shard_keys(store: EventStore) -> list[str]:
    k = store.keys
    return [
        *(k.events, k.orders, k.positions, k.slots, k.sequence, k.outcomes, k.chain, k.eventless),
        *(k.archived, k.final_orders, k.final_positions),
    ]


async def _dump(client: Any, key: str) -> Any:
    kind = await client.type(key)
    if kind == "stream":
        return await client.xrange(key)
    if kind == "hash":
        return await client.hgetall(key)
    if kind == "zset":
        return await client.zrange(key, 0, -1, withscores=True)
    return kind


class TestEventStoreOnRedis(EventStoreContract):
    @pytest.fixture
    def client(self, redis: Any) -> Any:
        return redis


class TestEventStoreOnCluster(EventStoreContract):
    @pytest.fixture
    def client(self, redis_cluster: Any) -> Any:
        return redis_cluster
