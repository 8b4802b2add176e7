"""Read-your-writes is told, not polled (issue 10): ``LedgerClient.wait_projected`` blocks on the
shard's progress stream (``ShardKeys.progress``), and the projection's step that moves the
checkpoint adds the entry that wakes it. The order of events is asserted (blocked, told, done),
never a duration."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from ledger import LedgerTimeout
from ledger.client.api import LedgerClient
from ledger.store.eventstore import EventStore
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


async def test_a_hash_read_with_the_wait_is_the_one_the_step_it_waited_for_left(redis: Any) -> None:
    """Told already: one XREAD and one HGETALL (the server's own count); told later: the hash
    is read once the step is told, never before."""
    client = LedgerClient(redis, timeout=30)
    await redis.hset("orders:o-1", mapping={"status": "pending"})
    await redis.xadd(KEYS.progress, {"applied": "1700000000000-5"}, id="1700000000000-5")
    await redis.config_resetstat()
    assert await client.wait_projected(0, "1700000000000-5", read="orders:o-1") == {"status": "pending"}
    stats = await redis.info("commandstats")
    assert (stats["cmdstat_xread"]["calls"], stats["cmdstat_hgetall"]["calls"]) == (1, 1)

    waiter = asyncio.create_task(client.wait_projected(0, "1700000000000-6", read="orders:o-1"))
    await blocked_in(redis, "xread")  # the waiter, on the progress stream
    await redis.hset("orders:o-1", "status", "open")  # what the step writes, then tells
    await redis.xadd(KEYS.progress, {"applied": "1700000000000-6"}, id="1700000000000-6")
    assert await asyncio.wait_for(waiter, 10) == {"status": "open"}


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
