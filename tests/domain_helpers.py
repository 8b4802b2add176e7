"""A tiny, pure driver of the domain for unit tests (no servers).

``Driver`` plays the part of the command handler with an in-memory store:

* every command goes through the real wire decoder (``wire.decode_command`` of a raw
  ``{"type", "data"}`` entry whose ``data`` is JSON text), so strings become enums and decimals
  are validated exactly as in production;
* the command's book is loaded by following ``requirements(cmd, book).missing(book)`` until
  nothing is missing, copying what the store has and marking the rest absent (``None``);
* ``decide`` runs with a deterministic ``Context`` (a clock that ticks one millisecond per
  command, ids from a counter);
* accepted events are ``evolve``d into the store and appended to ``log`` (one batch per command
  in ``batches``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from decimal import Decimal
from fractions import Fraction
from typing import Any, TypeVar

from ledger.domain import wire
from ledger.domain.decider import Context, Decision, Rejection, decide, requirements
from ledger.domain.enums import PositionSide
from ledger.domain.evolution import evolve
from ledger.domain.instruments import InstrumentTable
from ledger.domain.state import Book, OrderState, PositionState
from ledger.domain.values import format_decimal
from ledger.venues.markets import instrument_table

USER = "alice"
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z in epoch milliseconds
LINEAR = "BTC-USDT-SWAP"  # OKX linear swap, settles in USDT
INVERSE = "BTC-USD-SWAP"  # OKX inverse swap, contract_value 100 USD, settles in BTC
SPOT = "BTC/USDT"  # ccxt unified spot

E = TypeVar("E", bound=wire.Event)


def _wire_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format_decimal(value)
    return value


class Driver:
    """Decide commands against an in-memory store; record every accepted event."""

    def __init__(self, now: int = T0) -> None:
        self.store = Book()
        self.log: list[wire.Event] = []
        self.batches: list[list[wire.Event]] = []
        self.now = now
        self._ids = 0
        self._commands = 0
        self._fills = 0
        # The market data decide's context carries; a test may replace it (a ``markets sync``).
        self.instruments: InstrumentTable = instrument_table()

    # ------------------------------------------------------------------ plumbing

    def new_id(self) -> str:
        self._ids += 1
        return str(uuid.UUID(int=self._ids))

    def command(self, type_name: str, **data: Any) -> wire.Command:
        """Build a command through the real wire decoder (data as JSON text)."""
        self._commands += 1
        data.setdefault("command_id", f"cmd-{self._commands}")
        data.setdefault("user_id", USER)
        payload = {key: _wire_value(value) for key, value in data.items() if value is not None}
        return wire.decode_command({"type": type_name, "data": json.dumps(payload)})

    def load(self, command: wire.Command) -> Book:
        """A fresh book holding what ``requirements`` asks for, absences marked ``None``."""
        book = Book()
        for _ in range(10):
            missing = requirements(command, book, self.instruments).missing(book)
            if not missing:
                return book
            for order_id in missing.order_ids:
                book.orders[order_id] = self.store.orders.get(order_id)
            for position_id in missing.position_ids:
                book.positions[position_id] = self.store.positions.get(position_id)
            for slot in missing.slots:
                book.slots[slot] = self.store.slots.get(slot)
        raise AssertionError(f"requirements of {command!r} never settled")

    def send(self, type_name: str, **data: Any) -> Decision | Rejection:
        command = self.command(type_name, **data)
        book = self.load(command)
        self.now += 1
        result = decide(command, book, Context(now=self.now, new_id=self.new_id, instruments=self.instruments))
        if isinstance(result, Decision):
            evolve(self.store, result.events)
            self.log.extend(result.events)
            self.batches.append(list(result.events))
        return result

    def ok(self, type_name: str, **data: Any) -> Decision:
        result = self.send(type_name, **data)
        assert isinstance(result, Decision), f"{type_name} was rejected: {result}"
        return result

    def refused(self, type_name: str, **data: Any) -> Rejection:
        """Send a command that must be rejected; check that it appended nothing."""
        before = len(self.log)
        result = self.send(type_name, **data)
        assert isinstance(result, Rejection), f"{type_name} was accepted: {result}"
        assert len(self.log) == before
        return result

    # ------------------------------------------------------------------ shortcuts

    def place(
        self,
        side: str,
        quantity: Decimal | str,
        *,
        symbol: str = LINEAR,
        exchange: str = "okx",
        order_type: str = "market",
        **extra: Any,
    ) -> str:
        decision = self.ok(
            "place_order",
            exchange=exchange,
            symbol=symbol,
            side=side,
            order_type=order_type,
            quantity=quantity,
            **extra,
        )
        assert decision.order_id is not None
        return decision.order_id

    def fill(
        self,
        order_id: str,
        quantity: Decimal | str,
        price: Decimal | str,
        fee: Decimal | str | None = None,
        fee_currency: str | None = None,
        fill_id: str | None = None,
        **extra: Any,
    ) -> Decision:
        if fill_id is None:
            self._fills += 1
            fill_id = f"trade-{self._fills}"
        return self.ok(
            "record_fill",
            order_id=order_id,
            fill_id=fill_id,
            quantity=quantity,
            price=price,
            fee=fee,
            fee_currency=fee_currency,
            **extra,
        )

    def open_position(
        self,
        side: str,
        size: Decimal | str,
        *,
        symbol: str = LINEAR,
        exchange: str = "okx",
        leverage: int = 1,
        **extra: Any,
    ) -> tuple[str, str]:
        """Place the entry order of a position; return (order_id, reserved position_id)."""
        decision = self.ok(
            "open_position",
            exchange=exchange,
            symbol=symbol,
            side=side,
            size=size,
            leverage=leverage,
            **extra,
        )
        assert decision.order_id is not None and decision.position_id is not None
        return decision.order_id, decision.position_id

    def close(self, position_id: str, size: Decimal | str | None = None, **extra: Any) -> str:
        """Place the reduce-only order of ``close_position``; return its order id."""
        decision = self.ok("close_position", position_id=position_id, size=size, **extra)
        assert decision.order_id is not None
        return decision.order_id

    def order(self, order_id: str) -> OrderState:
        state = self.store.orders[order_id]
        assert state is not None
        return state

    def position(self, position_id: str) -> PositionState:
        state = self.store.positions[position_id]
        assert state is not None
        return state

    def open_slot(
        self, side: str, *, symbol: str = LINEAR, exchange: str = "okx", user: str = USER
    ) -> PositionState | None:
        return self.store.open_position(user, exchange, symbol, PositionSide(side))


def of_type(events: Iterable[wire.Event], cls: type[E]) -> list[E]:
    """The events of exactly type ``cls`` (not its subclasses' siblings)."""
    return [event for event in events if type(event) is cls]


def replay(events: Iterable[wire.Event]) -> Book:
    """A fresh book built from a log, as a projection rebuild would."""
    book = Book()
    evolve(book, events)
    return book


def fraction(value: Decimal | str) -> Fraction:
    """The exact rational value of a decimal (for hand-written expectations)."""
    return Fraction(Decimal(value))


def event_fields(event: wire.Event) -> dict[str, bytes | str]:
    """The stream entry fields of an event, as the append step writes them."""
    return {"type": event.type, "data": wire.encode(event)}
