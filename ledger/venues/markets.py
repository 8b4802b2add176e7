"""Markets: what each exchange lists, from ccxt ``load_markets`` data, without importing ccxt.

The bundled snapshot (``ledger/venues/markets/<exchange>.json``, package data) holds, per
exchange, the unified market dicts ccxt's ``load_markets`` returned (``ledger markets sync``
writes it; ``ledger.venues.exchanges`` loads it into the real ccxt classes with
``set_markets``). This module reads it into ``Market`` facts (unified symbol, native id, kind,
contract size, precision and limits as ``Decimal``, settlement currency) and resolves a name a
strategy sends to one canonical market:

* a unified symbol (``BTC/USDT:USDT``) names its market;
* a native id (``BTC-USDT-SWAP``, ``BTCUSD_PERP``, ``KRW-BTC``) names the market with that id;
  an id several markets share (Binance ``BTCUSDT`` is the spot pair and the USDⓈ-M perpetual)
  is resolved by the exchange's default market type (``DEFAULT_TYPE``, which is also ccxt's
  ``defaultType`` for the clients: ``spot``), and with no single market of that type the name
  is refused with the candidates listed;
* names are matched without regard to case, like the ledger's symbol-shape rule.

``instrument_table()`` turns the snapshot into the domain's instrument data
(``ledger.domain.instruments``): kind, settlement currency and contract size per spelling.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from ledger.domain.enums import Exchange, InstrumentKind
from ledger.domain.instruments import Instrument, InstrumentTable
from ledger.domain.values import format_decimal
from ledger.errors import InvalidInput

SNAPSHOT_DIR = "markets"  # package data of ledger.venues
# The market type an ambiguous native id means, per exchange; the ccxt clients get it as their
# ``defaultType`` option, so ccxt and the ledger resolve an id the same way.
DEFAULT_TYPE: Mapping[Exchange, str] = {Exchange.OKX: "spot", Exchange.BINANCE: "spot", Exchange.UPBIT: "spot"}
LIMITS = ("amount", "price", "cost", "leverage")
TABLE_COLUMNS = ("symbol", "id", "type", "kind", "settle", "contract_size", "amount_step", "price_step", "min_amount")


class MarketError(InvalidInput):
    """A name that resolves to no market, or to more than one."""


def ccxt_decimal(value: Any) -> Decimal | None:
    """A number ccxt parsed (of a market, an order, a trade) as the Decimal the exchange wrote (ccxt parses to float;
    ``repr`` of a float is its shortest exact spelling: ``0.01`` -> ``0.01``, ``100.0`` -> ``100``)."""
    if value is None:
        return None
    if isinstance(value, float):
        return Decimal(int(value)) if value.is_integer() else Decimal(repr(value))
    return Decimal(str(value))


def _text(value: Decimal | None) -> str | None:
    return None if value is None else format_decimal(value)


@dataclass(frozen=True, slots=True)
class Market:
    """One market of one exchange, as ccxt describes it."""

    exchange: Exchange
    symbol: str  # ccxt unified
    id: str  # the exchange's native id
    type: str  # ccxt: spot, swap, future
    kind: InstrumentKind
    base: str
    quote: str
    settle: str  # the quote currency for spot
    contract_size: Decimal | None  # linear: base per contract; inverse: quote (face value); spot: None
    amount_precision: Decimal | None  # the step of an amount (contracts for OKX derivatives)
    price_precision: Decimal | None
    limits: Mapping[str, tuple[Decimal | None, Decimal | None]]  # name -> (min, max)
    active: bool | None
    raw: Mapping[str, Any]  # the ccxt market dict, for set_markets

    @classmethod
    def from_ccxt(cls, exchange: Exchange, market: Mapping[str, Any]) -> Market:
        if market.get("spot"):
            kind = InstrumentKind.SPOT
        else:
            kind = InstrumentKind.INVERSE if market.get("inverse") else InstrumentKind.LINEAR
        precision = market.get("precision") or {}
        limits = market.get("limits") or {}
        return cls(
            exchange=exchange,
            symbol=market["symbol"],
            id=market["id"],
            type=market["type"],
            kind=kind,
            base=market["base"],
            quote=market["quote"],
            settle=market.get("settle") or market["quote"],
            contract_size=None if kind is InstrumentKind.SPOT else ccxt_decimal(market.get("contractSize")),
            amount_precision=ccxt_decimal(precision.get("amount")),
            price_precision=ccxt_decimal(precision.get("price")),
            limits={
                name: (ccxt_decimal(bounds.get("min")), ccxt_decimal(bounds.get("max")))
                for name, bounds in ((n, limits.get(n) or {}) for n in LIMITS)
            },
            active=market.get("active"),
            raw=market,
        )

    @property
    def quantity_step(self) -> Decimal | None:
        """The amount step in the ledger's quantity units (CONTRACT §1): ccxt counts contract
        amounts in contracts, the ledger linear quantities in base units (step x contract size)."""
        if self.kind is InstrumentKind.LINEAR and self.amount_precision is not None and self.contract_size is not None:
            return self.amount_precision * self.contract_size
        return self.amount_precision

    def fee_rate(self, taker_or_maker: str | None) -> Decimal | None:
        """The market's fee rate for a trade (ccxt ``takerOrMaker``; taker when it is unknown),
        None when the market data has none."""
        return ccxt_decimal(self.raw.get("maker" if taker_or_maker == "maker" else "taker"))

    @property
    def instrument(self) -> Instrument:
        """The domain's view: inverse quantities are contracts worth ``contract_size`` in the quote
        currency; spot and linear quantities are base units (CONTRACT §1)."""
        size = self.contract_size if self.contract_size is not None else Decimal(1)
        value = size if self.kind is InstrumentKind.INVERSE else Decimal(1)
        return Instrument(self.kind, self.base, self.quote, self.settle, value, size, self.symbol)

    def as_dict(self) -> dict[str, Any]:
        """The facts as JSON values (decimals as strings)."""
        return {
            "exchange": self.exchange.value,
            "symbol": self.symbol,
            "id": self.id,
            "type": self.type,
            "kind": self.kind.value,
            "base": self.base,
            "quote": self.quote,
            "settle": self.settle,
            "contract_size": _text(self.contract_size),
            "precision": {"amount": _text(self.amount_precision), "price": _text(self.price_precision)},
            "limits": {name: {"min": _text(lo), "max": _text(hi)} for name, (lo, hi) in self.limits.items()},
            "active": self.active,
        }

    def row(self) -> dict[str, str | None]:
        """The ``TABLE_COLUMNS`` of ``ledger markets show``."""
        return {
            "symbol": self.symbol,
            "id": self.id,
            "type": self.type,
            "kind": self.kind.value,
            "settle": self.settle,
            "contract_size": _text(self.contract_size),
            "amount_step": _text(self.amount_precision),
            "price_step": _text(self.price_precision),
            "min_amount": _text(self.limits["amount"][0]),
        }


def _key(name: str) -> str:
    return name.upper()


class Markets:
    """The markets of one exchange, resolvable by unified symbol or native id."""

    def __init__(self, exchange: Exchange, markets: Iterable[Market], default_type: str | None = None) -> None:
        self.exchange = exchange
        self.default_type = DEFAULT_TYPE[exchange] if default_type is None else default_type
        self._by_symbol: dict[str, Market] = {}
        self._by_id: dict[str, list[Market]] = {}
        for market in sorted(markets, key=lambda m: m.symbol):
            self._by_symbol[_key(market.symbol)] = market
            self._by_id.setdefault(_key(market.id), []).append(market)

    @classmethod
    def from_ccxt(cls, exchange: Exchange, markets: Iterable[Mapping[str, Any]]) -> Markets:
        """Every market but options (the ledger has no option instruments)."""
        return cls(exchange, (Market.from_ccxt(exchange, m) for m in markets if not m.get("option")))

    def __iter__(self) -> Iterator[Market]:
        return iter(self._by_symbol.values())

    def __len__(self) -> int:
        return len(self._by_symbol)

    def find(self, name: str) -> Market | None:
        """The market ``name`` means, None when no market has that symbol or id."""
        market = self._by_symbol.get(_key(name))
        if market is not None:
            return market
        candidates = self._by_id.get(_key(name), [])
        if not candidates:
            return None
        chosen = self._chosen(candidates)
        if chosen is not None:
            return chosen
        symbols = " or ".join(m.symbol for m in candidates)
        raise MarketError(
            f"{self.exchange} id {name!r} names {len(candidates)} markets and the default type "
            f"{self.default_type!r} does not pick one: use the unified symbol {symbols}"
        )

    def resolve(self, name: str) -> Market:
        """The one market ``name`` means; ``MarketError`` (saying what to do) otherwise."""
        market = self.find(name)
        if market is None:
            raise MarketError(
                f"{self.exchange} has no market {name!r} in the snapshot: `ledger markets show {self.exchange}` "
                f"lists them, `ledger markets sync {self.exchange} --symbol {name}` adds it"
            )
        return market

    def _chosen(self, candidates: list[Market]) -> Market | None:
        """The market an id shared by ``candidates`` means: the only one, or the only one of the
        default type; None when that is not one market."""
        if len(candidates) == 1:
            return candidates[0]
        chosen = [m for m in candidates if m.raw.get(self.default_type) is True]
        return chosen[0] if len(chosen) == 1 else None

    def spellings(self) -> Iterator[tuple[str, Market]]:
        """Every name that resolves (upper case), with its market: symbols, then the ids that name
        one market (alone or by the default type; an id that names none is left out)."""
        yield from self._by_symbol.items()
        for key, candidates in self._by_id.items():
            chosen = self._chosen(candidates)
            if key not in self._by_symbol and chosen is not None:
                yield key, chosen


def snapshot_path(exchange: Exchange) -> Path:
    """The bundled snapshot file of ``exchange`` (package data)."""
    return Path(str(resources.files("ledger.venues").joinpath(SNAPSHOT_DIR, f"{exchange.value}.json")))


def read_snapshot(path: Path) -> dict[str, Any]:
    """A snapshot file: ``{"exchange", "ccxt", "markets": [ccxt market dicts]}``."""
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def snapshot_text(exchange: Exchange, ccxt_version: str, markets: Iterable[Mapping[str, Any]]) -> str:
    """A snapshot file's exact text: markets sorted by symbol, keys sorted, one trailing newline."""
    body = {"exchange": exchange.value, "ccxt": ccxt_version, "markets": sorted(markets, key=lambda m: m["symbol"])}
    return json.dumps(body, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


@functools.cache
def bundled(exchange: Exchange) -> Markets:
    """The markets of the bundled snapshot (read once per process)."""
    path = snapshot_path(exchange)
    if not path.is_file():
        return Markets(exchange, ())
    return Markets.from_ccxt(exchange, read_snapshot(path)["markets"])


@functools.cache
def instrument_table() -> InstrumentTable:
    """The domain's instrument data: every spelling of every bundled market (upper case)."""
    return {
        (exchange, spelling): market.instrument
        for exchange in Exchange
        for spelling, market in bundled(exchange).spellings()
    }


def show(exchange: Exchange, symbol: str | None) -> list[Market]:
    """``ledger markets show``: every bundled market of ``exchange``, or the one ``symbol`` names."""
    markets = bundled(exchange)
    return list(markets) if symbol is None else [markets.resolve(symbol)]
