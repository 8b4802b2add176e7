"""Redis memory per command before and after retention (trim + compaction, issue 9 part 2).

    .venv/bin/python -m benchmarks.compaction_memory [--lifecycles 10000] [--json]

Starts a private Redis (no AOF) and PostgreSQL in a temporary directory, then drives the real
command handler, live projection and PostgreSQL projector of one shard through N order
lifecycles (``place_order`` limit, ``order_accepted``, ``record_fill`` of the whole quantity;
buys and sells alternate, so every second fill closes the position the one before opened: N
orders, N/2 closed positions, 3N commands). It reports the exact ``MEMORY USAGE`` (``SAMPLES
0``) of the shard's keys and ``INFO`` ``used_memory`` after the session, and again after one
retention pass (``projections.trim.retention_pass``, retention 0: the streams trimmed, the
outcomes and final snapshots compacted), each divided by the number of commands.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import redis.asyncio as aioredis

from consumers.command_handler import GROUP, CommandHandler
from consumers.runner import ConsumerSettings, StreamConsumer
from ledger.app.logs import configure_logging
from ledger.app.servers import start_postgres, start_redis
from ledger.config import Durability
from ledger.store.eventstore import EventStore
from ledger.store.keys import ShardKeys
from ledger.store.redis_conn import ensure_shard_count
from projections.live import LiveProjection
from projections.projector import open_pool, projector_consumer
from projections.schema import apply_schema
from projections.trim import retention_pass

SETTINGS = ConsumerSettings(batch_size=256, block_ms=50, claim_idle_ms=60_000, max_deliveries=3)
USER = "bench-user"
SYMBOL = "BTC-USDT-SWAP"
KEYS = ShardKeys(0)
# A retention longer than the session: every outcome is younger than it.
YOUNG_RETENTION_MS = 24 * 3600 * 1000
MEASURED = {
    "outcomes": KEYS.outcomes,
    "orders": KEYS.orders,
    "positions": KEYS.positions,
    "outcomes:eventless": KEYS.eventless,
    "events stream": KEYS.events,
    "commands stream": KEYS.commands,
}
ARCHIVED = "outcomes:archived*"  # the archived outcomes' index: its meta hash and buckets
COLD = "aggregates:archived*"  # the archived aggregates' index


async def _publish(redis: Any, commands: list[tuple[str, dict[str, Any]]]) -> None:
    for start in range(0, len(commands), 1000):
        pipe = redis.pipeline(transaction=False)
        for type_, data in commands[start : start + 1000]:
            pipe.xadd(KEYS.commands, {"type": type_, "data": json.dumps({"user_id": USER, **data})})
        await pipe.execute()


async def _order_ids(redis: Any, command_ids: list[str]) -> list[str]:
    pipe = redis.pipeline(transaction=False)
    for command_id in command_ids:
        pipe.lindex(KEYS.reply(USER, command_id), 0)
    return [json.loads(raw)["order_id"] for raw in await pipe.execute()]


async def _measure(redis: Any, commands: int) -> dict[str, Any]:
    sizes = {name: int(await redis.memory_usage(key, samples=0) or 0) for name, key in MEASURED.items()}
    for name, base in ((ARCHIVED, KEYS.archived), (COLD, KEYS.cold)):
        index_keys = [key async for key in redis.scan_iter(match=f"{base}*", count=1000)]
        sizes[name] = sum([int(await redis.memory_usage(key, samples=0) or 0) for key in index_keys])
    used = int((await redis.info("memory"))["used_memory"])
    return {
        "bytes": sizes,
        "per_command": {name: round(size / commands, 1) for name, size in sizes.items()},
        "per_command_total": round(sum(sizes.values()) / commands, 1),
        "used_memory": used,
    }


async def run(lifecycles: int, workdir: Path) -> dict[str, Any]:
    redis_server = start_redis(workdir / "redis", appendonly=False, durability=Durability.OFF)
    postgres = start_postgres(workdir / "postgres", durability=Durability.OFF)
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=60)
    pool = open_pool(postgres.url)
    try:
        async with await psycopg.AsyncConnection.connect(postgres.url, autocommit=True) as conn:
            await apply_schema(conn)
        await ensure_shard_count(redis, 1)
        await pool.open()
        handler = StreamConsumer(
            redis,
            stream=KEYS.commands,
            group=GROUP,
            handler=CommandHandler(EventStore(redis, 0), 1).handle,
            dead_stream=KEYS.dead,
            settings=SETTINGS,
        )
        sides = ["buy" if i % 2 == 0 else "sell" for i in range(lifecycles)]
        places = [
            (
                "place_order",
                {
                    "command_id": f"p-{i}",
                    "exchange": "okx",
                    "symbol": SYMBOL,
                    "side": side,
                    "order_type": "limit",
                    "quantity": "1",
                    "price": "100",
                },
            )  # fmt: skip
            for i, side in enumerate(sides)
        ]
        await _publish(redis, places)
        await handler.burst()
        orders = await _order_ids(redis, [f"p-{i}" for i in range(lifecycles)])
        await _publish(
            redis,
            [
                ("order_accepted", {"command_id": f"a-{i}", "order_id": oid, "exchange_order_id": f"x-{i}"})
                for i, oid in enumerate(orders)
            ],
        )
        await handler.burst()
        await _publish(
            redis,
            [
                (
                    "record_fill",
                    {
                        "command_id": f"f-{i}",
                        "order_id": oid,
                        "fill_id": f"t-{i}",
                        "quantity": "1",
                        "price": "100",
                        "fee": "0.05",
                    },
                )  # fmt: skip
                for i, oid in enumerate(orders)
            ],
        )
        await handler.burst()
        commands = 3 * lifecycles
        before = await _measure(redis, commands)
        await LiveProjection(redis, 0).consumer(SETTINGS).burst()
        await projector_consumer(redis, pool, 0, settings=SETTINGS).burst()
        async with await psycopg.AsyncConnection.connect(postgres.url, autocommit=True) as conn:
            # Passes while every outcome is younger than the retention: the first finds the
            # shard's outcomes once, the next is what a pass costs from then on.
            young_ms = []
            for _ in range(2):
                started = time.perf_counter()
                await retention_pass(redis, conn, [0], retention_ms=YOUNG_RETENTION_MS)
                young_ms.append(round((time.perf_counter() - started) * 1000, 1))
            done = await retention_pass(redis, conn, [0])
        after = await _measure(redis, commands)
        return {
            "lifecycles": lifecycles,
            "commands": commands,
            "before": before,
            "after": after,
            "young_pass_ms": {"first": young_ms[0], "then": young_ms[1]},
            "compacted": [c.as_dict() for c in done.compactions],
            "trimmed": [t.as_dict() for t in done.trims],
        }
    finally:
        await pool.close()
        await redis.aclose()
        postgres.stop()
        redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lifecycles", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure_logging("console", "warning")  # on stderr: stdout holds the result alone
    workdir = Path(tempfile.mkdtemp(prefix="ledger-compaction-"))
    try:
        result = asyncio.run(run(args.lifecycles, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['lifecycles']} lifecycles, {result['commands']} commands; bytes per command")
    print(f"{'key':<22}{'before':>10}{'after':>10}")
    for name in [*MEASURED, ARCHIVED, COLD]:
        print(f"{name:<22}{result['before']['per_command'][name]:>10}{result['after']['per_command'][name]:>10}")
    print(f"{'total':<22}{result['before']['per_command_total']:>10}{result['after']['per_command_total']:>10}")
    used = (result["before"]["used_memory"], result["after"]["used_memory"])
    print(f"used_memory: {used[0]} -> {used[1]} bytes")
    young = result["young_pass_ms"]
    print(f"a retention pass while every outcome is younger than the retention: {young['then']} ms")
    print(f"(the first pass, which looks at the shard's outcomes once: {young['first']} ms)")


if __name__ == "__main__":
    main()
