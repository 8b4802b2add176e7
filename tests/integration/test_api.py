"""Issue 4: the seed API (``PositionManager`` / ``OrderManager``, CONTRACT §10) end to end.

The ledger runs in-process (``serve`` as a task, real Redis and PostgreSQL); the API is used as a
strategy would use it, and what it returns is checked against the live keys, the event log and
the PostgreSQL history, with every amount computed by hand (paper fee rate 0.0005 on each fill).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis
import structlog

from ledger import (
    CommandRejected,
    Exchange,
    Fill,
    LedgerTimeout,
    Order,
    OrderManager,
    OrderSide,
    OrderStatus,
    OrderType,
    PnLInfo,
    Position,
    PositionManager,
    PositionSide,
    PositionStatus,
)
from ledger.domain.mapping import ORDER
from ledger.store.eventstore import ORDER_SNAPSHOT
from tests.live_helpers import (
    BTC,
    ETH,
    SOL,
    UUID,
    WEEK_S,
    events_of,
    hash_of,
    members,
    quiesce,
    running_ledger,
    shard_of_user,
    wait_for,
    wait_order_status,
)
from tests.pipeline_helpers import UUID7

USER = "user123"
FEE = Decimal("0.0005")
ALL_ROLES = ("handler", "projection", "paper", "projector")


def pct(numerator: Decimal, denominator: Decimal) -> Decimal:
    """``numerator / denominator * 100`` the way CONTRACT §7 rounds: 28 digits, half-even."""
    with localcontext() as ctx:
        ctx.prec = 28
        return numerator / denominator * 100


async def pg_rows(database_url: str, query: str, *params: Any) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        async with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            await cur.execute(query, params)
            return await cur.fetchall()


async def last_event_id(redis: Any, shard: int = 0) -> str:
    newest = await redis.xrevrange(f"ledger:{{{shard}}}:events", count=1)
    if not newest:
        return "0-0"
    entry_id = newest[0][0]
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def fill_command(user: str, order_id: str, fill_id: str, quantity: str, price: str, fee: str) -> dict[str, str]:
    data = {
        "command_id": f"cmd-{fill_id}",
        "user_id": user,
        "order_id": order_id,
        "fill_id": fill_id,
        "quantity": quantity,
        "price": price,
        "fee": fee,
    }
    return {"type": "record_fill", "data": json.dumps(data)}


# --------------------------------------------------------------------------- the seed's test


async def test_seed_lifecycle_open_hash_close_postgres_row_with_exact_pnl(
    redis: Any, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path, roles=ALL_ROLES, database_url=database_url):
        manager = PositionManager(redis)
        position = await manager.open_position(
            "user123", "okx", "BTC-USDT-SWAP", "long", Decimal("0.1"), 10, price=Decimal("45000")
        )
        assert isinstance(position, Position) and UUID.fullmatch(str(position.id))
        assert (position.status, position.size, position.entry_price, position.leverage) == (
            PositionStatus.OPEN,
            Decimal("0.1"),
            Decimal("45000"),
            10,
        )
        assert position.fees == Decimal("2.25") and position.realized_pnl == Decimal("-2.25")

        key = "positions:user123:okx:BTC-USDT-SWAP:long"
        assert await redis.hget(key, "size") == "0.1"
        assert await redis.hget(key, "status") == "open"
        assert await redis.hget(key, "id") == position.id

        assert await manager.close_position(str(position.id), price=Decimal("46000")) is True
        assert not await redis.exists(key)
        assert position.id not in await members(redis, "positions:active")

        async def closed_row() -> list[dict[str, Any]]:
            return await pg_rows(database_url, "SELECT * FROM positions WHERE id = %s", position.id)

        (row,) = await wait_for(closed_row, "the projector to write the closed position", timeout=10)
        # By hand: gross (46000 - 45000) * 0.1 = 100; fees 0.1*45000*0.0005 + 0.1*46000*0.0005 = 2.25 + 2.3.
        gross = (Decimal(46000) - Decimal(45000)) * Decimal("0.1")
        fees = Decimal("0.1") * 45000 * FEE + Decimal("0.1") * 46000 * FEE
        assert (gross, fees, gross - fees) == (Decimal(100), Decimal("4.55"), Decimal("95.45"))
        assert row["status"] == "closed"
        assert row["realized_pnl"] == Decimal("95.45")
        assert row["gross_pnl"] == gross and row["fees"] == fees
        assert (row["entry_price"], row["exit_price"], row["size"], row["leverage"]) == (
            Decimal(45000),
            Decimal(46000),
            Decimal("0.1"),
            10,
        )
        assert (row["user_id"], row["exchange"], row["symbol"], row["side"]) == ("user123", "okx", BTC, "long")
        assert row["close_reason"] == "manual" and row["closed_at"] is not None

        async def both_orders() -> list[dict[str, Any]]:
            rows = await pg_rows(database_url, "SELECT * FROM orders ORDER BY created_at, side")
            return rows if len(rows) == 2 else []

        opening, closing = sorted(
            await wait_for(both_orders, "the two final orders in PostgreSQL"), key=lambda r: r["side"]
        )
        assert (opening["side"], opening["status"], opening["filled_qty"], opening["avg_fill_price"]) == (
            "buy",
            "filled",
            Decimal("0.1"),
            Decimal(45000),
        )
        assert (closing["side"], closing["status"], closing["filled_qty"], closing["avg_fill_price"]) == (
            "sell",
            "filled",
            Decimal("0.1"),
            Decimal(46000),
        )
        assert closing["reduce_only"] is True
        assert len(await pg_rows(database_url, "SELECT id FROM positions")) == 1


# --------------------------------------------------------------------------- orders


async def test_create_order_returns_the_order_as_the_projection_shows_it(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path, roles=("handler", "projection"), execution="external"):
        orders = OrderManager(redis)
        order = await orders.create_order(
            USER,
            "okx",
            BTC,
            "buy",
            "limit",
            Decimal("0.5"),
            "40000",
            client_order_id="grid-7",
            grid_level=7,
            metadata={"strategy": "grid"},
        )
        assert isinstance(order, Order) and UUID.fullmatch(str(order.id))
        assert (order.user_id, order.exchange, order.symbol, order.side, order.order_type) == (
            USER,
            Exchange.OKX,
            BTC,
            OrderSide.BUY,
            OrderType.LIMIT,
        )
        assert (order.quantity, order.price, order.filled_qty, order.remaining_qty, order.fill_percentage) == (
            Decimal("0.5"),
            Decimal("40000"),
            Decimal(0),
            Decimal("0.5"),
            Decimal(0),
        )
        assert (order.status, order.version, order.client_order_id, order.grid_level, order.metadata) == (
            OrderStatus.PENDING,
            1,
            "grid-7",
            7,
            {"strategy": "grid"},
        )
        raw = await hash_of(redis, f"orders:{order.id}")
        assert (raw["status"], raw["quantity"], raw["price"], raw["grid_level"], raw["version"]) == (
            "pending",
            "0.5",
            "40000",
            "7",
            "1",
        )
        assert order == Order.from_live(raw) == await orders.get_order(str(order.id))
        # A GRID order's snapshot maps to its live hash too (what a later create_order returns).
        assert (
            ORDER.to_live(ORDER.values(ORDER_SNAPSHOT.decode(await redis.hget("ledger:{0}:orders", order.id)))) == raw
        )
        ((_id, type_name, placed),) = await events_of(redis, 0)
        assert type_name == "OrderPlaced" and placed["stream"] == order.id
        # No command_id given: the API's default, ``api-`` and a time-ordered (version 7) UUID.
        assert re.fullmatch(f"api-{UUID7}", placed["command_id"])
        assert order.created_at is not None and int(order.created_at.timestamp() * 1000) == placed["ts"]
        assert await members(redis, f"orders:open:okx:{BTC}") == {order.id}


@pytest.mark.parametrize(
    "options",
    [
        {"order_type": "limit", "price": "40000.10"},
        {"order_type": "market", "metadata": {"note": "ü", "n": [1, 2]}, "client_order_id": "c-7"},
        {"order_type": "stop_limit", "price": "39000", "trigger_price": "39500.0", "leverage": 5},
        {"order_type": "take_profit_market", "trigger_price": "45000", "position_side": "short"},
    ],
    ids=["limit", "market", "stop_limit", "take_profit_market"],
)
async def test_create_order_returns_in_one_round_trip_what_the_live_hash_shows(
    redis: Any, redis_url: str, tmp_path: Path, options: dict[str, Any]
) -> None:
    """While the projection is caught up the append step writes the live keys, and the reply's
    round trip brings the order's snapshot: no HGETALL, no wait on the progress stream; what it
    returns is what ``get_order`` reads from the hash, field for field."""
    async with running_ledger(redis_url, tmp_path, roles=("handler", "projection"), execution="external"):
        orders = OrderManager(redis)
        await orders.create_order(USER, "okx", BTC, "buy", "limit", Decimal("0.1"), "1")  # the scripts load
        await redis.config_resetstat()
        order = await orders.create_order(USER, "okx", BTC, "sell", quantity=Decimal("0.25"), **options)
        stats = await redis.info("commandstats")
        assert ("cmdstat_hgetall" in stats, "cmdstat_xread" in stats) == (False, False)
        raw = await hash_of(redis, f"orders:{order.id}")
        assert order == Order.from_live(raw) == await orders.get_order(str(order.id))
        assert (raw["status"], raw["quantity"], raw["version"]) == ("pending", "0.25", "1")


async def test_cancel_order_true_then_cancelled_and_false_for_filled_or_unknown(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path):
        await redis.hset("marks:okx", BTC, "45000")
        orders = OrderManager(redis)
        resting = await orders.create_order(USER, Exchange.OKX, BTC, OrderSide.BUY, OrderType.LIMIT, "0.1", "40000")
        await wait_order_status(redis, str(resting.id), OrderStatus.OPEN)

        assert await orders.cancel_order(str(resting.id)) is True
        # Read your writes: the request is projected when cancel_order returns.
        assert await redis.hget(f"orders:{resting.id}", "status") in {"pending_cancel", "cancelled"}
        await wait_order_status(redis, str(resting.id), OrderStatus.CANCELLED)
        assert resting.id not in await members(redis, f"orders:open:okx:{BTC}")
        assert WEEK_S - 60 < await redis.ttl(f"orders:{resting.id}") <= WEEK_S
        assert await orders.cancel_order(str(resting.id)) is False  # already final

        filled = await orders.create_order(USER, "okx", BTC, "sell", "market", "0.1", "45000")
        await wait_order_status(redis, str(filled.id), OrderStatus.FILLED)
        await quiesce(redis, 1)
        length = await redis.xlen("ledger:{0}:events")
        assert await orders.cancel_order(str(filled.id)) is False
        assert await redis.hget(f"orders:{filled.id}", "status") == "filled"
        assert await redis.xlen("ledger:{0}:events") == length  # a rejected command appends nothing

        assert await orders.cancel_order("00000000-0000-4000-8000-000000000000") is False


async def test_get_orders_filters_by_status_newest_first(redis: Any, redis_url: str, tmp_path: Path) -> None:
    async with running_ledger(redis_url, tmp_path):
        await redis.hset("marks:okx", BTC, "45000")
        orders = OrderManager(redis)
        open_order = await orders.create_order(USER, "okx", BTC, "buy", "limit", "0.1", "40000")
        await asyncio.sleep(0.005)
        cancelled = await orders.create_order(USER, "okx", BTC, "buy", "limit", "0.2", "39000")
        assert await orders.cancel_order(str(cancelled.id)) is True
        await asyncio.sleep(0.005)
        filled = await orders.create_order(USER, "okx", BTC, "sell", "market", "0.3", "45000")
        await wait_order_status(redis, str(cancelled.id), OrderStatus.CANCELLED)
        await wait_order_status(redis, str(filled.id), OrderStatus.FILLED)
        await wait_order_status(redis, str(open_order.id), OrderStatus.OPEN)

        everything = await orders.get_orders(USER, "okx")
        assert [o.id for o in everything] == [filled.id, cancelled.id, open_order.id]
        assert all(isinstance(o, Order) for o in everything)
        assert [o.id for o in await orders.get_orders(USER, "okx", status="open")] == [open_order.id]
        assert [o.id for o in await orders.get_orders(USER, "okx", OrderStatus.CANCELLED)] == [cancelled.id]
        (done,) = await orders.get_orders(USER, Exchange.OKX, status="filled")
        assert (done.id, done.filled_qty, done.avg_fill_price, done.fill_percentage) == (
            filled.id,
            Decimal("0.3"),
            Decimal(45000),
            Decimal(100),
        )
        assert await orders.get_orders(USER, "okx", status="rejected") == []
        assert await orders.get_orders(USER, "binance") == []
        assert await orders.get_orders("someone-else", "okx") == []
        with pytest.raises(ValueError):
            await orders.get_orders(USER, "okx", status="done")


# --------------------------------------------------------------------------- positions


async def test_get_positions_priced_at_the_marks_and_calculate_pnl(redis: Any, redis_url: str, tmp_path: Path) -> None:
    async with running_ledger(redis_url, tmp_path):
        manager = PositionManager(redis)
        btc = await manager.open_position(USER, "okx", BTC, "long", "0.1", 10, price="45000")
        eth = await manager.open_position(USER, Exchange.OKX, ETH, PositionSide.SHORT, Decimal("2"), 5, price="3000")

        unpriced = await manager.get_positions(USER, "okx")
        assert [(p.symbol, p.current_price, p.unrealized_pnl, p.pnl_percentage) for p in unpriced] == [
            (BTC, None, None, None),
            (ETH, None, None, None),
        ]

        await redis.hset("marks:okx", mapping={BTC: "46000", ETH: "2900"})
        long_, short = await manager.get_positions(USER, "okx")
        assert all(isinstance(p, Position) for p in (long_, short))
        # BTC long 0.1 @ 45000 x10 at 46000: (46000 - 45000) * 0.1 = 100 on a margin of 45000 * 0.1 / 10 = 450.
        assert (long_.id, long_.side, long_.size, long_.current_price) == (
            btc.id,
            PositionSide.LONG,
            Decimal("0.1"),
            Decimal(46000),
        )
        assert long_.unrealized_pnl == Decimal(100)
        assert long_.pnl_percentage == pct(Decimal(100), Decimal(450)) == Decimal("22.22222222222222222222222222")
        assert long_.notional_value == Decimal(4600)
        # ETH short 2 @ 3000 x5 at 2900: (3000 - 2900) * 2 = 200 on a margin of 3000 * 2 / 5 = 1200.
        assert (short.id, short.side, short.size, short.current_price) == (
            eth.id,
            PositionSide.SHORT,
            Decimal(2),
            Decimal(2900),
        )
        assert short.unrealized_pnl == Decimal(200)
        assert short.pnl_percentage == pct(Decimal(200), Decimal(1200)) == Decimal("16.66666666666666666666666667")
        assert short.notional_value == Decimal(5800)

        (only_eth,) = await manager.get_positions(USER, "okx", ETH)
        assert only_eth == short
        assert await manager.get_positions(USER, "okx", "XRP-USDT-SWAP") == []
        assert await manager.get_positions(USER, Exchange.BINANCE) == []
        assert await manager.get_position(str(btc.id)) == long_

        pnl = await manager.calculate_pnl(long_, "47000")
        assert isinstance(pnl, PnLInfo)
        entry_fee = Decimal("0.1") * 45000 * FEE  # 2.25
        assert (pnl.realized_pnl, pnl.unrealized_pnl, pnl.fees, pnl.current_price) == (
            -entry_fee,
            Decimal(200),
            entry_fee,
            Decimal(47000),
        )
        assert pnl.pnl_percentage == pct(Decimal(200), Decimal(450))
        assert pnl.total_pnl == Decimal("197.75")
        short_pnl = await manager.calculate_pnl(short, Decimal("3100"))
        assert (short_pnl.realized_pnl, short_pnl.unrealized_pnl) == (-(2 * 3000 * FEE), Decimal(-200))
        assert short_pnl.pnl_percentage == pct(Decimal(-200), Decimal(1200))

        with pytest.raises(ValueError):
            await manager.get_positions(USER, "kraken")


async def test_rejections_raise_command_rejected_with_the_code(redis: Any, redis_url: str, tmp_path: Path) -> None:
    async with running_ledger(redis_url, tmp_path):
        positions, orders = PositionManager(redis), OrderManager(redis)
        with pytest.raises(CommandRejected) as rejected:
            await positions.open_position(USER, "okx", "BTC/USDT", "short", "0.1", 1, price="45000")
        assert rejected.value.code == "SPOT_SHORT"
        assert rejected.value.reply["status"] == "rejected"
        assert rejected.value.reply["events"] == []
        with pytest.raises(CommandRejected) as rejected:
            await orders.create_order(USER, "okx", "BTC/USDT", "sell", "market", "1", "45000")
        assert rejected.value.code == "SPOT_SHORT"
        with pytest.raises(CommandRejected) as rejected:
            await orders.create_order(USER, "okx", BTC, "sell", "limit", "1", "45000", reduce_only=True)
        assert rejected.value.code == "NO_POSITION"
        assert await redis.xlen("ledger:{0}:events") == 0
        assert await orders.get_orders(USER, "okx") == []
        assert await positions.close_position("00000000-0000-4000-8000-000000000000") is False
        with pytest.raises(TypeError):
            await positions.open_position(USER, "okx", BTC, "long", 0.1, 1)  # type: ignore[arg-type]


async def test_open_position_in_external_mode_without_a_fill_times_out(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path, execution="external"):
        manager = PositionManager(redis, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(LedgerTimeout, match="external"):
            await manager.open_position(USER, "okx", BTC, "long", "0.1", 10, price="45000")
        assert 1.0 <= time.monotonic() - started < 5.0
        (entry,) = await OrderManager(redis).get_orders(USER, "okx")
        assert (entry.status, entry.order_type, entry.quantity) == (
            OrderStatus.PENDING,
            OrderType.MARKET,
            Decimal("0.1"),
        )
        assert await manager.get_positions(USER, "okx") == []

        # The strategy reports the fill: the entry order fills and the position opens.
        await redis.xadd("ledger:{0}:commands", fill_command(USER, str(entry.id), "x-1", "0.1", "45010", "0.1"))
        await wait_order_status(redis, str(entry.id), OrderStatus.FILLED)
        (position,) = await manager.get_positions(USER, "okx")
        assert (position.size, position.entry_price, position.fees) == (Decimal("0.1"), Decimal(45010), Decimal("0.1"))


# --------------------------------------------------------------------------- monitor_order_fills


async def test_monitor_order_fills_sees_every_fill_of_a_burst_of_1000(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path, execution="external"):
        orders = OrderManager(redis)
        ladder = [
            str((await orders.create_order(USER, "okx", SOL, "buy", "limit", "100", "100")).id) for _ in range(10)
        ]
        sentinel = str((await orders.create_order(USER, "okx", SOL, "buy", "limit", "1", "100")).id)
        elsewhere = str((await orders.create_order(USER, "binance", "SOL/USDT:USDT", "buy", "limit", "50", "100")).id)
        stranger = str((await orders.create_order("someone-else", "okx", SOL, "buy", "limit", "50", "100")).id)
        start = await last_event_id(redis)

        seen: list[Order] = []

        async def follow() -> None:
            async for order in orders.monitor_order_fills(USER, "okx", after=start):
                seen.append(order)
                if order.id == sentinel:
                    return

        monitor = asyncio.create_task(follow())
        commands = []
        for j in range(1, 101):
            commands += [fill_command(USER, ladder[i], f"t-{i}-{j}", "1", "100", "0.05") for i in range(10)]
            if j <= 50:  # fills the monitor must skip: another exchange, another user
                commands.append(fill_command(USER, elsewhere, f"b-{j}", "1", "100", "0.05"))
                commands.append(fill_command("someone-else", stranger, f"s-{j}", "1", "100", "0.05"))
            if j % 10 == 0:  # a venue repeating a trade id: a duplicate, not a second fill
                repeat = fill_command(USER, ladder[0], f"t-0-{j}", "1", "100", "0.05")
                commands.append({**repeat, "data": repeat["data"].replace("cmd-t-0", "again-t-0")})
        pipe = redis.pipeline(transaction=False)
        for fields in commands:
            pipe.xadd("ledger:{0}:commands", fields)
        await pipe.execute()
        await redis.xadd("ledger:{0}:commands", fill_command(USER, sentinel, "last", "1", "100", "0.05"))
        await asyncio.wait_for(monitor, timeout=40)

        assert len(seen) == 1001
        assert seen[-1].id == sentinel and seen[-1].status is OrderStatus.FILLED
        by_order: dict[str, list[Order]] = {}
        for order in seen[:-1]:
            assert (order.user_id, order.exchange, order.symbol) == (USER, Exchange.OKX, SOL)
            by_order.setdefault(str(order.id), []).append(order)
        assert set(by_order) == set(ladder)
        for order_id, updates in by_order.items():
            assert [o.filled_qty for o in updates] == [Decimal(n) for n in range(1, 101)], order_id
            assert [o.status for o in updates] == [OrderStatus.PARTIALLY_FILLED] * 99 + [OrderStatus.FILLED]
            versions = [o.version for o in updates]
            assert versions == sorted(set(versions)) and versions[0] == 2  # placed = 1, then one per fill
        assert {o.id for o in await orders.get_orders(USER, "okx", status="filled")} == {*ladder, sentinel}
        position = await hash_of(redis, f"positions:{USER}:okx:{SOL}:long")
        assert (position["size"], position["entry_price"]) == ("1001", "100")
        assert Decimal(position["fees"]) == Decimal("0.05") * 1001

        # The default start is "now": fills before the monitor starts are not replayed.
        fresh = str((await orders.create_order(USER, "okx", SOL, "buy", "limit", "1", "100")).id)
        late: list[Order] = []

        async def follow_from_now() -> None:
            async for order in orders.monitor_order_fills(USER, "okx"):
                late.append(order)
                return

        second = asyncio.create_task(follow_from_now())
        await asyncio.sleep(0.3)
        await redis.xadd("ledger:{0}:commands", fill_command(USER, fresh, "fresh", "1", "100", "0.05"))
        await asyncio.wait_for(second, timeout=10)
        assert [(o.id, o.filled_qty, o.status) for o in late] == [(fresh, Decimal(1), OrderStatus.FILLED)]


# --------------------------------------------------------------------------- clients


async def test_the_api_with_a_client_without_decode_responses(redis: Any, redis_url: str, tmp_path: Path) -> None:
    raw = aioredis.Redis.from_url(redis_url)  # bytes in, bytes out
    try:
        async with running_ledger(redis_url, tmp_path):
            await raw.hset("marks:okx", BTC, "45500")
            positions, orders = PositionManager(raw), OrderManager(raw)
            start = await last_event_id(raw)
            fills: list[Order] = []

            async def follow() -> None:
                async for order in orders.monitor_order_fills(USER, "okx", after=start):
                    fills.append(order)
                    return

            monitor = asyncio.create_task(follow())
            opened = await positions.open_position(USER, "okx", BTC, "long", "0.1", 10, price="45000")
            await asyncio.wait_for(monitor, timeout=10)
            assert fills[0].status is OrderStatus.FILLED and fills[0].filled_qty == Decimal("0.1")
            assert await raw.hget(f"positions:{USER}:okx:{BTC}:long", "size") == b"0.1"
            (priced,) = await positions.get_positions(USER, "okx")
            assert (priced.id, priced.current_price, priced.unrealized_pnl) == (opened.id, Decimal(45500), Decimal(50))

            resting = await orders.create_order(USER, "okx", BTC, "buy", "limit", "0.1", "40000", grid_level=1)
            await wait_order_status(redis, str(resting.id), OrderStatus.OPEN)
            assert [o.id for o in await orders.get_orders(USER, "okx", status="open")] == [resting.id]
            assert await orders.cancel_order(str(resting.id)) is True
            await wait_order_status(redis, str(resting.id), OrderStatus.CANCELLED)
            assert await positions.close_position(str(opened.id), price="46000") is True
            assert await positions.get_positions(USER, "okx") == []
            assert await positions.get_position(str(opened.id)) is None
    finally:
        await raw.aclose()


async def test_the_api_on_redis_cluster(redis_cluster: Any, redis_cluster_url: str, tmp_path: Path) -> None:
    users = ("user123", "grid-bot")
    assert shard_of_user(users[0], 4) != shard_of_user(users[1], 4)
    raw = aioredis.RedisCluster.from_url(redis_cluster_url)
    try:
        async with running_ledger(redis_cluster_url, tmp_path, shards=4):
            await redis_cluster.hset("marks:okx", BTC, "46000")
            for user, client in zip(users, (redis_cluster, raw), strict=True):
                positions, orders = PositionManager(client), OrderManager(client)
                opened = await positions.open_position(user, "okx", BTC, "long", "0.1", 10, price="45000")
                assert await redis_cluster.hget(f"positions:{user}:okx:{BTC}:long", "size") == "0.1"
                (priced,) = await positions.get_positions(user, "okx", BTC)
                assert (priced.id, priced.unrealized_pnl, priced.notional_value) == (
                    opened.id,
                    Decimal(100),
                    Decimal(4600),
                )
                resting = await orders.create_order(user, "okx", BTC, "buy", "limit", "0.1", "40000", grid_level=2)
                assert resting.status in {OrderStatus.PENDING, OrderStatus.OPEN}
                assert await orders.cancel_order(str(resting.id)) is True
                await wait_order_status(redis_cluster, str(resting.id), OrderStatus.CANCELLED)
                assert [o.id for o in await orders.get_orders(user, "okx", status="cancelled")] == [resting.id]
                assert await positions.close_position(str(opened.id), size="0.04", price="47000") is True
                (rest,) = await positions.get_positions(user, "okx")
                assert rest.size == Decimal("0.06")
                # realized: (47000 - 45000) * 0.04 = 80 minus fees 2.25 + 0.04*47000*0.0005 = 0.94
                assert rest.realized_pnl == Decimal(80) - Decimal("2.25") - Decimal("0.94")
            assert await members(redis_cluster, "positions:active") == {
                str(p.id) for user in users for p in await PositionManager(redis_cluster).get_positions(user, "okx")
            }
            assert len(await members(redis_cluster, "positions:active")) == 2
    finally:
        await raw.aclose()


# --------------------------------------------------------------------------- PostgreSQL down


async def test_the_live_projection_keeps_working_while_postgresql_is_down(
    redis: Any, redis_url: str, database_url: str, postgres_server: Any, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path, roles=ALL_ROLES, database_url=database_url):
        manager = PositionManager(redis)
        first = await manager.open_position(USER, "okx", BTC, "long", "0.1", 10, price="45000")
        assert await manager.close_position(str(first.id), price="46000") is True

        async def first_row() -> list[dict[str, Any]]:
            return await pg_rows(database_url, "SELECT id FROM positions")

        await wait_for(first_row, "the first closed position in PostgreSQL")

        postgres_server.stop()
        try:
            with pytest.raises(psycopg.OperationalError):
                await pg_rows(database_url, "SELECT 1")
            second = await manager.open_position(USER, "okx", BTC, "short", "0.2", 5, price="46000")
            assert await manager.close_position(str(second.id), price="45000") is True
            third = await manager.open_position(USER, "okx", ETH, "long", "1", 3, price="3000")
            # The live keys follow as usual.
            assert await members(redis, "positions:active") == {third.id}
            assert await members(redis, f"positions:index:{USER}:okx") == {third.id}
            assert not await redis.exists(f"positions:{USER}:okx:{BTC}:short")
            live = await hash_of(redis, f"positions:{USER}:okx:{ETH}:long")
            assert (live["id"], live["size"], live["entry_price"], live["leverage"], live["status"]) == (
                third.id,
                "1",
                "3000",
                "3",
                "open",
            )
            assert Decimal(live["fees"]) == Decimal("1.5")
            assert len(await OrderManager(redis).get_orders(USER, "okx", status="filled")) == 5
        finally:
            postgres_server.start()

        # History catches up, each event, fill, position and order exactly once.
        async def caught_up() -> bool:
            with contextlib.suppress(psycopg.OperationalError):
                rows = await pg_rows(database_url, "SELECT count(*) AS n FROM ledger_events")
                return rows[0]["n"] == await redis.xlen("ledger:{0}:events")
            return False

        await wait_for(caught_up, "the projector to catch up after PostgreSQL came back", timeout=30, step=0.2)
        await quiesce(redis, 1, groups=("ledger-paper", "ledger-projector"))
        length = await redis.xlen("ledger:{0}:events")
        assert length == 3 * 4 + 2 * 4  # 5 market orders: placed, accepted, filled + a position event each
        counts = (
            await pg_rows(
                database_url,
                "SELECT (SELECT count(*) FROM ledger_events) AS events,"
                " (SELECT count(DISTINCT entry_id) FROM ledger_events) AS entries,"
                " (SELECT count(*) FROM fills) AS fills, (SELECT count(*) FROM orders) AS orders,"
                " (SELECT count(*) FROM positions) AS positions",
            )
        )[0]
        assert counts == {"events": length, "entries": length, "fills": 5, "orders": 5, "positions": 2}
        (row,) = await pg_rows(database_url, "SELECT * FROM positions WHERE id = %s", second.id)
        # Short 0.2 @ 46000 closed @ 45000: gross (46000 - 45000) * 0.2 = 200; fees 4.6 + 4.5.
        assert (row["status"], row["gross_pnl"], row["fees"], row["realized_pnl"]) == (
            "closed",
            Decimal(200),
            Decimal("9.1"),
            Decimal("190.9"),
        )
        assert third.id not in {r["id"] for r in await pg_rows(database_url, "SELECT id::text FROM positions")}


# --------------------------------------------------------------------------- issue 7: retries, open orders, marks


def command(type_name: str, **data: Any) -> dict[str, str]:
    """A command entry as a strategy in another language publishes it."""
    return {"type": type_name, "data": json.dumps({"user_id": USER, **data})}


async def placed_orders(redis: Any) -> list[dict[str, Any]]:
    return [data for _id, type_name, data in await events_of(redis, 0) if type_name == "OrderPlaced"]


async def orders_of(redis: Any, symbol: str) -> list[str]:
    return [d["stream"] for d in await placed_orders(redis) if d["symbol"] == symbol]


async def test_open_position_returns_the_position_its_fills_changed_not_the_reply_s(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    """The entry order names position P1; before it fills, another order opens P1 and a third
    closes it, so the entry fill opens a new position P2: open_position returns P2."""
    async with running_ledger(redis_url, tmp_path, roles=("handler", "projection"), execution="external"):
        positions, orders = PositionManager(redis), OrderManager(redis)
        opening = asyncio.create_task(
            positions.open_position(USER, "okx", BTC, "long", "0.1", 10, price="47000", command_id="open-1")
        )
        reply_key = "ledger:{0}:reply:user123:open-1"
        await wait_for(lambda: placed_orders(redis), "the entry order")
        ((entry,),) = [await placed_orders(redis)]
        reserved = entry["position_id"]
        buy = await orders.create_order(USER, "okx", BTC, "buy", "market", "0.2", "45000", command_id="buy-1")
        await redis.xadd("ledger:{0}:commands", fill_command(USER, str(buy.id), "f-buy", "0.2", "45000", "0"))
        sell = await orders.create_order(USER, "okx", BTC, "sell", "market", "0.2", "46000", reduce_only=True)
        await redis.xadd("ledger:{0}:commands", fill_command(USER, str(sell.id), "f-sell", "0.2", "46000", "0"))
        await wait_order_status(redis, str(sell.id), OrderStatus.FILLED)
        assert await redis.exists(reply_key) == 0  # open_position read its reply
        await redis.xadd("ledger:{0}:commands", fill_command(USER, entry["stream"], "f-entry", "0.1", "47000", "0"))
        position = await asyncio.wait_for(opening, 10)

        opened = [d for _i, t, d in await events_of(redis, 0) if t == "PositionOpened"]
        assert [(d["stream"], d["order_id"]) for d in opened] == [
            (reserved, str(buy.id)),
            (position.id, entry["stream"]),
        ]
        assert position.id != reserved
        assert (position.size, position.entry_price, position.status) == (
            Decimal("0.1"),
            Decimal(47000),
            PositionStatus.OPEN,
        )
        assert await redis.hget(f"positions:{USER}:okx:{BTC}:long", "id") == position.id


async def test_a_retry_with_the_same_command_id_after_a_timeout_does_nothing_twice(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    # No handler: the reply never comes.
    async with running_ledger(redis_url, tmp_path, roles=("projection",), execution="external"):
        with pytest.raises(LedgerTimeout, match="retry with the same command_id"):
            await OrderManager(redis, timeout=1).create_order(
                USER, "okx", BTC, "buy", "limit", "0.1", "40000", grid_level=3, command_id="grid-3"
            )
    async with running_ledger(redis_url, tmp_path, roles=("handler", "projection"), execution="external"):
        orders, positions = OrderManager(redis), PositionManager(redis)
        first = await orders.create_order(
            USER, "okx", BTC, "buy", "limit", "0.1", "40000", grid_level=3, command_id="grid-3"
        )
        again = await orders.create_order(
            USER, "okx", BTC, "buy", "limit", "0.1", "40000", grid_level=3, command_id="grid-3"
        )
        assert first == again and first.status is OrderStatus.PENDING
        assert await redis.xlen("ledger:{0}:commands") == 3
        assert [d["stream"] for d in await placed_orders(redis)] == [first.id]

        assert await orders.cancel_order(str(first.id), command_id="cancel-3") is True
        assert await orders.cancel_order(str(first.id), command_id="cancel-3") is True
        await redis.xadd("ledger:{0}:commands", command("order_cancelled", command_id="venue-c3", order_id=first.id))
        await wait_order_status(redis, str(first.id), OrderStatus.CANCELLED)
        assert await orders.cancel_order(str(first.id), command_id="cancel-3") is True  # the first outcome
        assert await orders.cancel_order(str(first.id)) is False  # a new cancel of a final order
        requested = [t for _i, t, d in await events_of(redis, 0) if d["stream"] == first.id]
        assert requested == ["OrderPlaced", "OrderCancelRequested", "OrderCancelled"]

        # open_position: the entry order is not filled in time; the fill comes; the retry
        # returns the position the first call opened, with the size of one open.
        with pytest.raises(LedgerTimeout, match="retry with the same command_id"):
            await PositionManager(redis, timeout=1).open_position(
                USER, "okx", ETH, "long", "2", 5, price="3000", command_id="open-eth"
            )
        (entry,) = [d for d in await placed_orders(redis) if d["symbol"] == ETH]
        await redis.xadd("ledger:{0}:commands", fill_command(USER, entry["stream"], "f-eth", "2", "3000", "0.6"))
        opened = await positions.open_position(USER, "okx", ETH, "long", "2", 5, price="3000", command_id="open-eth")
        assert (opened.id, opened.size, opened.entry_price, opened.fees) == (
            entry["position_id"],
            Decimal(2),
            Decimal(3000),
            Decimal("0.6"),
        )
        assert (
            await positions.open_position(USER, "okx", ETH, "long", "2", 5, price="3000", command_id="open-eth")
            == opened
        )
        assert len([d for d in await placed_orders(redis) if d["symbol"] == ETH]) == 1

        # close_position: the same, and the retry still answers True once the position is closed.
        with pytest.raises(LedgerTimeout):
            await PositionManager(redis, timeout=1).close_position(str(opened.id), price="3100", command_id="close-eth")
        (exit_,) = [d for d in await placed_orders(redis) if d["symbol"] == ETH and d["reduce_only"]]
        await redis.xadd("ledger:{0}:commands", fill_command(USER, exit_["stream"], "f-eth-x", "2", "3100", "0.62"))
        assert await positions.close_position(str(opened.id), price="3100", command_id="close-eth") is True
        assert await positions.get_position(str(opened.id)) is None
        assert await positions.close_position(str(opened.id), price="3100", command_id="close-eth") is True
        assert await positions.close_position(str(opened.id), price="3100") is False
        assert len([d for d in await placed_orders(redis) if d["symbol"] == ETH]) == 2
        closed = [d for _i, t, d in await events_of(redis, 0) if t == "PositionClosed"]
        assert [(d["stream"], d["realized_pnl"]) for d in closed] == [(opened.id, "198.78")]


async def test_a_command_breaking_the_wire_rules_is_refused_before_it_is_published(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path, roles=("handler", "projection"), execution="external"):
        with pytest.raises(CommandRejected) as rejected:
            await OrderManager(redis).create_order(USER, "okx", BTC, "buy", "limit", "0.1", "40000", leverage=0)
        assert rejected.value.code == "INVALID_FIELD"
        assert rejected.value.reply["events"] == []
        assert "leverage" in str(rejected.value)
        with pytest.raises(ValueError, match=r"^quantity: must be a decimal string"):
            await OrderManager(redis).create_order(USER, "okx", BTC, "buy", "limit", "1e5", "40000")
        assert await redis.xlen("ledger:{0}:commands") == 0


async def test_get_orders_open_means_every_order_not_yet_final(redis: Any, redis_url: str, tmp_path: Path) -> None:
    async with running_ledger(redis_url, tmp_path, roles=("handler", "projection"), execution="external"):
        orders = OrderManager(redis)
        made: dict[str, str] = {}
        for status in (
            "pending",
            "open",
            "partially_filled",
            "pending_cancel",
            "filled",
            "cancelled",
            "rejected",
            "expired",
        ):
            order = await orders.create_order(USER, "okx", BTC, "buy", "limit", "1", "40000", client_order_id=status)
            made[status] = str(order.id)
            await asyncio.sleep(0.002)  # distinct created_at: newest first is well defined
        venue = [
            command("order_accepted", command_id="a-open", order_id=made["open"], exchange_order_id="x-1"),
            fill_command(USER, made["partially_filled"], "p-1", "0.4", "40000", "0"),
            fill_command(USER, made["filled"], "p-2", "1", "40000", "0"),
            command("order_cancelled", command_id="c-1", order_id=made["cancelled"]),
            command("order_rejected", command_id="r-1", order_id=made["rejected"], reason="no margin"),
            command("order_expired", command_id="e-1", order_id=made["expired"]),
        ]
        for fields in venue:
            await redis.xadd("ledger:{0}:commands", fields)
        assert await orders.cancel_order(made["pending_cancel"]) is True
        for status, order_id in made.items():
            await wait_order_status(redis, order_id, OrderStatus(status))

        newest_first = list(reversed(made))
        not_final = [s for s in newest_first if s in {"pending", "open", "partially_filled", "pending_cancel"}]
        for open_ in (OrderStatus.OPEN, "open"):
            assert [o.client_order_id for o in await orders.get_orders(USER, "okx", status=open_)] == not_final
        assert [o.client_order_id for o in await orders.get_orders(USER, "okx", exact_status="open")] == ["open"]
        for status in made:
            if status != "open":
                assert [o.client_order_id for o in await orders.get_orders(USER, "okx", status)] == [status]
                assert [o.client_order_id for o in await orders.get_orders(USER, "okx", exact_status=status)] == [
                    status
                ]
        assert [o.client_order_id for o in await orders.get_orders(USER, "okx")] == newest_first
        with pytest.raises(ValueError, match="give status or exact_status, not both"):
            await orders.get_orders(USER, "okx", status="open", exact_status="open")
        # The open-orders set of CONTRACT §6 agrees.
        assert await members(redis, f"orders:open:okx:{BTC}") == {made[s] for s in not_final}


async def test_invalid_marks_give_no_unrealized_pnl_and_a_warning_never_a_crash(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path, roles=("handler", "projection"), execution="external"):
        positions = PositionManager(redis)
        opened = {}
        for symbol in (BTC, ETH, SOL, "XRP-USDT-SWAP"):
            task = asyncio.create_task(positions.open_position(USER, "okx", symbol, "long", "1", 1, price="100"))
            (entry,) = await wait_for(lambda s=symbol: orders_of(redis, s), f"the entry order of {symbol}")
            await redis.xadd("ledger:{0}:commands", fill_command(USER, entry, f"f-{symbol}", "1", "100", "0"))
            opened[symbol] = await asyncio.wait_for(task, 10)
        await redis.hset("marks:okx", mapping={BTC: "NaN", ETH: "abc", SOL: "1e5", "XRP-USDT-SWAP": "101"})

        with structlog.testing.capture_logs() as logs:
            found = await positions.get_positions(USER, "okx")
            (btc,) = await positions.get_positions(USER, "okx", BTC)
            single = await positions.get_position(str(opened[SOL].id))
        assert [(p.symbol, p.current_price, p.unrealized_pnl, p.pnl_percentage, p.notional_value) for p in found] == [
            (BTC, None, None, None, None),
            (ETH, None, None, None, None),
            (SOL, None, None, None, None),
            ("XRP-USDT-SWAP", Decimal(101), Decimal(1), Decimal(1), Decimal(101)),
        ]
        assert (btc.current_price, btc.unrealized_pnl) == (None, None)
        assert single is not None and (single.id, single.unrealized_pnl) == (opened[SOL].id, None)
        warnings = [(e["event"], e["exchange"], e["symbol"], e["value"]) for e in logs if e["log_level"] == "warning"]
        invalid = "invalid mark ignored"
        assert warnings == [
            (invalid, "okx", BTC, "NaN"),
            (invalid, "okx", ETH, "abc"),
            (invalid, "okx", SOL, "1e5"),
            (invalid, "okx", BTC, "NaN"),
            (invalid, "okx", SOL, "1e5"),
        ]
        # calculate_pnl takes the caller's price under the same rule: "1e5" is refused, not read as 100000.
        with pytest.raises(ValueError, match="mark: must be a decimal string"):
            await positions.calculate_pnl(opened[BTC], "1e5")
        assert (await positions.calculate_pnl(opened[BTC], "110")).unrealized_pnl == Decimal(10)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fill_id", "t-1\n"),
        ("fill_id", "x" * 129),
        ("fee_currency", "USDT\n"),
        ("fee_currency", "US DT"),
        ("user_id", "alice\n"),
        ("symbol", f"{BTC}\n"),
    ],
)
def test_model_text_fields_follow_the_wire_rules_by_full_match(field: str, value: str) -> None:
    fields: dict[str, Any] = {"order_id": "o", "fill_id": "t-1", "quantity": "1", "price": "1", field: value}
    if field in {"user_id", "symbol"}:
        fields = {"user_id": USER, "exchange": "okx", "symbol": BTC, "side": "buy", "order_type": "market"}
        fields |= {"quantity": "1", field: value}
        model: type[Any] = Order
    else:
        model = Fill
    with pytest.raises(ValueError, match=f"{field}\n  Value error, must be "):
        model(**fields)
