"""``ledger serve`` with retention on, under load, as real processes: the retention role trims and
compacts while commands arrive, and the books stay whole. Nothing of the ledger is imported:
commands go in with raw XADD, and what comes out is read through the contract's keys, the
PostgreSQL tables and ``ledger verify``.

The benchmark found what this guards: a retention pass raced a consumer group acknowledging
between two reads, failed, and took the handler and projector's process down with it; the
handler then lost its cancellation in a blocking read and kept the process up with the projector
gone, so the archive fell behind for good with no line in the log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg

from tests.pipeline_helpers import (
    ServeProcess,
    blpop_reply,
    commands_key,
    events_key,
    fill_json,
    log_lines,
    outcomes_key,
    place_order_json,
    reply_key,
    run_ledger,
    serve_processes_fixture,  # noqa: F401 - the fixture serve_processes
    start_serve,
    wait_for_roles,
    wait_until,
)

USERS = [f"ret-{n}" for n in range(20)]
WAVES, PER_WAVE = 4, 400  # place_order + record_fill pairs: 3,200 commands


async def _publish(redis: Any, commands: list[tuple[str, str]]) -> None:
    pipe = redis.pipeline(transaction=False)
    for kind, data in commands:
        pipe.xadd(commands_key(0), {"type": kind, "data": data})
    await pipe.execute()


async def _table_counts(database_url: str) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        counts = {}
        for table in ("ledger_events", "fills", "orders"):
            counts[table] = (await (await conn.execute(f"SELECT count(*) FROM {table}")).fetchone())[0]  # type: ignore[index]
        return counts


def _nice(pid: int) -> int:
    """A process's nice value (``/proc/<pid>/stat``, field 19)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


async def test_retention_under_load_keeps_the_books_whole(
    redis: Any, redis_url: str, database_url: str, tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    serve = start_serve(
        redis_url,
        tmp_path,
        roles=("handler", "projection", "projector", "retention"),
        LEDGER_DATABASE_URL=database_url,
        LEDGER_EXECUTION="okx=external",
        LEDGER_RETENTION_MS="1",
        LEDGER_TRIM_INTERVAL_S="1",
    )
    serve_processes.append(serve)
    children = await wait_for_roles(serve, {"handler", "projection", "projector+retention"})
    # The history and retention run at a lower CPU priority than the order path (and the supervisor).
    assert {role: _nice(pid) - _nice(serve.process.pid) for role, pid in children.items()} == {
        "handler": 0,
        "projection": 0,
        "projector+retention": 10,
    }

    replies: dict[tuple[str, str], str] = {}  # (user, command id) -> the first reply, raw
    events = 0
    for wave in range(WAVES):
        places = [(USERS[n % len(USERS)], f"p{wave}-{n}") for n in range(PER_WAVE)]
        await _publish(redis, [("place_order", place_order_json(user, cid)) for user, cid in places])
        fills = []
        for user, cid in places:
            raw, reply = await blpop_reply(redis, reply_key(0, user, cid), timeout=60)
            assert reply["status"] == "accepted", reply
            replies[user, cid], events = raw, events + len(reply["events"])
            fill = f"f{cid[1:]}"
            fills.append((user, fill, fill_json(user, fill, reply["order_id"], fill, quantity="1")))
        await _publish(redis, [("record_fill", data) for _user, _cid, data in fills])
        for user, cid, _data in fills:
            raw, reply = await blpop_reply(redis, reply_key(0, user, cid), timeout=60)
            assert reply["status"] == "accepted", reply
            replies[user, cid], events = raw, events + len(reply["events"])

    async def retained_nothing() -> bool:
        return (
            await redis.xlen(events_key(0)) == 0
            and await redis.xlen(commands_key(0)) == 0
            and await redis.hlen(outcomes_key(0)) == 0
            and await redis.hlen("ledger:{0}:orders") == 0
        )

    await wait_until(retained_nothing, timeout=120, interval=0.2, what="retention to trim and compact everything")
    assert await _table_counts(database_url) == {
        "ledger_events": events,
        "fills": WAVES * PER_WAVE,
        "orders": WAVES * PER_WAVE,
    }

    # A duplicate of the first command, its outcome long compacted: the first reply, byte for byte.
    (first_user, first_cid), first_raw = next(iter(replies.items()))
    await _publish(redis, [("place_order", place_order_json(first_user, first_cid))])
    again, _reply = await blpop_reply(redis, reply_key(0, first_user, first_cid), timeout=60)
    assert again == first_raw

    verified = run_ledger(redis_url, "verify", timeout=120, LEDGER_DATABASE_URL=database_url)
    assert verified.returncode == 0, verified.stdout[-2000:] + verified.stderr[-2000:]

    assert serve.stop(timeout=30) == 0, serve.output()[-3000:]
    errors = [json.loads(line) for line in serve.output().splitlines() if '"level": "error"' in line]
    assert errors == []
    passes = log_lines(serve, "retention pass")
    assert sum(p["compacted"] for p in passes) == len(replies) + WAVES * PER_WAVE  # every outcome, every filled order
    assert all(isinstance(p["ms"], float) for p in passes)
