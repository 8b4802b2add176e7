"""Public models of the seed (CONTRACT §7, §10): ``Position``, ``Order``, ``Fill``, ``PnLInfo``.

Pydantic v2, validated at runtime. Money is ``Decimal`` (a float is refused: it has already lost
digits); identifiers follow CONTRACT §1; timestamps are timezone-aware datetimes (integer epoch
milliseconds are accepted). Decimals serialize as plain strings without exponent.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Self

import msgspec
import structlog
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    computed_field,
    field_validator,
    model_validator,
)

from ledger.domain import arithmetic
from ledger.domain.enums import (
    Exchange,
    OrderSide,
    OrderStatus,
    OrderType,
    PositionSide,
    PositionStatus,
)
from ledger.domain.instruments import Instrument, instrument_for
from ledger.domain.mapping import ORDER, POSITION, AggregateMapping
from ledger.domain.values import (
    ZERO,
    ValueRuleError,
    check_identifier,
    divide,
    exact,
    format_decimal,
    ms_to_datetime,
    parse_decimal,
)
from ledger.store.redis_conn import text
from ledger.venues.markets import instrument_table

log = structlog.get_logger("ledger.marks")


def parse_mark(value: Decimal | str | int) -> Decimal:
    """The mark rule (CONTRACT §8): a mark is a positive decimal under the wire's decimal rule
    (``parse_decimal``: a plain decimal string, ≤20 integer and ≤18 fraction digits, no
    exponent, so "1e5", "NaN" and "abc" are not marks). Raises ``ValueRuleError``."""
    if isinstance(value, float | bool):
        raise ValueRuleError("mark", 'a Decimal or a decimal string such as "45000", never a float', value)
    return parse_decimal(Decimal(value) if isinstance(value, int) else value, "mark", positive=True)


def read_mark(
    raw: object, exchange: str, symbol: str, warned: dict[tuple[str, str], str] | None = None
) -> Decimal | None:
    """A mark as read from ``marks:{exchange}`` (written by whoever has market data): the one
    reader every consumer of marks uses. Absent is ``None``; an invalid value is ignored with a
    warning naming exchange, symbol and value (no unrealized PnL for it), never an exception.

    A caller that polls marks passes its own ``warned`` memo (market -> the invalid value last
    warned about), so one bad value is warned about once, not at every poll."""
    if raw is None:
        return None
    value = text(raw)
    market = (str(exchange), symbol)
    try:
        mark = parse_mark(value)
    except ValueRuleError as exc:
        if warned is None or warned.get(market) != value:
            log.warning("invalid mark ignored", exchange=market[0], symbol=symbol, value=value, error=str(exc))
        if warned is not None:
            warned[market] = value
        return None
    if warned is not None:
        warned.pop(market, None)
    return mark


def _to_decimal(value: Any, info: Any = None) -> Decimal:
    if isinstance(value, float | bool):
        raise ValueError('must be a Decimal or a decimal string such as "0.1", never a float')
    try:
        number = Decimal(value) if isinstance(value, str | int) else value
    except ArithmeticError as exc:
        raise ValueError(f'must be a decimal string such as "0.1" (got {value!r})') from exc
    if not isinstance(number, Decimal) or not number.is_finite():
        raise ValueError(f"must be a finite decimal (got {value!r})")
    return number


def _to_datetime(value: Any) -> datetime:
    if isinstance(value, int) and not isinstance(value, bool):
        return ms_to_datetime(value)
    if isinstance(value, str) and value.isdigit():
        return ms_to_datetime(int(value))
    if isinstance(value, datetime) and value.tzinfo is None:
        raise ValueError("must be timezone-aware (UTC)")
    return value  # type: ignore[no-any-return]


Money = Annotated[
    Decimal,
    BeforeValidator(_to_decimal),
    PlainSerializer(format_decimal, return_type=str, when_used="json"),
]
Timestamp = Annotated[datetime, BeforeValidator(_to_datetime)]
Mark = Annotated[
    Decimal,
    BeforeValidator(parse_mark),
    PlainSerializer(format_decimal, return_type=str, when_used="json"),
]


# Text fields checked by the rule of the same name (``ledger.domain.values.RULES``, full match).
_TEXT_FIELDS = (
    "user_id",
    "symbol",
    "fill_id",
    "fee_currency",
    "client_order_id",
    "exchange_order_id",
    "close_reason",
    "reject_reason",
)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, use_enum_values=False, validate_default=True)

    @field_validator(*_TEXT_FIELDS, check_fields=False)
    @classmethod
    def _text_rule(cls, value: str | None, info: Any) -> str | None:
        return None if value is None else _identifier(info.field_name, value)

    @property
    def instrument(self) -> Instrument:
        return instrument_for(self.exchange, self.symbol, instrument_table())  # type: ignore[attr-defined]


class _Aggregate(_Model):
    """A model of an aggregate, built from any of its representations by ``ledger.domain.mapping``."""

    MAPPING: ClassVar[AggregateMapping]

    @classmethod
    def _of(cls, values: Mapping[str, Any], **extra: Any) -> Self:
        return cls(**cls.MAPPING.model_kwargs(values), **extra)

    @classmethod
    def from_state(cls, state: msgspec.Struct, **extra: Any) -> Self:
        """From the state the decider holds (``ledger.domain.state``)."""
        return cls._of(cls.MAPPING.values(state), **extra)

    @classmethod
    def from_live(cls, fields: Mapping[str, str], **extra: Any) -> Self:
        """From its live hash (CONTRACT §6; decoded to text). ``KeyError`` or ``ValueError``
        when the hash is not a ledger hash."""
        return cls._of(cls.MAPPING.from_live(fields), **extra)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], **extra: Any) -> Self:
        """From its history row, as ``cls.MAPPING.select`` reads it (CONTRACT §9)."""
        return cls._of(cls.MAPPING.from_row(row), **extra)


def _identifier(kind: str, value: str) -> str:
    try:
        return check_identifier(kind, value)
    except ValueRuleError as exc:
        raise ValueError(f"must be {exc.rule}") from exc


def _positive(value: Decimal, field: str) -> Decimal:
    if value <= 0:
        raise ValueError(f"{field} must be greater than zero")
    return value


class PnLInfo(BaseModel):
    """PnL of a position: net realized, unrealized at a price, settlement fees, return on margin."""

    model_config = ConfigDict(frozen=True)

    realized_pnl: Money = ZERO
    unrealized_pnl: Money = ZERO
    fees: Money = ZERO
    other_fees: dict[str, Money] = Field(default_factory=dict)
    pnl_percentage: Money = ZERO
    current_price: Mark | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    @exact
    def total_pnl(self) -> Money:
        return self.realized_pnl + self.unrealized_pnl


class Position(_Aggregate):
    """A position; ``current_price`` (the mark) feeds the computed PnL fields.

    ``realized_pnl`` is net: ``gross_pnl`` minus ``fees``. ``excess_qty`` is what fills reported
    beyond the open size (recorded, flagged, moving nothing). ``close_reason`` and ``closed_at``
    belong to a closed or liquidated position (history)."""

    MAPPING: ClassVar[AggregateMapping] = POSITION

    id: str | None = None
    user_id: str
    exchange: Exchange
    symbol: str
    side: PositionSide
    size: Money
    entry_price: Money
    leverage: int = Field(default=1, ge=1, le=1000)
    status: PositionStatus = PositionStatus.OPEN
    exit_price: Money | None = None
    realized_pnl: Money = ZERO
    gross_pnl: Money = ZERO
    fees: Money = ZERO
    other_fees: dict[str, Money] = Field(default_factory=dict)
    excess_qty: Money = ZERO
    stop_loss: Money | None = None
    take_profit: Money | None = None
    close_reason: str | None = None
    current_price: Mark | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    contract_value: Money | None = None  # inverse: the face value the position recorded
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None
    closed_at: Timestamp | None = None
    version: int = 0

    @property
    def instrument(self) -> Instrument:
        """The market's instrument with the contract value the position recorded, so a later
        ``markets sync`` never changes its PnL (``Instrument.as_recorded``)."""
        return super().instrument.as_recorded(self.contract_value)

    @field_validator("size")
    @classmethod
    def _size(cls, value: Decimal) -> Decimal:
        if value < 0:
            raise ValueError("size must not be negative")
        return value

    @field_validator("entry_price")
    @classmethod
    def _entry(cls, value: Decimal) -> Decimal:
        return _positive(value, "entry_price")

    def unrealized_at(self, price: Decimal) -> Decimal:
        return arithmetic.gross_pnl(self.instrument, self.side, self.entry_price, price, self.size)

    @property
    def margin(self) -> Decimal:
        return arithmetic.margin(self.instrument, self.entry_price, self.size, self.leverage)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def unrealized_pnl(self) -> Money | None:
        if self.current_price is None:
            return None
        return self.unrealized_at(self.current_price)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def pnl_percentage(self) -> Money | None:
        """Return on margin in percent at ``current_price`` (CONTRACT §7)."""
        unrealized = self.unrealized_pnl
        if unrealized is None:
            return None
        return arithmetic.pnl_percentage(unrealized, self.margin)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def notional_value(self) -> Money | None:
        """Value of the open size at ``current_price`` (inverse: in the base coin)."""
        if self.current_price is None:
            return None
        return arithmetic.notional_value(self.instrument, self.size, self.current_price)

    def pnl(self, price: Decimal | str) -> PnLInfo:
        """PnL at ``price``, a mark under the mark rule (``parse_mark``)."""
        price = parse_mark(price)
        unrealized = self.unrealized_at(price) if self.status is PositionStatus.OPEN else ZERO
        return PnLInfo(
            realized_pnl=self.realized_pnl,
            unrealized_pnl=unrealized,
            fees=self.fees,
            other_fees=self.other_fees,
            pnl_percentage=arithmetic.pnl_percentage(unrealized, self.margin),
            current_price=price,
        )


class Fill(_Model):
    """One execution of an order, as the venue reported it."""

    order_id: str
    fill_id: str
    quantity: Money
    price: Money
    fee: Money = ZERO
    fee_currency: str | None = None
    ts: Timestamp | None = None

    @field_validator("quantity", "price")
    @classmethod
    def _amount(cls, value: Decimal, info: Any) -> Decimal:
        return _positive(value, info.field_name)


class Order(_Aggregate):
    """An order. ``fill_basis`` is the running sum that ``avg_fill_price`` averages over; given
    without ``avg_fill_price``, the average is computed from it. A history row holds the
    average but not the sum (``fill_basis`` is then 0)."""

    MAPPING: ClassVar[AggregateMapping] = ORDER

    id: str | None = None
    user_id: str
    exchange: Exchange
    symbol: str
    side: OrderSide
    order_type: OrderType
    quantity: Money
    price: Money | None = None
    trigger_price: Money | None = None
    status: OrderStatus = OrderStatus.PENDING
    filled_qty: Money = ZERO
    fill_basis: Money = ZERO
    avg_fill_price: Money | None = None
    exchange_order_id: str | None = None
    client_order_id: str | None = None
    position_side: PositionSide | None = None
    position_id: str | None = None
    reduce_only: bool = False
    leverage: int | None = Field(default=None, ge=1, le=1000)
    grid_level: int | None = Field(default=None, ge=0)
    reject_reason: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None
    version: int = 0

    @model_validator(mode="after")
    def _average(self) -> Self:
        if self.avg_fill_price is None and self.fill_basis != 0:
            # Frozen: set once, while the model is being validated.
            object.__setattr__(self, "avg_fill_price", self._average_of_fills())
        return self

    def _average_of_fills(self) -> Decimal:
        """Quantity-weighted mean fill price (inverse: contract-weighted harmonic mean)."""
        return arithmetic.average_price(self.instrument, self.filled_qty, self.fill_basis)

    @field_validator("quantity")
    @classmethod
    def _quantity(cls, value: Decimal) -> Decimal:
        return _positive(value, "quantity")

    @field_validator("price", "trigger_price")
    @classmethod
    def _price(cls, value: Decimal | None, info: Any) -> Decimal | None:
        return None if value is None else _positive(value, info.field_name)

    @computed_field  # type: ignore[prop-decorator]
    @property
    @exact
    def remaining_qty(self) -> Money:
        return max(self.quantity - self.filled_qty, ZERO)

    @computed_field  # type: ignore[prop-decorator]
    @property
    @exact
    def fill_percentage(self) -> Money:
        return divide(self.filled_qty * 100, self.quantity)

    @exact
    def with_fill(self, fill: Fill) -> Order:
        """The order after one more fill (quantities only; the ledger decides the status)."""
        added = arithmetic.basis(self.instrument, fill.quantity, fill.price)
        order = self.model_copy(
            update={"filled_qty": self.filled_qty + fill.quantity, "fill_basis": self.fill_basis + added}
        )
        return order.model_copy(update={"avg_fill_price": order._average_of_fills()})
