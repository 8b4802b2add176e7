"""One reader over both tiers of a shard's event log (issue 9, part 1): the archive for what Redis
no longer holds, Redis for the rest, in log order, no gap and no duplicate at the boundary, and a
clear failure when an entry is in neither. Real handler, projector, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from ledger.store.eventstore import EventStore, StoredEvent
from ledger.store.keys import ShardKeys
from ledger.store.log import LogError, read_log
from tests.log_helpers import Rig, log_entries

USER = "reader-1"
EVENTS = ShardKeys(0).events


async def session(redis: Any, database_url: str, rounds: int = 3) -> Rig:
    """``rounds`` round trips of USER, every event archived."""
    rig = await Rig.start(redis)
    for n in range(rounds):
        await rig.round_trip(USER, str(100 + n), str(120 + n))
    async with rig.projector(database_url):
        await rig.archive()
    return rig


async def whole(redis: Any) -> list[StoredEvent]:
    return [stored async for stored in EventStore(redis, 0).iterate()]


async def read(redis: Any, conn: Any, after: str | None = None, page: int = 1000) -> list[StoredEvent]:
    return [stored async for stored in read_log(redis, 0, conn=conn, after=after, page=page)]


async def test_reading_across_a_trim_gives_every_event_once_in_order(
    redis: Any, database_url: str, pg: psycopg.AsyncConnection[Any]
) -> None:
    await session(redis, database_url)
    before = await whole(redis)
    ids = await log_entries(redis)
    assert len(before) == len(ids) == 33  # 11 events per round trip
    assert await read(redis, None) == before  # nothing trimmed: Redis alone, no database needed

    await redis.xtrim(EVENTS, minid=ids[20], approximate=False)
    assert await log_entries(redis) == ids[20:]
    assert await read(redis, pg) == before
    assert await read(redis, pg, page=7) == before  # pages that straddle the boundary
    for after in (ids[0], ids[19], ids[20], ids[30], ids[-1]):
        assert await read(redis, pg, after=after, page=4) == before[ids.index(after) + 1 :]

    # Trimmed whole, then more events that only Redis holds (the projector has not run).
    await redis.xtrim(EVENTS, minid=f"{int(ids[-1].split('-')[0]) + 1}-0", approximate=False)
    assert await redis.xlen(EVENTS) == 0
    rig = await Rig.start(redis)
    rig.clock.now = before[-1].event.ts + 60_000
    await rig.round_trip(USER, "200", "210")
    assert await read(redis, pg) == before + await whole(redis)


async def test_a_deleted_entry_in_the_middle_is_read_from_the_archive(
    redis: Any, database_url: str, pg: psycopg.AsyncConnection[Any]
) -> None:
    await session(redis, database_url, rounds=1)
    before = await whole(redis)
    ids = await log_entries(redis)
    await redis.xdel(EVENTS, ids[3], ids[7])
    assert await read(redis, pg) == before
    assert await read(redis, pg, page=2) == before
    assert await read(redis, pg, after=ids[3]) == before[4:]


async def test_a_trim_while_reading_opens_no_gap(
    redis: Any, database_url: str, pg: psycopg.AsyncConnection[Any]
) -> None:
    await session(redis, database_url, rounds=2)
    before = await whole(redis)
    ids = await log_entries(redis)
    reader = read_log(redis, 0, conn=pg, page=5)
    got = [await anext(reader) for _ in range(5)]  # one Redis page read and handed out
    await redis.xtrim(EVENTS, minid=ids[17], approximate=False)  # the next 12 are gone from Redis
    got += [stored async for stored in reader]
    assert got == before


async def test_entries_in_neither_tier_fail_with_one_clear_line(
    redis: Any, database_url: str, pg: psycopg.AsyncConnection[Any]
) -> None:
    await session(redis, database_url, rounds=1)
    ids = await log_entries(redis)
    await redis.xtrim(EVENTS, minid=ids[5], approximate=False)
    last_trimmed = ids[4]
    # What the reader can still tell of the trimmed entries: they lie at or before the id just
    # before the first one left (the last trimmed one when both share a millisecond).
    ms, seq = (int(part) for part in ids[5].split("-"))
    bound = f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2**63 - 1}"

    with pytest.raises(LogError) as no_archive:
        await read(redis, None)
    assert str(no_archive.value) == (
        f"ledger:{{0}}:events no longer holds 5 entries up to {bound} and the archive cannot be read "
        "(no database URL given): give the ledger's PostgreSQL (--database-url or LEDGER_DATABASE_URL)"
    )
    # Reading after the trimmed entries needs Redis alone.
    assert [s.entry_id for s in await read(redis, None, after=last_trimmed)] == ids[5:]

    await pg.execute("DELETE FROM ledger_events WHERE entry_id = %s", [ids[2]])
    with pytest.raises(LogError) as lost:
        await read(redis, pg)
    assert str(lost.value) == (
        f"ledger:{{0}}:events no longer holds 5 entries up to {bound} and the archive holds only 4 of them: "
        "1 events are lost from both tiers (see `ledger status` for history gaps; "
        "restore the archive from a backup)"
    )


async def test_a_shard_with_no_log_yet_reads_empty(redis: Any) -> None:
    assert await read(redis, None) == []


async def test_a_reader_cancelled_while_it_closes_stays_cancelled(redis: Any) -> None:
    """Closing a reader cancels the page it asked for early and waits for it; a cancellation of
    the reader arriving meanwhile must reach it (it was swallowed with the early page's)."""
    rig = await Rig.start(redis)
    await rig.round_trip(USER, "100", "120")
    reader = read_log(redis, 0, page=1)
    await anext(reader)  # a full page: the next one is asked for early
    closing = asyncio.create_task(reader.aclose())
    await asyncio.sleep(0)  # closing now waits for the early page
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
