"""What a symbol trades: spot, linear or inverse contract, its settlement currency and size.

The ledger keeps symbols as the strategy sent them (CONTRACT §1). A symbol that names a market
of the exchange's market data (unified symbol or native id, any case) takes its kind, settlement
currency and contract size from that market. The data is an input: ``instrument_for`` takes an
``InstrumentTable`` (the exchange layer supplies it: ``ledger.venues.markets.instrument_table``
reads the bundled snapshot once, without ccxt). Any other symbol is
classified by its shape, as before market data existed:

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
the quote currency: the market's contract size when the market is known, else 100 USD for BTC and
10 USD for the others (OKX's and Binance's values); 1 for spot and linear, whose quantities are
base units. ``contract_size`` is the market's contract size as ccxt gives it (linear: base units
per contract, for the exchange layer's conversion; inverse: the face value; 1 when unknown).
``market`` is the canonical (ccxt unified) symbol of a known market, None otherwise.

The contract value an inverse order or position used is recorded in its events
(``contract_value``), so that a later change of the market data (``ledger markets sync``) never
changes the PnL of a position opened before it: ``Instrument.as_recorded`` is the one rule that
reads a recorded value back (an event written before values were recorded has none and reads as
today's lookup), ``Instrument.recorded_value`` what an event records.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal

from ledger.domain.enums import Exchange, InstrumentKind

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
    contract_size: Decimal = Decimal(1)
    market: str | None = None

    @property
    def is_inverse(self) -> bool:
        return self.kind is InstrumentKind.INVERSE

    @property
    def recorded_value(self) -> Decimal | None:
        """The contract value an event records: an inverse contract's face value; None for spot
        and linear markets, whose quantities are base units (their value is 1 by definition)."""
        return self.contract_value if self.is_inverse else None

    def as_recorded(self, contract_value: Decimal | None) -> Instrument:
        """This instrument with the contract value an order or a position recorded; None (spot,
        linear, or an event written before values were recorded) reads as this lookup."""
        if contract_value is None or contract_value == self.contract_value:
            return self
        return replace(self, contract_value=contract_value)

    def pays_in_base(self, fee_currency: str | None) -> bool:
        """Whether a fee in ``fee_currency`` is paid in the coin a spot market trades (a buy
        receives the quantity less the fee; CONTRACT §7 as refined in the README)."""
        return self.kind is InstrumentKind.SPOT and fee_currency == self.base and self.base != self.settle


def _derivative(base: str, quote: str, settle: str) -> Instrument:
    if settle == base:
        face = _INVERSE_FACE_VALUE.get(base, _DEFAULT_INVERSE_FACE_VALUE)
        return Instrument(InstrumentKind.INVERSE, base, quote, settle, face, face)
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


# Instrument data by (exchange, spelling in upper case): what market data says each name trades.
InstrumentTable = Mapping[tuple[Exchange, str], Instrument]


def instrument_for(exchange: Exchange, symbol: str, table: InstrumentTable) -> Instrument:
    """What a (validated) symbol of an exchange trades: the market's facts when ``table`` (the
    exchange layer's market data) knows the symbol, else its shape. Never raises for a valid symbol."""
    known = table.get((exchange, symbol.upper()))
    return known if known is not None else classify(exchange, symbol)


def classify(exchange: Exchange, symbol: str) -> Instrument:
    """What a symbol's shape says it trades (no market data). Pure."""
    upper = symbol.upper()
    if "/" in upper:
        return _unified(upper)
    parts = upper.split("-")
    if len(parts) >= 2 and all(parts):
        return _dashed(exchange, parts)
    return _joined(upper)
