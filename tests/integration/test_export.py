"""``ledger export`` (issue 9, part 7): every event of every shard, both tiers, as JSON lines or
CSV, streamed; filtered by time and user; the same bytes before and after a trim; a progress line
only on a terminal. Real handler, projector, Redis, PostgreSQL and the real ``ledger`` script."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import psycopg

from ledger.app.export import ENVELOPE
from ledger.progress import progress_bar
from ledger.store.keys import ShardKeys
from tests.audit_helpers import ledger_cli
from tests.log_helpers import Rig

ALICE, BOB = "alice", "bob"  # shards 1 and 0 of 2


async def logged(redis: Any) -> list[tuple[int, str, str, str]]:
    """Every event in Redis, shard by shard: (shard, entry id, type, data as appended)."""
    found = []
    for shard in range(2):
        for entry_id, fields in await redis.xrange(ShardKeys(shard).events):
            found.append((shard, str(entry_id), fields["type"], fields["data"]))
    return found


def jsonl(events: list[tuple[int, str, str, str]]) -> str:
    return "".join(
        f'{{"shard":{shard},"entry_id":"{entry_id}","type":"{type_}","data":{data}}}\n'
        for shard, entry_id, type_, data in events
    )


def csv_text(events: list[tuple[int, str, str, str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*ENVELOPE, "data"])
    for shard, entry_id, type_, data in events:
        fields = json.loads(data)
        writer.writerow([shard, entry_id, type_, *(fields[name] for name in ENVELOPE[3:]), data])
    return out.getvalue()


async def test_export_as_jsonl_and_csv_across_shards_and_a_trim(
    redis: Any, redis_url: str, database_url: str, pg: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    rig = await Rig.start(redis, shards=2)
    await rig.round_trip(ALICE, "100", "110")
    await rig.round_trip(BOB, "200", "190")
    async with rig.projector(database_url):
        await rig.archive()
    events = await logged(redis)
    assert [e[0] for e in events] == [0] * 11 + [1] * 11
    settings = {"LEDGER_REDIS_URL": redis_url, "LEDGER_DATABASE_URL": database_url}

    async def export(*args: str) -> str:
        run = await ledger_cli(tmp_path, "export", *args, **settings)
        assert (run.status, run.stderr) == (0, ""), run.stderr  # piped: no progress line
        return run.stdout

    assert await export() == jsonl(events)
    assert await export("--format", "csv") == csv_text(events)

    # Trim both shards to their last entry: the same output, the rest read from the archive.
    for shard in range(2):
        last = events[11 * shard + 10][1]
        await redis.xtrim(ShardKeys(shard).events, minid=last, approximate=False)
    assert await export("--format", "jsonl") == jsonl(events)
    assert await export("--format", "csv") == csv_text(events)

    # Filters: by user (that user's shard only), by time (the events' ts), both.
    assert await export("--user", BOB) == jsonl(events[:11])
    ts = [json.loads(e[3])["ts"] for e in events]
    since, until = ts[14], ts[18]
    assert await export("--since", str(since), "--until", str(until)) == jsonl(
        [e for e, t in zip(events, ts, strict=True) if since <= t <= until]
    )
    assert await export("--user", ALICE, "--until", str(until)) == jsonl(
        [e for e, t in zip(events[11:], ts[11:], strict=True) if t <= until]
    )

    # To a file: written whole, then one line on stdout.
    run = await ledger_cli(tmp_path, "export", "--format", "csv", "--output", "log.csv", **settings)
    assert (run.status, run.stdout, run.stderr) == (0, "22 events written to log.csv\n", "")
    assert (tmp_path / "log.csv").read_text() == csv_text(events)
    assert not (tmp_path / "log.csv.part").exists()

    # Without the archive the trimmed entries cannot be exported: one line, exit 1, no file.
    run = await ledger_cli(tmp_path, "export", "--output", "lost.jsonl", LEDGER_REDIS_URL=redis_url)
    assert (run.status, run.stdout) == (1, "")
    assert run.stderr.startswith("ledger: ledger:{0}:events no longer holds 10 entries up to ")
    assert not (tmp_path / "lost.jsonl").exists() and not (tmp_path / "lost.jsonl.part").exists()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_drawn_on_a_terminal_only() -> None:
    terminal = Terminal()
    with progress_bar(terminal, "export", 4) as tick:
        for _ in range(3):
            tick()
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())  # the colours and cursor moves
    assert drawn.split("\r")[-1] == "export " + "━" * 30 + "╺" + "━" * 9 + " 3/4 0:00:00\n"  # the last frame stays

    piped = io.StringIO()
    with progress_bar(piped, "export", 4) as tick:
        for _ in range(4):
            tick()
    assert piped.getvalue() == ""
