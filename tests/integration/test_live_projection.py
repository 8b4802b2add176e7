"""Issue 4: the live projection of CONTRACT §6 (legacy position/order keys and GRID keys).

The ledger runs in-process (``serve`` with handler + projection + paper); a scripted session goes
through the seed API with marks moved by HSET, then every live key is checked field by field
(``live_helpers.check_session_keys``). Redelivery and crashes must converge to the very same
keys: the projection writes absolute state, so re-applying any suffix of the log is a no-op.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest
from redis import exceptions as redis_errors

from consumers.entries import Entry
from consumers.runner import ConsumerSettings, StreamConsumer
from ledger import OrderManager, OrderStatus
from projections.live import GROUP, LiveProjection
from tests.faults.test_fencing import USER, Ledger
from tests.live_helpers import (
    BTC,
    GRID_USER,
    POS_USER,
    check_session_keys,
    events_of,
    live_keys,
    members,
    quiesce,
    run_session,
    running_ledger,
    shard_of_user,
    snapshot,
    wait_for,
)


def events_key(shard: int) -> str:
    return f"ledger:{{{shard}}}:events"


def lease_key(shard: int) -> str:
    return f"ledger:{{{shard}}}:lease:{GROUP}"


async def replay(redis: Any, shard: int, start_id: str, batch_size: int) -> int:
    """Move the ``ledger-projection`` group to ``start_id`` and run the projection over the rest."""
    await redis.xgroup_setid(events_key(shard), GROUP, start_id)
    await redis.delete(lease_key(shard))  # the serving consumer is gone; its lease with it
    consumer = StreamConsumer(
        redis,
        stream=events_key(shard),
        group=GROUP,
        handler=LiveProjection(redis, shard).handle,
        dead_stream=f"ledger:{{{shard}}}:dead",
        settings=ConsumerSettings(batch_size=batch_size),
        lease_key=lease_key(shard),
    )
    return await consumer.burst()


# --------------------------------------------------------------------------- the keys


async def test_scripted_session_writes_every_legacy_key_exactly(redis: Any, redis_url: str, tmp_path: Path) -> None:
    async with running_ledger(redis_url, tmp_path):
        session = await run_session(redis, 1)
        await check_session_keys(redis, session, 1)
    assert await redis.xlen("ledger:{0}:dead") == 0


# --------------------------------------------------------------------------- redelivery


async def test_redelivery_of_the_whole_log_and_of_every_suffix_changes_nothing(
    redis: Any, redis_url: str, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path) as ledger:
        session = await run_session(redis, 1)
        await quiesce(redis, 1)
        await ledger.shutdown()
    before = await snapshot(redis)
    await check_session_keys(redis, session, 1)
    entries = [entry_id for entry_id, _t, _d in await events_of(redis, 0)]
    assert len(entries) == 38  # 5 market orders x 4 events, 6 grid orders x 2, 2 fills x 2, 1 cancel x 2

    # The whole stream again, in batches that cut it in many places.
    for batch_size in (256, 7, 1):
        assert await replay(redis, 0, "0", batch_size) == len(entries)
        assert await snapshot(redis) == before, f"whole log, batches of {batch_size}"

    # Every suffix: the group moved back to entry k, entries after it applied again.
    for k, entry_id in enumerate(entries):
        assert await replay(redis, 0, entry_id, 1 + k % 5) == len(entries) - k - 1
        assert await snapshot(redis) == before, f"suffix after entry {k} ({entry_id})"

    # From nothing: the live keys are a pure function of the log.
    await redis.delete(*await live_keys(redis))
    assert await replay(redis, 0, "0", 16) == len(entries)
    assert await snapshot(redis) == before
    await check_session_keys(redis, session, 1)
    assert await redis.xlen("ledger:{0}:dead") == 0


# --------------------------------------------------------------------------- Redis Cluster


def _two_shards() -> tuple[int, int]:
    shards = (shard_of_user(POS_USER, 4), shard_of_user(GRID_USER, 4))
    assert shards[0] != shards[1], "the session's users should live on two shards of four"
    return shards


async def test_cluster_session_writes_the_same_keys(redis_cluster: Any, redis_cluster_url: str, tmp_path: Path) -> None:
    _two_shards()
    async with running_ledger(redis_cluster_url, tmp_path, shards=4):
        session = await run_session(redis_cluster, 4)
        await check_session_keys(redis_cluster, session, 4)


class _CrashingPipeline:
    """Records a pipeline; on execute, a pipeline that writes sends only its first ``keep``
    commands and then fails like a connection dying part-way (the checkpoint, written last,
    never makes it)."""

    READS = {"hget", "hgetall", "hmget", "get", "smembers", "exists", "ttl"}

    def __init__(self, owner: _CrashingRedis) -> None:
        self.owner = owner
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> _CrashingPipeline:
            self.calls.append((name, args, kwargs))
            return self

        return record

    async def execute(self) -> list[Any]:
        writes = any(name not in self.READS for name, _a, _k in self.calls)
        calls = self.calls[: int(len(self.calls) * self.owner.keep)] if writes else self.calls
        pipe = self.owner.real.pipeline(transaction=False)
        for name, args, kwargs in calls:
            getattr(pipe, name)(*args, **kwargs)
        result = await pipe.execute() if calls else []
        if writes:
            self.owner.crashed += 1
            raise redis_errors.ConnectionError(f"simulated crash after {len(calls)} of {len(self.calls)} writes")
        return result  # type: ignore[no-any-return]


class _CrashingRedis:
    def __init__(self, real: Any, keep: float) -> None:
        self.real = real
        self.keep = keep
        self.crashed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def pipeline(self, transaction: bool = False) -> _CrashingPipeline:
        return _CrashingPipeline(self)


class _UnevenNodesPipeline:
    """A cluster pipeline whose nodes answer at different speeds: commands on the shard's own
    slot (``ledger:{s}:…``) land at once, those on any other key ``delay`` seconds later. A real
    cluster pipeline runs each node's share concurrently, so any such order can happen."""

    def __init__(self, real: Any, delay: float) -> None:
        self.real = real
        self.delay = delay
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> _UnevenNodesPipeline:
            self.calls.append((name, args, kwargs))
            return self

        return record

    async def _run(self, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
        if not calls:
            return []
        pipe = self.real.pipeline(transaction=False)
        for name, args, kwargs in calls:
            getattr(pipe, name)(*args, **kwargs)
        return await pipe.execute()  # type: ignore[no-any-return]

    async def execute(self) -> list[Any]:
        if all(name in _CrashingPipeline.READS for name, _a, _k in self.calls):
            return await self._run(self.calls)
        own_slot = [c for c in self.calls if _first_key(c[1]).startswith("ledger:{")]
        await self._run(own_slot)
        await asyncio.sleep(self.delay)
        await self._run([c for c in self.calls if c not in own_slot])
        return []


def _first_key(args: tuple[Any, ...]) -> str:
    """The first key of a pipelined command: of a script call (EVALSHA sha numkeys key ...) or
    of a command on one key."""
    return str(args[3] if args[0] == "EVALSHA" else args[0])


class _UnevenNodes:
    def __init__(self, real: Any, delay: float) -> None:
        self.real = real
        self.delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def pipeline(self, transaction: bool = False) -> _UnevenNodesPipeline:
        return _UnevenNodesPipeline(self.real, self.delay)


async def test_cluster_checkpoint_never_runs_ahead_of_the_writes(
    redis_cluster: Any, redis_cluster_url: str, tmp_path: Path
) -> None:
    """Read your writes on Redis Cluster: a reader that saw the checkpoint sees the batch."""
    shard = shard_of_user(POS_USER, 4)
    projection = LiveProjection(redis_cluster, shard)
    assert not projection.atomic
    projection.redis = _UnevenNodes(redis_cluster, delay=0.2)
    consumer = StreamConsumer(
        redis_cluster,
        stream=events_key(shard),
        group=GROUP,
        handler=projection.handle,
        dead_stream=f"ledger:{{{shard}}}:dead",
        settings=ConsumerSettings(block_ms=100),
        lease_key=lease_key(shard),
    )
    stop = asyncio.Event()
    async with running_ledger(redis_cluster_url, tmp_path, shards=4, roles=("handler",)):
        applier = asyncio.create_task(consumer.run(stop))
        try:
            orders = OrderManager(redis_cluster, timeout=10)
            for level in range(3):
                # create_order reads the order back once the checkpoint passed its event.
                order = await orders.create_order(
                    POS_USER, "okx", BTC, "buy", "limit", "0.1", "40000", grid_level=level
                )
                assert order.grid_level == level and order.status is OrderStatus.PENDING
        finally:
            stop.set()
            await asyncio.wait_for(applier, timeout=5)


async def _apply(projection: LiveProjection, entries: list[Entry], batch_size: int) -> None:
    for start in range(0, len(entries), batch_size):
        await projection.handle(entries[start : start + batch_size])


async def test_cluster_crash_mid_batch_converges_to_the_clean_state(
    redis_cluster: Any, redis_cluster_url: str, tmp_path: Path
) -> None:
    redis = redis_cluster
    async with running_ledger(redis_cluster_url, tmp_path, shards=4) as ledger:
        session = await run_session(redis, 4)
        await quiesce(redis, 4)
        await ledger.shutdown()
    clean = await snapshot(redis)
    await check_session_keys(redis, session, 4)

    logs = {
        shard: [Entry(i, {"type": t, "data": d}) for i, t, d in await _raw_events(redis, shard)]
        for shard in _two_shards()
    }
    batch = 4
    scenarios = 0
    for shard, entries in logs.items():
        assert len(entries) > 3 * batch
        for crash_batch, keep in itertools.product(range((len(entries) + batch - 1) // batch), (1 / 4, 1 / 2, 3 / 4)):
            await redis.delete(*await live_keys(redis))
            for other, other_entries in logs.items():
                if other != shard:
                    await _apply(LiveProjection(redis, other), other_entries, batch)
            # A clean prefix of batches, then the batch that dies part-way through.
            cut = crash_batch * batch
            await _apply(LiveProjection(redis, shard), entries[:cut], batch)
            dying = LiveProjection(redis, shard)
            dying.redis = crashing = _CrashingRedis(redis, keep)
            with pytest.raises(redis_errors.ConnectionError):
                await dying.handle(entries[cut : cut + batch])
            assert crashing.crashed == 1
            checkpoint = await redis.get(f"ledger:{{{shard}}}:projection")
            assert checkpoint == (entries[cut - 1].id if cut else None)
            # The next applier resumes from the checkpoint (in other batch boundaries).
            rest = entries[cut:]
            await _apply(LiveProjection(redis, shard), rest, 3)
            assert await snapshot(redis) == clean, f"shard {shard}, crash in batch {crash_batch} keeping {keep:.2f}"
            scenarios += 1
    assert scenarios == 30  # 20 and 18 events in batches of 4: three crashes in each batch
    await check_session_keys(redis, session, 4)


async def _raw_events(redis: Any, shard: int) -> list[tuple[str, str, str]]:
    return [(i, f["type"], f["data"]) for i, f in await redis.xrange(events_key(shard))]


# --------------------------------------------------------------------------- retention


async def test_expired_final_orders_leave_the_users_order_set(redis: Any) -> None:
    await _expiry_scenario(redis)


async def test_expired_final_orders_leave_the_users_order_set_on_cluster(redis_cluster: Any) -> None:
    await _expiry_scenario(redis_cluster)


async def _expiry_scenario(redis: Any) -> None:
    """Reads never write: the projection itself removes the id of a final order from
    ``orders:user:…`` once its hash expired (here a 1 s retention), and drops its fences."""
    ledger = Ledger(redis)
    limit = {"exchange": "okx", "symbol": BTC, "side": "buy", "order_type": "limit", "quantity": "1"}
    cancelled = (await ledger.send("place_order", price="40000", **limit))["order_id"]
    await ledger.send("cancel_order", order_id=cancelled)
    await ledger.send("order_cancelled", order_id=cancelled)
    resting = (await ledger.send("place_order", price="39000", **limit))["order_id"]
    projection = LiveProjection(redis, 0, final_order_ttl_s=1, fence_keep_s=1)
    await projection.handle([Entry(await ledger.last_entry(), {})])

    user_orders = f"orders:user:{USER}:okx"
    assert await members(redis, user_orders) == {cancelled, resting}
    assert 0 < await redis.pttl(f"orders:{cancelled}") <= 1000
    assert await redis.ttl(f"orders:{resting}") == -1
    (item,) = await redis.zrange("ledger:{0}:projection:expiring", 0, -1)
    assert item == f"o {cancelled} {USER} okx {BTC}"  # every key it names is derived from these
    assert await projection.sweep() == 0  # not due yet

    await wait_for(lambda: _gone(redis, f"orders:{cancelled}"), "the final order's hash to expire", timeout=5)
    await asyncio.sleep(0.05)
    # The next batch sweeps.
    await ledger.send("cancel_order", order_id=resting)
    await projection.handle([Entry(await ledger.last_entry(), {})])
    assert await members(redis, user_orders) == {resting}
    assert await members(redis, f"orders:open:okx:{BTC}") == {resting}  # pending_cancel is open
    assert set(await redis.hkeys(f"ledger:live:fence:{{{user_orders}}}")) == {resting}
    assert set(await redis.hkeys(f"ledger:live:fence:{{orders:open:okx:{BTC}}}")) == {resting}
    assert await redis.zcard("ledger:{0}:projection:expiring") == 0


async def _gone(redis: Any, key: str) -> bool:
    return not await redis.exists(key)
