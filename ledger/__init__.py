"""trading-ledger: the shared, event-sourced position and order ledger.

``import ledger`` gives the public models and enums (CONTRACT §10).
"""

from ledger.client.api import CommandRejected, LedgerTimeout, OrderManager, PositionManager
from ledger.client.models import Fill, Order, PnLInfo, Position
from ledger.domain.enums import Exchange, OrderSide, OrderStatus, OrderType, PositionSide, PositionStatus
from ledger.errors import LedgerError

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
