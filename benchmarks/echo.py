"""The floor of any Python consumer of the command stream: read a batch (XREADGROUP, the same
batch size as the ledger), answer every command at once (DEL + RPUSH + EXPIRE of its reply list,
CONTRACT §4), acknowledge, repeat. No decision, no event, no projection.

    python -m benchmarks.echo REDIS_URL      # until SIGTERM / SIGINT
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from ledger.config import Settings
from ledger.defaults import REPLY_TTL_S
from ledger.store.keys import ShardKeys

GROUP = "bench-echo"


async def echo(url: str, stop: asyncio.Event) -> None:
    redis: Any = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=30)
    keys = ShardKeys(0)
    batch = Settings().batch_size
    with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
        await redis.xgroup_create(keys.commands, GROUP, id="0", mkstream=True)
    try:
        while not stop.is_set():
            found = await redis.xreadgroup(GROUP, "echo", {keys.commands: ">"}, count=batch, block=1000)
            for _stream, entries in found:
                pipe = redis.pipeline(transaction=False)
                for _entry_id, fields in entries:
                    data = json.loads(fields["data"])
                    key = keys.reply(data["user_id"], data["command_id"])
                    reply = {
                        "command_id": data["command_id"],
                        "status": "accepted",
                        "error": None,
                        "order_id": str(uuid.uuid4()),
                        "position_id": None,
                        "events": [],
                    }
                    pipe.delete(key)
                    pipe.rpush(key, json.dumps(reply))
                    pipe.expire(key, REPLY_TTL_S)
                pipe.xack(keys.commands, GROUP, *(entry_id for entry_id, _ in entries))
                await pipe.execute()
    finally:
        await redis.aclose()


async def main(url: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await echo(url, stop)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
