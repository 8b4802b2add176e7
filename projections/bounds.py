"""How far the consumers of a shard's streams have got: what trimming (``projections.trim``)
and compaction (``projections.compact``) must leave alone."""

from __future__ import annotations

from typing import Any

from redis.exceptions import ResponseError

from ledger.store.keys import ShardKeys
from ledger.store.redis_conn import EntryKey, entry_order, text


def before(entry_id: str) -> EntryKey:
    """The greatest id before ``entry_id``."""
    ms, seq = entry_order(entry_id)
    return (ms, seq - 1) if seq else (ms - 1, 2**64 - 1)


async def group_bounds(redis: Any, stream: str) -> dict[str, EntryKey]:
    """Per consumer group: the last entry it has processed (none pending at or before it)."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream
        return {}
    bounds: dict[str, EntryKey] = {}
    for group in groups:
        name = text(group["name"])
        bound = entry_order(text(group["last-delivered-id"]))
        if int(group["pending"]):
            # Read after XINFO: the group may have acknowledged them meanwhile (no oldest then);
            # one delivered meanwhile is after the last-delivered id read above.
            oldest = text((await redis.xpending(stream, name))["min"])
            if oldest is not None:
                bound = min(bound, before(oldest))
        bounds[f"group {name}"] = bound
    return bounds


async def processed(redis: Any, keys: ShardKeys) -> EntryKey:
    """The last entry of the shard's event log that the live projection and every consumer group
    of it have processed: an aggregate whose events are all at or before it is needed by none of
    them again (the venues read an order's state when they handle its events)."""
    live = text(await redis.get(keys.checkpoint))
    limits = [entry_order(live) if live else (0, 0), *(await group_bounds(redis, keys.events)).values()]
    return min(limits)
