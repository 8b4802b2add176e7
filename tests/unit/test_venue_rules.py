"""The live venue's pure rules (ledger.venues.live, ledger.venues.accounts): client order ids,
exact contract conversion, refusals before sending, error classification, the accounts file."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import ccxt
import pytest

from ledger.domain.enums import Exchange, OrderSide, OrderType, PositionSide
from ledger.venues.accounts import CredentialsError, parse_credentials
from ledger.venues.live import (
    CCXT_ORDERS,
    Ambiguous,
    Refused,
    VenueClients,
    classify,
    intent,
    to_quantity,
    venue_client_id,
)
from ledger.venues.markets import bundled

ORDER_ID = "0b9c2a3e-1d2f-4a5b-8c7d-112233445566"


def test_client_order_ids_are_derived_from_the_order_id_within_each_venues_rule() -> None:
    assert venue_client_id(Exchange.OKX, ORDER_ID) == "0b9c2a3e1d2f4a5b8c7d112233445566"
    assert venue_client_id(Exchange.BINANCE, ORDER_ID) == "0b9c2a3e1d2f4a5b8c7d112233445566"
    assert venue_client_id(Exchange.UPBIT, ORDER_ID) == ORDER_ID


def test_okx_linear_amounts_are_contracts_and_convert_back_exactly() -> None:
    sent = intent(
        Exchange.OKX,
        ORDER_ID,
        symbol="BTC-USDT-SWAP",
        side=OrderSide.BUY,
        order_type=OrderType.LIMIT,
        quantity=Decimal("0.1234"),
        price=Decimal("45000.1"),
        reduce_only=True,
        mark=None,
    )
    assert (sent.market.symbol, sent.amount, sent.price, sent.reduce_only) == (
        "BTC/USDT:USDT",
        Decimal("12.34"),
        Decimal("45000.1"),
        True,
    )
    assert to_quantity(sent.market, Decimal("12.34")) == Decimal("0.1234")
    inverse = bundled(Exchange.OKX).resolve("BTC-USD-SWAP")
    assert to_quantity(inverse, Decimal(3)) == Decimal(3)  # inverse quantities are contracts already


@pytest.mark.parametrize(
    ("symbol", "quantity", "price", "reason"),
    [
        (
            "BTC-USDT-SWAP",
            "0.00015",
            "45000",
            "quantity 0.00015 is not a whole multiple of BTC/USDT:USDT's step 0.0001",
        ),
        ("BTC-USDT-SWAP", "0.01", "45000.05", "price 45000.05 is not a whole multiple of BTC/USDT:USDT's tick 0.1"),
        (
            "DOGE-USDT-SWAP",
            "1",
            "1",
            "okx has no market 'DOGE-USDT-SWAP' in the snapshot: `ledger markets show okx` "
            "lists them, `ledger markets sync okx --symbol DOGE-USDT-SWAP` adds it",
        ),
    ],
)
def test_orders_off_the_markets_steps_are_refused(symbol: str, quantity: str, price: str, reason: str) -> None:
    with pytest.raises(Refused) as refused:
        intent(
            Exchange.OKX,
            ORDER_ID,
            symbol=symbol,
            side=OrderSide.BUY,
            order_type=OrderType.LIMIT,
            quantity=Decimal(quantity),
            price=Decimal(price),
            reduce_only=False,
            mark=None,
        )
    assert str(refused.value) == reason


def test_an_upbit_market_buy_is_a_cost_and_needs_a_price_or_mark() -> None:
    order = dict(
        symbol="KRW-BTC",
        side=OrderSide.BUY,
        order_type=OrderType.MARKET,
        quantity=Decimal("0.002"),
        price=None,
        reduce_only=False,
    )
    assert intent(Exchange.UPBIT, ORDER_ID, mark=Decimal("50000000"), **order).cost == Decimal("100000")  # type: ignore[arg-type]
    with pytest.raises(
        Refused, match=r"\Aan upbit market buy is sent as a cost: give a price or set the mark of KRW-BTC\Z"
    ):
        intent(Exchange.UPBIT, ORDER_ID, mark=None, **order)  # type: ignore[arg-type]


def test_only_a_definite_answer_is_a_refusal() -> None:
    refusal = classify(
        Exchange.BINANCE, ccxt.InsufficientFunds('binance {"code":-2010,"msg":"Account has insufficient balance."}')
    )
    assert isinstance(refusal, Refused)
    assert str(refusal) == "binance refused the order: -2010 Account has insufficient balance."
    okx = classify(
        Exchange.OKX, ccxt.ExchangeError('okx {"code":"1","data":[{"sCode":"51008","sMsg":"Insufficient"}],"msg":""}')
    )
    assert str(okx) == "okx refused the order: 51008 Insufficient"
    long = classify(Exchange.UPBIT, ccxt.InvalidOrder("upbit " + "x\n" * 300))
    assert len(str(long)) == 256 and "\n" not in str(long)
    for unknown in (
        ccxt.RequestTimeout("okx POST timed out"),
        ccxt.ExchangeNotAvailable("okx 503"),
        ccxt.NetworkError("reset"),
        ccxt.InvalidOrder('okx {"code":"1","data":[{"sCode":"51016","sMsg":"Duplicated clOrdId"}],"msg":""}'),
        ccxt.DuplicateOrderId("binance duplicate"),
        ccxt.BadResponse("okx <html>"),
        ConnectionResetError(),
    ):
        assert isinstance(classify(Exchange.OKX, unknown), Ambiguous), unknown
    spot_duplicate = ccxt.InvalidOrder('binance {"code":-2010,"msg":"Duplicate order sent."}')
    assert isinstance(classify(Exchange.BINANCE, spot_duplicate), Ambiguous)


ACCOUNT = {"apiKey": "key-1", "secret": "top-secret", "password": "pass-phrase", "users": ["alice"]}


def test_accounts_never_show_their_secrets() -> None:
    configs = parse_credentials(
        {"okx": {"sandbox": True, "base_url": "http://127.0.0.1:9", "accounts": {"main": ACCOUNT}}}
    )
    account = configs[Exchange.OKX].account_for("alice")
    assert account is not None and configs[Exchange.OKX].account_for("bob") is None
    assert "top-secret" not in repr(account) and "pass-phrase" not in repr(configs) and "key-1" not in repr(configs)
    assert configs[Exchange.OKX].options.sandbox is True


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kraken": {}}, "LEDGER_CREDENTIALS: 'kraken': unknown exchange: use okx, binance, upbit"),
        (
            {"upbit": {"sandbox": True, "accounts": {"a": {**ACCOUNT}}}},
            "LEDGER_CREDENTIALS: upbit.sandbox: ccxt has no sandbox mode for upbit: remove it",
        ),
        (
            {"okx": {"demo": True, "accounts": {"a": ACCOUNT}}},
            "LEDGER_CREDENTIALS: okx.demo: ccxt has no demo trading for okx: remove it",
        ),
        (
            {"okx": {"accounts": {"a": {**ACCOUNT, "secret": 5}}}},
            "LEDGER_CREDENTIALS: okx.accounts.a.secret: must be a non-empty string of printable characters",
        ),
        (
            {"okx": {"accounts": {"a": ACCOUNT, "b": ACCOUNT}}},
            "LEDGER_CREDENTIALS: okx.accounts: user 'alice' is in 'a' and 'b': keep one",
        ),
        (
            {"okx": {"accounts": {"a": {**ACCOUNT, "apikey": "x"}}}},
            "LEDGER_CREDENTIALS: okx.accounts.a: unknown key 'apikey': "
            "use apiKey, password, position_mode, secret, users",
        ),
        (
            {"okx": {"accounts": {"a": {**ACCOUNT, "position_mode": "long_short_mode"}}}},
            "LEDGER_CREDENTIALS: okx.accounts.a.position_mode: must be net or hedge (the venue account's own mode)",
        ),
        (
            {"okx": {"base_url": "ftp://x", "accounts": {"a": ACCOUNT}}},
            "LEDGER_CREDENTIALS: okx.base_url: base URL must be http(s)://host[:port][/path] (got 'ftp://x')",
        ),
    ],
)
def test_a_credentials_file_that_cannot_work_says_what_to_change(data: object, message: str) -> None:
    with pytest.raises(CredentialsError) as error:
        parse_credentials(data)
    assert str(error.value) == message
    assert "top-secret" not in message


async def test_one_rate_limited_client_per_exchange_and_account_with_its_options() -> None:
    configs = parse_credentials(
        {
            "okx": {"sandbox": True, "base_url": "http://127.0.0.1:9", "accounts": {"main": ACCOUNT}},
            "binance": {
                "demo": True,
                "timeout_ms": 2500,
                "accounts": {"b": {"apiKey": "k", "secret": "s", "users": ["bob"]}},
            },
        }
    )
    clients = VenueClients({e: c.options for e, c in configs.items()})
    okx_account = configs[Exchange.OKX].accounts["main"]
    okx = clients.get(okx_account)
    binance = clients.get(configs[Exchange.BINANCE].accounts["b"])
    try:
        assert clients.get(okx_account) is okx
        assert okx.ccxt.enableRateLimit is True and binance.ccxt.enableRateLimit is True
        assert okx.ccxt.headers["x-simulated-trading"] == "1"  # OKX demo trading (ccxt sandbox mode)
        assert okx.ccxt.urls["api"]["rest"] == "http://127.0.0.1:9"  # the base URL applies last
        assert binance.ccxt.options["enableDemoTrading"] is True and binance.ccxt.timeout == 2500
        assert binance.ccxt.urls["api"]["fapiPrivate"].startswith("https://demo-fapi.binance.com")
    finally:
        await clients.close()


CID = "0b9c2a3e1d2f4a5b8c7d112233445566"


@pytest.mark.parametrize(
    ("exchange", "symbol", "order", "ccxt_type", "algo", "params"),
    [
        (  # OKX: an algo ``trigger`` order; its client id also as the algo order's own
            Exchange.OKX,
            "BTC-USDT-SWAP",
            dict(order_type=OrderType.STOP_MARKET, trigger_price="44000", reduce_only=True),
            "market",
            True,
            {
                "clientOrderId": CID,
                "algoClOrdId": CID,
                "triggerPrice": "44000",
                "positionSide": "net",
                "reduceOnly": True,
            },
        ),
        (  # hedge mode: the side, and no reduceOnly (the side says it)
            Exchange.OKX,
            "BTC-USDT-SWAP",
            dict(
                order_type=OrderType.TAKE_PROFIT_MARKET, trigger_price="48000", reduce_only=True, position_side="long"
            ),
            "market",
            True,
            {"clientOrderId": CID, "algoClOrdId": CID, "takeProfitPrice": "48000", "positionSide": "long"},
        ),
        (  # spot: no position side, no reduceOnly; OKX keeps spot trigger orders apart too
            Exchange.OKX,
            "BTC-USDT",
            dict(order_type=OrderType.STOP_LIMIT, trigger_price="41000", price="40900", position_side="long"),
            "limit",
            True,
            {"clientOrderId": CID, "algoClOrdId": CID, "triggerPrice": "41000"},
        ),
        (  # Binance USD-M: ccxt sends the client id as ``clientAlgoId`` itself
            Exchange.BINANCE,
            "BTC/USDT:USDT",
            dict(order_type=OrderType.STOP_MARKET, trigger_price="44000", reduce_only=True, position_side="short"),
            "market",
            True,
            {"clientOrderId": CID, "triggerPrice": "44000", "positionSide": "SHORT"},
        ),
        (
            Exchange.BINANCE,
            "BTCUSD_PERP",
            dict(order_type=OrderType.MARKET, reduce_only=True),
            "market",
            False,
            {"clientOrderId": CID, "positionSide": "BOTH", "reduceOnly": True},
        ),
        (  # Binance spot: a STOP_LOSS order of the order endpoint, no algo order
            Exchange.BINANCE,
            "BTC/USDT",
            dict(order_type=OrderType.TAKE_PROFIT_MARKET, trigger_price="50000"),
            "market",
            False,
            {"clientOrderId": CID, "takeProfitPrice": "50000"},
        ),
    ],
)
def test_each_order_type_and_position_side_becomes_ccxts_unified_params(
    exchange: Exchange, symbol: str, order: dict[str, Any], ccxt_type: str, algo: bool, params: dict[str, Any]
) -> None:
    sent = intent(
        exchange,
        ORDER_ID,
        symbol=symbol,
        side=OrderSide.SELL,
        order_type=order["order_type"],
        quantity=Decimal(1),
        price=None if "price" not in order else Decimal(order["price"]),
        reduce_only=order.get("reduce_only", False),
        mark=None,
        trigger_price=None if "trigger_price" not in order else Decimal(order["trigger_price"]),
        position_side=None if "position_side" not in order else PositionSide(order["position_side"]),
    )
    assert (CCXT_ORDERS[sent.order_type][0], sent.algo, sent.params()) == (ccxt_type, algo, params)


@pytest.mark.parametrize(
    ("exchange", "symbol", "trigger", "reason"),
    [
        (
            Exchange.UPBIT,
            "KRW-BTC",
            "50000000",
            "upbit has no trigger orders: a stop_market order is never sent (use market or limit)",
        ),
        (
            Exchange.BINANCE,
            "BTC/USDT:USDT",
            "44000.05",
            "trigger price 44000.05 is not a whole multiple of BTC/USDT:USDT's tick 0.1",
        ),
        (Exchange.OKX, "BTC-USDT-SWAP", None, "a stop_market order needs a trigger_price"),
    ],
)
def test_trigger_orders_a_venue_cannot_take_are_refused(
    exchange: Exchange, symbol: str, trigger: str | None, reason: str
) -> None:
    with pytest.raises(Refused) as refused:
        intent(
            exchange,
            ORDER_ID,
            symbol=symbol,
            side=OrderSide.SELL,
            order_type=OrderType.STOP_MARKET,
            quantity=Decimal(1),
            price=None,
            reduce_only=False,
            mark=None,
            trigger_price=None if trigger is None else Decimal(trigger),
        )
    assert str(refused.value) == reason


def test_a_duplicate_algo_client_id_is_an_unknown_outcome_not_a_refusal() -> None:
    binance = ccxt.BadRequest('binance {"code":-20132,"msg":"The client algo id is duplicated"}')
    okx = ccxt.ExchangeError(
        'okx {"code":"1","data":[{"algoClOrdId":"x","algoId":"","sCode":"51065","sMsg":"algoClOrdId already exists."}]}'
    )
    assert isinstance(classify(Exchange.BINANCE, binance), Ambiguous)
    assert isinstance(classify(Exchange.OKX, okx), Ambiguous)


_BINANCE_ALGO = {
    "algoId": 2146760,
    "clientAlgoId": "myAlgo1",
    "algoType": "CONDITIONAL",
    "symbol": "BTCUSDT",
    "side": "SELL",
    "positionSide": "BOTH",
    "timeInForce": "GTC",
    "quantity": "0.01",
    "algoStatus": "NEW",
    "actualOrderId": "",
    "triggerPrice": "40000",
    "reduceOnly": False,
}


@pytest.mark.parametrize(
    ("order_type", "price", "expected"),
    [
        ("STOP_MARKET", "0", ("stop_market", Decimal("40000"), None)),
        ("STOP", "39900", ("stop_limit", Decimal("40000"), Decimal("39900"))),
        ("TAKE_PROFIT_MARKET", "0", ("take_profit_market", Decimal("40000"), None)),
        ("TAKE_PROFIT", "40100", "take_profit algo"),  # a take-profit limit: no ledger type
        ("TRAILING_STOP_MARKET", "0", "trailing_stop_market algo"),
    ],
)
def test_a_binance_algo_order_gets_the_ledgers_trigger_order_type(
    order_type: str, price: str, expected: tuple[str, Decimal, Decimal | None] | str
) -> None:
    """As ccxt parses Binance's ``openAlgoOrders`` rows (``_venue_order`` of an algo order)."""
    from ledger.venues.exchanges import client
    from ledger.venues.live import _venue_order

    exchange = client(Exchange.BINANCE)
    row = {**_BINANCE_ALGO, "orderType": order_type, "price": price}
    if order_type == "TRAILING_STOP_MARKET":
        row.update(triggerPrice="0", activatePrice="40000", priceRate="1")
    market = bundled(Exchange.BINANCE).find("BTC/USDT:USDT")
    assert market is not None
    report = _venue_order(
        Exchange.BINANCE, market, exchange.parse_order(row, exchange.market(market.symbol)), [], algo=True
    )
    assert (report.client_id, report.side, report.quantity) == ("myAlgo1", "sell", Decimal("0.01"))
    if isinstance(expected, str):  # never adopted as a plain limit or market order
        assert report.order_type == expected
    else:
        assert (report.order_type, report.trigger_price, report.price if report.price else None) == expected
