"""One reader over both tiers of a shard's event log: the PostgreSQL archive and Redis.

The projector archives every event of ``ledger:{s}:events`` into ``ledger_events``, so Redis
may drop the oldest entries (``XTRIM MINID``; CONTRACT §5). ``read_log`` reads a shard's log from
any point in log order, each entry once: from the archive what Redis no longer holds, from Redis
the rest (an entry in both is read from Redis, the bytes as appended).

Where Redis's log has holes is read from the stream itself (``XINFO STREAM``): every entry Redis
no longer holds lies at or before a *bound*, the entry just before its first one (a trim) or its
``max-deleted-entry-id`` (a deletion), and ``entries-added`` minus ``length`` says how many there
are. Each page read from Redis is checked against the bound measured after it (in the same
pipeline): when a trim overtook the reader, the page is dropped and read again from the archive,
so a concurrent trim never opens a gap. Before the archive is read, it must hold every entry
Redis lacks (counted, not assumed); otherwise, or with no archive to read, ``LogError`` says how
many entries are lost and what to do, never a silently shorter log.

Events of a type this reader does not know are skipped (CONTRACT §5). An entry that cannot be
decoded is skipped with a warning naming it, the policy of the consumers, which dead-letter it
(``consumers.deadletter``): the live state never applied it either.

Reading is by page (``read_pages``; ``read_log`` is the same events one at a time). While a full
page from Redis is decoded and handed over, the next one is already asked for (one request in
flight), so the server's work of producing it overlaps the reader's work of decoding; a reader
that stops early cancels it. A tool that folds a whole log (``replay``, ``verify``) does it
``without_cycle_collection``: a page's many small objects survive while it is folded, so the
cyclic garbage collector would promote them and walk the whole heap again and again (measured:
a quarter of replay's time), though nothing read or folded can form a cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from redis.exceptions import ResponseError

from ledger.config import ServerNotConfigured, Settings, known_url
from ledger.domain import wire
from ledger.domain.evolution import apply
from ledger.domain.state import OrderState, PositionState
from ledger.errors import OperationFailed
from ledger.sqlfiles import load_queries
from ledger.store.eventstore import ArchiveReader, StoredEvent
from ledger.store.keys import ShardKeys
from ledger.store.redis_conn import CONNECT_TIMEOUT_S, EntryKey, entry_order, entry_text, text

__all__ = [
    "PAGE",
    "SEQ_MAX",
    "LogError",
    "log_size",
    "open_archive",
    "read_log",
    "read_pages",
    "without_cycle_collection",
]

PAGE = 2000  # entries per Redis XRANGE and per archive query
SEQ_MAX = 2**63 - 1  # the largest entry_seq the archive can hold (BIGINT)

_SQL = load_queries("ledger.store", "log.sql")
log = structlog.get_logger("ledger.log")


class LogError(OperationFailed):
    """Part of a shard's log is in neither Redis nor the archive (or no archive can be read)."""


@dataclass(frozen=True, slots=True)
class _Holes:
    """What Redis no longer holds of a stream: ``missing`` entries, all at or before ``bound``."""

    missing: int
    bound: EntryKey


def _holes(info: Any) -> _Holes:
    if isinstance(info, ResponseError):  # no such key: nothing was ever appended to the shard
        return _Holes(0, (0, 0))
    missing = int(info["entries-added"]) - int(info["length"])
    if missing <= 0:
        return _Holes(0, (0, 0))
    first = info.get("first-entry")
    if not first:
        return _Holes(missing, entry_order(text(info["last-generated-id"])))
    ms, seq = entry_order(text(first[0]))
    before_first = (ms, seq - 1) if seq else (ms - 1, SEQ_MAX)
    return _Holes(missing, max(before_first, entry_order(text(info["max-deleted-entry-id"]))))


def _decoded(shard: int, entry_id: str, type_name: Any, data: Any) -> StoredEvent | None:
    try:
        return StoredEvent(entry_id, wire.decode_event(type_name, data))
    except wire.UnknownEventType:
        return None
    except wire.WireError as exc:
        log.warning("event cannot be decoded: skipped", shard=shard, entry_id=entry_id, reason=str(exc))
        return None


async def read_log(
    redis: Any,
    shard: int,
    *,
    conn: psycopg.AsyncConnection[Any] | None = None,
    after: str | None = None,
    until: int | None = None,
    no_archive: str = "no database URL given",
    page: int = PAGE,
) -> AsyncGenerator[StoredEvent, None]:
    """The events of ``shard`` after entry ``after`` (None: from the first), in log order; with
    ``until`` (epoch ms), the log as of that moment: up to the first event whose ``ts`` is later.

    ``conn`` reads the archive (autocommit); without it, reading what Redis no longer holds
    fails with ``LogError`` (``no_archive`` says why there is none).
    """
    pages = read_pages(redis, shard, conn=conn, after=after, until=until, no_archive=no_archive, page=page)
    async with contextlib.aclosing(pages):
        async for events in pages:
            for stored in events:
                yield stored


async def read_pages(
    redis: Any,
    shard: int,
    *,
    conn: psycopg.AsyncConnection[Any] | None = None,
    after: str | None = None,
    until: int | None = None,
    no_archive: str = "no database URL given",
    page: int = PAGE,
) -> AsyncGenerator[Sequence[StoredEvent], None]:
    """``read_log``'s events a page at a time (no page is empty): for readers that fold many
    events, where handing them over one by one would cost more than the fold."""
    reading = _read(redis, shard, conn, after, no_archive, page)
    async with contextlib.aclosing(reading):
        async for events in reading:
            if until is not None and events[-1].event.ts > until:
                if kept := _until(events, until):
                    yield kept
                return
            yield events


@contextlib.contextmanager
def without_cycle_collection() -> Iterator[None]:
    """The cyclic garbage collector paused while a whole log is folded, then restored (as it was:
    a caller that paused it keeps it paused). Reference counting still frees everything; cycles
    made meanwhile elsewhere are collected once it runs again."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _until(events: Sequence[StoredEvent], until: int) -> Sequence[StoredEvent]:
    """The events before the first one whose ``ts`` is later than ``until``."""
    for n, stored in enumerate(events):
        if stored.event.ts > until:
            return events[:n]
    return events


async def log_size(redis: Any, shard: int) -> int:
    """How many entries the shard's log has held in all, both tiers (Redis's ``entries-added``)."""
    try:
        info = await redis.xinfo_stream(ShardKeys(shard).events)
    except ResponseError:  # no such key: nothing was ever appended to the shard
        return 0
    return int(info["entries-added"])


def _decoded_page(shard: int, entries: Sequence[tuple[Any, Any]]) -> list[StoredEvent]:
    page = []
    for entry_id, fields in entries:
        if (stored := _decoded(shard, text(entry_id), *wire.entry_fields(fields))) is not None:
            page.append(stored)
    return page


async def _redis_page(redis: Any, key: str, cursor: EntryKey, page: int) -> tuple[Any, _Holes]:
    """A page of Redis's log after ``cursor`` and the holes measured with it (one round trip)."""
    pipe = redis.pipeline(transaction=False)
    pipe.xrange(key, f"({entry_text(cursor)}", "+", count=page)
    pipe.xinfo_stream(key)
    entries, info = await pipe.execute(raise_on_error=False)
    if isinstance(entries, Exception):
        raise entries
    return entries, _holes(info)


async def _read(
    redis: Any,
    shard: int,
    conn: psycopg.AsyncConnection[Any] | None,
    after: str | None,
    no_archive: str,
    page: int,
) -> AsyncGenerator[Sequence[StoredEvent], None]:
    key = ShardKeys(shard).events
    cursor: EntryKey = entry_order(after) if after else (0, 0)
    checked: _Holes | None = None
    ahead: asyncio.Task[tuple[Any, _Holes]] | None = None  # the next page, asked for early
    try:
        while True:
            if ahead is None:
                entries, holes = await _redis_page(redis, key, cursor, page)
            else:
                entries, holes = await ahead
                ahead = None
            if cursor < holes.bound:
                if conn is None:
                    raise LogError(
                        f"{key} no longer holds {holes.missing} entries up to {entry_text(holes.bound)} and the "
                        f"archive cannot be read ({no_archive}): give the ledger's PostgreSQL (--database-url or "
                        "LEDGER_DATABASE_URL)"
                    )
                if holes != checked:
                    await _check_archive(redis, conn, shard, holes)
                    checked = holes
                async for events in _region(redis, conn, shard, cursor, holes.bound, page):
                    yield events
                cursor = holes.bound
                continue
            if not entries:
                return
            cursor = entry_order(text(entries[-1][0]))
            if len(entries) == page:
                ahead = asyncio.ensure_future(_redis_page(redis, key, cursor, page))
                await asyncio.sleep(0)  # lets the request go out before this page is decoded
            if events := _decoded_page(shard, entries):
                yield events
    finally:
        if ahead is not None:
            ahead.cancel()
            # Waited for without raising its end: suppressing CancelledError around ``await ahead``
            # also swallowed a cancellation of the reader itself arriving meanwhile.
            await asyncio.wait([ahead])
            if not ahead.cancelled():
                ahead.exception()  # a page asked for early and not read: its error is no one's


async def _region(
    redis: Any, conn: psycopg.AsyncConnection[Any], shard: int, cursor: EntryKey, bound: EntryKey, page: int
) -> AsyncIterator[list[StoredEvent]]:
    """The entries after ``cursor`` up to ``bound`` (where Redis has holes): the archive's and
    those Redis still holds there, merged in log order, each once."""
    key = ShardKeys(shard).events
    while cursor < bound:
        cur = await conn.execute(
            _SQL["archived_page"],
            {
                "shard": shard,
                "after_ms": cursor[0],
                "after_seq": cursor[1],
                "upto_ms": bound[0],
                "upto_seq": bound[1],
                "limit": page,
            },
        )
        rows = await cur.fetchall()
        held = await redis.xrange(key, f"({entry_text(cursor)}", entry_text(bound), count=page)
        upto = bound
        if len(rows) == page:
            upto = min(upto, (int(rows[-1][1]), int(rows[-1][2])))
        if len(held) == page:
            upto = min(upto, entry_order(text(held[-1][0])))
        merged: dict[EntryKey, tuple[str, Any, Any]] = {}
        for entry_id, fields in held:
            merged[entry_order(text(entry_id))] = (text(entry_id), *wire.entry_fields(fields))
        for entry_id, ms, seq, type_name, data in rows:
            merged.setdefault((int(ms), int(seq)), (entry_id, type_name, data))
        events = [
            stored
            for entry in sorted(k for k in merged if k <= upto)
            if (stored := _decoded(shard, *merged[entry])) is not None
        ]
        if events:
            yield events
        cursor = upto


async def _check_archive(redis: Any, conn: psycopg.AsyncConnection[Any], shard: int, holes: _Holes) -> None:
    """Fail unless the archive holds every entry Redis lacks (all of them at or before the bound):
    the archived entries up to the bound, less those Redis still holds there, must be as many."""
    key = ShardKeys(shard).events
    upto = {"shard": shard, "upto_ms": holes.bound[0], "upto_seq": holes.bound[1]}
    archived = int((await (await conn.execute(_SQL["archived_count"], upto)).fetchone() or (0,))[0])
    start = "-"
    while page := await redis.xrange(key, start, entry_text(holes.bound), count=PAGE):
        held = [entry_order(text(entry_id)) for entry_id, _fields in page]
        cur = await conn.execute(
            _SQL["archived_among"], {"shard": shard, "ms": [k[0] for k in held], "seq": [k[1] for k in held]}
        )
        archived -= int((await cur.fetchone() or (0,))[0])
        start = f"({entry_text(held[-1])}"
    if archived < holes.missing:
        raise LogError(
            f"{key} no longer holds {holes.missing} entries up to {entry_text(holes.bound)} and the archive holds only "
            f"{archived} of them: {holes.missing - archived} events are lost from both tiers (see `ledger status` "
            "for history gaps; restore the archive from a backup)"
        )


@asynccontextmanager
async def open_archive(settings: Settings) -> AsyncIterator[tuple[psycopg.AsyncConnection[Any] | None, str]]:
    """A connection to the archive for a reader, or None and why there is none (a read that
    Redis can serve alone needs no database)."""
    try:
        url = known_url(settings, "postgres")
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_S))
    except (psycopg.OperationalError, ServerNotConfigured) as exc:
        unread = str(exc).strip().splitlines()[0]
    else:
        async with conn:
            yield conn, "read"
        return
    yield None, unread


async def read_aggregates(
    conn: psycopg.AsyncConnection[Any], ids: Sequence[str]
) -> dict[str, OrderState | PositionState]:
    """The states of archived orders and positions, folded from their events in ``ledger_events``
    (each aggregate's in version order, the exact text as published): what their snapshots were
    when compaction moved them out of Redis. An event of a type this reader does not know is
    skipped (CONTRACT §5); an id the archive has no events of, or one of whose events cannot be
    decoded (logged with the reason), is left out: its state cannot be told."""
    cur = await conn.execute(_SQL["aggregate_events"], {"ids": list(ids)})
    states: dict[str, OrderState | PositionState] = {}
    unreadable: set[str] = set()
    for aggregate_id, type_name, data in await cur.fetchall():
        try:
            event = wire.decode_event(type_name, data)
        except wire.UnknownEventType:
            continue
        except wire.WireError as error:
            unreadable.add(aggregate_id)
            log.error("archived event undecodable: its aggregate cannot be read back", aggregate_id=aggregate_id,
                      code=error.code, reason=error.message)  # fmt: skip
            continue
        state = apply(states.get(aggregate_id), event)
        if isinstance(state, OrderState | PositionState):
            states[aggregate_id] = state
    return {i: state for i, state in states.items() if i not in unreadable}


def aggregate_reader(database_url: Callable[[], str]) -> ArchiveReader:
    """An ``EventStore``'s reader of archived aggregates: one connection per call (a reader of
    an order by id needs one only for an order compaction moved out of Redis)."""

    async def read(ids: Sequence[str]) -> dict[str, OrderState | PositionState]:
        async with await psycopg.AsyncConnection.connect(
            database_url(), autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_S)
        ) as conn:
            return await read_aggregates(conn, ids)

    return read
