"""Wire types of CONTRACT §3 to §5: commands, events, replies, and their single JSON codec.

Commands and events are tagged msgspec Structs. On a stream an entry has two fields, ``type``
and ``data`` (a JSON object); ``data`` carries the envelope fields and, for events, also the
``type`` tag. Decimals travel as strings, never JSON numbers. Every type has a schema version;
older versions are read through registered upcasters (see ``register_upcaster``). Decoding junk
raises ``WireError`` and nothing else.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from ledger.domain.enums import Exchange, OrderSide, OrderStatus, OrderType, PositionSide, PositionStatus
from ledger.domain.values import (
    MAX_TS_MS,
    MIN_TS_MS,
    RULES,
    ValueRuleError,
    check_identifier,
    check_json_object,
    text,
)
from ledger.errors import InvalidInput

Dec = Annotated[str, msgspec.Meta(pattern=RULES["decimal"].pattern)]
UserId = Annotated[str, msgspec.Meta(pattern=RULES["user_id"].pattern)]
Symbol = Annotated[str, msgspec.Meta(pattern=RULES["symbol"].pattern)]
CommandId = Annotated[str, msgspec.Meta(pattern=RULES["command_id"].pattern)]
ClientOrderId = Annotated[str, msgspec.Meta(pattern=RULES["client_order_id"].pattern)]
ExchangeOrderId = Annotated[str, msgspec.Meta(pattern=RULES["exchange_order_id"].pattern)]
FillId = Annotated[str, msgspec.Meta(pattern=RULES["fill_id"].pattern)]
FeeCurrency = Annotated[str, msgspec.Meta(pattern=RULES["fee_currency"].pattern)]
CloseReason = Annotated[str, msgspec.Meta(pattern=RULES["close_reason"].pattern)]
RejectReason = Annotated[str, msgspec.Meta(pattern=RULES["reject_reason"].pattern)]
Id = Annotated[str, msgspec.Meta(pattern=RULES["id"].pattern)]
Leverage = Annotated[int, msgspec.Meta(ge=1, le=1000)]
GridLevel = Annotated[int, msgspec.Meta(ge=0, le=100_000)]
Millis = Annotated[int, msgspec.Meta(ge=MIN_TS_MS, le=MAX_TS_MS)]


class WireError(InvalidInput):
    """An entry that is not a valid command or event. ``code`` says which rule it broke."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        command_id: str | None = None,
        user_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.command_id = command_id
        self.user_id = user_id


# --------------------------------------------------------------------------- commands


class Command(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    SCHEMA: ClassVar[int] = 1
    command_id: CommandId
    user_id: UserId
    schema: int = 1


def _check_metadata(metadata: dict[str, Any] | None, field: str = "metadata") -> None:
    """msgspec turns a ValueError raised here into a ValidationError naming the command."""
    if metadata is not None:
        try:
            check_json_object(metadata, field)
        except ValueRuleError as exc:
            raise ValueError(str(exc)) from None


class PlaceOrder(Command, tag="place_order", kw_only=True):
    exchange: Exchange
    symbol: Symbol
    side: OrderSide
    order_type: OrderType
    quantity: Dec
    price: Dec | None = None
    trigger_price: Dec | None = None
    client_order_id: ClientOrderId | None = None
    position_side: PositionSide | None = None
    reduce_only: bool = False
    leverage: Leverage | None = None
    grid_level: GridLevel | None = None
    metadata: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_metadata(self.metadata)


class CancelOrder(Command, tag="cancel_order", kw_only=True):
    order_id: Id


class OrderAcceptedCommand(Command, tag="order_accepted", kw_only=True):
    order_id: Id
    exchange_order_id: ExchangeOrderId


class OrderRejectedCommand(Command, tag="order_rejected", kw_only=True):
    order_id: Id
    reason: RejectReason


class RecordFill(Command, tag="record_fill", kw_only=True):
    order_id: Id
    fill_id: FillId
    quantity: Dec
    price: Dec
    fee: Dec | None = None
    fee_currency: FeeCurrency | None = None
    ts: Millis | None = None
    # "computed": the venue reported no fee and the ledger computed it from the market's rate
    # (ledger.domain.arithmetic.fill_fee); absent: the fee is the reporter's.
    fee_source: Literal["computed"] | None | msgspec.UnsetType = msgspec.UNSET


class OrderCancelledCommand(Command, tag="order_cancelled", kw_only=True):
    order_id: Id


class OrderExpiredCommand(Command, tag="order_expired", kw_only=True):
    order_id: Id


class OpenPosition(Command, tag="open_position", kw_only=True):
    exchange: Exchange
    symbol: Symbol
    side: PositionSide
    size: Dec
    leverage: Leverage = 1
    price: Dec | None = None
    stop_loss: Dec | None = None
    take_profit: Dec | None = None
    metadata: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_metadata(self.metadata)


class ClosePosition(Command, tag="close_position", kw_only=True):
    position_id: Id
    size: Dec | None = None
    reason: CloseReason = "manual"
    price: Dec | None = None


class LiquidatePosition(Command, tag="liquidate_position", kw_only=True):
    position_id: Id
    price: Dec


# The namespace of adopted order ids (``adopted_order_id``): fixed forever, or an adoption
# recorded before a change would no longer be found by the venue order it came from.
ADOPTION_NAMESPACE = uuid.UUID("6f1c3c2e-5b7a-4d2e-9a41-0c7b8e2d4f15")


def adopted_order_id(user_id: str, exchange: Exchange | str, exchange_order_id: str) -> str:
    """The ledger order id of an adopted venue order: derived from (user, exchange, venue order
    id), so a second adoption of one venue order names the same order, whatever its command id."""
    return str(uuid.uuid5(ADOPTION_NAMESPACE, f"{user_id}:{exchange}:{exchange_order_id}"))


def ledger_order_id(client_id: str | None) -> str | None:
    """The ledger order id a venue client order id was derived from (``venue_client_id`` of
    ``ledger.venues.live``): the UUID in the 32 hex digits or the UUID itself; None for a client id
    the ledger never makes."""
    if not client_id:
        return None
    try:
        return str(uuid.UUID(client_id))
    except ValueError:
        return None


class AdoptOrder(Command, tag="adopt_order", kw_only=True):
    """Bring an order the ledger never placed (it is already at the venue) into the books."""

    exchange: Exchange
    symbol: Symbol
    side: OrderSide
    order_type: OrderType
    quantity: Dec
    exchange_order_id: ExchangeOrderId
    price: Dec | None = None
    trigger_price: Dec | None = None
    position_side: PositionSide | None = None
    reduce_only: bool = False
    leverage: Leverage | None = None
    venue_client_order_id: ClientOrderId | None = None
    metadata: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_metadata(self.metadata)

    @property
    def order_id(self) -> str:
        return adopted_order_id(self.user_id, self.exchange, self.exchange_order_id)


class DriftKind(StrEnum):
    """What a drift (a difference between a venue and the ledger) is about."""

    POSITION_SIZE = "position_size"
    FEE = "fee"


class DriftResolution(StrEnum):
    """How a drift ended: corrected by ``adjust_position``, acknowledged by an operator
    (``resolve_drift``), or found agreeing again by reconciliation (``resolve_drift``)."""

    ADJUSTED = "adjusted"
    ACKNOWLEDGED = "acknowledged"
    AGREED = "agreed"


class RecordDrift(Command, tag="record_drift", kw_only=True):
    """Record a difference between the venue and the ledger (issue 11): ``DriftDetected`` on a
    new drift, keyed by (user, exchange, canonical market, kind); at most one open per key."""

    exchange: Exchange
    symbol: Symbol
    kind: DriftKind
    evidence: dict[str, Any]

    def __post_init__(self) -> None:
        _check_metadata(self.evidence, "evidence")


class AdjustPosition(Command, tag="adjust_position", kw_only=True):
    """Correct a position explicitly: ``size`` is its new absolute size (0 closes it; with no
    position open, a size > 0 opens one at ``price``); ``fee_adjustment`` (signed, settlement
    currency) is added to its fees. Resolves the market's open drift (``DriftResolved``)."""

    exchange: Exchange
    symbol: Symbol
    side: PositionSide
    size: Dec
    reason: RejectReason
    price: Dec | None = None
    fee_adjustment: Dec | None = None


class ResolveDrift(Command, tag="resolve_drift", kw_only=True):
    """End the open drift of (exchange, canonical market of ``symbol``, ``kind``) without
    touching positions: ``acknowledged`` by an operator, ``agreed`` by reconciliation."""

    exchange: Exchange
    symbol: Symbol
    kind: DriftKind
    reason: RejectReason
    resolution: Literal["acknowledged", "agreed"] = "acknowledged"  # DriftResolution's, less "adjusted"


COMMAND_TYPES: dict[str, type[Command]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (
        PlaceOrder,
        CancelOrder,
        OrderAcceptedCommand,
        OrderRejectedCommand,
        RecordFill,
        OrderCancelledCommand,
        OrderExpiredCommand,
        OpenPosition,
        ClosePosition,
        LiquidatePosition,
        RecordDrift,
        AdjustPosition,
        ResolveDrift,
        AdoptOrder,
    )
}


# --------------------------------------------------------------------------- events


class Event(msgspec.Struct, kw_only=True, tag_field="type", gc=False):
    """The envelope of CONTRACT §5, common to every event. Not tracked by the garbage collector
    (``gc=False``, inherited): an event holds only JSON values, so it is never part of a reference
    cycle, and reading a long log no longer pays for collections that walk every event held."""

    SCHEMA: ClassVar[int] = 1
    event_id: str
    stream: str
    version: int
    command_id: str
    user_id: str
    exchange: Exchange
    symbol: str
    ts: int
    schema: int = 1

    @property
    def type(self) -> str:
        return self.__struct_config__.tag  # type: ignore[return-value]


class OrderPlaced(Event, tag="OrderPlaced", kw_only=True):
    side: OrderSide
    order_type: OrderType
    quantity: str
    price: str | None = None
    trigger_price: str | None = None
    client_order_id: str | None = None
    position_side: PositionSide | None = None
    reduce_only: bool = False
    leverage: int | None = None
    grid_level: int | None = None
    position_id: str | None = None
    intent: Literal["open", "close"] | None = None
    stop_loss: str | None = None
    take_profit: str | None = None
    close_reason: str | None = None
    metadata: dict[str, Any] = {}
    # Inverse: the face value used (Instrument.recorded_value); left out for other markets and
    # absent from events written before it was recorded (Instrument.as_recorded reads both).
    contract_value: str | msgspec.UnsetType = msgspec.UNSET
    status: OrderStatus = OrderStatus.PENDING


class OrderChange(Event, kw_only=True):
    """An order event after placement: it carries the order's resulting status (the decider
    takes it from ``ledger.domain.transitions``)."""

    status: OrderStatus


class OrderAccepted(OrderChange, tag="OrderAccepted", kw_only=True):
    exchange_order_id: str


class OrderRejected(OrderChange, tag="OrderRejected", kw_only=True):
    reason: str


class OrderFilled(OrderChange, tag="OrderFilled", kw_only=True):
    side: OrderSide
    fill_id: str
    quantity: str
    price: str
    fee: str
    fee_currency: str | None = None
    fee_source: Literal["computed"] | msgspec.UnsetType = msgspec.UNSET  # as the record_fill said
    fill_ts: int
    filled_qty: str
    avg_fill_price: str
    fill_basis: str
    overfill: bool = False
    late: bool = False
    position_ids: list[str] = []
    unapplied_qty: str = "0"


class OrderCancelRequested(OrderChange, tag="OrderCancelRequested", kw_only=True):
    pass


class OrderCancelled(OrderChange, tag="OrderCancelled", kw_only=True):
    pass


class OrderExpired(OrderChange, tag="OrderExpired", kw_only=True):
    pass


class OrderAdopted(OrderPlaced, tag="OrderAdopted", kw_only=True):
    """An order the ledger did not place, found at the venue (``adopt_order``): placed and
    acknowledged in one event (its venue id, status ``open``), so every reader of ``OrderPlaced``
    reads it as one. The ledger never sends it: it is at the venue already."""

    exchange_order_id: str
    status: OrderStatus = OrderStatus.OPEN


class PositionEvent(Event, kw_only=True):
    """A position change carrying the whole resulting position (projections write it as is)."""

    side: PositionSide
    status: PositionStatus
    size: str
    entry_price: str
    exit_price: str | None = None
    leverage: int
    entry_qty: str
    entry_basis: str
    exit_qty: str
    exit_basis: str
    gross_pnl: str
    fees: str
    other_fees: dict[str, str] = {}
    realized_pnl: str
    excess_qty: str = "0"
    stop_loss: str | None = None
    take_profit: str | None = None
    close_reason: str | None = None
    metadata: dict[str, Any] = {}
    contract_value: str | msgspec.UnsetType = msgspec.UNSET  # as OrderPlaced's
    created_at: int
    updated_at: int
    closed_at: int | None = None
    order_id: str | None = None
    fill_id: str | None = None
    change_qty: str
    change_price: str
    change_fee: str = "0"
    change_fee_currency: str | None = None
    change_pnl: str = "0"


class PositionOpened(PositionEvent, tag="PositionOpened", kw_only=True):
    pass


class PositionIncreased(PositionEvent, tag="PositionIncreased", kw_only=True):
    pass


class PositionReduced(PositionEvent, tag="PositionReduced", kw_only=True):
    pass


class PositionClosed(PositionEvent, tag="PositionClosed", kw_only=True):
    pass


class PositionLiquidated(PositionEvent, tag="PositionLiquidated", kw_only=True):
    pass


class PositionAdjusted(PositionEvent, tag="PositionAdjusted", kw_only=True):
    """An explicit correction (``adjust_position``), not a trade: ``size`` and ``fees`` change,
    the entry price and the gross PnL do not. ``size_before`` is the size it replaced,
    ``drift_ids`` the drifts it resolves (their ``DriftResolved`` follow in the same append).
    An adjustment to size 0 has status ``closed`` and is followed by ``PositionClosed``."""

    reason: str
    size_before: str
    drift_ids: list[str] = []


class DriftEvent(Event, kw_only=True):
    """An event of a drift (stream = the drift id): ``DriftDetected`` (version 1), then
    ``DriftResolved`` (version 2), nothing else. Neither an order nor a position event: the
    order and position projections skip it; the archive keeps it."""

    market: str
    kind: DriftKind


class DriftDetected(DriftEvent, tag="DriftDetected", kw_only=True):
    evidence: dict[str, Any] = {}


class DriftResolved(DriftEvent, tag="DriftResolved", kw_only=True):
    resolution: DriftResolution
    reason: str
    adjustment_event_id: str | None = None
    position_id: str | None = None


ORDER_EVENTS: tuple[type[Event], ...] = (
    OrderPlaced,
    OrderAccepted,
    OrderRejected,
    OrderFilled,
    OrderCancelRequested,
    OrderCancelled,
    OrderExpired,
    OrderAdopted,
)
POSITION_EVENTS: tuple[type[PositionEvent], ...] = (
    PositionOpened,
    PositionIncreased,
    PositionReduced,
    PositionClosed,
    PositionLiquidated,
    PositionAdjusted,
)
DRIFT_EVENTS: tuple[type[DriftEvent], ...] = (DriftDetected, DriftResolved)
EVENT_TYPES: dict[str, type[Event]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (*ORDER_EVENTS, *POSITION_EVENTS, *DRIFT_EVENTS)
}


# --------------------------------------------------------------------------- replies


class ErrorInfo(msgspec.Struct):
    code: str
    message: str


class EventRef(msgspec.Struct):
    type: str
    id: str


class Reply(msgspec.Struct, omit_defaults=False):
    command_id: str
    status: Literal["accepted", "rejected"]
    error: ErrorInfo | None = None
    order_id: str | None = None
    position_id: str | None = None
    events: list[EventRef] = []


# --------------------------------------------------------------------------- codec

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
_UPCASTERS: dict[tuple[str, int], Upcaster] = {}
_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}
_any_decoder = msgspec.json.Decoder()


def register_upcaster(type_name: str, from_schema: int, upcaster: Upcaster) -> None:
    """Teach the codec to read schema ``from_schema`` of ``type_name`` as ``from_schema + 1``."""
    _UPCASTERS[(type_name, from_schema)] = upcaster


def unregister_upcaster(type_name: str, from_schema: int) -> None:
    _UPCASTERS.pop((type_name, from_schema), None)


def encode(value: msgspec.Struct | Mapping[str, Any]) -> bytes:
    return _encoder.encode(value)


# What a JSON decoder may raise on hostile input: invalid JSON, text that is not UTF-8, and JSON
# nested deeper than the decoder's recursion limit.
_UNREADABLE = (msgspec.DecodeError, UnicodeError, RecursionError)


def _unreadable(exc: Exception) -> WireError:
    if isinstance(exc, RecursionError):
        return WireError("INVALID_JSON", "data is nested too deeply to be a command")
    return WireError("INVALID_JSON", f"data is not valid JSON: {exc}")


def decode_json(raw: bytes | str) -> Any:
    try:
        return _any_decoder.decode(raw)
    except _UNREADABLE as exc:
        raise _unreadable(exc) from exc


def _decoder(cls: type) -> msgspec.json.Decoder[Any]:
    decoder = _decoders.get(cls)
    if decoder is None:
        decoder = _decoders[cls] = msgspec.json.Decoder(cls)
    return decoder


def _upcast(type_name: str, cls: Any, raw: bytes | str) -> Any:
    """Slow path: read an older schema as a dict, upcast it step by step, then validate."""
    data = decode_json(raw)
    if not isinstance(data, dict):
        raise WireError("INVALID_JSON", "data must be a JSON object")
    schema = data.get("schema", 1)
    while isinstance(schema, int) and schema < cls.SCHEMA:
        upcaster = _UPCASTERS.get((type_name, schema))
        if upcaster is None:
            break
        data = upcaster(dict(data))
        schema = data["schema"] = schema + 1
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        raise _field_error(exc) from exc


# msgspec names a broken pattern by its regex; users read the rule's description instead.
_RULE_BY_REGEX = {repr(rule.pattern): rule.description for rule in RULES.values()}


def _field_error(exc: msgspec.ValidationError) -> WireError:
    message = str(exc)
    for regex, description in _RULE_BY_REGEX.items():
        message = message.replace(f"`str` matching regex {regex}", description)
    if "missing required field" in message:
        return WireError("MISSING_FIELD", message)
    if "got `float`" in message or "got `int`" in message:
        message += ' (decimals are JSON strings such as "0.1", never numbers)'
    return WireError("INVALID_FIELD", message)


def _decode_typed(type_name: str, cls: Any, raw: bytes | str) -> Any:
    try:
        value = _decoder(cls).decode(raw)
    except msgspec.ValidationError:
        return _upcast(type_name, cls, raw)
    except _UNREADABLE as exc:
        raise _unreadable(exc) from exc
    if value.schema != cls.SCHEMA:
        return _upcast(type_name, cls, raw)
    return value


def _readable_ids(raw: str | bytes | None) -> tuple[str | None, str | None]:
    """Best effort: the command_id and user_id of a broken command, if they are valid."""
    try:
        data = _any_decoder.decode(raw) if raw else None
    except _UNREADABLE:
        return None, None
    if not isinstance(data, dict):
        return None, None
    found: list[str | None] = []
    for kind in ("command_id", "user_id"):
        try:
            found.append(check_identifier(kind, data.get(kind)))
        except ValueError:
            found.append(None)
    return found[0], found[1]


def entry_field(fields: Mapping[Any, Any], name: str) -> Any:
    """One field of a stream entry as stored (None when absent), whether the client decodes
    responses or not: the one reader of an entry's fields."""
    value = fields.get(name)
    return fields.get(name.encode()) if value is None else value


def entry_fields(fields: Mapping[Any, Any]) -> tuple[str, bytes | str | None]:
    """A stream entry's ``type`` as text ("" when absent) and its ``data`` as stored (None when
    absent)."""
    return text(entry_field(fields, "type")) or "", entry_field(fields, "data")


def decode_command(fields: Mapping[Any, Any]) -> Command:
    """Decode a command stream entry ({type, data}); raise WireError on anything malformed."""
    type_name, raw = entry_fields(fields)

    def fail(code: str, message: str) -> WireError:
        command_id, user_id = _readable_ids(raw)  # read only for an error: a valid command pays nothing
        return WireError(code, message, command_id=command_id, user_id=user_id)

    if not type_name:
        raise fail("MISSING_FIELD", "the entry has no `type` field")
    cls = COMMAND_TYPES.get(type_name)
    if cls is None:
        known = ", ".join(sorted(COMMAND_TYPES))
        raise fail("UNKNOWN_TYPE", f"unknown command type {type_name!r}; known: {known}")
    if raw is None:
        raise fail("MISSING_FIELD", "the entry has no `data` field")
    try:
        return _decode_typed(type_name, cls, raw)  # type: ignore[no-any-return]
    except WireError as exc:
        raise fail(exc.code, f"{type_name}: {exc.message}") from exc


class UnknownEventType(WireError):
    """An event type this reader does not know: readers skip it (CONTRACT §5)."""


def decode_event(type_name: str | bytes, raw: bytes | str | None) -> Event:
    """Decode an event's ``data`` (``raw``; None: the entry has none) as the event type named."""
    name = text(type_name) or ""
    cls = EVENT_TYPES.get(name)
    if cls is None:
        raise UnknownEventType("UNKNOWN_TYPE", f"unknown event type {name!r}")
    if raw is None:
        raise WireError("MISSING_FIELD", f"the {name} entry has no `data` field")
    return _decode_typed(name, cls, raw)  # type: ignore[no-any-return]


def decode_entry(entry_id: str, fields: Mapping[Any, Any]) -> Event | None:
    """The one decoder of an event stream entry, for every consumer and reader of the log: its
    event, or None for a type this reader does not know (skipped, CONTRACT §5).

    An entry that cannot be decoded raises ``WireError`` with a reason naming the entry. The one
    policy for it: a consumer dead-letters it once with that reason and goes on
    (``consumers.deadletter.decode_events``; the PostgreSQL projector raises ``Undeliverable``
    so that the gap in history is recorded first); a read-only reader skips it with a warning.
    """
    type_name, raw = entry_fields(fields)
    try:
        return decode_event(type_name, raw)
    except UnknownEventType:
        return None
    except WireError as error:
        raise WireError(error.code, f"{type_name} event entry {entry_id}: {error.message}") from error


def encode_command(command: Command) -> bytes:
    """A command's ``data``, checked against the wire rules first: building a Struct does not
    validate it, and a publisher (the paper venue, the API) must never publish a command the
    handler would dead-letter. Raises ``WireError`` naming the broken rule."""
    data = encode(command)
    try:
        _decoder(type(command)).decode(data)
    except msgspec.ValidationError as exc:
        raise _field_error(exc) from exc
    return data


def command_fields(command: Command) -> dict[str, bytes | str]:
    """The stream entry fields of a command, as a strategy publishes it (validated)."""
    type_name: str = command.__struct_config__.tag  # type: ignore[assignment]
    return {"type": type_name, "data": encode_command(command)}
