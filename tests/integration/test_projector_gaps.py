"""Issue 7, defect 2 (last paragraph): an event the projector cannot write never silently
leaves an order or position missing from history.

Against real Redis and PostgreSQL: events come from the real command handler (or are XADDed
raw, as a broken producer would), the real ``ledger-projector`` consumer projects them, and a
CHECK constraint added for the test makes PostgreSQL refuse one event type, as it refuses a
value it cannot store.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest

from consumers.runner import ConsumerSettings
from ledger.domain import wire
from ledger.store.redis_conn import connect
from projections.projector import PROJECTOR, open_gaps, projector_consumer
from tests.integration import test_projector
from tests.integration.test_projector import KEYS, SYMBOL, Ledger, count, one, pending, place

# The fixtures of the projector tests: ``pool`` (on ``database_url``) and ``ledger`` (the handler).
pool = test_projector.pool
ledger = test_projector.ledger

ONE_TRY = ConsumerSettings(max_deliveries=1)


async def _refuse(pg: psycopg.AsyncConnection[Any], event_type: str) -> None:
    """Make PostgreSQL refuse to archive one event type (as it refuses a value it cannot store)."""
    await pg.execute(f"ALTER TABLE ledger_events ADD CONSTRAINT test_refused CHECK (type <> '{event_type}') NOT VALID")


async def _entry_of(redis: Any, event_type: str, aggregate_id: str) -> tuple[str, dict[str, Any]]:
    for entry_id, fields in await redis.xrange(KEYS.events):
        data = json.loads(fields["data"])
        if fields["type"] == event_type and data["stream"] == aggregate_id:
            return entry_id, data
    raise AssertionError(f"no {event_type} of {aggregate_id} in the log")


async def _gaps(pg: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
    cur = await pg.execute(
        "SELECT shard, entry_id, type, event_id::text, aggregate_id::text, code, reason, filled_at IS NOT NULL"
        " FROM projector_gaps ORDER BY entry_ms, entry_seq"
    )
    return await cur.fetchall()


async def test_order_whose_placed_event_cannot_be_archived_still_reaches_history(
    redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any]
) -> None:
    order_id = await place(ledger)
    await ledger.send("cancel_order", order_id=order_id)
    await ledger.send("order_cancelled", order_id=order_id)
    placed_entry, placed = await _entry_of(redis, "OrderPlaced", order_id)
    await _refuse(pg, "OrderPlaced")

    await projector_consumer(redis, pool, 0, settings=ONE_TRY).burst()

    # The order is in history, rebuilt from its snapshot since its first event is not archived.
    row = await one(pg, "SELECT status, version, quantity, price, filled_qty FROM orders WHERE id = %s", order_id)
    assert (row["status"], row["version"], str(row["quantity"]), str(row["price"]), str(row["filled_qty"])) == (
        "cancelled",
        3,
        "0.1",
        "40000",
        "0",
    )
    cur = await pg.execute("SELECT type FROM ledger_events WHERE aggregate_id = %s ORDER BY version", (order_id,))
    assert [r[0] for r in await cur.fetchall()] == ["OrderCancelRequested", "OrderCancelled"]
    # The event that could not be archived: dead-lettered once, and its gap recorded, filled.
    ((_id, letter),) = await redis.xrange(KEYS.dead)
    assert (letter["dead_entry_id"], letter["dead_group"], letter["dead_code"]) == (
        placed_entry,
        PROJECTOR,
        "DELIVERY_LIMIT",
    )
    refused = 'new row for relation "ledger_events" violates check constraint "test_refused"'
    assert letter["dead_reason"].startswith(f"failed deliveries: 1; last error: CheckViolation('{refused}")
    assert await _gaps(pg) == [
        (0, placed_entry, "OrderPlaced", placed["event_id"], order_id, "DELIVERY_LIMIT", letter["dead_reason"], True)
    ]
    assert await open_gaps(pg) == {}
    assert await pending(redis) == 0


async def test_gap_stays_open_until_its_position_reaches_history(
    redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any]
) -> None:
    opened = await ledger.send("open_position", exchange="okx", symbol=SYMBOL, side="long", size="0.1", leverage=10)
    await ledger.send("record_fill", order_id=opened["order_id"], fill_id="f1", quantity="0.1", price="45000")
    position_id = opened["position_id"]
    opened_entry, event = await _entry_of(redis, "PositionOpened", position_id)
    await _refuse(pg, "PositionOpened")
    consumer = projector_consumer(redis, pool, 0, settings=ONE_TRY)
    await consumer.burst()

    reason = (await redis.xrange(KEYS.dead))[0][1]["dead_reason"]
    assert await _gaps(pg) == [
        (0, opened_entry, "PositionOpened", event["event_id"], position_id, "DELIVERY_LIMIT", reason, False)
    ]
    assert await open_gaps(pg) == {0: (1, opened_entry)}

    await pg.execute("ALTER TABLE ledger_events DROP CONSTRAINT test_refused")
    closing = await ledger.send("close_position", position_id=position_id)
    await ledger.send("record_fill", order_id=closing["order_id"], fill_id="f2", quantity="0.1", price="46000")
    await consumer.burst()

    assert await count(pg, "SELECT count(*) FROM positions WHERE id = %s AND status = 'closed'", position_id) == 1
    assert [g[-1] for g in await _gaps(pg)] == [True]
    assert await open_gaps(pg) == {}
    assert await redis.xlen(KEYS.dead) == 1


async def test_undecodable_event_is_dead_lettered_at_once_with_its_reason_and_recorded(
    redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any]
) -> None:
    event_id, order_id = str(uuid.uuid4()), str(uuid.uuid4())
    data = json.dumps({"event_id": event_id, "stream": order_id, "version": 1, "user_id": "x\u0000y"})
    broken = await redis.xadd(KEYS.events, {"type": "OrderPlaced", "data": data})
    with pytest.raises(wire.WireError) as decoding:
        wire.decode_event("OrderPlaced", data)
    later = await place(ledger)

    # Five deliveries allowed, yet dead-lettered on the first: no retry can decode it.
    await projector_consumer(redis, pool, 0, settings=ConsumerSettings(max_deliveries=5)).burst()

    reason = f"OrderPlaced event entry {broken}: {decoding.value.message}"
    ((_id, letter),) = await redis.xrange(KEYS.dead)
    assert (letter["dead_entry_id"], letter["dead_code"], letter["dead_reason"], letter["data"]) == (
        broken,
        decoding.value.code,
        reason,
        data,
    )
    assert await _gaps(pg) == [(0, broken, "OrderPlaced", event_id, order_id, decoding.value.code, reason, False)]
    assert await open_gaps(pg) == {0: (1, broken)}
    assert await count(pg, "SELECT count(*) FROM ledger_events WHERE aggregate_id = %s", later) == 1
    assert await pending(redis) == 0
    assert await redis.exists(f"{KEYS.events}:tries:{PROJECTOR}") == 0


async def test_gap_is_recorded_whatever_the_entry_held(
    redis_url: str, pool: Any, pg: psycopg.AsyncConnection[Any]
) -> None:
    """A type too long for the archive and holding NUL; data that is neither UTF-8 nor JSON."""
    client = await connect(redis_url)  # bytes that are not UTF-8 read back as lone surrogates
    event_id, stream = str(uuid.uuid4()), str(uuid.uuid4())
    envelope = {"event_id": event_id, "stream": stream, "version": 1, "user_id": "u", "ts": 1_700_000_000_000}
    future_type = "Future\x00" + "x" * 100
    future = await client.xadd(KEYS.events, {"type": future_type, "data": json.dumps(envelope)})
    garbled = await client.xadd(KEYS.events, {b"type": b"OrderPlaced", b"data": b"\xff{not json"})
    try:
        await projector_consumer(client, pool, 0, settings=ONE_TRY).burst()
        letters = await client.xrange(KEYS.dead)
    finally:
        await client.aclose()

    gaps = await _gaps(pg)
    assert [g[:6] + g[7:] for g in gaps] == [
        (0, future, ("Future\\x00" + "x" * 100)[:64], event_id, stream, "DELIVERY_LIMIT", False),
        (0, garbled, "OrderPlaced", None, None, "INVALID_JSON", False),
    ]
    reasons = {letter["dead_entry_id"]: letter["dead_reason"] for _id, letter in letters}
    assert {g[1]: g[6] for g in gaps} == reasons
    assert await open_gaps(pg) == {0: (2, future)}


async def test_unknown_type_that_cannot_be_archived_is_skipped_and_recorded(
    redis: Any, pool: Any, pg: psycopg.AsyncConnection[Any]
) -> None:
    skipped = await redis.xadd(KEYS.events, {"type": "SomethingNew", "data": "[" * 5000 + "]" * 5000})
    consumer = projector_consumer(redis, pool, 0)
    await consumer.burst()
    await redis.xadd(KEYS.events, {"type": "SomethingNew", "data": "not json"})
    await consumer.burst()

    gaps = await _gaps(pg)
    assert [g[:6] + g[7:] for g in gaps] == [
        (0, skipped, "SomethingNew", None, None, "UNKNOWN_TYPE", False),
        (0, gaps[1][1], "SomethingNew", None, None, "UNKNOWN_TYPE", False),
    ]
    assert gaps[1][6].startswith("unknown event type 'SomethingNew' with an unreadable envelope (DecodeError(")
    assert gaps[1][6].endswith("): not archived")
    assert await redis.exists(KEYS.dead) == 0  # a type this reader does not know is not an error
    assert await pending(redis) == 0
