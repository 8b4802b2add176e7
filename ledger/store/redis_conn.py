"""Redis clients with deliberate timeouts, plain or cluster (detected from the server)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from ledger.config import ConfigError, whole_number
from ledger.defaults import CONNECT_TIMEOUT_S, SOCKET_TIMEOUT_S
from ledger.domain.values import text as text  # the one bytes-to-text rule, pure; re-exported for the Redis edge
from ledger.errors import OperationFailed
from ledger.store.keys import META


async def connect(url: str, *, decode_responses: bool = True) -> Any:
    """A client for ``url``; a cluster client when the server runs in cluster mode."""
    options: dict[str, Any] = {
        "decode_responses": decode_responses,
        # Bytes that are not UTF-8 (a broken command) must not make every read of the stream
        # fail: they decode to lone surrogates and encode back to the same bytes.
        "encoding_errors": "surrogateescape",
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
    }
    plain = aioredis.from_url(url, health_check_interval=15, **options)
    info = await plain.info("cluster")
    if not info.get("cluster_enabled"):
        return plain
    await plain.aclose()
    return RedisCluster.from_url(url, **options)


def entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``ms-seq``) as a tuple that sorts like the stream."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class ShardCountMismatch(OperationFailed):
    pass


async def ensure_shard_count(redis: Any, shards: int) -> int:
    """Record the shard count in ``ledger:meta`` or refuse a different one; a count that is
    not one (``ConfigError``) is refused before anything is written."""
    shards = whole_number("shards", shards)
    await redis.hsetnx(META, "shards", shards)
    recorded = await recorded_shards(redis)
    if recorded != shards:
        raise ShardCountMismatch(
            f"this Redis holds a ledger of {recorded} shards but {shards} were asked for: "
            f"start with LEDGER_SHARDS={recorded} (re-sharding an existing ledger is not supported)"
        )
    return recorded


async def _recorded(redis: Any, name: str, refusal: Callable[[str], OperationFailed]) -> int | None:
    """The whole number ``name`` recorded in ``ledger:meta`` (None: not recorded); a value that
    breaks the setting's rule raises ``refusal(value)``, which says what to do."""
    value = await redis.hget(META, name)
    if value is None:
        return None
    try:
        return whole_number(name, text(value))
    except ConfigError:
        raise refusal(text(value)) from None


async def recorded_shards(redis: Any) -> int | None:
    return await _recorded(
        redis,
        "shards",
        lambda value: ShardCountMismatch(
            f"ledger:meta records shards={value!r}, which is not a shard count: if this Redis holds no "
            "ledger data yet, delete it (HDEL ledger:meta shards) and start `ledger serve` again"
        ),
    )


async def record_final_order_ttl(redis: Any, ttl_s: int) -> None:
    """Record how long the live projection keeps a final order's hash readable (``ledger:meta``
    ``final_order_ttl_s``, written by every ``serve`` that runs the projection): the tools that
    must know which final orders it may have forgotten read it (``final_order_ttl``), whatever
    their own environment says, as every process reads the shard count there."""
    await redis.hset(META, "final_order_ttl_s", whole_number("final_order_ttl_s", ttl_s))


async def final_order_ttl(redis: Any, configured: int) -> int:
    """The final order hash lifetime the live projection records in ``ledger:meta``, else
    ``configured`` (no ``serve`` with the projection has run on this Redis yet)."""
    recorded = await _recorded(
        redis,
        "final_order_ttl_s",
        lambda value: OperationFailed(
            f"ledger:meta records final_order_ttl_s={value!r}, which is no lifetime: "
            "start `ledger serve` (it records LEDGER_FINAL_ORDER_TTL_S there again)"
        ),
    )
    return configured if recorded is None else recorded
