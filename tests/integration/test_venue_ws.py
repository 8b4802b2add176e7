"""The live venue following orders over WebSocket (consumers/venue.py ``Feed``) against a real Redis,
the real command handler and the real ``ccxt.pro.okx`` / ``ccxt.pro.binance`` classes talking to
the loopback venue's REST and WebSocket sides (tests/venue_server.py, tests/venue_ws.py).

The handler and the venue run as they do in ``serve`` (``run``), with a short poll interval; each
test waits for what it expects with a deadline. The loopback venue counts the REST requests, so
"learned over the WebSocket, not by polling" is checked at the venue itself.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import pytest
import structlog

from consumers.command_handler import GROUP as HANDLER_GROUP
from consumers.command_handler import CommandHandler
from consumers.runner import ConsumerSettings, StreamConsumer
from consumers.venue import Feeds, LiveVenue
from ledger.config import parse_execution
from ledger.domain import wire
from ledger.domain.enums import Exchange, InstrumentKind, OrderStatus
from ledger.store.eventstore import EventStore
from ledger.store.keys import ShardKeys, marks
from ledger.venues import commands
from ledger.venues.accounts import parse_credentials
from ledger.venues.live import STREAMS, VenueClients
from ledger.venues.markets import bundled
from tests.venue_ws import LoopbackWsExchange, loopback_ws_exchange, ws_url

USER = "alice"
OTHER_USER = "bob"  # on shard 0 of 2 (alice: shard 1)
KEYS = ShardKeys(0)
API_KEY = "key-ws-1"
SECRET = "s3cr3t-never-logged"
PASSWORD = "p4ssphrase-never-logged"
FETCHES = {
    "okx": ("GET /api/v5/trade/order", "GET /api/v5/trade/fills-history"),
    "binance": (
        "GET /api/v3/order",
        "GET /api/v3/myTrades",
        *(f"GET /{api}/v1/{path}" for api in ("fapi", "dapi") for path in ("order", "userTrades")),
    ),
    "upbit": ("GET /v1/order",),
}
BTC = "BTC-USDT-SWAP"  # 0.01 BTC a contract


class WsRig:
    """The command handler and the live venue of one shard (of ``shards``) for ``user``, running
    until ``stop``; ``share``: another shard's rig whose clients and feeds this one shares (one
    process)."""

    def __init__(
        self,
        redis: Any,
        venue: LoopbackWsExchange,
        *,
        shard: int = 0,
        shards: int = 1,
        user: str = USER,
        share: WsRig | None = None,
        stream: str | None = None,
    ) -> None:
        self.redis = redis
        self.book = venue
        self.user = user
        self.keys = ShardKeys(shard)
        exchange = Exchange(venue.exchange)
        self.account = (exchange, "main", stream or STREAMS[exchange][InstrumentKind.SPOT])  # the feed followed
        self.store = EventStore(redis, shard)
        fast = ConsumerSettings(block_ms=20)
        self.handler = StreamConsumer(
            redis,
            stream=self.keys.commands,
            group=HANDLER_GROUP,
            handler=CommandHandler(self.store, shards).handle,
            dead_stream=self.keys.dead,
            settings=fast,
        )
        account = {"apiKey": API_KEY, "secret": SECRET, "users": [USER, OTHER_USER]}
        if venue.exchange == "okx":
            account["password"] = PASSWORD
        options = {"base_url": venue.url, "ws_url": ws_url(venue), "timeout_ms": 2000}
        configs = parse_credentials({venue.exchange: {**options, "accounts": {"main": account}}})
        self.clients = VenueClients({e: c.options for e, c in configs.items()}) if share is None else share.clients
        self.feeds = Feeds(catch_up_after_s=0.2) if share is None else share.feeds
        self.venue = LiveVenue(
            redis,
            shard,
            configs=configs,
            clients=self.clients,
            execution=parse_execution(f"{venue.exchange}=live"),
            poll_interval_s=0.05,
            consumer_settings=fast,
            feeds=self.feeds,
        )
        self._n = 0

    async def send(self, type_name: str, **data: Any) -> str:
        self._n += 1
        command_id = data.pop("command_id", f"c{self._n}")
        await self.redis.xadd(
            self.keys.commands,
            {"type": type_name, "data": json.dumps({"command_id": command_id, "user_id": self.user, **data})},
        )
        return command_id

    async def place(
        self, symbol: str = BTC, quantity: str = "0.1", price: str | None = "45000", *, followed: bool = True
    ) -> str:
        """A buy (limit, or market without a price), open at the venue and (``followed``) followed
        over the socket."""
        order_type = "market" if price is None else "limit"
        priced = {} if price is None else {"price": price}
        command_id = await self.send(
            "place_order",
            exchange=self.book.exchange,
            symbol=symbol,
            side="buy",
            order_type=order_type,
            quantity=quantity,
            **priced,
        )
        reply: dict[str, Any] = {}

        async def replied() -> bool:
            raw = await self.redis.lindex(self.keys.reply(self.user, command_id), 0)
            reply.update(json.loads(raw) if raw else {})
            return bool(reply)

        await until(replied, "the reply to place_order")
        order_id = str(reply["order_id"])
        await until(lambda: self.status_is(order_id, OrderStatus.OPEN), "the order open")
        if followed:
            await until(self.followed, "the account followed over the socket")
        return order_id

    async def followed(self) -> bool:
        feed = self.feeds.get(self.account)
        return feed is not None and feed.subscribed and not self.venue._due and self.account not in self.venue.stale

    async def order(self, order_id: str) -> Any:
        return await self.store.order(order_id)

    async def status_is(self, order_id: str, status: OrderStatus) -> bool:
        order = await self.order(order_id)
        return order is not None and order.status is status

    async def fill_ids_are(self, order_id: str, fill_ids: list[str]) -> bool:
        order = await self.order(order_id)
        return order is not None and list(order.fill_ids) == fill_ids

    async def events(self, type_name: str, order_id: str) -> list[Any]:
        return [
            s.event for s in await self.store.read_range() if s.event.type == type_name and s.event.stream == order_id
        ]

    async def done(self, order_id: str) -> bool:
        """Whether the venue is done with the order (its last command published)."""
        record = (await self.venue.working()).get(order_id)
        return record is not None and record.stage == "done"

    def fetches(self) -> int:
        return sum(1 for request in self.book.requests if request in FETCHES[self.book.exchange])


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 4.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(redis: Any, okx: LoopbackWsExchange, **options: Any) -> AsyncIterator[WsRig]:
    rig = WsRig(redis, okx, **options)
    await rig.venue.burst()  # the venue's group starts at the end of the log: create it first
    stop = asyncio.Event()
    tasks = [asyncio.create_task(rig.handler.run(stop)), asyncio.create_task(rig.venue.run(stop))]
    try:
        yield rig
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        if "share" not in options:  # the clients are the sharing rig's to close
            await rig.clients.close()


@pytest.fixture
def okx() -> Iterator[LoopbackWsExchange]:
    with loopback_ws_exchange("okx") as venue:
        venue.ws_secret = SECRET  # the login's signature is checked
        yield venue


@pytest.fixture
def upbit() -> Iterator[LoopbackWsExchange]:
    with loopback_ws_exchange("upbit") as venue:
        venue.ws_secret = SECRET  # the JWT's signature is checked
        yield venue


@pytest.fixture
def binance() -> Iterator[LoopbackWsExchange]:
    with loopback_ws_exchange("binance") as venue:
        venue.ws_secret = SECRET  # the subscription's signature is checked
        yield venue


# --------------------------------------------------------------------------- pushes


async def test_a_pushed_fill_is_recorded_once_though_polling_sees_it_too(redis: Any, okx: LoopbackWsExchange) -> None:
    await _pushed_fill_recorded_once(redis, okx)


async def test_a_pushed_fill_is_recorded_once_on_redis_cluster(redis_cluster: Any, okx: LoopbackWsExchange) -> None:
    await _pushed_fill_recorded_once(redis_cluster, okx)


async def _pushed_fill_recorded_once(redis: Any, okx: LoopbackWsExchange) -> None:
    with structlog.testing.capture_logs() as logs:
        async with running(redis, okx) as rig:
            order_id = await rig.place()
            client_id = order_id.replace("-", "")
            fetched = rig.fetches()
            okx.fill(client_id, "4", "45000", "t-1", fee="0.009")
            await until(lambda: rig.fill_ids_are(order_id, ["t-1"]), "the pushed fill")
            assert rig.fetches() == fetched  # learned from the push: nothing was fetched
            # the polling path sees the same trade: the same command, absorbed by the handler
            client = rig.clients.get(rig.venue.configs[Exchange.OKX].accounts["main"])
            report = await client.fetch(okx.order(client_id).venue_id, bundled(Exchange.OKX).resolve(BTC))
            polled = commands.fill(order_id, USER, report.fills[0])
            await rig.redis.xadd(KEYS.commands, wire.command_fields(polled))
            await rig.venue.tick(feed=rig.account)  # and a polling round finds nothing new
            await until(lambda: _handled(rig.redis), "the handler to read every command")
            order = await rig.order(order_id)
    assert (order.status, order.filled_qty, order.fill_ids) == (OrderStatus.PARTIALLY_FILLED, Decimal("0.04"), ["t-1"])
    fills = await rig.events("OrderFilled", order_id)
    assert [(f.command_id, f.fill_id, f.quantity, f.price, f.fee, f.fee_currency) for f in fills] == [
        (polled.command_id, "t-1", "0.04", "45000", "0.009", "USDT")
    ]
    assert (polled.quantity, polled.price, polled.fee, polled.fee_currency) == ("0.04", "45000", "0.009", "USDT")
    assert okx.creates == {client_id: 1}
    text = repr(logs)
    assert SECRET not in text and PASSWORD not in text and API_KEY not in text
    assert all(e.get("order_id") for e in logs if e["event"] == "fill")


async def _handled(redis: Any) -> bool:
    groups = await redis.xinfo_groups(KEYS.commands)
    names = (HANDLER_GROUP, HANDLER_GROUP.encode())
    return all(g["lag"] == 0 and g["pending"] == 0 for g in groups if g["name"] in names)


async def test_partial_fills_then_a_cancel_over_the_socket(redis: Any, okx: LoopbackWsExchange) -> None:
    async with running(redis, okx) as rig:
        order_id = await rig.place()
        client_id = order_id.replace("-", "")
        okx.fill(client_id, "4", "45000", "t-1", fee="0.009")
        okx.fill(client_id, "3", "44999.5", "t-2", fee="0.00675")
        await until(lambda: rig.fill_ids_are(order_id, ["t-1", "t-2"]), "both pushed fills")
        fetched = rig.fetches()
        await rig.send("cancel_order", order_id=order_id)
        await until(lambda: rig.status_is(order_id, OrderStatus.CANCELLED), "the cancel")
        assert rig.fetches() == fetched + 2  # the pushed cancel confirmed by one fetch (order, trades)
    order = await rig.order(order_id)
    assert (order.filled_qty, order.fill_ids) == (Decimal("0.07"), ["t-1", "t-2"])
    assert [e.command_id for e in await rig.events("OrderCancelled", order_id)] == [f"venue:{order_id}:cancel"]
    assert [p["data"][0]["state"] for p in okx.pushes] == ["live", "partially_filled", "partially_filled", "canceled"]
    assert (await rig.venue.working())[order_id].stage == "done"


async def test_a_duplicate_push_of_a_trade_is_absorbed(redis: Any, okx: LoopbackWsExchange) -> None:
    async with running(redis, okx) as rig:
        order_id = await rig.place()
        client_id = order_id.replace("-", "")
        okx.fill(client_id, "4", "45000", "t-1")
        await until(lambda: rig.fill_ids_are(order_id, ["t-1"]), "the first fill")
        okx.push_again()  # the same trade pushed once more, then the next trade
        okx.fill(client_id, "6", "45000", "t-2")
        await until(lambda: rig.status_is(order_id, OrderStatus.FILLED), "the order filled")
    assert [f.fill_id for f in await rig.events("OrderFilled", order_id)] == ["t-1", "t-2"]
    assert [p["data"][0]["tradeId"] for p in okx.pushes] == ["", "t-1", "t-1", "t-2"]


# --------------------------------------------------------------------------- a disconnect


async def test_a_disconnect_falls_back_to_polling_then_the_socket_resumes(redis: Any, okx: LoopbackWsExchange) -> None:
    with structlog.testing.capture_logs() as logs:
        async with running(redis, okx) as rig:
            order_id = await rig.place()
            client_id = order_id.replace("-", "")
            okx.drop(then=lambda: okx.fill(client_id, "4", "45000", "t-1"))  # pushed to nobody
            await until(lambda: rig.fill_ids_are(order_id, ["t-1"]), "the fill found by polling")
            await until(rig.followed, "the socket back")
            assert okx.connections == 2
            fetched = rig.fetches()
            okx.fill(client_id, "6", "45000", "t-2")
            await until(lambda: rig.done(order_id), "the venue done with the order")
            assert rig.fetches() == fetched + 2  # t-2 pushed; the final status confirmed by one fetch
            await until(lambda: rig.status_is(order_id, OrderStatus.FILLED), "the order filled")
    assert [f.fill_id for f in await rig.events("OrderFilled", order_id)] == ["t-1", "t-2"]
    assert [p["data"][0]["tradeId"] for p in okx.pushes] == ["", "t-1", "t-2"]
    lost = [e for e in logs if e["event"] == "websocket lost: polling, reconnecting with back-off"]
    assert [(e["exchange"], e["account"]) for e in lost] == [("okx", "main")]
    rounds = [e["why"] for e in logs if e["event"] == "polling round"]
    assert rounds == ["caught up after (re)connecting", "websocket lost", "caught up after (re)connecting"]
    assert SECRET not in repr(logs) and PASSWORD not in repr(logs)


# --------------------------------------------------------------------------- Binance spot


async def test_binance_spot_partial_fills_then_a_cancel_over_the_user_data_stream(
    redis: Any, binance: LoopbackWsExchange
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with running(redis, binance) as rig:
            order_id = await rig.place(symbol="BTC/USDT", quantity="0.01", price="40000")
            client_id = order_id.replace("-", "")
            fetched = rig.fetches()
            binance.fill(client_id, "0.004", "40000", "9001", fee="0.016")
            binance.fill(client_id, "0.003", "39999.5", "9002", fee="0.012")
            await until(lambda: rig.fill_ids_are(order_id, ["9001", "9002"]), "both pushed fills")
            assert rig.fetches() == fetched  # learned from the pushes
            await rig.send("cancel_order", order_id=order_id)
            await until(lambda: rig.status_is(order_id, OrderStatus.CANCELLED), "the cancel")
    fills = await rig.events("OrderFilled", order_id)
    assert [(f.fill_id, f.quantity, f.price, f.fee, f.fee_currency) for f in fills] == [
        ("9001", "0.004", "40000", "0.016", "USDT"),
        ("9002", "0.003", "39999.5", "0.012", "USDT"),
    ]
    assert [(p["event"]["x"], p["event"]["X"]) for p in binance.pushes] == [
        ("NEW", "NEW"),
        ("TRADE", "PARTIALLY_FILLED"),
        ("TRADE", "PARTIALLY_FILLED"),
        ("CANCELED", "CANCELED"),
    ]
    assert [e.command_id for e in await rig.events("OrderCancelled", order_id)] == [f"venue:{order_id}:cancel"]
    assert SECRET not in repr(logs) and API_KEY not in repr(logs)


# --------------------------------------------------------------------------- Binance futures

USDM, COINM = "BTC/USDT:USDT", "BTC/USD:BTC"  # COIN-M: quantities in contracts (100 USD each)
FUTURE = (Exchange.BINANCE, "main", "future")
DELIVERY = (Exchange.BINANCE, "main", "delivery")


async def test_binance_usdm_partial_fill_then_fill_pushed_recorded_once_though_polled_too(
    redis: Any, binance: LoopbackWsExchange
) -> None:
    await _usdm_fills_recorded_once(redis, binance)


async def test_binance_usdm_fills_pushed_on_redis_cluster(redis_cluster: Any, binance: LoopbackWsExchange) -> None:
    await _usdm_fills_recorded_once(redis_cluster, binance)


async def _usdm_fills_recorded_once(redis: Any, binance: LoopbackWsExchange) -> None:
    async with running(redis, binance, stream="future") as rig:
        order_id = await rig.place(symbol=USDM, quantity="0.01", price="40000")
        assert rig.venue.following == {FUTURE}  # no spot stream: the account has no spot order
        client_id = order_id.replace("-", "")
        fetched = rig.fetches()
        binance.fill(client_id, "0.004", "40000", "9001", fee="0.0064")
        await until(lambda: rig.fill_ids_are(order_id, ["9001"]), "the pushed partial fill")
        assert rig.fetches() == fetched  # learned from the push: nothing was fetched
        assert await rig.venue.tick(feed=FUTURE) == 0  # a polling round sees the same trade: nothing new
        assert rig.fetches() == fetched + 2  # the order and its trades, fetched once
        # the polling path's command for that trade is the pushed one's: absorbed by the handler
        client = rig.clients.get(rig.venue.configs[Exchange.BINANCE].accounts["main"])
        report = await client.fetch(binance.order(client_id).venue_id, bundled(Exchange.BINANCE).resolve(USDM))
        await rig.redis.xadd(rig.keys.commands, wire.command_fields(commands.fill(order_id, USER, report.fills[0])))
        binance.fill(client_id, "0.006", "39999.5", "9002", fee="0.0096")
        await until(lambda: rig.status_is(order_id, OrderStatus.FILLED), "the pushed fill")
        await until(lambda: _handled(rig.redis), "the handler to read every command")
    fills = await rig.events("OrderFilled", order_id)
    assert [(f.command_id, f.fill_id, f.quantity, f.price, f.fee, f.fee_currency) for f in fills] == [
        (commands.fill_command_id(order_id, "9001"), "9001", "0.004", "40000", "0.0064", "USDT"),
        (commands.fill_command_id(order_id, "9002"), "9002", "0.006", "39999.5", "0.0096", "USDT"),
    ]
    assert [(p["o"]["x"], p["o"]["X"], p["o"]["l"]) for p in binance.pushes] == [
        ("NEW", "NEW", "0"),
        ("TRADE", "PARTIALLY_FILLED", "0.004"),
        ("TRADE", "FILLED", "0.006"),
    ]
    assert binance.requests.count("POST /fapi/v1/listenKey") == 1 and binance.connections == 1
    assert binance.creates == {client_id: 1}


async def test_binance_coinm_fill_pushed_in_contracts(redis: Any, binance: LoopbackWsExchange) -> None:
    async with running(redis, binance, stream="delivery") as rig:
        order_id = await rig.place(symbol=COINM, quantity="3", price="40000")
        client_id = order_id.replace("-", "")
        fetched = rig.fetches()
        binance.fill(client_id, "2", "40000", "9101", fee="0.00000250")
        await until(lambda: rig.fill_ids_are(order_id, ["9101"]), "the pushed fill")
        assert rig.fetches() == fetched  # learned from the push
        order = await rig.order(order_id)
    assert (order.status, order.filled_qty) == (OrderStatus.PARTIALLY_FILLED, Decimal(2))
    fills = await rig.events("OrderFilled", order_id)
    assert [(f.fill_id, f.quantity, f.price, f.fee, f.fee_currency) for f in fills] == [
        ("9101", "2", "40000", "0.0000025", "BTC")
    ]
    assert [p["o"]["l"] for p in binance.pushes] == ["0", "2"] and binance.pushed_apis == ["dapi", "dapi"]
    assert binance.requests.count("POST /dapi/v1/listenKey") == 1
    assert not [r for r in binance.requests if "positionRisk" in r]  # no positions snapshot asked for


async def test_a_binance_spot_only_account_opens_no_futures_stream(redis: Any, binance: LoopbackWsExchange) -> None:
    async with running(redis, binance) as rig:
        order_id = await rig.place(symbol="BTC/USDT", quantity="0.01", price="40000")
        assert rig.venue.following == {rig.account}
        binance.fill(order_id.replace("-", ""), "0.01", "40000", "9201")
        await until(lambda: rig.status_is(order_id, OrderStatus.FILLED), "the pushed fill")
    assert rig.account == (Exchange.BINANCE, "main", "spot")
    assert not [r for r in binance.requests if r.endswith("/listenKey")] and binance.connections == 1


async def test_a_refused_futures_stream_falls_back_to_polling_with_one_log_line(
    redis: Any, binance: LoopbackWsExchange
) -> None:
    binance.refuse_streams.add("fapi")  # an API key without futures permission
    with structlog.testing.capture_logs() as logs:
        async with running(redis, binance, stream="future") as rig:
            order_id = await rig.place(symbol=USDM, quantity="0.01", price="40000", followed=False)
            await until(lambda: _feed_gone(rig, FUTURE), "the refused stream left")
            binance.fill(order_id.replace("-", ""), "0.01", "40000", "9301", fee="0.016")
            await until(lambda: rig.status_is(order_id, OrderStatus.FILLED), "the polled fill")
            await asyncio.sleep(0.3)  # several driver passes: the stream is not asked for again
    refused = [e for e in logs if e["log_level"] == "error"]
    assert [(e["event"], e["stream"], e["account"]) for e in refused] == [
        (
            "binance: the future WebSocket of account main was refused (AuthenticationError): its orders are"
            " polled; give the API key the permission (Binance: Enable Futures) and restart the venue to"
            " follow them over WebSocket",
            "future",
            "main",
        )
    ]
    assert binance.requests.count("POST /fapi/v1/listenKey") == 1 and binance.connections == 0
    assert "websocket feed stopped: no working orders" not in [e["event"] for e in logs]
    assert [f.fill_id for f in await rig.events("OrderFilled", order_id)] == ["9301"]


async def _feed_gone(rig: WsRig, key: Any) -> bool:
    feed = rig.feeds.get(key)
    return feed is not None and feed.task is None and key not in rig.venue.following


# --------------------------------------------------------------------------- Upbit

TRADE_1 = "b3f7c1de-0000-4000-8000-000000000001"
TRADE_2 = "b3f7c1de-0000-4000-8000-000000000002"


async def test_upbit_fills_pushed_with_their_fees_then_done(redis: Any, upbit: LoopbackWsExchange) -> None:
    async with running(redis, upbit) as rig:
        order_id = await rig.place(symbol="KRW-BTC", quantity="0.001", price="50000000")
        fetched = rig.fetches()
        upbit.fill(order_id, "0.0006", "50000000", TRADE_1, fee="15")
        await until(lambda: rig.fill_ids_are(order_id, [TRADE_1]), "the first pushed fill")
        assert rig.fetches() == fetched
        upbit.fill(order_id, "0.0004", "50000000", TRADE_2, fee="10")  # then ``done``: confirmed by one fetch
        await until(lambda: rig.done(order_id), "the venue done with the order")
        assert rig.fetches() == fetched + 1
        await until(lambda: rig.status_is(order_id, OrderStatus.FILLED), "the order filled")
    fills = await rig.events("OrderFilled", order_id)
    assert [(f.fill_id, f.quantity, f.fee, f.fee_currency) for f in fills] == [
        (TRADE_1, "0.0006", "15", "KRW"),  # the fee the venue pushed (its REST trades have none)
        (TRADE_2, "0.0004", "10", "KRW"),
    ]
    assert [(p["state"], p["trade_uuid"]) for p in upbit.pushes] == [
        ("wait", None),
        ("trade", TRADE_1),
        ("trade", TRADE_2),
        ("done", None),
    ]


async def test_an_upbit_market_buy_pushed_as_cancel_is_a_fill(redis: Any, upbit: LoopbackWsExchange) -> None:
    async with running(redis, upbit) as rig:
        await redis.hset(marks("upbit"), "KRW-BTC", "50000000")
        order_id = await rig.place(symbol="KRW-BTC", quantity="0.001", price=None)
        assert (upbit.order(order_id).cost, upbit.order(order_id).amount) == ("50000", None)
        upbit.fill(order_id, "0.0009", "50100000", TRADE_1, fee="22.545")
        upbit.finish(order_id, "canceled")  # the unspent KRW came back: Upbit says "cancel"
        await until(lambda: rig.status_is(order_id, OrderStatus.EXPIRED), "the rest expired")
    order = await rig.order(order_id)
    assert (order.filled_qty, order.fill_ids) == (Decimal("0.0009"), [TRADE_1])
    assert await rig.events("OrderCancelled", order_id) == []
    assert [p["state"] for p in upbit.pushes] == ["wait", "trade", "cancel"]


# --------------------------------------------------------------------------- fencing


async def test_a_venue_that_lost_its_lease_writes_nothing_a_push_brings_and_leaves_the_feed(
    redis: Any, okx: LoopbackWsExchange
) -> None:
    async with running(redis, okx) as rig:
        order_id = await rig.place()
        feed = rig.feeds.get(rig.account)
        assert feed is not None and feed.venues == {rig.venue}
        await redis.set(rig.venue.venue_keys.lease, "ledger-venue:another-process", px=60_000)
        okx.fill(order_id.replace("-", ""), "4", "45000", "t-1")
        await until(lambda: _left(rig), "the venue to leave the feed")
        await rig.handler.burst()
        assert await rig.events("OrderFilled", order_id) == []
        assert (await rig.venue.working())[order_id].fills == []


async def _left(rig: WsRig) -> bool:
    feed = rig.feeds.get(rig.account)
    return feed is not None and not feed.venues and not rig.venue.following


# --------------------------------------------------------------------------- shards


async def test_two_shards_share_one_socket_per_account_each_gets_its_own_orders(
    redis: Any, okx: LoopbackWsExchange
) -> None:
    async with running(redis, okx, shard=0, shards=2, user=OTHER_USER) as first:
        async with running(redis, okx, shard=1, shards=2, user=USER, share=first) as second:
            first_id = await first.place()
            second_id = await second.place()
            await until(second.followed, "the second shard following")
            feed = first.feeds.get(first.account)
            assert feed is not None and feed.venues == {first.venue, second.venue}
            fetched = first.fetches()
            okx.fill(second_id.replace("-", ""), "10", "45000", "t-2")
            okx.fill(first_id.replace("-", ""), "4", "45000", "t-1")
            await until(lambda: first.fill_ids_are(first_id, ["t-1"]), "shard 0's fill")
            await until(lambda: second.done(second_id), "shard 1's order done")
            await until(lambda: second.status_is(second_id, OrderStatus.FILLED), "shard 1's order filled")
            assert first.fetches() == fetched + 2  # shard 1's final status confirmed; no other fetch
    assert okx.connections == 1
    assert [f.fill_id for f in await first.events("OrderFilled", first_id)] == ["t-1"]
    assert [f.fill_id for f in await second.events("OrderFilled", second_id)] == ["t-2"]
    assert await first.events("OrderFilled", second_id) == [] and await second.events("OrderFilled", first_id) == []


async def test_the_feed_stops_with_the_last_working_order_and_starts_again_with_the_next(
    redis: Any, okx: LoopbackWsExchange
) -> None:
    async with running(redis, okx) as rig:
        first = await rig.place()
        okx.fill(first.replace("-", ""), "10", "45000", "t-1")
        await until(lambda: rig.done(first), "the first order done")
        await until(lambda: _stopped(rig), "the feed stopped")
        second = await rig.place()
        okx.fill(second.replace("-", ""), "4", "45000", "t-2")
        await until(lambda: rig.fill_ids_are(second, ["t-2"]), "the second order's pushed fill")
    assert okx.connections == 2


async def _stopped(rig: WsRig) -> bool:
    feed = rig.feeds.get(rig.account)
    return feed is not None and feed.task is None and not rig.venue.following
