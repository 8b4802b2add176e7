"""trading-ledger: the shared, event-sourced position and order ledger.

``import ledger`` gives the public models and enums (CONTRACT §10). They are imported when first
used (PEP 562), so that a command line run or a role process that needs none of them does not pay
for building the pydantic models and the client at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ledger.client.api import CommandRejected, LedgerTimeout, OrderManager, PositionManager
    from ledger.client.models import Fill, Order, PnLInfo, Position
    from ledger.domain.enums import Exchange, OrderSide, OrderStatus, OrderType, PositionSide, PositionStatus
    from ledger.errors import LedgerError

_HOMES = {
    "ledger.client.api": ("CommandRejected", "LedgerTimeout", "OrderManager", "PositionManager"),
    "ledger.client.models": ("Fill", "Order", "PnLInfo", "Position"),
    "ledger.domain.enums": ("Exchange", "OrderSide", "OrderStatus", "OrderType", "PositionSide", "PositionStatus"),
    "ledger.errors": ("LedgerError",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "CommandRejected",
    "Exchange",
    "Fill",
    "LedgerError",
    "LedgerTimeout",
    "Order",
    "OrderManager",
    "OrderSide",
    "OrderStatus",
    "OrderType",
    "PnLInfo",
    "Position",
    "PositionManager",
    "PositionSide",
    "PositionStatus",
]


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'ledger' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})
