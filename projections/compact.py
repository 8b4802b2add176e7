"""Compaction of what Redis keeps per command (issue 9, part 2): outcomes and final snapshots.

Trimming (``projections.trim``) empties the streams; what still grows with every command is, on
each shard, its outcome (``ledger:{s}:outcomes``: the whole reply, kept for deduplication,
CONTRACT §3) and the snapshots of the orders and positions it created (``ledger:{s}:orders``,
``ledger:{s}:positions``). Compaction shrinks them once nothing can need them whole:

* an **order** in a final status (filled, cancelled, rejected, expired) or a **position**
  closed or liquidated, whose every event is archived (``ledger_events`` holds versions 1 to
  the snapshot's) and whose last event is older than the retention (its ``updated_at``, the
  ledger's time of append), is replaced by its compact form: only what the decider reads of
  such an aggregate (``ORDER_KEPT``, ``POSITION_KEPT``; a field equal to its default is left
  out and decodes to it), plus ``compacted`` (epoch ms; the state decoders ignore it). Every
  command against it is decided exactly as against the full snapshot: the same rejections of
  transitions, a duplicate fill absorbed by its fill id, a late fill recorded with the same
  events (``tests/integration/test_compaction.py`` proves it per command kind);
* an **outcome** whose events are archived (its reply's last event entry is at or before the
  projector's tracking record), or that has none (a rejection), and older than the retention
  (its last event's entry time; for one without events, the time the append step recorded in
  ``ledger:{s}:outcomes:eventless``) is copied to PostgreSQL (``ledger_outcomes``, committed
  first) and replaced by a marker (``ledger.store.eventstore.outcome_marker``: ``~`` and 20 hex digits
  of the reply's SHA-1). A duplicate then gets the reply from PostgreSQL through the command
  handler's ``OutcomeReader``, byte for byte (the marker proves it), however long after.

Each replacement is a compare-and-set in one Lua step on the shard's hash tag (Redis Cluster
safe): a snapshot or outcome that changed since it was read (a late fill appended meanwhile)
is left for the next pass. Compaction needs the PostgreSQL archive: without a database it
cannot run (``ledger trim`` refuses with the line that says which to configure), so an outcome
is never compacted where nothing could answer its duplicates. The command handler reaches the
same database (``LEDGER_DATABASE_URL``, else the private one of ``LEDGER_HOME``); a handler
without one keeps such a duplicate waiting and logs what to set.

``ledger trim`` compacts after trimming (``--dry-run`` counts); so does every pass of the
``retention`` role of ``serve``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg

from ledger.domain.enums import FINAL_ORDER_STATUSES, FINAL_POSITION_STATUSES
from ledger.domain.state import OrderState, PositionState
from ledger.domain.values import now_ms
from ledger.sqlfiles import load_queries
from ledger.store.archived import ARCHIVED_LUA, DIGEST_BYTES, ArchivedIndex, digest, fingerprint
from ledger.store.eventstore import MARKER_PREFIX, ORDER_SNAPSHOT, POSITION_SNAPSHOT
from ledger.store.keys import ShardKeys, outcome_ids
from ledger.store.redis_conn import entry_order, text
from projections.projector import checkpoint as archived_up_to

_SQL = load_queries("projections", "compact.sql")
PAGE = 500
COMPACTED = "compacted"

# What the decider (ledger/decider.py) reads of a final order: its owner and market
# (``requirements``, ``_owned_order``), the status and venue id every transition tests
# (``_transition``, ``_decide_accepted``), the fill ids a duplicate fill is refused by, and all a
# late fill is computed from (``_decide_fill``, ``_Fill``: side, quantity, what is filled, how
# the fill is routed to positions and what a position it opens takes from the order). The order
# type is not read but the state requires it. ``metadata`` is read only for an ``open`` intent.
ORDER_KEPT = (
    "id",
    "user_id",
    "exchange",
    "symbol",
    "side",
    "order_type",
    "quantity",
    "position_side",
    "reduce_only",
    "leverage",
    "position_id",
    "intent",
    "stop_loss",
    "take_profit",
    "close_reason",
    "metadata",
    "status",
    "exchange_order_id",
    "filled_qty",
    "fill_basis",
    "fill_ids",
    "version",
)
# What it reads of a position that is no longer open: that it exists (a reserved position id is
# reused only when it has no state), whose it is and its status (``_owned_position`` rejects
# every command with it); the market and side are required by the state; the version says which
# event it is the state after.
POSITION_KEPT = ("id", "user_id", "exchange", "symbol", "side", "status", "version")

# KEYS[1] the snapshots' hash, KEYS[2] its final ones still to look at, KEYS[3] compaction's
# counts. ARGV[1] the count's field, then: id, value read ('' for none), compact value ('' to
# only drop the id from KEYS[2]), ... Each id whose snapshot still is the value read gets its
# compact value and leaves KEYS[2]; one no longer final (or gone) only leaves KEYS[2]. Returns how
# many were replaced.
_COMPACT_LUA = """
local replaced = 0
for i = 2, #ARGV, 3 do
  if (redis.call('HGET', KEYS[1], ARGV[i]) or '') == ARGV[i + 1] then
    if ARGV[i + 2] ~= '' then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
      replaced = replaced + 1
    end
    redis.call('ZREM', KEYS[2], ARGV[i])
  end
end
if replaced > 0 then
  redis.call('HINCRBY', KEYS[3], ARGV[1], replaced)
end
return replaced
"""

# KEYS[1] the outcomes hash, KEYS[2] the outcomes without events, KEYS[3] the archived index's
# meta, KEYS[3 + k] the bucket of item k. ARGV[1] the index generation the buckets were computed
# with, then per item: field, value read, fingerprint, digest. Each field that still holds the
# value read leaves the outcomes hash (and KEYS[2]) for its bucket, in one step. Returns
# {'ok', how many moved} or, when the generation is not ARGV[1], {'stale', generation}.
_ARCHIVE_LUA = (
    ARCHIVED_LUA
    + """
local stale = archived_stale(KEYS[3], ARGV[1])
if stale then
  return {'stale', stale}
end
local moved, added = 0, 0
for i = 2, #ARGV, 4 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    added = added + redis.call('HSET', KEYS[3 + (i + 2) / 4], ARGV[i + 2], ARGV[i + 3])
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
    moved = moved + 1
  end
end
if added > 0 then
  redis.call('HINCRBY', KEYS[3], 'count', added)
end
return {'ok', moved}
"""
)
_LEGACY_MARKER = re.compile(rf"{re.escape(MARKER_PREFIX)}[0-9a-f]{{{2 * DIGEST_BYTES}}}")


@dataclass(frozen=True, slots=True)
class Compaction:
    """What compacting one hash of one shard found and did."""

    shard: int
    hash: str
    entries: int  # fields in the hash when read
    already: int  # compact before this pass (outcomes: in the index; snapshots: compactions counted)
    eligible: int  # final (or answered), archived, older than the retention, not compact yet
    compacted: int  # replaced now (0 on a dry run; fewer than eligible when one changed meanwhile)

    def as_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "hash": self.hash,
            "entries": self.entries,
            "already": self.already,
            "eligible": self.eligible,
            "compacted": self.compacted,
        }


class _Head(msgspec.Struct):
    """The fields of a snapshot that decide whether it may be compacted. A status left out is
    the state's default (``pending``, ``open``), never final."""

    status: str = ""
    version: int = 0
    updated_at: int = 0
    compacted: int | None = None


class _Ref(msgspec.Struct):
    id: str


class _ReplyEvents(msgspec.Struct):
    events: list[_Ref] = []


_head_decoder = msgspec.json.Decoder(_Head)
_reply_decoder = msgspec.json.Decoder(_ReplyEvents)
_order_decoder = msgspec.json.Decoder(OrderState)
_position_decoder = msgspec.json.Decoder(PositionState)


def compact_order(order: OrderState, now: int) -> bytes:
    """The compact snapshot of a final order (``metadata`` only for an ``open`` intent)."""
    kept = ORDER_KEPT if order.intent == "open" else [n for n in ORDER_KEPT if n != "metadata"]
    return ORDER_SNAPSHOT.encode(order, kept, **{COMPACTED: now})


def compact_position(position: PositionState, now: int) -> bytes:
    """The compact snapshot of a closed or liquidated position."""
    return POSITION_SNAPSHOT.encode(position, POSITION_KEPT, **{COMPACTED: now})


async def _pages(redis: Any, key: str) -> Any:
    """The fields of a hash, page by page (HSCAN): lists of (field, value) as text."""
    cursor: int | str = 0
    while True:
        cursor, found = await redis.hscan(key, cursor, count=PAGE)
        if found:
            yield [(text(f) or "", text(v) or "") for f, v in found.items()]
        if int(cursor) == 0:
            return


async def _archived(conn: psycopg.AsyncConnection[Any], versions: dict[str, int]) -> set[str]:
    """The aggregates whose every event (versions 1 to the one given) is in the archive."""
    if not versions:
        return set()
    cur = await conn.execute(_SQL["archived_versions"], {"ids": list(versions)})
    return {aid for aid, count, last in await cur.fetchall() if count == last == versions.get(aid)}


async def _compact_snapshots(
    redis: Any,
    conn: psycopg.AsyncConnection[Any],
    keys: ShardKeys,
    what: str,
    cutoff: int,
    now: int,
    dry_run: bool,
) -> Compaction:
    key, final_key, final, compact = (
        (keys.orders, keys.final_orders, _final_order, lambda raw: compact_order(_order_decoder.decode(raw), now))
        if what == "orders"
        else (
            keys.positions,
            keys.final_positions,
            _final_position,
            lambda raw: compact_position(_position_decoder.decode(raw), now),
        )
    )
    if not dry_run:
        await _find_finals_once(redis, keys, what, key, final_key, final)
    entries = int(await redis.hlen(key))
    already = int(await redis.hget(keys.compacted, what) or 0)
    eligible = compacted = 0
    # What became final before the cutoff (read whole first: compacting removes members).
    due: list[str] = []
    while page := [
        text(m) or ""
        for m in await redis.zrange(final_key, "-inf", f"({cutoff}", byscore=True, offset=len(due), num=PAGE)
    ]:
        due += page
    for start in range(0, len(due), PAGE):
        ids = due[start : start + PAGE]
        raws = [text(v) or "" for v in await redis.hmget(key, ids)]
        candidates: dict[str, tuple[str, int]] = {}
        dropped: list[tuple[str, str, bytes]] = []
        for aggregate_id, raw in zip(ids, raws, strict=True):
            head = _head_decoder.decode(raw) if raw else None
            if head is None or head.compacted is not None or not final(head.status):
                dropped.append((aggregate_id, raw, b""))  # gone, compact already or open again
            elif head.updated_at < cutoff:
                candidates[aggregate_id] = (raw, head.version)
        archived = await _archived(conn, {i: version for i, (_raw, version) in candidates.items()})
        eligible += len(archived)
        if not dry_run:
            triples = [(i, candidates[i][0], compact(candidates[i][0])) for i in sorted(archived)] + dropped
            compacted += await _replace(redis, keys, key, final_key, what, triples)
    return Compaction(keys.shard, key, entries, already, eligible, compacted)


async def _find_finals_once(
    redis: Any, keys: ShardKeys, what: str, key: str, final_key: str, final: Callable[[str], bool]
) -> None:
    """Aggregates made final before the append step recorded them in ``final_key`` (an earlier
    version): found by one scan of the hash, the first time compaction runs."""
    if await redis.hget(keys.compacted, f"finals:{what}"):
        return
    count = 0
    async for page in _pages(redis, key):
        heads = [(i, _head_decoder.decode(raw)) for i, raw in page]
        count += sum(1 for _i, head in heads if head.compacted is not None)
        finals = {i: head.updated_at for i, head in heads if head.compacted is None and final(head.status)}
        if finals:
            await redis.zadd(final_key, finals)
    await redis.hset(keys.compacted, mapping={what: count, f"finals:{what}": "1"})


def _final_order(status: str) -> bool:
    return status in FINAL_ORDER_STATUSES


def _final_position(status: str) -> bool:
    return status in FINAL_POSITION_STATUSES


async def _replace(
    redis: Any, keys: ShardKeys, key: str, final_key: str, what: str, triples: list[tuple[str, str, bytes]]
) -> int:
    args: list[Any] = [item for triple in triples for item in triple]
    script_keys = [key, final_key, keys.compacted]
    return int(await redis.eval(_COMPACT_LUA, len(script_keys), *script_keys, what, *args)) if triples else 0


async def _compact_outcomes(
    redis: Any,
    conn: psycopg.AsyncConnection[Any],
    keys: ShardKeys,
    cutoff: int,
    now: int,
    dry_run: bool,
) -> Compaction:
    archived = await archived_up_to(conn, keys.shard)
    archived_key = entry_order(archived) if archived else (0, 0)
    index = ArchivedIndex(keys.archived)
    already = await index.read(redis)  # outcomes in the index; markers left before it are added below
    entries = eligible = compacted = 0
    async for page in _pages(redis, keys.outcomes):
        entries += len(page)
        eventless: list[tuple[str, str]] = []
        chosen: list[tuple[str, str]] = []
        # Markers a pass before the index left in the hash: moved to it as they are.
        markers = [(f, r, bytes.fromhex(r[1:])) for f, r in page if _LEGACY_MARKER.fullmatch(r)]
        for field, reply in page:
            if reply.startswith(MARKER_PREFIX):
                already += 1
                continue
            events = _reply_decoder.decode(reply).events
            if not events:
                eventless.append((field, reply))
                continue
            last = max(entry_order(e.id) for e in events)
            if last <= archived_key and last[0] < cutoff:
                chosen.append((field, reply))
        if eventless:
            scores = await redis.zmscore(keys.eventless, [f for f, _r in eventless])
            chosen += [(f, r) for (f, r), score in zip(eventless, scores, strict=True) if score and score < cutoff]
            unknown = [f for (f, _r), score in zip(eventless, scores, strict=True) if score is None]
            if unknown and not dry_run:
                # Recorded before the append step timed outcomes without events: aged from now.
                await redis.zadd(keys.eventless, dict.fromkeys(unknown, now), nx=True)
        eligible += len(chosen)
        if dry_run:
            continue
        if chosen:
            async with conn.transaction():
                async with conn.cursor() as cur:
                    await cur.executemany(
                        _SQL["outcome_insert"],
                        [
                            {"shard": keys.shard, "user_id": user, "command_id": command, "reply": reply}
                            for field, reply in chosen
                            for user, command in [outcome_ids(field)]
                        ],
                    )
            compacted += await _archive(redis, keys, index, [(f, r, digest(r.encode())) for f, r in chosen])
        if markers:
            await _archive(redis, keys, index, markers)
    return Compaction(keys.shard, keys.outcomes, entries, already, eligible, compacted)


async def _archive(redis: Any, keys: ShardKeys, index: ArchivedIndex, items: list[tuple[str, str, bytes]]) -> int:
    """Move outcomes (field, value read, digest of the reply) from the outcomes hash to the
    archived index, growing it first; return how many moved (one that changed since it was
    read stays for the next pass)."""
    await index.grow(redis, extra=len(items))
    fingerprints = [fingerprint(field) for field, _value, _digest in items]
    flat = [x for (field, value, dg), fp in zip(items, fingerprints, strict=True) for x in (field, value, fp, dg)]

    async def call() -> Any:
        key_list = [keys.outcomes, keys.eventless, keys.archived, *(index.bucket(fp) for fp in fingerprints)]
        return await redis.eval(_ARCHIVE_LUA, len(key_list), *key_list, str(index.generation), *flat)

    _status, moved = await index.current(call, lambda result: result[1] if text(result[0]) == "stale" else None)
    return int(moved)


async def compact_shard(
    redis: Any,
    conn: psycopg.AsyncConnection[Any],
    shard: int,
    *,
    retention_ms: int = 0,
    dry_run: bool = False,
) -> list[Compaction]:
    """Compact the shard's outcomes, order snapshots and position snapshots (in that order)."""
    keys = ShardKeys(shard)
    now = now_ms()
    cutoff = now - retention_ms
    return [
        await _compact_outcomes(redis, conn, keys, cutoff, now, dry_run),
        await _compact_snapshots(redis, conn, keys, "orders", cutoff, now, dry_run),
        await _compact_snapshots(redis, conn, keys, "positions", cutoff, now, dry_run),
    ]
