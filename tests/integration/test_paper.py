"""The paper venue (consumers/paper.py) against a real Redis and the real command handler.

Commands are published as a strategy would (XADD type/data JSON on ``ledger:{0}:commands``); the
command handler and the paper venue run in bursts, alternating with watcher ticks until nothing
moves any more (``Rig.settle``).
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import pytest

from consumers.command_handler import GROUP as HANDLER_GROUP
from consumers.command_handler import CommandHandler
from consumers.paper import (
    GROUP,
    PaperKeys,
    PaperVenue,
    RestingOrder,
    evaluate,
    fee_currency,
    paper_fee,
    paper_role,
)
from consumers.runner import ConsumerSettings, StreamConsumer
from ledger.config import ConfigError, Settings, parse_execution
from ledger.domain.enums import Exchange, OrderSide, OrderStatus, OrderType
from ledger.domain.values import RULES
from ledger.store.eventstore import EventStore
from ledger.store.keys import ShardKeys, marks

USER = "alice"
LINEAR = "BTC-USDT-SWAP"
INVERSE = "BTC-USD-SWAP"
KEYS = ShardKeys(0)
PAPER = PaperKeys(0)


class Rig:
    """The command handler and the paper venue of shard 0, run in bursts."""

    def __init__(self, redis: Any, execution: str = "paper", fee_rate: str = "0.0005") -> None:
        self.redis = redis
        self.store = EventStore(redis, 0)
        self.handler = StreamConsumer(
            redis,
            stream=KEYS.commands,
            group=HANDLER_GROUP,
            handler=CommandHandler(self.store, 1).handle,
            dead_stream=KEYS.dead,
        )
        self.venue = self.new_venue(execution, fee_rate)
        self._n = 0

    def new_venue(self, execution: str = "paper", fee_rate: str = "0.0005") -> PaperVenue:
        return PaperVenue(self.redis, 0, execution=parse_execution(execution), fee_rate=Decimal(fee_rate))

    async def settle(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = await self.handler.burst()
            moved += await self.venue.burst()
            moved += await self.venue.tick()
            if moved == 0:
                return
        raise AssertionError("the handler and the paper venue did not settle")

    async def send(self, type_name: str, **data: Any) -> str:
        """Publish a command like a strategy; return its command_id."""
        self._n += 1
        command_id = data.pop("command_id", f"c{self._n}")
        payload = {"command_id": command_id, "user_id": USER, **data}
        await self.redis.xadd(KEYS.commands, {"type": type_name, "data": json.dumps(payload)})
        return command_id

    async def reply(self, command_id: str) -> dict[str, Any]:
        raw = await self.redis.lindex(KEYS.reply(USER, command_id), 0)
        assert raw is not None, f"no reply for {command_id}"
        return json.loads(raw)  # type: ignore[no-any-return]

    async def place(self, **data: Any) -> str:
        """Place an order, settle, and return its order id."""
        data.setdefault("exchange", "okx")
        data.setdefault("symbol", LINEAR)
        command_id = await self.send("place_order", **data)
        await self.settle()
        reply = await self.reply(command_id)
        assert reply["status"] == "accepted", reply
        return reply["order_id"]  # type: ignore[no-any-return]

    async def mark(self, price: str, symbol: str = LINEAR, exchange: str = "okx") -> None:
        await self.redis.hset(marks(exchange), symbol, price)
        await self.settle()

    async def status(self, order_id: str) -> OrderStatus:
        order = await self.store.order(order_id)
        assert order is not None
        return order.status

    async def events(self, type_name: str | None = None, stream: str | None = None) -> list[Any]:
        found = [s.event for s in await self.store.read_range()]
        return [
            e for e in found if (type_name is None or e.type == type_name) and (stream is None or e.stream == stream)
        ]

    async def commands(self) -> list[tuple[str, dict[str, Any]]]:
        return [(f["type"], json.loads(f["data"])) for _id, f in await self.redis.xrange(KEYS.commands)]


@pytest.fixture
def rig(redis: Any) -> Rig:
    return Rig(redis)


# --------------------------------------------------------------------------- market orders


async def test_market_order_with_price_fills_at_that_price_with_exact_fee(rig: Rig) -> None:
    order_id = await rig.place(side="buy", order_type="market", quantity="0.1", price="45000")
    assert await rig.status(order_id) is OrderStatus.FILLED
    (accepted,) = await rig.events("OrderAccepted", order_id)
    assert accepted.exchange_order_id.startswith("paper-")
    (fill,) = await rig.events("OrderFilled", order_id)
    assert (fill.quantity, fill.price, fill.fee, fill.fee_currency) == ("0.1", "45000", "2.25000", "USDT")
    assert fill.fill_id == f"paper-fill-{order_id}"
    assert fill.command_id == f"paper:{order_id}:fill"
    (opened,) = await rig.events("PositionOpened")
    assert (opened.entry_price, opened.size, opened.fees) == ("45000", "0.1", "2.25000")
    assert await rig.redis.hlen(PAPER.resting) == 0


async def test_market_order_without_price_fills_at_the_mark(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "44000.5")
    order_id = await rig.place(side="sell", order_type="market", quantity="0.2")
    assert await rig.status(order_id) is OrderStatus.FILLED
    (fill,) = await rig.events("OrderFilled", order_id)
    assert (fill.price, fill.fee) == ("44000.5", format(Decimal("0.2") * Decimal("44000.5") * Decimal("0.0005"), "f"))
    (opened,) = await rig.events("PositionOpened")
    assert (opened.side, opened.entry_price) == ("short", "44000.5")


async def test_market_order_without_price_or_mark_is_rejected(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), "ETH-USDT-SWAP", "3000")  # another symbol's mark does not count
    order_id = await rig.place(side="buy", order_type="market", quantity="1")
    assert await rig.status(order_id) is OrderStatus.REJECTED
    (rejected,) = await rig.events("OrderRejected", order_id)
    assert rejected.reason == f"no price and no mark for {LINEAR}"
    assert await rig.events("OrderFilled") == []


async def test_market_order_worth_more_than_a_fill_can_report_is_rejected_not_left_open(rig: Rig) -> None:
    """Issue 7, defect 4: 1e12 at a mark of 1e12 (fee 5e20, 21 integer digits) once published a
    fill the ledger dead-lettered, and the order stayed open forever."""
    await rig.redis.hset(marks("okx"), LINEAR, "1000000000000")
    order_id = await rig.place(side="buy", order_type="market", quantity="1000000000000")
    assert await rig.status(order_id) is OrderStatus.REJECTED
    (rejected,) = await rig.events("OrderRejected", order_id)
    assert rejected.reason == (
        f"1000000000000 {LINEAR} at 1000000000000 is worth more than 99999999999999999999: the venue cannot fill it"
    )
    assert await rig.events("OrderFilled") == []


async def test_resting_order_the_mark_takes_out_of_range_expires(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "100")
    order_id = await rig.place(
        side="buy", order_type="stop_market", quantity="10000000000", trigger_price="1000"
    )  # worth 1e13 at its trigger: accepted
    assert await rig.status(order_id) is OrderStatus.OPEN
    await rig.mark("90000000000")  # 1e10 * 9e10 = 9e20 > 1e20 - 1
    assert await rig.status(order_id) is OrderStatus.EXPIRED
    assert await rig.events("OrderFilled") == []


async def test_an_undecodable_event_is_dead_lettered_once_and_the_venue_goes_on(rig: Rig) -> None:
    """The one policy for an event that cannot be decoded (once skipped with a log line only)."""
    await rig.redis.xadd(KEYS.events, {"type": "OrderPlaced", "data": '{"event_id": 1}'})
    order_id = await rig.place(side="buy", order_type="market", quantity="1", price="100")
    assert await rig.status(order_id) is OrderStatus.FILLED
    await rig.redis.xgroup_setid(KEYS.events, "ledger-paper", id="0")  # every event delivered again
    await rig.settle()

    letters = [f for _id, f in await rig.redis.xrange(KEYS.dead) if f["dead_group"] == "ledger-paper"]
    assert [(f["type"], f["dead_code"]) for f in letters] == [("OrderPlaced", "INVALID_FIELD")]


async def test_open_and_close_position_fill_as_market_orders(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "45000")
    opening = await rig.send("open_position", exchange="okx", symbol=LINEAR, side="long", size="0.3", leverage=5)
    await rig.settle()
    position_id = (await rig.reply(opening))["position_id"]
    (opened,) = await rig.events("PositionOpened", position_id)
    assert (opened.size, opened.entry_price, opened.leverage) == ("0.3", "45000", 5)
    await rig.redis.hset(marks("okx"), LINEAR, "46000")
    closing = await rig.send("close_position", position_id=position_id)
    await rig.settle()
    assert (await rig.reply(closing))["status"] == "accepted"
    (closed,) = await rig.events("PositionClosed", position_id)
    assert closed.exit_price == "46000"
    assert Decimal(closed.gross_pnl) == Decimal("300")
    # Fees 0.3 * 45000 * 0.0005 + 0.3 * 46000 * 0.0005 = 6.75 + 6.9
    assert Decimal(closed.fees) == Decimal("13.65")
    assert Decimal(closed.realized_pnl) == Decimal("286.35")


async def test_inverse_contract_fee_is_in_the_base_coin(rig: Rig) -> None:
    order_id = await rig.place(symbol=INVERSE, side="buy", order_type="market", quantity="10", price="50000")
    (fill,) = await rig.events("OrderFilled", order_id)
    # 10 contracts * 100 USD / 50000 * 0.0005 = 0.00001 BTC
    assert (fill.fee, fill.fee_currency) == ("0.00001", "BTC")
    (opened,) = await rig.events("PositionOpened")
    assert (opened.fees, opened.entry_price, opened.size) == ("0.00001", "50000", "10")


# --------------------------------------------------------------------------- resting orders


async def test_limit_buy_rests_until_the_mark_reaches_its_price(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "45000")
    order_id = await rig.place(side="buy", order_type="limit", quantity="0.1", price="44000")
    assert await rig.status(order_id) is OrderStatus.OPEN
    assert set(await rig.redis.hkeys(PAPER.resting)) == {order_id}
    await rig.mark("44000.01")
    assert await rig.status(order_id) is OrderStatus.OPEN
    await rig.mark("43900")
    assert await rig.status(order_id) is OrderStatus.FILLED
    (fill,) = await rig.events("OrderFilled", order_id)
    assert (fill.price, fill.fee) == ("44000", "2.20000")
    assert await rig.redis.hlen(PAPER.resting) == 0


async def test_orders_made_final_elsewhere_leave_the_resting_set_in_one_step(rig: Rig) -> None:
    """Resting orders made final by commands of the strategy's own (expired, and a fill it
    reports) leave the resting set, a batch's run of final orders in one script call; the mark
    crossing their prices afterwards fills nothing."""
    await rig.redis.hset(marks("okx"), LINEAR, "45000")
    expired, filled, kept = [
        await rig.place(side="buy", order_type="limit", quantity="0.1", price=price)
        for price in ("44000", "43000", "42000")
    ]
    assert set(await rig.redis.hkeys(PAPER.resting)) == {expired, filled, kept}
    version = int(await rig.redis.get(PAPER.version))
    await rig.send("order_expired", order_id=expired)
    await rig.send("record_fill", order_id=filled, fill_id="f1", quantity="0.1", price="43000", fee="1")
    await rig.handler.burst()
    await rig.redis.config_resetstat()
    await rig.venue.burst()
    stats = await rig.redis.info("commandstats")
    assert stats["cmdstat_eval"]["calls"] == 1
    assert set(await rig.redis.hkeys(PAPER.resting)) == {kept}
    assert int(await rig.redis.get(PAPER.version)) == version + 1
    await rig.mark("41000")
    assert [fill.stream for fill in await rig.events("OrderFilled")] == [filled, kept]
    assert await rig.status(expired) is OrderStatus.EXPIRED


async def test_sell_limit_fills_when_the_mark_rises_to_its_price(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "45000")
    order_id = await rig.place(side="sell", order_type="limit", quantity="0.5", price="46000")
    assert await rig.status(order_id) is OrderStatus.OPEN
    await rig.mark("45999")
    assert await rig.status(order_id) is OrderStatus.OPEN
    await rig.mark("46000")
    (fill,) = await rig.events("OrderFilled", order_id)
    assert fill.price == "46000"
    assert await rig.status(order_id) is OrderStatus.FILLED


async def test_limit_order_that_crosses_when_placed_fills_at_once_at_its_price(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "45000")
    order_id = await rig.place(side="buy", order_type="limit", quantity="0.1", price="45500")
    assert await rig.status(order_id) is OrderStatus.FILLED
    (fill,) = await rig.events("OrderFilled", order_id)
    assert fill.price == "45500"


async def test_limit_order_without_any_mark_rests(rig: Rig) -> None:
    order_id = await rig.place(side="buy", order_type="limit", quantity="0.1", price="45500")
    assert await rig.status(order_id) is OrderStatus.OPEN
    await rig.mark("45600")
    assert await rig.status(order_id) is OrderStatus.OPEN
    await rig.mark("45500")
    assert await rig.status(order_id) is OrderStatus.FILLED


async def test_stop_market_triggers_and_fills_at_the_mark(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "45000")
    buy = await rig.place(side="buy", order_type="stop_market", quantity="0.1", trigger_price="46000")
    sell = await rig.place(side="sell", order_type="stop_market", quantity="0.1", trigger_price="44000")
    assert {await rig.status(buy), await rig.status(sell)} == {OrderStatus.OPEN}
    await rig.mark("45999")
    assert await rig.events("OrderFilled") == []
    await rig.mark("46100")
    (fill,) = await rig.events("OrderFilled", buy)
    assert fill.price == "46100"
    assert await rig.status(sell) is OrderStatus.OPEN
    await rig.mark("43950")
    (fill,) = await rig.events("OrderFilled", sell)
    assert fill.price == "43950"


async def test_take_profit_market_triggers_the_other_way(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "45000")
    sell = await rig.place(side="sell", order_type="take_profit_market", quantity="0.1", trigger_price="47000")
    buy = await rig.place(side="buy", order_type="take_profit_market", quantity="0.1", trigger_price="43000")
    await rig.mark("46000")
    assert await rig.events("OrderFilled") == []
    await rig.mark("47001")
    (fill,) = await rig.events("OrderFilled", sell)
    assert fill.price == "47001"
    await rig.mark("42999")
    (fill,) = await rig.events("OrderFilled", buy)
    assert fill.price == "42999"


async def test_stop_limit_triggers_then_rests_as_a_limit(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "45000")
    order_id = await rig.place(
        side="buy", order_type="stop_limit", quantity="0.1", trigger_price="46000", price="45500"
    )
    await rig.mark("45400")  # below the limit, but the stop has not triggered
    assert await rig.status(order_id) is OrderStatus.OPEN
    await rig.mark("46100")  # triggers; a buy limit at 45500 does not fill at 46100
    assert await rig.status(order_id) is OrderStatus.OPEN
    stored = json.loads(await rig.redis.hget(PAPER.resting, order_id))
    assert stored["triggered"] is True
    # The trigger survives a restart: a new venue reads it back from Redis.
    await rig.redis.delete(PAPER.lease)  # the old process is gone, its lease lapsed
    rig.venue = rig.new_venue()
    await rig.mark("45400")
    (fill,) = await rig.events("OrderFilled", order_id)
    assert fill.price == "45500"


# --------------------------------------------------------------------------- cancels


async def test_cancelled_resting_order_never_fills(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "45000")
    order_id = await rig.place(side="buy", order_type="limit", quantity="0.1", price="40000")
    cancel = await rig.send("cancel_order", order_id=order_id)
    await rig.settle()
    assert (await rig.reply(cancel))["status"] == "accepted"
    assert await rig.status(order_id) is OrderStatus.CANCELLED
    (cancelled,) = await rig.events("OrderCancelled", order_id)
    assert cancelled.command_id == f"paper:{order_id}:cancel"
    assert await rig.redis.hlen(PAPER.resting) == 0
    await rig.mark("39000")
    assert await rig.events("OrderFilled") == []
    assert await rig.status(order_id) is OrderStatus.CANCELLED


async def test_pending_cancel_order_is_not_filled_when_the_mark_crosses_first(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "45000")
    order_id = await rig.place(side="buy", order_type="limit", quantity="0.1", price="44000")
    await rig.send("cancel_order", order_id=order_id)
    await rig.handler.burst()  # the order is pending_cancel; the venue has not seen the request
    assert await rig.status(order_id) is OrderStatus.PENDING_CANCEL
    await rig.redis.hset(marks("okx"), LINEAR, "43000")
    assert await rig.venue.tick() == 0
    await rig.settle()
    assert await rig.status(order_id) is OrderStatus.CANCELLED
    assert await rig.events("OrderFilled") == []


async def test_cancel_of_a_filled_order_does_nothing(rig: Rig) -> None:
    order_id = await rig.place(side="buy", order_type="market", quantity="0.1", price="45000")
    cancel = await rig.send("cancel_order", order_id=order_id)
    await rig.settle()
    assert (await rig.reply(cancel))["status"] == "rejected"
    assert await rig.status(order_id) is OrderStatus.FILLED
    assert not [c for c in await rig.commands() if c[0] == "order_cancelled"]


async def test_cancel_before_the_venue_saw_a_market_order_loses_the_race(rig: Rig) -> None:
    placing = await rig.send(
        "place_order", exchange="okx", symbol=LINEAR, side="buy", order_type="market", quantity="0.1", price="45000"
    )
    await rig.handler.burst()
    order_id = (await rig.reply(placing))["order_id"]
    await rig.send("cancel_order", order_id=order_id)
    await rig.settle()
    assert await rig.status(order_id) is OrderStatus.FILLED
    assert len(await rig.events("OrderFilled")) == 1


async def test_cancel_before_the_venue_saw_a_limit_order_cancels_it(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "43000")  # it would cross at once
    placing = await rig.send(
        "place_order", exchange="okx", symbol=LINEAR, side="buy", order_type="limit", quantity="0.1", price="44000"
    )
    await rig.handler.burst()
    order_id = (await rig.reply(placing))["order_id"]
    await rig.send("cancel_order", order_id=order_id)
    await rig.settle()
    assert await rig.status(order_id) is OrderStatus.CANCELLED
    assert await rig.events("OrderFilled") == []
    assert await rig.redis.hlen(PAPER.resting) == 0


# --------------------------------------------------------------------------- at least once


async def test_redelivering_every_event_creates_no_second_fill(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "45000")
    await rig.place(side="buy", order_type="market", quantity="0.1", price="45000")
    await rig.place(side="buy", order_type="market", quantity="0.1")
    await rig.place(side="buy", order_type="market", quantity="1", symbol="ETH-USDT-SWAP")  # rejected
    filled_limit = await rig.place(side="buy", order_type="limit", quantity="0.1", price="44000")
    cancelled = await rig.place(side="buy", order_type="limit", quantity="0.1", price="40000")
    resting = await rig.place(side="sell", order_type="limit", quantity="0.1", price="50000")
    await rig.mark("43900")
    await rig.send("cancel_order", order_id=cancelled)
    await rig.settle()
    assert await rig.status(filled_limit) is OrderStatus.FILLED
    assert await rig.status(cancelled) is OrderStatus.CANCELLED
    assert await rig.status(resting) is OrderStatus.OPEN
    before = await rig.events()
    fills = len(await rig.events("OrderFilled"))
    assert fills == 3

    published = await rig.redis.xlen(KEYS.commands)
    await rig.redis.xgroup_setid(KEYS.events, GROUP, "0")
    assert await rig.venue.burst() == len(before)
    # Final orders are left alone; the open one is acknowledged again (a duplicate, absorbed).
    again = (await rig.commands())[published:]
    assert [(t, d["order_id"], d["command_id"]) for t, d in again] == [
        ("order_accepted", resting, f"paper:{resting}:accept")
    ]
    await rig.settle()
    await rig.mark("39000")  # the cancelled order's price: it must not fill now

    assert len(await rig.events("OrderFilled")) == fills
    assert await rig.status(cancelled) is OrderStatus.CANCELLED
    assert set(await rig.redis.hkeys(PAPER.resting)) == {resting}
    assert len(await rig.events()) == len(before)
    await rig.mark("50000")
    assert await rig.status(resting) is OrderStatus.FILLED
    assert len(await rig.events("OrderFilled")) == fills + 1


async def test_published_commands_redelivered_are_absorbed_by_the_handler(rig: Rig) -> None:
    order_id = await rig.place(side="buy", order_type="market", quantity="0.1", price="45000")
    published = [c for c in await rig.commands() if c[1]["command_id"].startswith("paper:")]
    assert [c[0] for c in published] == ["order_accepted", "record_fill"]
    for type_name, data in published:  # the venue crashed before acking and published again
        await rig.redis.xadd(KEYS.commands, {"type": type_name, "data": json.dumps(data)})
    await rig.settle()
    assert len(await rig.events("OrderFilled", order_id)) == 1
    assert len(await rig.events("OrderAccepted", order_id)) == 1


async def test_rebuild_recomputes_the_resting_set_from_the_log(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "45000")
    open_order = await rig.place(side="buy", order_type="limit", quantity="0.1", price="44000")
    filled = await rig.place(side="buy", order_type="limit", quantity="0.1", price="45000")
    assert await rig.status(filled) is OrderStatus.FILLED
    before = await rig.events()
    await rig.redis.delete(PAPER.resting)  # lost
    await rig.venue.rebuild()
    await rig.settle()
    assert set(await rig.redis.hkeys(PAPER.resting)) == {open_order}
    assert len(await rig.events()) == len(before)
    await rig.mark("43000")
    assert await rig.status(open_order) is OrderStatus.FILLED


async def test_resting_orders_survive_a_restart(rig: Rig) -> None:
    await rig.redis.hset(marks("okx"), LINEAR, "45000")
    order_id = await rig.place(side="buy", order_type="limit", quantity="0.1", price="44000")
    await rig.redis.delete(PAPER.lease)  # the old process is gone, its lease lapsed
    rig.venue = rig.new_venue()  # a new process: nothing in memory
    assert set((await rig.venue.resting()).keys()) == {order_id}
    await rig.mark("44000")
    assert await rig.status(order_id) is OrderStatus.FILLED


# --------------------------------------------------------------------------- configuration


async def test_external_exchange_is_not_executed(redis: Any) -> None:
    rig = Rig(redis, execution="okx=external")
    await redis.hset(marks("okx"), LINEAR, "45000")
    market = await rig.place(side="buy", order_type="market", quantity="0.1", price="45000")
    limit = await rig.place(side="buy", order_type="limit", quantity="0.1", price="46000")
    await rig.mark("40000")
    assert await rig.status(market) is OrderStatus.PENDING
    assert await rig.status(limit) is OrderStatus.PENDING
    assert [c[0] for c in await rig.commands()] == ["place_order", "place_order"]
    assert await redis.hlen(PAPER.resting) == 0
    # binance keeps the default, paper
    other = await rig.place(
        exchange="binance", symbol="BTC/USDT:USDT", side="buy", order_type="market", quantity="0.1", price="45000"
    )
    assert await rig.status(other) is OrderStatus.FILLED


async def test_fee_rate_is_configurable(redis: Any) -> None:
    rig = Rig(redis, fee_rate="0.001")
    order_id = await rig.place(side="buy", order_type="market", quantity="2", price="100.5")
    (fill,) = await rig.events("OrderFilled", order_id)
    assert fill.fee == "0.2010"


async def test_role_runs_with_the_watcher_until_stopped(redis: Any) -> None:
    settings = Settings(paper_fee_rate=Decimal("0.0005"), claim_idle_ms=2000)
    (venue,) = await paper_role(redis, settings)
    venue.poll_interval_s = 0.02
    venue.consumer.settings = ConsumerSettings(block_ms=50, claim_idle_ms=2000)
    rig = Rig(redis)
    rig.handler.settings = ConsumerSettings(block_ms=50)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(venue.run(stop)), asyncio.create_task(rig.handler.run(stop))]
    try:
        await redis.hset(marks("okx"), LINEAR, "45000")
        placing = await rig.send(
            "place_order", exchange="okx", symbol=LINEAR, side="buy", order_type="limit", quantity="0.1", price="44000"
        )
        order_id = await _eventually(lambda: _reply_order(rig, placing))
        await _eventually(lambda: _status_is(rig, order_id, OrderStatus.OPEN))
        await redis.hset(marks("okx"), LINEAR, "43999")
        await _eventually(lambda: _status_is(rig, order_id, OrderStatus.FILLED))
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    (fill,) = await rig.events("OrderFilled", order_id)
    assert fill.price == "44000"


async def _reply_order(rig: Rig, command_id: str) -> str | None:
    raw = await rig.redis.lindex(KEYS.reply(USER, command_id), 0)
    return json.loads(raw)["order_id"] if raw else None


async def _status_is(rig: Rig, order_id: str, status: OrderStatus) -> bool:
    return await rig.status(order_id) is status


async def _eventually(probe: Any, timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- pure rules


def _resting(order_type: str, side: str, price: str | None = None, trigger: str | None = None) -> RestingOrder:
    return RestingOrder(
        user_id=USER,
        exchange=Exchange.OKX,
        symbol=LINEAR,
        side=OrderSide(side),
        order_type=OrderType(order_type),
        quantity="1",
        price=price,
        trigger_price=trigger,
    )


@pytest.mark.parametrize(
    ("order_type", "side", "price", "trigger", "mark", "fill"),
    [
        ("limit", "buy", "100", None, "100", "100"),
        ("limit", "buy", "100", None, "100.01", None),
        ("limit", "sell", "100", None, "100", "100"),
        ("limit", "sell", "100", None, "99.99", None),
        ("stop_market", "buy", None, "100", "100", "100"),
        ("stop_market", "buy", None, "100", "99", None),
        ("stop_market", "sell", None, "100", "99", "99"),
        ("stop_market", "sell", None, "100", "101", None),
        ("take_profit_market", "buy", None, "100", "99", "99"),
        ("take_profit_market", "buy", None, "100", "101", None),
        ("take_profit_market", "sell", None, "100", "101", "101"),
        ("take_profit_market", "sell", None, "100", "99", None),
        ("stop_limit", "buy", "101", "100", "100.5", "101"),
        ("stop_limit", "buy", "99", "100", "100.5", None),
        ("stop_limit", "sell", "99", "100", "99.5", "99"),
    ],
)
def test_evaluate(
    order_type: str, side: str, price: str | None, trigger: str | None, mark: str, fill: str | None
) -> None:
    _order, got = evaluate(_resting(order_type, side, price, trigger), Decimal(mark))
    assert got == (Decimal(fill) if fill else None)


def test_evaluate_stop_limit_keeps_its_trigger() -> None:
    order = _resting("stop_limit", "buy", price="99", trigger="100")
    triggered, fill = evaluate(order, Decimal("100.5"))
    assert (triggered.triggered, fill) == (True, None)
    assert evaluate(triggered, Decimal("99.5")) == (triggered, None)  # no new trigger needed, no fill yet
    assert evaluate(triggered, Decimal("98"))[1] == Decimal("99")
    assert evaluate(order, Decimal("98")) == (order, None)  # untriggered: the limit does not count


def test_paper_fee() -> None:
    assert (
        format(paper_fee(Exchange.OKX, LINEAR, Decimal("0.1"), Decimal("45000"), Decimal("0.0005")), "f") == "2.25000"
    )
    assert paper_fee(Exchange.OKX, INVERSE, Decimal("10"), Decimal("50000"), Decimal("0.0005")) == Decimal("0.00001")
    # ETH inverse: contract value 10 USD; 3 * 10 / 3000 * 0.0005 = 0.000005 ETH
    assert paper_fee(Exchange.OKX, "ETH-USD-SWAP", Decimal("3"), Decimal("3000"), Decimal("0.0005")) == Decimal(
        "0.000005"
    )
    tiny = paper_fee(Exchange.OKX, LINEAR, Decimal("0.000000000000000001"), Decimal("0.3"), Decimal("0.0005"))
    inverse = paper_fee(Exchange.OKX, INVERSE, Decimal("1"), Decimal("3"), Decimal("0.0005"))
    for fee in (tiny, inverse):  # what the ledger stores: at most 18 fraction digits
        assert RULES["decimal"].matches(format(fee, "f"))


def test_fee_currency() -> None:
    assert fee_currency(Exchange.OKX, LINEAR) == "USDT"
    assert fee_currency(Exchange.OKX, INVERSE) == "BTC"
    assert fee_currency(Exchange.UPBIT, "KRW-BTC") == "KRW"
    assert fee_currency(Exchange.BINANCE, "WEIRD") is None


def test_poll_interval_setting() -> None:
    assert Settings.from_env({}).paper_poll_ms == 100
    assert Settings.from_env({"LEDGER_PAPER_POLL_MS": "250"}).paper_poll_ms == 250
    with pytest.raises(ConfigError, match="LEDGER_PAPER_POLL_MS"):
        Settings.from_env({"LEDGER_PAPER_POLL_MS": "0"})


async def test_paper_venue_on_redis_cluster(redis_cluster: Any) -> None:
    rig = Rig(redis_cluster)
    await redis_cluster.hset(marks("okx"), LINEAR, "45000")
    market = await rig.place(side="buy", order_type="market", quantity="0.1")
    limit = await rig.place(side="buy", order_type="limit", quantity="0.1", price="44000")
    cancelled = await rig.place(side="buy", order_type="limit", quantity="0.1", price="43000")
    await rig.send("cancel_order", order_id=cancelled)
    await rig.settle()
    await rig.mark("42000")
    assert await rig.status(market) is OrderStatus.FILLED
    assert await rig.status(limit) is OrderStatus.FILLED
    assert await rig.status(cancelled) is OrderStatus.CANCELLED
    assert len(await rig.events("OrderFilled")) == 2
