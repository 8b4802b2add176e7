"""The event store of one shard: atomic appends with optimistic concurrency, snapshots, reads.

An append writes, in one server-side step on the shard's keys only (so it runs on Redis
Cluster): the events (XADD, each chained by hash to the one before it and the chain's head
moved: ``ledger.store.chain``), the resulting snapshots of the aggregates they change, the
open-position slots, the user's new concurrency token, the command's outcome for deduplication
and its reply (DEL + RPUSH + EXPIRE). It refuses with ``conflict`` when the user's token moved
since the state was loaded (another handler got there first), and answers ``duplicate`` with the
first outcome when the command was handled before, however long ago. When that outcome was
compacted (``projections.compact``: the reply moved to PostgreSQL, its fingerprint and digest
to the archived index, ``ledger.store.archived``) it answers ``archived`` and records the
duplicate in ``ledger:{s}:outcomes:waiting`` with its marker; the handler's ``OutcomeReader``
writes the reply from PostgreSQL with ``answer_waiting``.

On a plain Redis the append step also makes the live projection's writes of the events while
the projection is caught up (``InlineWrites``, given by the composition root:
``projections.live.InlineProjection``).

A batch of appends (``append_many``) is one script call with the batch packed in one msgpack
argument; each append in it keeps its own atomic step and outcome, in order.

Loading state reads snapshots by id (HMGET), never the log.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Generic, Literal, Protocol, TypeVar

import msgspec
import structlog
from redis.exceptions import NoScriptError

from ledger.defaults import BLOCK_MS, REPLY_TTL_S
from ledger.domain import wire
from ledger.domain.decider import Requirements
from ledger.domain.state import Book, OrderState, PositionState
from ledger.store.archived import ARCHIVED_LUA, ArchivedIndex, Generation, digest, fingerprint
from ledger.store.keys import ShardKeys, outcome_field, outcome_ids
from ledger.store.redis_conn import text

log = structlog.get_logger("ledger.store.eventstore")
# The writes of the legacy live keys (``live_writes``): the live projection's step runs them, and
# so does the append step while the projection is caught up (``InlineProjection``).
LIVE_WRITES_LUA = resources.files("ledger.store").joinpath("lua/live_writes.lua").read_text()
APPEND_LUA = ARCHIVED_LUA + LIVE_WRITES_LUA + resources.files("ledger.store").joinpath("lua/append.lua").read_text()
# How a compacted outcome is named to its waiting duplicates: this prefix (a reply is JSON and
# starts with "{"; the scripts test the same character) and the hex digits of the reply's digest
# (``archived.digest``), which the reply read back from PostgreSQL must match before it is given.
MARKER_PREFIX = "~"
# A script call holds Redis for its whole run: at most this many appends per call (about 15 ms of
# Redis time on the 2-core development VM), so a large LEDGER_BATCH_SIZE never stalls other clients
# for long. The default batch (256) is one call.
APPEND_CHUNK = 256

# KEYS[1] waiting duplicates, KEYS[2] reply list. ARGV[1] outcome field, ARGV[2] its marker,
# ARGV[3] the reply, ARGV[4] reply TTL seconds. The reply is written (DEL + RPUSH + EXPIRE, as the
# append step does) only while the duplicate still waits with that marker; returns 1 if written.
_ANSWER_WAITING_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[2])
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1] order snapshots, KEYS[2] position snapshots, KEYS[3] final orders, KEYS[4] final
# positions, KEYS[5] the commands set aside, KEYS[6] the commands stream. ARGV[1] how many states
# follow, each as kind ('o' or 'p'), id, snapshot JSON, '1' when final (else ''); then the ids
# of set-aside entries to publish again. Each state is written only where its id has none (a
# newer state wins); a final one written is due for compaction from now (Redis's clock), not
# from its old time, so no pass moves it out again before its commands are decided. Each entry
# goes back to the commands stream without its cold_* fields and leaves KEYS[5], in order.
# Returns how many went.
_REHYDRATE_LUA = """
local n = tonumber(ARGV[1])
local time = redis.call('TIME')
local now = time[1] * 1000 + math.floor(time[2] / 1000)
for i = 0, n - 1 do
  local kind, id, json, final = ARGV[2 + 4 * i], ARGV[3 + 4 * i], ARGV[4 + 4 * i], ARGV[5 + 4 * i]
  local hash, finals = KEYS[1], KEYS[3]
  if kind == 'p' then
    hash, finals = KEYS[2], KEYS[4]
  end
  if redis.call('HSETNX', hash, id, json) == 1 and final ~= '' then
    redis.call('ZADD', finals, now, id)
  end
end
local sent = 0
for j = 2 + 4 * n, #ARGV do
  local found = redis.call('XRANGE', KEYS[5], ARGV[j], ARGV[j])[1]
  if found then
    local fields, out = found[2], {}
    for k = 1, #fields, 2 do
      if fields[k] ~= 'cold_entry' and fields[k] ~= 'cold_ids' then
        out[#out + 1] = fields[k]
        out[#out + 1] = fields[k + 1]
      end
    end
    redis.call('XADD', KEYS[6], '*', unpack(out))
    redis.call('XDEL', KEYS[5], ARGV[j])
    sent = sent + 1
  end
end
return sent
"""

_encoder = msgspec.json.Encoder()
_batch_encoder = msgspec.msgpack.Encoder()


S = TypeVar("S", bound=msgspec.Struct)


class SnapshotCodec(Generic[S]):
    """The JSON of a state with every field whose JSON is its default's left out: it decodes to
    that default (``decode``, wherever a snapshot is read), so a snapshot holds only what
    differs (an order placed without options: 580 -> 270 bytes). The same rule writes the full
    snapshots of the append step and the compact ones of ``projections.compact`` (``fields``:
    the kept subset; ``extra``: fields no state has)."""

    __slots__ = ("names", "defaults", "decode")

    def __init__(self, cls: type[S]) -> None:
        self.decode: Callable[[bytes | str], S] = msgspec.json.Decoder(cls).decode
        self.names = tuple(info.name for info in msgspec.structs.fields(cls))
        # Each default as JSON's builtins (a Decimal as its text, an enum as its value): two
        # builtins of one field's type are equal exactly when their JSON is.
        self.defaults: dict[str, Any] = {}
        for info in msgspec.structs.fields(cls):
            if info.default is not msgspec.NODEFAULT:
                self.defaults[info.name] = msgspec.to_builtins(info.default)
            elif info.default_factory is not msgspec.NODEFAULT:
                self.defaults[info.name] = msgspec.to_builtins(info.default_factory())

    def encode(self, state: msgspec.Struct, fields: Iterable[str] | None = None, **extra: Any) -> bytes:
        values = msgspec.to_builtins(state)
        defaults = self.defaults
        kept = {
            name: values[name]
            for name in (self.names if fields is None else fields)
            if name not in defaults or values[name] != defaults[name]
        }
        kept.update(extra)
        return _encoder.encode(kept)


ORDER_SNAPSHOT = SnapshotCodec(OrderState)
POSITION_SNAPSHOT = SnapshotCodec(PositionState)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event read back from the log with its stream entry id."""

    entry_id: str
    event: wire.Event


@dataclass(slots=True)
class Append:
    """One command's outcome, ready to be written."""

    user_id: str
    command_id: str
    expected_token: str
    new_token: str
    reply: wire.Reply
    events: Sequence[wire.Event] = ()
    orders: dict[str, OrderState] = field(default_factory=dict)
    positions: dict[str, PositionState] = field(default_factory=dict)
    slots: dict[str, str | None] = field(default_factory=dict)


class InlineWrites(Protocol):
    """The live projection's writes of a chunk of appends, for the append step to make itself
    (``lua/append.lua``, ARGV[5..7]): given the chunk and how many keys come before theirs, the
    keys to declare (the projection's checkpoint, lease and progress stream, then the live keys)
    and the arguments (the writes, how the projection's consumers' names begin, how many entries
    its progress stream keeps, its consumer group), or None to leave the chunk to the projection. The script makes
    the writes only while the projection is caught up (its rule, checked in the same atomic
    step). ``projections.live.InlineProjection`` is the one."""

    def __call__(self, appends: Sequence[Append], offset: int) -> tuple[list[str], list[Any]] | None: ...


# Reads the states of archived orders and positions by id (``ledger.store.log.aggregate_reader``).
ArchiveReader = Callable[[Sequence[str]], Awaitable[dict[str, OrderState | PositionState]]]


@dataclass(frozen=True, slots=True)
class Loaded:
    tokens: dict[str, str]  # the users' tokens read first
    cold: set[str]  # aggregates absent from the snapshots because they are archived


@dataclass(frozen=True, slots=True)
class AppendResult:
    status: Literal["ok", "duplicate", "archived", "conflict"]
    reply: str  # the reply; the marker when archived; the current token on a conflict


def outcome_marker(reply: bytes) -> str:
    """The marker of a compacted outcome (``ledger:{s}:outcomes:waiting`` holds it for a duplicate)."""
    return MARKER_PREFIX + digest(reply).hex()


def reply_head(reply: wire.Reply) -> bytes:
    """The reply's JSON up to its ``events`` list, which the script fills with entry ids."""
    encoded = wire.encode(msgspec.structs.replace(reply, events=[]) if reply.events else reply)
    if not encoded.endswith(b'"events":[]}'):
        raise RuntimeError(f"a reply must end with its events list to be completed by the script: {encoded!r}")
    return encoded[: -len(b"[]}")]


class EventStore:
    """Reads and writes one shard's log and state. ``redis`` is a plain or cluster client."""

    def __init__(
        self,
        redis: Any,
        shard: int,
        *,
        reply_ttl_s: int = REPLY_TTL_S,
        archive: ArchiveReader | None = None,
        live: InlineWrites | None = None,
    ) -> None:
        self.redis = redis
        # The live projection's writes, made by each append while the projection is caught up
        # (plain Redis only: the live keys have no hash tag); without it the projection makes them.
        self.live = live
        # Reads orders and positions compaction moved to PostgreSQL (``ledger.store.log.aggregate_reader``),
        # for ``order`` and ``position``; without it they answer None for those.
        self.archive = archive
        self.keys = ShardKeys(shard)
        self.reply_ttl_s = reply_ttl_s
        self.index = ArchivedIndex(self.keys.archived)
        self.cold_index = ArchivedIndex(self.keys.cold)
        self._sha: str | None = None

    # ----------------------------------------------------------------- state

    async def load(self, book: Book, missing: Requirements, tokens_of: Sequence[str] = ()) -> Loaded:
        """Fill the book with what is missing (absent aggregates are recorded as None), in one
        round trip; with ``tokens_of``, read those users' tokens first in it and return them
        (``tokens``: state read after a token is at least as new as it). An aggregate absent
        from the snapshots is looked up in the archived aggregates' index (a second round trip,
        only then): one found there is ``cold`` (its state is in PostgreSQL only)."""
        order_ids, position_ids, slots = (sorted(x) for x in (missing.order_ids, missing.position_ids, missing.slots))
        pipe = self.redis.pipeline(transaction=False)
        users = sorted(set(tokens_of))
        if users:
            pipe.hmget(self.keys.sequence, users)
        if order_ids:
            pipe.hmget(self.keys.orders, order_ids)
        if position_ids:
            pipe.hmget(self.keys.positions, position_ids)
        if slots:
            pipe.hmget(self.keys.slots, slots)
        results = iter(await pipe.execute())
        tokens = {user: text(value) or "" for user, value in zip(users, next(results), strict=True)} if users else {}
        if order_ids:
            for oid, raw in zip(order_ids, next(results), strict=True):
                book.orders[oid] = ORDER_SNAPSHOT.decode(raw) if raw else None
        if position_ids:
            for pid, raw in zip(position_ids, next(results), strict=True):
                book.positions[pid] = POSITION_SNAPSHOT.decode(raw) if raw else None
        if slots:
            for slot, value in zip(slots, next(results), strict=True):
                book.slots[slot] = text(value) or None
        absent = [i for i in order_ids if book.orders[i] is None] + [
            i for i in position_ids if book.positions[i] is None
        ]
        return Loaded(tokens, await self.archived_aggregates(absent) if absent else set())

    async def archived_aggregates(self, ids: Sequence[str]) -> set[str]:
        """Which of these ids are in the archived aggregates' index. The generation is read
        after the buckets: when it is the one they were computed with, no split came before
        they were read (splits only move forward); else they are read again with it."""
        fingerprints = [fingerprint(i) for i in ids]
        index = self.cold_index

        async def call() -> tuple[Generation, list[Any], Generation]:
            seen = index.generation
            pipe = self.redis.pipeline(transaction=False)
            for fp in fingerprints:
                pipe.hexists(index.bucket(fp), fp)
            pipe.hmget(index.meta, ["level", "split"])
            *found, (level, split) = await pipe.execute()
            return seen, found, Generation.of(level, split)

        _seen, found, _current = await index.current(call, lambda r: None if r[0] == r[2] else str(r[2]))
        return {i for i, hit in zip(ids, found, strict=True) if hit}

    async def outcomes(self, fields: Sequence[str]) -> list[str | None]:
        if not fields:
            return []
        return [text(v) for v in await self.redis.hmget(self.keys.outcomes, list(fields))]

    async def order(self, order_id: str) -> OrderState | None:
        raw = await self.redis.hget(self.keys.orders, order_id)
        state = ORDER_SNAPSHOT.decode(raw) if raw else await self._archived(order_id)
        return state if isinstance(state, OrderState) else None

    async def position(self, position_id: str) -> PositionState | None:
        raw = await self.redis.hget(self.keys.positions, position_id)
        state = POSITION_SNAPSHOT.decode(raw) if raw else await self._archived(position_id)
        return state if isinstance(state, PositionState) else None

    async def _archived(self, aggregate_id: str) -> OrderState | PositionState | None:
        """An aggregate compaction moved to PostgreSQL, read back (needs ``archive``)."""
        if self.archive is None or not await self.archived_aggregates([aggregate_id]):
            return None
        return (await self.archive([aggregate_id])).get(aggregate_id)

    # ----------------------------------------------------------------- writes

    async def _load_script(self) -> str:
        self._sha = await self.redis.script_load(APPEND_LUA)
        return self._sha

    async def append_many(self, appends: Sequence[Append]) -> list[AppendResult]:
        """Append a batch in one script call (``lua/append.lua``) per ``APPEND_CHUNK`` appends,
        each append atomic on its own and in order; one result per append."""
        results: list[AppendResult] = []
        for start in range(0, len(appends), APPEND_CHUNK):
            results += await self._append_chunk(appends[start : start + APPEND_CHUNK])
        return results

    async def _append_chunk(self, appends: Sequence[Append]) -> list[AppendResult]:
        keys = self.keys
        fields = [outcome_field(a.user_id, a.command_id) for a in appends]
        fingerprints = [fingerprint(f) for f in fields]
        batch = _batch_encoder.encode([_packed(a, f) for a, f in zip(appends, fields, strict=True)])
        replies = [keys.reply(a.user_id, a.command_id) for a in appends]
        fixed = [
            keys.events,
            keys.orders,
            keys.positions,
            keys.slots,
            keys.sequence,
            keys.outcomes,
            keys.chain,
            keys.waiting,
            keys.eventless,
            keys.archived,
            keys.final_orders,
            keys.final_positions,
            *replies,
        ]
        # The projection's keys (``live``) come after the index buckets, one per command.
        planned = self.live(appends, len(fixed) + len(appends)) if self.live else None
        live_keys, live_args = planned or ([], [])

        async def call() -> Any:
            key_list = [*fixed, *(self.index.bucket(fp) for fp in fingerprints), *live_keys]
            args = [
                len(key_list),
                *key_list,
                batch,
                self.reply_ttl_s,
                str(self.index.generation),
                b"".join(fingerprints),
                *live_args,
            ]
            sha = self._sha or await self._load_script()
            try:
                # ``execute_command``: routed by its keys on a cluster (all on this shard's slot).
                return await self.redis.execute_command("EVALSHA", sha, *args)
            except NoScriptError:  # the server lost its script cache (a restart): load it again
                return await self.redis.execute_command("EVALSHA", await self._load_script(), *args)

        results = await self.index.current(call, _stale_batch)
        return [AppendResult(text(status), text(reply)) for status, reply in results]

    async def append(self, append: Append) -> AppendResult:
        return (await self.append_many([append]))[0]

    # ----------------------------------------------------------------- archived aggregates

    async def defer(self, entries: Sequence[tuple[str, Mapping[str, Any], Sequence[str]]]) -> None:
        """Record commands that name an archived aggregate, in order: each entry's fields with
        ``cold_entry`` (its id in the commands stream) and ``cold_ids`` (the archived ids)."""
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, fields, ids in entries:
            pipe.xadd(self.keys.deferred, {**fields, "cold_entry": entry_id, "cold_ids": ",".join(ids)})
        await pipe.execute()

    async def deferred(self, count: int = 100) -> list[tuple[str, list[str]]]:
        """The commands set aside, oldest first: (entry id in the set-aside stream, cold ids)."""
        found = await self.redis.xrange(self.keys.deferred, count=count)
        return [(text(i) or "", (text(f.get("cold_ids")) or "").split(",")) for i, f in found]

    async def rehydrate(self, states: Sequence[OrderState | PositionState], entry_ids: Sequence[str]) -> int:
        """Write back archived states read from PostgreSQL (where no newer state is) and publish
        the set-aside commands again, in one step; return how many were published."""
        args: list[Any] = [len(states)]
        for state in states:
            kind, snapshot = ("o", ORDER_SNAPSHOT) if isinstance(state, OrderState) else ("p", POSITION_SNAPSHOT)
            args += [kind, state.id, snapshot.encode(state), "1" if state.status.is_final else ""]
        k = self.keys
        script_keys = [k.orders, k.positions, k.final_orders, k.final_positions, k.deferred, k.commands]
        return int(await self.redis.eval(_REHYDRATE_LUA, len(script_keys), *script_keys, *args, *entry_ids))

    # ----------------------------------------------------------------- compacted outcomes

    async def waiting(self) -> dict[str, str]:
        """The duplicates waiting for a compacted outcome: outcome field -> marker (a few: each
        is answered as soon as PostgreSQL gives its reply)."""
        found = await self.redis.hgetall(self.keys.waiting)
        return {text(f) or "": text(m) or "" for f, m in found.items()}

    async def answer_waiting(self, field: str, marker: str, reply: str) -> bool:
        """Answer a waiting duplicate with its first reply (read from PostgreSQL), once."""
        user_id, command_id = outcome_ids(field)
        keys = [self.keys.waiting, self.keys.reply(user_id, command_id)]
        written = await self.redis.eval(_ANSWER_WAITING_LUA, 2, *keys, field, marker, reply, self.reply_ttl_s)
        return bool(written)

    # ----------------------------------------------------------------- reads

    async def read_range(self, start: str = "-", end: str = "+", count: int | None = None) -> list[StoredEvent]:
        """Events between two entry ids (inclusive); unknown event types are skipped."""
        entries = await self.redis.xrange(self.keys.events, start, end, count=count)
        return list(_decoded(entries))

    async def read_from(self, after: str, count: int = 1000) -> list[StoredEvent]:
        """Events strictly after an entry id ("0" reads from the start)."""
        return await self.read_range(_after(after), "+", count)

    async def read_aggregate(self, aggregate_id: str, page: int = 1000) -> list[StoredEvent]:
        """The events of one order or position, in version order.

        This walks the shard's log (an audit path; live state uses snapshots, and the
        PostgreSQL archive indexes events by aggregate).
        """
        found: list[StoredEvent] = []
        async for stored in self.iterate(page=page):
            if stored.event.stream == aggregate_id:
                found.append(stored)
        return found

    async def iterate(self, after: str = "0", page: int = 1000) -> AsyncIterator[StoredEvent]:
        """Every event after ``after``, page by page (a page of only skipped entries does not end
        the walk: paging follows the stream's entries, not the events decoded from them)."""
        while True:
            entries = await self.redis.xrange(self.keys.events, _after(after), "+", count=page)
            if not entries:
                return
            for stored in _decoded(entries):
                yield stored
            after = text(entries[-1][0])

    async def subscribe(
        self, after: str = "$", block_ms: int = BLOCK_MS, until: float | None = None
    ) -> AsyncIterator[StoredEvent]:
        """A live subscription: events appended after ``after`` ("$" = from now), forever or
        until the ``time.monotonic()`` deadline ``until`` (each read blocks to it at most)."""
        last = after
        if last == "$":
            newest = await self.redis.xrevrange(self.keys.events, count=1)
            last = text(newest[0][0]) if newest else "0-0"
        while True:
            block = block_ms
            if until is not None:
                left_ms = int((until - time.monotonic()) * 1000)
                if left_ms <= 0:
                    return
                block = min(block_ms, left_ms)
            response = await self.redis.xread({self.keys.events: last}, block=block, count=500)
            for _stream, entries in response or []:
                for stored in _decoded(entries):
                    yield stored
                if entries:
                    last = text(entries[-1][0])


def _stale_batch(results: Any) -> Any | None:
    """The index generation the append script answered a batch with, if it was stale."""
    return results[0][1] if text(results[0][0]) == "stale" else None


def _after(entry_id: str) -> str:
    return f"({entry_id}" if entry_id not in ("0", "0-0") else "-"


def _decoded(entries: Iterable[tuple[Any, dict[Any, Any]]]) -> Iterable[StoredEvent]:
    """The events of stream entries (``wire.decode_entry``): unknown types are skipped, and so is
    an entry that cannot be decoded, with a warning naming it (its consumers dead-letter it)."""
    for raw_id, fields in entries:
        entry_id = text(raw_id) or ""
        try:
            event = wire.decode_entry(entry_id, fields)
        except wire.WireError as error:
            log.warning("undecodable event skipped", entry_id=entry_id, code=error.code, reason=error.message)
            continue
        if event is not None:
            yield StoredEvent(entry_id, event)


def _packed(append: Append, field: str) -> list[Any]:
    """One command's part of the batch, as ``lua/append.lua`` reads it. Texts, not bytes: Redis's
    cmsgpack reads no msgpack ``bin``; the event and snapshot JSON is UTF-8 and stays byte for byte."""
    events: list[str] = []
    for event in append.events:
        events += (event.type, wire.encode(event).decode())
    return [
        append.user_id,
        field,
        append.expected_token,
        append.new_token,
        reply_head(append.reply).decode(),
        events,
        _triples(append.orders, ORDER_SNAPSHOT),
        _triples(append.positions, POSITION_SNAPSHOT),
        [x for slot, position_id in append.slots.items() for x in (slot, position_id or "")],
    ]


def _triples(snapshots: dict[str, OrderState] | dict[str, PositionState], snapshot: SnapshotCodec[Any]) -> list[str]:
    """Id, snapshot JSON and, for a final order or closed position, its ``updated_at`` (the
    script adds it to what compaction has to look at), else ''."""
    return [
        x
        for aggregate_id, state in snapshots.items()
        for x in (aggregate_id, snapshot.encode(state).decode(), str(state.updated_at) if state.status.is_final else "")
    ]
