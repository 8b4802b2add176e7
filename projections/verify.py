"""``ledger verify``: prove that the live projection and the PostgreSQL history agree with the log.

Every projection is rebuilt from the log with the live system's own code, never a second copy:
the log is read with ``ledger.store.log.read_log`` (both tiers), each event goes through
``projections.live.plan`` (the live projection's hash builders and GRID handling) into
``ExpectedLive``, an in-memory sink of the same writes, and through
``projections.projector.HistoryRows`` and ``ledger.domain.evolution.apply`` (the projector's row
builders and order folding) into the expected PostgreSQL rows.

**Lag is not a difference.** Each projection is compared up to the point of the log it has
applied: the live projection up to its checkpoint ``ledger:{s}:projection``, the history up to
the projector's ``projector_checkpoints`` row (read in the same REPEATABLE READ transaction as
the rows). The live projection moves while its keys are read, so a key that differs is read
again after the checkpoint moved (the expected state follows it), up to ``ROUNDS`` times; keys
that still differ once the checkpoint stands still are differences.

**What is compared.** In Redis, every key of CONTRACT §6 (positions, indexes, orders, order
sets, GRID keys) and the projection's own ``ledger:live:position-keys``, field by field, set
member by set member, and whether an order hash expires (final) or not (open); a key that the
live layout names but the log does not produce is a difference too (``extra``). Fences and the
retention schedule are bookkeeping, not state, and are not compared. A final order's hash (and
its id in ``orders:user:…``) may be gone once its retention has passed since the event that made
it final: that is expected, not a difference. In PostgreSQL, the ``positions``, ``orders`` and
``fills`` rows of the verified shards' users and the shards' ``ledger_events`` rows, column by
column (an archived event's ``data`` is decoded and compared with the event; rows of event types
this reader does not know are left alone).

**Repair** (``--repair``) rewrites the live keys that differ, only after they were shown. It is
safe while ``serve`` runs: it takes each shard's live-projection lease
(``ledger:{s}:lease:ledger-projection``), so the projection's holder stands by (its write in
flight fails its fence check: ``LeaseLost``) and the checkpoint stands still; it compares again
at that checkpoint and writes the expected content of each differing key, with the key's fences
set to the log's entry ids (so a writer that outlived its lease still cannot move it back, and
the projection's next events pass), each key in one script (atomic, also on a cluster). Then it
records the operation in ``ledger:ops`` and gives the lease back: the projection takes it again
at its next step and goes on from the same checkpoint. PostgreSQL is never repaired here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg.types.string import TextLoader
from redis.exceptions import ResponseError

from consumers.pause import paused
from ledger.domain import wire
from ledger.domain.evolution import DRIFT_SLOT_PREFIX, DriftState, apply, drift_slot
from ledger.domain.state import OrderState, StateError
from ledger.domain.values import RULES, now_ms
from ledger.errors import OperationFailed
from ledger.sqlfiles import load_queries
from ledger.store import keys
from ledger.store.eventstore import LIVE_WRITES_LUA, StoredEvent
from ledger.store.keys import ShardKeys, shard_of
from ledger.store.log import read_pages, without_cycle_collection
from ledger.store.operations import Operation, record_operation
from ledger.store.redis_conn import EntryKey, entry_order, entry_text, text
from projections import live
from projections.projector import PROJECTOR, HistoryRows, _Decoded, _order_row, checkpoint

__all__ = ["Difference", "ExpectedLive", "Report", "VenueReport", "verify", "verify_venue"]

REDIS = "redis"
POSTGRES = "postgres"
ABSENT = "(absent)"  # no such key, field, member or row
ROUNDS = 5  # reads of the differing live keys while the checkpoint moves
SETTLE_S = 0.2  # how long a checkpoint must stand still before a difference is final
READ_CHUNK = 500  # live keys per pipeline
HASH, SET, OTHER = "hash", "set", "other"

_SQL = load_queries("projections", "verify.sql")

# KEYS[1] a live key, KEYS[2] its fence. ARGV[1] the operation, ARGV[2] the member or hash field
# ('' for the whole key), ARGV[3] the fence: '-' left alone, '' field dropped, else an entry id;
# ARGV[4] expire-at (epoch ms) or '', ARGV[5..] the operands (field/value pairs of 'put', members
# of 'sput', the value of 'hset').
_REPAIR = (
    LIVE_WRITES_LUA
    + """
write(KEYS[1], ARGV[1], ARGV[2], ARGV, 5)
if ARGV[1] == 'put' and ARGV[4] ~= '' then
  redis.call('PEXPIREAT', KEYS[1], ARGV[4])
end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[2], ARGV[2])
elseif ARGV[3] ~= '-' then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
end
return 1
"""
)


@dataclass(frozen=True, slots=True)
class Difference:
    """One disagreement: a Redis key (``field``: a hash field, a set member, ``(ttl)``, or ``''``
    for the whole key) or a PostgreSQL row (``key`` is ``table id``, ``field`` a column)."""

    store: str
    key: str
    field: str
    expected: str
    found: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


# --------------------------------------------------------------------------- the expected live state


class ExpectedLive:
    """The live keys the log produces, in memory: a ``projections.live.Writes`` sink, fed by
    ``live.plan`` exactly as the live projection feeds Redis."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, str]] = {}
        self.sets: dict[str, set[str]] = {}
        self.final_ts: dict[str, int] = {}  # order hash -> ts of the event that made it final
        self.optional: dict[tuple[str, str], str] = {}  # (set, member) -> the hash whose expiry lets it go
        self.stamps: dict[str, dict[str, str]] = {}  # key -> fence field -> entry id of its last write

    def fenced(self, key: str, stamp: str, op: str, fence_field: str = "", *operands: str) -> None:
        self.stamps.setdefault(key, {})[fence_field] = stamp
        if op == "put":
            self.hashes[key] = dict(zip(operands[::2], operands[1::2], strict=True))
        elif op == "del":
            self.hashes.pop(key, None)
        elif op == "sadd":
            self.sets.setdefault(key, set()).add(fence_field)
        elif op == "srem":
            _discard(self.sets, key, fence_field)
        elif op == "hset":
            self.hashes.setdefault(key, {})[fence_field] = operands[0]
        else:
            _discard(self.hashes, key, fence_field)

    def order(self, key: str, event: wire.Event, fields: dict[str, str], final: bool = False) -> None:
        self.hashes.setdefault(key, {}).update(fields)
        if final:
            self.final_ts[key] = event.ts

    def later(self, expiry: live.Expiry) -> None:
        gone = expiry.gone
        for member in expiry.remove:
            if gone is not None:
                self.optional[member] = gone

    def kind(self, key: str) -> str | None:
        return HASH if key in self.hashes else SET if key in self.sets else None


def _discard(store: dict[str, Any], key: str, item: str) -> None:
    held = store.get(key)
    if held is None:
        return
    if isinstance(held, set):
        held.discard(item)
    else:
        held.pop(item, None)
    if not held:
        del store[key]


# --------------------------------------------------------------------------- replaying a shard


@dataclass
class _Replay:
    """One shard's log replayed so far: into the shared expected live state (up to ``live_to``)
    and into the expected history (up to ``history_to``)."""

    shard: int
    live_to: EntryKey = (0, 0)
    history_to: EntryKey = (0, 0)
    grid: live.GridLevels = field(default_factory=live.GridLevels)
    rows: HistoryRows = field(default_factory=HistoryRows)
    orders: dict[str, OrderState] = field(default_factory=dict)
    events: int = 0  # events read (an event both projections needed counts once)
    on_event: Callable[[], None] | None = None  # called after each event read (a progress bar)

    async def advance(
        self,
        redis: Any,
        conn: psycopg.AsyncConnection[Any] | None,
        expected: ExpectedLive,
        live_to: EntryKey,
        history_to: EntryKey,
    ) -> None:
        behind = [done for done, to in ((self.live_to, live_to), (self.history_to, history_to)) if to > done]
        if not behind:
            return
        start, end = min(behind), max(live_to, history_to)
        after = None if start == (0, 0) else entry_text(start)
        with without_cycle_collection():
            async with contextlib.aclosing(read_pages(redis, self.shard, conn=conn, after=after)) as pages:
                async for page in pages:
                    if self._page(page, expected, end, live_to, history_to):
                        break
        self.live_to, self.history_to = max(self.live_to, live_to), max(self.history_to, history_to)

    def _page(
        self,
        page: Sequence[StoredEvent],
        expected: ExpectedLive,
        end: EntryKey,
        live_to: EntryKey,
        history_to: EntryKey,
    ) -> bool:
        """Replay one page of the log; True once past ``end``."""
        for stored in page:
            key = entry_order(stored.entry_id)
            if key > end:
                return True
            self.events += 1
            if self.on_event is not None:
                self.on_event()
            if self.live_to < key <= live_to:
                live.plan(expected, [(stored.entry_id, stored.event)], self.grid)
            if self.history_to < key <= history_to:
                self._history(stored.entry_id, key, stored.event)
        return False

    def _history(self, entry_id: str, key: EntryKey, event: wire.Event) -> None:
        self.rows.add(self.shard, [_Decoded(entry_id, key, event.type, "", event)])
        self.rows.events[-1]["data"] = event  # compared with the archived JSON, decoded
        if not isinstance(event, wire.PositionEvent | wire.DriftEvent):
            state = apply(self.orders.get(event.stream), event)
            if not isinstance(state, OrderState):
                raise StateError(f"{event.type} of {event.stream} in entry {entry_id}: not an order event")
            self.orders[event.stream] = state


# --------------------------------------------------------------------------- the live keys


class _Layout(NamedTuple):
    kind: str  # HASH, SET or OTHER (a name in the live layout no key of it has)
    user: str | None  # the user whose shard owns the key (None: shared, or told by its content)
    shared: bool = False  # holds members of every shard
    fieldwise: bool = False  # a hash written field by field (each field fenced), not whole


def _layout(key: str) -> _Layout | None:
    """How the live layout (CONTRACT §6) names ``key``; None when it is no live key."""
    if key == keys.ACTIVE_POSITIONS:
        return _Layout(SET, None, shared=True)
    if key == keys.POSITION_KEYS:
        return _Layout(HASH, None, shared=True, fieldwise=True)
    parts = key.split(":")
    if parts[0] == "positions":
        if len(parts) == 4 and parts[1] == "index":
            return _Layout(SET, parts[2])
        return _Layout(HASH, parts[1]) if len(parts) >= 5 else _Layout(OTHER, None)
    if parts[0] == "orders":
        if len(parts) == 2:
            return _Layout(HASH, None)
        if len(parts) == 4 and parts[1] == "user":
            return _Layout(SET, parts[2])
        if len(parts) >= 4 and parts[1] == "open":
            return _Layout(SET, None, shared=True)
        if len(parts) >= 7 and parts[2] == "user" and parts[4] == "symbol":
            if parts[-1] in ("orders", "order_placed_index"):
                return _Layout(HASH, parts[3], fieldwise=True)
        return _Layout(OTHER, None)
    if len(parts) >= 7 and parts[1] == "user" and parts[3] == "symbol" and parts[-2] == "active_grid":
        return _Layout(HASH, parts[2])
    return None


@dataclass(frozen=True, slots=True)
class _Found:
    kind: str  # HASH, SET, "none", or the Redis type of a key of the wrong type
    content: Any  # dict (hash), set (set) or None
    pttl: int


@dataclass
class _Scope:
    """Which live keys and members belong to the verified shards."""

    shards: list[int]
    count: int  # every shard of the ledger

    @property
    def whole(self) -> bool:
        return len(self.shards) == self.count

    def owns_user(self, user: Any) -> bool:
        if self.whole or not isinstance(user, str) or not RULES["user_id"].matches(user):
            return True
        return shard_of(user, self.count) in self.shards

    async def owns_members(self, redis: Any, members: set[str]) -> set[str]:
        """The members of a shared key that are the verified shards' (or no shard's)."""
        if self.whole or not members:
            return members
        ordered = sorted(members)
        pipe = redis.pipeline(transaction=False)
        for member in ordered:
            for shard in range(self.count):
                pipe.hexists(ShardKeys(shard).orders, member)
                pipe.hexists(ShardKeys(shard).positions, member)
        held = await pipe.execute()
        owned = set()
        for i, member in enumerate(ordered):
            row = held[i * 2 * self.count : (i + 1) * 2 * self.count]
            owners = {shard for shard in range(self.count) if row[2 * shard] or row[2 * shard + 1]}
            if not owners or owners & set(self.shards):
                owned.add(member)
        return owned


async def _scan(redis: Any) -> set[str]:
    """Every key the live layout names (one SCAN of the keyspace, every node of a cluster)."""
    return {key for raw in [k async for k in redis.scan_iter(count=1000)] if _layout(key := text(raw)) is not None}


async def _read(redis: Any, wanted: dict[str, str]) -> dict[str, _Found]:
    """The content of live keys (``wanted``: key -> the kind expected)."""
    found: dict[str, _Found] = {}
    items = sorted(wanted.items())
    for start in range(0, len(items), READ_CHUNK):
        chunk = items[start : start + READ_CHUNK]
        pipe = redis.pipeline(transaction=False)
        for key, kind in chunk:
            if kind == HASH:
                pipe.hgetall(key)
            elif kind == SET:
                pipe.smembers(key)
            else:
                pipe.type(key)
            pipe.pttl(key)
        results = await pipe.execute(raise_on_error=False)
        for (key, kind), content, pttl in zip(chunk, results[0::2], results[1::2], strict=True):
            if isinstance(content, ResponseError) or kind == OTHER:  # WRONGTYPE, or a name no key has
                found[key] = _Found(text(await redis.type(key)), None, int(pttl))
            elif not content:
                found[key] = _Found("none", None, int(pttl))
            elif kind == HASH:
                found[key] = _Found(HASH, {text(f): text(v) for f, v in content.items()}, int(pttl))
            else:
                found[key] = _Found(SET, {text(m) for m in content}, int(pttl))
    return found


def _describe(kind: str, content: Any) -> str:
    if content is None:
        return ABSENT if kind == "none" else f"a {kind}"
    noun = "field" if kind == HASH else "member"
    return f"a {kind} of {len(content)} {noun}{'' if len(content) == 1 else 's'}"


class _LiveComparison:
    """Expected against found, key by key."""

    def __init__(self, expected: ExpectedLive, scope: _Scope, ttl_ms: int, now: int) -> None:
        self.expected = expected
        self.scope = scope
        self.ttl_ms = ttl_ms
        self.now = now

    def expired(self, key: str) -> bool:
        """A final order hash whose retention has passed: it may be gone."""
        final = self.expected.final_ts.get(key)
        return final is not None and final + self.ttl_ms <= self.now

    def wanted(self, scanned: Iterable[str]) -> dict[str, str]:
        wanted = {key: kind for key in scanned if (layout := _layout(key)) and (kind := layout.kind)}
        wanted.update((key, HASH) for key in self.expected.hashes)
        wanted.update((key, SET) for key in self.expected.sets)
        return wanted

    async def differences(self, redis: Any, found: dict[str, _Found]) -> list[Difference]:
        diffs: list[Difference] = []
        for key in sorted(found):
            diffs += await self.key(redis, key, found[key])
        return diffs

    async def key(self, redis: Any, key: str, found: _Found) -> list[Difference]:
        layout = _layout(key)
        if layout is not None and layout.shared and found.kind == HASH:  # only the verified shards' fields
            expected = self.expected.hashes.get(key, {})
            owned = await self.scope.owns_members(redis, found.content.keys() - expected.keys())
            content = {name: value for name, value in found.content.items() if name in expected or name in owned}
            found = _Found(HASH if content else "none", content or None, found.pttl)
        kind = self.expected.kind(key)
        if kind is None:
            return await self._extra(redis, key, found)
        if kind == SET:
            if found.kind not in (SET, "none"):
                return [
                    Difference(REDIS, key, "", _describe(SET, self.expected.sets[key]), _describe(found.kind, None))
                ]
            return await self._set(redis, key, found.content or set())
        return self._hash(key, found)

    async def _extra(self, redis: Any, key: str, found: _Found) -> list[Difference]:
        """A key the log does not produce (or no longer holds)."""
        layout = _layout(key)
        if found.kind == "none" or layout is None:
            return []
        user = layout.user
        if user is None and found.kind == HASH:
            user = found.content.get("user_id")  # an order hash says whose it is
        if not layout.shared and not self.scope.owns_user(user):
            return []
        if layout.kind == found.kind == SET:
            return await self._set(redis, key, found.content)
        if layout.fieldwise and found.kind == HASH:
            return self._fields(key, {}, found.content)
        return [Difference(REDIS, key, "", ABSENT, _describe(found.kind, found.content))]

    async def _set(self, redis: Any, key: str, members: set[str]) -> list[Difference]:
        expected = self.expected.sets.get(key, set())
        layout = _layout(key)
        extra = members - expected
        if layout is not None and layout.shared:  # only the verified shards' members
            extra = await self.scope.owns_members(redis, extra)
        missing = {m for m in expected - members if not self._optional(key, m)}
        diffs = [Difference(REDIS, key, m, "member", ABSENT) for m in missing]
        diffs += [Difference(REDIS, key, m, ABSENT, "member") for m in extra]
        return sorted(diffs, key=lambda d: d.field)

    def _optional(self, key: str, member: str) -> bool:
        gone = self.expected.optional.get((key, member))
        return gone is not None and self.expired(gone)

    def _hash(self, key: str, found: _Found) -> list[Difference]:
        expected = self.expected.hashes[key]
        if found.kind == "none":
            return [] if self.expired(key) else [Difference(REDIS, key, "", _describe(HASH, expected), ABSENT)]
        if found.kind != HASH:
            return [Difference(REDIS, key, "", _describe(HASH, expected), _describe(found.kind, None))]
        diffs = self._fields(key, expected, found.content)
        if _layout(key) == _Layout(HASH, None):  # an order hash: final ones expire, open ones never
            expires = key in self.expected.final_ts
            if expires != (found.pttl >= 0):
                ttl = f"{found.pttl} ms" if found.pttl >= 0 else "never"
                diffs.append(Difference(REDIS, key, "(ttl)", "expires" if expires else "never", ttl))
        return diffs

    def _fields(self, key: str, expected: dict[str, str], found: dict[str, str]) -> list[Difference]:
        return [
            Difference(REDIS, key, name, expected.get(name, ABSENT), found.get(name, ABSENT))
            for name in sorted(expected.keys() | found.keys())
            if expected.get(name) != found.get(name)
        ]


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class _History:
    """The PostgreSQL history as read: rows by table and id, and the projector's checkpoints."""

    checkpoints: dict[int, EntryKey]
    positions: dict[str, dict[str, Any]]
    orders: dict[str, dict[str, Any]]
    fills: dict[str, dict[str, Any]]
    archive: dict[str, dict[str, Any]]


def _fill_id(row: dict[str, Any]) -> str:
    return f"{row['order_id']}/{row['fill_id']}"


async def _read_history(conn: psycopg.AsyncConnection[Any], scope: _Scope) -> _History:
    """Rows and checkpoints in one snapshot (REPEATABLE READ), so they agree with each other."""
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        checkpoints = {}
        for shard in scope.shards:
            applied = await checkpoint(conn, shard, PROJECTOR)
            checkpoints[shard] = entry_order(applied) if applied else (0, 0)
        async with conn.cursor(row_factory=dict_row) as cur:
            cur.adapters.register_loader("uuid", TextLoader)  # ids as the row builders give them
            tables: dict[str, list[dict[str, Any]]] = {}
            for table in ("positions", "orders", "fills"):
                await cur.execute(_SQL[table])
                tables[table] = [row for row in await cur.fetchall() if scope.owns_user(row["user_id"])]
            await cur.execute(_SQL["archive"], {"shards": scope.shards})
            archive = [
                row
                for row in await cur.fetchall()
                if row["type"] in wire.EVENT_TYPES
                and (int(row["entry_ms"]), int(row["entry_seq"])) <= checkpoints[int(row["shard"])]
            ]
    return _History(
        checkpoints,
        {str(row["id"]): row for row in tables["positions"]},
        {str(row["id"]): row for row in tables["orders"]},
        {_fill_id(row): row for row in tables["fills"]},
        {f"{row['shard']}/{row['entry_id']}": row for row in archive},
    )


def _plain(value: Any) -> Any:
    """A column value comparable across the two sides: JSON as parsed JSON."""
    if isinstance(value, Jsonb):
        value = value.obj
    if isinstance(value, dict | list):
        return json.loads(json.dumps(value, default=str))
    return value


def _show(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _same(expected: Any, found: Any) -> bool:
    if isinstance(expected, Decimal) and isinstance(found, Decimal):
        return expected == found  # numerically: NUMERIC keeps the scale it was given
    return bool(expected == found)


def _rows(table: str, expected: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]]) -> list[Difference]:
    diffs = []
    for row_id in sorted(expected.keys() | found.keys()):
        want, have = expected.get(row_id), found.get(row_id)
        name = f"{table} {row_id}"
        if want is None or have is None:
            diffs.append(Difference(POSTGRES, name, "", "row" if want else ABSENT, "row" if have else ABSENT))
            continue
        for column, value in want.items():
            if column == "data":  # an archived event: its JSON decoded, compared with the event
                if _archived_event(have) != value:
                    diffs.append(Difference(POSTGRES, name, column, wire.encode(value).decode(), have[column]))
                continue
            found_value = have.get(column)
            if value == found_value:  # the common case, at once (ids are read as text)
                continue
            if not _same(_plain(value), _plain(found_value)):
                diffs.append(Difference(POSTGRES, name, column, _show(_plain(value)), _show(_plain(found_value))))
    return diffs


def _archived_event(row: dict[str, Any]) -> Any:
    try:
        return wire.decode_event(row["type"], row["data"])
    except wire.WireError as exc:
        return f"undecodable: {exc}"


def _expected_history(replays: list[_Replay]) -> dict[str, dict[str, dict[str, Any]]]:
    positions: dict[str, dict[str, Any]] = {}
    orders: dict[str, dict[str, Any]] = {}
    fills: dict[str, dict[str, Any]] = {}
    archive: dict[str, dict[str, Any]] = {}
    for replay in replays:
        positions.update(replay.rows.positions)
        for order_id in replay.rows.final_orders:
            row = _order_row(replay.orders[order_id])
            orders[order_id] = {**row, "metadata": Jsonb(row["metadata"])}
        fills.update((_fill_id(row), row) for row in replay.rows.fills)
        archive.update((f"{replay.shard}/{row['entry_id']}", row) for row in replay.rows.events)
    return {"positions": positions, "orders": orders, "fills": fills, "ledger_events": archive}


# --------------------------------------------------------------------------- the whole check


@dataclass
class Report:
    shards: dict[int, dict[str, str | None]]  # shard -> the checkpoints compared at
    events: int
    seconds: float
    differences: list[Difference]
    repaired: int | None = None  # live differences rewritten (None: no repair asked)

    @property
    def ok(self) -> bool:
        return not self.differences

    @property
    def events_per_s(self) -> int:
        return round(self.events / self.seconds) if self.seconds > 0 else self.events

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "shards": {str(s): c for s, c in self.shards.items()},
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "events_per_s": self.events_per_s,
            "differences": [d.as_dict() for d in self.differences],
            "repaired": self.repaired,
        }

    def summary(self) -> str:
        points = "; ".join(
            f"shard {s}: live at {c['live'] or 'nothing'}, history at {c['history'] or 'nothing'}"
            for s, c in self.shards.items()
        )
        verdict = "agree with the log" if self.ok else f"{len(self.differences)} differences from the log"
        line = f"live state and history {verdict} ({points}; {self.events} events in {self.seconds:.2f} s, "
        line += f"{self.events_per_s} events/s)"
        if self.repaired is not None:
            line += f"\nrepaired {self.repaired} live differences"
            if any(d.store == POSTGRES for d in self.differences):
                line += "; PostgreSQL differences are not repaired by verify"
        return line


async def _live_checkpoints(redis: Any, shards: list[int]) -> dict[int, EntryKey]:
    pipe = redis.pipeline(transaction=False)
    for shard in shards:
        pipe.get(ShardKeys(shard).checkpoint)
    values = await pipe.execute()
    return {shard: entry_order(text(v)) if v else (0, 0) for shard, v in zip(shards, values, strict=True)}


class _Verifier:
    def __init__(
        self, redis: Any, conn: psycopg.AsyncConnection[Any] | None, scope: _Scope, final_order_ttl_s: int
    ) -> None:
        self.redis = redis
        self.conn = conn
        self.scope = scope
        self.expected = ExpectedLive()
        self.replays = {shard: _Replay(shard) for shard in scope.shards}
        self.ttl_ms = final_order_ttl_s * 1000
        self.recorded: Operation | None = None  # what ``repair`` recorded in ledger:ops

    async def advance(self, live_to: dict[int, EntryKey], history_to: dict[int, EntryKey] | None = None) -> None:
        for shard, replay in self.replays.items():
            history = replay.history_to if history_to is None else history_to[shard]
            await replay.advance(self.redis, self.conn, self.expected, live_to[shard], history)

    def comparison(self) -> _LiveComparison:
        return _LiveComparison(self.expected, self.scope, self.ttl_ms, now_ms())

    async def live(self, checkpoints: dict[int, EntryKey]) -> tuple[list[Difference], dict[int, EntryKey]]:
        """The live differences at the checkpoints, read again while the checkpoints move."""
        compare = self.comparison()
        found = await _read(self.redis, compare.wanted(await _scan(self.redis)))
        diffs = await compare.differences(self.redis, found)
        for _round in range(ROUNDS):
            if not diffs:
                break
            moved = await _live_checkpoints(self.redis, self.scope.shards)
            if moved == checkpoints:
                await asyncio.sleep(SETTLE_S)
                moved = await _live_checkpoints(self.redis, self.scope.shards)
                if moved == checkpoints:
                    break
            checkpoints = moved
            await self.advance(checkpoints)
            compare = self.comparison()
            found = await _read(self.redis, compare.wanted({d.key for d in diffs}))
            diffs = await compare.differences(self.redis, {d.key: found[d.key] for d in diffs})
        return diffs, checkpoints

    async def repair(
        self, diffs: list[Difference], action: str = "repair", reason: str = "ledger verify --repair"
    ) -> int:
        """Rewrite the differing live keys under the projection's leases (see the module doc);
        record ``action`` in ``ledger:ops``. Return how many differences were rewritten."""
        leases = [ShardKeys(shard).lease(live.GROUP) for shard in self.scope.shards]
        async with paused(self.redis, leases, f"ledger-{action}"):
            frozen = await _live_checkpoints(self.redis, self.scope.shards)
            await self.advance(frozen)
            compare = self.comparison()
            wanted = compare.wanted({d.key for d in diffs} | await _scan(self.redis))
            now_diffs = await compare.differences(self.redis, await _read(self.redis, wanted))
            pipe = self.redis.pipeline(transaction=False)
            for diff in now_diffs:
                pipe.execute_command("EVAL", _REPAIR, 2, diff.key, keys.fence(diff.key), *self._repair_args(diff))
            await pipe.execute()
            self.recorded = await record_operation(
                self.redis,
                action,
                ",".join(ShardKeys(shard).checkpoint for shard in self.scope.shards),
                reason,
                {
                    "differences": [d.as_dict() for d in now_diffs],
                    "checkpoints": {str(s): entry_text(c) for s, c in frozen.items()},
                },
            )
            return len(now_diffs)

    def _repair_args(self, diff: Difference) -> list[str]:
        """The ``_REPAIR`` arguments that give a key (a member, a field) its expected value, its
        fence the entry id of the log's last write there ('' drops a fence no event wrote)."""
        key, expected = diff.key, self.expected
        stamps = expected.stamps.get(key, {})
        layout = _layout(key) or _Layout(OTHER, None)
        if key in expected.sets or (layout.kind == SET and key not in expected.hashes):
            if not diff.field:  # a key of another type
                return ["sput", "", "-", "", *sorted(expected.sets.get(key, ()))]
            return ["sadd" if diff.expected == "member" else "srem", diff.field, stamps.get(diff.field, ""), ""]
        fields = expected.hashes.get(key)
        if layout.fieldwise and diff.field:
            value = (fields or {}).get(diff.field)
            if value is None:
                return ["hdel", diff.field, stamps.get(diff.field, ""), ""]
            return ["hset", diff.field, stamps.get(diff.field, ""), "", value]
        if fields is None:
            return ["del", "", stamps.get("", ""), ""]
        final = expected.final_ts.get(key)
        expire = "" if final is None else str(final + self.ttl_ms)
        return ["put", "", stamps.get("", "-"), expire, *live._pairs(fields)]


async def verify(
    redis: Any,
    conn: psycopg.AsyncConnection[Any],
    shards: list[int],
    shard_count: int,
    *,
    repair: bool = False,
    final_order_ttl_s: int = live.FINAL_ORDER_TTL_S,
) -> Report:
    """Compare the live projection and the history of ``shards`` with the log (see the module
    doc); with ``repair``, rewrite the live keys that differ afterwards."""
    started = time.perf_counter()
    scope = _Scope(sorted(shards), shard_count)
    verifier = _Verifier(redis, conn, scope, final_order_ttl_s)
    history = await _read_history(conn, scope)
    live_at = await _live_checkpoints(redis, scope.shards)
    await verifier.advance(live_at, history.checkpoints)
    expected = _expected_history(list(verifier.replays.values()))
    diffs = []
    for table in ("positions", "orders", "fills", "ledger_events"):
        found = history.archive if table == "ledger_events" else getattr(history, table)
        diffs += _rows(table, expected[table], found)
    live_diffs, live_at = await verifier.live(live_at)
    report = Report(
        {
            shard: {
                "live": entry_text(live_at[shard]) if live_at[shard] != (0, 0) else None,
                "history": entry_text(history.checkpoints[shard]) if history.checkpoints[shard] != (0, 0) else None,
            }
            for shard in scope.shards
        },
        sum(r.events for r in verifier.replays.values()),
        0.0,
        live_diffs + diffs,
    )
    report.seconds = time.perf_counter() - started
    if repair:
        report.repaired = await verifier.repair(live_diffs) if live_diffs else 0
    return report


# --------------------------------------------------------------------------- verify --venue


@dataclass
class VenueReport:
    """``ledger verify --venue``: the drifts the log leaves open (folded from every drift event of
    the verified shards, both tiers) and where a shard's drift slots disagree with the log."""

    open: list[DriftState]
    differences: list[Difference]
    events: int  # drift events folded

    @property
    def ok(self) -> bool:
        return not self.open and not self.differences

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "open": [_open_drift(drift) for drift in self.open],
            "differences": [d.as_dict() for d in self.differences],
            "drift_events": self.events,
        }

    def lines(self) -> list[str]:
        """One line per open drift, then the summary."""
        found = [
            f"drift {d.id}: user {d.user_id}, {d.exchange} {d.market}, {d.kind}, "
            f"evidence {json.dumps(d.evidence, sort_keys=True, separators=(',', ':'))}, event {d.detected_event_id}"
            for d in self.open
        ]
        if self.ok:
            return [f"no drift open ({self.events} drift events)"]
        return [
            *found,
            f"{len(self.open)} drifts unresolved, {len(self.differences)} slot differences: correct a position "
            "with adjust_position or close a drift with resolve_drift (`ledger submit`), then verify again",
        ]


def _open_drift(drift: DriftState) -> dict[str, Any]:
    return {
        "id": drift.id,
        "user_id": drift.user_id,
        "exchange": drift.exchange,
        "market": drift.market,
        "kind": drift.kind,
        "evidence": drift.evidence,
        "event_id": drift.detected_event_id,
    }


async def _drifts_of(
    redis: Any, conn: psycopg.AsyncConnection[Any] | None, shard: int
) -> tuple[dict[str, DriftState], dict[str, str], int]:
    """The shard's drifts folded from its log, its drift slots, and the drift events folded; read
    until the log's newest entry stands still across the read of the slots (an append writes its
    events and its slots in one step, so then the two describe the same log)."""
    shard_keys = ShardKeys(shard)
    drifts: dict[str, DriftState] = {}
    folded, after = 0, None
    for _round in range(ROUNDS):
        with without_cycle_collection():
            async with contextlib.aclosing(read_pages(redis, shard, conn=conn, after=after)) as pages:
                async for page in pages:
                    for stored in page:
                        if isinstance(stored.event, wire.DriftEvent):
                            drift = apply(drifts.get(stored.event.stream), stored.event)
                            drifts[stored.event.stream] = drift  # type: ignore[assignment]
                            folded += 1
                    after = page[-1].entry_id
        slots = {
            text(name) or "": text(value) or ""
            for name, value in (await redis.hgetall(shard_keys.slots)).items()
            if (text(name) or "").startswith(DRIFT_SLOT_PREFIX)
        }
        newest = await redis.xrevrange(shard_keys.events, count=1)
        if not newest or text(newest[0][0]) == after:
            return drifts, slots, folded
    raise OperationFailed(f"the log of shard {shard} kept moving while its drift slots were read: verify again")


async def verify_venue(redis: Any, conn: psycopg.AsyncConnection[Any] | None, shards: list[int]) -> VenueReport:
    """Fold the drift events of ``shards`` (see ``VenueReport``); compare each shard's drift slots
    (``ledger:{s}:slots``, fields ``drift|…``) with the drifts the log leaves open."""
    report = VenueReport([], [], 0)
    for shard in shards:
        drifts, found, folded = await _drifts_of(redis, conn, shard)
        report.events += folded
        still_open = [d for d in drifts.values() if d.status == "open"]
        report.open += still_open
        expected = {drift_slot(d.user_id, d.exchange, d.market, d.kind): d.id for d in still_open}
        key = ShardKeys(shard).slots
        report.differences += [
            Difference(REDIS, key, slot, expected.get(slot, ABSENT), found.get(slot, ABSENT))
            for slot in sorted(expected.keys() | found.keys())
            if expected.get(slot) != found.get(slot)
        ]
    return report
