"""Reconciliation of algo (trigger) orders placed outside the ledger (ledger/client/reconcile.py):
the venue keeps them apart from its orders (OKX ``orders-algo-pending``, one ``ordType`` at a
time; Binance futures ``openAlgoOrders``), so they are listed apart, adopted with the ledger's
trigger order type, and once triggered the order they placed is theirs: never adopted a second
time, whatever the order in which the venue's lists show it. Also: the order of a trade is
recognised by its client id however old, and trades older than the live order hashes are not
looked at for strangers.

Against a real Redis, the ledger in-process (handler and live projection, no venue role) and the
real ccxt classes talking HTTP to the loopback venue (tests/venue_server.py).
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from ledger.client.reconcile import Finding, Reconciliation
from ledger.domain import wire
from ledger.domain.enums import Exchange, OrderSide, OrderStatus, OrderType
from ledger.domain.values import now_ms
from ledger.errors import OperationFailed
from ledger.store.keys import ShardKeys
from ledger.store.operations import operations
from ledger.store.redis_conn import final_order_ttl, record_final_order_ttl
from ledger.venues import commands
from tests.integration.test_adopt import _adoption
from tests.integration.test_reconcile import OKX_POSITION, USER, Ledger, _credentials, _ledger
from tests.live_helpers import running_ledger
from tests.venue_server import LoopbackExchange

SWAP = "BTC-USDT-SWAP"


async def _reconcile(ledger: Ledger, symbol: str) -> Reconciliation:
    return await ledger.positions.sync_positions_from_exchange(
        USER, ledger.exchange, venue=ledger.config, symbols=[symbol]
    )


async def test_a_waiting_okx_stop_and_take_profit_are_adopted_once_and_the_stops_trigger_is_followed(
    redis: Any, redis_url: str, tmp_path: Path, okx: LoopbackExchange
) -> None:
    async for ledger in _ledger(redis, redis_url, tmp_path, okx):
        stop = okx.book_algo("myStop1", SWAP, "sell", "3", "44000")  # 3 contracts of 0.01 BTC
        take_profit = okx.book_algo("myTp1", SWAP, "sell", "2", "52000", take_profit=True)

        first = await _reconcile(ledger, SWAP)
        assert first.recorded == _adoption(stop.venue_id)[1] + _adoption(take_profit.venue_id)[1]
        assert first.findings == []
        stop_id = wire.adopted_order_id(USER, "okx", stop.venue_id)
        adopted = await ledger.orders.get_order(stop_id)
        assert adopted is not None
        assert (
            adopted.order_type,
            adopted.side,
            adopted.quantity,
            adopted.trigger_price,
            adopted.price,
            adopted.status,
            adopted.exchange_order_id,
            adopted.symbol,
            adopted.client_order_id,
        ) == (
            OrderType.STOP_MARKET,
            OrderSide.SELL,
            Decimal("0.03"),
            Decimal("44000"),
            None,
            OrderStatus.OPEN,
            stop.venue_id,
            SWAP,
            "myStop1",
        )
        tp = await ledger.orders.get_order(wire.adopted_order_id(USER, "okx", take_profit.venue_id))
        assert tp is not None
        assert (tp.order_type, tp.quantity, tp.trigger_price, tp.price) == (
            OrderType.TAKE_PROFIT_MARKET,
            Decimal("0.02"),
            Decimal("52000"),
            None,
        )

        assert (await _reconcile(ledger, SWAP)).recorded == []  # adopted once

        # The stop triggers: the market order it placed fills. Its trade is the adopted stop's.
        placed = okx.trigger("myStop1")
        okx.fill(placed, "3", "43990", "t-9", fee="0.0131985")
        okx.positions = [{**OKX_POSITION, "pos": "-3"}]
        third = await _reconcile(ledger, SWAP)
        assert third.recorded == _adoption(stop.venue_id, "t-9")[1][1:]  # the fill, not another adoption
        assert third.findings == []
        filled = await ledger.orders.get_order(stop_id)
        assert filled is not None
        assert (filled.status, filled.filled_qty, filled.avg_fill_price) == (
            OrderStatus.FILLED,
            Decimal("0.03"),
            Decimal("43990"),
        )
        assert (await _reconcile(ledger, SWAP)).recorded == []


async def test_an_algo_order_listed_waiting_after_it_triggered_is_adopted_once_with_its_orders_trade(
    redis: Any, redis_url: str, tmp_path: Path, okx: LoopbackExchange
) -> None:
    """The venue's lists are read one after the other: the trade of the order a stop placed is
    listed, and the stop still shows as waiting. The stop is adopted, the order it placed is not:
    its trade is the stop's."""
    async for ledger in _ledger(redis, redis_url, tmp_path, okx):
        stop = okx.book_algo("myStop2", SWAP, "buy", "4", "46000")
        placed = okx.trigger("myStop2")
        okx.fill(placed, "4", "46010", "t-10", fee="0.018404")
        with okx.lock:
            stop.state = "open"  # the waiting list lags behind the trigger
        okx.positions = [{**OKX_POSITION, "pos": "4"}]

        result = await _reconcile(ledger, SWAP)
        assert result.recorded == _adoption(stop.venue_id, "t-10")[1]
        assert result.findings == []
        placed_id = wire.adopted_order_id(USER, "okx", okx.order(placed).venue_id)
        assert await ledger.orders.get_order(placed_id) is None
        (position,) = await ledger.positions.get_positions(USER, "okx")
        assert (position.size, position.entry_price) == (Decimal("0.04"), Decimal("46010"))

        with okx.lock:
            stop.state = "triggered"
        assert (await _reconcile(ledger, SWAP)).recorded == []


async def test_a_waiting_binance_usdm_stop_limit_is_adopted_and_an_okx_take_profit_limit_is_reported(
    redis: Any, redis_url: str, tmp_path: Path, binance: LoopbackExchange
) -> None:
    async for ledger in _ledger(redis, redis_url, tmp_path, binance):
        stop = binance.book_algo("myStop3", "BTCUSDT", "sell", "0.005", "40000", price="39900", api="fapi")
        result = await _reconcile(ledger, "BTC/USDT:USDT")
        assert result.recorded == _adoption(stop.venue_id, exchange=Exchange.BINANCE)[1]
        assert result.findings == []
        adopted = await ledger.orders.get_order(wire.adopted_order_id(USER, "binance", stop.venue_id))
        assert adopted is not None
        assert (adopted.order_type, adopted.quantity, adopted.trigger_price, adopted.price, adopted.symbol) == (
            OrderType.STOP_LIMIT,
            Decimal("0.005"),
            Decimal("40000"),
            Decimal("39900"),
            "BTC/USDT:USDT",
        )


async def test_an_okx_take_profit_limit_is_reported_not_adopted(
    redis: Any, redis_url: str, tmp_path: Path, okx: LoopbackExchange
) -> None:
    async for ledger in _ledger(redis, redis_url, tmp_path, okx):
        events = await redis.xlen(ShardKeys(0).events)
        order = okx.book_algo("myTp2", SWAP, "sell", "2", "52000", price="52100", take_profit=True)
        okx.requests.clear()
        result = await _reconcile(ledger, SWAP)
        assert okx.requests.count("GET /api/v5/trade/fills-history") == 1  # the trades, listed once a run
        types = "limit, market, stop_limit, stop_market, take_profit_market"
        evidence = {
            "client_order_id": "myTp2",
            "status": "open",
            "filled": "0.00",  # 0 contracts of 0.01 BTC
            "trades": [],
            "reason": f"not adopted: okx reports a conditional algo sell order: the ledger adopts {types} orders "
            "that buy or sell",
        }
        assert (result.recorded, result.findings) == (
            [],
            [Finding("unknown_order", "BTC/USDT:USDT", order.venue_id, evidence)],
        )
        assert await redis.xlen(ShardKeys(0).events) == events


async def test_the_order_of_a_trade_is_known_by_its_client_id_after_its_live_hash_expired(
    redis: Any, redis_url: str, tmp_path: Path, okx: LoopbackExchange
) -> None:
    """A final order of the ledger whose live hash is gone (``LEDGER_FINAL_ORDER_TTL_S``) is
    still the ledger's: its venue trade names it by the client id derived from its id. A trade it
    never recorded is recorded late, as its fill; it is never adopted as a stranger's."""
    async for ledger in _ledger(redis, redis_url, tmp_path, okx):
        order_id = await ledger.place(SWAP, "buy", "0.05", "45000")
        client_id = order_id.replace("-", "")
        okx.book(client_id, SWAP, "buy", "5", "45000")
        okx.fill(client_id, "2", "45000", "t-1", fee="0.009")
        okx.positions = [{**OKX_POSITION, "pos": "2"}]
        okx.finish(client_id, "canceled")
        recorded = (await _reconcile(ledger, SWAP)).recorded
        assert [r["type"] for r in recorded] == ["order_accepted", "record_fill", "order_cancelled"]
        order = await ledger.orders.get_order(order_id)
        assert order is not None and order.status is OrderStatus.CANCELLED
        okx.fill(client_id, "1", "45000", "t-2", fee="0.0045")  # traded as the cancel went through
        okx.positions = [{**OKX_POSITION, "pos": "3"}]
        await redis.delete(f"orders:{order_id}")  # its final hash expired

        result = await _reconcile(ledger, SWAP)
        fill = commands.fill_command_id(order_id, "t-2")
        assert result.recorded == [{"command_id": fill, "type": "record_fill", "order_id": order_id, "fill_id": "t-2"}]
        assert result.findings == []
        late = [f for f in await ledger.fills(order_id) if f.fill_id == "t-2"]
        assert [(f.quantity, f.late) for f in late] == [("0.01", True)]


async def test_a_trade_older_than_the_live_order_hashes_is_not_looked_at_for_strangers(
    redis: Any, redis_url: str, tmp_path: Path, okx: LoopbackExchange
) -> None:
    """Eight days old, the order of a trade without a client id the ledger made could be one
    whose live hash expired (the order an algo order of the ledger placed): not adopted."""
    async for ledger in _ledger(redis, redis_url, tmp_path, okx):
        old = okx.book("", SWAP, "buy", "1", "45000")
        okx.fill("", "1", "45000", "t-old", fee="0.0045", ts_ms=now_ms() - 8 * 24 * 3600 * 1000)
        okx.finish("", "filled")
        okx.positions = [{**OKX_POSITION, "pos": "1"}]
        result = await _reconcile(ledger, SWAP)
        assert [r["type"] for r in result.recorded] == ["record_drift"]  # what remains: the size differs
        assert [f.kind for f in result.findings] == ["position_mismatch"]
        assert await ledger.orders.get_order(wire.adopted_order_id(USER, "okx", old.venue_id)) is None


async def test_the_window_is_the_final_order_lifetime_the_live_projection_records(
    redis: Any, redis_url: str, tmp_path: Path, okx: LoopbackExchange
) -> None:
    """``serve`` keeps final orders an hour (LEDGER_FINAL_ORDER_TTL_S=3600) and records it; a
    reconciliation from a shell without that setting (7 days) still looks back an hour only: a
    two-hour-old trade of an order without a client id the ledger made is not adopted."""
    credentials = _credentials(tmp_path, okx)
    async with running_ledger(
        redis_url,
        tmp_path,
        roles=("handler", "projection"),
        execution="okx=live",
        credentials=credentials,
        final_order_ttl_s=3600,
    ):
        assert await final_order_ttl(redis, 7 * 24 * 3600) == 3600
        ledger = Ledger(redis, okx, credentials)
        old = okx.book("", SWAP, "buy", "1", "45000")
        okx.fill("", "1", "45000", "t-2h", fee="0.0045", ts_ms=now_ms() - 2 * 3600 * 1000)
        okx.finish("", "filled")
        okx.positions = [{**OKX_POSITION, "pos": "1"}]
        first = await _reconcile(ledger, SWAP)
        assert [r["type"] for r in first.recorded] == ["record_drift"]
        assert await ledger.orders.get_order(wire.adopted_order_id(USER, "okx", old.venue_id)) is None

        recent = okx.book("web-1", SWAP, "buy", "1", "45000")  # an hour is not over: adopted
        okx.fill("web-1", "1", "45000", "t-now", fee="0.0045")
        drift = first.recorded[0]["drift_id"]  # the ledger's 0.01 BTC now agrees with the venue's
        agreed = {"command_id": f"reconcile:agreed:{drift}", "type": "resolve_drift", "drift_id": drift}
        assert (await _reconcile(ledger, SWAP)).recorded == [*_adoption(recent.venue_id, "t-now")[1], agreed]


async def test_the_recorded_final_order_lifetime_wins_and_a_bogus_one_says_what_to_do(redis: Any) -> None:
    assert await final_order_ttl(redis, 604800) == 604800  # nothing recorded yet
    await record_final_order_ttl(redis, 60)
    assert (await redis.hgetall("ledger:meta"), await final_order_ttl(redis, 604800)) == (
        {"final_order_ttl_s": "60"},
        60,
    )
    await redis.hset("ledger:meta", "final_order_ttl_s", "soon")
    with pytest.raises(OperationFailed) as caught:
        await final_order_ttl(redis, 604800)
    assert str(caught.value) == (
        "ledger:meta records final_order_ttl_s='soon', which is no lifetime: start `ledger serve` "
        "(it records LEDGER_FINAL_ORDER_TTL_S there again)"
    )


async def test_a_finding_goes_to_the_operations_stream_when_new_or_changed_not_every_round(
    redis: Any, redis_url: str, tmp_path: Path, okx: LoopbackExchange
) -> None:
    async for ledger in _ledger(redis, redis_url, tmp_path, okx):
        order = okx.book_algo("myTp3", SWAP, "sell", "2", "52000", price="52100", take_profit=True)
        for _ in range(3):  # three rounds, one difference
            (finding,) = (await _reconcile(ledger, SWAP)).findings
        ops = await operations(redis, 10)
        assert [(op.action, op.detail["subject"]) for op in ops] == [("reconcile.finding", order.venue_id)]
        key = f"ledger:reconcile:okx:{USER}"
        (field,) = await redis.hkeys(key)
        assert field == f"unknown_order|BTC/USDT:USDT|{order.venue_id}"

        with okx.lock:
            order.client_id = "myTp3b"  # the venue reports it otherwise: its evidence changed
        await _reconcile(ledger, SWAP)
        assert len(await operations(redis, 10)) == 2

        okx.finish("myTp3", "canceled")  # gone from the waiting list: nothing to report, forgotten
        assert (await _reconcile(ledger, SWAP)).findings == []
        assert await redis.exists(key) == 0
        with okx.lock:
            order.state = "open"  # back again: reported again
        await _reconcile(ledger, SWAP)
        assert len(await operations(redis, 10)) == 3
