"""The peer: the same order lifecycles (place, then fill) through the *eventsourcing* library
(pyeventsourcing) with its PostgreSQL recorder, on the benchmark's PostgreSQL: the reference
point of a typical Python event store. Each place and each fill is one ``save`` (one
transaction), from ``workers`` threads at once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from uuid import UUID

import psycopg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from benchmarks.client import PRICE, QUANTITY, SYMBOL

DATABASE = "peer"


class BenchOrder(Aggregate):
    @event("Placed")
    def __init__(self, user_id: str, exchange: str, symbol: str, side: str, quantity: Decimal, price: Decimal) -> None:
        self.user_id = user_id
        self.exchange = exchange
        self.symbol = symbol
        self.side = side
        self.quantity = quantity
        self.price = price
        self.filled_qty = Decimal(0)
        self.status = "pending"
        self.fill_ids: list[str] = []

    @event("Filled")
    def fill(self, fill_id: str, quantity: Decimal, price: Decimal, fee: Decimal) -> None:
        self.fill_ids.append(fill_id)
        self.filled_qty += quantity
        self.status = "filled" if self.filled_qty >= self.quantity else "partially_filled"


class Orders(Application[UUID]):
    def place(self, user_id: str) -> UUID:
        order = BenchOrder(user_id, "okx", SYMBOL, "buy", Decimal(QUANTITY), Decimal(PRICE))
        self.save(order)
        return order.id

    def fill(self, order_id: UUID, fill_id: str) -> None:
        order: BenchOrder = self.repository.get(order_id)
        order.fill(fill_id, Decimal(QUANTITY), Decimal(PRICE), Decimal("0.00005"))
        self.save(order)


def peer_fills_per_s(admin_url: str, host: str, port: int, pairs: int, workers: int) -> float:
    """Create the ``peer`` database, run ``pairs`` place + fill through the library; fills/s."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        conn.execute(f"CREATE DATABASE {DATABASE}")
    app = Orders(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": DATABASE,
            "POSTGRES_HOST": host,
            "POSTGRES_PORT": str(port),
            "POSTGRES_USER": "postgres",
            "POSTGRES_PASSWORD": "postgres",
            "POSTGRES_POOL_SIZE": str(workers + 1),
        }
    )

    def lifecycle(n: int) -> None:
        app.fill(app.place(f"bench-u{n % 64}"), f"f-{n}")

    for n in range(20):  # warm-up: connections, prepared statements
        lifecycle(-n - 1)
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lifecycle, range(pairs)))
    elapsed = time.perf_counter() - started
    app.close()
    return pairs / elapsed
