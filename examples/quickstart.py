"""The seed's API against a running `ledger serve` (paper execution).

    .venv/bin/ledger serve &            # private Redis and PostgreSQL under ./.ledger
    .venv/bin/python examples/quickstart.py
"""

import asyncio
import os
from decimal import Decimal
from pathlib import Path

import redis.asyncio as redis

from ledger import OrderManager, PositionManager


async def main() -> None:
    url = os.environ.get("LEDGER_REDIS_URL") or Path(".ledger/redis.url").read_text().strip()
    r = redis.Redis.from_url(url)  # a RedisCluster client works too
    positions, orders = PositionManager(r), OrderManager(r)

    await r.hset("marks:okx", "BTC-USDT-SWAP", "45000")  # the paper venue fills at the mark
    pos = await positions.open_position(
        "user123", "okx", "BTC-USDT-SWAP", "long", Decimal("0.1"), 10, stop_loss=Decimal("43000")
    )
    print("opened", pos.size, "@", pos.entry_price, "fees", pos.fees)
    print("pnl at 46000:", await positions.calculate_pnl(pos, Decimal("46000")))

    order = await orders.create_order(
        "user123", "okx", "BTC-USDT-SWAP", "buy", "limit", Decimal("0.1"), Decimal("44000"), grid_level=3
    )
    print("order", order.id, order.status)
    print("cancel accepted:", await orders.cancel_order(order.id))

    await r.hset("marks:okx", "BTC-USDT-SWAP", "46000")
    print("closed:", await positions.close_position(pos.id, reason="manual"))
    print("open positions:", await positions.get_positions("user123", "okx"))
    await r.aclose()


asyncio.run(main())
