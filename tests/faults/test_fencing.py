"""Issue 7, defect 9: leases with fencing.

Two consumers of one exclusive group: the first takes the lease, reads a batch and pauses in the
middle of it (an ``asyncio.Event`` gate in front of its Redis pipelines or its handler, injected
here) for longer than its lease; the second takes over and applies newer events; then the first
resumes. Whatever it still holds must not move anything backwards: the live keys show the newer
state exactly, the checkpoints never move back, the paper venue does not re-rest an order the
new holder took off the book. Real Redis, real Redis Cluster, real PostgreSQL; events come from
the real command handler.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from consumers.command_handler import GROUP as HANDLER_GROUP
from consumers.command_handler import CommandHandler
from consumers.entries import Entry
from consumers.paper import PaperKeys, PaperVenue
from consumers.runner import ConsumerSettings, LeaseLost, StreamConsumer
from ledger.store.eventstore import EventStore
from ledger.store.keys import ShardKeys
from projections.live import LiveProjection
from projections.projector import Projector, checkpoint, lease_key, open_pool
from tests.live_helpers import hash_of, members, snapshot

USER = "fence-user"
SYMBOL = "BTC-USDT-SWAP"
KEYS = ShardKeys(0)
LEASE_MS = 300
SETTINGS = ConsumerSettings(claim_idle_ms=LEASE_MS, block_ms=20)


class Ledger:
    """The real command handler of shard 0 (one shard), driven in bursts."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.consumer = StreamConsumer(
            redis,
            stream=KEYS.commands,
            group=HANDLER_GROUP,
            handler=CommandHandler(EventStore(redis, 0), 1).handle,
            dead_stream=KEYS.dead,
        )

    async def send(self, type_: str, **data: Any) -> dict[str, Any]:
        command_id = f"c-{uuid.uuid4().hex[:12]}"
        await self.redis.xadd(
            KEYS.commands, {"type": type_, "data": json.dumps({"user_id": USER, "command_id": command_id, **data})}
        )
        await self.consumer.burst()
        raw = await self.redis.lindex(KEYS.reply(USER, command_id), 0)
        reply: dict[str, Any] = json.loads(raw)
        assert reply["status"] == "accepted", reply
        return reply

    async def open_long(self, size: str, price: str, fee: str, fill_id: str) -> dict[str, Any]:
        opened = await self.send("open_position", exchange="okx", symbol=SYMBOL, side="long", size=size, leverage=10)
        await self.send(
            "record_fill", order_id=opened["order_id"], fill_id=fill_id, quantity=size, price=price, fee=fee
        )
        return opened

    async def last_entry(self) -> str:
        (entry,) = await self.redis.xrevrange(KEYS.events, count=1)
        return str(entry[0])


class Gate:
    """Pauses the first ``execute`` of any pipeline of the wrapped client until ``release``."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    def wrap(self, redis: Any) -> Any:
        return _GatedRedis(redis, self)

    async def wait(self) -> None:
        self.reached.set()
        await self.opened.wait()


class _GatedRedis:
    def __init__(self, real: Any, gate: Gate) -> None:
        self.real = real
        self.gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def pipeline(self, *args: Any, **kwargs: Any) -> _GatedPipeline:
        return _GatedPipeline(self.real.pipeline(*args, **kwargs), self.gate)


class _GatedPipeline:
    def __init__(self, real: Any, gate: Gate) -> None:
        self.real = real
        self.gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __len__(self) -> int:
        return len(self.real)

    async def __aenter__(self) -> _GatedPipeline:
        await self.real.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.real.__aexit__(*exc)

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        await self.gate.wait()
        return await self.real.execute(*args, **kwargs)


async def _take_over_while_paused(first: StreamConsumer, gate: Gate, second: StreamConsumer, newer: Any) -> None:
    """``first`` reads a batch and pauses in it past its lease; ``newer()`` appends events;
    ``second`` takes the lease and applies everything; then ``first`` resumes: LeaseLost."""
    await first.ensure_group()
    stale = asyncio.create_task(first.step(block=False))
    await asyncio.wait_for(gate.reached.wait(), timeout=5)
    await newer()
    await asyncio.sleep(LEASE_MS / 1000 + 0.1)  # the first holder's lease lapses
    assert await second.burst() > 0
    gate.opened.set()
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(stale, timeout=5)


# --------------------------------------------------------------------------- live projection


async def _live_scenario(redis: Any) -> None:
    ledger = Ledger(redis)
    opened = await ledger.open_long("0.1", "45000", "0.45", "f-1")
    position = opened["position_id"]
    grid = await ledger.send(
        "place_order",
        exchange="okx",
        symbol=SYMBOL,
        side="buy",
        order_type="limit",
        quantity="1",
        price="40000",
        grid_level=1,
    )
    order = grid["order_id"]
    await ledger.send("order_accepted", order_id=order, exchange_order_id="ex-1")

    first_projection = LiveProjection(redis, 0)
    first = first_projection.consumer(SETTINGS)
    gate = Gate()
    first_projection.redis = gate.wrap(redis)
    second = LiveProjection(redis, 0).consumer(SETTINGS)
    increase: dict[str, Any] = {}

    async def newer() -> None:
        increase.update(await ledger.open_long("0.1", "46000", "0.46", "f-2"))
        await ledger.send("cancel_order", order_id=order)
        await ledger.send("order_cancelled", order_id=order)

    await _take_over_while_paused(first, gate, second, newer)
    last = await ledger.last_entry()
    assert await redis.get(KEYS.checkpoint) == last

    # The newer state, exactly.
    live = await hash_of(redis, f"positions:{USER}:okx:{SYMBOL}:long")
    assert {k: live[k] for k in ("id", "size", "entry_price", "fees", "realized_pnl", "status", "version")} == {
        "id": position,
        "size": "0.2",
        "entry_price": "45500",
        "fees": "0.91",
        "realized_pnl": "-0.91",
        "status": "open",
        "version": "2",
    }
    grid_order = await hash_of(redis, f"orders:{order}")
    assert {k: grid_order[k] for k in ("status", "version", "exchange_order_id", "grid_level")} == {
        "status": "cancelled",
        "version": "4",
        "exchange_order_id": "ex-1",
        "grid_level": "1",
    }
    assert await redis.ttl(f"orders:{order}") > 0
    assert await members(redis, f"orders:open:okx:{SYMBOL}") == set()
    assert await members(redis, f"orders:user:{USER}:okx") == {
        opened["order_id"],
        order,
        increase["order_id"],
    }
    assert await members(redis, f"positions:index:{USER}:okx") == {position}
    assert await members(redis, "positions:active") == {position}
    assert await redis.exists(f"okx:user:{USER}:symbol:{SYMBOL}:active_grid:1") == 0
    assert await hash_of(redis, f"orders:okx:user:{USER}:symbol:{SYMBOL}:orders") == {}
    assert await hash_of(redis, f"orders:okx:user:{USER}:symbol:{SYMBOL}:order_placed_index") == {"1": "0"}

    # The stale holder stands by; running it again changes nothing.
    settled = await snapshot(redis)
    assert await first.burst() == 0
    assert await snapshot(redis) == settled
    assert await redis.get(KEYS.checkpoint) == last


async def test_live_projection_stale_holder_never_writes_back_on_redis(redis: Any) -> None:
    await _live_scenario(redis)


async def test_live_projection_stale_holder_never_writes_back_on_cluster(redis_cluster: Any) -> None:
    await _live_scenario(redis_cluster)


async def test_cluster_fences_refuse_every_older_write(redis_cluster: Any) -> None:
    """On a cluster each key is fenced on its own: replaying an older batch over newer state,
    with no lease involved (a tool, or a holder that has not noticed yet), writes nothing."""
    redis = redis_cluster
    ledger = Ledger(redis)
    opened = await ledger.open_long("0.1", "45000", "0.45", "f-1")
    early = [Entry(str(i), dict(f)) for i, f in await redis.xrange(KEYS.events)]
    await ledger.send("close_position", position_id=opened["position_id"])
    (closing,) = [
        json.loads(f["data"])["stream"]
        for _i, f in await redis.xrange(KEYS.events)
        if f["type"] == "OrderPlaced" and json.loads(f["data"])["stream"] != opened["order_id"]
    ]
    await ledger.send("record_fill", order_id=closing, fill_id="f-close", quantity="0.1", price="46000", fee="0.46")
    await LiveProjection(redis, 0).handle([Entry(await ledger.last_entry(), {})])
    newer = await snapshot(redis)
    assert await redis.exists(f"positions:{USER}:okx:{SYMBOL}:long") == 0
    assert await members(redis, "positions:active") == set()

    # A stale applier: its checkpoint view is from before the close (the shard checkpoint is
    # rolled back here to make it apply the early entries again).
    await redis.delete(KEYS.checkpoint)
    await LiveProjection(redis, 0).handle(early)
    await redis.set(KEYS.checkpoint, await ledger.last_entry())
    assert await snapshot(redis) == newer


# --------------------------------------------------------------------------- the clean case


async def test_clean_takeover_applies_everything_once(redis: Any) -> None:
    """No pause: the first holder applies, stops; the second takes over after the lease lapses
    and applies the rest; the books are the same as one applier's."""
    ledger = Ledger(redis)
    opened = await ledger.open_long("0.1", "45000", "0.45", "f-1")
    first = LiveProjection(redis, 0).consumer(SETTINGS)
    assert await first.burst() > 0
    await ledger.open_long("0.1", "46000", "0.46", "f-2")
    await asyncio.sleep(LEASE_MS / 1000 + 0.1)
    second = LiveProjection(redis, 0).consumer(SETTINGS)
    assert await second.burst() > 0
    assert await redis.get(KEYS.checkpoint) == await ledger.last_entry()
    live = await hash_of(redis, f"positions:{USER}:okx:{SYMBOL}:long")
    assert (live["id"], live["size"], live["entry_price"], live["version"]) == (
        opened["position_id"],
        "0.2",
        "45500",
        "2",
    )


# --------------------------------------------------------------------------- PostgreSQL projector


async def test_projector_stale_holder_changes_nothing(redis: Any, database_url: str) -> None:
    ledger = Ledger(redis)
    opened = await ledger.open_long("0.1", "45000", "0.45", "f-1")
    pool = open_pool(database_url)
    await pool.open()
    try:
        gate = Gate()
        projector_a = Projector(pool, redis, 0)

        async def paused(entries: list[Entry]) -> None:
            await gate.wait()
            await projector_a.handle(entries)

        def consumer(handler: Any) -> StreamConsumer:
            return StreamConsumer(
                redis,
                stream=KEYS.events,
                group="ledger-projector",
                handler=handler,
                dead_stream=KEYS.dead,
                settings=SETTINGS,
                lease_key=lease_key(0),
            )

        first = consumer(paused)
        second = consumer(Projector(pool, redis, 0).handle)
        await first.ensure_group()
        stale = asyncio.create_task(first.step(block=False))
        await asyncio.wait_for(gate.reached.wait(), timeout=5)
        await ledger.send("close_position", position_id=opened["position_id"])
        events = [json.loads(f["data"]) for _i, f in await redis.xrange(KEYS.events)]
        (closing,) = [e["stream"] for e in events if e["stream"] != opened["order_id"] and "order_type" in e]
        await ledger.send("record_fill", order_id=closing, fill_id="f-2", quantity="0.1", price="46000", fee="0.46")
        await asyncio.sleep(LEASE_MS / 1000 + 0.1)
        assert await second.burst() > 0
        last = await ledger.last_entry()
        async with pool.connection() as conn:
            assert await checkpoint(conn, 0) == last
            rows = await _history(conn)
        gate.opened.set()
        await asyncio.wait_for(stale, timeout=5)
        async with pool.connection() as conn:
            assert await checkpoint(conn, 0) == last
            assert await _history(conn) == rows
            cur = await conn.execute("SELECT id::text, status FROM positions")
            assert await cur.fetchall() == [(opened["position_id"], "closed")]
    finally:
        await pool.close()


async def _history(conn: Any) -> list[Any]:
    found = []
    for table in ("ledger_events", "fills", "positions", "orders", "projector_checkpoints"):
        cur = await conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2")  # noqa: S608 - fixed names
        found.append(await cur.fetchall())
    return found


# --------------------------------------------------------------------------- paper venue


async def test_paper_venue_stale_holder_never_rests_a_cancelled_order(redis: Any) -> None:
    ledger = Ledger(redis)
    await redis.hset("marks:okx", SYMBOL, "45000")
    placed = await ledger.send(
        "place_order", exchange="okx", symbol=SYMBOL, side="buy", order_type="limit", quantity="0.1", price="40000"
    )
    order = placed["order_id"]
    gate = Gate()
    first = PaperVenue(redis, 0, consumer_settings=SETTINGS)
    first.redis = gate.wrap(redis)
    second = PaperVenue(redis, 0, consumer_settings=SETTINGS)
    paper = PaperKeys(0)

    async def newer() -> None:
        await ledger.send("cancel_order", order_id=order)

    await first.consumer.ensure_group()
    stale = asyncio.create_task(first.consumer.step(block=False))
    await asyncio.wait_for(gate.reached.wait(), timeout=5)
    await newer()
    await asyncio.sleep(LEASE_MS / 1000 + 0.1)
    assert await second.burst() == 2  # OrderPlaced, OrderCancelRequested
    await ledger.consumer.burst()  # the venue's order_accepted and order_cancelled
    assert await redis.hgetall(paper.resting) == {}
    commands = await redis.xlen(KEYS.commands)
    gate.opened.set()
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(stale, timeout=5)
    assert await redis.hgetall(paper.resting) == {}
    assert await redis.xlen(KEYS.commands) == commands
    (state,) = await redis.hmget(KEYS.orders, [order])
    assert json.loads(state)["status"] == "cancelled"
