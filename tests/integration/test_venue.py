"""The live venue (consumers/venue.py) against a real Redis, the real command handler and the
real ccxt exchange classes talking HTTP to a stateful loopback venue (tests/venue_server.py).

Commands are published as a strategy would; the handler and the venue run in bursts, alternating
with driver ticks until nothing moves (``Rig.settle``). The loopback venue counts create requests
per client order id, so "no second order" is checked at the venue itself.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgspec
import structlog

from consumers.command_handler import GROUP as HANDLER_GROUP
from consumers.command_handler import CommandHandler
from consumers.runner import StreamConsumer
from consumers.venue import LiveVenue, VenueKeys
from ledger.config import parse_execution
from ledger.domain.enums import Exchange, OrderStatus
from ledger.domain.values import now_ms
from ledger.store.eventstore import EventStore
from ledger.store.keys import ShardKeys, marks
from ledger.venues.accounts import parse_credentials
from ledger.venues.live import VenueClients
from tests.venue_server import LoopbackExchange

USER = "alice"
KEYS = ShardKeys(0)
SECRET = "s3cr3t-never-logged"
PASSWORD = "p4ssphrase-never-logged"


class Rig:
    """The command handler and the live venue of shard 0, run in bursts."""

    def __init__(
        self, redis: Any, venue: LoopbackExchange, *, resend_after_s: float = 0.0, position_mode: str = "net"
    ) -> None:
        self.redis = redis
        self.book = venue
        self.exchange = Exchange(venue.exchange)
        self.store = EventStore(redis, 0)
        self.handler = StreamConsumer(
            redis,
            stream=KEYS.commands,
            group=HANDLER_GROUP,
            handler=CommandHandler(self.store, 1).handle,
            dead_stream=KEYS.dead,
        )
        account: dict[str, Any] = {"apiKey": "key-1", "secret": SECRET, "users": [USER], "position_mode": position_mode}
        if self.exchange is Exchange.OKX:
            account["password"] = PASSWORD
        configs = parse_credentials(
            {venue.exchange: {"base_url": venue.url, "timeout_ms": 500, "accounts": {"main": account}}}
        )
        self.clients = VenueClients({e: c.options for e, c in configs.items()})
        self.venue = LiveVenue(
            redis,
            0,
            configs=configs,
            clients=self.clients,
            execution=parse_execution(f"{venue.exchange}=live"),
            resend_after_s=resend_after_s,
        )
        self._n = 0

    async def start(self) -> None:
        await self.venue.burst()  # the group starts at the end of the log: create it first

    async def settle(self, rounds: int = 30) -> None:
        for _ in range(rounds):
            moved = await self.handler.burst()
            moved += await self.venue.burst()
            moved += await self.venue.tick()
            if moved == 0:
                return
        raise AssertionError("the handler and the live venue did not settle")

    async def send(self, type_name: str, **data: Any) -> str:
        self._n += 1
        command_id = data.pop("command_id", f"c{self._n}")
        payload = {"command_id": command_id, "user_id": data.pop("user_id", USER), **data}
        await self.redis.xadd(KEYS.commands, {"type": type_name, "data": json.dumps(payload)})
        return command_id

    async def place(self, **data: Any) -> str:
        data.setdefault("exchange", self.exchange.value)
        command_id = await self.send("place_order", **data)
        await self.settle()
        raw = await self.redis.lindex(KEYS.reply(data.get("user_id", USER), command_id), 0)
        reply = json.loads(raw)
        assert reply["status"] == "accepted", reply
        return str(reply["order_id"])

    async def placed_through_a_timeout(self, **data: Any) -> str:
        """Place an order the venue books at once but answers after the client's 500 ms timeout:
        the intent stays ``sending`` and the order ``pending`` (an unknown outcome is never a
        rejection); then the venue answers at once again and the rig settles. The order id."""
        self.book.create_delay_s = 1.5
        command_id = await self.send("place_order", exchange=self.exchange.value, **data)
        await self.handler.burst()
        await self.venue.burst()
        assert await self.venue.tick() == 1
        order_id = str(json.loads(await self.redis.lindex(KEYS.reply(USER, command_id), 0))["order_id"])
        assert (await self.venue.working())[order_id].stage == "sending"
        await self.handler.burst()
        assert (await self.order(order_id)).status is OrderStatus.PENDING
        self.book.create_delay_s = 0
        await self.settle()
        return order_id

    async def order(self, order_id: str) -> Any:
        order = await self.store.order(order_id)
        assert order is not None
        return order

    async def events(self, type_name: str, order_id: str) -> list[Any]:
        return [
            s.event for s in await self.store.read_range() if s.event.type == type_name and s.event.stream == order_id
        ]


async def _rig(redis: Any, venue: LoopbackExchange, **options: Any) -> Rig:
    rig = Rig(redis, venue, **options)
    await rig.start()
    return rig


# --------------------------------------------------------------------------- the lifecycle


async def test_okx_order_accepted_partially_filled_then_filled_in_contracts(redis: Any, okx: LoopbackExchange) -> None:
    await _okx_lifecycle(redis, okx)


async def test_okx_lifecycle_on_redis_cluster(redis_cluster: Any, okx: LoopbackExchange) -> None:
    await _okx_lifecycle(redis_cluster, okx)


async def _okx_lifecycle(redis: Any, okx: LoopbackExchange) -> None:
    rig = await _rig(redis, okx)
    with structlog.testing.capture_logs() as logs:
        order_id = await rig.place(
            symbol="BTC-USDT-SWAP", side="buy", order_type="limit", quantity="0.1", price="45000", client_order_id="s-1"
        )
        client_id = order_id.replace("-", "")
        booked = okx.order(client_id)
        assert (booked.market_id, booked.amount, booked.price) == ("BTC-USDT-SWAP", Decimal(10), "45000")
        order = await rig.order(order_id)
        assert (order.status, order.exchange_order_id) == (OrderStatus.OPEN, booked.venue_id)

        okx.fill(client_id, "4", "45000", "t-1", fee="0.009")
        await rig.settle()
        await rig.settle()  # the same trade listed again: one fill
        order = await rig.order(order_id)
        assert (order.status, order.filled_qty, order.fill_ids) == (
            OrderStatus.PARTIALLY_FILLED,
            Decimal("0.04"),
            ["t-1"],
        )

        okx.fill(client_id, "6", "44999.9", "t-2", fee="0.0135")
        await rig.settle()
    order = await rig.order(order_id)
    assert (order.status, order.filled_qty, order.fill_ids) == (OrderStatus.FILLED, Decimal("0.1"), ["t-1", "t-2"])
    fills = await rig.events("OrderFilled", order_id)
    assert [(f.fill_id, f.quantity, f.price, f.fee, f.fee_currency) for f in fills] == [
        ("t-1", "0.04", "45000", "0.009", "USDT"),
        ("t-2", "0.06", "44999.9", "0.0135", "USDT"),
    ]
    assert [e.command_id for e in await rig.events("OrderAccepted", order_id)] == [f"venue:{order_id}:accept"]
    assert okx.creates == {client_id: 1}
    assert (await rig.venue.working())[order_id].stage == "done"
    text = repr(logs)
    assert SECRET not in text and PASSWORD not in text and "key-1" not in text
    assert "s-1" not in str(okx.requests) and all(e.get("order_id") for e in logs if e["event"] == "fill")
    await rig.clients.close()


async def test_binance_cancel_confirmed_by_the_venue(redis: Any, binance: LoopbackExchange) -> None:
    rig = await _rig(redis, binance)
    order_id = await rig.place(symbol="BTC/USDT", side="buy", order_type="limit", quantity="0.01", price="40000")
    await rig.send("cancel_order", order_id=order_id)
    await rig.settle()
    assert (await rig.order(order_id)).status is OrderStatus.CANCELLED
    assert binance.only_order().state == "canceled"
    assert [e.command_id for e in await rig.events("OrderCancelled", order_id)] == [f"venue:{order_id}:cancel"]
    await rig.clients.close()


async def test_a_fill_arriving_after_the_cancel_request_is_a_fill_not_a_cancel(
    redis: Any, binance: LoopbackExchange
) -> None:
    rig = await _rig(redis, binance)
    order_id = await rig.place(symbol="BTC/USDT", side="buy", order_type="limit", quantity="0.01", price="40000")
    binance.fill_on_cancel = ("0.01", "40000", "9001")  # fills while the cancel is on its way: refused
    await rig.send("cancel_order", order_id=order_id)
    await rig.settle()
    order = await rig.order(order_id)
    assert (order.status, order.filled_qty, order.fill_ids) == (OrderStatus.FILLED, Decimal("0.01"), ["9001"])
    assert await rig.events("OrderCancelled", order_id) == []
    await rig.clients.close()


async def test_an_upbit_market_buy_reported_as_cancel_is_a_fill(redis: Any, upbit: LoopbackExchange) -> None:
    rig = await _rig(redis, upbit)
    await redis.hset(marks("upbit"), "KRW-BTC", "50000000")
    order_id = await rig.place(symbol="KRW-BTC", side="buy", order_type="market", quantity="0.001")
    booked = upbit.order(order_id)
    assert (booked.cost, booked.amount) == ("50000", None)  # sent as a cost: quantity x mark
    upbit.fill(order_id, "0.0009", "50100000", "b3f7c1de-0000-4000-8000-000000000001")
    upbit.finish(order_id, "canceled")  # the unspent KRW came back: Upbit says "cancel"
    await rig.settle()
    order = await rig.order(order_id)
    assert (order.status, order.filled_qty) == (OrderStatus.EXPIRED, Decimal("0.0009"))
    assert [f.quantity for f in await rig.events("OrderFilled", order_id)] == ["0.0009"]
    assert await rig.events("OrderCancelled", order_id) == []
    await rig.clients.close()


# --------------------------------------------------------------------------- exactly once


async def test_a_timeout_during_placement_sends_no_second_order(redis: Any, okx: LoopbackExchange) -> None:
    rig = await _rig(redis, okx)
    order_id = await rig.placed_through_a_timeout(
        symbol="BTC-USDT", side="buy", order_type="limit", quantity="0.001", price="40000"
    )
    order = await rig.order(order_id)
    assert (order.status, order.exchange_order_id) == (OrderStatus.OPEN, okx.only_order().venue_id)
    assert okx.creates == {order_id.replace("-", ""): 1}
    await rig.clients.close()


async def test_an_intent_marked_sending_but_not_at_the_venue_is_sent_once(redis: Any, okx: LoopbackExchange) -> None:
    """A crash after the intent was marked ``sending`` and before the request left: the lookup by
    client id finds nothing, and the order is sent then (not lost), once."""
    rig = await _rig(redis, okx)
    command_id = await rig.send(
        "place_order",
        exchange="okx",
        symbol="BTC-USDT",
        side="buy",
        order_type="limit",
        quantity="0.001",
        price="40000",
    )
    await rig.handler.burst()
    await rig.venue.burst()
    order_id = json.loads(await redis.lindex(KEYS.reply(USER, command_id), 0))["order_id"]
    record = (await rig.venue.working())[order_id]
    assert (record.stage, record.client_id) == ("new", order_id.replace("-", ""))
    await rig.venue._save(order_id, msgspec.structs.replace(record, stage="sending", sent_at=now_ms()), mode="set")
    await rig.settle()
    order = await rig.order(order_id)
    assert (order.status, order.exchange_order_id) == (OrderStatus.OPEN, okx.only_order().venue_id)
    assert okx.creates == {record.client_id: 1}
    await rig.clients.close()


# --------------------------------------------------------------------------- refusals


async def test_a_definite_refusal_is_a_rejection_with_the_venues_code_and_message(
    redis: Any, okx: LoopbackExchange
) -> None:
    rig = await _rig(redis, okx)
    okx.refuse_creates = True
    order_id = await rig.place(symbol="BTC-USDT-SWAP", side="buy", order_type="limit", quantity="0.01", price="45000")
    order = await rig.order(order_id)
    assert (order.status, order.reject_reason) == (
        OrderStatus.REJECTED,
        "okx refused the order: 51008 Order failed. Insufficient USDT margin in account",
    )
    await rig.clients.close()


async def test_orders_that_cannot_be_sent_are_rejected_before_reaching_the_venue(
    redis: Any, okx: LoopbackExchange
) -> None:
    rig = await _rig(redis, okx)
    off_step = await rig.place(
        symbol="BTC-USDT-SWAP", side="buy", order_type="limit", quantity="0.00015", price="45000"
    )
    stranger = await rig.place(
        symbol="BTC-USDT", side="buy", order_type="limit", quantity="0.001", price="40000", user_id="mallory"
    )
    stop = await rig.place(
        symbol="BTC-USDT", side="buy", order_type="stop_market", quantity="0.001", trigger_price="41000.05"
    )
    reasons = [(await rig.order(o)).reject_reason for o in (off_step, stranger, stop)]
    assert reasons == [
        "quantity 0.00015 is not a whole multiple of BTC/USDT:USDT's step 0.0001",
        "no live account for user mallory on okx: add the user to LEDGER_CREDENTIALS",
        "trigger price 41000.05 is not a whole multiple of BTC/USDT's tick 0.1",
    ]
    assert okx.creates == {}
    assert await redis.hlen(VenueKeys(0).orders) == 0
    await rig.clients.close()
