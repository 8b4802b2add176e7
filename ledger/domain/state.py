"""Aggregate state: what the decider needs to know about one order or one position.

States are plain msgspec Structs holding exact Decimals. They are rebuilt from events by
``ledger.domain.evolution.apply`` and kept as per-aggregate snapshots, so loading one never scans the log.
Like events, they hold only values (never part of a reference cycle) and are not tracked by the
garbage collector (``gc=False``): a replay holding every order of a long log does not make each
collection walk them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import msgspec

from ledger.domain.enums import (
    Exchange,
    OrderSide,
    OrderStatus,
    OrderType,
    PositionSide,
    PositionStatus,
)
from ledger.domain.values import ZERO, exact
from ledger.errors import Inconsistent


class StateError(Inconsistent):
    """The log or the stored state contradicts itself (an event for an aggregate that does not
    exist, a snapshot missing for an event just decided): a bug or a damaged log, never bad input.
    Raised instead of ``assert``, which ``python -O`` removes."""


class OrderState(msgspec.Struct, kw_only=True, gc=False):
    id: str
    user_id: str
    exchange: Exchange
    symbol: str
    side: OrderSide
    order_type: OrderType
    quantity: Decimal
    price: Decimal | None = None
    trigger_price: Decimal | None = None
    client_order_id: str | None = None
    position_side: PositionSide | None = None
    reduce_only: bool = False
    leverage: int | None = None
    grid_level: int | None = None
    position_id: str | None = None
    intent: str | None = None
    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None
    close_reason: str | None = None
    metadata: dict[str, Any] = {}
    contract_value: Decimal | None = None  # inverse: the face value placed at (Instrument.as_recorded)
    status: OrderStatus = OrderStatus.PENDING
    exchange_order_id: str | None = None
    filled_qty: Decimal = ZERO
    fill_basis: Decimal = ZERO
    avg_fill_price: Decimal | None = None
    fill_ids: list[str] = []
    reject_reason: str | None = None
    created_at: int = 0
    updated_at: int = 0
    version: int = 0

    @property
    @exact
    def remaining_qty(self) -> Decimal:
        return max(self.quantity - self.filled_qty, ZERO)


class PositionState(msgspec.Struct, kw_only=True, gc=False):
    id: str
    user_id: str
    exchange: Exchange
    symbol: str
    side: PositionSide
    status: PositionStatus = PositionStatus.OPEN
    size: Decimal = ZERO
    entry_price: Decimal = ZERO
    exit_price: Decimal | None = None
    leverage: int = 1
    entry_qty: Decimal = ZERO
    entry_basis: Decimal = ZERO
    exit_qty: Decimal = ZERO
    exit_basis: Decimal = ZERO
    gross_pnl: Decimal = ZERO
    fees: Decimal = ZERO
    other_fees: dict[str, Decimal] = {}
    realized_pnl: Decimal = ZERO
    excess_qty: Decimal = ZERO
    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None
    close_reason: str | None = None
    metadata: dict[str, Any] = {}
    contract_value: Decimal | None = None  # inverse: the face value its PnL uses (Instrument.as_recorded)
    created_at: int = 0
    updated_at: int = 0
    closed_at: int | None = None
    version: int = 0

    @property
    def is_open(self) -> bool:
        return self.status is PositionStatus.OPEN


@dataclass(slots=True)
class Book:
    """The loaded aggregates of one user; ``None`` records a known absence.

    ``slots`` maps each (user, market, side) to the one position of that side: the open
    position, or the id an unfilled entry order reserved for it (``open_position``), so that
    every fill and every later ``open_position`` of that side names the same position.
    """

    orders: dict[str, OrderState | None] = field(default_factory=dict)
    positions: dict[str, PositionState | None] = field(default_factory=dict)
    slots: dict[str, str | None] = field(default_factory=dict)

    def open_position(self, user_id: str, exchange: str, symbol: str, side: PositionSide) -> PositionState | None:
        position_id = self.slots.get(slot_field(user_id, exchange, symbol, side))
        position = self.positions.get(position_id) if position_id else None
        return position if position is not None and position.is_open else None

    def position_id_for(self, user_id: str, exchange: str, symbol: str, side: PositionSide) -> str | None:
        """The id of the one position of a side: the open one, or the pending one that an
        unfilled entry order reserved (known to have no state yet); None when neither exists."""
        position_id = self.slots.get(slot_field(user_id, exchange, symbol, side))
        if position_id is None or position_id not in self.positions:
            return None
        position = self.positions[position_id]
        return position_id if position is None or position.is_open else None


def slot_field(user_id: str, exchange: Exchange | str, symbol: str, side: PositionSide | str) -> str:
    """The name under which a shard records the open position of one (user, market, side)."""
    return "|".join((user_id, exchange, symbol, side))  # enums are str: their values are joined
