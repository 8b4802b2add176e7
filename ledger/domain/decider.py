"""The decider: pure functions from (state, command) to events, and from (state, event) to state.

``decide(command, book, ctx)`` returns a ``Decision`` (the events to append) or a ``Rejection``
(a code and a message); it performs no I/O. ``book`` holds the user's aggregates the command
touches, loaded beforehand by following ``requirements(command, book)`` until it is satisfied.
``ledger.domain.evolution`` evolves state by events; replaying a log through it gives exactly the
states the decider saw, because events carry the resulting values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any, NamedTuple, get_args

import msgspec

from ledger.domain import arithmetic, wire
from ledger.domain.enums import (
    Exchange,
    InstrumentKind,
    OrderSide,
    OrderStatus,
    OrderType,
    PositionSide,
    PositionStatus,
)
from ledger.domain.evolution import drift_slot, position_payload
from ledger.domain.instruments import Instrument, InstrumentTable, instrument_for
from ledger.domain.state import Book, OrderState, PositionState, StateError, slot_field
from ledger.domain.transitions import LATE_FILL_STATUSES, Trigger, next_status, refusal
from ledger.domain.values import MAX_AMOUNT, ZERO, ValueRuleError, exact, format_decimal, parse_decimal


class RejectCode(StrEnum):
    INVALID_COMMAND = "INVALID_COMMAND"
    UNKNOWN_ORDER = "UNKNOWN_ORDER"
    UNKNOWN_POSITION = "UNKNOWN_POSITION"
    DUPLICATE_FILL = "DUPLICATE_FILL"
    INVALID_TRANSITION = "INVALID_TRANSITION"
    INVALID_ORDER = "INVALID_ORDER"
    SPOT_SHORT = "SPOT_SHORT"
    NO_POSITION = "NO_POSITION"
    POSITION_NOT_OPEN = "POSITION_NOT_OPEN"
    SIZE_EXCEEDS_POSITION = "SIZE_EXCEEDS_POSITION"
    DRIFT_OPEN = "DRIFT_OPEN"
    NO_DRIFT = "NO_DRIFT"


@dataclass(frozen=True, slots=True)
class Rejection:
    code: RejectCode
    message: str
    order_id: str | None = None
    position_id: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    events: list[wire.Event]
    order_id: str | None = None
    position_id: str | None = None


@dataclass(frozen=True, slots=True)
class Context:
    """What a decision may depend on besides state: the clock, an id source and the instrument
    data of the markets (from the exchange layer: ``ledger.venues.markets.instrument_table``)."""

    now: int
    new_id: Callable[[], str]
    instruments: InstrumentTable

    def instrument(self, exchange: Exchange, symbol: str) -> Instrument:
        return instrument_for(exchange, symbol, self.instruments)

    def recorded(self, aggregate: OrderState | PositionState) -> Instrument:
        """The instrument of an order or a position with the contract value its events recorded
        (``Instrument.as_recorded``: none recorded reads as today's market data)."""
        return self.instrument(aggregate.exchange, aggregate.symbol).as_recorded(aggregate.contract_value)


class Requirements(NamedTuple):
    """The orders, positions and slots a command needs in the book (a tuple: built several times
    per command while a batch loads, so cheaply)."""

    order_ids: frozenset[str] = frozenset()
    position_ids: frozenset[str] = frozenset()
    slots: frozenset[str] = frozenset()

    def missing(self, book: Book) -> Requirements:
        return Requirements(
            frozenset(i for i in self.order_ids if i not in book.orders),
            frozenset(i for i in self.position_ids if i not in book.positions),
            frozenset(s for s in self.slots if s not in book.slots),
        )

    def __bool__(self) -> bool:
        return bool(self.order_ids or self.position_ids or self.slots)

    def overlaps(self, other: Requirements) -> bool:
        """Whether the two name an aggregate or a slot in common."""
        return not (
            self.order_ids.isdisjoint(other.order_ids)
            and self.position_ids.isdisjoint(other.position_ids)
            and self.slots.isdisjoint(other.slots)
        )


_SIDES = tuple(PositionSide)
# The commands that name a market rather than an order or a position; those that read drift slots.
_MARKET_COMMANDS = (wire.PlaceOrder, wire.OpenPosition, wire.AdjustPosition)
_DriftCommand = wire.RecordDrift | wire.ResolveDrift | wire.AdjustPosition
_DRIFT_COMMANDS = get_args(_DriftCommand)
# An adopted order is at the venue and acknowledged: the status of a placed order accepted.
ADOPTED_STATUS = next_status(OrderStatus.PENDING, Trigger.ACCEPT)
_NOTHING: frozenset[str] = frozenset()


def requirements(command: wire.Command, book: Book, instruments: InstrumentTable) -> Requirements:
    """What ``decide`` needs in the book; load it, then ask again until nothing is missing.
    ``instruments`` is the table ``decide``'s context carries: a drift is keyed by the canonical
    market it gives (``drift_market``)."""
    user = command.user_id
    order_ids = _NOTHING
    position_ids: set[str] = set()
    market: tuple[str, str] | None = None
    if isinstance(command, _MARKET_COMMANDS):  # names no order or position
        market = (command.exchange, command.symbol)
    else:
        order_id = getattr(command, "order_id", None)
        if order_id is not None:
            order_id = order_id.lower()
            order_ids = frozenset((order_id,))
            order = book.orders.get(order_id)
            if order is not None and order.user_id == user:
                market = (order.exchange, order.symbol)
                if order.position_id:
                    position_ids.add(order.position_id)
        position_id = getattr(command, "position_id", None)
        if position_id is not None:
            position_ids.add(position_id.lower())
    slots = _NOTHING
    if market is not None:
        slots = frozenset([slot_field(user, market[0], market[1], side) for side in _SIDES])
        for slot in slots:
            held = book.slots.get(slot)
            if held:
                position_ids.add(held)
    if isinstance(command, _DRIFT_COMMANDS):
        slots = slots | _drift_slots(command, instruments)
    return Requirements(order_ids, frozenset(position_ids), slots)


def drift_market(exchange: Exchange, symbol: str, instruments: InstrumentTable) -> str:
    """The canonical market a drift of ``symbol`` is keyed by: the market's unified symbol when
    the market data knows it (``BTC-USDT-SWAP`` and ``BTC/USDT:USDT`` are one market), else the
    symbol as sent."""
    return instrument_for(exchange, symbol, instruments).market or symbol


def _drift_slots(command: _DriftCommand, instruments: InstrumentTable) -> frozenset[str]:
    """The drift slots a drift command reads: its kind's, or both kinds' for an adjustment."""
    kinds = (command.kind,) if isinstance(command, wire.RecordDrift | wire.ResolveDrift) else tuple(wire.DriftKind)
    market = drift_market(command.exchange, command.symbol, instruments)
    return frozenset(drift_slot(command.user_id, command.exchange, market, kind) for kind in kinds)


class _Rejected(Exception):
    def __init__(self, code: RejectCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _decimal(value: str | None, field_name: str, *, positive: bool = False) -> Decimal | None:
    if value is None:
        return None
    try:
        return parse_decimal(value, field_name, positive=positive)
    except ValueRuleError as exc:
        raise _Rejected(RejectCode.INVALID_COMMAND, str(exc)) from exc


def _required(value: str, field_name: str) -> Decimal:
    try:
        return parse_decimal(value, field_name, positive=True)
    except ValueRuleError as exc:
        raise _Rejected(RejectCode.INVALID_COMMAND, str(exc)) from exc


def _text(value: Decimal | None) -> str | None:
    return None if value is None else format_decimal(value)


class _Emitter:
    """Builds the envelopes of one decision's events."""

    def __init__(self, command: wire.Command, ctx: Context) -> None:
        self.command = command
        self.ctx = ctx
        self.events: list[wire.Event] = []

    def emit(
        self,
        cls: type[wire.Event],
        stream: str,
        version: int,
        exchange: str,
        symbol: str,
        **data: Any,
    ) -> Any:
        event = cls(
            event_id=self.ctx.new_id(),
            stream=stream,
            version=version,
            command_id=self.command.command_id,
            user_id=self.command.user_id,
            exchange=exchange,  # type: ignore[arg-type]
            symbol=symbol,
            ts=self.ctx.now,
            schema=cls.SCHEMA,
            **data,
        )
        self.events.append(event)
        return event


@exact
def decide(command: wire.Command, book: Book, ctx: Context) -> Decision | Rejection:
    """Decide what a command means, given the loaded book. Pure: no I/O, no clock."""
    handler = _DECIDERS[type(command)]
    emitter = _Emitter(command, ctx)
    try:
        order_id, position_id = handler(command, book, emitter)
    except _Rejected as rejected:
        return Rejection(
            rejected.code,
            rejected.message,
            order_id=_ref(getattr(command, "order_id", None)),
            position_id=_ref(getattr(command, "position_id", None)),
        )
    return Decision(emitter.events, order_id, position_id)


def _ref(value: str | None) -> str | None:
    return value.lower() if value else None


# --------------------------------------------------------------------------- orders


def _owned_order(command: wire.Command, book: Book) -> OrderState:
    order_id = command.order_id.lower()  # type: ignore[attr-defined]
    order = book.orders.get(order_id)
    if order is None or order.user_id != command.user_id:
        raise _Rejected(RejectCode.UNKNOWN_ORDER, f"order {order_id} is not known for user {command.user_id}")
    return order


def _owned_position(command: wire.Command, book: Book) -> PositionState:
    position_id = command.position_id.lower()  # type: ignore[attr-defined]
    position = book.positions.get(position_id)
    if position is None or position.user_id != command.user_id:
        raise _Rejected(
            RejectCode.UNKNOWN_POSITION,
            f"position {position_id} is not known for user {command.user_id}",
        )
    if not position.is_open:
        raise _Rejected(RejectCode.POSITION_NOT_OPEN, f"position {position_id} is {position.status}")
    return position


def _transition(order: OrderState, trigger: Trigger) -> OrderStatus:
    """The order's status after ``trigger`` (``ledger.domain.transitions``); refused: INVALID_TRANSITION."""
    status = next_status(order.status, trigger)
    if status is None:
        raise _Rejected(RejectCode.INVALID_TRANSITION, refusal(order.id, order.status, trigger))
    return status


def _check_order_shape(order_type: OrderType, price: Decimal | None, trigger: Decimal | None) -> None:
    if order_type.needs_price and price is None:
        raise _Rejected(RejectCode.INVALID_ORDER, f"price: required for a {order_type} order")
    if order_type.needs_trigger and trigger is None:
        raise _Rejected(RejectCode.INVALID_ORDER, f"trigger_price: required for a {order_type} order")


def _check_amount(instrument: Instrument, quantity: Decimal, *prices: Decimal | None) -> None:
    """Refuse an order whose value at a price it names is out of range: a venue could never
    report its fill (the fee and the PnL of that value would not fit the decimal rule)."""
    for price in prices:
        if price is not None and not arithmetic.amount_fits(instrument, quantity, price):
            raise _Rejected(
                RejectCode.INVALID_ORDER,
                f"quantity {format_decimal(quantity)} at {format_decimal(price)} is worth more than "
                f"{format_decimal(MAX_AMOUNT)} {instrument.settle}: split the order",
            )


def _check_spot_short(
    instrument: Instrument,
    book: Book,
    user: str,
    exchange: str,
    symbol: str,
    side: OrderSide,
    quantity: Decimal,
) -> None:
    if instrument.kind is not InstrumentKind.SPOT or side is OrderSide.BUY:
        return
    held = book.open_position(user, exchange, symbol, PositionSide.LONG)
    size = held.size if held else ZERO  # net of the fees paid in the coin (README, CONTRACT §7 for spot)
    if quantity > size:
        held_text, coin = format_decimal(size), instrument.base
        raise _Rejected(
            RejectCode.SPOT_SHORT,
            f"selling {format_decimal(quantity)} {symbol} spot would go short: {held_text} {coin} held "
            f"(fees paid in {coin} are not held); sell at most {held_text}",
        )


def _place(
    command: wire.Command,
    book: Book,
    out: _Emitter,
    *,
    exchange: str,
    symbol: str,
    side: OrderSide,
    order_type: OrderType,
    quantity: Decimal,
    price: Decimal | None,
    event: type[wire.OrderPlaced] = wire.OrderPlaced,
    order_id: str | None = None,
    instrument: Instrument | None = None,
    **extra: Any,
) -> str:
    """Emit the order's placement, recording the contract value it is placed at: ``instrument``'s
    (default: today's market data). An order whose quantity a fill command could not carry (more
    than ``MAX_AMOUNT``: a position grown past it by several fills, closed whole) is refused: the
    venue's or the strategy's report of filling it would be refused on the wire."""
    if quantity > MAX_AMOUNT:
        raise _Rejected(
            RejectCode.INVALID_ORDER,
            f"quantity {format_decimal(quantity)} is more than {format_decimal(MAX_AMOUNT)}, the most one fill "
            "can report: split it (close a position in parts with size)",
        )
    order_id = order_id or out.ctx.new_id()
    recorded = (instrument or out.ctx.instrument(Exchange(exchange), symbol)).recorded_value
    out.emit(
        event,
        order_id,
        1,
        exchange,
        symbol,
        side=side,
        order_type=order_type,
        quantity=format_decimal(quantity),
        price=_text(price),
        contract_value=msgspec.UNSET if recorded is None else format_decimal(recorded),
        **extra,
    )
    return order_id


def _decide_place_order(command: wire.PlaceOrder, book: Book, out: _Emitter) -> tuple[str, str | None]:
    quantity = _required(command.quantity, "quantity")
    price = _decimal(command.price, "price", positive=True)
    trigger = _decimal(command.trigger_price, "trigger_price", positive=True)
    _check_order_shape(command.order_type, price, trigger)
    instrument = out.ctx.instrument(command.exchange, command.symbol)
    _check_amount(instrument, quantity, price, trigger)
    user, exchange, symbol = command.user_id, command.exchange, command.symbol
    if instrument.kind is InstrumentKind.SPOT and command.position_side is PositionSide.SHORT:
        raise _Rejected(RejectCode.SPOT_SHORT, f"{symbol} is spot: there is no short side")
    _check_spot_short(instrument, book, user, exchange, symbol, command.side, quantity)
    reduced = None
    if command.reduce_only:
        reduced_side = command.position_side or (
            PositionSide.SHORT if command.side is OrderSide.BUY else PositionSide.LONG
        )
        reduced = book.open_position(user, exchange, symbol, reduced_side)
        if reduced is None or reduced.side.opening_order_side is command.side:
            raise _Rejected(RejectCode.NO_POSITION, f"reduce_only: no open {reduced_side} position on {symbol}")
    order_id = _place(
        command,
        book,
        out,
        exchange=exchange,
        symbol=symbol,
        side=command.side,
        order_type=command.order_type,
        quantity=quantity,
        price=price,
        trigger_price=_text(trigger),
        client_order_id=command.client_order_id,
        position_side=command.position_side,
        reduce_only=command.reduce_only,
        leverage=command.leverage,
        grid_level=command.grid_level,
        position_id=reduced.id if reduced else None,
        metadata=command.metadata or {},
        instrument=out.ctx.recorded(reduced) if reduced else instrument,  # a reduction: the position's value
    )
    return order_id, reduced.id if reduced else None


def _decide_open_position(command: wire.OpenPosition, book: Book, out: _Emitter) -> tuple[str, str | None]:
    size = _required(command.size, "size")
    price = _decimal(command.price, "price", positive=True)
    stop_loss = _decimal(command.stop_loss, "stop_loss", positive=True)
    take_profit = _decimal(command.take_profit, "take_profit", positive=True)
    instrument = out.ctx.instrument(command.exchange, command.symbol)
    _check_amount(instrument, size, price)
    if instrument.kind is InstrumentKind.SPOT and command.side is PositionSide.SHORT:
        raise _Rejected(RejectCode.SPOT_SHORT, f"{command.symbol} is spot: a short cannot be opened")
    # The position the fills will change: the open one, else the one an unfilled entry order
    # already named (so two opens before a fill name one position), else a new one.
    position_id = book.position_id_for(command.user_id, command.exchange, command.symbol, command.side)
    position_id = position_id or out.ctx.new_id()
    order_id = _place(
        command,
        book,
        out,
        exchange=command.exchange,
        symbol=command.symbol,
        side=command.side.opening_order_side,
        order_type=OrderType.MARKET,
        quantity=size,
        price=price,
        position_side=command.side,
        leverage=command.leverage,
        position_id=position_id,
        intent="open",
        stop_loss=_text(stop_loss),
        take_profit=_text(take_profit),
        metadata=command.metadata or {},
        instrument=instrument,
    )
    return order_id, position_id


def _decide_adopt(command: wire.AdoptOrder, book: Book, out: _Emitter) -> tuple[str, str | None]:
    """An order already at the venue: a fact, so none of ``place_order``'s checks of what may be
    sent (spot short, amount, order shape) apply; its values must still be storable. Its id is
    derived from (user, exchange, venue order id): one venue order is adopted once."""
    order_id = command.order_id
    ours = wire.ledger_order_id(command.venue_client_order_id)
    if ours is not None:
        # Its client id is one the ledger derives from its own order ids: the ledger sent it, and
        # its fills are (or will be) that order's. Refused even when that order is not in the book
        # (another user's, or compacted once final): adopting it would count its fills twice.
        raise _Rejected(
            RejectCode.INVALID_TRANSITION,
            f"cannot adopt {command.exchange} order {command.exchange_order_id}: its client id "
            f"{command.venue_client_order_id} is the ledger's own (order {ours}); it is never adopted",
        )
    if book.orders.get(order_id) is not None:
        raise _Rejected(
            RejectCode.INVALID_TRANSITION,
            f"cannot adopt {command.exchange} order {command.exchange_order_id}: it is order {order_id} already",
        )
    _place(
        command,
        book,
        out,
        exchange=command.exchange,
        symbol=command.symbol,
        side=command.side,
        order_type=command.order_type,
        quantity=_required(command.quantity, "quantity"),
        price=_decimal(command.price, "price", positive=True),
        event=wire.OrderAdopted,
        order_id=order_id,
        trigger_price=_text(_decimal(command.trigger_price, "trigger_price", positive=True)),
        client_order_id=command.venue_client_order_id,
        position_side=command.position_side,
        reduce_only=command.reduce_only,
        leverage=command.leverage,
        metadata=command.metadata or {},
        exchange_order_id=command.exchange_order_id,
        status=ADOPTED_STATUS,
    )
    return order_id, None


def _decide_close_position(command: wire.ClosePosition, book: Book, out: _Emitter) -> tuple[str, str | None]:
    position = _owned_position(command, book)
    size = _decimal(command.size, "size", positive=True) or position.size
    price = _decimal(command.price, "price", positive=True)
    instrument = out.ctx.recorded(position)
    _check_amount(instrument, size, price)
    if size > position.size:
        raise _Rejected(
            RejectCode.SIZE_EXCEEDS_POSITION,
            f"size: {format_decimal(size)} exceeds the open size {format_decimal(position.size)}",
        )
    order_id = _place(
        command,
        book,
        out,
        exchange=position.exchange,
        symbol=position.symbol,
        side=position.side.opening_order_side.opposite,
        order_type=OrderType.MARKET,
        quantity=size,
        price=price,
        position_side=position.side,
        reduce_only=True,
        position_id=position.id,
        intent="close",
        close_reason=command.reason,
        instrument=instrument,
    )
    return order_id, position.id


def _decide_cancel(command: wire.CancelOrder, book: Book, out: _Emitter) -> tuple[str, str | None]:
    order = _owned_order(command, book)
    status = _transition(order, Trigger.REQUEST_CANCEL)
    out.emit(wire.OrderCancelRequested, order.id, order.version + 1, order.exchange, order.symbol, status=status)
    return order.id, _position_of(order, book)


def _position_of(order: OrderState, book: Book) -> str | None:
    """The position an order command's reply names: the order's, once it exists (an entry order's
    reserved id is named by ``open_position`` and by the fills that open it, never before)."""
    return order.position_id if order.position_id and book.positions.get(order.position_id) else None


def _decide_accepted(command: wire.OrderAcceptedCommand, book: Book, out: _Emitter) -> tuple[str, str | None]:
    order = _owned_order(command, book)
    # The venue's acknowledgement is a fact, whenever it arrives: after a cancel request, or after
    # a fill that already accepted the order implicitly (venues report those out of order), it
    # records the venue's order id and leaves the status as it is. Only once per order.
    if order.exchange_order_id is not None:
        raise _Rejected(
            RejectCode.INVALID_TRANSITION,
            f"cannot accept order {order.id}: it is already acknowledged as {order.exchange_order_id}",
        )
    status = _transition(order, Trigger.ACCEPT)
    out.emit(
        wire.OrderAccepted,
        order.id,
        order.version + 1,
        order.exchange,
        order.symbol,
        exchange_order_id=command.exchange_order_id,
        status=status,
    )
    return order.id, _position_of(order, book)


def _decide_rejected(command: wire.OrderRejectedCommand, book: Book, out: _Emitter) -> tuple[str, str | None]:
    order = _owned_order(command, book)
    status = _transition(order, Trigger.REJECT)
    if order.filled_qty > 0:
        raise _Rejected(RejectCode.INVALID_TRANSITION, f"cannot reject order {order.id}: it has fills")
    out.emit(
        wire.OrderRejected,
        order.id,
        order.version + 1,
        order.exchange,
        order.symbol,
        reason=command.reason,
        status=status,
    )
    return order.id, _position_of(order, book)


def _final_transition(cls: type[wire.Event], trigger: Trigger) -> Callable[..., tuple[str, str | None]]:
    def decide_final(command: wire.Command, book: Book, out: _Emitter) -> tuple[str, str | None]:
        order = _owned_order(command, book)
        status = _transition(order, trigger)
        out.emit(cls, order.id, order.version + 1, order.exchange, order.symbol, status=status)
        return order.id, _position_of(order, book)

    return decide_final


# --------------------------------------------------------------------------- fills


def _fill_status(order: OrderState, filled: Decimal) -> tuple[OrderStatus, bool]:
    """The order status after a fill, and whether the fill came after a final status (late)."""
    status = _transition(order, Trigger.FILL_ALL if filled >= order.quantity else Trigger.FILL)
    return status, order.status in LATE_FILL_STATUSES


def _decide_fill(command: wire.RecordFill, book: Book, out: _Emitter) -> tuple[str, str | None]:
    order = _owned_order(command, book)
    if command.fill_id in order.fill_ids:
        raise _Rejected(
            RejectCode.DUPLICATE_FILL,
            f"fill {command.fill_id} is already recorded for order {order.id}",
        )
    quantity = _required(command.quantity, "quantity")
    price = _required(command.price, "price")
    fee = _decimal(command.fee, "fee") or ZERO
    fee_currency = command.fee_currency.upper() if command.fee_currency else None
    instrument = out.ctx.recorded(order)
    filled = order.filled_qty + quantity
    fill_basis = order.fill_basis + arithmetic.basis(instrument, quantity, price)
    status, late = _fill_status(order, filled)
    fill = _spot_coin_fee(order, command, quantity, price, fee, fee_currency, instrument, out) or _Fill(
        order, command, quantity, price, fee, fee_currency, instrument, out
    )
    touched, unapplied = fill.apply_to_positions(book)
    out.emit(
        wire.OrderFilled,
        order.id,
        order.version + 1,
        order.exchange,
        order.symbol,
        side=order.side,
        fill_id=command.fill_id,
        quantity=format_decimal(quantity),
        price=format_decimal(price),
        fee=format_decimal(fee),
        fee_currency=fee_currency,
        fee_source=command.fee_source or msgspec.UNSET,
        fill_ts=command.ts if command.ts is not None else out.ctx.now,
        filled_qty=format_decimal(filled),
        avg_fill_price=format_decimal(arithmetic.average_price(instrument, filled, fill_basis)),
        fill_basis=format_decimal(fill_basis),
        status=status,
        overfill=filled > order.quantity,
        late=late,
        position_ids=touched,
        unapplied_qty=format_decimal(unapplied),
    )
    out.events.insert(0, out.events.pop())
    return order.id, touched[-1] if touched else _position_of(order, book)


def _spot_coin_fee(
    order: OrderState,
    command: wire.RecordFill,
    quantity: Decimal,
    price: Decimal,
    fee: Decimal,
    fee_currency: str | None,
    instrument: Instrument,
    out: _Emitter,
) -> _Fill | None:
    """The fill as it moves a spot holding when its fee is paid in the coin traded (CONTRACT §7
    refined for spot, README): a buy adds ``quantity - fee`` to the position, a sell takes
    ``quantity + fee`` from it, and the fee counts in ``fees`` (the quote currency) at the fill's
    own price, ``fee * price`` (exact). The order keeps the venue's quantity. None for any other
    fill. A fee that leaves nothing to move is refused."""
    if not instrument.pays_in_base(fee_currency):
        return None
    held = arithmetic.held_change(order.side, quantity, fee)
    if held <= 0:
        raise _Rejected(
            RejectCode.INVALID_COMMAND,
            f"fee: {format_decimal(fee)} {fee_currency} leaves no {fee_currency} to move for a {order.side} of "
            f"{format_decimal(quantity)}: report the fee the venue charged (in {instrument.quote} if it took that)",
        )
    return _Fill(order, command, held, price, fee * price, instrument.settle, instrument, out)


@dataclass(slots=True)
class _Fill:
    """One fill routed to positions: ``quantity`` and ``fee`` as the positions take them (the
    venue's, except for a spot fee paid in the coin: ``_spot_coin_fee``)."""

    order: OrderState
    command: wire.RecordFill
    quantity: Decimal
    price: Decimal
    fee: Decimal
    fee_currency: str | None
    instrument: Instrument
    out: _Emitter

    def apply_to_positions(self, book: Book) -> tuple[list[str], Decimal]:
        """Route the fill to the positions it changes; return their ids and the unapplied rest."""
        order = self.order
        user, exchange, symbol = order.user_id, order.exchange, order.symbol
        if order.position_side is not None:
            side = order.position_side
            if order.side is side.opening_order_side:
                return [self._open_or_increase(book, side, self.quantity, self.fee)], ZERO
            return self._reduce_only(book.open_position(user, exchange, symbol, side))
        opening_side = PositionSide.LONG if order.side is OrderSide.BUY else PositionSide.SHORT
        opposite = book.open_position(user, exchange, symbol, opening_side.opposite)
        # Nothing may open from a reduce-only order, nor a short on spot (there is no short side).
        cannot_open = order.reduce_only or (
            self.instrument.kind is InstrumentKind.SPOT and opening_side is PositionSide.SHORT
        )
        if opposite is None:
            if cannot_open:
                return [], self.quantity
            return [self._open_or_increase(book, opening_side, self.quantity, self.fee)], ZERO
        closing = min(self.quantity, opposite.size)
        rest = self.quantity - closing
        closing_fee = arithmetic.split_fee(self.fee, closing, self.quantity)
        touched = [
            self._reduce(
                opposite,
                closing,
                closing_fee,
                reason=order.close_reason or ("flip" if rest else "order"),
            )
        ]
        if rest == 0:
            return touched, ZERO
        if cannot_open:
            return touched, rest
        touched.append(self._open_or_increase(book, opening_side, rest, self.fee - closing_fee))
        return touched, ZERO

    def _reduce_only(self, held: PositionState | None) -> tuple[list[str], Decimal]:
        if held is None:
            return [], self.quantity
        closing = min(self.quantity, held.size)
        reason = self.order.close_reason or "order"
        return [self._reduce(held, closing, self.fee, reason=reason, excess=self.quantity - closing)], ZERO

    def _fee_fields(self, position: PositionState, fee: Decimal) -> dict[str, Any]:
        if self.fee_currency is None or self.fee_currency == self.instrument.settle:
            return {"fees": position.fees + fee}
        other = dict(position.other_fees)
        other[self.fee_currency] = other.get(self.fee_currency, ZERO) + fee
        return {"other_fees": other}

    def _open_or_increase(self, book: Book, side: PositionSide, quantity: Decimal, fee: Decimal) -> str:
        """Increase the open position of ``side``, or open it: there is at most one per side."""
        order, now = self.order, self.out.ctx.now
        added = arithmetic.basis(self.instrument, quantity, self.price)
        held = book.open_position(order.user_id, order.exchange, order.symbol, side)
        if held is None:
            pending = book.position_id_for(order.user_id, order.exchange, order.symbol, side)
            reserved = order.position_id
            reusable = reserved is not None and reserved in book.positions and book.positions[reserved] is None
            base = PositionState(
                id=pending or (reserved if reusable else self.out.ctx.new_id()),  # type: ignore[arg-type]
                user_id=order.user_id,
                exchange=order.exchange,
                symbol=order.symbol,
                side=side,
                leverage=order.leverage or 1,
                metadata=order.metadata if order.intent == "open" else {},
                contract_value=self.instrument.recorded_value,  # the order's: it opens at it
                created_at=now,
            )
            cls: type[wire.PositionEvent] = wire.PositionOpened
        else:
            base, cls = held, wire.PositionIncreased
        entry_qty = base.entry_qty + quantity
        entry_basis = base.entry_basis + added
        changed = msgspec.structs.replace(
            base,
            size=base.size + quantity,
            entry_qty=entry_qty,
            entry_basis=entry_basis,
            entry_price=arithmetic.average_price(self.instrument, entry_qty, entry_basis),
            stop_loss=order.stop_loss or base.stop_loss,
            take_profit=order.take_profit or base.take_profit,
            **self._fee_fields(base, fee),
        )
        return self._emit(cls, changed, quantity, fee)

    def _reduce(
        self,
        held: PositionState,
        quantity: Decimal,
        fee: Decimal,
        *,
        reason: str,
        excess: Decimal = ZERO,
    ) -> str:
        # A position keeps the contract value it opened at, whatever the order's or today's.
        instrument = self.out.ctx.recorded(held)
        pnl = arithmetic.gross_pnl(instrument, held.side, held.entry_price, self.price, quantity)
        exit_qty = held.exit_qty + quantity
        exit_basis = held.exit_basis + arithmetic.basis(self.instrument, quantity, self.price)
        size = held.size - quantity
        closed = size == 0
        changed = msgspec.structs.replace(
            held,
            size=size,
            exit_qty=exit_qty,
            exit_basis=exit_basis,
            exit_price=arithmetic.average_price(self.instrument, exit_qty, exit_basis),
            gross_pnl=held.gross_pnl + pnl,
            excess_qty=held.excess_qty + excess,
            status=PositionStatus.CLOSED if closed else held.status,
            close_reason=reason if closed else held.close_reason,
            closed_at=self.out.ctx.now if closed else None,
            **self._fee_fields(held, fee),
        )
        cls = wire.PositionClosed if closed else wire.PositionReduced
        return self._emit(cls, changed, quantity, fee, pnl)

    def _emit(
        self,
        cls: type[wire.PositionEvent],
        position: PositionState,
        quantity: Decimal,
        fee: Decimal,
        pnl: Decimal = ZERO,
    ) -> str:
        emit_position(
            self.out,
            cls,
            position,
            order_id=self.order.id,
            fill_id=self.command.fill_id,
            change_qty=format_decimal(quantity),
            change_price=format_decimal(self.price),
            change_fee=format_decimal(fee),
            change_fee_currency=self.fee_currency,
            change_pnl=format_decimal(pnl),
        )
        return position.id


def emit_position(out: _Emitter, cls: type[wire.PositionEvent], position: PositionState, **change: Any) -> None:
    """Emit a position event carrying the whole resulting position, its contract value recorded:
    a position opened before values were recorded gets today's, which its PnL just used
    (``Context.recorded``), and keeps it from then on."""
    if position.contract_value is None:
        recorded = out.ctx.instrument(position.exchange, position.symbol).recorded_value
        position = msgspec.structs.replace(position, contract_value=recorded)
    payload = position_payload(position)
    payload["updated_at"] = out.ctx.now
    out.emit(cls, position.id, position.version + 1, position.exchange, position.symbol, **payload, **change)


def _decide_liquidation(command: wire.LiquidatePosition, book: Book, out: _Emitter) -> tuple[str | None, str | None]:
    position = _owned_position(command, book)
    price = _required(command.price, "price")
    instrument = out.ctx.recorded(position)
    quantity = position.size
    pnl = arithmetic.gross_pnl(instrument, position.side, position.entry_price, price, quantity)
    exit_qty = position.exit_qty + quantity
    exit_basis = position.exit_basis + arithmetic.basis(instrument, quantity, price)
    liquidated = msgspec.structs.replace(
        position,
        size=ZERO,
        exit_qty=exit_qty,
        exit_basis=exit_basis,
        exit_price=arithmetic.average_price(instrument, exit_qty, exit_basis),
        gross_pnl=position.gross_pnl + pnl,
        status=PositionStatus.LIQUIDATED,
        close_reason="liquidation",
        closed_at=out.ctx.now,
    )
    emit_position(
        out,
        wire.PositionLiquidated,
        liquidated,
        change_qty=format_decimal(quantity),
        change_price=format_decimal(price),
        change_pnl=format_decimal(pnl),
    )
    return None, position.id


# --------------------------------------------------------------------------- drifts and adjustments


def _open_drift(book: Book, slot: str) -> str | None:
    """The id of the drift open in ``slot`` (None: none). The slot must have been loaded."""
    if slot not in book.slots:
        raise StateError(f"drift slot {slot} was not loaded before deciding: requirements() names it")
    return book.slots[slot]


def _decide_record_drift(command: wire.RecordDrift, book: Book, out: _Emitter) -> tuple[str | None, str | None]:
    """``DriftDetected`` (version 1 of a new drift) unless one is open for the same key."""
    market = drift_market(command.exchange, command.symbol, out.ctx.instruments)
    user = command.user_id
    open_id = _open_drift(book, drift_slot(user, command.exchange, market, command.kind))
    if open_id is not None:
        raise _Rejected(
            RejectCode.DRIFT_OPEN,
            f"drift {open_id} is already open for {user} on {command.exchange} {market} ({command.kind}): "
            "correct it with adjust_position or close it with resolve_drift first",
        )
    out.emit(
        wire.DriftDetected,
        out.ctx.new_id(),
        1,
        command.exchange,
        command.symbol,
        market=market,
        kind=command.kind,
        evidence=command.evidence,
    )
    return None, None


def _decide_resolve_drift(command: wire.ResolveDrift, book: Book, out: _Emitter) -> tuple[str | None, str | None]:
    """``DriftResolved`` (version 2) of the open drift of the key; positions are not touched."""
    market = drift_market(command.exchange, command.symbol, out.ctx.instruments)
    user = command.user_id
    open_id = _open_drift(book, drift_slot(user, command.exchange, market, command.kind))
    if open_id is None:
        raise _Rejected(
            RejectCode.NO_DRIFT,
            f"no {command.kind} drift is open for {user} on {command.exchange} {market}: nothing to resolve "
            "(`ledger verify --venue` lists the open ones)",
        )
    out.emit(
        wire.DriftResolved,
        open_id,
        2,
        command.exchange,
        command.symbol,
        market=market,
        kind=command.kind,
        resolution=wire.DriftResolution(command.resolution),
        reason=command.reason,
    )
    return None, None


@dataclass(frozen=True, slots=True)
class _Adjustment:
    before: PositionState  # a new, empty position when none was open
    after: PositionState
    price: Decimal | None
    fee: Decimal | None


def _adjusted(command: wire.AdjustPosition, book: Book, out: _Emitter) -> _Adjustment:
    """The position before the adjustment and after it, with the command's price and fee."""
    size = _decimal(command.size, "size")
    if size is None or size < 0:
        raise _Rejected(
            RejectCode.INVALID_COMMAND, f"size: the position's new absolute size, 0 or more (got {command.size})"
        )
    price = _decimal(command.price, "price", positive=True)
    fee_adjustment = _decimal(command.fee_adjustment, "fee_adjustment")
    fee = fee_adjustment or ZERO
    user, exchange, symbol, side = command.user_id, command.exchange, command.symbol, command.side
    held = book.open_position(user, exchange, symbol, side)
    instrument = out.ctx.instrument(exchange, symbol) if held is None else out.ctx.recorded(held)
    if instrument.kind is InstrumentKind.SPOT and side is PositionSide.SHORT:
        raise _Rejected(RejectCode.SPOT_SHORT, f"{symbol} is spot: there is no short side to adjust")
    _check_amount(instrument, size, price)
    now = out.ctx.now
    if held is not None:
        if size == held.size and fee == 0:
            raise _Rejected(
                RejectCode.INVALID_COMMAND,
                f"adjust_position changes nothing: {side} position {held.id} is already {format_decimal(size)}; "
                "give another size or a fee_adjustment",
            )
        closed = size == 0
        after = msgspec.structs.replace(
            held,
            size=size,
            fees=held.fees + fee,
            status=PositionStatus.CLOSED if closed else held.status,
            close_reason="adjustment" if closed else held.close_reason,
            closed_at=now if closed else None,
        )
        return _Adjustment(held, after, price, fee_adjustment)
    if size == 0:
        raise _Rejected(
            RejectCode.NO_POSITION,
            f"no open {side} position on {symbol} to adjust: give a size above 0 and its price to open one",
        )
    if price is None:
        raise _Rejected(
            RejectCode.INVALID_COMMAND,
            f"price: required to open a {side} position on {symbol} by adjustment (its entry price)",
        )
    basis = arithmetic.basis(instrument, size, price)
    empty = PositionState(
        id=book.position_id_for(user, exchange, symbol, side) or out.ctx.new_id(),
        user_id=user,
        exchange=exchange,
        symbol=symbol,
        side=side,
        created_at=now,
    )
    opened = msgspec.structs.replace(
        empty,
        size=size,
        entry_qty=size,
        entry_basis=basis,
        entry_price=arithmetic.average_price(instrument, size, basis),
        fees=fee,
    )
    return _Adjustment(empty, opened, price, fee_adjustment)


def _decide_adjust_position(command: wire.AdjustPosition, book: Book, out: _Emitter) -> tuple[str | None, str | None]:
    """``PositionAdjusted`` (and ``PositionClosed`` when the new size is 0), then ``DriftResolved``
    of the market's open ``position_size`` drift, and of its ``fee`` drift when a
    ``fee_adjustment`` is given. Not a trade: the entry price and the gross PnL stay."""
    adjustment = _adjusted(command, book, out)
    before, after, price, fee = adjustment.before, adjustment.after, adjustment.price, adjustment.fee
    market = drift_market(command.exchange, command.symbol, out.ctx.instruments)
    kinds = (wire.DriftKind.POSITION_SIZE, *((wire.DriftKind.FEE,) if fee is not None else ()))
    drifts = [
        (kind, drift_id)
        for kind in kinds
        if (drift_id := _open_drift(book, drift_slot(command.user_id, command.exchange, market, kind)))
    ]
    emit_position(
        out,
        wire.PositionAdjusted,
        after,
        reason=command.reason,
        size_before=format_decimal(before.size),
        drift_ids=[drift_id for _kind, drift_id in drifts],
        change_qty=format_decimal(abs(after.size - before.size)),
        change_price=format_decimal(price if price is not None else after.entry_price),
        change_fee=format_decimal(fee or ZERO),
    )
    adjusted = out.events[-1]
    if not after.is_open:  # closed as every position closes, for every reader of PositionClosed
        closed = msgspec.structs.replace(after, version=after.version + 1)
        emit_position(out, wire.PositionClosed, closed, change_qty="0", change_price=format_decimal(after.entry_price))
    for kind, drift_id in drifts:
        out.emit(
            wire.DriftResolved,
            drift_id,
            2,
            command.exchange,
            command.symbol,
            market=market,
            kind=kind,
            resolution=wire.DriftResolution.ADJUSTED,
            reason=command.reason,
            adjustment_event_id=adjusted.event_id,
            position_id=after.id,
        )
    return None, after.id


_DECIDERS: dict[type[wire.Command], Callable[..., tuple[str | None, str | None]]] = {
    wire.PlaceOrder: _decide_place_order,
    wire.CancelOrder: _decide_cancel,
    wire.OrderAcceptedCommand: _decide_accepted,
    wire.OrderRejectedCommand: _decide_rejected,
    wire.RecordFill: _decide_fill,
    wire.OrderCancelledCommand: _final_transition(wire.OrderCancelled, Trigger.CONFIRM_CANCEL),
    wire.OrderExpiredCommand: _final_transition(wire.OrderExpired, Trigger.EXPIRE),
    wire.OpenPosition: _decide_open_position,
    wire.ClosePosition: _decide_close_position,
    wire.LiquidatePosition: _decide_liquidation,
    wire.RecordDrift: _decide_record_drift,
    wire.AdjustPosition: _decide_adjust_position,
    wire.ResolveDrift: _decide_resolve_drift,
    wire.AdoptOrder: _decide_adopt,
}
