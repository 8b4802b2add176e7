"""trading-ledger: the shared, event-sourced position and order ledger.

``import ledger`` gives the public models and enums (CONTRACT §10).
"""

from ledger.api import CommandRejected, LedgerTimeout, OrderManager, PositionManager
from ledger.enums import Exchange, OrderSide, OrderStatus, OrderType, PositionSide, PositionStatus
from ledger.errors import LedgerError
from ledger.models import Fill, Order, PnLInfo, Position

__all__ = [
    "CommandRejected",
    "LedgerError",
    "LedgerTimeout",
    "OrderManager",
    "PositionManager",
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
