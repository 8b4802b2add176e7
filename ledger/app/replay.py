"""``ledger replay``: positions and orders rebuilt from the log as of a moment (CONTRACT §11).

Every shard's log (both tiers, ``ledger.store.log.read_pages``) is folded through the live
system's own evolution (``ledger.domain.evolution.Latest``: ``apply`` for orders, the last event of
each position made a state as ``evolve`` makes it) up to the moment: the log's prefix whose
events' ``ts`` (the ledger's time of append) are at or before it, so each order and position is
exactly the state the decider held then. The filters select the events of
one user (read from that user's shard only), exchange and symbol; aggregates belong to one
market of one user, so filtering the events filters the book.

Rows carry the fields of CONTRACT §6 (as ``ledger positions`` / ``orders`` print them: strings,
``""`` for none, timestamps in epoch milliseconds), positions also ``exit_price`` and
``closed_at``: open positions and those closed or liquidated by then, every order. ``--json``
prints them with msgspec (``Replay.json``): the same text as ``json.dumps(..., indent=2)``, every
cell being ASCII by the value rules of CONTRACT §1, at a fraction of the cost for a long log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg

from ledger.app.console import shard_count
from ledger.domain import wire
from ledger.domain.evolution import Latest
from ledger.domain.mapping import ORDER, POSITION, AggregateMapping
from ledger.domain.values import MAX_TS_MS, MIN_TS_MS, datetime_to_ms
from ledger.store.keys import shard_of
from ledger.store.log import read_pages, without_cycle_collection
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

    @property
    def everything(self) -> bool:
        return self.user is None and self.exchange is None and self.symbol is None

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

    def json(self) -> str:
        """``as_dict`` as ``json.dumps(..., indent=2)`` writes it (see the module's docstring)."""
        return msgspec.json.format(msgspec.json.encode(self.as_dict()), indent=2).decode()

    def heading(self) -> str:
        moment = "now" if self.until is None else f"{iso_time(self.until)} ({self.until})"
        return f"as of {moment}: {len(self.positions)} positions, {len(self.orders)} orders"


def _rows(states: Any, mapping: AggregateMapping, columns: Sequence[str]) -> list[dict[str, str]]:
    """States as the live hashes write their fields (``ledger.domain.mapping``)."""
    present = sorted(states, key=lambda s: (s.created_at, s.id))
    return [mapping.cells(state, columns) for state in present]


async def replay(
    redis: Any,
    conn: psycopg.AsyncConnection[Any] | None,
    *,
    until: int | None = None,
    selection: Selection = Selection(),
    no_archive: str = "no database URL given",
) -> Replay:
    """The book as of ``until`` (None: the whole log) for the selected events of every shard."""
    latest = Latest()
    with without_cycle_collection():
        for shard in selection.shards(await shard_count(redis)):
            pages = read_pages(redis, shard, conn=conn, until=until, no_archive=no_archive)
            async for page in pages:
                events = [stored.event for stored in page]
                latest.fold(events if selection.everything else [event for event in events if event in selection])
        return Replay(
            until,
            _rows(latest.positions(), POSITION, REPLAY_POSITION_COLUMNS),
            _rows(latest.orders.values(), ORDER, ORDER.contract_fields),
        )
