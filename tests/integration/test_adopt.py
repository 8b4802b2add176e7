"""Adoption of venue orders the ledger never placed (issue 11, item 3): ``adopt_order`` through
reconciliation, against real servers (Redis, a Redis Cluster, PostgreSQL), the ledger in-process,
and the real ccxt OKX class talking HTTP to the stateful loopback venue (tests/venue_server.py).

The orders are booked at the loopback venue with a client id the ledger never derives (``web-1``:
the venue's own front end). Every expected value is computed by hand in the comments.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
from redis.asyncio.cluster import RedisCluster

from consumers.venue import LiveVenue
from ledger import OrderStatus
from ledger.app.replay import replay
from ledger.client.api import CommandRejected
from ledger.config import parse_execution
from ledger.domain import wire
from ledger.domain.enums import Exchange
from ledger.venues import commands
from ledger.venues.live import VenueClients
from projections.verify import verify
from tests.audit_helpers import ledger_cli
from tests.integration.test_reconcile import OKX_POSITION, USER, Ledger, _credentials
from tests.live_helpers import quiesce, running_ledger, wait_for
from tests.venue_server import LoopbackExchange

SWAP = "BTC-USDT-SWAP"  # OKX linear swap: 0.01 BTC a contract, settles in USDT
WEB = "web-1"  # a client id of the venue's front end, never one the ledger derives


async def _ledger(
    redis: Any, url: str, tmp_path: Path, venue: LoopbackExchange, *roles: str, **options: Any
) -> AsyncIterator[Ledger]:
    credentials = _credentials(tmp_path, venue)
    async with running_ledger(
        url, tmp_path, roles=("handler", "projection", *roles), execution="okx=live", credentials=credentials, **options
    ):
        yield Ledger(redis, venue, credentials)


async def _reconcile(ledger: Ledger) -> Any:
    return await ledger.positions.sync_positions_from_exchange(USER, "okx", venue=ledger.config, symbols=[SWAP])


def _adoption(venue_id: str, *fills: str, exchange: Exchange = Exchange.OKX) -> tuple[str, list[dict[str, str]]]:
    """The derived order id and what reconciliation records for the venue order: its adoption,
    then its trades (the live venue role's fill command ids)."""
    order_id = wire.adopted_order_id(USER, exchange, venue_id)
    adopt = {"command_id": commands.adopt_id(exchange, venue_id), "type": "adopt_order", "order_id": order_id}
    recorded = [adopt] + [
        {"command_id": commands.fill_command_id(order_id, f), "type": "record_fill", "order_id": order_id, "fill_id": f}
        for f in fills
    ]
    return order_id, recorded


async def test_a_filled_venue_order_with_two_trades_is_adopted_once_and_counts_like_any_order(
    redis: Any, redis_url: str, database_url: str, tmp_path: Path, okx: LoopbackExchange
) -> None:
    async for ledger in _ledger(redis, redis_url, tmp_path, okx, "projector", database_url=database_url):
        okx.book(WEB, SWAP, "buy", "10", "45100")  # 10 contracts = 0.1 BTC
        okx.fill(WEB, "4", "45000", "t-1", fee="0.009")  # 0.04 BTC
        okx.fill(WEB, "6", "45100", "t-2", fee="0.0135")  # 0.06 BTC: filled, so no longer open
        okx.positions = [{**OKX_POSITION, "pos": "10"}]  # the venue's 0.1 BTC long
        venue_id = okx.order(WEB).venue_id

        result = await _reconcile(ledger)

        order_id, recorded = _adoption(venue_id, "t-1", "t-2")
        assert (result.recorded, result.findings) == (recorded, [])
        order = await ledger.orders.get_order(order_id)
        assert order is not None
        assert (order.status, order.quantity, order.filled_qty, order.avg_fill_price) == (
            OrderStatus.FILLED,
            Decimal("0.1"),
            Decimal("0.1"),
            Decimal("45060"),  # (0.04 x 45000 + 0.06 x 45100) / 0.1
        )
        assert (order.exchange_order_id, order.client_order_id, order.price) == (venue_id, WEB, Decimal("45100"))
        (position,) = await ledger.positions.get_positions(USER, "okx")
        assert (position.symbol, position.size, position.entry_price, position.fees, position.realized_pnl) == (
            SWAP,
            Decimal("0.1"),
            Decimal("45060"),
            Decimal("0.0225"),  # 0.009 + 0.0135 USDT
            Decimal("-0.0225"),  # net: no reducing fill yet
        )

        again = await _reconcile(ledger)  # the order is the ledger's now: nothing twice
        assert (again.recorded, again.findings) == ([], [])

        twice = wire.AdoptOrder(
            command_id="by-hand-1",
            user_id=USER,
            exchange=Exchange.OKX,
            symbol=SWAP,
            side=order.side,
            order_type=order.order_type,
            quantity="0.1",
            exchange_order_id=venue_id,
        )
        with pytest.raises(CommandRejected) as rejected:
            await ledger.orders.client.submit(twice)
        assert rejected.value.reply["error"] == {
            "code": "INVALID_TRANSITION",
            "message": f"cannot adopt okx order {venue_id}: it is order {order_id} already",
        }
        assert rejected.value.reply["order_id"] == order_id
        stranger = wire.RecordFill(
            command_id="by-hand-2",
            user_id=USER,
            order_id=wire.adopted_order_id(USER, "okx", "999"),  # a venue order never adopted
            fill_id="t-9",
            quantity="0.01",
            price="45000",
        )
        with pytest.raises(CommandRejected) as rejected:
            await ledger.orders.client.submit(stranger)
        assert rejected.value.code == "UNKNOWN_ORDER"

        await quiesce(redis, 1, ("ledger-projector",))
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            assert (await verify(redis, conn, [0], 1)).differences == []
            replayed = await replay(redis, conn)
        (row,) = [r for r in replayed.orders if r["id"] == order_id]
        live = {k: v for k, v in (await redis.hgetall(f"orders:{order_id}")).items() if k in row}
        assert row == live
        assert (row["status"], row["exchange_order_id"], row["filled_qty"]) == ("filled", venue_id, "0.10")

        run = await ledger_cli(
            tmp_path, "history", order_id, "--json", LEDGER_REDIS_URL=redis_url, LEDGER_DATABASE_URL=database_url
        )
        assert run.status == 0, run.stderr
        steps = [(e["type"], e["command_id"], e["state"]["status"]) for e in run.json()["events"]]
        assert steps == [
            ("OrderAdopted", recorded[0]["command_id"], "open"),
            ("OrderFilled", recorded[1]["command_id"], "partially_filled"),
            ("OrderFilled", recorded[2]["command_id"], "filled"),
        ]


async def _open_order_is_adopted_and_followed(redis: Any, url: str, tmp_path: Path, okx: LoopbackExchange) -> None:
    async for ledger in _ledger(redis, url, tmp_path, okx):
        okx.book(WEB, SWAP, "sell", "5", "46000")  # 0.05 BTC, resting
        venue_id = okx.order(WEB).venue_id

        result = await _reconcile(ledger)

        order_id, recorded = _adoption(venue_id)
        assert (result.recorded, result.findings) == (recorded, [])
        order = await ledger.orders.get_order(order_id)
        assert order is not None
        assert (order.status, order.quantity, order.price, order.exchange_order_id) == (
            OrderStatus.OPEN,
            Decimal("0.05"),
            Decimal("46000"),
            venue_id,
        )
        assert await redis.sismember(f"orders:open:okx:{SWAP}", order_id)
        assert (await _reconcile(ledger)).recorded == []

        # The live venue role follows it like an order it sent (it never sends it).
        configs = {ledger.exchange: ledger.config}
        clients = VenueClients({ledger.exchange: ledger.config.options})
        venue = LiveVenue(redis, 0, configs=configs, clients=clients, execution=parse_execution("okx=live"))
        try:
            await venue.consumer.ensure_group()
            await redis.xgroup_setid(venue.keys.events, "ledger-venue", "0")  # read the adoption
            await venue.burst()
            record = (await venue.working())[order_id]
            assert (record.stage, record.exchange_order_id, record.client_id) == ("open", venue_id, WEB)
            okx.fill(WEB, "2", "46000", "t-7", fee="0.0092")  # 0.02 BTC
            assert await venue.tick() == 1
            filled = await wait_for(partial(_order_with, ledger, order_id, OrderStatus.PARTIALLY_FILLED), "the fill")
            assert filled.filled_qty == Decimal("0.02")
            assert await ledger.orders.cancel_order(order_id)
            await venue.burst()
            await venue.tick()
            await wait_for(partial(_order_with, ledger, order_id, OrderStatus.CANCELLED), "the venue's cancel")
        finally:
            await clients.close()
        assert okx.order(WEB).state == "canceled"
        assert okx.creates == {}  # nothing was ever sent
        (position,) = await ledger.positions.get_positions(USER, "okx")
        assert (position.side, position.size, position.entry_price, position.fees) == (
            "short",
            Decimal("0.02"),
            Decimal("46000"),
            Decimal("0.0092"),
        )


async def _order_with(ledger: Ledger, order_id: str, status: OrderStatus) -> Any:
    order = await ledger.orders.get_order(order_id)
    return order if order is not None and order.status is status else None


async def test_an_open_venue_order_is_adopted_and_the_venue_role_follows_it(
    redis: Any, redis_url: str, tmp_path: Path, okx: LoopbackExchange
) -> None:
    await _open_order_is_adopted_and_followed(redis, redis_url, tmp_path, okx)


async def test_adoption_on_a_redis_cluster(
    redis_cluster: RedisCluster, redis_cluster_url: str, tmp_path: Path, okx: LoopbackExchange
) -> None:
    await _open_order_is_adopted_and_followed(redis_cluster, redis_cluster_url, tmp_path, okx)


async def test_a_report_that_is_no_ledger_order_stays_a_finding_with_the_reason(
    redis: Any, redis_url: str, tmp_path: Path, okx: LoopbackExchange
) -> None:
    async for ledger in _ledger(redis, redis_url, tmp_path, okx):
        booked = okx.book(WEB, SWAP, "buy", "1", "45000")
        booked.ord_type = "post_only"  # ccxt reads OKX post_only as a limit order...
        booked.side = "long"  # ...but no order buys "long"
        events = await redis.xlen("ledger:{0}:events")

        result = await _reconcile(ledger)

        assert result.recorded == []
        (finding,) = result.findings
        assert (finding.kind, finding.subject) == ("unknown_order", booked.venue_id)
        assert finding.evidence["reason"] == (
            "not adopted: okx reports a limit long order: the ledger adopts limit, market, stop_limit, "
            "stop_market, take_profit_market orders that buy or sell"
        )
        assert (finding.evidence["client_order_id"], finding.evidence["status"]) == (WEB, "open")
        assert await redis.xlen("ledger:{0}:events") == events


async def test_a_cancelled_venue_order_with_a_trade_is_adopted_with_its_final_status(
    redis: Any, redis_url: str, tmp_path: Path, binance: LoopbackExchange
) -> None:
    async for ledger in _ledger(redis, redis_url, tmp_path, binance):
        binance.book("web_7f3a", "BTCUSDT", "buy", "0.01", "40000")
        binance.fill("web_7f3a", "0.004", "40000", "7001", fee="0.000004")
        binance.finish("web_7f3a", "canceled")  # no longer open: found through its trade
        venue_id = binance.order("web_7f3a").venue_id
        order_id, recorded = _adoption(venue_id, "7001", exchange=Exchange.BINANCE)

        result = await ledger.positions.sync_positions_from_exchange(
            USER, "binance", venue=ledger.config, symbols=["BTC/USDT"]
        )

        assert result.recorded == [
            *recorded,
            {"command_id": f"venue:{order_id}:cancel", "type": "order_cancelled", "order_id": order_id},
        ]
        assert result.findings == []
        order = await ledger.orders.get_order(order_id)
        assert order is not None
        assert (order.symbol, order.status, order.quantity, order.filled_qty, order.client_order_id) == (
            "BTC/USDT",
            OrderStatus.CANCELLED,
            Decimal("0.01"),
            Decimal("0.004"),
            "web_7f3a",
        )


async def test_upbit_open_order_is_adopted_with_the_trades_it_lists(
    redis: Any, redis_url: str, tmp_path: Path, upbit: LoopbackExchange
) -> None:
    """Upbit has no list of the account's trades: its open orders are adopted with their own trades."""
    async for ledger in _ledger(redis, redis_url, tmp_path, upbit):
        upbit.book("web-9", "KRW-BTC", "buy", "0.001", "50000000")
        upbit.fill("web-9", "0.0004", "50000000", "b3f7c1de-0000-4000-8000-000000000009", fee="10")
        venue_id = upbit.order("web-9").venue_id
        order_id, recorded = _adoption(venue_id, "b3f7c1de-0000-4000-8000-000000000009", exchange=Exchange.UPBIT)

        result = await ledger.positions.sync_positions_from_exchange(
            USER, "upbit", venue=ledger.config, symbols=["KRW-BTC"]
        )

        assert result.recorded == recorded
        assert result.findings == []
        order = await ledger.orders.get_order(order_id)
        assert order is not None
        assert (order.status, order.quantity, order.filled_qty, order.exchange_order_id) == (
            OrderStatus.PARTIALLY_FILLED,
            Decimal("0.001"),
            Decimal("0.0004"),
            venue_id,
        )
