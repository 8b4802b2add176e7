"""The live projection: the legacy Redis hashes and sets of CONTRACT §6, built from the log.

One consumer group (``ledger-projection``) per shard, exclusive through a lease, so each
shard's events are applied strictly in log order by one applier while other processes stand by.
Events carry resulting values and every write is absolute, so re-applying any suffix of the log
in order leaves the same state. The shard's checkpoint (``ledger:{s}:projection``) records the
last applied entry id; the step that moves it also adds an entry with that id to the progress
stream (``ledger:{s}:projection:progress``), on which readers block (XREAD) to read their own
writes, woken by the step itself rather than polling.

**The log, not the delivery, decides what is applied.** A delivered batch only says how far to
go: the projection applies every log entry after the checkpoint up to the batch's last entry, in
log order (XRANGE), and the checkpoint only moves forward. A redelivered entry at or before the
checkpoint is applied already; an entry that reached the group out of order (one a stale reader
took after losing the lease, claimed later by the new holder) is applied in its place anyway.

**One script call per step.** The writes of a step (up to ``STEP_ENTRIES`` entries) are packed
once (msgpack, one argument) and applied by one script, ``_APPLY`` (loaded once, called by
EVALSHA, loaded again on NOSCRIPT), which holds every rule below.

**Fencing.** A lease elects one applier but a holder whose batch outlives its lease (a pause, a
slow server) would still write. So each write is fenced:

* On a plain Redis a step is one ``_APPLY`` call: it writes only if the lease still names this
  applier (``holder``), else ``LeaseLost`` is raised and nothing is written, and only if the
  checkpoint is still the one the writes were planned from, else nothing is written and the
  step starts again from the checkpoint found; the checkpoint moves in the same call (so only
  forward: the writes are of later entries). The applier reads the checkpoint once at the
  start of a batch (the handler's append step moves it too, below), so a step is one XRANGE and
  one call.
* On Redis Cluster the legacy keys (no hash tag) span slots, so a step is one ``_APPLY`` call
  per slot, in one pipeline, each atomic on its own keys: every hash, set member and GRID level
  carries, in its fence (``keys.fence``, on the key's own slot), the entry id of the last event
  written there, and a write of an older event is refused. Membership of a set is decided per
  member by that rule (the member's latest event says in or out), and a deleted position hash
  keeps its fence (a tombstone). Order hashes are written only over the previous ``version`` of the same order
  (an order update sets some fields, so it must follow its predecessor, never jump over it).
  The checkpoint is then moved by an ``_APPLY`` call of its own that checks the lease and the
  checkpoint as above, sent after the pipeline succeeded (read-your-writes); a crash part-way is
  repaired by the next step, which re-applies from the checkpoint (already written parts are
  refused as old).

**The delivered batch is the log when the chain says so.** On a plain Redis the applier knows the
checkpoint it wrote and that entry's chain number (the ``n`` field every event entry carries,
``ledger.store.chain``: 1, 2, 3 ... in log order); a delivered batch whose entries carry the next
numbers in order is exactly the log after the checkpoint, so it is applied as delivered, with no
XRANGE. Anything else (a first step, a redelivery, a gap, an entry without a number) is read
from the log as above.

The fences are used on both kinds of Redis (one write path); on a plain Redis the step's call
alone already fences.

**The handler's append step makes these writes while the projection is caught up** (plain Redis;
``InlineProjection``, ``ledger/store/lua/append.lua``): when the lease names one of this
projection's consumers (not a tool that paused it) and the checkpoint is the log's head, the
script that appends a chunk's events also makes their live writes (``plan``'s, the one write path:
``ledger/store/lua/live_writes.lua``), moves the checkpoint and tells the progress stream, in the
same atomic step, and moves the projection's group past them (its last-delivered id); so a reply
comes with its live keys written, and the projection's consumer, blocked in XREADGROUP (not
``ordered``: consumers.runner), is not even woken for them. One that took entries before the step
moved the group finds them applied (it reads the checkpoint at the start of each batch). The
checkpoint check is the fence: the projection's own step, planned from an older checkpoint, is
refused and starts again from the one found. The sweep below then runs when the consumer's read
finds nothing (``sweep_if_due``), as well as after each batch. The handler plans the writes only
for a chunk of at most ``INLINE_EVENTS`` events (a larger one says the handler is busy: the
projection's process applies it in parallel), and the script makes them only when the rule holds
(the handler no longer reads the rule ahead: it loads no state for a user whose state it
holds); a GRID order's writes depend on which order holds its level, which only the projection
reads, so from a command with one on the checkpoint stays behind and the projection applies the
rest. A consumer that stops
gives its lease up, so a stopped projection stops these writes at once (one that died, after its
lease's time).

Final orders stay readable in ``orders:{id}`` for ``final_order_ttl_s`` (``LEDGER_FINAL_ORDER_TTL_S``,
7 days by default), then expire; they leave ``orders:open:…`` at once, and the projection removes their ids from
``orders:user:…`` once their hash has expired (``ShardKeys.expiring``, swept after a batch, or
when a read finds nothing, once its first item is due, and read at least every ``SWEEP_EVERY_MS``
for items another applier scheduled).
Closed and liquidated positions leave every live key at once; history is in PostgreSQL. Fence
fields of final orders and closed positions are dropped after the same retention, but never
before ``FENCE_KEEP_S`` (a stale writer is never that late); a final order's id leaves
``orders:user:…`` with them. Each such aggregate is one short member of ``expiring``
(``Expiry``: its kind, id, user, exchange and symbol, from which every key is derived).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import msgspec
import structlog
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from consumers.deadletter import decode_events
from consumers.entries import Entry
from consumers.runner import ConsumerSettings, LeaseLost, StreamConsumer, names_of
from ledger.config import Settings
from ledger.defaults import FINAL_ORDER_TTL_S
from ledger.domain import wire
from ledger.domain.enums import Exchange, PositionStatus
from ledger.domain.evolution import apply, position_from_event
from ledger.domain.mapping import ORDER, POSITION, order_changes
from ledger.domain.state import StateError
from ledger.domain.values import check_identifier, now_ms
from ledger.store import keys
from ledger.store.eventstore import LIVE_WRITES_LUA, Append
from ledger.store.redis_conn import entry_order, text

GROUP = "ledger-projection"
# At most this many log entries per atomic step (a batch further ahead is applied in several).
STEP_ENTRIES = 1000
# At most this many due items handled per sweep.
SWEEP_ITEMS = 500
# At most this many orders' grid levels kept in memory (``KnownLevels``).
KNOWN_LEVELS = 50_000
# ``expiring`` is read at least this often (items another applier scheduled), else only when the
# first item this applier knows of is due.
SWEEP_EVERY_MS = 1000
# The progress stream (``ShardKeys.progress``: the checkpoint told, one entry per step) keeps
# about this many entries (approximate trimming): a waiter needs only the newest.
PROGRESS_KEEP = 100
# The handler's append step makes the live writes of a chunk of at most this many events
# (``InlineProjection``); a larger chunk says the handler is busy, and the projection's process
# applies it in parallel with the handler's next chunk. Measured (``python -m benchmarks``, three
# runs each alternating): with every chunk's writes made by the append step, end to end fell from
# 2,045 to 1,716 commands/s (the handler is the step every command waits for at that rate).
INLINE_EVENTS = 64
# The fence fields of final orders and closed positions (their tombstones) are kept at least this
# long however short ``final_order_ttl_s`` is: on Redis Cluster a stale writer's older event is
# refused only while the tombstone is there, and a writer that lost its lease is never an hour late.
FENCE_KEEP_S = 3600

log = structlog.get_logger("ledger.projection")

# The writes of a step in one call. ARGV[1] the writes, msgpack (``live_writes`` of
# ``LIVE_WRITES_LUA``, whose stamps are entry ids here), where key and fence are indexes into
# KEYS. With ARGV[2..5] (holder or '', the checkpoint the writes were planned from or '' for
# none, the new checkpoint, ``PROGRESS_KEEP``), KEYS[1] is the checkpoint, KEYS[2] the lease and
# KEYS[3] the progress stream: -1 when the lease names another holder, -2 when the checkpoint is
# no longer the one planned from (nothing written either way); else the writes and the
# checkpoint move, and the progress stream gets an entry whose id is the new checkpoint
# (``pcall``: an id not above the stream's last one, after a tool moved the checkpoint back,
# means a waiter for it is woken already, and must not fail the step).
_APPLY = (
    LIVE_WRITES_LUA
    + """
local step = #ARGV > 1
if step then
  if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[2] then
    return -1
  end
  if (redis.call('GET', KEYS[1]) or '') ~= ARGV[3] then
    return -2
  end
end
live_writes(cmsgpack.unpack(ARGV[1]), function(stamp) return stamp end)
if step then
  redis.call('SET', KEYS[1], ARGV[4])
  redis.pcall('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], ARGV[4], 'applied', ARGV[4])
end
return 1
"""
)
_APPLIED, _LEASE_LOST, _MOVED = 1, -1, -2
_packer = msgspec.msgpack.Encoder()


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
    return list(itertools.chain.from_iterable(fields.items()))


class Writes(Protocol):
    """Where ``plan`` puts the writes of events: Redis commands (``_Writes``), or an in-memory
    expected state (``projections.verify``)."""

    def fenced(self, key: str, stamp: str, op: str, fence_field: str = "", *operands: str) -> None:
        """``op`` on ``key`` (``put`` a whole hash, ``del``, ``sadd``/``srem`` the member
        ``fence_field``, ``hset``/``hdel`` the hash field ``fence_field``) by the event ``stamp``."""

    def order(self, key: str, event: wire.Event, fields: dict[str, str], final: bool = False) -> None:
        """Set ``fields`` of the order hash ``key``; ``final``: it expires after the retention."""

    def later(self, expiry: Expiry) -> None:
        """At the end of the retention: remove set members (once the hash ``expiry.gone`` has
        expired) and drop fence fields."""


@dataclass(frozen=True, slots=True)
class Expiry:
    """What the projection forgets of a final order (``kind`` ``o``) or a closed position
    (``p``) at the end of the retention. Scheduled as one member of ``ShardKeys.expiring``,
    ``o <order id> <user> <exchange> <symbol>`` or ``p <position id> <user> <exchange>`` (about
    70 bytes; the keys below are derived from it, and no identifier holds a space)."""

    kind: str
    member: str
    user_id: str
    exchange: str
    symbol: str = ""

    @property
    def gone(self) -> str | None:
        """The hash whose expiry the removals wait for (an order's), None for none."""
        return keys.order_key(self.member) if self.kind == _ORDER else None

    @property
    def remove(self) -> list[tuple[str, str]]:
        """(set, member) removed: a final order leaves ``orders:user:…`` once its hash expired."""
        return [(keys.user_orders(self.user_id, self.exchange), self.member)] if self.kind == _ORDER else []

    @property
    def forget(self) -> list[tuple[str, str]]:
        """(live key, fence field) dropped from the key's fence."""
        if self.kind == _ORDER:
            sets = [keys.user_orders(self.user_id, self.exchange), keys.open_orders(self.exchange, self.symbol)]
        else:
            sets = [keys.position_index(self.user_id, self.exchange), keys.ACTIVE_POSITIONS, keys.POSITION_KEYS]
        return [(key, self.member) for key in sets]

    def encode(self) -> str:
        parts = (self.kind, self.member, self.user_id, self.exchange, self.symbol)
        return " ".join(parts if self.kind == _ORDER else parts[:4])

    @classmethod
    def decode(cls, item: str) -> Expiry:
        kind, _, rest = item.partition(" ")
        if kind == _ORDER:
            member, user_id, exchange, symbol = rest.split(" ", 3)
        elif kind == _POSITION:
            member, user_id, exchange = rest.split(" ")
            symbol = ""
        else:
            raise StateError(f"{item!r} in the expiring set is no scheduled expiry: remove it by hand")
        check_identifier("uuid", member, "expiring member")
        return cls(kind, member, check_identifier("user_id", user_id), Exchange(exchange).value, symbol)


_ORDER, _POSITION = "o", "p"


class _Scheduled(NamedTuple):
    gone: str | None
    remove: list[tuple[str, str]]
    forget: list[tuple[str, str]]


def _scheduled(item: str) -> _Scheduled:
    """What a member of ``expiring`` asks for. One written before members were an ``Expiry``
    (JSON of the three lists, still there until its 7 days pass) is done as it is written."""
    if item.startswith("{"):
        found = json.loads(item)
        return _Scheduled(found["gone"], [(k, m) for k, m in found["remove"]], [(k, m) for k, m in found["forget"]])
    expiry = Expiry.decode(item)
    return _Scheduled(expiry.gone, expiry.remove, expiry.forget)


class _Call:
    """One call of ``_APPLY``: the keys it declares and its writes (indexes into those keys)."""

    __slots__ = ("keys", "offset", "index", "fenced", "writes")

    def __init__(self, offset: int) -> None:
        self.offset = offset  # keys declared before these (the checkpoint and the lease)
        self.keys: list[str] = []
        self.index: dict[str, int] = {}
        self.fenced: dict[str, tuple[int, int]] = {}  # live key -> its index and its fence's
        self.writes: list[list[Any]] = []

    def key_and_fence(self, name: str) -> tuple[int, int]:
        found = self.fenced.get(name)
        if found is None:
            found = self.fenced[name] = (self.key(name), self.key(keys.fence(name)))
        return found

    def key(self, name: str) -> int:
        at = self.index.get(name)
        if at is None:
            self.keys.append(name)
            at = self.index[name] = self.offset + len(self.keys)  # Lua counts from 1
        return at


@dataclass
class _Writes:
    """The writes of one step, packed for ``_APPLY``: one call on a plain Redis, one call per
    slot on Redis Cluster (``slot``: the cluster's key slot; the first call's keys follow the
    checkpoint and the lease on a plain Redis)."""

    last_id: str
    expire_at_ms: int  # a final order's hash expires
    forget_at_ms: int  # what ``expiring`` schedules is done (``Expiry``)
    expiring: str
    slot: Callable[[str], int] | None
    calls: dict[int, _Call] = field(default_factory=dict)
    scheduled: bool = False  # something was added to ``expiring``
    last_n: int | None = None  # the last entry's chain number (None: it carries none)

    def call(self, key: str) -> _Call:
        slot = self.slot(key) if self.slot else 0
        found = self.calls.get(slot)
        if found is None:
            found = self.calls[slot] = _Call(0 if self.slot else _STEP_KEYS)
        return found

    def fenced(self, key: str, stamp: str, op: str, fence_field: str = "", *operands: str) -> None:
        call = self.call(key)
        call.writes.append(["fenced", *call.key_and_fence(key), stamp, fence_field, op, *operands])

    def order(self, key: str, event: wire.Event, fields: dict[str, str], final: bool = False) -> None:
        call = self.call(key)
        expire = str(self.expire_at_ms) if final else ""
        call.writes.append(["order", call.key(key), event.stream, event.version, expire, *_pairs(fields)])

    def later(self, expiry: Expiry) -> None:
        """Scheduled once in ``ShardKeys.expiring`` (a redelivery keeps the time)."""
        call = self.call(self.expiring)
        call.writes.append(["later", call.key(self.expiring), str(self.forget_at_ms), expiry.encode()])
        self.scheduled = True


def _step_keys(shard_keys: keys.ShardKeys) -> list[str]:
    """The keys a step declares before its writes (``_APPLY``, and the append step's projection
    keys): the checkpoint, the projection's lease, the progress stream."""
    return [shard_keys.checkpoint, shard_keys.lease(GROUP), shard_keys.progress]


# How many keys come before a plain Redis step's writes (``_step_keys``).
_STEP_KEYS = 3


class InlineProjection:
    """The live writes of a chunk of appends, made by the append step itself while the projection
    is caught up (``ledger.store.eventstore.InlineWrites``; ``lua/append.lua`` says when): the
    projection's hop (waking it, reading the events, its step) leaves the order path, and a reply
    comes with its live keys written. Plain Redis only (the live keys have no hash tag). The
    writes are ``plan``'s, stamped with each event's number among its command's events (the
    script stamps them with the entry ids it makes). A GRID order's writes depend on which order
    holds its level, which the projection reads: its command's are false, and from there on the
    projection applies the log as before."""

    def __init__(
        self, shard: int, final_order_ttl_s: int = FINAL_ORDER_TTL_S, fence_keep_s: int = FENCE_KEEP_S
    ) -> None:
        self.keys = keys.ShardKeys(shard)
        self.final_order_ttl_s = final_order_ttl_s
        self.forget_after_s = max(final_order_ttl_s, fence_keep_s)

    def __call__(self, appends: Sequence[Append], offset: int) -> tuple[list[str], list[Any]] | None:
        if sum(len(append.events) for append in appends) > INLINE_EVENTS:
            return None
        now = now_ms()
        writes = _Writes(
            "", now + self.final_order_ttl_s * 1000, now + self.forget_after_s * 1000, self.keys.expiring, None
        )
        call = writes.calls[0] = _Call(offset)
        for step_key in _step_keys(self.keys):
            call.key(step_key)
        made: list[list[list[Any]] | bool] = []
        for append in appends:
            if not _without_grid(append):
                made.append(False)
                continue
            call.writes = []
            plan(writes, ((str(number), event) for number, event in enumerate(append.events, 1)), GridLevels())
            made.append(call.writes)
        return call.keys, [_packer.encode(made), names_of(GROUP), str(PROGRESS_KEEP), GROUP]


def inline_projection(redis: Any, shard: int, settings: Settings) -> InlineProjection | None:
    """The live writes the handler's append step makes on ``redis``; None on Redis Cluster."""
    if isinstance(redis, RedisCluster):
        return None
    return InlineProjection(shard, settings.final_order_ttl_s)


def _without_grid(append: Append) -> bool:
    """No event of ``append`` touches a GRID level: each order event's order (in the append's
    snapshots, as every order event's is) has none."""
    for event in append.events:
        if isinstance(event, wire.PositionEvent | wire.DriftEvent):
            continue
        order = append.orders.get(event.stream)
        if order is None or order.grid_level is not None:
            return False
    return True


class LiveProjection:
    """Applies one shard's events to the legacy keys.

    ``holder`` is the name of the consumer whose lease must be held for a write (``consumer``
    sets it); without one (tools, tests applying a log directly) writes are fenced by entry id
    only.
    """

    def __init__(
        self,
        redis: Any,
        shard: int,
        *,
        final_order_ttl_s: int = FINAL_ORDER_TTL_S,
        fence_keep_s: int = FENCE_KEEP_S,
        holder: str | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys.ShardKeys(shard)
        self.lease = self.keys.lease(GROUP)
        self.final_order_ttl_s = final_order_ttl_s
        self.forget_after_s = max(final_order_ttl_s, fence_keep_s)
        self.holder = holder
        self.atomic = not isinstance(redis, RedisCluster)
        self.log = log.bind(shard=shard)
        # The checkpoint as this applier last read or wrote it (plain Redis; ``_APPLY`` checks it).
        self._checkpoint: str | None = None
        self._checkpoint_known = False
        self._checkpoint_n: int | None = None  # the checkpoint entry's chain number, when known
        self._sweep_at_ms = 0  # when ``expiring`` is next read
        self._levels = KnownLevels()
        self._sha: str | None = None

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
            ordered=False,  # applies the log from its checkpoint, whatever it is delivered
            idle=self.sweep_if_due,
        )
        self.holder = consumer.name
        return consumer

    async def handle(self, entries: list[Entry]) -> None:
        """Apply the log after the checkpoint up to the last delivered entry; then sweep when
        something may be due."""
        last = max((entry.id for entry in entries), key=entry_order)
        if self.atomic:  # the append step moves it too (``InlineProjection``)
            await self._read_checkpoint()
        delivered = self._next_in_log(entries)
        while await self._step(last, delivered):
            delivered = None
        await self.sweep_if_due()

    async def sweep_if_due(self) -> None:
        """Sweep when something may be due (after a batch, and when no entry came: the append
        step applies them while the projection is caught up, and moves its group past them)."""
        if now_ms() >= self._sweep_at_ms:
            await self.sweep()

    # ----------------------------------------------------------------- steps

    def _next_in_log(self, entries: list[Entry]) -> list[Entry] | None:
        """``entries`` in log order when they are exactly the log's entries after the checkpoint
        (their chain numbers follow the checkpoint's, one by one); else None."""
        if not (self.atomic and self._checkpoint_known and self._checkpoint_n is not None):
            return None
        if len(entries) > STEP_ENTRIES:
            return None
        ordered = sorted(entries, key=lambda entry: entry_order(entry.id))
        for expected, entry in enumerate(ordered, self._checkpoint_n + 1):
            if _chain_number(entry) != expected:
                return None
        return ordered

    async def _step(self, last: str, delivered: list[Entry] | None = None) -> bool:
        """Apply up to ``STEP_ENTRIES`` log entries after the checkpoint; False when none is left.

        Plain Redis: one ``_APPLY`` call checks the lease and that the checkpoint is still the one
        the writes were planned from, writes, and moves the checkpoint. Redis Cluster: one call
        per slot in one pipeline, then the checkpoint moved by a call of its own (which checks
        the lease) once every node has acknowledged the writes, so a reader waiting on the
        checkpoint sees its own write."""
        if not self._checkpoint_known:
            await self._read_checkpoint()
        planned_from = self._checkpoint
        writes = await self._writes(planned_from, last, delivered)
        if writes is None:
            self._checkpoint_known = self.atomic
            return False
        step_keys = _step_keys(self.keys)
        move = [self.holder or "", planned_from or "", writes.last_id, str(PROGRESS_KEEP)]
        if self.atomic:
            call = writes.calls.get(0) or _Call(_STEP_KEYS)
            (status,) = await self._apply([(call, step_keys, move)])
        else:
            await self._apply([(call, [], []) for call in writes.calls.values()])
            (status,) = await self._apply([(_Call(_STEP_KEYS), step_keys, move)])
        if status == _LEASE_LOST:
            self._checkpoint_known = False
            raise self._lease_lost(await self.redis.get(self.lease))
        if status == _MOVED:  # another applier moved it: read it again and go on from there
            self._checkpoint_known = False
            return True
        self._checkpoint, self._checkpoint_n = writes.last_id, writes.last_n
        if writes.scheduled:
            self._sweep_at_ms = min(self._sweep_at_ms, writes.forget_at_ms)
        return True

    async def _read_checkpoint(self) -> None:
        """The checkpoint as it is (kept in memory on a plain Redis), the lease checked; its chain
        number is known only while it is the checkpoint this applier last wrote."""
        checkpoint, holder = await self.redis.mget(self.keys.checkpoint, self.lease)
        self._check_holder(holder)
        if text(checkpoint) != self._checkpoint:
            self._checkpoint_n = None
        self._checkpoint, self._checkpoint_known = text(checkpoint), self.atomic

    async def _apply(self, calls: list[tuple[_Call, list[str], list[str]]]) -> list[int]:
        """Run ``_APPLY`` calls (writes, the keys before theirs, the arguments after them); several
        in one pipeline round trip."""
        commands = [
            (len(first) + len(call.keys), *first, *call.keys, _packer.encode(call.writes), *rest)
            for call, first, rest in calls
        ]
        try:
            return await self._send(commands)
        except redis_errors.NoScriptError:
            # The server lost its script cache (a restart, a failover): load it and send every
            # call again (writes that went through are refused the second time as old).
            await self._load_script()
            return await self._send(commands)

    async def _send(self, commands: list[tuple[Any, ...]]) -> list[int]:
        sha = self._sha or await self._load_script()
        # ``execute_command``, not ``evalsha``: redis-py's cluster pipeline refuses ``evalsha``,
        # while the raw command is routed by its keys (each call's keys are on one slot).
        if len(commands) == 1:
            return [int(await self.redis.execute_command("EVALSHA", sha, *commands[0]))]
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command("EVALSHA", sha, *command)
        return [int(result) for result in await pipe.execute()]

    async def _load_script(self) -> str:
        self._sha = str(await self.redis.script_load(_APPLY))
        return self._sha

    def _check_holder(self, holder: Any) -> None:
        if self.holder is not None and text(holder) != self.holder:
            raise self._lease_lost(holder)

    def _lease_lost(self, holder: Any) -> LeaseLost:
        return LeaseLost(f"{self.lease} is held by {text(holder)!r}, not by {self.holder!r}: checkpoint not moved")

    async def _writes(self, checkpoint: str | None, last: str, delivered: list[Entry] | None) -> _Writes | None:
        """The writes of the log entries after ``checkpoint`` up to ``last`` (None: none left):
        ``delivered`` when they are those entries (``_next_in_log``), else read from the log."""
        if checkpoint is not None and entry_order(checkpoint) >= entry_order(last):
            return None
        if delivered is not None:
            entries = delivered
        else:
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
        slot = None if self.atomic else self.redis.keyslot
        now = now_ms()
        writes = _Writes(
            entries[-1].id,
            now + self.final_order_ttl_s * 1000,
            now + self.forget_after_s * 1000,
            self.keys.expiring,
            slot,
        )
        writes.last_n = _chain_number(entries[-1])
        decoded = [event for _, event in events]
        plan(writes, events, await GridLevels.load(self.redis, decoded, self._levels))
        self._levels.learn(decoded)
        return writes

    async def sweep(self) -> int:
        """Carry out what is due in ``ShardKeys.expiring``; return how many items were done.
        Remembers when the next item is due (``handle`` sweeps again then, or after
        ``SWEEP_EVERY_MS`` for items another process scheduled)."""
        now = now_ms()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrangebyscore(self.keys.expiring, "-inf", now, 0, SWEEP_ITEMS)
        pipe.zrangebyscore(self.keys.expiring, f"({now}", "+inf", 0, 1, withscores=True)
        found, upcoming = await pipe.execute()
        due = [text(m) for m in found]
        self._sweep_at_ms = now if len(due) == SWEEP_ITEMS else now + SWEEP_EVERY_MS
        if upcoming:
            self._sweep_at_ms = min(self._sweep_at_ms, int(upcoming[0][1]))
        if not due:
            return 0
        items = [_scheduled(member) for member in due]
        watched = [item.gone for item in items if item.gone]
        pipe = self.redis.pipeline(transaction=False)
        for key in watched:
            pipe.pttl(key)
        ttls = dict(zip(watched, [int(t) for t in await pipe.execute()], strict=True)) if watched else {}
        done, later = [], {}
        pipe = self.redis.pipeline(transaction=False)
        for member, item in zip(due, items, strict=True):
            ttl = ttls.get(item.gone or "", -2)
            if ttl > 0:  # still readable (the clocks differ): look again when it expires
                later[member] = now + ttl
                continue
            if ttl == -2:  # gone (or nothing to wait for); a hash without TTL is no final order
                for key, member_id in item.remove:
                    pipe.srem(key, member_id)
                for key, fence_field in item.forget:
                    pipe.hdel(keys.fence(key), fence_field)
            done.append(member)
        await pipe.execute()
        # Only once the removals are done: a crash in between leaves the item to do again.
        if done:
            await self.redis.zrem(self.keys.expiring, *done)
        if later:
            await self.redis.zadd(self.keys.expiring, later)
            self._sweep_at_ms = min(self._sweep_at_ms, *later.values())
        self.log.info("expired live state removed", items=len(done), rescheduled=len(later))
        return len(done)


def plan(writes: Writes, events: Iterable[tuple[str, wire.Event]], grid: GridLevels) -> None:
    """The writes of events (entry id, event), in log order: the projection's pure core."""
    for entry_id, event in events:
        if isinstance(event, wire.PositionEvent):
            _position(writes, entry_id, event)
        elif not isinstance(event, wire.DriftEvent):  # a drift changes no live key
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
    writes.fenced(index, stamp, "srem", event.stream)
    writes.fenced(keys.ACTIVE_POSITIONS, stamp, "srem", event.stream)
    writes.fenced(keys.POSITION_KEYS, stamp, "hdel", event.stream)
    writes.later(Expiry(_POSITION, event.stream, event.user_id, event.exchange))


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
        writes.later(Expiry(_ORDER, event.stream, event.user_id, event.exchange, event.symbol))
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
    async def load(cls, redis: Any, events: Sequence[wire.Event], known: KnownLevels | None = None) -> GridLevels:
        """What ``events`` need: the level of each order they change (from the batch, ``known``,
        else its hash) and the holder of each level they touch."""
        levels = {
            e.stream: e.grid_level for e in events if isinstance(e, wire.OrderPlaced) and e.grid_level is not None
        }
        unseen = {e.stream for e in events if _is_order_update(e)} - {
            e.stream for e in events if isinstance(e, wire.OrderPlaced)
        }
        if known is not None:
            levels.update(known.levels_of(unseen))
            unseen -= known.levels.keys()
        unknown = sorted(unseen)
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


class KnownLevels:
    """The grid level (None: none) of the orders an applier saw placed and not yet final, at
    most ``KNOWN_LEVELS``: an order's level never changes, so a later event of the order needs no
    read of its hash to find it."""

    def __init__(self) -> None:
        self.levels: dict[str, int | None] = {}

    def levels_of(self, order_ids: Iterable[str]) -> dict[str, int]:
        return {o: level for o in order_ids if (level := self.levels.get(o)) is not None}

    def learn(self, events: Iterable[wire.Event]) -> None:
        for event in events:
            if isinstance(event, wire.OrderPlaced):
                self.levels[event.stream] = event.grid_level
            elif isinstance(event, wire.OrderChange) and event.status.is_final:
                self.levels.pop(event.stream, None)
        for order_id in list(itertools.islice(self.levels, max(0, len(self.levels) - KNOWN_LEVELS))):
            del self.levels[order_id]  # the oldest first (a dict keeps insertion order)


def _chain_number(entry: Entry) -> int | None:
    """The chain number of an event entry (its ``n`` field); None when it has none."""
    raw = text(entry.fields.get("n"))
    return int(raw) if raw is not None and raw.isascii() and raw.isdigit() else None


def _is_order_update(event: wire.Event) -> bool:
    return not isinstance(event, wire.PositionEvent | wire.OrderPlaced | wire.DriftEvent)


async def projection_role(redis: Any, settings: Settings) -> list[StreamConsumer]:
    """``ledger serve`` role ``projection``: one leased, fenced applier per shard."""
    return [
        LiveProjection(redis, shard, final_order_ttl_s=settings.final_order_ttl_s).consumer(
            ConsumerSettings.from_settings(settings)
        )
        for shard in range(settings.shards)
    ]
