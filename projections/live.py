"""The live projection: the legacy Redis hashes and sets of CONTRACT §6, built from the log.

One consumer group (``ledger-projection``) per shard, exclusive through a lease, so each
shard's events are applied strictly in log order by one applier while other processes stand by.
Events carry resulting values and every write is absolute (HSET of the resulting fields, SADD /
SREM / DEL of the resulting membership), so re-applying any suffix of the log in order leaves
the same state. After each batch the shard's checkpoint (``ledger:{s}:projection``) records the
last applied entry id; readers wait on it to read their own writes.

On a plain Redis a batch and its checkpoint are one MULTI/EXEC. On Redis Cluster the legacy keys
(no hash tag) live on many slots, so a batch is a non-transactional pipeline with the checkpoint
written after it succeeded: a crash part-way leaves some keys ahead of the checkpoint, and the
next applier re-applies the batch from the checkpoint, which converges to the same state.

Final orders stay readable in ``orders:{id}`` for ``final_order_ttl_s`` (7 days by default), then
expire; they leave ``orders:open:…`` at once, and readers drop expired ids from
``orders:user:…`` lazily. Closed and liquidated positions leave every live key at once; history
is in PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import structlog
from redis.asyncio.cluster import RedisCluster

from consumers.deadletter import dead_letter_fields
from consumers.runner import ConsumerSettings, Entry, StreamConsumer
from ledger import keys, wire
from ledger.config import Settings
from ledger.enums import PositionStatus

GROUP = "ledger-projection"
FINAL_ORDER_TTL_S = 7 * 24 * 3600

log = structlog.get_logger("ledger.projection")


def _hash_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def position_hash(event: wire.PositionEvent) -> dict[str, str]:
    """The live hash of an open position after ``event``."""
    fields = {
        "id": event.stream,
        "user_id": event.user_id,
        "exchange": event.exchange,
        "symbol": event.symbol,
        "side": event.side,
        "size": event.size,
        "entry_price": event.entry_price,
        "leverage": event.leverage,
        "realized_pnl": event.realized_pnl,
        "pnl": event.realized_pnl,
        "gross_pnl": event.gross_pnl,
        "fees": event.fees,
        "other_fees": event.other_fees,
        "exit_price": event.exit_price,
        "status": event.status,
        "stop_loss": event.stop_loss,
        "take_profit": event.take_profit,
        "excess_qty": event.excess_qty,
        "metadata": event.metadata,
        "created_at": event.created_at,
        "updated_at": event.updated_at,
        "version": event.version,
    }
    return {name: _hash_value(value) for name, value in fields.items()}


def order_hash(event: wire.OrderPlaced) -> dict[str, str]:
    """The live hash of an order when it is placed."""
    fields = {
        "id": event.stream,
        "user_id": event.user_id,
        "exchange": event.exchange,
        "symbol": event.symbol,
        "side": event.side,
        "order_type": event.order_type,
        "quantity": event.quantity,
        "price": event.price,
        "trigger_price": event.trigger_price,
        "filled_qty": "0",
        "avg_fill_price": None,
        "fill_basis": "0",
        "status": event.status,
        "exchange_order_id": None,
        "client_order_id": event.client_order_id,
        "position_side": event.position_side,
        "position_id": event.position_id,
        "reduce_only": event.reduce_only,
        "leverage": event.leverage,
        "grid_level": event.grid_level,
        "reject_reason": None,
        "metadata": event.metadata,
        "created_at": event.ts,
        "updated_at": event.ts,
        "version": event.version,
    }
    return {name: _hash_value(value) for name, value in fields.items()}


def order_update(event: wire.OrderChange) -> dict[str, str]:
    """The fields of an order hash that a later order event sets."""
    fields: dict[str, Any] = {"status": event.status, "updated_at": event.ts, "version": event.version}
    if isinstance(event, wire.OrderAccepted):
        fields["exchange_order_id"] = event.exchange_order_id
    elif isinstance(event, wire.OrderRejected):
        fields["reject_reason"] = event.reason
    elif isinstance(event, wire.OrderFilled):
        fields.update(filled_qty=event.filled_qty, avg_fill_price=event.avg_fill_price, fill_basis=event.fill_basis)
    return {name: _hash_value(value) for name, value in fields.items()}


class LiveProjection:
    """Applies one shard's events to the legacy keys."""

    def __init__(self, redis: Any, shard: int, *, final_order_ttl_s: int = FINAL_ORDER_TTL_S) -> None:
        self.redis = redis
        self.keys = keys.ShardKeys(shard)
        self.final_order_ttl_s = final_order_ttl_s
        self.atomic = not isinstance(redis, RedisCluster)

    async def handle(self, entries: list[Entry]) -> None:
        events = await self._decode(entries)
        grid = await _GridLevels.load(self.redis, [e for _, e in events])
        pipe = self.redis.pipeline(transaction=self.atomic)
        for _entry_id, event in events:
            if isinstance(event, wire.PositionEvent):
                self._position(pipe, event)
            else:
                self._order(pipe, event, grid)
        if self.atomic:
            pipe.set(self.keys.checkpoint, entries[-1].id)
            await pipe.execute()
            return
        # A cluster pipeline runs its commands on every node at once: a checkpoint sent with them
        # could be visible before the writes of another node, and a reader waiting on it would
        # miss its own write. So it is written only once every node has acknowledged the batch.
        await pipe.execute()
        await self.redis.set(self.keys.checkpoint, entries[-1].id)

    async def _decode(self, entries: Sequence[Entry]) -> list[tuple[str, wire.Event]]:
        events = []
        for entry in entries:
            try:
                events.append((entry.id, wire.decode_event(entry.fields.get("type", ""), entry.fields.get("data", ""))))
            except wire.UnknownEventType:
                continue
            except wire.WireError as error:
                fields = dead_letter_fields(
                    entry.fields,
                    stream=self.keys.events,
                    entry_id=entry.id,
                    group=GROUP,
                    code=error.code,
                    reason=error.message,
                )
                await self.redis.xadd(self.keys.dead, fields)
                log.error("undecodable event skipped", entry_id=entry.id, code=error.code, reason=error.message)
        return events

    def _position(self, pipe: Any, event: wire.PositionEvent) -> None:
        key = keys.position_key(event.user_id, event.exchange, event.symbol, event.side)
        index = keys.position_index(event.user_id, event.exchange)
        if event.status is PositionStatus.OPEN:
            pipe.hset(key, mapping=position_hash(event))
            pipe.sadd(index, event.stream)
            pipe.sadd(keys.ACTIVE_POSITIONS, event.stream)
            pipe.hset(keys.POSITION_KEYS, event.stream, key)
        else:
            pipe.delete(key)
            pipe.srem(index, event.stream)
            pipe.srem(keys.ACTIVE_POSITIONS, event.stream)
            pipe.hdel(keys.POSITION_KEYS, event.stream)

    def _order(self, pipe: Any, event: wire.Event, grid: _GridLevels) -> None:
        order_key = keys.order_key(event.stream)
        if isinstance(event, wire.OrderPlaced):
            fields = order_hash(event)
            pipe.hset(order_key, mapping=fields)
            pipe.sadd(keys.user_orders(event.user_id, event.exchange), event.stream)
            pipe.sadd(keys.open_orders(event.exchange, event.symbol), event.stream)
            grid.placed(pipe, event, fields)
            return
        assert isinstance(event, wire.OrderChange)
        fields = order_update(event)
        pipe.hset(order_key, mapping=fields)
        final = event.status.is_final
        if final:
            pipe.srem(keys.open_orders(event.exchange, event.symbol), event.stream)
            pipe.expire(order_key, self.final_order_ttl_s)
        grid.updated(pipe, event, fields, final)


class _GridLevels:
    """Which order holds each grid level, so an order leaving a level clears only its own."""

    def __init__(self, levels: dict[str, int], holders: dict[str, str]) -> None:
        self.levels = levels  # order id -> grid level
        self.holders = holders  # active_grid key -> id of the order holding it

    @classmethod
    async def load(cls, redis: Any, events: Sequence[wire.Event]) -> _GridLevels:
        levels = {
            e.stream: e.grid_level for e in events if isinstance(e, wire.OrderPlaced) and e.grid_level is not None
        }
        unknown = sorted(
            {e.stream for e in events if _is_order_update(e)}
            - {e.stream for e in events if isinstance(e, wire.OrderPlaced)}
        )
        if unknown:
            pipe = redis.pipeline(transaction=False)
            for order_id in unknown:
                pipe.hget(keys.order_key(order_id), "grid_level")
            for order_id, level in zip(unknown, await pipe.execute(), strict=True):
                if level:
                    levels[order_id] = int(level)
        grid_keys = sorted(
            {keys.grid_active(e.exchange, e.user_id, e.symbol, levels[e.stream]) for e in events if e.stream in levels}
        )
        holders: dict[str, str] = {}
        if grid_keys:
            pipe = redis.pipeline(transaction=False)
            for key in grid_keys:
                pipe.hget(key, "id")
            holders = {k: v for k, v in zip(grid_keys, await pipe.execute(), strict=True) if v}
        return cls(levels, holders)

    def placed(self, pipe: Any, event: wire.OrderPlaced, fields: dict[str, str]) -> None:
        if event.grid_level is None:
            return
        level = event.grid_level
        active = keys.grid_active(event.exchange, event.user_id, event.symbol, level)
        pipe.delete(active)
        pipe.hset(active, mapping=fields)
        pipe.hset(
            keys.grid_orders(event.exchange, event.user_id, event.symbol),
            str(level),
            event.price or event.trigger_price or "",
        )
        pipe.hset(keys.grid_placed_index(event.exchange, event.user_id, event.symbol), str(level), "1")
        self.holders[active] = event.stream

    def updated(self, pipe: Any, event: wire.Event, fields: dict[str, str], final: bool) -> None:
        level = self.levels.get(event.stream)
        if level is None:
            return
        active = keys.grid_active(event.exchange, event.user_id, event.symbol, level)
        holder = self.holders.get(active)
        if not final:
            if holder == event.stream:
                pipe.hset(active, mapping=fields)
            return
        # A level held by another order is left alone. A level held by nobody is cleared (again):
        # in a consistent state that changes nothing, and after a batch that died part-way on
        # Redis Cluster (active_grid deleted, the other two keys not yet written) it completes it.
        if holder not in (event.stream, None):
            return
        pipe.delete(active)
        pipe.hdel(keys.grid_orders(event.exchange, event.user_id, event.symbol), str(level))
        pipe.hset(keys.grid_placed_index(event.exchange, event.user_id, event.symbol), str(level), "0")
        self.holders.pop(active, None)


def _is_order_update(event: wire.Event) -> bool:
    return not isinstance(event, wire.PositionEvent | wire.OrderPlaced)


async def projection_role(redis: Any, settings: Settings) -> list[StreamConsumer]:
    """``ledger serve`` role ``projection``: one leased applier per shard."""
    consumers = []
    for shard in range(settings.shards):
        projection = LiveProjection(redis, shard)
        consumers.append(
            StreamConsumer(
                redis,
                stream=projection.keys.events,
                group=GROUP,
                handler=projection.handle,
                dead_stream=projection.keys.dead,
                settings=ConsumerSettings.from_settings(settings),
                lease_key=projection.keys.lease(GROUP),
            )
        )
    return consumers
