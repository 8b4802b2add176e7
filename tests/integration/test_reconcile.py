"""Reconciliation (ledger/client/reconcile.py) against a real Redis, the ledger running in-process
(handler and live projection, no venue role unless a test runs one), and the real ccxt exchange
classes talking HTTP to the stateful loopback venue (tests/venue_server.py).

The orders are placed in the ledger (the exchange is ``live``, but no venue role sends them) and
booked at the loopback venue under the client order id the venue role would have used: the venue
role sent them and then lost what happened (a crash, an outage). Reconciliation must find them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from ledger import OrderManager, OrderStatus, PositionManager
from ledger.client.reconcile import Finding
from ledger.config import parse_execution
from ledger.domain.enums import Exchange
from ledger.domain.evolution import drift_slot
from ledger.store.eventstore import EventStore
from ledger.store.keys import ShardKeys
from ledger.store.operations import operations
from ledger.store.redis_conn import text
from ledger.venues import commands
from ledger.venues.accounts import VenueConfig, load_credentials
from ledger.venues.live import VenueClients
from tests.audit_helpers import ledger_cli
from tests.live_helpers import running_ledger, wait_for
from tests.venue_server import LoopbackExchange

USER = "alice"
OKX_POSITION = {
    "adl": "1",
    "availPos": "",
    "avgPx": "45000",
    "cTime": "1700000000000",
    "ccy": "USDT",
    "imr": "",
    "instId": "BTC-USDT-SWAP",
    "instType": "SWAP",
    "last": "45000",
    "lever": "3",
    "liqPx": "",
    "margin": "",
    "markPx": "45000",
    "mgnMode": "cross",
    "mmr": "",
    "notionalUsd": "2250",
    "pos": "5",
    "posCcy": "",
    "posId": "307173036051017730",
    "posSide": "net",
    "uTime": "1700000000000",
    "upl": "0",
}


def _credentials(tmp_path: Path, venue: LoopbackExchange) -> Path:
    account: dict[str, Any] = {"apiKey": "key-1", "secret": "s3cr3t", "users": [USER]}
    if venue.exchange == "okx":
        account["password"] = "p4ss"
    path = tmp_path / "credentials.json"
    body = {venue.exchange: {"base_url": venue.url, "timeout_ms": 2000, "accounts": {"main": account}}}
    path.write_text(json.dumps(body), encoding="utf-8")
    return path


class Ledger:
    """The ledger in-process with the loopback venue's credentials, and the API."""

    def __init__(self, redis: Any, venue: LoopbackExchange, credentials: Path) -> None:
        self.redis = redis
        self.book = venue
        self.exchange = Exchange(venue.exchange)
        self.credentials = credentials
        self.config: VenueConfig = load_credentials(credentials)[self.exchange]
        self.orders = OrderManager(redis, timeout=10)
        self.positions = PositionManager(redis, timeout=10)
        self.store = EventStore(redis, 0)

    async def place(self, symbol: str, side: str, quantity: str, price: str) -> str:
        order = await self.orders.create_order(USER, self.exchange, symbol, side, "limit", quantity, price)
        assert order.status is OrderStatus.PENDING and order.id is not None
        return order.id

    async def reconcile(self) -> Any:
        return await self.positions.sync_positions_from_exchange(USER, self.exchange, venue=self.config)

    async def fills(self, order_id: str) -> list[Any]:
        return [
            s.event
            for s in await self.store.read_range()
            if s.event.type == "OrderFilled" and s.event.stream == order_id
        ]


async def _ledger(redis: Any, redis_url: str, tmp_path: Path, venue: LoopbackExchange) -> AsyncIterator[Ledger]:
    credentials = _credentials(tmp_path, venue)
    async with running_ledger(
        redis_url,
        tmp_path,
        roles=("handler", "projection"),
        execution=f"{venue.exchange}=live",
        credentials=credentials,
    ):
        yield Ledger(redis, venue, credentials)


@pytest.fixture
async def okx_ledger(redis: Any, redis_url: str, tmp_path: Path, okx: LoopbackExchange) -> AsyncIterator[Ledger]:
    async for ledger in _ledger(redis, redis_url, tmp_path, okx):
        yield ledger


async def test_a_fill_the_ledger_missed_is_recorded_once(okx_ledger: Ledger, okx: LoopbackExchange) -> None:
    ledger = okx_ledger
    order_id = await ledger.place("BTC-USDT-SWAP", "buy", "0.1", "45000")
    client_id = order_id.replace("-", "")
    booked = okx.book(client_id, "BTC-USDT-SWAP", "buy", "10", "45000")  # 10 contracts of 0.01 BTC
    okx.fill(client_id, "4", "45000", "t-1", fee="0.009")
    okx.positions = [{**OKX_POSITION, "pos": "4"}]

    result = await ledger.reconcile()
    fill_command = commands.fill_command_id(order_id, "t-1")
    assert result.recorded == [
        {"command_id": f"venue:{order_id}:accept", "type": "order_accepted", "order_id": order_id},
        {"command_id": fill_command, "type": "record_fill", "order_id": order_id, "fill_id": "t-1"},
    ]
    assert (result.markets, result.findings) == (["BTC/USDT:USDT"], [])
    order = await ledger.orders.get_order(order_id)
    assert order is not None
    assert (order.status, order.exchange_order_id, order.filled_qty) == (
        OrderStatus.PARTIALLY_FILLED,
        booked.venue_id,
        Decimal("0.04"),
    )

    again = await ledger.reconcile()  # nothing new at the venue: nothing recorded
    assert (again.recorded, again.findings) == ([], [])

    # The live venue role polls the same order and publishes the same fill: absorbed.
    from consumers.venue import LiveOrder, LiveVenue

    configs = {ledger.exchange: ledger.config}
    clients = VenueClients({ledger.exchange: ledger.config.options})
    venue = LiveVenue(ledger.redis, 0, configs=configs, clients=clients, execution=parse_execution("okx=live"))
    await venue.burst()
    record = LiveOrder(
        user_id=USER,
        exchange=ledger.exchange,
        account="main",
        symbol="BTC-USDT-SWAP",
        side=order.side,
        order_type=order.order_type,
        quantity="0.1",
        price="45000",
        client_id=client_id,
        stage="open",
        exchange_order_id=booked.venue_id,
    )
    await venue._save(order_id, record, mode="set")
    assert await venue.tick() == 1
    reply_key = ShardKeys(0).reply(USER, fill_command)
    await wait_for(lambda: ledger.redis.exists(reply_key), "the handler's reply to the repeated fill")
    await clients.close()
    assert [(f.fill_id, f.quantity, f.fee) for f in await ledger.fills(order_id)] == [("t-1", "0.04", "0.009")]


async def test_an_order_with_a_client_id_the_ledger_derives_is_never_adopted(
    redis: Any, redis_url: str, tmp_path: Path, binance: LoopbackExchange
) -> None:
    """A venue order whose client id is one the ledger derives from an order id is one of the
    ledger's own: when the user holds no such order it is reported, never adopted."""
    async for ledger in _ledger(redis, redis_url, tmp_path, binance):
        ours = "0000000000004000800000000000007f"  # venue_client_id of order 00000000-0000-4000-8000-00000000007f
        binance.book(ours, "BTCUSDT", "buy", "0.01", "40000")
        binance.fill(ours, "0.004", "40000", "7001", fee="0.000004")
        events = await redis.xlen(ShardKeys(0).events)
        venue_id = binance.order(ours).venue_id

        result = await ledger.positions.sync_positions_from_exchange(
            USER, "binance", venue=ledger.config, symbols=["BTC/USDT"]
        )
        evidence = {
            "client_order_id": ours,
            "status": "open",
            "filled": "0.004",
            "trades": [{"fill_id": "7001", "quantity": "0.004", "price": "40000", "fee": "0.000004"}],
            "reason": "its client id is the ledger's own (order 00000000-0000-4000-8000-00000000007f), "
            "which alice does not hold on binance: not adopted",
        }
        assert result.recorded == []
        assert result.findings == [Finding("unknown_order", "BTC/USDT", venue_id, evidence)]
        assert await redis.xlen(ShardKeys(0).events) == events
        (op,) = await operations(redis, 10)
        assert (op.action, op.target, op.reason, op.detail) == (
            "reconcile.finding",
            "binance/main/alice/BTC/USDT",
            "unknown_order",
            {
                "user_id": USER,
                "exchange": "binance",
                "kind": "unknown_order",
                "market": "BTC/USDT",
                "subject": venue_id,
                "evidence": evidence,
            },
        )


async def test_a_position_size_mismatch_sums_both_spellings_of_one_market(
    okx_ledger: Ledger, okx: LoopbackExchange
) -> None:
    ledger = okx_ledger
    native = await ledger.place("BTC-USDT-SWAP", "buy", "0.02", "45000")
    unified = await ledger.place("BTC/USDT:USDT", "buy", "0.02", "45000")
    for order_id, trade in ((native, "t-1"), (unified, "t-2")):
        okx.book(order_id.replace("-", ""), "BTC-USDT-SWAP", "buy", "2", "45000")
        okx.fill(order_id.replace("-", ""), "2", "45000", trade)
    okx.positions = [OKX_POSITION]  # 5 contracts: 0.05 BTC at the venue, 0.04 in the ledger

    result = await ledger.reconcile()
    assert [r["fill_id"] for r in result.recorded if r["type"] == "record_fill"] == ["t-1", "t-2"]
    positions = {p.symbol: p.id for p in await ledger.positions.get_positions(USER, "okx")}
    assert result.findings == [
        Finding(
            "position_mismatch",
            "BTC/USDT:USDT",
            "BTC/USDT:USDT",
            {
                "venue": "0.05",
                "ledger": "0.04",
                "difference": "0.01",
                "positions": [
                    {"position_id": positions[s], "symbol": s, "side": "long", "size": "0.02"}
                    for s in ("BTC-USDT-SWAP", "BTC/USDT:USDT")
                ],
            },
        )
    ]


async def test_upbit_fills_come_from_the_orders_own_trades(
    redis: Any, redis_url: str, tmp_path: Path, upbit: LoopbackExchange
) -> None:
    async for ledger in _ledger(redis, redis_url, tmp_path, upbit):
        order_id = await ledger.place("KRW-BTC", "buy", "0.001", "50000000")
        upbit.book(order_id, "KRW-BTC", "buy", "0.001", "50000000")  # Upbit's identifier: the UUID
        upbit.fill(order_id, "0.001", "50000000", "b3f7c1de-0000-4000-8000-000000000001", fee="25")

        result = await ledger.reconcile()
        assert [(r["type"], r.get("fill_id")) for r in result.recorded] == [
            ("order_accepted", None),
            ("record_fill", "b3f7c1de-0000-4000-8000-000000000001"),
        ]
        assert result.findings == []
        order = await ledger.orders.get_order(order_id)
        assert order is not None and (order.status, order.filled_qty) == (OrderStatus.FILLED, Decimal("0.001"))


async def _cli(credentials: Path, redis_url: str, *args: str) -> tuple[int, str, str]:
    run = await ledger_cli(
        credentials.parent,
        "reconcile",
        *args,
        LEDGER_REDIS_URL=redis_url,
        LEDGER_CREDENTIALS=str(credentials),
        LEDGER_LOG_LEVEL="error",  # the logs go to stderr; here it holds the one line alone
    )
    return run.status, run.stdout, run.stderr


async def test_the_cli_prints_what_it_recorded_and_exits_1_while_a_finding_is_unresolved(
    okx_ledger: Ledger, okx: LoopbackExchange, redis_url: str
) -> None:
    ledger = okx_ledger
    order_id = await ledger.place("BTC-USDT-SWAP", "buy", "0.1", "45000")
    client_id = order_id.replace("-", "")
    okx.book(client_id, "BTC-USDT-SWAP", "buy", "10", "45000")
    okx.fill(client_id, "4", "45000", "t-1")
    okx.positions = [{**OKX_POSITION, "pos": "4"}]
    fill_command = commands.fill_command_id(order_id, "t-1")

    status, out, err = await _cli(ledger.credentials, redis_url, USER, "okx")
    accept = f"venue:{order_id}:accept"
    width = len(fill_command)
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        f"reconciled {USER} on okx (account main; markets: BTC/USDT:USDT): 2 recorded, 0 found",
        f"{'command_id'.ljust(width)}  type            {'order_id'.ljust(len(order_id))}  fill_id",
        f"{accept.ljust(width)}  order_accepted  {order_id}",
        f"{fill_command}  record_fill     {order_id}  t-1",
    ]

    okx.positions = [OKX_POSITION]
    status, out, err = await _cli(ledger.credentials, redis_url, USER, "okx", "--json")
    assert status == 1
    assert err == (
        "ledger: 1 finding unresolved (also in the operations stream: `ledger dead ops`): "
        "resolve them at the venue or in the ledger, then reconcile again\n"
    )
    position_id = (await ledger.positions.get_positions(USER, "okx"))[0].id
    slot = drift_slot(USER, "okx", "BTC/USDT:USDT", "position_size")
    drift_id = text(await ledger.redis.hget(ShardKeys(0).slots, slot))
    figures = f"0.05|{position_id}:0.04:1"  # the venue's net, each ledger position with its version
    drift_command = commands.drift_command_id(Exchange.OKX, "BTC/USDT:USDT", "position_size", figures)
    assert json.loads(out) == {
        "user_id": USER,
        "exchange": "okx",
        "account": "main",
        "markets": ["BTC/USDT:USDT"],
        "recorded": [{"command_id": drift_command, "type": "record_drift", "drift_id": drift_id}],
        "findings": [
            {
                "kind": "position_mismatch",
                "market": "BTC/USDT:USDT",
                "subject": "BTC/USDT:USDT",
                "evidence": {
                    "venue": "0.05",
                    "ledger": "0.04",
                    "difference": "0.01",
                    "positions": [
                        {"position_id": position_id, "symbol": "BTC-USDT-SWAP", "side": "long", "size": "0.04"}
                    ],
                },
            }
        ],
    }

    status, out, err = await _cli(ledger.credentials, redis_url, "mallory", "okx")
    assert (status, out) == (2, "")
    assert err == "ledger: no live account for user mallory on okx: add the user to LEDGER_CREDENTIALS\n"


async def test_a_trade_of_an_order_the_ledger_holds_as_cancelled_is_recorded_late(
    okx_ledger: Ledger, okx: LoopbackExchange
) -> None:
    """A trade the venue reports after the order was cancelled is a fact: reconciliation records
    it (flagged late) with the venue role's fill command id, once, instead of only reporting it."""
    ledger = okx_ledger
    order_id = await ledger.place("BTC-USDT-SWAP", "buy", "0.1", "45000")
    client_id = order_id.replace("-", "")
    okx.book(client_id, "BTC-USDT-SWAP", "buy", "10", "45000")
    okx.finish(client_id, "canceled")
    first = await ledger.reconcile()
    assert [r["type"] for r in first.recorded] == ["order_accepted", "order_cancelled"]

    okx.fill(client_id, "3", "45000", "t-late", fee="0.00675")
    okx.positions = [{**OKX_POSITION, "pos": "3"}]
    result = await ledger.reconcile()

    fill_command = commands.fill_command_id(order_id, "t-late")
    assert result.recorded == [
        {"command_id": fill_command, "type": "record_fill", "order_id": order_id, "fill_id": "t-late"}
    ]
    assert result.findings == []
    [fill] = await ledger.fills(order_id)
    assert (fill.fill_id, fill.quantity, fill.fee, fill.late) == ("t-late", "0.03", "0.00675", True)
    order = await ledger.orders.get_order(order_id)
    assert order is not None
    assert (order.status, order.filled_qty) == (OrderStatus.CANCELLED, Decimal("0.03"))
    [position] = await ledger.positions.get_positions(USER, ledger.exchange)
    assert (position.symbol, position.size, position.entry_price) == (
        "BTC-USDT-SWAP",
        Decimal("0.03"),
        Decimal("45000"),
    )
    again = await ledger.reconcile()
    assert (again.recorded, again.findings) == ([], [])
