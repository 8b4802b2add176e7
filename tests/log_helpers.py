"""Shared helpers of the tests of the log reader, replay and export: the real command handler,
live projection and PostgreSQL projector of every shard, driven in bursts in the test's loop,
with external execution (the test reports accepts and fills) and a clock the test sets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg_pool

from consumers.command_handler import GROUP as HANDLER_GROUP
from consumers.command_handler import CommandHandler
from consumers.runner import ConsumerSettings, StreamConsumer
from ledger.store.archived import ArchivedIndex, fingerprint
from ledger.store.eventstore import EventStore, InlineWrites
from ledger.store.keys import ShardKeys, shard_of
from ledger.store.redis_conn import ensure_shard_count
from projections.live import LiveProjection
from projections.projector import open_pool, projector_consumer

SYMBOL = "BTC-USDT-SWAP"
SETTINGS = ConsumerSettings(batch_size=64, block_ms=50, claim_idle_ms=60_000, max_deliveries=2)
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@dataclass
class Clock:
    """The handler's clock (epoch ms): ``tick`` moves it on by one second."""

    now: int = T0

    def __call__(self) -> int:
        return self.now

    def tick(self) -> int:
        self.now += 1000
        return self.now


@dataclass
class Rig:
    """The handler and the live projection of every shard, and the projector once a pool is given."""

    redis: Any
    shards: int
    clock: Clock = field(default_factory=Clock)
    handlers: list[StreamConsumer] = field(default_factory=list)
    live: list[StreamConsumer] = field(default_factory=list)
    projectors: list[StreamConsumer] = field(default_factory=list)
    counter: int = 0

    @classmethod
    async def start(cls, redis: Any, shards: int = 1, *, live: Callable[[int], InlineWrites] | None = None) -> Rig:
        """``live(shard)``: the live projection's writes the handler's appends make while it is
        caught up (``projections.live.InlineProjection``, as in ``ledger serve``)."""
        await ensure_shard_count(redis, shards)
        rig = cls(redis, shards)
        for shard in range(shards):
            keys = ShardKeys(shard)
            store = EventStore(redis, shard, live=live(shard) if live else None)
            handler = CommandHandler(store, shards, clock=rig.clock)
            rig.handlers.append(
                StreamConsumer(
                    redis,
                    stream=keys.commands,
                    group=HANDLER_GROUP,
                    handler=handler.handle,
                    dead_stream=keys.dead,
                    settings=SETTINGS,
                )
            )
            rig.live.append(LiveProjection(redis, shard).consumer(SETTINGS))
        return rig

    async def send(self, user: str, type_: str, **data: Any) -> dict[str, Any]:
        """Publish one command at the next second of the clock, run its shard's handler, return
        the reply (it must be accepted)."""
        self.counter += 1
        command_id = f"c-{self.counter}"
        shard = shard_of(user, self.shards)
        keys = ShardKeys(shard)
        self.clock.tick()
        payload = {"command_id": command_id, "user_id": user, **data}
        await self.redis.xadd(keys.commands, {"type": type_, "data": json.dumps(payload)})
        await self.handlers[shard].burst()
        raw = await self.redis.lindex(keys.reply(user, command_id), 0)
        assert raw is not None, f"no reply to {command_id}"
        reply: dict[str, Any] = json.loads(raw)
        assert reply["status"] == "accepted", reply
        return reply

    async def project(self) -> None:
        """Apply every shard's log to the live keys."""
        for consumer in self.live:
            await consumer.burst()

    async def archive(self) -> None:
        """Run every shard's PostgreSQL projector over its log."""
        for consumer in self.projectors:
            await consumer.burst()

    @asynccontextmanager
    async def projector(self, database_url: str) -> AsyncIterator[None]:
        pool: psycopg_pool.AsyncConnectionPool[Any] = open_pool(database_url)
        await pool.open()
        try:
            self.projectors = [projector_consumer(self.redis, pool, s, settings=SETTINGS) for s in range(self.shards)]
            yield
        finally:
            self.projectors = []
            await pool.close()

    # ----------------------------------------------------------------- a scripted session

    async def place(self, user: str, side: str, quantity: str, price: str, **extra: Any) -> str:
        reply = await self.send(
            user,
            "place_order",
            exchange="okx",
            symbol=SYMBOL,
            side=side,
            order_type="limit",
            quantity=quantity,
            price=price,
            **extra,
        )
        return str(reply["order_id"])

    async def fill(self, user: str, order_id: str, quantity: str, price: str, fee: str = "0.01") -> None:
        await self.send(
            user,
            "record_fill",
            order_id=order_id,
            fill_id=f"f-{self.counter + 1}",
            quantity=quantity,
            price=price,
            fee=fee,
        )

    async def round_trip(self, user: str, entry: str, exit_: str) -> None:
        """Buy 1 in two fills around ``entry`` and sell it all in two fills around ``exit_``."""
        buy = await self.place(user, "buy", "1", entry)
        await self.send(user, "order_accepted", order_id=buy, exchange_order_id=f"x-{self.counter}")
        await self.fill(user, buy, "0.4", entry)
        await self.fill(user, buy, "0.6", str(int(entry) + 10))
        sell = await self.place(user, "sell", "1", exit_)
        await self.fill(user, sell, "0.5", exit_)
        await self.fill(user, sell, "0.5", str(int(exit_) + 10))


async def log_entries(redis: Any, shard: int = 0) -> list[str]:
    """The entry ids of a shard's event log in Redis."""
    return [str(entry_id) for entry_id, _fields in await redis.xrange(ShardKeys(shard).events)]


# The bucket's value in hex (the test clients decode responses; the index holds bytes).
_HEX_OF_FIELD = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return nil end
return (string.gsub(v, '.', function(c) return string.format('%02x', string.byte(c)) end))
"""


async def archived_digest(redis: Any, keys: ShardKeys, field: str) -> str | None:
    """The digest (hex) the shard's archived index holds for an outcome field, or None."""
    index = ArchivedIndex(keys.archived)
    await index.read(redis)
    fp = fingerprint(field)
    bucket = index.bucket(fp)
    return await redis.eval(_HEX_OF_FIELD, 1, bucket, fp)
