"""``lua_msgpack``: what a script unpacks with Redis's own ``cmsgpack`` is what was packed, byte
for byte (byte strings that are not UTF-8 included: msgpack ``str``, since cmsgpack reads no
``bin``), at every header size. Real Redis."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.store.redis_conn import lua_msgpack

_ECHO = "return cmsgpack.unpack(ARGV[1])"
_SIZES = "local t = cmsgpack.unpack(ARGV[1]) local n = {} for i, row in ipairs(t) do n[i] = #row[1] end return {#t, n}"

values = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40),
    st.integers(min_value=0, max_value=2**31),
    st.sampled_from([b"x" * 255, b"y" * 256, b"z" * 65_535, b"w" * 65_536]),
)


def _as_read(value: bytes | str | int) -> Any:
    """What a client of raw replies reads back: the bytes, or the number."""
    return value.encode() if isinstance(value, str) else value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(values, min_size=1, max_size=20), max_size=20))
async def test_a_script_unpacks_what_was_packed(redis_url: str, rows: list[list[bytes | str | int]]) -> None:
    raw = aioredis.Redis.from_url(redis_url)  # replies as bytes
    try:
        assert await raw.eval(_ECHO, 0, lua_msgpack(rows)) == [[_as_read(v) for v in row] for row in rows]
    finally:
        await raw.aclose()


async def test_arrays_past_the_one_and_two_byte_headers(redis: Any) -> None:
    for count in (15, 16, 65_535, 65_536):
        rows = [[b"\xff" * 17, n] for n in range(count)]
        assert await redis.eval(_SIZES, 0, lua_msgpack(rows)) == [count, [17] * count]
