"""``ledger replay``: positions and orders rebuilt from the log as of a moment (CONTRACT §11).

Every shard's log (both tiers, ``ledger.store.log.read_log``) is folded through the live system's
own evolution (``ledger.domain.evolution.evolve`` over a ``ledger.domain.state.Book``) up to the moment: the
log's prefix whose events' ``ts`` (the ledger's time of append) are at or before it, so each
order and position is exactly the state the decider held then. The filters select the events of
one user (read from that user's shard only), exchange and symbol; aggregates belong to one
market of one user, so filtering the events filters the book.

Rows carry the fields of CONTRACT §6 (as ``ledger positions`` / ``orders`` print them: strings,
``""`` for none, timestamps in epoch milliseconds), positions also ``exit_price`` and
``closed_at``: open positions and those closed or liquidated by then, every order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from ledger.app.console import shard_count
from ledger.domain import wire
from ledger.domain.evolution import evolve
from ledger.domain.mapping import ORDER, POSITION, AggregateMapping
from ledger.domain.state import Book
from ledger.domain.values import MAX_TS_MS, MIN_TS_MS, datetime_to_ms
from ledger.store.keys import shard_of
from ledger.store.log import read_log
from ledger.store.operations import iso_time

REPLAY_POSITION_COLUMNS = (*POSITION.contract_fields, "exit_price", "closed_at")
# What a terminal shows of each (``--json`` gives every column).
POSITION_TABLE = (
    "id",
    "user_id",
    "exchange",
    "symbol",
    "side",
    "status",
    "size",
    "entry_price",
    "exit_price",
    "fees",
    "realized_pnl",
)
ORDER_TABLE = (
    "id",
    "user_id",
    "exchange",
    "symbol",
    "side",
    "order_type",
    "quantity",
    "price",
    "filled_qty",
    "avg_fill_price",
    "status",
)


def parse_moment(value: str) -> int:
    """``--until`` / ``--since``: epoch milliseconds, or ISO 8601 (UTC when it names no zone)."""
    if value.isascii() and value.isdigit():
        ms = int(value)
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            ms = -1
        else:
            ms = datetime_to_ms(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    if not MIN_TS_MS <= ms <= MAX_TS_MS:
        raise ValueError(
            f"must be epoch milliseconds or an ISO 8601 time such as 2026-01-02T14:03:00Z, "
            f"from 1970 to 9999 (got {value!r})"
        )
    return ms


@dataclass(frozen=True, slots=True)
class Selection:
    """Which events count: those of a user, an exchange, a symbol (None: any)."""

    user: str | None = None
    exchange: str | None = None
    symbol: str | None = None

    def __contains__(self, event: wire.Event) -> bool:
        return (
            (self.user is None or event.user_id == self.user)
            and (self.exchange is None or event.exchange == self.exchange)
            and (self.symbol is None or event.symbol == self.symbol)
        )

    def shards(self, count: int) -> Sequence[int]:
        return [shard_of(self.user, count)] if self.user is not None else range(count)


@dataclass(frozen=True, slots=True)
class Replay:
    until: int | None
    positions: list[dict[str, str]]
    orders: list[dict[str, str]]

    def as_dict(self) -> dict[str, Any]:
        return {"until": self.until, "positions": self.positions, "orders": self.orders}

    def heading(self) -> str:
        moment = "now" if self.until is None else f"{iso_time(self.until)} ({self.until})"
        return f"as of {moment}: {len(self.positions)} positions, {len(self.orders)} orders"


def _rows(states: Any, mapping: AggregateMapping, columns: Sequence[str]) -> list[dict[str, str]]:
    """States as the live hashes write their fields (``ledger.domain.mapping``)."""
    present = sorted((s for s in states if s is not None), key=lambda s: (s.created_at, s.id))
    return [mapping.cells(mapping.values(state), columns) for state in present]


async def replay(
    redis: Any,
    conn: psycopg.AsyncConnection[Any] | None,
    *,
    until: int | None = None,
    selection: Selection = Selection(),
    no_archive: str = "no database URL given",
) -> Replay:
    """The book as of ``until`` (None: the whole log) for the selected events of every shard."""
    book = Book()
    for shard in selection.shards(await shard_count(redis)):
        async for stored in read_log(redis, shard, conn=conn, until=until, no_archive=no_archive):
            if stored.event in selection:
                evolve(book, (stored.event,))
    return Replay(
        until,
        _rows(book.positions.values(), POSITION, REPLAY_POSITION_COLUMNS),
        _rows(book.orders.values(), ORDER, ORDER.contract_fields),
    )
