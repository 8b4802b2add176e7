"""What a symbol trades: spot, linear or inverse contract, its settlement currency and size.

The ledger keeps symbols as the strategy sent them (CONTRACT §1), so the kind is read from the
symbol's shape:

* ccxt unified: ``BTC/USDT`` spot, ``BTC/USDT:USDT`` linear, ``BTC/USD:BTC`` inverse (settle ==
  base), with an optional expiry suffix ``-251226``.
* OKX native: ``BTC-USDT`` spot, ``BTC-USDT-SWAP`` / ``BTC-USDT-251226`` linear,
  ``BTC-USD-SWAP`` / ``BTC-USD-251226`` inverse.
* Upbit native: ``KRW-BTC`` (quote first) spot.
* Binance native: ``BTCUSD_PERP`` / ``BTCUSD_251226`` inverse (COIN-M); ``BTCUSDT`` is read as
  spot, because Binance uses the same id for spot and USDT-M futures: strategies trading
  USDT-M futures on Binance use the unified ``BTC/USDT:USDT``.

Anything else is treated as a linear contract whose settlement currency is unknown: fees
without ``fee_currency`` count as settlement fees, fees in a named currency are kept apart.

Inverse contracts count quantity in contracts. ``contract_value`` is the contract's face value in
the quote currency (OKX and Binance: 100 USD for BTC, 10 USD for the others); a venue adapter with
market data can give the exact value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from ledger.enums import Exchange, InstrumentKind

_QUOTES = ("FDUSD", "USDT", "USDC", "BUSD", "TUSD", "KRW", "EUR", "TRY", "BTC", "ETH", "BNB", "USD")
_EXPIRY = re.compile(r"[0-9]{6}")
_INVERSE_FACE_VALUE = {"BTC": Decimal(100)}
_DEFAULT_INVERSE_FACE_VALUE = Decimal(10)


@dataclass(frozen=True, slots=True)
class Instrument:
    kind: InstrumentKind
    base: str
    quote: str
    settle: str
    contract_value: Decimal = Decimal(1)

    @property
    def is_inverse(self) -> bool:
        return self.kind is InstrumentKind.INVERSE


def _derivative(base: str, quote: str, settle: str) -> Instrument:
    if settle == base:
        face = _INVERSE_FACE_VALUE.get(base, _DEFAULT_INVERSE_FACE_VALUE)
        return Instrument(InstrumentKind.INVERSE, base, quote, settle, face)
    return Instrument(InstrumentKind.LINEAR, base, quote, settle)


def _unified(symbol: str) -> Instrument:
    pair, _, settle_part = symbol.partition(":")
    base, _, quote = pair.partition("/")
    if not settle_part:
        return Instrument(InstrumentKind.SPOT, base, quote, quote)
    settle = settle_part.split("-", 1)[0]
    return _derivative(base, quote, settle)


def _dashed(exchange: Exchange, parts: list[str]) -> Instrument:
    if len(parts) == 2:
        first, second = parts
        if exchange is Exchange.UPBIT:
            return Instrument(InstrumentKind.SPOT, second, first, first)
        return Instrument(InstrumentKind.SPOT, first, second, second)
    base, quote, tail = parts[0], parts[1], parts[2]
    if tail == "SWAP" or _EXPIRY.fullmatch(tail):
        return _derivative(base, quote, base if quote == "USD" else quote)
    return Instrument(InstrumentKind.LINEAR, base, quote, quote)


def _joined(symbol: str) -> Instrument:
    pair, _, suffix = symbol.partition("_")
    for quote in _QUOTES:
        if pair.endswith(quote) and len(pair) > len(quote):
            base = pair[: -len(quote)]
            if suffix and quote == "USD":
                return _derivative(base, quote, base)
            if suffix:
                return Instrument(InstrumentKind.LINEAR, base, quote, quote)
            return Instrument(InstrumentKind.SPOT, base, quote, quote)
    return Instrument(InstrumentKind.LINEAR, symbol, "", "")


def instrument_for(exchange: Exchange, symbol: str) -> Instrument:
    """Classify a (validated) symbol of an exchange. Pure; never raises for a valid symbol."""
    upper = symbol.upper()
    if "/" in upper:
        return _unified(upper)
    parts = upper.split("-")
    if len(parts) >= 2 and all(parts):
        return _dashed(exchange, parts)
    return _joined(upper)
