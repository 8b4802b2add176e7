"""``ledger verify`` (issue 9, part 4): the live projection and the PostgreSQL history rebuilt
from the log and compared, key by key and row by row; ``--repair`` rewrites the live keys.

The ledger runs in-process (handler, live projection, paper venue and projector: the scripted
session of tests/live_helpers.py); verify runs as the real ``ledger`` script against it, while
it runs, on a plain Redis and on a Redis Cluster. Each tampering is reported exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg

from ledger.keys import OPERATIONS
from projections.verify import ABSENT, POSTGRES, REDIS, Difference, verify
from tests.audit_helpers import Run, ledger_cli
from tests.live_helpers import BTC, GRID_USER, POS_USER, SOL, Session, hash_of, quiesce, run_session, running_ledger

ROLES = ("handler", "projection", "paper", "projector")
GROUPS = ("ledger-paper", "ledger-projector")
COLUMNS = ["store", "key", "field", "expected", "found"]


async def cli_verify(home: Path, redis_url: str, database_url: str, *args: str) -> Run:
    return await ledger_cli(home, "verify", "--redis-url", redis_url, "--database-url", database_url, *args)


def differences(run: Run) -> list[Difference]:
    report = json.loads(run.stdout)
    return [Difference(**d) for d in report["differences"]]


async def api_verify(redis: Any, database_url: str, shards: int, **options: Any) -> list[Difference]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        report = await verify(redis, conn, list(range(shards)), shards, **options)
    return report.differences


async def session(redis: Any, shards: int) -> Session:
    s = await run_session(redis, shards)
    await quiesce(redis, shards, GROUPS)
    return s


async def test_healthy_session_verifies(redis: Any, redis_url: str, database_url: str, tmp_path: Path) -> None:
    async with running_ledger(redis_url, tmp_path, roles=ROLES, database_url=database_url):
        await session(redis, 1)
        run = await cli_verify(tmp_path, redis_url, database_url, "--json")
        assert run.status == 0, run.stdout + run.stderr
        report = json.loads(run.stdout)
        assert report["ok"] is True and report["differences"] == []
