"""``ledger demo``: the whole system on a short scripted session, for a newcomer.

It starts private Redis and PostgreSQL servers in a temporary directory (or uses
``LEDGER_REDIS_URL`` / ``LEDGER_DATABASE_URL`` when set), runs every role of ``ledger serve``
in-process with the paper venue, then plays two strategies through the seed's API:

* HYPERRSI-like on OKX: opens a BTC long, scales it, closes half, closes the rest as the mark
  moves; opens an ETH short and leaves it open.
* GRID-like on OKX: a ladder of limit orders with grid levels, filled by the paper venue as the
  mark walks through them; one level is cancelled.

It prints the live positions and orders with PnL at the marks, then the PostgreSQL history.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from ledger.app import servers
from ledger.app.logs import configure_logging
from ledger.app.service import serve
from ledger.client import history
from ledger.client.api import OrderManager, PositionManager
from ledger.config import Durability, Settings
from ledger.store import keys
from ledger.store.redis_conn import connect, ensure_shard_count, recorded_shards

HYPERRSI = "hyperrsi-demo"
THROWAWAY = Durability.OFF  # the demo's own servers live in a temp dir for a minute
GRID = "grid-demo"


@contextlib.contextmanager
def _servers(settings: Settings) -> Iterator[Settings]:
    """Use the configured servers, or start throwaway ones for the length of the demo."""
    with tempfile.TemporaryDirectory(prefix="ledger-demo-") as tmp:
        started: list[Any] = []
        try:
            redis_url = settings.redis_url
            if redis_url is None:
                started.append(servers.start_redis(Path(tmp) / "redis", durability=THROWAWAY))
                redis_url = started[-1].url
            database_url = settings.database_url
            if database_url is None:
                print("starting a private PostgreSQL for the demo…")
                started.append(servers.start_postgres(Path(tmp) / "postgres", durability=THROWAWAY))
                database_url = started[-1].url
            yield settings.with_overrides(redis_url=redis_url, database_url=database_url)
        finally:
            for server in reversed(started):
                server.stop()


@contextlib.asynccontextmanager
async def _running(settings: Settings) -> AsyncIterator[Any]:
    redis = await connect(settings.redis_url or "")
    settings = settings.with_overrides(shards=await recorded_shards(redis))
    await ensure_shard_count(redis, settings.shards)
    stop = asyncio.Event()
    service = asyncio.create_task(serve(settings, ["handler", "projection", "projector", "paper"], stop))
    try:
        yield redis
    finally:
        stop.set()
        await service
        await redis.aclose()


async def _mark(redis: Any, symbol: str, price: str) -> None:
    print(f"  mark okx {symbol} -> {price}")
    await redis.hset(keys.marks("okx"), symbol, price)


async def hyperrsi(redis: Any) -> None:
    print("HYPERRSI-like strategy (user hyperrsi-demo)")
    positions = PositionManager(redis)
    await _mark(redis, "BTC-USDT-SWAP", "45000")
    long = await positions.open_position(
        HYPERRSI, "okx", "BTC-USDT-SWAP", "long", Decimal("0.1"), 10, stop_loss="43000"
    )
    print(f"  opened long {long.size} @ {long.entry_price}")
    await _mark(redis, "BTC-USDT-SWAP", "45600")
    long = await positions.open_position(HYPERRSI, "okx", "BTC-USDT-SWAP", "long", Decimal("0.05"), 10)
    print(f"  scaled to {long.size} @ {long.entry_price}")
    await _mark(redis, "BTC-USDT-SWAP", "46200")
    await positions.close_position(long.id or "", Decimal("0.075"), reason="take_profit_1")
    print("  closed 0.075 (take_profit_1)")
    await _mark(redis, "BTC-USDT-SWAP", "46500")
    await positions.close_position(long.id or "", reason="rsi_exit")
    print("  closed the rest (rsi_exit)")
    await _mark(redis, "ETH-USDT-SWAP", "2400")
    short = await positions.open_position(HYPERRSI, "okx", "ETH-USDT-SWAP", "short", Decimal("1.5"), 5)
    print(f"  opened short {short.size} ETH @ {short.entry_price}")
    await _mark(redis, "ETH-USDT-SWAP", "2376")


async def grid(redis: Any) -> None:
    print("GRID-like strategy (user grid-demo)")
    orders = OrderManager(redis)
    symbol = "SOL-USDT-SWAP"
    await _mark(redis, symbol, "150")
    ladder = [("buy", "147", 1), ("buy", "144", 2), ("buy", "141", 3), ("sell", "153", 4), ("sell", "156", 5)]
    placed = {}
    for side, price, level in ladder:
        order = await orders.create_order(
            GRID, "okx", symbol, side, "limit", Decimal("2"), Decimal(price), grid_level=level
        )
        placed[level] = order
        print(f"  level {level}: {side} 2 @ {price} ({order.status})")
    for price in ("146.5", "143.9", "153.2"):
        await _mark(redis, symbol, price)
        await _settle(orders, placed)
    await orders.cancel_order(placed[5].id or "")
    print("  cancelled level 5")
    await _settle(orders, placed)


async def _settle(orders: OrderManager, placed: dict[int, Any], seconds: float = 3.0) -> None:
    """Give the paper venue a moment to fill what the mark crossed."""
    deadline = time.monotonic() + seconds
    before = None
    while time.monotonic() < deadline:
        states = [o.status for o in await orders.get_orders(GRID, "okx")]
        if states == before:
            return
        before = states
        await asyncio.sleep(0.3)


def _printtable(rows: list[dict[str, Any]], columns: list[str]) -> None:
    from ledger.app.console import print_table

    print_table(rows, columns, "  none")


async def _report(redis: Any, database_url: str) -> None:
    from ledger.app.console import position_rows
    from ledger.client.queries import marks, order_hashes, position_hashes

    print("\nopen positions (live Redis keys, PnL at the marks)")
    hashes = [h for user in (HYPERRSI, GRID) for h in await position_hashes(redis, user)]
    prices = {}
    for h in hashes:
        found = await marks(redis, h["exchange"], [h["symbol"]])
        prices.update({(h["exchange"], s): p for s, p in found.items()})
    columns = ["user_id", "symbol", "side", "size", "entry_price", "leverage", "realized_pnl", "mark", "unrealized_pnl"]
    _printtable(position_rows(hashes, prices), columns + ["pnl_percentage"])
    print("\ngrid orders (live Redis keys)")
    rows = await order_hashes(redis, GRID, "okx")
    _printtable(rows, ["grid_level", "side", "quantity", "price", "filled_qty", "avg_fill_price", "status"])
    print("\nhistory (PostgreSQL)")
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        positions: list[dict[str, Any]] = []
        for _ in range(50):
            positions = await history.closed_positions(conn, HYPERRSI)
            if positions:
                break
            await asyncio.sleep(0.1)
        columns = ["symbol", "side", "size", "entry_price", "exit_price", "gross_pnl", "fees", "realized_pnl"]
        _printtable(positions, columns + ["status", "close_reason"])
        orders = await history.final_orders(conn, GRID)
        print(f"\n{len(orders)} final GRID orders in PostgreSQL")
        _printtable(orders, ["grid_level", "side", "quantity", "price", "filled_qty", "status"])


async def _demo(settings: Settings) -> None:
    async with _running(settings) as redis:
        await hyperrsi(redis)
        await grid(redis)
        await _report(redis, settings.database_url or "")


def run_demo(_args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    configure_logging(settings.log_format, "warning")
    with _servers(settings) as ready:
        asyncio.run(_demo(ready))
    return 0
