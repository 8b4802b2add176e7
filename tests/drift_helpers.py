"""Helpers of the drift tests (tests/integration/test_drift*.py): the user, the market and its
drift slot, a credentials file for the loopback venue, an OKX position row, the order they place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ledger.client.api import OrderManager
from ledger.domain.evolution import drift_slot
from tests.venue_server import LoopbackExchange

USER = "alice"
MARKET = "BTC/USDT:USDT"
SLOT = drift_slot(USER, "okx", MARKET, "position_size")


def okx_position(contracts: str) -> dict[str, str]:
    """An OKX ``account/positions`` row of BTC-USDT-SWAP (0.01 BTC a contract)."""
    return {
        "instId": "BTC-USDT-SWAP",
        "instType": "SWAP",
        "mgnMode": "cross",
        "posSide": "net",
        "pos": contracts,
        "avgPx": "45000",
        "markPx": "45000",
        "lever": "3",
        "ccy": "USDT",
        "posId": "307173036051017730",
        "cTime": "1700000000000",
        "uTime": "1700000000000",
    }


def credentials_file(tmp_path: Path, venue: LoopbackExchange) -> Path:
    account = {"apiKey": "key-1", "secret": "s3cr3t", "password": "p4ss", "users": [USER]}
    path = tmp_path / "credentials.json"
    body = {venue.exchange: {"base_url": venue.url, "timeout_ms": 2000, "accounts": {"main": account}}}
    path.write_text(json.dumps(body), encoding="utf-8")
    return path


async def placed_order(redis: Any, okx: LoopbackExchange | None) -> tuple[str, str]:
    """The user's limit buy of 0.04 BTC-USDT-SWAP at 45000 placed through the ledger and, with a
    venue, booked there (4 contracts): its order id and the client id the venue knows it by."""
    order = await OrderManager(redis, timeout=10).create_order(
        USER, "okx", "BTC-USDT-SWAP", "buy", "limit", "0.04", "45000"
    )
    assert order.id is not None
    client_id = order.id.replace("-", "")
    if okx is not None:
        okx.book(client_id, "BTC-USDT-SWAP", "buy", "4", "45000")
    return order.id, client_id
