"""EventStore reads: by range, by aggregate, from a position, and as a live subscription."""

from __future__ import annotations

import asyncio
import json

from consumers.command_handler import GROUP, CommandHandler
from consumers.runner import StreamConsumer
from ledger.domain import wire
from ledger.store.eventstore import EventStore
from tests.domain_helpers import event_fields


async def _handle(redis, store: EventStore, *commands: tuple[str, dict]) -> list[dict]:
    for type_name, data in commands:
        await redis.xadd(store.keys.commands, {"type": type_name, "data": json.dumps(data)})
    consumer = StreamConsumer(
        redis,
        stream=store.keys.commands,
        group=GROUP,
        handler=CommandHandler(store, 1).handle,
        dead_stream=store.keys.dead,
    )
    await consumer.burst()
    replies = []
    for _type, data in commands:
        raw = await redis.lindex(store.keys.reply(data["user_id"], data["command_id"]), 0)
        replies.append(json.loads(raw))
    return replies


def _order(command_id: str) -> tuple[str, dict]:
    return (
        "place_order",
        {
            "command_id": command_id,
            "user_id": "u1",
            "exchange": "okx",
            "symbol": "BTC-USDT-SWAP",
            "side": "buy",
            "order_type": "limit",
            "quantity": "0.3",
            "price": "45000",
        },
    )


def _fill(command_id: str, order_id: str, fill_id: str) -> tuple[str, dict]:
    return (
        "record_fill",
        {
            "command_id": command_id,
            "user_id": "u1",
            "order_id": order_id,
            "fill_id": fill_id,
            "quantity": "0.1",
            "price": "45000",
        },
    )


async def test_reads_by_range_aggregate_and_position(redis) -> None:
    store = EventStore(redis, 0)
    first, second = await _handle(redis, store, _order("o1"), _order("o2"))
    order_id = first["order_id"]
    await _handle(redis, store, _fill("f1", order_id, "t1"), _fill("f2", order_id, "t2"))

    everything = await store.read_range()
    assert [s.event.type for s in everything] == [
        "OrderPlaced",
        "OrderPlaced",
        "OrderFilled",
        "PositionOpened",
        "OrderFilled",
        "PositionIncreased",
    ]
    assert [s.entry_id for s in everything] == [e[0] for e in await redis.xrange(store.keys.events)]

    of_order = await store.read_aggregate(order_id)
    assert [(s.event.type, s.event.version) for s in of_order] == [
        ("OrderPlaced", 1),
        ("OrderFilled", 2),
        ("OrderFilled", 3),
    ]
    assert of_order[-1].event.filled_qty == "0.2"  # type: ignore[attr-defined]
    assert [s.event.stream for s in await store.read_aggregate(second["order_id"])] == [second["order_id"]]

    after_second = await store.read_from(everything[1].entry_id)
    assert [s.entry_id for s in after_second] == [s.entry_id for s in everything[2:]]
    assert len(await store.read_range(count=2)) == 2
    assert await store.read_from(everything[-1].entry_id) == []


async def test_subscription_sees_events_appended_after_it_started(redis) -> None:
    store = EventStore(redis, 0)
    (placed,) = await _handle(redis, store, _order("o1"))
    seen: list[wire.Event] = []

    async def follow() -> None:
        async for stored in store.subscribe("$", block_ms=100):
            seen.append(stored.event)
            if len(seen) == 2:
                return

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    await _handle(redis, store, _fill("f1", placed["order_id"], "t1"))
    await asyncio.wait_for(follower, 5)
    assert [e.type for e in seen] == ["OrderFilled", "PositionOpened"]


async def test_iterate_pages_past_entries_it_skips(redis) -> None:
    """A page holding only unknown or undecodable entries once ended the walk early."""
    store = EventStore(redis, 0)
    for n in range(5):
        await redis.xadd(store.keys.events, {"type": "FutureEvent", "data": "{}"})
        await redis.xadd(store.keys.events, {"type": "OrderPlaced", "data": f'{{"broken": {n}}}'})
    placed = wire.OrderPlaced(
        event_id="e-1",
        stream="o-1",
        version=1,
        command_id="c-1",
        user_id="alice",
        exchange="okx",  # type: ignore[arg-type]
        symbol="BTC-USDT-SWAP",
        ts=1,
        side="buy",  # type: ignore[arg-type]
        order_type="market",  # type: ignore[arg-type]
        quantity="1",
    )
    last = await redis.xadd(store.keys.events, event_fields(placed))

    found = [s async for s in store.iterate(page=2)]

    assert [(s.entry_id, s.event) for s in found] == [(last, placed)]
    assert [s.entry_id for s in await store.read_range()] == [last]
