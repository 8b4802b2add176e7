"""Trimming Redis safely (issue 9, part 2): only entries archived and processed by every group
(events) or answered (commands) leave Redis; reading from the start after a trim gives exactly the
events before it. Real handler, live projection, projector, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from structlog.testing import capture_logs

from ledger.config import Settings
from ledger.store.eventstore import EventStore
from ledger.store.log import read_log
from ledger.store.operations import record_operation
from ledger.store.redis_conn import entry_order
from projections.bounds import group_bounds
from projections.trim import StreamTrim, retention_role, trim_shard
from tests.log_helpers import Rig, log_entries

USER = "trim-user"
EVENTS, COMMANDS = "ledger:{0}:events", "ledger:{0}:commands"


async def _events(redis: Any, conn: Any) -> list[str]:
    return [s.entry_id async for s in read_log(redis, 0, conn=conn)]


async def _archived_round_trip(redis: Any, database_url: str) -> Rig:
    """One round trip of USER, live-projected and archived."""
    rig = await Rig.start(redis)
    await rig.round_trip(USER, "100", "110")
    await rig.project()
    async with rig.projector(database_url):
        await rig.archive()
    return rig


async def test_trim_removes_only_archived_entries_every_group_processed(redis: Any, database_url: str) -> None:
    rig = await Rig.start(redis)
    await rig.round_trip(USER, "100", "110")
    await rig.project()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        # The projector has never run: nothing is archived, so no event may leave Redis.
        before = await log_entries(redis)
        (events, commands) = await trim_shard(redis, conn, 0)
        assert (events.bound, events.limited_by, events.removed) == (None, "the PostgreSQL archive", 0)
        assert await log_entries(redis) == before
        assert commands.limited_by == "group ledger-handler" and commands.removed == await _command_count(rig)
        assert await redis.xlen(COMMANDS) == 0

        async with rig.projector(database_url):
            await rig.archive()
        archived = await log_entries(redis)
        await rig.round_trip(USER, "120", "130")  # appended, not archived, not projected
        everything = await _events(redis, conn)

        (events, _commands) = await trim_shard(redis, conn, 0)

        assert (events.bound, events.limited_by, events.removed) == (
            archived[-1],
            "the PostgreSQL archive",
            len(archived),
        )
        assert await log_entries(redis) == everything[len(archived) :]
        assert await _events(redis, conn) == everything  # read from the start: the archive, then Redis
        await rig.project()
        assert [s.entry_id async for s in EventStore(redis, 0).iterate()] == everything[len(archived) :]


async def test_a_pending_entry_of_a_group_bounds_the_trim(redis: Any, database_url: str) -> None:
    await _archived_round_trip(redis, database_url)
    ids = await log_entries(redis)
    await redis.xgroup_create(EVENTS, "slow-reader", id="0")
    await redis.xreadgroup("slow-reader", "c", {EVENTS: ">"}, count=3)  # delivered, never acknowledged
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        (events, _commands) = await trim_shard(redis, conn, 0)
    assert events.limited_by == "group slow-reader" and events.removed == 0
    assert await log_entries(redis) == ids


class _AcknowledgesFirst:
    """The real client, but the group's reader acknowledges everything just before each
    XPENDING: what a busy consumer does between the two reads of ``group_bounds``."""

    def __init__(self, redis: Any, group: str) -> None:
        self._redis, self._group = redis, group

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)

    async def xpending(self, stream: str, group: str) -> Any:
        pending = await self._redis.xpending_range(stream, self._group, "-", "+", 1000)
        await self._redis.xack(stream, self._group, *[p["message_id"] for p in pending])
        return await self._redis.xpending(stream, group)


async def test_a_group_that_acknowledges_between_the_two_reads_bounds_at_its_last_delivered(redis: Any) -> None:
    """XINFO GROUPS says entries are pending, XPENDING (read next) finds none: the group has
    processed everything delivered. It raised AttributeError (no oldest pending entry) and took
    ``serve``'s handler and projector down with the retention role."""
    rig = await Rig.start(redis)
    await rig.round_trip(USER, "100", "110")
    ids = await log_entries(redis)
    await redis.xgroup_create(EVENTS, "busy-reader", id="0")
    await redis.xreadgroup("busy-reader", "c", {EVENTS: ">"}, count=2)
    assert (await redis.xpending(EVENTS, "busy-reader"))["pending"] == 2

    bounds = await group_bounds(_AcknowledgesFirst(redis, "busy-reader"), EVENTS)

    assert bounds["group busy-reader"] == entry_order(ids[1])
    assert (await redis.xpending(EVENTS, "busy-reader"))["pending"] == 0


async def test_retention_keeps_young_entries(redis: Any, database_url: str) -> None:
    await _archived_round_trip(redis, database_url)
    ids = await log_entries(redis)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        trims = await trim_shard(redis, conn, 0, retention_ms=3_600_000, dry_run=False)
    assert [(t.limited_by, t.removed) for t in trims] == [("the retention", 0), ("the retention", 0)]
    assert await log_entries(redis) == ids


async def _command_count(rig: Rig) -> int:
    return rig.counter


def _ledger(args: list[str], redis_url: str, database_url: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update(LEDGER_REDIS_URL=redis_url, LEDGER_DATABASE_URL=database_url, LEDGER_HOME=str(home))
    return subprocess.run(
        [str(Path(sys.executable).parent / "ledger"), *args], env=env, capture_output=True, text=True, timeout=60
    )


async def test_ledger_trim_prints_the_bounds_and_records_the_operation(
    redis: Any, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    rig = await Rig.start(redis)
    await rig.round_trip(USER, "100", "110")
    await rig.project()
    async with rig.projector(database_url):
        await rig.archive()
    ids = await log_entries(redis)

    dry = _ledger(["trim", "--dry-run", "--json"], redis_url, database_url, tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["streams"][0] == {
        "shard": 0,
        "stream": EVENTS,
        "up_to": ids[-1],
        "limited_by": "the PostgreSQL archive",
        "removed": 0,
    }
    assert await log_entries(redis) == ids and await redis.xlen("ledger:ops") == 0

    done = _ledger(["trim", "--json", "--reason", "nightly"], redis_url, database_url, tmp_path)
    assert done.returncode == 0, done.stderr
    assert [row["removed"] for row in json.loads(done.stdout)["streams"]] == [len(ids), rig.counter]
    assert await log_entries(redis) == []
    ((_id, operation),) = await redis.xrange("ledger:ops")
    assert (operation["action"], operation["target"], operation["reason"]) == ("trim", "0", "nightly")


async def test_retention_is_off_unless_configured_and_trims_every_pass(redis: Any, database_url: str) -> None:
    assert Settings().retention_ms is None
    assert await retention_role(redis, Settings(database_url=database_url)) == []
    settings = Settings.from_env({"LEDGER_RETENTION_MS": "1", "LEDGER_TRIM_INTERVAL_S": "3600"})
    assert (settings.retention_ms, settings.trim_interval_s) == (1, 3600)
    (retention,) = await retention_role(redis, settings.with_overrides(database_url=database_url))

    rig = await _archived_round_trip(redis, database_url)
    ids = await log_entries(redis)
    await asyncio.sleep(0.01)  # every entry is now older than the 1 ms retention

    done = await retention.pass_once()

    assert [(t.stream, t.removed) for t in done.trims] == [(EVENTS, len(ids)), (COMMANDS, rig.counter)]
    assert await log_entries(redis) == []
    ((_id, operation),) = await redis.xrange("ledger:ops:retention")  # routine: apart, capped
    assert (operation["action"], operation["reason"]) == ("trim", "retention")
    assert await redis.exists("ledger:ops") == 0
    assert (await retention.pass_once()).trims == [
        StreamTrim(0, EVENTS, ids[-1], "the PostgreSQL archive", 0),
        StreamTrim(0, COMMANDS, done.trims[1].bound, "group ledger-handler", 0),
    ]
    assert await redis.xlen("ledger:ops:retention") == 1  # a pass that removes or compacts nothing records nothing

    stop = asyncio.Event()
    task = asyncio.create_task(retention.run(stop))
    stop.set()
    await asyncio.wait_for(task, timeout=2)


async def test_a_failing_pass_is_logged_and_the_role_goes_on(redis: Any, database_url: str) -> None:
    """A pass that fails for a reason no retry covers (here an outcome whose reply is not JSON)
    is logged with its error, and the role tries again at its next pass: it shares its process
    with the handler and the projector, which failing the role would restart with every pass."""
    settings = Settings.from_env({"LEDGER_RETENTION_MS": "1", "LEDGER_TRIM_INTERVAL_S": "1"})
    (retention,) = await retention_role(redis, settings.with_overrides(database_url=database_url))
    await _archived_round_trip(redis, database_url)
    [field, *_others] = sorted(await redis.hkeys("ledger:{0}:outcomes"))
    await redis.hset("ledger:{0}:outcomes", field, "not json")
    await asyncio.sleep(0.01)

    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(retention.run(stop))
        while sum(entry["event"].startswith("retention pass failed") for entry in logs) < 2:
            assert not task.done(), task
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, timeout=2)

    failed = [entry for entry in logs if entry["event"].startswith("retention pass failed")]
    assert failed[0]["event"] == "retention pass failed: the next pass, in 1 s, tries again; the error says what to fix"
    assert failed[0]["log_level"] == "error" and failed[0]["exc_info"] is True
    assert await log_entries(redis) == []  # each pass trimmed before it failed in compaction


async def test_a_capped_operations_stream_keeps_its_last_entries(redis: Any) -> None:
    for n in range(3):
        await record_operation(
            redis, "trim", "all shards", "retention", {"n": n}, stream="ledger:ops:retention", keep=2
        )
    entries = await redis.xrange("ledger:ops:retention")
    assert [json.loads(fields["detail"]) for _id, fields in entries] == [{"n": 1}, {"n": 2}]
