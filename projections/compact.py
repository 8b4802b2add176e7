"""Compaction of what Redis keeps per command (issue 9, part 2; issue 10): outcomes and final
aggregates leave Redis for PostgreSQL, an index of fingerprints (``ledger.store.archived``)
staying in their place.

Trimming (``projections.trim``) empties the streams; what still grows with every command is, on
each shard, its outcome (``ledger:{s}:outcomes``: the whole reply, kept for deduplication,
CONTRACT §3) and the snapshots of the orders and positions it created (``ledger:{s}:orders``,
``ledger:{s}:positions``). Compaction moves them out once nothing needs them in Redis:

* an **order** in a final status (filled, cancelled, rejected, expired) or a **position**
  closed or liquidated, whose every event is archived (``ledger_events`` holds versions 1 to
  the snapshot's), processed by the live projection and every consumer group of the log (its
  last entry at or before ``projections.bounds.processed``), and due (in the sorted set of
  finals the append step keeps, older than the retention), leaves its hash for the archived
  aggregates' index (fingerprint of its id -> ``o`` or ``p``). A command that names it is set
  aside by the handler until its state, folded from ``ledger_events``, is written back
  (``consumers.command_handler``); a compact form an earlier version wrote leaves the same way;
* an **outcome** whose events are archived (its reply's last event entry is at or before the
  projector's tracking record), or that has none (a rejection), and older than the retention
  (its last event's entry time; for one without events, the time the append step recorded in
  ``ledger:{s}:outcomes:eventless``) is copied to PostgreSQL (``ledger_outcomes``, committed
  first) and leaves the outcomes hash for the archived outcomes' index (fingerprint of
  ``user_id:command_id`` -> digest of the reply). A duplicate then gets the reply from
  PostgreSQL through the command handler's ``OutcomeReader``, byte for byte (the digest proves
  it), however long after. A pass finds such outcomes from the archive's events after the
  shard's watermark (``OUTCOMES_THROUGH``; each event names its command) and from
  ``eventless``, so it reads neither what was compacted nor what is still young; a shard
  without a watermark has its outcomes hash scanned once. An outcome whose event is not in the
  archive (dead-lettered by the projector) or reached it only after the watermark passed it
  (that entry retried later) is found by that scan only: it stays in the hash, answering its
  duplicates from Redis, until an operator removes the watermark to have one.

Each move is a compare-and-set in one Lua step on the shard's hash tag (Redis Cluster safe):
a snapshot or outcome that changed since it was read (a late fill appended meanwhile) is left
for the next pass. Compaction needs the PostgreSQL archive: without a database it cannot run
(``ledger trim`` refuses with the line that says which to configure), so nothing leaves Redis
where nothing could give it back. The command handler reaches the same database
(``LEDGER_DATABASE_URL``, else the private one of ``LEDGER_HOME``); a handler without one keeps
such a command or duplicate waiting and logs what to set.

``ledger trim`` compacts after trimming (``--dry-run`` counts); so does every pass of the
``retention`` role of ``serve``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg
from psycopg.types.json import Json

from ledger.domain.enums import FINAL_ORDER_STATUSES, FINAL_POSITION_STATUSES
from ledger.domain.values import now_ms
from ledger.sqlfiles import load_queries
from ledger.store.archived import ARCHIVED_LUA, DIGEST_BYTES, ArchivedIndex, digest, fingerprint
from ledger.store.eventstore import MARKER_PREFIX
from ledger.store.keys import ShardKeys, outcome_field, outcome_ids
from ledger.store.log import SEQ_MAX
from ledger.store.redis_conn import EntryKey, entry_order, entry_text, lua_msgpack, text
from projections.bounds import processed
from projections.projector import checkpoint as archived_up_to

_SQL = load_queries("projections", "compact.sql")
PAGE = 500
# Archived events read per query when looking for outcomes that may leave.
EVENT_PAGE = 2000
# Items moved per script call: a bounded pause of Redis (about 10 ms), and arguments well within
# what Lua's ``unpack`` takes.
ARCHIVE_CHUNK = 500
COMPACTED = "compacted"
# The outcomes' watermark (a field of ``ledger:{s}:compacted``): the log entry up to which the
# archive's events were looked at for outcomes to move.
OUTCOMES_THROUGH = "outcomes:through"
# What the aggregates' archived index holds for an id: which hash it left.
ORDER_KIND = b"o"
POSITION_KIND = b"p"

# KEYS[1] the hash the items leave (outcomes, order or position snapshots), KEYS[2] the sorted
# set they leave with it (the outcomes without events; the finals still to look at), KEYS[3] the
# archived index's meta, KEYS[4] compaction's counts, then the buckets the items go to. ARGV[1]
# the index generation the buckets were computed with, ARGV[2] the count to add the moved items
# to ('' for none), ARGV[3] the items (``lua_msgpack``, each field once), each: field, value read
# ('' for none), fingerprint ('' to only leave KEYS[2]), index value, the KEYS index of its
# bucket. Each field that still holds the value read leaves KEYS[1] and KEYS[2] for its bucket,
# in one step. A command per key rather than per item (HMGET, a HSET per bucket, HDEL, ZREM):
# the call and its propagation to the AOF cost more than the command's own work.
# Returns {'ok', how many moved} or, when the generation is not ARGV[1], {'stale', it}.
_ARCHIVE_LUA = (
    ARCHIVED_LUA
    + """
local stale = archived_stale(KEYS[3], ARGV[1])
if stale then
  return {'stale', stale}
end
local items = cmsgpack.unpack(ARGV[3])
local fields = {}
for i, item in ipairs(items) do
  fields[i] = item[1]
end
local current = redis.call('HMGET', KEYS[1], unpack(fields))
local buckets, leaving, matched = {}, {}, {}
for i, item in ipairs(items) do
  if (current[i] or '') == item[2] then
    if item[3] ~= '' then
      local pairs_ = buckets[item[5]]
      if not pairs_ then
        pairs_ = {}
        buckets[item[5]] = pairs_
      end
      pairs_[#pairs_ + 1] = item[3]
      pairs_[#pairs_ + 1] = item[4]
      leaving[#leaving + 1] = item[1]
    end
    matched[#matched + 1] = item[1]
  end
end
local added = 0
for bucket, pairs_ in pairs(buckets) do
  added = added + redis.call('HSET', KEYS[bucket], unpack(pairs_))
end
if #leaving > 0 then
  redis.call('HDEL', KEYS[1], unpack(leaving))
end
if #matched > 0 then
  redis.call('ZREM', KEYS[2], unpack(matched))
end
if added > 0 then
  redis.call('HINCRBY', KEYS[3], 'count', added)
end
if #leaving > 0 and ARGV[2] ~= '' then
  redis.call('HINCRBY', KEYS[4], ARGV[2], #leaving)
end
return {'ok', #leaving}
"""
)
_LEGACY_MARKER = re.compile(rf"{re.escape(MARKER_PREFIX)}[0-9a-f]{{{2 * DIGEST_BYTES}}}")


@dataclass(frozen=True, slots=True)
class Compaction:
    """What compacting one hash of one shard found and did."""

    shard: int
    hash: str
    entries: int  # fields in the hash when read
    already: int  # moved before this pass (outcomes: in the index; snapshots: moves counted)
    eligible: int  # final (or answered), archived, older than the retention, not compact yet
    compacted: int  # moved now (0 on a dry run; fewer than eligible when one changed meanwhile)

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


_JSON = msgspec.json.Encoder()
_head_decoder = msgspec.json.Decoder(_Head)
_reply_decoder = msgspec.json.Decoder(_ReplyEvents)


async def _pages(redis: Any, key: str) -> Any:
    """The fields of a hash, page by page (HSCAN): lists of (field, value) as text."""
    cursor: int | str = 0
    while True:
        cursor, found = await redis.hscan(key, cursor, count=PAGE)
        if found:
            yield [(text(f) or "", text(v) or "") for f, v in found.items()]
        if int(cursor) == 0:
            return


async def _archived(conn: psycopg.AsyncConnection[Any], versions: dict[str, int], processed: EntryKey) -> set[str]:
    """The aggregates whose every event (versions 1 to the one given) is in the archive and was
    processed by every consumer of the log (its last entry at or before ``processed``)."""
    if not versions:
        return set()
    cur = await conn.execute(_SQL["archived_versions"], {"ids": list(versions)})
    return {
        aid
        for aid, count, last, ms, seq in await cur.fetchall()
        if count == last == versions.get(aid) and (ms, seq) <= processed
    }


async def _compact_snapshots(
    redis: Any,
    conn: psycopg.AsyncConnection[Any],
    keys: ShardKeys,
    what: str,
    cutoff: int,
    dry_run: bool,
) -> Compaction:
    key, final_key, final, kind = (
        (keys.orders, keys.final_orders, _final_order, ORDER_KIND)
        if what == "orders"
        else (keys.positions, keys.final_positions, _final_position, POSITION_KIND)
    )
    if not dry_run:
        await _find_finals_once(redis, keys, what, key, final_key, final)
    index = ArchivedIndex(keys.cold)
    consumed = await processed(redis, keys)
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
        moving: list[tuple[str, str, bytes]] = []
        dropped: list[tuple[str, str]] = []
        for aggregate_id, raw in zip(ids, raws, strict=True):
            head = _head_decoder.decode(raw) if raw else None
            if head is not None and head.compacted is not None:
                moving.append((aggregate_id, raw, kind))  # compact before the index: archived then
            elif head is None or not final(head.status):
                dropped.append((aggregate_id, raw))  # gone, or open again
            elif head.updated_at < cutoff:
                candidates[aggregate_id] = (raw, head.version)
        archived = await _archived(conn, {i: version for i, (_raw, version) in candidates.items()}, consumed)
        eligible += len(archived)
        if not dry_run:
            moving += [(i, candidates[i][0], kind) for i in sorted(archived)]
            compacted += await _archive(redis, key, final_key, keys, index, moving, dropped, what)
    return Compaction(keys.shard, key, entries, already, eligible, compacted)


async def _find_finals_once(
    redis: Any, keys: ShardKeys, what: str, key: str, final_key: str, final: Callable[[str], bool]
) -> None:
    """Aggregates made final before the append step recorded them in ``final_key`` (an earlier
    version), and the compact snapshots an earlier compaction wrote (due at once: their events
    were archived when they were written): found by one scan of the hash, the first time
    compaction runs."""
    if await redis.hget(keys.compacted, f"finals:{what}"):
        return
    async for page in _pages(redis, key):
        heads = {i: _head_decoder.decode(raw) for i, raw in page}
        finals = {
            i: 0 if head.compacted is not None else head.updated_at
            for i, head in heads.items()
            if head.compacted is not None or final(head.status)
        }
        if finals:
            await redis.zadd(final_key, finals)
    await redis.hset(keys.compacted, f"finals:{what}", "1")


def _final_order(status: str) -> bool:
    return status in FINAL_ORDER_STATUSES


def _final_position(status: str) -> bool:
    return status in FINAL_POSITION_STATUSES


async def _compact_outcomes(
    redis: Any,
    conn: psycopg.AsyncConnection[Any],
    keys: ShardKeys,
    cutoff: int,
    now: int,
    dry_run: bool,
) -> Compaction:
    """Move the outcomes that may leave: those whose last event is at or before ``upto``
    (archived, and older than the retention), found from the archive's events after the
    watermark (``OUTCOMES_THROUGH``), and those without events recorded older than the
    retention in ``eventless``. A shard without a watermark (an earlier version) has its outcomes
    scanned once instead."""
    archived = await archived_up_to(conn, keys.shard)
    upto = min(entry_order(archived) if archived else (0, 0), (cutoff - 1, SEQ_MAX))
    index = ArchivedIndex(keys.archived)
    already = await index.read(redis)  # outcomes in the index; markers left before it are added below
    entries = int(await redis.hlen(keys.outcomes))
    through = text(await redis.hget(keys.compacted, OUTCOMES_THROUGH))
    if through is None:
        markers, eligible, compacted = await _scan_outcomes(redis, conn, keys, index, upto, cutoff, now, dry_run)
        already += markers
        if not dry_run:
            await redis.hset(keys.compacted, OUTCOMES_THROUGH, entry_text(upto))
    else:
        eligible, compacted = await _outcomes_after(redis, conn, keys, index, entry_order(through), upto, dry_run)
        due, done = await _eventless_due(redis, conn, keys, index, cutoff, dry_run)
        eligible += due
        compacted += done
    return Compaction(keys.shard, keys.outcomes, entries, already, eligible, compacted)


async def _outcomes_after(
    redis: Any,
    conn: psycopg.AsyncConnection[Any],
    keys: ShardKeys,
    index: ArchivedIndex,
    after: EntryKey,
    upto: EntryKey,
    dry_run: bool,
) -> tuple[int, int]:
    """The outcomes of the commands whose events the archive holds after ``after`` up to
    ``upto``, a page of events at a time, the watermark moved past each page: each outcome whose
    last event is at or before ``upto`` leaves; one whose last event is later (a command's
    events cut by ``upto``) is found again with that event by a later pass."""
    eligible = compacted = 0
    while after < upto:
        cur = await conn.execute(
            _SQL["archived_commands"],
            {
                "shard": keys.shard,
                "after_ms": after[0],
                "after_seq": after[1],
                "upto_ms": upto[0],
                "upto_seq": upto[1],
                "page": EVENT_PAGE,
            },
        )
        rows = await cur.fetchall()
        if not rows:
            break
        fields = list(dict.fromkeys(outcome_field(user, command) for _ms, _seq, user, command in rows))
        chosen = [
            (field, reply)
            for field, raw in zip(fields, await redis.hmget(keys.outcomes, fields), strict=True)
            if (reply := text(raw)) is not None and not reply.startswith(MARKER_PREFIX) and _last_event(reply) <= upto
        ]
        eligible += len(chosen)
        after = (int(rows[-1][0]), int(rows[-1][1]))
        if not dry_run:
            compacted += await _move_outcomes(redis, conn, keys, index, chosen, keys.eventless)
            await redis.hset(keys.compacted, OUTCOMES_THROUGH, entry_text(after))
        if len(rows) < EVENT_PAGE:
            break
    return eligible, compacted


async def _eventless_due(
    redis: Any,
    conn: psycopg.AsyncConnection[Any],
    keys: ShardKeys,
    index: ArchivedIndex,
    cutoff: int,
    dry_run: bool,
) -> tuple[int, int]:
    """The outcomes without events recorded (``eventless``) before the cutoff; a member whose
    outcome is gone leaves the set."""
    eligible = compacted = 0
    skip = 0
    while page := [
        text(m) or ""
        for m in await redis.zrange(keys.eventless, "-inf", f"({cutoff}", byscore=True, offset=skip, num=PAGE)
    ]:
        replies = [text(r) for r in await redis.hmget(keys.outcomes, page)]
        chosen = [(f, r) for f, r in zip(page, replies, strict=True) if r is not None]
        gone = [(f, "") for f, r in zip(page, replies, strict=True) if r is None]
        eligible += len(chosen)
        if dry_run:
            skip += len(page)
            continue
        moved = await _move_outcomes(redis, conn, keys, index, chosen, keys.eventless, gone)
        compacted += moved
        skip += len(chosen) - moved  # left in the set (changed since read): the next pass
    return eligible, compacted


async def _scan_outcomes(
    redis: Any,
    conn: psycopg.AsyncConnection[Any],
    keys: ShardKeys,
    index: ArchivedIndex,
    upto: EntryKey,
    cutoff: int,
    now: int,
    dry_run: bool,
) -> tuple[int, int, int]:
    """Every outcome of the hash looked at once (HSCAN), for a shard compacted before the
    watermark existed: (legacy markers found, eligible, moved)."""
    already = eligible = compacted = 0
    async for page in _pages(redis, keys.outcomes):
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
            elif max(entry_order(e.id) for e in events) <= upto:
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
        compacted += await _move_outcomes(redis, conn, keys, index, chosen, keys.eventless)
        if markers:
            await _archive(redis, keys.outcomes, keys.eventless, keys, index, markers)
    return already, eligible, compacted


def _last_event(reply: str) -> EntryKey:
    """The log entry of the last event of an outcome ((0, 0): it has none)."""
    return max((entry_order(e.id) for e in _reply_decoder.decode(reply).events), default=(0, 0))


async def _move_outcomes(
    redis: Any,
    conn: psycopg.AsyncConnection[Any],
    keys: ShardKeys,
    index: ArchivedIndex,
    chosen: list[tuple[str, str]],
    leaving: str,
    dropped: Sequence[tuple[str, str]] = (),
) -> int:
    """Copy the outcomes (field, reply) to ``ledger_outcomes`` (committed first), then move them
    to the archived index (and drop ``dropped`` from ``leaving``); return how many moved."""
    if chosen:
        rows = [
            {"shard": keys.shard, "user_id": user, "command_id": command, "reply": reply}
            for field, reply in chosen
            for user, command in [outcome_ids(field)]
        ]
        async with conn.transaction():  # committed before they leave Redis, whatever the connection's mode
            await conn.execute(_SQL["outcome_insert"], {"rows": Json(rows, _JSON.encode)})
    moving = [(f, r, digest(r.encode())) for f, r in chosen]
    return await _archive(redis, keys.outcomes, leaving, keys, index, moving, dropped)


async def _archive(
    redis: Any,
    source: str,
    leaving: str,
    keys: ShardKeys,
    index: ArchivedIndex,
    items: list[tuple[str, str, bytes]],
    dropped: Sequence[tuple[str, str]] = (),
    count: str = "",
) -> int:
    """Move items (field, value read, index value) from ``source`` (and the sorted set
    ``leaving``) to the archived ``index``, growing it first, and drop from ``leaving`` the
    fields (field, value read) that no longer belong there; return how many moved (one that
    changed since it was read stays for the next pass)."""
    if not items and not dropped:
        return 0
    await index.grow(redis, extra=len(items))
    # Each field once (field -> value read, index value; None: it only leaves ``leaving``).
    pending: dict[str, tuple[str, bytes | None]] = {field: (read, value) for field, read, value in items}
    pending |= {field: (read, None) for field, read in dropped if field not in pending}
    fields = list(pending)
    moved = 0
    for start in range(0, len(fields), ARCHIVE_CHUNK):
        chunk = fields[start : start + ARCHIVE_CHUNK]

        async def call(chunk: list[str] = chunk) -> Any:
            head = [source, leaving, index.meta, keys.compacted]
            rows: list[Sequence[bytes | str | int]] = []
            buckets: dict[str, int] = {}  # bucket -> its KEYS index in the script
            for field in chunk:
                read, value = pending[field]
                if value is None:
                    rows.append((field, read, "", "", 0))
                    continue
                fp = fingerprint(field)
                bucket = buckets.setdefault(index.bucket(fp), len(head) + len(buckets) + 1)
                rows.append((field, read, fp, value, bucket))
            key_list = [*head, *buckets]
            return await redis.eval(
                _ARCHIVE_LUA, len(key_list), *key_list, str(index.generation), count, lua_msgpack(rows)
            )

        _status, done = await index.current(call, lambda result: result[1] if text(result[0]) == "stale" else None)
        moved += int(done)
    return moved


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
        await _compact_snapshots(redis, conn, keys, "orders", cutoff, dry_run),
        await _compact_snapshots(redis, conn, keys, "positions", cutoff, dry_run),
    ]
