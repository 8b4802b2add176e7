"""The execution mode guard (consumers/guard.py): a venue steps aside for an exchange whose mode
recorded in ledger:meta is no longer its own (``ledger execution set`` while it runs).

The paper venue against a real Redis (plain and Cluster) and the real command handler
(``tests.integration.test_paper.Rig``); the live venue with the real ccxt classes against the
loopback venue (``tests.integration.test_venue.Rig``). The switch is the one ``ledger execution
set`` makes (``ledger.app.execution.set_execution``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog

from consumers.guard import ExecutionGuard
from ledger.app.execution import set_execution
from ledger.config import parse_execution
from ledger.domain.enums import Exchange, OrderStatus
from ledger.store.keys import META, ShardKeys
from ledger.store.redis_conn import ExecutionMismatch, ensure_execution, ensure_shard_count, recorded_execution
from tests.integration import test_paper, test_venue
from tests.venue_server import LoopbackExchange

SWAP = "BTC-USDT-SWAP"
PAPER_LINE = (
    "okx is recorded as {recorded} but this serve executes it as paper: it no longer executes okx; "
    "stop this serve or restart it with LEDGER_EXECUTION=okx={recorded}"
)
LIVE_LINE = (
    "okx is recorded as paper but this serve executes it as live: it no longer executes okx; "
    "stop this serve or restart it with LEDGER_EXECUTION=okx=paper"
)


def _guard_lines(logs: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    return [
        (e["event"], e["exchange"], e["recorded"], e["mode"])
        for e in logs
        if e.get("log_level") == "error" and "recorded" in e
    ]


async def _placed_not_executed(rig: test_paper.Rig, **data: Any) -> str:
    """Place an order the venue must not execute: the handler accepts it, the venue reads its
    event and publishes nothing for it (it stays pending)."""
    commands = len(await rig.commands())
    order_id = await rig.place(**data)
    assert await rig.status(order_id) is OrderStatus.PENDING
    assert len(await rig.commands()) == commands + 1  # the place_order alone
    return order_id


# --------------------------------------------------------------------------- recording


async def test_serve_records_the_modes_once_and_refuses_others_in_one_line(redis: Any) -> None:
    await ensure_execution(redis, parse_execution("okx=live"))
    assert await redis.hgetall(META) == {
        "execution:okx": "live",
        "execution:binance": "paper",
        "execution:upbit": "paper",
    }
    await ensure_execution(redis, parse_execution("okx=live,binance=paper"))  # the same modes: fine
    with pytest.raises(ExecutionMismatch) as caught:
        await ensure_execution(redis, parse_execution("binance=external"))
    assert str(caught.value) == (
        "okx is recorded as live but this serve has okx=paper; binance is recorded as paper but this serve has "
        "binance=external: to switch, stop every serve, run `ledger execution set binance=external` and start them "
        "all with LEDGER_EXECUTION=binance=external; to keep the recorded modes, start this serve with "
        "LEDGER_EXECUTION=okx=live"
    )
    await redis.hset(META, "execution:upbit", "bogus")  # written by hand: no setting to offer
    with pytest.raises(ExecutionMismatch) as caught:
        await ensure_execution(redis, parse_execution("okx=live"))
    assert str(caught.value) == (
        "upbit is recorded as bogus but this serve has upbit=paper: to switch, stop every serve, run "
        "`ledger execution set okx=live` and start them all with LEDGER_EXECUTION=okx=live"
    )
    assert await recorded_execution(redis) == {Exchange.OKX: "live", Exchange.BINANCE: "paper", Exchange.UPBIT: "bogus"}


async def test_set_rewrites_every_exchange_and_says_what_changed(redis: Any) -> None:
    assert await set_execution(redis, parse_execution("okx=live"), "go live") == [
        "okx: (not recorded) -> live",
        "binance: (not recorded) -> paper",
        "upbit: (not recorded) -> paper",
        "recorded: start every serve with LEDGER_EXECUTION=okx=live",
    ]
    assert await set_execution(redis, parse_execution("external"), "go external") == [
        "okx: live -> external",
        "binance: paper -> external",
        "upbit: paper -> external",
        "recorded: start every serve with LEDGER_EXECUTION=external",
    ]
    assert await set_execution(redis, parse_execution("external"), "again") == [
        "nothing changed: LEDGER_EXECUTION=external is recorded already"
    ]
    ops = [fields for _id, fields in await redis.xrange("ledger:ops")]
    assert [(op["action"], op["target"], op["reason"]) for op in ops] == [
        ("execution", "ledger:meta", "go live"),
        ("execution", "ledger:meta", "go external"),
    ]
    assert ops[1]["detail"] == (
        '{"changed": {"binance": {"after": "external", "before": "paper"}, '
        '"okx": {"after": "external", "before": "live"}, "upbit": {"after": "external", "before": "paper"}}, '
        '"execution": "external"}'
    )


async def test_set_warns_while_an_order_may_still_be_on_its_way(redis: Any) -> None:
    keys = ShardKeys(1)
    await ensure_shard_count(redis, 2)
    await redis.xadd(keys.commands, {"type": "place_order", "data": "{}"})
    await redis.xgroup_create(keys.commands, "ledger-handler", id="0")
    await redis.xreadgroup("ledger-handler", "h", {keys.commands: ">"})  # read, not acknowledged: pending
    await redis.xadd(keys.events, {"type": "OrderPlaced", "data": "{}"})
    await redis.xgroup_create(keys.events, "ledger-paper", id="0")  # not read yet
    await redis.xgroup_create(keys.events, "ledger-venue", id="$")  # read up to the end: nothing on its way
    await redis.xgroup_create(keys.events, "ledger-projection", id="0")  # takes no order to a venue
    assert (await set_execution(redis, parse_execution("okx=live"), "test"))[-1] == (
        "warning: not every entry is handled yet by ledger-handler on shard 1, ledger-paper on shard 1: an order "
        "placed before the switch may still be executed by a venue of the new mode too; wait until `ledger status` "
        "shows no lag and nothing pending for them before starting the serves"
    )


def test_the_guard_logs_an_exchange_at_most_every_ten_seconds() -> None:
    lines: list[tuple[str, dict[str, Any]]] = []

    class Log:
        def error(self, event: str, **fields: Any) -> None:
            lines.append((event, fields))

    guard = ExecutionGuard("paper", parse_execution("upbit=live"), Log())
    assert guard.exchanges == (Exchange.OKX, Exchange.BINANCE)
    assert guard.acting(["live", None]) == {Exchange.BINANCE}  # binance: nothing recorded yet
    assert guard.acting([b"live", "paper"]) == {Exchange.BINANCE}
    assert lines == [
        (PAPER_LINE.format(recorded="live"), {"exchange": "okx", "recorded": "live", "mode": "paper"}),
    ]
    guard._reported[Exchange.OKX] -= 10.0
    assert guard.acting(["external", "paper"]) == {Exchange.BINANCE}
    assert [fields["recorded"] for _event, fields in lines] == ["live", "external"]


# --------------------------------------------------------------------------- the paper venue


@pytest.mark.parametrize("switched_to", ["live", "external"])
async def test_the_paper_venue_stops_filling_an_exchange_switched_away(redis: Any, switched_to: str) -> None:
    await _paper_switch(redis, switched_to)


async def test_the_paper_venue_steps_aside_on_redis_cluster(redis_cluster: Any) -> None:
    await _paper_switch(redis_cluster, "live")


async def _paper_switch(redis: Any, switched_to: str) -> None:
    rig = test_paper.Rig(redis)
    await ensure_execution(redis, parse_execution("paper"))  # as serve records it
    before = await rig.place(side="buy", order_type="market", quantity="0.1", price="45000")
    assert await rig.status(before) is OrderStatus.FILLED
    resting = await rig.place(side="buy", order_type="limit", quantity="0.1", price="44000")
    assert await rig.status(resting) is OrderStatus.OPEN

    await set_execution(redis, parse_execution(f"okx={switched_to}"), "test")
    with structlog.testing.capture_logs() as logs:
        after = await _placed_not_executed(rig, side="buy", order_type="market", quantity="0.1", price="45000")
        limit = await _placed_not_executed(rig, side="sell", order_type="limit", quantity="0.1", price="46000")
        other = await rig.place(
            exchange="binance", symbol="BTC/USDT", side="buy", order_type="market", quantity="0.1", price="45000"
        )
        await rig.mark("43000")  # the order resting since before the switch is paper's: it fills
    assert _guard_lines(logs) == [(PAPER_LINE.format(recorded=switched_to), "okx", switched_to, "paper")]
    assert await rig.status(other) is OrderStatus.FILLED  # binance is still paper
    assert await rig.status(resting) is OrderStatus.FILLED
    assert (await rig.status(after), await rig.status(limit)) == (OrderStatus.PENDING, OrderStatus.PENDING)
    assert await rig.redis.hkeys(test_paper.PAPER.resting) == []
    assert [e.stream for e in await rig.events("OrderAccepted")] == [before, resting, other]

    await set_execution(redis, parse_execution("paper"), "back")
    again = await rig.place(side="buy", order_type="market", quantity="0.1", price="45000")
    assert await rig.status(again) is OrderStatus.FILLED
    assert await rig.status(after) is OrderStatus.PENDING  # read while okx was not paper's: left alone


# --------------------------------------------------------------------------- the live venue


@pytest.fixture
async def made() -> AsyncIterator[list[test_venue.Rig]]:
    rigs: list[test_venue.Rig] = []
    yield rigs
    for rig in rigs:
        await rig.clients.close()


async def test_the_live_venue_stops_sending_an_exchange_switched_away(
    redis: Any, okx: LoopbackExchange, made: list[test_venue.Rig]
) -> None:
    await _live_switch(redis, okx, made)


async def test_the_live_venue_steps_aside_on_redis_cluster(
    redis_cluster: Any, okx: LoopbackExchange, made: list[test_venue.Rig]
) -> None:
    await _live_switch(redis_cluster, okx, made)


async def _live_switch(redis: Any, okx: LoopbackExchange, made: list[test_venue.Rig]) -> None:
    rig = test_venue.Rig(redis, okx)
    made.append(rig)
    await rig.start()
    await ensure_execution(redis, parse_execution("okx=live"))
    sent = await rig.place(symbol=SWAP, side="buy", order_type="limit", quantity="0.1", price="45000")
    assert (await rig.order(sent)).status is OrderStatus.OPEN
    # An intent recorded before the switch, not sent yet: the event read, no pass of the driver.
    await rig.send(
        "place_order", exchange="okx", symbol=SWAP, side="buy", order_type="limit", quantity="0.1", price="44000"
    )
    await rig.handler.burst()
    await rig.venue.burst()
    unsent = next(iter(set(await rig.venue.working()) - {sent}))
    assert (await rig.venue.working())[unsent].stage == "new"

    await set_execution(redis, parse_execution("paper"), "test")
    with structlog.testing.capture_logs() as logs:
        after = await rig.place(symbol=SWAP, side="buy", order_type="limit", quantity="0.1", price="43000")
        await rig.send("cancel_order", order_id=sent)  # still reaches the order sent before
        okx.fill_on_cancel = ("4", "45000", "t-1")  # it fills while the cancel is on its way
        await rig.settle()
    assert _guard_lines(logs)[0] == (LIVE_LINE, "okx", "paper", "live")
    assert len(_guard_lines(logs)) == 1
    assert okx.creates == {sent.replace("-", ""): 1}  # neither the unsent intent nor the new order
    assert after not in await rig.venue.working()
    assert (await rig.order(after)).status is OrderStatus.PENDING
    rejected = await rig.order(unsent)
    assert (rejected.status, rejected.reject_reason) == (
        OrderStatus.REJECTED,
        "not sent: okx is no longer recorded as live (ledger execution set) and no venue has this order: "
        "place it again",
    )
    order = await rig.order(sent)  # the real order: its fill recorded, its cancel confirmed
    assert (order.status, str(order.filled_qty), order.fill_ids) == (OrderStatus.CANCELLED, "0.04", ["t-1"])
