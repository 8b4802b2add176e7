"""Operations: `ledger status` lag counted from the stream ids, also after Redis reloads its AOF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import redis.asyncio as aioredis

from ledger.app.cli import LAG_PAGE, group_lag
from ledger.app.servers import RedisServer, free_port

LEDGER_BIN = Path(sys.executable).parent / "ledger"
COMMANDS = "ledger:{0}:commands"
GROUP = "ledger-handler"


def status(redis_url: str, home: Path, database_url: str | None = None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update(LEDGER_REDIS_URL=redis_url, LEDGER_HOME=str(home))
    if database_url:
        env.update(LEDGER_DATABASE_URL=database_url)
    result = subprocess.run(
        [str(LEDGER_BIN), "status", "--json"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


async def _fill(redis: Any, count: int) -> list[str]:
    pipe = redis.pipeline(transaction=False)
    for n in range(count):
        pipe.xadd(COMMANDS, {"type": "noop", "data": str(n)})
    return [str(i) for i in await pipe.execute()]


async def test_status_lag_is_exact_after_redis_reloads_its_aof(
    redis: Any, redis_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Defect 14: after an AOF reload Redis reports lag null, and the CLI printed it."""
    await redis.hset("ledger:meta", "shards", "1")
    await _fill(redis, 10)
    await redis.xgroup_create(COMMANDS, GROUP, id="0")
    await redis.xreadgroup(GROUP, "c", {COMMANDS: ">"}, count=3)
    await redis.aclose()

    redis_server.kill()  # a crash: the AOF is all there is
    redis_server.start()
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        (group,) = await client.xinfo_groups(COMMANDS)
        assert (group["pending"], group["lag"]) == (3, None)  # Redis's own lag is gone

        (row,) = [r for r in status(redis_url, tmp_path)["streams"] if r["stream"] == "commands"]
        assert (row["length"], row["group"], row["pending"], row["lag"]) == (10, GROUP, 3, 7)

        # Reading on after the reload: still counted from the ids.
        await client.xreadgroup(GROUP, "c", {COMMANDS: ">"}, count=5)
        await client.xadd(COMMANDS, {"type": "noop", "data": "late"})
        (row,) = [r for r in status(redis_url, tmp_path)["streams"] if r["stream"] == "commands"]
        assert (row["length"], row["pending"], row["lag"]) == (11, 8, 3)
    finally:
        await client.aclose()


async def test_group_lag_counts_from_the_nearer_end_and_survives_deletions(redis: Any) -> None:
    total = 2 * LAG_PAGE + 500
    ids = await _fill(redis, total)
    assert await group_lag(redis, COMMANDS, "0-0") == total
    assert await group_lag(redis, COMMANDS, ids[-1]) == 0
    assert await group_lag(redis, COMMANDS, ids[9]) == total - 10  # walks back from the id: 10 entries
    assert await group_lag(redis, COMMANDS, ids[-11]) == 10  # walks forward: 10 entries
    assert await group_lag(redis, COMMANDS, ids[LAG_PAGE + 200]) == total - LAG_PAGE - 201  # both sides paged
    await redis.xdel(COMMANDS, *ids[:5], *ids[-5:])
    assert await group_lag(redis, COMMANDS, ids[9]) == total - 10 - 5
    assert await group_lag(redis, COMMANDS, ids[2]) == total - 10  # the id itself was deleted
    assert await group_lag(redis, COMMANDS, ids[-11]) == 5


async def test_status_reports_the_open_gaps_of_the_postgresql_history(
    redis: Any, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    await redis.hset("ledger:meta", "shards", "1")
    with psycopg.connect(database_url, autocommit=True) as conn:
        for entry_ms, filled in ((10, False), (9, False), (8, True)):
            conn.execute(
                "INSERT INTO projector_gaps (shard, entry_id, entry_ms, entry_seq, type, code, reason, filled_at)"
                " VALUES (0, %s, %s, 0, 'OrderPlaced', 'INVALID_EVENT', 'test', CASE WHEN %s THEN now() END)",
                [f"{entry_ms}-0", entry_ms, filled],
            )

    gaps = status(redis_url, tmp_path, database_url)["history_gaps"]

    assert gaps == {"available": True, "shards": {"0": {"open": 2, "first_entry_id": "9-0"}}}


def test_status_without_postgresql_still_reports_redis(redis_url: str, tmp_path: Path) -> None:
    report = status(redis_url, tmp_path, f"postgresql://postgres@127.0.0.1:{free_port()}/ledger")
    assert report["history_gaps"]["available"] is False
    assert "127.0.0.1" in report["history_gaps"]["reason"]
