"""Evolving state by events: ``apply`` one event to one aggregate, ``evolve`` a whole book.

Events carry the resulting values (a position event the whole position), so evolving is taking
them as they are: replaying a log rebuilds exactly the states the decider saw.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import msgspec

from ledger.domain import wire
from ledger.domain.mapping import order_changes
from ledger.domain.state import Book, OrderState, PositionState, StateError, slot_field
from ledger.domain.values import exact, format_decimal

# The position fields a position event carries besides its envelope.
POSITION_FIELDS: tuple[str, ...] = tuple(
    name for name in PositionState.__struct_fields__ if name not in ("id", "user_id", "exchange", "symbol", "version")
)
# A state value an event leaves out while it is None (``msgspec.UNSET`` on the wire): events of
# markets without a contract value keep the shape they had before it was recorded.
UNSET_WHEN_NONE = "contract_value"


class DriftState(msgspec.Struct, kw_only=True, gc=False):
    """A drift as its two events leave it (``open`` after ``DriftDetected``, ``resolved`` after
    ``DriftResolved``): what ``ledger history <drift id>`` and ``ledger verify --venue`` show.
    Never stored: the slot says whether a drift is open, the log says the rest."""

    id: str
    user_id: str
    exchange: str
    symbol: str
    market: str
    kind: str
    status: str = "open"
    evidence: dict[str, Any] = {}
    detected_event_id: str = ""
    resolution: str | None = None
    reason: str | None = None
    adjustment_event_id: str | None = None
    position_id: str | None = None
    version: int = 0


def _drift(state: DriftState | None, event: wire.DriftEvent) -> DriftState:
    if isinstance(event, wire.DriftDetected):
        return DriftState(
            id=event.stream,
            user_id=event.user_id,
            exchange=str(event.exchange),
            symbol=event.symbol,
            market=event.market,
            kind=str(event.kind),
            evidence=event.evidence,
            detected_event_id=event.event_id,
            version=event.version,
        )
    if state is None or not isinstance(event, wire.DriftResolved):
        raise StateError(f"{event.type} v{event.version} of {event.stream}: a drift resolved that was never detected")
    return msgspec.structs.replace(
        state,
        status="resolved",
        resolution=str(event.resolution),
        reason=event.reason,
        adjustment_event_id=event.adjustment_event_id,
        position_id=event.position_id,
        version=event.version,
    )


DRIFT_SLOT_PREFIX = "drift|"


def drift_slot(user_id: str, exchange: str, market: str, kind: str) -> str:
    """The field of the shard's ``slots`` hash that holds the id of the one open drift of
    (user, exchange, canonical market, kind); absent while none is open. No user id, exchange,
    market or kind contains ``|``, so it never names a position slot."""
    return f"{DRIFT_SLOT_PREFIX}{user_id}|{exchange}|{market}|{kind}"


def slot_user(slot: str) -> str:
    """The user of a slot: a position slot's (``slot_field``: four parts) or a drift slot's
    (``drift_slot``: the prefix and four parts)."""
    parts = slot.split("|")
    return parts[1] if len(parts) == 5 and slot.startswith(DRIFT_SLOT_PREFIX) else parts[0]


@exact
def position_payload(position: PositionState) -> dict[str, Any]:
    """A position's fields as a position event carries them (decimals as wire strings)."""
    payload: dict[str, Any] = {}
    for name in POSITION_FIELDS:
        value = position.gross_pnl - position.fees if name == "realized_pnl" else getattr(position, name)
        if isinstance(value, Decimal):
            value = format_decimal(value)
        elif name == "other_fees":
            value = {currency: format_decimal(amount) for currency, amount in value.items()}
        payload[name] = value
    if payload[UNSET_WHEN_NONE] is None:
        payload[UNSET_WHEN_NONE] = msgspec.UNSET
    return payload


def _none_when_unset(data: dict[str, Any]) -> dict[str, Any]:
    if data[UNSET_WHEN_NONE] is msgspec.UNSET:
        data[UNSET_WHEN_NONE] = None
    return data


def _order_from_placed(event: wire.OrderPlaced) -> OrderState:
    data = msgspec.structs.asdict(event)
    for name in ("event_id", "stream", "command_id", "ts", "schema"):
        data.pop(name)
    data.update(id=event.stream, created_at=event.ts, updated_at=event.ts)
    return msgspec.convert(_none_when_unset(data), OrderState)


def apply(
    state: OrderState | PositionState | DriftState | None, event: wire.Event
) -> OrderState | PositionState | DriftState:
    """Evolve one aggregate by one of its events (no arithmetic: the event carries the results,
    and a Decimal read from its text is exact in any context)."""
    if isinstance(event, wire.DriftEvent):
        return _drift(state if isinstance(state, DriftState) else None, event)
    if isinstance(event, wire.PositionEvent):
        return position_from_event(event)
    if isinstance(event, wire.OrderPlaced):
        return _order_from_placed(event)
    if not isinstance(state, OrderState) or not isinstance(event, wire.OrderChange):
        raise StateError(f"{event.type} v{event.version} of {event.stream}: an order event for an order never placed")
    changes = order_changes(event)
    if isinstance(event, wire.OrderFilled):
        changes["fill_ids"] = [*state.fill_ids, event.fill_id]
    return msgspec.structs.replace(state, **changes)


def position_from_event(event: wire.PositionEvent) -> PositionState:
    data = {name: getattr(event, name) for name in POSITION_FIELDS}
    data.update(
        id=event.stream,
        user_id=event.user_id,
        exchange=event.exchange,
        symbol=event.symbol,
        version=event.version,
    )
    return msgspec.convert(_none_when_unset(data), PositionState)


def evolve(book: Book, events: Iterable[wire.Event]) -> set[str]:
    """Apply events to a book in place, keeping its position slots current; return the slots
    the events changed.

    A position event sets its side's slot to the position while it is open and clears it when it
    closes. An ``open_position`` entry order reserves the slot for the position it names while
    its side has none open, so the fills and any second ``open_position`` name that position.
    A drift's events set its drift slot (``drift_slot``) to the drift while it is open and clear
    it when it is resolved; a drift has no state beyond that.
    """
    changed: set[str] = set()
    for event in events:
        if isinstance(event, wire.DriftEvent):
            slot = drift_slot(event.user_id, event.exchange, event.market, event.kind)
            book.slots[slot] = event.stream if isinstance(event, wire.DriftDetected) else None
            changed.add(slot)
            continue
        if isinstance(event, wire.PositionEvent):
            position = position_from_event(event)
            book.positions[position.id] = position
            slot = slot_field(position.user_id, position.exchange, position.symbol, position.side)
            book.slots[slot] = position.id if position.is_open else None
            changed.add(slot)
            continue
        book.orders[event.stream] = apply(book.orders.get(event.stream), event)  # type: ignore[assignment]
        if isinstance(event, wire.OrderPlaced) and event.intent == "open" and event.position_side and event.position_id:
            side = event.position_side
            if book.open_position(event.user_id, event.exchange, event.symbol, side) is None:
                slot = slot_field(event.user_id, event.exchange, event.symbol, side)
                book.slots[slot] = event.position_id
                book.positions.setdefault(event.position_id, None)
                changed.add(slot)
    return changed


@dataclass(slots=True)
class Latest:
    """The last state of every order and position that events touched, folded without the
    position slots (``evolve`` keeps those for the decider): what a book holds after ``evolve``
    over the same events, less its placeholders. A position event carries the whole position,
    so only each position's last event is kept while folding and made a state at the end
    (``positions``): a log of many events per position folds at the cost of its order events."""

    orders: dict[str, OrderState] = field(default_factory=dict)
    last_position_events: dict[str, wire.PositionEvent] = field(default_factory=dict)

    def fold(self, events: Iterable[wire.Event]) -> None:
        orders, positions = self.orders, self.last_position_events
        for event in events:
            if isinstance(event, wire.PositionEvent):
                positions[event.stream] = event
            elif not isinstance(event, wire.DriftEvent):  # a drift changes no order or position
                orders[event.stream] = apply(orders.get(event.stream), event)  # type: ignore[assignment]

    def positions(self) -> list[PositionState]:
        return [position_from_event(event) for event in self.last_position_events.values()]
