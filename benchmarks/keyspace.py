"""Redis memory by key class: ``MEMORY USAGE`` (``SAMPLES 0``: every element counted) of every
key, summed per class, and how long each class stays (the memory scenario reports it beside
``used_memory``, so a figure per lifecycle says where its bytes are).

A class is the key with what varies between orders replaced: the shard's number by ``s``, an
order or position id by ``{id}``, the user and command of a reply list, the live key a fence
guards. Keys that are none of these are counted under their own name.
"""

from __future__ import annotations

import re
from typing import Any

from ledger.defaults import REPLY_TTL_S
from ledger.store.redis_conn import text

SCAN_COUNT = 1000
PIPELINE = 1000
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SHARD = re.compile(r"\Aledger:\{\d+\}:")
_REPLY = re.compile(r"\Aledger:\{s\}:reply:.*\Z")
_FENCE = re.compile(r"\Aledger:live:fence:\{.*\}\Z")
_USER_SETS = re.compile(r"\A(orders:user|positions:index):[^:]+:[a-z]+\Z")
_BUCKET = re.compile(r"\Aledger:\{s\}:(outcomes|aggregates):archived:\d+\Z")
_POSITION = re.compile(r"\Apositions:(?!index:)[^:]+:[a-z]+:.+:(long|short)\Z")

# How long each class stays once the order it holds is final and archived (the rest: the
# shard's fixed keys, a few per shard, and the live keys of open positions).
STAYS = {
    "ledger:{s}:reply:<user>:<command>": f"LEDGER_REPLY_TTL_S ({REPLY_TTL_S} s)",
    "ledger:{s}:events": "until trimmed",
    "ledger:{s}:commands": "until trimmed",
    "ledger:{s}:outcomes": "until compacted",
    "ledger:{s}:outcomes:archived:<n>": "for good (fingerprint and digest of a compacted outcome)",
    "ledger:{s}:aggregates:archived:<n>": "for good (fingerprint of a final order or closed position moved out)",
    "ledger:{s}:commands:cold": "until its aggregates are read back",
    "ledger:{s}:orders": "until final, archived and processed (then the index)",
    "ledger:{s}:positions": "until closed, archived and processed (then the index)",
    "ledger:{s}:outcomes:eventless": "until compacted",
    "ledger:{s}:orders:final": "until compacted",
    "ledger:{s}:positions:final": "until compacted",
    "orders:{id}": "LEDGER_FINAL_ORDER_TTL_S (7 days) once final",
    "ledger:{s}:projection:expiring": "LEDGER_FINAL_ORDER_TTL_S (7 days) once final",
    "ledger:live:fence:{<live key>}": "LEDGER_FINAL_ORDER_TTL_S (7 days) once final or closed",
    "orders:user:<user>:<exchange>": "LEDGER_FINAL_ORDER_TTL_S (7 days) once final",
}
KEPT = frozenset(name for name, stays in STAYS.items() if stays.startswith("for good"))


def key_class(key: str) -> str:
    if _FENCE.match(key):
        return "ledger:live:fence:{<live key>}"
    name = _SHARD.sub("ledger:{s}:", _UUID.sub("{id}", key))
    if _REPLY.match(name):
        return "ledger:{s}:reply:<user>:<command>"
    if match := _BUCKET.match(name):
        return f"ledger:{{s}}:{match[1]}:archived:<n>"
    if match := _USER_SETS.match(name):
        return f"{match[1]}:<user>:<exchange>"
    if _POSITION.match(name):
        return "positions:<user>:<exchange>:<symbol>:<side>"
    return name


async def by_class(redis: Any) -> dict[str, int]:
    """Bytes of every key of a plain Redis, summed per ``key_class``."""
    found: dict[str, int] = {}
    batch: list[str] = []

    async def measure() -> None:
        pipe = redis.pipeline(transaction=False)
        for key in batch:
            pipe.memory_usage(key, samples=0)
        for key, size in zip(batch, await pipe.execute(), strict=True):
            name = key_class(key)
            found[name] = found.get(name, 0) + int(size or 0)  # 0: expired since the scan
        batch.clear()

    async for key in redis.scan_iter(count=SCAN_COUNT):
        batch.append(text(key) or "")
        if len(batch) == PIPELINE:
            await measure()
    if batch:
        await measure()
    return found


def per_lifecycle(before: dict[str, int], after: dict[str, int], count: int) -> dict[str, float]:
    """What each class grew by, per lifecycle, largest first (classes that did not grow left out)."""
    grown = {name: (after.get(name, 0) - before.get(name, 0)) / count for name in after}
    return {name: round(size, 1) for name, size in sorted(grown.items(), key=lambda kv: -kv[1]) if size > 0}
