"""``ledger export`` of 1,000,000 events runs in bounded memory (issue 9, part 7): the peak
resident memory of the real ``ledger`` script exporting a million events is that of exporting a
hundred thousand, not ten times it. Slow (about a minute): ``make test-slow`` runs it
(``LEDGER_SLOW=1``); ``make test`` reports it skipped with that reason."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ledger.store.keys import ShardKeys
from ledger.store.redis_conn import ensure_shard_count
from tests.audit_helpers import LEDGER_BIN

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("LEDGER_SLOW") != "1", reason="slow: run it with `make test-slow`"),
]

EVENTS = ShardKeys(0).events
BATCH = 10_000
SLACK_KB = 32 * 1024  # the peaks may differ by this much (allocator noise), never by the log's size


async def append(redis: Any, start: int, count: int) -> None:
    """``count`` cancelled-order events, appended as the ledger writes them."""
    for first in range(start, start + count, BATCH):
        pipe = redis.pipeline(transaction=False)
        for n in range(first, min(first + BATCH, start + count)):
            data = (
                f'{{"type":"OrderCancelled","event_id":"00000000-0000-4000-8000-{n:012d}",'
                f'"stream":"00000000-0000-4000-9000-{n:012d}","version":2,"command_id":"c-{n}",'
                f'"user_id":"u-{n % 1000}","exchange":"okx","symbol":"BTC-USDT-SWAP","ts":{1_767_225_600_000 + n},'
                '"schema":1,"status":"cancelled"}'
            )
            pipe.xadd(EVENTS, {"type": "OrderCancelled", "data": data})
        await pipe.execute()


def peak_kb(home: Path, redis_url: str) -> int:
    """Export everything to /dev/null; return the process's peak resident memory (KiB)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update(LEDGER_HOME=str(home / ".ledger"), LEDGER_REDIS_URL=redis_url)
    process = subprocess.Popen(
        [str(LEDGER_BIN), "export"], env=env, cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _pid, status, usage = os.wait4(process.pid, 0)
    assert status == 0, process.stderr.read() if process.stderr else status
    return usage.ru_maxrss


async def test_export_of_a_million_events_runs_in_bounded_memory(redis: Any, redis_url: str, tmp_path: Path) -> None:
    await ensure_shard_count(redis, 1)
    await append(redis, 0, 100_000)
    small = await asyncio.to_thread(peak_kb, tmp_path, redis_url)
    await append(redis, 100_000, 900_000)
    assert await redis.xlen(EVENTS) == 1_000_000
    large = await asyncio.to_thread(peak_kb, tmp_path, redis_url)
    print(f"peak RSS: {small // 1024} MiB for 100,000 events, {large // 1024} MiB for 1,000,000")
    assert large < small + SLACK_KB, (small, large)
