"""``import ledger`` gives the public names of CONTRACT §10, each imported when first used."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ledger
from ledger.client.api import CommandRejected, LedgerTimeout, OrderManager, PositionManager
from ledger.client.models import Fill, Order, PnLInfo, Position
from ledger.domain.enums import Exchange, OrderSide, OrderStatus, OrderType, PositionSide, PositionStatus
from ledger.errors import LedgerError

PUBLIC = {
    "CommandRejected": CommandRejected,
    "Exchange": Exchange,
    "Fill": Fill,
    "LedgerError": LedgerError,
    "LedgerTimeout": LedgerTimeout,
    "Order": Order,
    "OrderManager": OrderManager,
    "OrderSide": OrderSide,
    "OrderStatus": OrderStatus,
    "OrderType": OrderType,
    "PnLInfo": PnLInfo,
    "Position": Position,
    "PositionManager": PositionManager,
    "PositionSide": PositionSide,
    "PositionStatus": PositionStatus,
}


def test_every_public_name_is_the_class_of_its_home_module() -> None:
    assert sorted(ledger.__all__) == sorted(PUBLIC)
    for name, cls in PUBLIC.items():
        assert getattr(ledger, name) is cls
    assert set(PUBLIC) <= set(dir(ledger))


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'ledger' has no attribute 'Positions'"):
        ledger.Positions  # noqa: B018


def test_importing_the_package_builds_no_model_and_no_client() -> None:
    code = "import sys, ledger; print(sorted(m for m in sys.modules if m.startswith('ledger.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    star = "from ledger import *; print(Position.__module__, OrderManager.__module__)"
    out = subprocess.run([sys.executable, "-c", star], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["ledger.client.models", "ledger.client.api"]
