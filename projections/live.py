"""The live projection: the legacy Redis hashes and sets of CONTRACT §6, built from the log.

One consumer group (``ledger-projection``) per shard, exclusive through a lease, so each
shard's events are applied strictly in log order by one applier while other processes stand by.
Events carry resulting values and every write is absolute, so re-applying any suffix of the log
in order leaves the same state. The shard's checkpoint (``ledger:{s}:projection``) records the
last applied entry id; readers wait on it to read their own writes.

**The log, not the delivery, decides what is applied.** A delivered batch only says how far to
go: the projection applies every log entry after the checkpoint up to the batch's last entry, in
log order (XRANGE), and the checkpoint only moves forward. A redelivered entry at or before the
checkpoint is applied already; an entry that reached the group out of order (one a stale reader
took after losing the lease, claimed later by the new holder) is applied in its place anyway.

**Fencing.** A lease elects one applier but a holder whose batch outlives its lease (a pause, a
slow server) would still write. So each write is fenced:

* On a plain Redis a step is one MULTI/EXEC under WATCH of the lease and the checkpoint: it is
  applied only if the lease still names this applier (``holder``), else ``LeaseLost`` is raised
  and nothing is written; the checkpoint moves in the same transaction.
* On Redis Cluster the legacy keys (no hash tag) span slots, so a step is a pipeline of small
  scripts, each atomic on its own key: every hash, set member and GRID level carries, in its
  fence (``keys.fence``, on the key's own slot), the entry id of the last event written there,
  and a write of an older event is refused. Membership of a set is decided per member by that
  rule (the member's latest event says in or out), and a deleted position hash keeps its fence
  (a tombstone). Order hashes are written only over the previous ``version`` of the same order
  (an order update sets some fields, so it must follow its predecessor, never jump over it).
  The checkpoint is then moved by a script that checks the lease and only moves forward,
  written after the pipeline succeeded (read-your-writes); a crash part-way is repaired by the
  next step, which re-applies from the checkpoint (already written parts are refused as old).

The fences are used on both kinds of Redis (one write path); on a plain Redis the transaction
alone already fences.

Final orders stay readable in ``orders:{id}`` for ``final_order_ttl_s`` (7 days by default), then
expire; they leave ``orders:open:…`` at once, and the projection removes their ids from
``orders:user:…`` once their hash has expired (``ShardKeys.expiring``, swept after each batch).
Closed and liquidated positions leave every live key at once; history is in PostgreSQL. Fence
fields of final orders and closed positions are dropped after the same retention (a stale
writer is never that late).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from consumers.deadletter import decode_events
from consumers.entries import Entry
from consumers.runner import ConsumerSettings, LeaseLost, StreamConsumer
from ledger.config import Settings
from ledger.domain import wire
from ledger.domain.enums import PositionStatus
from ledger.domain.evolution import apply, position_from_event
from ledger.domain.mapping import ORDER, POSITION, order_changes
from ledger.domain.state import StateError
from ledger.domain.values import now_ms
from ledger.store import keys
from ledger.store.redis_conn import entry_order, text

GROUP = "ledger-projection"
FINAL_ORDER_TTL_S = 7 * 24 * 3600
# At most this many log entries per atomic step (a batch further ahead is applied in several).
STEP_ENTRIES = 1000
# At most this many due items handled per sweep.
SWEEP_ITEMS = 500

log = structlog.get_logger("ledger.projection")

_AFTER = """
local function after(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
"""

# The one writer of a live key, for this projection and for ``ledger verify --repair``:
# ``write(op, member, first)`` applies ``op`` to KEYS[1]; ``member`` is the set member or hash
# field, ARGV[first..] the operands (field/value pairs of 'put', the members of 'sput', the value
# of 'hset').
WRITE_LIVE_KEY = """
local function write(op, member, first)
  if op == 'put' then
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], unpack(ARGV, first))
  elseif op == 'del' then
    redis.call('DEL', KEYS[1])
  elseif op == 'sput' then
    redis.call('DEL', KEYS[1])
    if #ARGV >= first then
      redis.call('SADD', KEYS[1], unpack(ARGV, first))
    end
  elseif op == 'sadd' then
    redis.call('SADD', KEYS[1], member)
  elseif op == 'srem' then
    redis.call('SREM', KEYS[1], member)
  elseif op == 'hset' then
    redis.call('HSET', KEYS[1], member, ARGV[first])
  else
    redis.call('HDEL', KEYS[1], member)
  end
end
"""

# KEYS[1] a legacy live key, KEYS[2] its fence. ARGV[1] the event's entry id, ARGV[2] the fence
# field ('' for the whole key, else the set member or hash field written), ARGV[3] the operation,
# ARGV[4..] its operands. Writes only if the event is newer than the last one written there.
_FENCED = (
    _AFTER
    + WRITE_LIVE_KEY
    + """
local last = redis.call('HGET', KEYS[2], ARGV[2])
if last and not after(ARGV[1], last) then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
write(ARGV[3], ARGV[2], 4)
return 1
"""
)

# KEYS[1] an order hash (``orders:{id}``, or the GRID level hash the order holds). ARGV[1] order
# id, ARGV[2] the event's version, ARGV[3] expire-at in epoch ms or '', ARGV[4..] field/value
# pairs. Written only over version n-1 of the same order (0: no order there).
_ORDER = """
local stored = redis.call('HMGET', KEYS[1], 'id', 'version')
local previous = 0
if stored[1] then
  if stored[1] ~= ARGV[1] then
    return 0
  end
  previous = tonumber(stored[2]) or 0
end
if previous ~= tonumber(ARGV[2]) - 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[3] ~= '' then
  redis.call('PEXPIREAT', KEYS[1], ARGV[3])
end
return 1
"""

# KEYS[1] checkpoint, KEYS[2] lease. ARGV[1] entry id, ARGV[2] holder ('' = not leased).
# -1 when the lease names another holder (nothing written), 0 when the checkpoint is already
# there or past it, 1 when moved.
_ADVANCE = (
    _AFTER
    + """
if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return -1
end
local current = redis.call('GET', KEYS[1])
if current and not after(ARGV[1], current) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""
)


def position_hash(event: wire.PositionEvent) -> dict[str, str]:
    """The live hash of an open position after ``event`` (``ledger.domain.mapping.POSITION``)."""
    return POSITION.to_live(POSITION.values(position_from_event(event)))


def order_hash(event: wire.OrderPlaced) -> dict[str, str]:
    """The live hash of an order when it is placed (``ledger.domain.mapping.ORDER``)."""
    return ORDER.to_live(ORDER.values(apply(None, event)))


def order_update(event: wire.OrderChange) -> dict[str, str]:
    """The fields of an order hash that a later order event sets."""
    return ORDER.to_live(order_changes(event))


def _pairs(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


class Writes(Protocol):
    """Where ``plan`` puts the writes of events: Redis commands (``_Writes``), or an in-memory
    expected state (``projections.verify``)."""

    def fenced(self, key: str, stamp: str, op: str, fence_field: str = "", *operands: str) -> None:
        """``op`` on ``key`` (``put`` a whole hash, ``del``, ``sadd``/``srem`` the member
        ``fence_field``, ``hset``/``hdel`` the hash field ``fence_field``) by the event ``stamp``."""

    def order(self, key: str, event: wire.Event, fields: dict[str, str], final: bool = False) -> None:
        """Set ``fields`` of the order hash ``key``; ``final``: it expires after the retention."""

    def later(self, *, gone: str | None, remove: list[tuple[str, str]], forget: list[tuple[str, str]]) -> None:
        """At the end of the retention: remove set members (once the hash ``gone`` has expired)
        and drop fence fields."""


@dataclass
class _Writes:
    """The commands of one step: fenced writes of the events after the checkpoint."""

    last_id: str
    expire_at_ms: int
    expiring: str
    commands: list[tuple[Any, ...]] = field(default_factory=list)

    def fenced(self, key: str, stamp: str, op: str, fence_field: str = "", *operands: str) -> None:
        self.commands.append(("EVAL", _FENCED, 2, key, keys.fence(key), stamp, fence_field, op, *operands))

    def order(self, key: str, event: wire.Event, fields: dict[str, str], final: bool = False) -> None:
        expire = str(self.expire_at_ms) if final else ""
        self.commands.append(("EVAL", _ORDER, 1, key, event.stream, event.version, expire, *_pairs(fields)))

    def later(self, *, gone: str | None, remove: list[tuple[str, str]], forget: list[tuple[str, str]]) -> None:
        """Scheduled once in ``ShardKeys.expiring`` (a redelivery keeps the time)."""
        item = json.dumps({"gone": gone, "remove": remove, "forget": forget}, separators=(",", ":"))
        self.commands.append(("ZADD", self.expiring, "NX", self.expire_at_ms, item))


class LiveProjection:
    """Applies one shard's events to the legacy keys.

    ``holder`` is the name of the consumer whose lease must be held for a write (``consumer``
    sets it); without one (tools, tests applying a log directly) writes are fenced by entry id
    only.
    """

    def __init__(
        self, redis: Any, shard: int, *, final_order_ttl_s: int = FINAL_ORDER_TTL_S, holder: str | None = None
    ) -> None:
        self.redis = redis
        self.keys = keys.ShardKeys(shard)
        self.lease = self.keys.lease(GROUP)
        self.final_order_ttl_s = final_order_ttl_s
        self.holder = holder
        self.atomic = not isinstance(redis, RedisCluster)
        self.log = log.bind(shard=shard)

    def consumer(self, settings: ConsumerSettings | None = None) -> StreamConsumer:
        """The leased consumer feeding this projection; the projection fences on its name."""
        consumer = StreamConsumer(
            self.redis,
            stream=self.keys.events,
            group=GROUP,
            handler=self.handle,
            dead_stream=self.keys.dead,
            settings=settings,
            lease_key=self.lease,
        )
        self.holder = consumer.name
        return consumer

    async def handle(self, entries: list[Entry]) -> None:
        """Apply the log after the checkpoint up to the last delivered entry; then sweep."""
        last = max((entry.id for entry in entries), key=entry_order)
        step = self._atomic_step if self.atomic else self._cluster_step
        while await step(last):
            pass
        await self.sweep()

    # ----------------------------------------------------------------- steps

    async def _atomic_step(self, last: str) -> bool:
        """One MULTI/EXEC under WATCH of the lease and the checkpoint; False when nothing is left."""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.keys.checkpoint, self.lease)
                    checkpoint, holder = await pipe.mget(self.keys.checkpoint, self.lease)
                    self._check_holder(holder)
                    writes = await self._writes(text(checkpoint), last)
                    if writes is None:
                        return False
                    pipe.multi()
                    for command in writes.commands:
                        pipe.execute_command(*command)
                    pipe.set(self.keys.checkpoint, writes.last_id)
                    await pipe.execute()
                    return True
                except redis_errors.WatchError:
                    continue

    async def _cluster_step(self, last: str) -> bool:
        """A pipeline of fenced writes, then the fenced checkpoint; False when nothing is left."""
        checkpoint, holder = await self.redis.mget(self.keys.checkpoint, self.lease)
        self._check_holder(holder)
        writes = await self._writes(text(checkpoint), last)
        if writes is None:
            return False
        pipe = self.redis.pipeline(transaction=False)
        for command in writes.commands:
            pipe.execute_command(*command)
        # A cluster pipeline runs its commands on every node at once: a checkpoint sent with them
        # could be visible before the writes of another node, and a reader waiting on it would
        # miss its own write. So it is written only once every node has acknowledged the batch.
        await pipe.execute()
        moved = await self.redis.eval(_ADVANCE, 2, self.keys.checkpoint, self.lease, writes.last_id, self.holder or "")
        if int(moved) < 0:
            raise LeaseLost(f"{self.lease} no longer names {self.holder!r}: checkpoint not moved")
        return True

    def _check_holder(self, holder: Any) -> None:
        if self.holder is not None and text(holder) != self.holder:
            raise LeaseLost(f"{self.lease} is held by {text(holder)!r}, not by {self.holder!r}")

    async def _writes(self, checkpoint: str | None, last: str) -> _Writes | None:
        """The writes of the log entries after ``checkpoint`` up to ``last`` (None: none left)."""
        if checkpoint is not None and entry_order(checkpoint) >= entry_order(last):
            return None
        raw = await self.redis.xrange(
            self.keys.events, min=f"({checkpoint}" if checkpoint else "-", max=last, count=STEP_ENTRIES
        )
        if not raw:
            return None
        entries = [Entry(text(entry_id), dict(fields)) for entry_id, fields in raw]
        events = await decode_events(
            self.redis,
            entries,
            stream=self.keys.events,
            dead_stream=self.keys.dead,
            group=GROUP,
            log=self.log,
        )
        writes = _Writes(entries[-1].id, now_ms() + self.final_order_ttl_s * 1000, self.keys.expiring)
        plan(writes, events, await GridLevels.load(self.redis, [e for _, e in events]))
        return writes

    async def sweep(self) -> int:
        """Carry out what is due in ``ShardKeys.expiring``; return how many items were done."""
        now = now_ms()
        due = [text(m) for m in await self.redis.zrangebyscore(self.keys.expiring, "-inf", now, 0, SWEEP_ITEMS)]
        if not due:
            return 0
        items = [json.loads(member) for member in due]
        watched = [item["gone"] for item in items if item["gone"]]
        pipe = self.redis.pipeline(transaction=False)
        for key in watched:
            pipe.pttl(key)
        ttls = dict(zip(watched, [int(t) for t in await pipe.execute()], strict=True)) if watched else {}
        done, later = [], {}
        pipe = self.redis.pipeline(transaction=False)
        for member, item in zip(due, items, strict=True):
            ttl = ttls.get(item["gone"], -2)
            if ttl > 0:  # still readable (the clocks differ): look again when it expires
                later[member] = now + ttl
                continue
            if ttl == -2:  # gone (or nothing to wait for); a hash without TTL is no final order
                for key, member_id in item["remove"]:
                    pipe.srem(key, member_id)
                for key, fence_field in item["forget"]:
                    pipe.hdel(keys.fence(key), fence_field)
            done.append(member)
        await pipe.execute()
        # Only once the removals are done: a crash in between leaves the item to do again.
        if done:
            await self.redis.zrem(self.keys.expiring, *done)
        if later:
            await self.redis.zadd(self.keys.expiring, later)
        self.log.info("expired live state removed", items=len(done), rescheduled=len(later))
        return len(done)


def plan(writes: Writes, events: Iterable[tuple[str, wire.Event]], grid: GridLevels) -> None:
    """The writes of events (entry id, event), in log order: the projection's pure core."""
    for entry_id, event in events:
        if isinstance(event, wire.PositionEvent):
            _position(writes, entry_id, event)
        else:
            _order(writes, entry_id, event, grid)


def _position(writes: Writes, stamp: str, event: wire.PositionEvent) -> None:
    key = keys.position_key(event.user_id, event.exchange, event.symbol, event.side)
    index = keys.position_index(event.user_id, event.exchange)
    if event.status is PositionStatus.OPEN:
        writes.fenced(key, stamp, "put", "", *_pairs(position_hash(event)))
        writes.fenced(index, stamp, "sadd", event.stream)
        writes.fenced(keys.ACTIVE_POSITIONS, stamp, "sadd", event.stream)
        writes.fenced(keys.POSITION_KEYS, stamp, "hset", event.stream, key)
        return
    writes.fenced(key, stamp, "del")
    members = [(index, event.stream), (keys.ACTIVE_POSITIONS, event.stream), (keys.POSITION_KEYS, event.stream)]
    writes.fenced(index, stamp, "srem", event.stream)
    writes.fenced(keys.ACTIVE_POSITIONS, stamp, "srem", event.stream)
    writes.fenced(keys.POSITION_KEYS, stamp, "hdel", event.stream)
    writes.later(gone=None, remove=[], forget=members)


def _order(writes: Writes, stamp: str, event: wire.Event, grid: GridLevels) -> None:
    order_key = keys.order_key(event.stream)
    user_orders = keys.user_orders(event.user_id, event.exchange)
    open_orders = keys.open_orders(event.exchange, event.symbol)
    if isinstance(event, wire.OrderPlaced):
        fields = order_hash(event)
        writes.order(order_key, event, fields)
        writes.fenced(user_orders, stamp, "sadd", event.stream)
        writes.fenced(open_orders, stamp, "sadd", event.stream)
        grid.placed(writes, stamp, event, fields)
        return
    if not isinstance(event, wire.OrderChange):
        raise StateError(f"{event.type} of {event.stream}: neither a position nor an order event")
    fields = order_update(event)
    final = event.status.is_final
    writes.order(order_key, event, fields, final)
    if final:
        writes.fenced(open_orders, stamp, "srem", event.stream)
        members = [(user_orders, event.stream), (open_orders, event.stream)]
        writes.later(gone=order_key, remove=[(user_orders, event.stream)], forget=members)
    grid.updated(writes, stamp, event, fields, final)


class GridLevels:
    """Which order holds each grid level, so an order leaving a level clears only its own.

    ``load`` reads what a batch needs from Redis; a replay of the whole log (verify) starts
    empty and keeps one instance: placements record their levels and holders as they come.
    """

    def __init__(self, levels: dict[str, int] | None = None, holders: dict[str, str] | None = None) -> None:
        self.levels = levels or {}  # order id -> grid level
        self.holders = holders or {}  # active_grid key -> id of the order holding it

    @classmethod
    async def load(cls, redis: Any, events: Sequence[wire.Event]) -> GridLevels:
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
            holders = {k: text(v) for k, v in zip(grid_keys, await pipe.execute(), strict=True) if v}
        return cls(levels, holders)

    def placed(self, writes: Writes, stamp: str, event: wire.OrderPlaced, fields: dict[str, str]) -> None:
        if event.grid_level is None:
            return
        self.levels[event.stream] = event.grid_level
        level = str(event.grid_level)
        active = keys.grid_active(event.exchange, event.user_id, event.symbol, event.grid_level)
        writes.fenced(active, stamp, "put", "", *_pairs(fields))
        price = event.price or event.trigger_price or ""
        writes.fenced(keys.grid_orders(event.exchange, event.user_id, event.symbol), stamp, "hset", level, price)
        writes.fenced(keys.grid_placed_index(event.exchange, event.user_id, event.symbol), stamp, "hset", level, "1")
        self.holders[active] = event.stream

    def updated(self, writes: Writes, stamp: str, event: wire.Event, fields: dict[str, str], final: bool) -> None:
        level = self.levels.get(event.stream)
        if level is None:
            return
        active = keys.grid_active(event.exchange, event.user_id, event.symbol, level)
        holder = self.holders.get(active)
        if not final:
            if holder == event.stream:
                writes.order(active, event, fields)
            return
        # A level held by another order is left alone. A level held by nobody is cleared (again):
        # in a consistent state that changes nothing, and after a batch that died part-way on
        # Redis Cluster (active_grid deleted, the other two keys not yet written) it completes it.
        if holder not in (event.stream, None):
            return
        writes.fenced(active, stamp, "del")
        writes.fenced(keys.grid_orders(event.exchange, event.user_id, event.symbol), stamp, "hdel", str(level))
        writes.fenced(
            keys.grid_placed_index(event.exchange, event.user_id, event.symbol), stamp, "hset", str(level), "0"
        )
        self.holders.pop(active, None)


def _is_order_update(event: wire.Event) -> bool:
    return not isinstance(event, wire.PositionEvent | wire.OrderPlaced)


async def projection_role(redis: Any, settings: Settings) -> list[StreamConsumer]:
    """``ledger serve`` role ``projection``: one leased, fenced applier per shard."""
    return [
        LiveProjection(redis, shard).consumer(ConsumerSettings.from_settings(settings))
        for shard in range(settings.shards)
    ]
