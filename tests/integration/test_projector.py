"""The PostgreSQL projector against real Redis and PostgreSQL.

Events are produced by the real command handler (``CommandHandler`` behind a
``StreamConsumer`` on ``ledger:{0}:commands``, commands published with XADD of
``{type, data-JSON}``), then projected with the real ``ledger-projector`` consumer.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest
import structlog

from consumers.command_handler import GROUP as HANDLER_GROUP
from consumers.command_handler import CommandHandler
from consumers.runner import ConsumerSettings, StreamConsumer
from ledger.client.history import closed_positions, final_orders
from ledger.config import Settings
from ledger.store.eventstore import EventStore
from ledger.store.keys import ShardKeys
from projections import projector
from projections.projector import (
    BATCH_FACTOR,
    PROJECTOR,
    Projector,
    checkpoint,
    lease_key,
    open_pool,
    projector_consumer,
    projector_role,
)

ROOT = Path(__file__).resolve().parents[2]
USER = "trader-1"
SYMBOL = "BTC-USDT-SWAP"
KEYS = ShardKeys(0)

# Every table the projector writes, with a deterministic order for comparisons.
TABLES = {
    "ledger_events": "SELECT * FROM ledger_events ORDER BY shard, entry_ms, entry_seq",
    "fills": "SELECT * FROM fills ORDER BY order_id, fill_id",
    "positions": "SELECT * FROM positions ORDER BY id",
    "orders": "SELECT * FROM orders ORDER BY id",
}


# --------------------------------------------------------------------------- helpers


class Ledger:
    """The real command handler of shard 0, driven in-process."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        store = EventStore(redis, 0)
        self.consumer = StreamConsumer(
            redis,
            stream=KEYS.commands,
            group=HANDLER_GROUP,
            handler=CommandHandler(store, 1).handle,
            dead_stream=KEYS.dead,
        )

    async def publish(self, type_: str, **data: Any) -> str:
        data.setdefault("user_id", USER)
        data.setdefault("command_id", f"c-{uuid.uuid4().hex[:12]}")
        await self.redis.xadd(KEYS.commands, {"type": type_, "data": json.dumps(data)})
        return str(data["command_id"])

    async def reply(self, command_id: str, timeout: float = 10.0) -> dict[str, Any]:
        answer = await self.redis.blpop([KEYS.reply(USER, command_id)], timeout=timeout)
        assert answer is not None, f"no reply to {command_id}"
        await self.redis.rpush(KEYS.reply(USER, command_id), answer[1])  # leave it readable
        return json.loads(answer[1])  # type: ignore[no-any-return]

    async def send(self, type_: str, **data: Any) -> dict[str, Any]:
        """Publish one command, run the handler over it, return the accepted reply."""
        command_id = await self.publish(type_, **data)
        await self.consumer.burst()
        reply = await self.reply(command_id)
        assert reply["status"] == "accepted", reply
        return reply


async def open_and_close(ledger: Ledger, tag: str = "") -> tuple[str, str, str]:
    """Open 0.1 long @ 45000 (fee 0.45), close @ 46000 (fee 0.46): (position, open, close)."""
    opened = await ledger.send("open_position", exchange="okx", symbol=SYMBOL, side="long", size="0.1", leverage=10)
    await ledger.send(
        "record_fill",
        order_id=opened["order_id"],
        fill_id=f"f-open{tag}",
        quantity="0.1",
        price="45000",
        fee="0.45",
    )
    closing = await ledger.send("close_position", position_id=opened["position_id"])
    await ledger.send(
        "record_fill",
        order_id=closing["order_id"],
        fill_id=f"f-close{tag}",
        quantity="0.1",
        price="46000",
        fee="0.46",
    )
    return opened["position_id"], opened["order_id"], closing["order_id"]


async def place(ledger: Ledger, **extra: Any) -> str:
    data = {
        "exchange": "okx",
        "symbol": SYMBOL,
        "side": "buy",
        "order_type": "limit",
        "quantity": "0.1",
        "price": "40000",
        **extra,
    }
    reply = await ledger.send("place_order", **data)
    return str(reply["order_id"])


async def snapshot(conn: psycopg.AsyncConnection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    tables = {}
    for name, query in TABLES.items():
        cur = await conn.execute(query)
        tables[name] = await cur.fetchall()
    return tables


async def count(conn: psycopg.AsyncConnection[Any], query: str, *params: Any) -> int:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def one(conn: psycopg.AsyncConnection[Any], query: str, *params: Any) -> dict[str, Any]:
    async with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        await cur.execute(query, params)
        rows = await cur.fetchall()
    assert len(rows) == 1, rows
    return rows[0]


async def last_entry_id(redis: Any) -> str:
    entries = await redis.xrevrange(KEYS.events, count=1)
    return str(entries[0][0])


async def pending(redis: Any) -> int:
    info = await redis.xpending(KEYS.events, PROJECTOR)
    return int(info["pending"])


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[psycopg_pool.AsyncConnectionPool[Any]]:
    pool = open_pool(database_url, max_size=2)
    await pool.open(wait=True)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def ledger(redis: Any) -> Ledger:
    return Ledger(redis)


# --------------------------------------------------------------------------- tests


async def test_open_close_position_projected(
    redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any]
) -> None:
    position_id, open_id, close_id = await open_and_close(ledger)
    consumer = projector_consumer(redis, pool, 0)
    handled = await consumer.burst()
    length = await redis.xlen(KEYS.events)
    assert handled == length

    position = await one(pg, "SELECT * FROM positions")
    assert str(position["id"]) == position_id
    assert position["status"] == "closed"
    assert position["realized_pnl"] == Decimal("99.09")  # (46000 - 45000) * 0.1 - (0.45 + 0.46)
    assert position["gross_pnl"] == Decimal("100")
    assert position["fees"] == Decimal("0.91")
    assert position["exit_price"] == Decimal("46000")
    assert position["entry_price"] == Decimal("45000")
    assert position["size"] == Decimal("0.1")
    assert position["unrealized_pnl"] == 0
    assert position["leverage"] == 10
    assert position["close_reason"] == "manual"
    assert position["closed_at"] is not None and position["closed_at"] >= position["created_at"]
    assert position["metadata"]["other_fees"] == {}
    assert Decimal(position["metadata"]["excess_qty"]) == 0

    cur = await pg.execute(
        "SELECT id::text, status, filled_qty, avg_fill_price, side, reduce_only, position_id::text"
        " FROM orders ORDER BY created_at, version"
    )
    orders = {row[0]: row[1:] for row in await cur.fetchall()}
    assert orders == {
        open_id: ("filled", Decimal("0.1"), Decimal("45000"), "buy", False, position_id),
        close_id: ("filled", Decimal("0.1"), Decimal("46000"), "sell", True, position_id),
    }

    cur = await pg.execute(
        "SELECT order_id::text, fill_id, quantity, price, fee, position_id::text FROM fills ORDER BY ts, fill_id"
    )
    fills = sorted(await cur.fetchall(), key=lambda r: r[1])
    assert fills == [
        (close_id, "f-close", Decimal("0.1"), Decimal("46000"), Decimal("0.46"), position_id),
        (open_id, "f-open", Decimal("0.1"), Decimal("45000"), Decimal("0.45"), position_id),
    ]

    assert await count(pg, "SELECT count(*) FROM ledger_events") == length
    # The archive is the log, entry for entry, with the data as published.
    cur = await pg.execute("SELECT entry_id, type, data, version FROM ledger_events ORDER BY entry_ms, entry_seq")
    archived = await cur.fetchall()
    log = await redis.xrange(KEYS.events)
    assert [(r[0], r[1], r[2]) for r in archived] == [(i, f["type"], json.loads(f["data"])) for i, f in log]

    assert await checkpoint(pg, 0) == await last_entry_id(redis)
    assert await pending(redis) == 0
    assert await redis.xlen(KEYS.dead) == 0

    # The history reads.
    history = await closed_positions(pg, USER)
    assert [(h["id"], h["realized_pnl"], h["status"]) for h in history] == [(position_id, Decimal("99.09"), "closed")]
    assert await closed_positions(pg, USER, exchange="binance") == []
    assert await closed_positions(pg, USER, exchange="okx", symbol=SYMBOL) != []
    assert await closed_positions(pg, "someone-else") == []
    finals = await final_orders(pg, USER, status="filled")
    assert {o["id"] for o in finals} == {open_id, close_id}
    assert await final_orders(pg, USER, status="cancelled") == []
    with pytest.raises(ValueError, match="final order status"):
        await final_orders(pg, USER, status="open")


async def test_redelivery_writes_nothing_twice(
    redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any]
) -> None:
    await open_and_close(ledger)
    order_id = await place(ledger)
    await ledger.send("cancel_order", order_id=order_id)
    await ledger.send("order_cancelled", order_id=order_id)
    consumer = projector_consumer(redis, pool, 0, settings=ConsumerSettings(batch_size=4))
    await consumer.burst()
    first = await snapshot(pg)
    mark = await checkpoint(pg, 0)
    assert len(first["ledger_events"]) == await redis.xlen(KEYS.events)

    # The whole log delivered again (as after a crash between COMMIT and XACK): skipped.
    await redis.xgroup_setid(KEYS.events, PROJECTOR, "0")
    assert await consumer.burst() == await redis.xlen(KEYS.events)
    assert await snapshot(pg) == first
    assert await checkpoint(pg, 0) == mark

    # Even with the tracking record lost, re-applying the log changes nothing (idempotent writes).
    await pg.execute("UPDATE projector_checkpoints SET entry_ms = 0, entry_seq = 0")
    await redis.xgroup_setid(KEYS.events, PROJECTOR, "0")
    await consumer.burst()
    assert await snapshot(pg) == first
    assert await checkpoint(pg, 0) == mark
    assert await pending(redis) == 0


async def test_a_batch_sent_in_chunks_writes_what_one_chunk_writes(
    redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's archive and fill rows go in chunks of ``projector.CHUNK`` entries: chunk
    boundaries inside an order's history, an unknown event type and an unreadable one between
    them, and a redelivery of the whole log change nothing against one chunk per batch."""
    position_id, open_id, close_id = await open_and_close(ledger)
    await redis.xadd(KEYS.events, {"type": "SomethingElse", "data": "not json"})
    order_id = await place(ledger)
    await ledger.send("record_fill", order_id=order_id, fill_id="f-1", quantity="0.04", price="40000")
    await ledger.send("cancel_order", order_id=order_id)
    await ledger.send("order_cancelled", order_id=order_id)
    entries = await redis.xlen(KEYS.events)
    settings = ConsumerSettings(batch_size=entries)

    consumer = projector_consumer(redis, pool, 0, settings=settings)
    monkeypatch.setattr(projector, "CHUNK", entries)
    assert await consumer.burst() == entries
    whole = await snapshot(pg)
    gaps = await (await pg.execute("SELECT entry_id, code FROM projector_gaps ORDER BY entry_id")).fetchall()
    assert [row[0] for row in whole["orders"]] == sorted(uuid.UUID(i) for i in (open_id, close_id, order_id))
    assert len(whole["ledger_events"]) == entries - 1 and len(whole["fills"]) == 3
    assert [row[0] for row in whole["positions"]] == [uuid.UUID(position_id)]
    assert [code for _, code in gaps] == ["UNKNOWN_TYPE"]

    for table in (*TABLES, "projector_checkpoints", "projector_gaps"):
        await pg.execute(f"DELETE FROM {table}")
    await redis.xgroup_setid(KEYS.events, PROJECTOR, "0")
    monkeypatch.setattr(projector, "CHUNK", 2)
    assert await consumer.burst() == entries
    assert await snapshot(pg) == whole
    assert await (await pg.execute("SELECT entry_id, code FROM projector_gaps ORDER BY entry_id")).fetchall() == gaps

    await redis.xgroup_setid(KEYS.events, PROJECTOR, "0")
    await consumer.burst()
    assert await snapshot(pg) == whole
    assert await checkpoint(pg, 0) == await last_entry_id(redis)


async def test_orders_cancelled_rejected_expired_and_late_fill(
    redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any]
) -> None:
    cancelled = await place(ledger, client_order_id="my-1", grid_level=3)
    await ledger.send("order_accepted", order_id=cancelled, exchange_order_id="okx-111")
    await ledger.send("cancel_order", order_id=cancelled)
    rejected = await place(ledger)
    await ledger.send("order_rejected", order_id=rejected, reason="insufficient margin")
    expired = await place(ledger, side="sell", order_type="market", price=None)
    await ledger.send("order_expired", order_id=expired)
    open_order = await place(ledger)
    consumer = projector_consumer(redis, pool, 0)
    await consumer.burst()

    # pending_cancel is not final: no row yet; neither is an open order.
    cur = await pg.execute("SELECT id::text, status, reject_reason FROM orders")
    assert {r[0]: r[1:] for r in await cur.fetchall()} == {
        rejected: ("rejected", "insufficient margin"),
        expired: ("expired", None),
    }

    await ledger.send("order_cancelled", order_id=cancelled)
    await consumer.burst()
    row = await one(pg, "SELECT * FROM orders WHERE id = %s", cancelled)
    assert row["status"] == "cancelled"
    assert row["exchange_order_id"] == "okx-111"
    assert row["client_order_id"] == "my-1"
    assert row["grid_level"] == 3
    assert row["filled_qty"] == 0 and row["avg_fill_price"] is None
    assert row["version"] == 4
    assert row["price"] == Decimal("40000") and row["quantity"] == Decimal("0.1")

    # A fill the venue reports after the cancel: recorded as late, the row follows.
    await ledger.send("record_fill", order_id=cancelled, fill_id="late-1", quantity="0.04", price="39990", fee="0.02")
    await consumer.burst()
    row = await one(pg, "SELECT * FROM orders WHERE id = %s", cancelled)
    assert row["status"] == "cancelled"
    assert row["filled_qty"] == Decimal("0.04")
    assert row["avg_fill_price"] == Decimal("39990")
    assert row["version"] == 5
    fill = await one(pg, "SELECT * FROM fills WHERE order_id = %s", cancelled)
    assert fill["late"] is True and fill["quantity"] == Decimal("0.04") and fill["fee"] == Decimal("0.02")
    assert await count(pg, "SELECT count(*) FROM orders WHERE id = %s", open_order) == 0
    assert await count(pg, "SELECT count(*) FROM ledger_events") == await redis.xlen(KEYS.events)
    finals = await final_orders(pg, USER)
    assert [o["id"] for o in finals][0] == cancelled  # latest update first
    assert {o["status"] for o in finals} == {"cancelled", "rejected", "expired"}


async def test_an_order_whose_whole_history_is_in_the_batch_is_not_read_back(
    redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    read_back: list[list[str]] = []
    execute = psycopg.AsyncConnection.execute

    async def recording(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        if query == projector._SQL["order_events"]:
            read_back.append(sorted(params["ids"]))
        return await execute(self, query, params, **kwargs)

    monkeypatch.setattr(psycopg.AsyncConnection, "execute", recording)
    expired = await place(ledger, side="sell", order_type="market", price=None)
    await ledger.send("order_expired", order_id=expired)
    cancelled = await place(ledger)
    consumer = projector_consumer(redis, pool, 0)
    await consumer.burst()  # the expired order's versions 1 and 2: folded from the batch
    await ledger.send("cancel_order", order_id=cancelled)
    await ledger.send("order_cancelled", order_id=cancelled)
    await consumer.burst()  # versions 2 and 3 of the cancelled one: its version 1 is read back

    assert read_back == [[cancelled]]
    cur = await pg.execute("SELECT id::text, status, version, quantity FROM orders ORDER BY version")
    assert await cur.fetchall() == [
        (expired, "expired", 2, Decimal("0.1")),
        (cancelled, "cancelled", 3, Decimal("0.1")),
    ]


async def test_liquidated_position(redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any]) -> None:
    opened = await ledger.send(
        "open_position",
        exchange="okx",
        symbol=SYMBOL,
        side="short",
        size="2",
        leverage=20,
        stop_loss="3100",
        metadata={"strategy": "grid-7"},
    )
    await ledger.send("record_fill", order_id=opened["order_id"], fill_id="s1", quantity="2", price="3000", fee="1.2")
    await ledger.send("liquidate_position", position_id=opened["position_id"], price="3140")
    await projector_consumer(redis, pool, 0).burst()
    row = await one(pg, "SELECT * FROM positions")
    assert row["status"] == "liquidated"
    assert row["close_reason"] == "liquidation"
    assert row["exit_price"] == Decimal("3140")
    assert row["gross_pnl"] == Decimal("-280")
    assert row["realized_pnl"] == Decimal("-281.2")
    assert row["metadata"]["strategy"] == "grid-7"
    assert row["metadata"]["stop_loss"] == "3100"
    history = await closed_positions(pg, USER, symbol=SYMBOL)
    assert [h["status"] for h in history] == ["liquidated"]


async def test_duplicate_venue_order_id_does_not_crash_loop(
    redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any]
) -> None:
    async def accepted_and_cancelled(venue_id: str) -> str:
        order_id = await place(ledger)
        await ledger.send("order_accepted", order_id=order_id, exchange_order_id=venue_id)
        await ledger.send("order_expired", order_id=order_id)
        return order_id

    consumer = projector_consumer(redis, pool, 0)
    first = await accepted_and_cancelled("V1")
    await consumer.burst()
    second = await accepted_and_cancelled("V1")  # the venue reused the id: a later batch
    third = await accepted_and_cancelled("V2")
    fourth = await accepted_and_cancelled("V2")  # the same batch
    await consumer.burst()

    cur = await pg.execute("SELECT id::text, exchange_order_id, metadata FROM orders")
    rows = {r[0]: (r[1], r[2]) for r in await cur.fetchall()}
    assert rows[first] == ("V1", {})
    assert rows[third] == ("V2", {})
    assert rows[second] == (None, {"duplicate_exchange_order_id": "V1", "duplicate_of_order_id": first})
    assert rows[fourth] == (None, {"duplicate_exchange_order_id": "V2", "duplicate_of_order_id": third})
    assert await pending(redis) == 0
    assert await redis.xlen(KEYS.dead) == 0
    assert await checkpoint(pg, 0) == await last_entry_id(redis)


async def test_a_venue_order_id_another_writer_takes_meanwhile_is_checked_again(
    redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any], database_url: str
) -> None:
    """Another shard's projector writes an order with the same venue id between this batch's
    check and its write (its transaction not committed yet): the write waits on the unique index,
    fails once the other commits, and is checked again in the same transaction: the order is
    written without the venue id, naming the other, and nothing is dead-lettered."""
    consumer = projector_consumer(redis, pool, 0)
    model = await place(ledger)
    await ledger.send("order_accepted", order_id=model, exchange_order_id="V0")
    await ledger.send("order_expired", order_id=model)
    await consumer.burst()
    mine = await place(ledger)
    await ledger.send("order_accepted", order_id=mine, exchange_order_id="V9")
    await ledger.send("order_expired", order_id=mine)

    other = str(uuid.uuid4())
    async with await psycopg.AsyncConnection.connect(database_url) as writer:
        await writer.execute("CREATE TEMP TABLE o AS SELECT * FROM orders WHERE id = %s::uuid", (model,))
        await writer.execute("UPDATE o SET id = %s::uuid, exchange_order_id = 'V9'", (other,))
        await writer.execute("INSERT INTO orders SELECT * FROM o")
        projecting = asyncio.create_task(consumer.burst())

        async def blocked() -> bool:
            cur = await pg.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            row = await cur.fetchone()
            return row is not None and row[0] == 1

        await wait_for(blocked, 10, "the projector's write to wait on the other writer's venue id", step=0.02)
        with structlog.testing.capture_logs() as logs:
            await writer.commit()
            await projecting
    assert [line["attempt"] for line in logs if line["event"].startswith("venue order id taken concurrently")] == [1]

    cur = await pg.execute(
        "SELECT id::text, exchange_order_id, metadata FROM orders WHERE id = ANY(%s::uuid[])", ([mine, other],)
    )
    rows = {r[0]: (r[1], r[2]) for r in await cur.fetchall()}
    assert rows == {
        other: ("V9", {}),
        mine: (None, {"duplicate_exchange_order_id": "V9", "duplicate_of_order_id": other}),
    }
    assert await pending(redis) == 0
    assert await redis.xlen(KEYS.dead) == 0
    assert await checkpoint(pg, 0) == await last_entry_id(redis)


async def test_unknown_event_type_is_archived_and_skipped(
    redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any]
) -> None:
    await place(ledger)
    future = {
        "type": "OrderAmended",
        "event_id": str(uuid.uuid4()),
        "stream": str(uuid.uuid4()),
        "version": 1,
        "command_id": "c-future",
        "user_id": USER,
        "exchange": "okx",
        "symbol": SYMBOL,
        "ts": 1_700_000_000_000,
        "schema": 1,
        "new_field": "x",
    }
    await redis.xadd(KEYS.events, {"type": "OrderAmended", "data": json.dumps(future)})
    await redis.xadd(KEYS.events, {"type": "SomethingElse", "data": "not json"})
    await projector_consumer(redis, pool, 0).burst()
    cur = await pg.execute("SELECT type FROM ledger_events ORDER BY entry_ms, entry_seq")
    assert [r[0] for r in await cur.fetchall()] == ["OrderPlaced", "OrderAmended"]
    assert await checkpoint(pg, 0) == await last_entry_id(redis)
    assert await redis.xlen(KEYS.dead) == 0


async def test_archive_keeps_each_event_text_exactly(
    redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any]
) -> None:
    """data_raw is the entry's text byte for byte (spacing, key order, escapes, text around the
    object) and data its JSON object, however the batch carries the text to PostgreSQL."""
    await place(ledger)

    def text(n: int, around: str) -> str:
        body = (
            f'{{ "version" : 1,\n  "type": "OrderAmended", "event_id": "{uuid.uuid4()}", "stream": "{uuid.uuid4()}",'
            f' "user_id": "{USER}", "ts": 1700000000000, "n": {n}, "note": "q\\"b\\u00e9 \\ud83d\\ude00\\\\ {{}}" }}'
        )
        return f"{around}{body}{around}"

    texts = [text(1, ""), text(2, " "), text(3, "\n")]
    for data in texts:
        await redis.xadd(KEYS.events, {"type": "OrderAmended", "data": data})
    await projector_consumer(redis, pool, 0).burst()
    cur = await pg.execute(
        "SELECT data_raw, data FROM ledger_events WHERE type = 'OrderAmended' ORDER BY entry_ms, entry_seq"
    )
    rows = await cur.fetchall()
    assert rows == [(data, json.loads(data)) for data in texts]
    assert rows[0][1]["note"] == 'q"b\u00e9 \U0001f600\\ {}'


async def test_broken_event_is_dead_lettered_not_skipped(
    redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any]
) -> None:
    """An entry that fails while later ones succeed is retried (not skipped as 'committed')."""
    await redis.xadd(KEYS.events, {"type": "OrderPlaced", "data": '{"broken": true}'})
    await place(ledger)
    consumer = projector_consumer(redis, pool, 0, settings=ConsumerSettings(max_deliveries=2))
    for _ in range(5):
        await consumer.burst()
    assert await count(pg, "SELECT count(*) FROM ledger_events") == 1
    assert await redis.xlen(KEYS.dead) == 1
    dead = (await redis.xrange(KEYS.dead))[0][1]
    assert "OrderPlaced" in json.dumps(dead)
    assert await pending(redis) == 0


async def test_one_projector_per_shard(redis: Any, ledger: Ledger, pool: Any) -> None:
    await place(ledger)
    active = projector_consumer(redis, pool, 0, name="a")
    standby = projector_consumer(redis, pool, 0, name="b")
    assert await active.burst() == 1
    await place(ledger)
    assert await standby.burst() == 0  # the lease is held by "a"
    assert await redis.get(lease_key(0)) == "a"
    assert lease_key(0) == "ledger:{0}:lease:ledger-projector"
    assert await active.burst() == 1


async def test_serve_projector_reads_batch_factor_times_the_batch_size(redis: Any, database_url: str) -> None:
    (service,) = await projector_role(redis, Settings(database_url=database_url, batch_size=10))
    assert service.settings.batch_size == 10 * BATCH_FACTOR == 80


async def test_projector_handle_is_one_transaction(
    redis: Any, ledger: Ledger, pool: Any, pg: psycopg.AsyncConnection[Any]
) -> None:
    """A failure in the middle of a batch leaves nothing of it behind."""
    await open_and_close(ledger)
    await pg.execute("ALTER TABLE positions ADD CONSTRAINT test_no_positions CHECK (status = 'open') NOT VALID")
    entries = await redis.xrange(KEYS.events)
    from consumers.entries import Entry

    projector = Projector(pool, redis, 0)
    with pytest.raises(psycopg.errors.CheckViolation):
        await projector.project([Entry(i, f) for i, f in entries])
    assert await count(pg, "SELECT count(*) FROM ledger_events") == 0
    assert await count(pg, "SELECT count(*) FROM fills") == 0
    assert await checkpoint(pg, 0) is None
    await pg.execute("ALTER TABLE positions DROP CONSTRAINT test_no_positions")
    result = await projector.project([Entry(i, f) for i, f in entries])
    assert (result.events, result.fills, result.positions, result.orders) == (len(entries), 2, 1, 2)


# --------------------------------------------------------------------------- crash and outage


def _serve(
    redis_url: str, database_url: str, home: Path, *, program: Sequence[str] = ("-m", "ledger.app.cli"), **env: str
) -> subprocess.Popen[bytes]:
    environment = {
        **os.environ,
        "LEDGER_REDIS_URL": redis_url,
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_HOME": str(home),
        "LEDGER_SHARDS": "1",
        "LEDGER_LOG_FORMAT": "json",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, *program, "serve", "--role", "projector"],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def test_kill_between_commit_and_xack(
    redis: Any,
    redis_url: str,
    database_url: str,
    ledger: Ledger,
    pg: psycopg.AsyncConnection[Any],
    tmp_path: Path,
) -> None:
    position_id, _, _ = await open_and_close(ledger)
    for _ in range(2):  # more events than one batch of the projector
        order_id = await place(ledger)
        await ledger.send("order_rejected", order_id=order_id, reason="no")
    length = await redis.xlen(KEYS.events)
    log = await redis.xrange(KEYS.events)
    # One process (the fault is patched into this one); serve's projector reads BATCH_FACTOR
    # times LEDGER_BATCH_SIZE entries a batch.
    settings = {"LEDGER_BATCH_SIZE": "1", "LEDGER_CLAIM_IDLE_MS": "1000", "LEDGER_PROCESSES": "1"}
    first = BATCH_FACTOR
    assert length > first

    crashing = _serve(
        redis_url, database_url, tmp_path, program=[str(ROOT / "tests" / "crash_after_commit.py")], **settings
    )
    try:
        output, _ = await asyncio.to_thread(crashing.communicate, timeout=60)
    finally:
        if crashing.poll() is None:
            crashing.kill()
    assert crashing.returncode == -signal.SIGKILL, output.decode()
    # The first batch is committed, but not acknowledged.
    assert await checkpoint(pg, 0) == log[first - 1][0]
    assert await count(pg, "SELECT count(*) FROM ledger_events") == first
    assert await pending(redis) == first

    survivor = _serve(redis_url, database_url, tmp_path, **settings)
    try:

        async def caught_up() -> bool:
            return await count(pg, "SELECT count(*) FROM ledger_events") == length and await pending(redis) == 0

        await wait_for(caught_up, 30, "the second projector to catch up")
        survivor.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(survivor.communicate, timeout=30)
        assert survivor.returncode == 0, output.decode()
    finally:
        if survivor.poll() is None:
            survivor.kill()
            survivor.wait()

    assert b"claimed" in output or b"lease taken" in output
    assert await count(pg, "SELECT count(DISTINCT event_id) FROM ledger_events") == length
    assert await count(pg, "SELECT count(*) FROM fills") == 2
    assert await count(pg, "SELECT count(*) FROM positions WHERE id = %s", position_id) == 1
    assert await count(pg, "SELECT count(*) FROM orders") == 4
    assert await checkpoint(pg, 0) == log[-1][0]
    assert await redis.xlen(KEYS.dead) == 0


async def test_postgres_outage_backs_off_and_catches_up(redis: Any, database_url: str, postgres_server: Any) -> None:
    ledger = Ledger(redis)
    fast = ConsumerSettings(block_ms=100, claim_idle_ms=5000, backoff_max_s=1.0)
    ledger.consumer.settings = fast
    pool = open_pool(database_url, max_size=2, timeout=2.0)
    await pool.open(wait=True)
    stop = asyncio.Event()
    projector = projector_consumer(redis, pool, 0, settings=fast)
    tasks = [asyncio.create_task(ledger.consumer.run(stop)), asyncio.create_task(projector.run(stop))]

    async def archived() -> int:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            return await count(conn, "SELECT count(*) FROM ledger_events")

    async def send(type_: str, **data: Any) -> dict[str, Any]:
        reply = await ledger.reply(await ledger.publish(type_, **data))
        assert reply["status"] == "accepted", reply
        return reply

    try:
        opened = await send("open_position", exchange="okx", symbol=SYMBOL, side="long", size="0.1", leverage=5)
        await send("record_fill", order_id=opened["order_id"], fill_id="o1", quantity="0.1", price="45000", fee="0.45")

        async def caught_up() -> bool:
            return await archived() == await redis.xlen(KEYS.events)

        await wait_for(caught_up, 10, "the projector to archive the first events")

        await asyncio.to_thread(postgres_server.stop)
        # The handler keeps deciding while PostgreSQL is down: replies arrive, the log grows.
        closing = await send("close_position", position_id=opened["position_id"])
        await send("record_fill", order_id=closing["order_id"], fill_id="c1", quantity="0.1", price="46000", fee="0.46")
        for n in range(10):
            order = await send(
                "place_order", exchange="okx", symbol=SYMBOL, side="buy", order_type="market", quantity="0.01"
            )
            await send("record_fill", order_id=order["order_id"], fill_id=f"m{n}", quantity="0.01", price="45500")
        await asyncio.sleep(3)  # several failed attempts and backoffs
        assert await redis.xlen(KEYS.dead) == 0
        groups = {g["name"]: g for g in await redis.xinfo_groups(KEYS.events)}
        assert groups[PROJECTOR]["pending"] + (groups[PROJECTOR]["lag"] or 0) > 0
        assert not any(t.done() for t in tasks)

        await asyncio.to_thread(postgres_server.start)
        await wait_for(caught_up, 30, "the projector to catch up after the outage")
        await wait_for(lambda: _no_pending(redis), 10, "the projector to acknowledge")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await pool.close()

    length = await redis.xlen(KEYS.events)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        assert await count(conn, "SELECT count(DISTINCT event_id) FROM ledger_events") == length
        assert await count(conn, "SELECT count(*) FROM fills") == 12
        assert await count(conn, "SELECT count(*) FROM orders WHERE status = 'filled'") == 12
        position = await one(conn, "SELECT status, realized_pnl FROM positions")
        assert position == {"status": "closed", "realized_pnl": Decimal("99.09")}
        assert await checkpoint(conn, 0) == await last_entry_id(redis)
    assert await redis.xlen(KEYS.dead) == 0


async def _no_pending(redis: Any) -> bool:
    return await pending(redis) == 0
