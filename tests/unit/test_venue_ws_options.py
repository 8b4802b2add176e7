"""The WebSocket options of the live venue (``ws_url``) and which orders its socket follows
(``VenueClient.watches`` / ``stream``): offline, no server."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from ledger.domain.enums import Exchange, OrderSide, OrderType
from ledger.venues.accounts import CredentialsError, parse_credentials
from ledger.venues.live import VenueClients, intent

OKX_ACCOUNT = {"apiKey": "key-1", "secret": "top-secret", "password": "pass-phrase", "users": ["alice"]}
BINANCE_ACCOUNT = {"apiKey": "key-2", "secret": "top-secret", "users": ["alice"]}
ORDER_ID = "0b9c2a3e-1d2f-4a5b-8c7d-112233445566"


def _order(exchange: Exchange, symbol: str, order_type: OrderType = OrderType.LIMIT, quantity: str = "0.01") -> Any:
    trigger = Decimal(44000) if order_type.needs_trigger else None
    return intent(
        exchange,
        ORDER_ID,
        symbol=symbol,
        side=OrderSide.BUY,
        order_type=order_type,
        quantity=Decimal(quantity),
        price=Decimal(45000),
        reduce_only=False,
        mark=None,
        trigger_price=trigger,
    )


@pytest.mark.parametrize(
    ("ws_url", "shown"), [("http://127.0.0.1:9", "'http://127.0.0.1:9'"), ("ws://h/a b", "'ws://h/a b'"), (5, "'5'")]
)
def test_a_ws_url_that_is_not_a_websocket_url_is_refused(ws_url: object, shown: str) -> None:
    with pytest.raises(CredentialsError) as error:
        parse_credentials({"okx": {"ws_url": ws_url, "accounts": {"a": OKX_ACCOUNT}}})
    assert str(error.value) == (
        f"LEDGER_CREDENTIALS: okx.ws_url: WebSocket URL must be ws(s)://host[:port][/path] (got {shown})"
    )


async def test_ws_url_replaces_every_websocket_urls_scheme_and_host() -> None:
    configs = parse_credentials(
        {
            "okx": {"base_url": "http://127.0.0.1:9", "ws_url": "ws://127.0.0.1:9", "accounts": {"a": OKX_ACCOUNT}},
            "binance": {"base_url": "http://127.0.0.1:8", "accounts": {"b": BINANCE_ACCOUNT}},
        }
    )
    clients = VenueClients({e: c.options for e, c in configs.items()})
    okx = clients.get(configs[Exchange.OKX].accounts["a"])
    binance = clients.get(configs[Exchange.BINANCE].accounts["b"])
    try:
        assert okx.watches is True
        ws = okx._ws()
        assert (ws.get_url("orders", "private"), ws.urls["api"]["rest"]) == (
            "ws://127.0.0.1:9/ws/v5/private",
            "http://127.0.0.1:9",
        )
        assert (ws.apiKey, ws.password) == ("key-1", "pass-phrase")  # the same account
        assert binance.watches is False  # a REST stand-in never goes with the real venue's socket
    finally:
        await clients.close()


async def test_which_orders_the_socket_carries() -> None:
    configs = parse_credentials(
        {"okx": {"accounts": {"a": OKX_ACCOUNT}}, "binance": {"accounts": {"b": BINANCE_ACCOUNT}}}
    )
    clients = VenueClients({e: c.options for e, c in configs.items()})
    okx = clients.get(configs[Exchange.OKX].accounts["a"])
    binance = clients.get(configs[Exchange.BINANCE].accounts["b"])
    try:
        assert okx.watches is True and binance.watches is True
        assert okx.stream(_order(Exchange.OKX, "BTC-USDT-SWAP")) == "orders"
        assert okx.stream(_order(Exchange.OKX, "BTC-USDT")) == "orders"
        assert okx.stream(_order(Exchange.OKX, "BTC-USDT-SWAP", OrderType.STOP_MARKET)) is None  # an algo order
        assert binance.stream(_order(Exchange.BINANCE, "BTC/USDT")) == "spot"
        assert binance.stream(_order(Exchange.BINANCE, "BTC/USDT:USDT")) == "future"  # USDⓈ-M: its own stream
        assert binance.stream(_order(Exchange.BINANCE, "BTC/USD:BTC", quantity="2")) == "delivery"  # COIN-M: its own
        assert binance.stream(_order(Exchange.BINANCE, "BTC/USDT:USDT", OrderType.STOP_MARKET)) is None  # algo
    finally:
        await clients.close()
