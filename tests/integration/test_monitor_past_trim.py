"""Reading past a trim (issue 9, part 10): ``monitor_order_fills(after=...)`` from entries Redis no
longer holds reads the archive when given one, or fails with a clear error; it never skips."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from ledger import OrderManager
from ledger.store.log import LogError
from tests.log_helpers import Rig, log_entries

USER = "monitor-user"
EVENTS = "ledger:{0}:events"


async def _trimmed_session(redis: Any, database_url: str) -> tuple[Rig, str, str]:
    """Two orders filled and archived, then the Redis log trimmed past the first order's fill."""
    rig = await Rig.start(redis)
    start = (await log_entries(redis))[-1] if await redis.xlen(EVENTS) else "0"
    first = await rig.place(USER, "buy", "1", "100")
    await rig.fill(USER, first, "1", "100")
    second = await rig.place(USER, "buy", "2", "100")
    async with rig.projector(database_url):
        await rig.archive()
    await rig.project()
    ids = await log_entries(redis)
    await redis.xtrim(EVENTS, minid=ids[-1], approximate=False)  # only the second OrderPlaced stays
    await rig.fill(USER, second, "2", "101")
    await rig.project()
    return rig, start, first


async def _fills(orders: OrderManager, after: str, count: int, archive: Any = None) -> list[tuple[str, Decimal]]:
    seen: list[tuple[str, Decimal]] = []

    async def follow() -> None:
        async for order in orders.monitor_order_fills(USER, "okx", after=after, archive=archive):
            seen.append((str(order.id), order.filled_qty))
            if len(seen) == count:
                return

    await asyncio.wait_for(follow(), timeout=10)
    return seen


async def test_fills_before_the_trim_are_read_from_the_archive(redis: Any, database_url: str) -> None:
    _rig, start, first = await _trimmed_session(redis, database_url)
    orders = OrderManager(redis)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as archive:
        seen = await _fills(orders, start, 2, archive)
    assert seen[0] == (first, Decimal(1))
    assert seen[1][1] == Decimal(2)


async def test_without_an_archive_reading_past_a_trim_fails_clearly(redis: Any, database_url: str) -> None:
    _rig, start, _first = await _trimmed_session(redis, database_url)
    orders = OrderManager(redis)
    with pytest.raises(LogError, match="no archive connection given"):
        await _fills(orders, start, 1)
