"""Redis clients with deliberate timeouts, plain or cluster (detected from the server)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from ledger.config import EXECUTION_MODES, ConfigError, format_execution, whole_number
from ledger.defaults import CONNECT_TIMEOUT_S, SOCKET_TIMEOUT_S
from ledger.domain.enums import Exchange
from ledger.domain.values import text as text  # the one bytes-to-text rule, pure; re-exported for the Redis edge
from ledger.errors import OperationFailed
from ledger.store.keys import META, execution_field


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


# A stream entry id as a tuple that sorts like the stream: (ms, seq).
EntryKey = tuple[int, int]


def entry_order(entry_id: str) -> EntryKey:
    """A stream entry id (``ms-seq``) as a tuple that sorts like the stream."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def entry_text(key: EntryKey) -> str:
    """The stream entry id of a key (``entry_order``'s inverse)."""
    return f"{key[0]}-{key[1]}"


def lua_msgpack(rows: Sequence[Sequence[bytes | str | int]]) -> bytes:
    """Rows of texts, byte strings and whole numbers as one msgpack array of arrays, for a
    script to unpack with Redis's ``cmsgpack``: one argument however many rows, so redis-py packs
    one argument instead of one per value (it re-joins its buffer per argument). Byte strings go
    as msgpack ``str`` (``cmsgpack`` reads no ``bin``): the script gets them byte for byte."""
    out = [_msgpack_header(len(rows), 0x90, 16, b"\xdc", b"\xdd")]
    for row in rows:
        out.append(_msgpack_header(len(row), 0x90, 16, b"\xdc", b"\xdd"))
        for value in row:
            if isinstance(value, int):
                out.append(_int_encoder.encode(value))
                continue
            raw = value.encode() if isinstance(value, str) else value
            out += (_msgpack_header(len(raw), 0xA0, 32, b"\xda", b"\xdb", b"\xd9"), raw)
    return b"".join(out)


_int_encoder = msgspec.msgpack.Encoder()


def _msgpack_header(n: int, fix: int, fix_limit: int, two: bytes, four: bytes, one: bytes = b"") -> bytes:
    """The header of an array (``fix`` 0x90) or a str (0xa0) of ``n`` items or bytes."""
    if n < fix_limit:
        return bytes((fix | n,))
    if one and n < 0x100:
        return one + bytes((n,))
    if n < 0x10000:
        return two + n.to_bytes(2, "big")
    return four + n.to_bytes(4, "big")


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


# --------------------------------------------------------------------------- execution modes
# How each exchange executes is recorded in ledger:meta (``execution_field``), so that two
# ``serve`` processes never execute one exchange in two modes: ``serve`` records its modes and
# refuses others (``ensure_execution``), ``ledger execution set`` rewrites them (``record_execution``)
# and the venues read them with each batch, stepping aside for an exchange no longer theirs
# (``consumers.guard``).


class ExecutionMismatch(OperationFailed):
    """``serve`` was started with an execution mode other than the one recorded for an exchange."""


# KEYS: 1 ledger:meta. ARGV: field / mode pairs. Writes every field; returns the values before
# (false where none), in one step so what changed is exactly what this call changed.
_RECORD_EXECUTION = """
local before = {}
for i = 1, #ARGV, 2 do
  before[#before + 1] = redis.call('HGET', KEYS[1], ARGV[i])
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return before
"""


async def recorded_execution(redis: Any) -> dict[Exchange, str]:
    """The execution mode recorded for each exchange, as recorded (a value that is no mode is
    returned as it is); an exchange with none recorded is left out."""
    pipe = redis.pipeline(transaction=False)
    _read_execution(pipe)
    (values,) = await pipe.execute()
    return _execution_read(values)


def _read_execution(pipe: Any) -> None:
    pipe.hmget(META, [execution_field(exchange) for exchange in Exchange])


def _execution_read(values: list[Any]) -> dict[Exchange, str]:
    return {exchange: text(value) for exchange, value in zip(Exchange, values, strict=True) if value is not None}


async def ensure_execution(redis: Any, execution: Mapping[Exchange, str]) -> None:
    """Record the execution mode of every exchange (HSETNX: a recorded one stays) or refuse
    modes other than the recorded ones with ``ExecutionMismatch``, one line saying what is
    recorded, what ``execution`` has and how to switch."""
    pipe = redis.pipeline(transaction=False)
    for exchange in Exchange:
        pipe.hsetnx(META, execution_field(exchange), execution[exchange])
    _read_execution(pipe)  # in the same round trip, after the HSETNXs
    *_, values = await pipe.execute()
    recorded = _execution_read(values)
    differ = [exchange for exchange in Exchange if recorded.get(exchange) != execution[exchange]]
    if not differ:
        return
    mine = format_execution(execution)
    found = "; ".join(
        f"{exchange} is recorded as {recorded.get(exchange)} but this serve has {exchange}={execution[exchange]}"
        for exchange in differ
    )
    keep = ""
    if all(recorded.get(exchange) in EXECUTION_MODES for exchange in Exchange):
        keep = f"; to keep the recorded modes, start this serve with LEDGER_EXECUTION={format_execution(recorded)}"
    raise ExecutionMismatch(
        f"{found}: to switch, stop every serve, run `ledger execution set {mine}` and start them all with "
        f"LEDGER_EXECUTION={mine}{keep}"
    )


async def record_execution(redis: Any, execution: Mapping[Exchange, str]) -> dict[Exchange, tuple[str | None, str]]:
    """Rewrite the recorded execution mode of every exchange (``ledger execution set``); return
    the exchanges whose mode changed: exchange -> (the mode before or None, the mode now)."""
    args = [item for exchange in Exchange for item in (execution_field(exchange), execution[exchange])]
    before = await redis.eval(_RECORD_EXECUTION, 1, META, *args)
    changed: dict[Exchange, tuple[str | None, str]] = {}
    for exchange, value in zip(Exchange, before, strict=True):
        old = text(value) if value else None
        if old != execution[exchange]:
            changed[exchange] = (old, execution[exchange])
    return changed
