"""Read-your-writes is told, not polled (issue 10): ``LedgerClient.wait_projected`` blocks on the
shard's progress stream (``ShardKeys.progress``), and the projection's step that moves the
checkpoint adds the entry that wakes it. The order of events is asserted (blocked, told, done),
never a duration."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from ledger import LedgerTimeout, Order
from ledger.client.api import SETTLE, LedgerClient
from ledger.domain import wire
from ledger.domain.enums import Exchange, OrderSide, OrderStatus, OrderType
from ledger.domain.mapping import ORDER
from ledger.domain.state import OrderState
from ledger.store.eventstore import ORDER_SNAPSHOT, EventStore
from ledger.store.keys import ShardKeys
from tests.live_helpers import blocked, blocked_in

KEYS = ShardKeys(0)


@pytest.mark.parametrize(
    ("target", "earlier"),
    [
        ("1700000000000-5", "1700000000000-4"),  # the id before it: same millisecond
        ("1700000000001-0", "1700000000000-99"),  # the id before it: the previous millisecond
    ],
)
async def test_a_waiter_blocks_until_the_step_at_its_entry_tells_it(redis: Any, target: str, earlier: str) -> None:
    waiter = asyncio.create_task(LedgerClient(redis, timeout=30).wait_projected(0, target))
    await blocked_in(redis, "xread")  # the waiter, on the progress stream

    await redis.xadd(KEYS.progress, {"applied": earlier}, id=earlier)
    assert await blocked(redis, "xread")  # a step before its entry leaves it waiting
    assert not waiter.done()

    await redis.xadd(KEYS.progress, {"applied": target}, id=target)
    await asyncio.wait_for(waiter, 10)
    # Told by the stream alone: the checkpoint was never written, so no poll of it answered.
    assert await redis.exists(KEYS.checkpoint) == 0


async def test_a_step_already_past_the_entry_answers_at_once(redis: Any) -> None:
    await redis.xadd(KEYS.progress, {"applied": "1700000000009-0"}, id="1700000000009-0")
    await asyncio.wait_for(LedgerClient(redis, timeout=30).wait_projected(0, "1700000000000-5"), 10)


# ------------------------------------------------------------ one round trip to the order
# The test plays the handler's append step: the reply, and what the step wrote with it (the
# order's snapshot, the chain head, and, when it made the live writes, the checkpoint).

ORDER_ID = "0190b4a2-3f00-7000-8000-000000000001"
PLACED = "1700000000000-5"
PLACE = wire.PlaceOrder(
    command_id="c-1",
    user_id="u-1",
    exchange=Exchange.OKX,
    symbol="BTC-USDT-SWAP",
    side=OrderSide.BUY,
    order_type=OrderType.LIMIT,
    quantity="0.5",
    price="40000",
)
STATE = OrderState(
    id=ORDER_ID,
    user_id="u-1",
    exchange=Exchange.OKX,
    symbol="BTC-USDT-SWAP",
    side=OrderSide.BUY,
    order_type=OrderType.LIMIT,
    quantity=Decimal("0.5"),
    price=Decimal("40000"),
    status=OrderStatus.OPEN,
    exchange_order_id="x-9",
    created_at=1700000000000,
    updated_at=1700000000001,
    version=2,
)
PLACED_STATE = msgspec.structs.replace(STATE, status=OrderStatus.PENDING, exchange_order_id=None, version=1)
REPLY = json.dumps(
    {
        "command_id": "c-1",
        "status": "accepted",
        "error": None,
        "order_id": ORDER_ID,
        "position_id": None,
        "events": [{"type": "OrderPlaced", "id": PLACED}],
    }
)


async def _client(redis: Any) -> LedgerClient:
    await redis.hset("ledger:meta", "shards", 1)  # what `ledger serve` records
    await redis.config_resetstat()
    return LedgerClient(redis, timeout=30)


async def _answer(redis: Any, *, head: str, checkpoint: str | None) -> None:
    """The append step's answer to ``PLACE`` once the client waits for it."""
    await blocked_in(redis, "blmove")
    await redis.hset(KEYS.orders, ORDER_ID, ORDER_SNAPSHOT.encode(STATE))
    await redis.hset(KEYS.chain, "id", head)
    if checkpoint is not None:
        await redis.set(KEYS.checkpoint, checkpoint)
    await redis.rpush(KEYS.reply("u-1", "c-1"), REPLY)


async def _calls(redis: Any) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "hgetall", "xread")}


@pytest.mark.parametrize("flushed", [False, True], ids=["cached", "script-cache-flushed"])
async def test_an_order_the_projection_applied_with_the_whole_log_is_its_snapshot_in_one_round_trip(
    redis: Any, flushed: bool
) -> None:
    """Checkpoint at the chain head: every event projected, so the live hash is what the order's
    snapshot maps to, and the reply's round trip brings it (no HGETALL, no XREAD). The reply is
    taken, as a BLPOP would have. A server that lost its scripts loads it and answers all the same."""
    client = await _client(redis)
    if flushed:
        await redis.script_flush()
    else:
        await redis.script_load(SETTLE)
    await redis.config_resetstat()
    answered = asyncio.create_task(_answer(redis, head=PLACED, checkpoint=PLACED))
    reply, order = await asyncio.wait_for(client.submit_order(PLACE), 10)
    await answered
    assert (reply["order_id"], reply["shard"]) == (ORDER_ID, 0)
    assert order == Order.from_live(ORDER.to_live(ORDER.values(STATE)))
    assert (order.status, order.exchange_order_id, order.version) == (OrderStatus.OPEN, "x-9", 2)
    stats = await redis.info("commandstats")
    assert await _calls(redis) == {"evalsha": 3 if flushed else 1, "hgetall": 0, "xread": 0}
    # Flushed: the pipeline's call and the script object's first try fail (NOSCRIPT); it loads.
    loaded = (stats["cmdstat_evalsha"]["failed_calls"], "cmdstat_script|load" in stats)
    assert loaded == ((2, True) if flushed else (0, False))
    assert await redis.exists(KEYS.reply("u-1", "c-1")) == 0


async def test_an_order_projected_but_not_the_whole_log_is_read_from_its_live_hash(redis: Any) -> None:
    """Checkpoint past the order's event, behind the chain head: the snapshot may be ahead of
    the live keys, so the hash is read (one HGETALL, no wait) and that is what comes back."""
    await redis.hset(
        f"orders:{ORDER_ID}",
        mapping=ORDER.to_live(ORDER.values(PLACED_STATE)),
    )
    client = await _client(redis)
    answered = asyncio.create_task(_answer(redis, head="1700000000000-9", checkpoint="1700000000000-7"))
    _reply, order = await asyncio.wait_for(client.submit_order(PLACE), 10)
    await answered
    assert order is not None and (order.status, order.version) == (OrderStatus.PENDING, 1)
    assert await _calls(redis) == {"evalsha": 1, "hgetall": 1, "xread": 0}


async def test_an_order_not_projected_yet_is_read_once_the_step_tells_it(redis: Any) -> None:
    client = await _client(redis)
    answered = asyncio.create_task(_answer(redis, head=PLACED, checkpoint="1700000000000-4"))
    placing = asyncio.create_task(client.submit_order(PLACE))
    await answered
    await blocked_in(redis, "xread")  # on the progress stream
    assert not placing.done()
    await redis.hset(f"orders:{ORDER_ID}", mapping=ORDER.to_live(ORDER.values(STATE)))  # the step's writes
    await redis.xadd(KEYS.progress, {"applied": PLACED}, id=PLACED)  # then it tells
    _reply, order = await asyncio.wait_for(placing, 10)
    assert order == Order.from_live(ORDER.to_live(ORDER.values(STATE)))


async def test_a_reply_later_than_the_first_wait_is_still_taken(redis: Any) -> None:
    """The first wait (``BLOCK_MS``) ends empty: the client waits again, then reads the hash."""
    client = await _client(redis)
    placing = asyncio.create_task(client.submit_order(PLACE))
    await blocked_in(redis, "blmove")
    await blocked_in(redis, "blpop")  # the first wait ran out
    await redis.hset(f"orders:{ORDER_ID}", mapping=ORDER.to_live(ORDER.values(STATE)))
    await redis.set(KEYS.checkpoint, PLACED)
    await redis.rpush(KEYS.reply("u-1", "c-1"), REPLY)
    _reply, order = await asyncio.wait_for(placing, 10)
    assert order == Order.from_live(ORDER.to_live(ORDER.values(STATE)))


async def test_a_checkpoint_moved_without_telling_is_still_seen(redis: Any) -> None:
    """A projection of an earlier version moves only the checkpoint: read between blocks."""
    await redis.set(KEYS.checkpoint, "1700000000000-5")
    await asyncio.wait_for(LedgerClient(redis, timeout=0.3).wait_projected(0, "1700000000000-5"), 10)


async def test_no_step_and_no_checkpoint_times_out_naming_the_projection(redis: Any) -> None:
    await redis.xadd(KEYS.progress, {"applied": "1700000000000-4"}, id="1700000000000-4")
    expected = r"shard 0 did not reach 1700000000000-5 in 0\.2 s: is the projection role running\?"
    with pytest.raises(LedgerTimeout, match=expected):
        await LedgerClient(redis, timeout=0.2).wait_projected(0, "1700000000000-5")


async def test_a_waiter_on_redis_cluster_is_told_by_the_stream(redis_cluster: Any) -> None:
    waiter = asyncio.create_task(LedgerClient(redis_cluster, timeout=30).wait_projected(0, "1700000000000-5"))
    await redis_cluster.xadd(KEYS.progress, {"applied": "1700000000000-5"}, id="1700000000000-5")
    await asyncio.wait_for(waiter, 10)
    assert await redis_cluster.exists(KEYS.checkpoint) == 0


async def test_waiting_for_an_order_to_be_final_ends_at_its_deadline(redis: Any) -> None:
    """A deadline the reads block to, not a cancellation around them (redis-py can lose a
    cancellation that arrives with a blocking read's reply: the wait then went on)."""
    started = time.monotonic()
    with pytest.raises(LedgerTimeout) as caught:
        await asyncio.wait_for(LedgerClient(redis, timeout=0.3).wait_order_final(0, "o-1", "0-0"), 10)
    assert 0.3 <= time.monotonic() - started < 2
    assert str(caught.value) == (
        "order o-1 was not filled within 0.3 s (with LEDGER_EXECUTION=external the strategy must report its "
        "fills): retry with the same command_id to keep waiting"
    )


async def test_a_subscription_with_a_deadline_ends_there(redis: Any) -> None:
    async def seen() -> list[Any]:
        return [s async for s in EventStore(redis, 0).subscribe("0-0", block_ms=5_000, until=started + 0.2)]

    started = time.monotonic()
    assert await asyncio.wait_for(seen(), 10) == []
    assert 0.2 <= time.monotonic() - started < 1.5
