"""Reads of the PostgreSQL history (written by ``projections.projector``) for the CLI and API.

Each function takes a psycopg 3 ``AsyncConnection`` and returns a list of dicts, one per row,
keyed by column name: ids as strings, money and quantities as ``Decimal`` (exact, never float),
timestamps as timezone-aware ``datetime``, ``metadata`` as a dict. The SQL is in
``projections/sql/history.sql``, its column lists from ``ledger.domain.mapping`` (every column of the
table); ``Position.from_row`` / ``Order.from_row`` turn a row into a model.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from ledger.domain.enums import FINAL_ORDER_STATUSES, Exchange, OrderStatus
from ledger.domain.mapping import ORDER, POSITION
from ledger.domain.values import check_identifier
from ledger.sqlfiles import load_queries

__all__ = ["MAX_LIMIT", "closed_positions", "final_orders"]

MAX_LIMIT = 10_000

_SQL = load_queries("ledger.client", "history.sql")
_CLOSED_POSITIONS = POSITION.sql(_SQL["closed_positions"])
_FINAL_ORDERS = ORDER.sql(_SQL["final_orders"])


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit: must be a whole number from 1 to {MAX_LIMIT} (got {limit!r})")
    return limit


def _exchange(exchange: Exchange | str | None) -> str | None:
    if exchange is None:
        return None
    try:
        return str(Exchange(exchange))
    except ValueError:
        known = ", ".join(e.value for e in Exchange)
        raise ValueError(f"exchange: must be one of {known} (got {exchange!r})") from None


async def _rows(conn: psycopg.AsyncConnection[Any], query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


async def closed_positions(
    conn: psycopg.AsyncConnection[Any],
    user_id: str,
    exchange: Exchange | str | None = None,
    symbol: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The user's closed and liquidated positions, most recently closed first.

    ``size`` is the total quantity the position opened over its life; ``realized_pnl`` is net
    of ``fees``; fees in other currencies are in ``metadata["other_fees"]``.
    """
    params = {
        "user_id": check_identifier("user_id", user_id),
        "exchange": _exchange(exchange),
        "symbol": None if symbol is None else check_identifier("symbol", symbol),
        "limit": _limit(limit),
    }
    return await _rows(conn, _CLOSED_POSITIONS, params)


async def final_orders(
    conn: psycopg.AsyncConnection[Any],
    user_id: str,
    exchange: Exchange | str | None = None,
    status: OrderStatus | str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The user's orders in a final status (or only ``status``), latest update first."""
    wanted = None
    if status is not None:
        try:
            wanted = OrderStatus(status)
        except ValueError:
            wanted = None
        if wanted not in FINAL_ORDER_STATUSES:
            finals = ", ".join(sorted(s.value for s in FINAL_ORDER_STATUSES))
            raise ValueError(f"status: must be a final order status ({finals}), got {status!r}")
    params = {
        "user_id": check_identifier("user_id", user_id),
        "exchange": _exchange(exchange),
        "status": None if wanted is None else str(wanted),
        "limit": _limit(limit),
    }
    return await _rows(conn, _FINAL_ORDERS, params)
