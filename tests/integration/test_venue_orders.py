"""Trigger orders, hedge mode and Binance futures on the live venue (consumers/venue.py,
ledger/venues/live.py) against a real Redis, the real command handler and the real ccxt exchange
classes talking HTTP to the stateful loopback venue (tests/venue_server.py).

Each test checks the exact parameters the loopback venue received (signing fields aside), the
endpoints ccxt called, and the exact ledger states after. The rig is the one of
tests/integration/test_venue.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from consumers.venue import LiveVenue
from ledger.config import parse_execution
from ledger.domain.enums import Exchange, OrderStatus, PositionSide, PositionStatus
from ledger.domain.state import PositionState
from ledger.venues.accounts import parse_credentials
from ledger.venues.live import VenueClients
from ledger.venues.markets import bundled
from tests.integration.test_reconcile import OKX_POSITION, _ledger
from tests.integration.test_venue import KEYS, USER, Rig
from tests.live_helpers import wait_for
from tests.venue_server import LoopbackExchange


@pytest.fixture
async def made() -> AsyncIterator[list[Rig]]:
    """The rigs a test made, their ccxt clients closed after it whatever the outcome."""
    rigs: list[Rig] = []
    yield rigs
    for rig in rigs:
        await rig.clients.close()


async def _rig(made: list[Rig], redis: Any, venue: LoopbackExchange, position_mode: str = "hedge") -> Rig:
    """A rig whose venue account is in hedge mode unless a test says otherwise."""
    rig = Rig(redis, venue, position_mode=position_mode)
    made.append(rig)
    await rig.start()
    return rig


def _cid(order_id: str) -> str:
    return order_id.replace("-", "")


async def _filled_long(rig: Rig, symbol: str, quantity: str, amount: str, price: str, **extra: Any) -> str:
    """A market buy the venue fills at once: the long position a trigger order then closes."""
    order_id = await rig.place(symbol=symbol, side="buy", order_type="market", quantity=quantity, **extra)
    rig.book.fill(_cid(order_id), amount, price, "1001")
    await rig.settle()
    assert (await rig.order(order_id)).status is OrderStatus.FILLED
    return order_id


async def _positions(rig: Rig) -> list[PositionState]:
    """Every position of the log, as the event store folds it."""
    ids = [s.event.stream for s in await rig.store.read_range() if s.event.type == "PositionOpened"]
    found = [await rig.store.position(position_id) for position_id in ids]
    return [p for p in found if p is not None]


# --------------------------------------------------------------------------- OKX algo orders


async def test_okx_stop_market_is_an_algo_order_followed_where_it_lives(
    redis: Any, okx: LoopbackExchange, made: list[Rig]
) -> None:
    await _okx_stop_market(redis, okx, made)


async def test_okx_stop_market_on_redis_cluster(redis_cluster: Any, okx: LoopbackExchange, made: list[Rig]) -> None:
    await _okx_stop_market(redis_cluster, okx, made)


async def _okx_stop_market(redis: Any, okx: LoopbackExchange, made: list[Rig]) -> None:
    rig = await _rig(made, redis, okx)
    opened = await _filled_long(rig, "BTC-USDT-SWAP", "0.1", "10", "45000")
    order_id = await rig.place(
        symbol="BTC-USDT-SWAP",
        side="sell",
        order_type="stop_market",
        quantity="0.1",
        trigger_price="44000",
        reduce_only=True,
    )
    cid = _cid(order_id)
    algo = okx.order(cid)
    assert algo.algo and algo.params == {
        "instId": "BTC-USDT-SWAP",
        "side": "sell",
        "ordType": "trigger",
        "sz": "10",
        "posSide": "net",
        "tdMode": "cross",
        "triggerPx": "44000",
        "orderPx": "-1",
        "clOrdId": cid,
        "algoClOrdId": cid,
        "reduceOnly": "true",
    }
    order = await rig.order(order_id)
    assert (order.status, order.exchange_order_id, order.trigger_price) == (
        OrderStatus.OPEN,
        algo.venue_id,
        Decimal(44000),
    )
    okx.requests.clear()
    await rig.settle()  # not triggered: the algo order is read where it lives, no trades asked for
    assert okx.requests == ["GET /api/v5/trade/order-algo"]

    placed = okx.trigger(cid)
    okx.fill(placed, "4", "43990", "t-1", fee="0.0087980")
    await rig.settle()
    order = await rig.order(order_id)
    assert (order.status, order.filled_qty, order.fill_ids) == (OrderStatus.PARTIALLY_FILLED, Decimal("0.04"), ["t-1"])
    okx.fill(placed, "6", "43980", "t-2", fee="0.0131940")
    await rig.settle()
    order = await rig.order(order_id)
    assert (order.status, order.filled_qty, order.fill_ids) == (OrderStatus.FILLED, Decimal("0.1"), ["t-1", "t-2"])
    assert order.exchange_order_id == algo.venue_id  # the ledger keeps the id the venue accepted
    (position,) = await _positions(rig)
    assert (position.side, position.entry_price) == (PositionSide.LONG, Decimal(45000))
    # 0.04 @ 43990 and 0.06 @ 43980 against an entry of 45000: -40.4 - 61.2
    assert (position.status, position.size, position.gross_pnl) == (PositionStatus.CLOSED, 0, Decimal("-101.6"))
    assert "GET /api/v5/trade/order" in okx.requests and "GET /api/v5/trade/fills-history" in okx.requests
    assert okx.creates == {_cid(opened): 1, cid: 1}
    assert (await rig.venue.working())[order_id].stage == "done"


async def test_okx_take_profit_in_hedge_mode_sends_the_side_and_no_reduce_only_then_cancels(
    redis: Any, okx: LoopbackExchange, made: list[Rig]
) -> None:
    rig = await _rig(made, redis, okx)
    await _filled_long(rig, "BTC-USDT-SWAP", "0.1", "10", "45000", position_side="long")
    order_id = await rig.place(
        symbol="BTC-USDT-SWAP",
        side="sell",
        order_type="take_profit_market",
        quantity="0.1",
        trigger_price="48000",
        position_side="long",
        reduce_only=True,
    )
    cid = _cid(order_id)
    assert okx.order(cid).params == {
        "instId": "BTC-USDT-SWAP",
        "side": "sell",
        "ordType": "conditional",
        "sz": "10",
        "posSide": "long",
        "tdMode": "cross",
        "tpTriggerPx": "48000",
        "tpOrdPx": "-1",
        "tpTriggerPxType": "last",
        "clOrdId": cid,
        "algoClOrdId": cid,
    }
    await rig.send("cancel_order", order_id=order_id)
    await rig.settle()
    assert (await rig.order(order_id)).status is OrderStatus.CANCELLED
    assert okx.order(cid).state == "canceled"
    assert "POST /api/v5/trade/cancel-algos" in okx.requests
    assert [e.command_id for e in await rig.events("OrderCancelled", order_id)] == [f"venue:{order_id}:cancel"]


# --------------------------------------------------------------------------- Binance futures


async def test_binance_usdm_hedge_mode_order_filled_in_parts_then_closed_on_its_side(
    redis: Any, binance: LoopbackExchange, made: list[Rig]
) -> None:
    rig = await _rig(made, redis, binance)
    order_id = await rig.place(
        symbol="BTC/USDT:USDT", side="buy", order_type="limit", quantity="0.01", price="45000", position_side="long"
    )
    cid = _cid(order_id)
    booked = binance.order(cid)
    assert (booked.api, booked.params) == (
        "fapi",
        {
            "symbol": "BTCUSDT",
            "side": "BUY",
            "newClientOrderId": cid,
            "newOrderRespType": "RESULT",
            "type": "LIMIT",
            "quantity": "0.01",
            "price": "45000",
            "timeInForce": "GTC",
            "positionSide": "LONG",
        },
    )
    binance.fill(cid, "0.004", "45000", "5001", fee="0.072")
    await rig.settle()
    order = await rig.order(order_id)
    assert (order.status, order.filled_qty, order.fill_ids) == (
        OrderStatus.PARTIALLY_FILLED,
        Decimal("0.004"),
        ["5001"],
    )
    binance.fill(cid, "0.006", "44990", "5002", fee="0.107976")
    await rig.settle()
    order = await rig.order(order_id)
    assert (order.status, order.filled_qty, order.exchange_order_id) == (
        OrderStatus.FILLED,
        Decimal("0.01"),
        booked.venue_id,
    )
    fills = await rig.events("OrderFilled", order_id)
    assert [(f.fill_id, f.quantity, f.price, f.fee, f.fee_currency) for f in fills] == [
        ("5001", "0.004", "45000", "0.072", "USDT"),
        ("5002", "0.006", "44990", "0.107976", "USDT"),
    ]
    (position,) = await _positions(rig)
    # 0.004 @ 45000 + 0.006 @ 44990 = 449.94 / 0.01 = 44994
    assert (position.side, position.size, position.entry_price) == (PositionSide.LONG, Decimal("0.01"), Decimal(44994))

    # closed on its side: positionSide LONG and no reduceOnly (Binance refuses it in hedge mode)
    close_id = await rig.place(
        symbol="BTC/USDT:USDT",
        side="sell",
        order_type="limit",
        quantity="0.01",
        price="45100",
        position_side="long",
        reduce_only=True,
    )
    assert binance.order(_cid(close_id)).params == {
        "symbol": "BTCUSDT",
        "side": "SELL",
        "newClientOrderId": _cid(close_id),
        "newOrderRespType": "RESULT",
        "type": "LIMIT",
        "quantity": "0.01",
        "price": "45100",
        "timeInForce": "GTC",
        "positionSide": "LONG",
    }
    binance.fill(_cid(close_id), "0.01", "45100", "5003", fee="0.1804")
    await rig.settle()
    (position,) = await _positions(rig)
    fees = Decimal("0.072") + Decimal("0.107976") + Decimal("0.1804")
    gross = (Decimal(45100) - Decimal(44994)) * Decimal("0.01")  # 1.06
    assert (position.status, position.size, position.gross_pnl, position.fees, position.realized_pnl) == (
        PositionStatus.CLOSED,
        0,
        gross,
        fees,
        gross - fees,
    )
    assert set(binance.requests) == {"POST /fapi/v1/order", "GET /fapi/v1/order", "GET /fapi/v1/userTrades"}
    assert binance.unanswered == []


async def test_binance_coinm_order_counts_contracts_of_100_usd(
    redis: Any, binance: LoopbackExchange, made: list[Rig]
) -> None:
    rig = await _rig(made, redis, binance)
    order_id = await rig.place(symbol="BTCUSD_PERP", side="buy", order_type="limit", quantity="3", price="40000")
    cid = _cid(order_id)
    booked = binance.order(cid)
    assert (booked.api, booked.params) == (
        "dapi",
        {
            "symbol": "BTCUSD_PERP",
            "side": "BUY",
            "newClientOrderId": cid,
            "newOrderRespType": "RESULT",
            "type": "LIMIT",
            "quantity": "3",
            "price": "40000",
            "timeInForce": "GTC",
            "positionSide": "BOTH",
        },
    )
    binance.fill(cid, "1", "40000", "6001", fee="0.00000125")
    await rig.settle()
    assert (await rig.order(order_id)).status is OrderStatus.PARTIALLY_FILLED
    binance.fill(cid, "2", "40000", "6002", fee="0.0000025")
    await rig.settle()
    order = await rig.order(order_id)
    assert (order.status, order.filled_qty) == (OrderStatus.FILLED, Decimal(3))
    fills = await rig.events("OrderFilled", order_id)
    assert [(f.quantity, f.price, f.fee, f.fee_currency) for f in fills] == [
        ("1", "40000", "0.00000125", "BTC"),
        ("2", "40000", "0.0000025", "BTC"),
    ]
    (position,) = await _positions(rig)
    assert (position.size, position.entry_price, position.contract_value) == (Decimal(3), Decimal(40000), Decimal(100))
    assert {r for r in binance.requests if not r.startswith("GET")} == {"POST /dapi/v1/order"}


async def test_binance_usdm_stop_market_after_a_timeout_is_looked_up_among_algo_orders_and_sent_once(
    redis: Any, binance: LoopbackExchange, made: list[Rig]
) -> None:
    rig = await _rig(made, redis, binance)
    order_id = await rig.placed_through_a_timeout(
        symbol="BTC/USDT:USDT", side="buy", order_type="stop_market", quantity="0.005", trigger_price="46000"
    )
    cid = _cid(order_id)
    algo = binance.order(cid)
    assert algo.params == {
        "symbol": "BTCUSDT",
        "side": "BUY",
        "clientAlgoId": cid,
        "newOrderRespType": "RESULT",
        "type": "STOP_MARKET",
        "quantity": "0.005",
        "triggerPrice": "46000",
        "positionSide": "BOTH",
        "algoType": "CONDITIONAL",
    }
    order = await rig.order(order_id)
    assert (order.status, order.exchange_order_id) == (OrderStatus.OPEN, algo.venue_id)
    assert binance.creates == {cid: 1}
    assert "GET /fapi/v1/algoOrder" in binance.requests and "GET /fapi/v1/order" not in binance.requests

    binance.fill(binance.trigger(cid), "0.005", "46010", "7001", fee="0.092")
    await rig.settle()
    order = await rig.order(order_id)
    assert (order.status, order.filled_qty, order.avg_fill_price, order.fill_ids) == (
        OrderStatus.FILLED,
        Decimal("0.005"),
        Decimal(46010),
        ["7001"],
    )


async def test_a_triggered_stop_limit_is_cancelled_through_the_order_it_placed(
    redis: Any, binance: LoopbackExchange, made: list[Rig]
) -> None:
    rig = await _rig(made, redis, binance)
    order_id = await rig.place(
        symbol="BTC/USDT:USDT",
        side="buy",
        order_type="stop_limit",
        quantity="0.002",
        price="46100",
        trigger_price="46000",
    )
    cid = _cid(order_id)
    assert binance.order(cid).params == {
        "symbol": "BTCUSDT",
        "side": "BUY",
        "clientAlgoId": cid,
        "newOrderRespType": "RESULT",
        "type": "STOP",
        "quantity": "0.002",
        "price": "46100",
        "triggerPrice": "46000",
        "positionSide": "BOTH",
        "algoType": "CONDITIONAL",
    }
    placed = binance.trigger(cid)
    await rig.settle()
    await rig.send("cancel_order", order_id=order_id)
    await rig.settle()
    assert (await rig.order(order_id)).status is OrderStatus.CANCELLED
    assert (binance.order(cid).state, binance.order(placed).state) == ("triggered", "canceled")
    assert "DELETE /fapi/v1/order" in binance.requests and "DELETE /fapi/v1/algoOrder" not in binance.requests


# Binance position rows as the docs show them (USD-M Position Information V3, COIN-M Position Information)
USDM_POSITION = {
    "symbol": "BTCUSDT",
    "positionSide": "LONG",
    "positionAmt": "0.010",
    "entryPrice": "44994",
    "breakEvenPrice": "0.0",
    "markPrice": "45000",
    "unRealizedProfit": "0.06",
    "liquidationPrice": "0",
    "isolatedMargin": "0",
    "notional": "450",
    "marginAsset": "USDT",
    "isolatedWallet": "0",
    "initialMargin": "45",
    "maintMargin": "1.8",
    "positionInitialMargin": "45",
    "openOrderInitialMargin": "0",
    "adl": 0,
    "bidNotional": "0",
    "askNotional": "0",
    "updateTime": 1720736417660,
}
COINM_POSITION = {
    "symbol": "BTCUSD_PERP",
    "positionAmt": "-3",
    "entryPrice": "40000",
    "markPrice": "40100",
    "unRealizedProfit": "-0.00000187",
    "liquidationPrice": "0",
    "leverage": "20",
    "maxQty": "250",
    "marginType": "cross",
    "isolatedMargin": "0",
    "isAutoAddMargin": "false",
    "positionSide": "BOTH",
    "notionalValue": "-0.0074813",
    "isolatedWallet": "0",
    "updateTime": 1720736417660,
    "breakEvenPrice": "40010",
}


async def test_binance_futures_positions_are_read_from_each_markets_api(binance: LoopbackExchange) -> None:
    configs = parse_credentials(
        {
            "binance": {
                "base_url": binance.url,
                "timeout_ms": 2000,
                "accounts": {"main": {"apiKey": "k", "secret": "s", "users": [USER]}},
            }
        }
    )
    clients = VenueClients({Exchange.BINANCE: configs[Exchange.BINANCE].options})
    client = clients.get(configs[Exchange.BINANCE].accounts["main"])
    markets = bundled(Exchange.BINANCE)
    try:
        short = {**USDM_POSITION, "positionSide": "SHORT", "positionAmt": "-0.004", "notional": "-180"}
        binance.positions = [USDM_POSITION, short]  # hedge mode: a long and a short
        assert await client.position(markets.resolve("BTC/USDT:USDT")) == Decimal("0.006")
        binance.positions = [COINM_POSITION]
        assert await client.position(markets.resolve("BTCUSD_PERP")) == Decimal(-3)  # contracts
    finally:
        await clients.close()
    assert binance.requests == [
        "GET /fapi/v1/leverageBracket",
        "GET /fapi/v3/positionRisk",
        "GET /dapi/v1/positionRisk",  # COIN-M's own (ccxt asked USD-M's before: a wrong net position)
    ]


# --------------------------------------------------------------------------- Upbit


async def test_an_upbit_trigger_order_is_rejected_at_the_venue_role_never_sent(
    redis: Any, upbit: LoopbackExchange, made: list[Rig]
) -> None:
    rig = await _rig(made, redis, upbit)
    order_id = await rig.place(
        symbol="KRW-BTC",
        side="buy",
        order_type="stop_limit",
        quantity="0.001",
        price="51000000",
        trigger_price="50000000",
    )
    order = await rig.order(order_id)
    assert (order.status, order.reject_reason) == (
        OrderStatus.REJECTED,
        "upbit has no trigger orders: a stop_limit order is never sent (use market or limit)",
    )
    assert [e.command_id for e in await rig.events("OrderRejected", order_id)] == [f"venue:{order_id}:reject"]
    assert upbit.requests == [] and upbit.creates == {}


# --------------------------------------------------------------------------- reconciliation


async def test_reconciliation_takes_a_triggered_orders_trades_as_the_algo_orders_own(
    redis: Any, redis_url: str, tmp_path: Path, okx: LoopbackExchange
) -> None:
    """The trades of the order an algo order placed carry that order's id, not the algo order's:
    reconciliation names it the ledger order's, so they are never adopted as a stranger's."""
    async for ledger in _ledger(redis, redis_url, tmp_path, okx):
        await _triggered_then_reconciled(redis, ledger, okx)


async def _triggered_then_reconciled(redis: Any, ledger: Any, okx: LoopbackExchange) -> None:
    clients = VenueClients({Exchange.OKX: ledger.config.options})
    venue = LiveVenue(
        redis, 0, configs={Exchange.OKX: ledger.config}, clients=clients, execution=parse_execution("okx=live")
    )
    try:
        await venue.burst()  # the group starts at the end of the log: created before the order
        order = await ledger.orders.create_order(
            USER, "okx", "BTC-USDT-SWAP", "buy", "stop_market", "0.05", trigger_price="46000"
        )
        assert order.id is not None
        order_id, cid = order.id, _cid(order.id)
        await venue.burst()
        await venue.tick()
        okx.fill(okx.trigger(cid), "5", "46010", "t-9", fee="0.011502")

        async def filled() -> bool:
            await venue.tick()
            found = await ledger.orders.get_order(order_id)
            return found is not None and found.status is OrderStatus.FILLED

        await wait_for(filled, "the triggered order's fill")
    finally:
        await clients.close()
    okx.positions = [{**OKX_POSITION, "pos": "5"}]
    okx.requests.clear()
    result = await ledger.reconcile()
    assert (result.recorded, result.findings) == ([], [])
    assert "GET /api/v5/trade/order-algo" in okx.requests
    assert [s.event.type for s in await ledger.store.read_range() if s.event.type == "OrderAdopted"] == []
    fills = await ledger.fills(order_id)
    assert [(f.fill_id, f.quantity, f.price) for f in fills] == [("t-9", "0.05", "46010")]


# --------------------------------------------------------------------------- position mode of the account


async def _reply(rig: Rig, command_id: str) -> dict[str, Any]:
    await rig.settle()
    raw = await rig.redis.lindex(KEYS.reply(USER, command_id), 0)
    reply: dict[str, Any] = json.loads(raw)
    assert reply["status"] == "accepted", reply
    return reply


async def test_a_net_mode_account_gets_open_and_close_position_one_way_with_reduce_only(
    redis: Any, okx: LoopbackExchange, made: list[Rig]
) -> None:
    """open_position / close_position orders carry the ledger's position side; a one-way (net)
    account at the venue gets them one-way, the close reduce-only: the side stays the ledger's."""
    rig = await _rig(made, redis, okx, position_mode="net")
    await rig.redis.hset("marks:okx", "BTC-USDT-SWAP", "45000")
    opened = await _reply(
        rig,
        await rig.send("open_position", exchange="okx", symbol="BTC-USDT-SWAP", side="long", size="0.1", leverage=5),
    )
    entry = _cid(opened["order_id"])
    one_way = {"instId": "BTC-USDT-SWAP", "ordType": "market", "sz": "10", "posSide": "net", "tdMode": "cross"}
    assert okx.order(entry).params == {**one_way, "side": "buy", "clOrdId": entry}
    okx.fill(entry, "10", "45000", "2001")
    await rig.settle()
    position_id = opened["position_id"]
    closed = await _reply(rig, await rig.send("close_position", position_id=position_id))
    exit_id = _cid(closed["order_id"])
    assert okx.order(exit_id).params == {**one_way, "side": "sell", "clOrdId": exit_id, "reduceOnly": "true"}
