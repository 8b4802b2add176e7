"""Shared helpers of the audit-trail and dead-letter tests: the real command handler and
PostgreSQL projector of shard 0 driven in-process, and the real ``ledger`` script run as a
subprocess (so the handler can run in the test's loop while the CLI waits for a reply)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg_pool

from consumers.command_handler import GROUP as HANDLER_GROUP
from consumers.command_handler import CommandHandler
from consumers.runner import ConsumerSettings, StreamConsumer
from ledger.store.eventstore import EventStore
from ledger.store.keys import ShardKeys
from ledger.store.redis_conn import ensure_shard_count
from projections.projector import open_pool, projector_consumer

LEDGER_BIN = Path(sys.executable).parent / "ledger"
USER = "auditor-1"
SYMBOL = "BTC-USDT-SWAP"
KEYS = ShardKeys(0)
# Two deliveries, then a dead letter: failures show up fast.
FAST = ConsumerSettings(batch_size=64, block_ms=50, claim_idle_ms=60_000, max_deliveries=2)


class Ledger:
    """The real command handler of shard 0 (one shard, external execution), driven in bursts;
    ``start`` records the shard count as ``ledger serve`` does."""

    @classmethod
    async def start(cls, redis: Any) -> Ledger:
        await ensure_shard_count(redis, 1)
        return cls(redis)

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.consumer = StreamConsumer(
            redis,
            stream=KEYS.commands,
            group=HANDLER_GROUP,
            handler=CommandHandler(EventStore(redis, 0), 1).handle,
            dead_stream=KEYS.dead,
            settings=FAST,
        )

    async def publish(self, type_: str, command_id: str, **data: Any) -> str:
        data = {"command_id": command_id, "user_id": USER, **data}
        return str(await self.redis.xadd(KEYS.commands, {"type": type_, "data": json.dumps(data)}))

    async def send(self, type_: str, command_id: str, **data: Any) -> dict[str, Any]:
        """Publish one command, run the handler over it, return its reply."""
        await self.publish(type_, command_id, **data)
        await self.consumer.burst()
        raw = await self.redis.lindex(KEYS.reply(USER, command_id), 0)
        assert raw is not None, f"no reply to {command_id}"
        return json.loads(raw)  # type: ignore[no-any-return]

    async def accepted(self, type_: str, command_id: str, **data: Any) -> dict[str, Any]:
        reply = await self.send(type_, command_id, **data)
        assert reply["status"] == "accepted", reply
        return reply


@asynccontextmanager
async def projector(redis: Any, database_url: str) -> AsyncIterator[StreamConsumer]:
    """The real ``ledger-projector`` consumer of shard 0 (run it with ``burst``)."""
    pool: psycopg_pool.AsyncConnectionPool[Any] = open_pool(database_url)
    await pool.open()
    try:
        yield projector_consumer(redis, pool, 0, settings=FAST)
    finally:
        await pool.close()


@dataclass(frozen=True)
class Run:
    status: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.status == 0, (self.status, self.stderr)
        return json.loads(self.stdout)


async def ledger_cli(home: Path, *args: str, **env: str) -> Run:
    """Run the installed ``ledger`` script with only the given LEDGER_* settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    clean.update(LEDGER_HOME=str(home / ".ledger"), **env)
    process = await asyncio.create_subprocess_exec(
        str(LEDGER_BIN),
        *args,
        env=clean,
        cwd=home,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


async def entries(redis: Any, key: str) -> list[tuple[str, dict[str, str]]]:
    return [(str(i), dict(f)) for i, f in await redis.xrange(key)]
