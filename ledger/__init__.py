"""trading-ledger: the shared, event-sourced position and order ledger.

``import ledger`` gives the public models and enums (CONTRACT §10).
"""

from ledger.enums import Exchange, OrderSide, OrderStatus, OrderType, PositionSide, PositionStatus
from ledger.models import Fill, Order, PnLInfo, Position

__all__ = [
    "Exchange",
    "Fill",
    "Order",
    "OrderSide",
    "OrderStatus",
    "OrderType",
    "PnLInfo",
    "Position",
    "PositionSide",
    "PositionStatus",
]
