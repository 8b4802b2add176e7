"""The closed vocabularies of the ledger (CONTRACT §1, §3, §6). Values are the wire strings."""

from __future__ import annotations

from enum import StrEnum


class Exchange(StrEnum):
    OKX = "okx"
    BINANCE = "binance"
    UPBIT = "upbit"


class PositionSide(StrEnum):
    LONG = "long"
    SHORT = "short"

    @property
    def opposite(self) -> PositionSide:
        return PositionSide.SHORT if self is PositionSide.LONG else PositionSide.LONG

    @property
    def opening_order_side(self) -> OrderSide:
        """The order side that opens or increases a position of this side."""
        return OrderSide.BUY if self is PositionSide.LONG else OrderSide.SELL


class PositionStatus(StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    LIQUIDATED = "liquidated"

    @property
    def is_final(self) -> bool:
        return self in FINAL_POSITION_STATUSES


class OrderSide(StrEnum):
    BUY = "buy"
    SELL = "sell"

    @property
    def opposite(self) -> OrderSide:
        return OrderSide.SELL if self is OrderSide.BUY else OrderSide.BUY


class OrderType(StrEnum):
    MARKET = "market"
    LIMIT = "limit"
    STOP_MARKET = "stop_market"
    STOP_LIMIT = "stop_limit"
    TAKE_PROFIT_MARKET = "take_profit_market"

    @property
    def needs_price(self) -> bool:
        return self in (OrderType.LIMIT, OrderType.STOP_LIMIT)

    @property
    def needs_trigger(self) -> bool:
        return self in (
            OrderType.STOP_MARKET,
            OrderType.STOP_LIMIT,
            OrderType.TAKE_PROFIT_MARKET,
        )


class OrderStatus(StrEnum):
    PENDING = "pending"
    OPEN = "open"
    PARTIALLY_FILLED = "partially_filled"
    PENDING_CANCEL = "pending_cancel"
    FILLED = "filled"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        return self in FINAL_ORDER_STATUSES


FINAL_ORDER_STATUSES = frozenset({OrderStatus.FILLED, OrderStatus.CANCELLED, OrderStatus.REJECTED, OrderStatus.EXPIRED})
OPEN_ORDER_STATUSES = frozenset(set(OrderStatus) - FINAL_ORDER_STATUSES)
FINAL_POSITION_STATUSES = frozenset({PositionStatus.CLOSED, PositionStatus.LIQUIDATED})


class InstrumentKind(StrEnum):
    SPOT = "spot"
    LINEAR = "linear"
    INVERSE = "inverse"
