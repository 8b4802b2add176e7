"""The live venue's exchange layer: what an order becomes at a venue, through ccxt's async API.

Venue-neutral facts in, venue-neutral facts out; the role (``consumers.venue``) decides what
they mean for the ledger. Per exchange (``RULES``):

* the venue's client order id, derived from the ledger's order id within the venue's rule: OKX
  ``clOrdId`` (1-32 alphanumerics) and Binance ``newClientOrderId`` (1-36 of ``A-Z a-z 0-9 - _``)
  get the UUID's 32 hex digits, Upbit ``identifier`` the UUID itself. The strategy's own
  ``client_order_id`` stays in the ledger and is never sent;
* how an order is looked up by that id (after a crash, a timeout, a disconnect) and where its
  trades are (OKX ``fills-history``, Binance ``myTrades`` by ``orderId``, Upbit: the order's own
  ``trades``);
* trigger orders (``stop_market``, ``stop_limit``, ``take_profit_market``: ccxt's ``triggerPrice``
  / ``takeProfitPrice``): Upbit has none; OKX (every market) and Binance futures keep them apart
  as algo orders, with their own id, lookup and cancel, whose trades are those of the order they
  place once triggered (``is_algo``, ``VenueClient.triggered``);
* hedge mode: a contract order with a position side is sent with the venue's (OKX ``posSide``,
  Binance ``positionSide``) and without ``reduceOnly``; one without, with one-way mode's.

Amounts: ccxt counts derivative amounts in contracts (OKX: ``contractSize`` base units per
linear contract), the ledger counts linear quantities in base units and inverse ones in
contracts (CONTRACT §1): ``Market.quantity_step`` is the step in ledger units, and the
conversion both ways is exact (a quantity that is not a whole multiple of the step is refused
before anything is sent).

Outcomes: a definite refusal by the venue (an error answer: ccxt ``ExchangeError`` other than
order-not-found and duplicate-client-id) raises ``Refused`` with the venue's code and message;
anything else (timeout, disconnect, 5xx, rate limit, an unreadable answer, a duplicate client id)
raises ``Ambiguous``: the order may or may not exist, and only a lookup by client id tells.

Quirk: an Upbit market buy is sent as a cost and reports ``cancel`` when the unspent part of the
cost is returned, though it filled: with an executed volume it is ``closed`` here (its trades are
fills, never a cancel).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from types import ModuleType
from typing import Any, Literal

from ledger.domain.arithmetic import fill_fee
from ledger.domain.enums import Exchange, InstrumentKind, OrderSide, OrderType, PositionSide
from ledger.domain.values import RULES as VALUE_RULES
from ledger.domain.values import ZERO, exact, format_decimal
from ledger.errors import InvalidInput, OperationFailed
from ledger.venues.accounts import Account, VenueOptions
from ledger.venues.markets import Market, MarketError, bundled, ccxt_decimal

# ccxt's unified order statuses
OPEN, CLOSED, CANCELED, EXPIRED, REJECTED = "open", "closed", "canceled", "expired", "rejected"
FINAL_STATUSES = frozenset({CLOSED, CANCELED, EXPIRED, REJECTED})  # the venue is done with the order
# ccxt's unified order type and the unified parameter carrying the trigger price, per ledger order
# type (market and limit orders have no trigger)
CCXT_ORDERS: Mapping[OrderType, tuple[str, str | None]] = {
    OrderType.MARKET: ("market", None),
    OrderType.LIMIT: ("limit", None),
    OrderType.STOP_MARKET: ("market", "triggerPrice"),
    OrderType.STOP_LIMIT: ("limit", "triggerPrice"),
    OrderType.TAKE_PROFIT_MARKET: ("market", "takeProfitPrice"),
}
# ccxt's unified parameter naming the position side of a contract order (OKX ``posSide``, Binance
# ``positionSide``)
POSITION_SIDE_PARAM = "positionSide"
# ccxt's unified parameter for the client order id: it sends OKX ``clOrdId``, Binance
# ``newClientOrderId`` (``origClientOrderId`` in a lookup), Upbit ``identifier``.
CLIENT_ID_PARAM = "clientOrderId"
# ccxt's parameter of fetch_order / cancel_order for a trigger (algo) order
TRIGGER_PARAM = "trigger"
_REASON_MAX = VALUE_RULES["reject_reason"].max_length
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")


def _ccxt() -> ModuleType:
    """ccxt's async API, imported on first use: about 35 MB that a process without a live
    exchange never loads (the venue role runs whatever the configuration)."""
    import ccxt.async_support

    return ccxt.async_support


@dataclass(frozen=True, slots=True)
class VenueRules:
    """How one exchange names, finds and reports an order."""

    client_id: re.Pattern[str]  # the venue's rule for it (checked with fullmatch)
    hex_client_id: bool  # the UUID's 32 hex digits (else the UUID as it is)
    trades_param: str | None  # the fetch_my_trades parameter naming the order; None: trades come with the order
    duplicate_codes: frozenset[str]  # error codes meaning "this client id was used already"
    duplicate_message: str | None = None  # or an error message saying so (Binance spot: code -2010 is shared)
    # trigger orders: the kinds of market whose trigger orders the venue keeps apart from its orders
    # (an algo order: its own id, lookup and cancel; the order it places once triggered trades),
    # the field of the algo order naming that order, and the parameter naming the algo order's
    # client id where ccxt's unified one does not reach it. None: the venue has no trigger orders.
    algo_markets: frozenset[InstrumentKind] | None = None
    triggered_order_field: str = ""
    algo_client_id_param: str | None = None
    # the ccxt ``fetch_open_orders`` parameters of each list of waiting algo orders (one call each),
    # the venue's fields of an algo order's limit price that ccxt's ``price`` leaves out, and the
    # field of its own type (named in a refusal to adopt an algo order the ledger has no type for)
    algo_listings: tuple[Mapping[str, Any], ...] = ()
    algo_price_fields: tuple[str, ...] = ()
    algo_type_field: str = ""
    # the venue's position side of a contract order: one-way mode's, long's and short's
    position_sides: tuple[str, str, str] | None = None


RULES: Mapping[Exchange, VenueRules] = {
    Exchange.OKX: VenueRules(
        re.compile(r"[A-Za-z0-9]{1,32}"),
        True,
        "ordId",
        frozenset({"51016", "51065"}),  # clOrdId, algoClOrdId ("algoClOrdId already exists")
        algo_markets=frozenset(InstrumentKind),
        triggered_order_field="ordId",
        algo_client_id_param="algoClOrdId",
        # ``orders-algo-pending`` lists one ``ordType`` at a time: stops, then take-profits
        algo_listings=({TRIGGER_PARAM: True}, {TRIGGER_PARAM: True, "ordType": "conditional"}),
        algo_price_fields=("tpOrdPx", "slOrdPx"),  # a ``conditional`` order's (-1: at market)
        algo_type_field="ordType",
        position_sides=("net", "long", "short"),
    ),
    Exchange.BINANCE: VenueRules(
        re.compile(r"[A-Za-z0-9_-]{1,36}"),
        True,
        "orderId",
        frozenset({"-4116", "-20132"}),  # newClientOrderId, clientAlgoId ("The client algo id is duplicated")
        "Duplicate order sent",
        algo_markets=frozenset({InstrumentKind.LINEAR, InstrumentKind.INVERSE}),
        triggered_order_field="actualOrderId",
        algo_listings=({TRIGGER_PARAM: True},),  # ``openAlgoOrders``
        algo_type_field="orderType",
        position_sides=("BOTH", "LONG", "SHORT"),
    ),
    Exchange.UPBIT: VenueRules(re.compile(r"[A-Za-z0-9_-]{1,64}"), False, None, frozenset()),
}


class Refused(InvalidInput):
    """A definite refusal: the order does not exist at the venue (``reason`` says why)."""


class StreamRefused(OperationFailed):
    """The venue refused to open a user-data stream of the account (no permission for it)."""


class Ambiguous(OperationFailed):
    """The outcome is unknown: the order may exist; look it up by its client id."""


def venue_client_id(exchange: Exchange, order_id: str) -> str:
    """The client order id the venue gets for the ledger's order ``order_id`` (a UUID)."""
    rules = RULES[exchange]
    client_id = order_id.replace("-", "") if rules.hex_client_id else order_id
    if not rules.client_id.fullmatch(client_id):
        raise InvalidInput(f"{exchange}: order id {order_id!r} gives no valid client order id")
    return client_id


@dataclass(frozen=True, slots=True)
class Intent:
    """An order as the venue gets it: ccxt's symbol, type, side, amount (venue units), price,
    trigger price; the position side sent (hedge mode) and whether it is an algo order."""

    exchange: Exchange
    market: Market
    side: OrderSide
    order_type: OrderType
    amount: Decimal
    price: Decimal | None
    cost: Decimal | None  # an Upbit market buy is sent as a cost (quote currency)
    reduce_only: bool
    client_id: str
    trigger_price: Decimal | None = None
    position_side: str | None = None  # the venue's spelling; None on a spot market
    algo: bool = False  # a trigger order the venue keeps apart (``VenueRules.algo_markets``)

    def params(self) -> dict[str, Any]:
        """ccxt's ``create_order`` params of this order (what each venue then sends: module doc)."""
        params: dict[str, Any] = {CLIENT_ID_PARAM: self.client_id}
        algo_client_id = RULES[self.exchange].algo_client_id_param
        if self.algo and algo_client_id is not None:
            params[algo_client_id] = self.client_id
        trigger_param = CCXT_ORDERS[self.order_type][1]
        if trigger_param is not None and self.trigger_price is not None:
            params[trigger_param] = format_decimal(self.trigger_price)
        if self.position_side is not None:
            params[POSITION_SIDE_PARAM] = self.position_side
        if self.reduce_only:
            params["reduceOnly"] = True
        if self.cost is not None:
            params["cost"] = format_decimal(self.cost)
        return params


def _multiple(value: Decimal, step: Decimal | None) -> bool:
    return step is None or step == 0 or value % step == 0


@exact
def to_amount(market: Market, quantity: Decimal) -> Decimal:
    """A ledger quantity in ccxt's amount units (contracts for a linear contract with a size)."""
    if market.kind is InstrumentKind.LINEAR and market.contract_size:
        return quantity / market.contract_size
    return quantity


@exact
def to_quantity(market: Market, amount: Decimal) -> Decimal:
    """A ccxt amount in the ledger's quantity units (the inverse of ``to_amount``)."""
    if market.kind is InstrumentKind.LINEAR and market.contract_size:
        return amount * market.contract_size
    return amount


@exact
def intent(
    exchange: Exchange,
    order_id: str,
    *,
    symbol: str,
    side: OrderSide,
    order_type: OrderType,
    quantity: Decimal,
    price: Decimal | None,
    reduce_only: bool,
    mark: Decimal | None,
    trigger_price: Decimal | None = None,
    position_side: PositionSide | None = None,
) -> Intent:
    """What to send for a ledger order; ``Refused`` when it cannot be sent as it is.

    Hedge mode: on a contract market an order with ``position_side`` is sent with the venue's
    long or short side and without ``reduce_only`` (neither venue takes it in hedge mode: the
    side says it, a sell on the long side only reduces the long); one without it with the one-way
    side (OKX ``net``, Binance ``BOTH``) and its ``reduce_only``."""
    rules = RULES[exchange]
    if order_type.needs_trigger and rules.algo_markets is None:
        raise Refused(f"{exchange} has no trigger orders: a {order_type} order is never sent (use market or limit)")
    if order_type.needs_trigger and trigger_price is None:
        raise Refused(f"a {order_type} order needs a trigger_price")
    try:
        market = bundled(exchange).resolve(symbol)
    except MarketError as exc:
        raise Refused(str(exc)) from None
    step = market.quantity_step
    if not _multiple(quantity, step):
        raise Refused(f"quantity {format_decimal(quantity)} is not a whole multiple of {market.symbol}'s step {step:f}")
    tick = market.price_precision
    for name, value in (("price", price), ("trigger price", trigger_price)):
        if value is not None and not _multiple(value, tick):
            raise Refused(f"{name} {format_decimal(value)} is not a whole multiple of {market.symbol}'s tick {tick:f}")
    cost = None
    if exchange is Exchange.UPBIT and order_type is OrderType.MARKET and side is OrderSide.BUY:
        reference = price if price is not None else mark
        if reference is None:
            raise Refused(f"an upbit market buy is sent as a cost: give a price or set the mark of {symbol}")
        cost = quantity * reference
    contract = market.kind is not InstrumentKind.SPOT
    sides = rules.position_sides if contract else None
    venue_side = None
    if sides is not None:
        venue_side = {None: sides[0], PositionSide.LONG: sides[1], PositionSide.SHORT: sides[2]}[position_side]
    return Intent(
        exchange=exchange,
        market=market,
        side=side,
        order_type=order_type,
        amount=to_amount(market, quantity),
        price=price if order_type.needs_price else None,
        cost=cost,
        reduce_only=reduce_only and contract and position_side is None,
        client_id=venue_client_id(exchange, order_id),
        trigger_price=trigger_price if order_type.needs_trigger else None,
        position_side=venue_side,
        algo=is_algo(exchange, market, order_type),
    )


def is_algo(exchange: Exchange, market: Market, order_type: OrderType) -> bool:
    """Whether the venue keeps an ``order_type`` order of ``market`` apart as an algo order (its
    own id, lookup and cancel; ``VenueRules.algo_markets``)."""
    markets = RULES[exchange].algo_markets
    return order_type.needs_trigger and markets is not None and market.kind in markets


@dataclass(frozen=True, slots=True)
class VenueFill:
    """One trade of an order, in ledger units."""

    fill_id: str
    quantity: Decimal
    price: Decimal
    fee: Decimal | None
    fee_currency: str | None
    ts: int | None
    exchange_order_id: str | None = None  # the venue's id of the trade's order
    fee_source: Literal["computed"] | None = None  # "computed": the venue reported no fee (_fill)


@dataclass(frozen=True, slots=True)
class VenueOrder:
    """An order as the venue reports it, in ledger units."""

    exchange_order_id: str
    client_id: str | None
    status: str  # ccxt's unified status (after the venue quirks)
    filled: Decimal
    fills: tuple[VenueFill, ...]
    # what was ordered, as ccxt reports it (ledger units), for adopting an order the ledger never placed
    side: str | None = None
    order_type: str | None = None
    quantity: Decimal | None = None
    price: Decimal | None = None
    trigger_price: Decimal | None = None
    reduce_only: bool = False

    @property
    @exact
    def traded(self) -> Decimal:
        """The quantity of the trades listed (the venue may list them after it reports ``filled``)."""
        return sum((f.quantity for f in self.fills), ZERO)


def _fill(market: Market, trade: Mapping[str, Any]) -> VenueFill:
    fee = trade.get("fee") or {}
    cost = ccxt_decimal(fee.get("cost"))
    currency = fee.get("currency")
    quantity = to_quantity(market, ccxt_decimal(trade["amount"]) or ZERO)
    price = ccxt_decimal(trade["price"]) or ZERO
    source: Literal["computed"] | None = None
    rate = market.fee_rate(trade.get("takerOrMaker"))
    if cost is None and rate is not None and price > 0:  # the venue omitted it: computed, and marked so
        cost, currency, source = fill_fee(market.instrument, quantity, price, rate), market.settle, "computed"
    return VenueFill(
        fill_id=str(trade["id"]),
        quantity=quantity,
        price=price,
        fee=cost,
        fee_currency=currency if VALUE_RULES["fee_currency"].matches(currency) else None,
        ts=trade.get("timestamp"),
        exchange_order_id=None if trade.get("order") is None else str(trade["order"]),
        fee_source=source,
    )


def _algo_type(order: Mapping[str, Any], price_fields: tuple[str, ...]) -> tuple[str, Decimal] | None:
    """The ledger's order type and trigger price of an algo order as ccxt parses it (OKX types it
    ``trigger`` / ``conditional``, Binance by the order it will place): a take-profit that places a
    market order is ``take_profit_market``; a stop ``stop_market``, or ``stop_limit`` with a price.
    A take-profit limit, or a stop and a take-profit at once (OCO), has no ledger type: None."""
    info = order.get("info") or {}
    prices = [ccxt_decimal(order.get("price")), *(ccxt_decimal(info.get(name) or None) for name in price_fields)]
    limit = any(price is not None and price > ZERO for price in prices)  # OKX writes -1 for "at market", Binance 0
    take_profit, stop = (ccxt_decimal(order.get(k)) for k in ("takeProfitPrice", "stopLossPrice"))
    if take_profit is not None and take_profit > ZERO:
        both = stop is not None and stop > ZERO
        return None if limit or both else (str(OrderType.TAKE_PROFIT_MARKET), take_profit)
    trigger = ccxt_decimal(order.get("triggerPrice")) or stop
    if trigger is None or trigger <= ZERO:
        return None
    return str(OrderType.STOP_LIMIT if limit else OrderType.STOP_MARKET), trigger


def _venue_order(
    exchange: Exchange, market: Market, order: Mapping[str, Any], trades: list[Any], *, algo: bool = False
) -> VenueOrder:
    """``order`` as ccxt reports it, in ledger units; an ``algo`` order (not triggered) with the
    ledger's trigger order type (``_algo_type``; one the ledger has none for is named by the
    venue's own type, lower case, never ccxt's ``limit`` / ``market``: it is not adopted as a
    plain order) and its client id (OKX: ``algoClOrdId``, which ccxt's parser leaves out)."""
    filled = to_quantity(market, ccxt_decimal(order.get("filled")) or ZERO)
    status = str(order.get("status") or OPEN)
    upbit_market_buy = exchange is Exchange.UPBIT and order.get("type") == "market" and order.get("side") == "buy"
    if status == CANCELED and upbit_market_buy and filled > 0:
        status = CLOSED  # the unspent cost came back; what executed is a fill
    fills = {str(t["id"]): _fill(market, t) for t in trades if t.get("id") is not None}
    amount = ccxt_decimal(order.get("amount"))
    client_id = order.get("clientOrderId")
    order_type, trigger = order.get("type"), ccxt_decimal(order.get("triggerPrice"))
    if algo:
        rules, info = RULES[exchange], order.get("info") or {}
        client_id = client_id or info.get(rules.algo_client_id_param or "") or None
        typed = _algo_type(order, rules.algo_price_fields)
        order_type, trigger = typed or (f"{info.get(rules.algo_type_field) or 'unknown'} algo".lower(), trigger)
    return VenueOrder(
        str(order["id"]),
        client_id,
        status,
        filled,
        tuple(fills.values()),
        side=order.get("side"),
        order_type=order_type,
        quantity=None if amount is None else to_quantity(market, amount),
        price=ccxt_decimal(order.get("price")),
        trigger_price=trigger,
        reduce_only=bool(order.get("reduceOnly")),
    )


def _algo(algo: bool) -> dict[str, Any]:
    """ccxt's parameter routing a lookup or cancel to the venue's algo orders."""
    return {TRIGGER_PARAM: True} if algo else {}


# Venues whose pushed trades carry the fee with the venue's sign, which ccxt's WebSocket API passes
# on as it is: OKX's ``orders`` channel reports ``fillFee`` negative when charged (its REST trades
# are negated by ccxt's parser).
PUSHED_FEE_NEGATED = frozenset({Exchange.OKX})


def _pushed_trade(exchange: Exchange, trade: Mapping[str, Any]) -> Mapping[str, Any]:
    """A trade ccxt's WebSocket API gave, alike to one its REST API gives (``PUSHED_FEE_NEGATED``),
    so a trade pushed and the same trade fetched make the same fill."""
    fee = trade.get("fee") or {}
    if exchange not in PUSHED_FEE_NEGATED or fee.get("cost") is None:
        return trade
    return {**trade, "fee": {**fee, "cost": -fee["cost"]}}


# The user-data stream carrying the orders of each kind of market, per exchange; an order of a kind
# not listed is polled. OKX: the ``orders`` channel with ``instType`` ANY, every kind; Binance: the
# spot user data stream, and USDⓈ-M's and COIN-M's own listenKey streams (ccxt's market types
# ``future`` and ``delivery``: ``fapi`` / ``dapi`` listenKey, ``ORDER_TRADE_UPDATE`` events), each
# its own socket, which an account without futures permission cannot open; Upbit: ``myOrder``, spot.
STREAMS: Mapping[Exchange, Mapping[InstrumentKind, str]] = {
    Exchange.OKX: dict.fromkeys(InstrumentKind, "orders"),
    Exchange.BINANCE: {
        InstrumentKind.SPOT: "spot",
        InstrumentKind.LINEAR: "future",
        InstrumentKind.INVERSE: "delivery",
    },
    Exchange.UPBIT: {InstrumentKind.SPOT: "myOrder"},
}
# how many pushed orders and trades ccxt keeps (its default, ``ordersLimit`` / ``tradesLimit``)
PUSHED_CACHE = 1000


def _tap(queue: asyncio.Queue[tuple[str, dict[str, Any]]], kind: str) -> Any:
    """A ccxt cache of pushed ``kind`` items ("order", "trade") that also queues a copy of each
    item as ccxt's handler stores it (``VenueClient.watch``)."""
    from ccxt.async_support.base.ws.cache import ArrayCacheBySymbolById

    class Tap(ArrayCacheBySymbolById):  # type: ignore[misc]
        def append(self, item: dict[str, Any]) -> None:
            super().append(item)
            queue.put_nowait((kind, dict(item)))

    return Tap(PUSHED_CACHE)


def _printable(text: str) -> str:
    return _UNPRINTABLE.sub(" ", text).strip()


def refusal_reason(exchange: Exchange, exc: BaseException) -> str:
    """The venue's code and message of an error answer, within the reject-reason limits."""
    code, message = _code_message(exc)
    head = f"{exchange} refused the order"
    reason = _printable(f"{head}: {code} {message}" if code else f"{head}: {message}")
    return reason if len(reason) <= _REASON_MAX else reason[: _REASON_MAX - 3] + "..."


def _code_message(exc: BaseException) -> tuple[str | None, str]:
    """(code, message) of a ccxt error: ccxt writes ``<exchange id> <JSON body>``."""
    text = str(exc)
    start = text.find("{")
    try:
        body = json.loads(text[start:]) if start >= 0 else None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return None, text
    data = body.get("data")
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    if first.get("sCode") not in (None, "", "0"):  # OKX: the order's own code
        return str(first["sCode"]), str(first.get("sMsg", ""))
    error = body.get("error")
    if isinstance(error, dict):  # Upbit
        return str(error.get("name")), str(error.get("message", ""))
    if "code" in body:  # OKX, Binance
        return str(body["code"]), str(body.get("msg", ""))
    return None, text


def classify(exchange: Exchange, exc: BaseException) -> Refused | Ambiguous:
    """What an exception of a create means: a definite refusal or an unknown outcome."""
    ccxt = _ccxt()
    code, message = _code_message(exc)
    rules = RULES[exchange]
    duplicate = (
        isinstance(exc, ccxt.DuplicateOrderId)
        or code in rules.duplicate_codes
        or (rules.duplicate_message is not None and rules.duplicate_message in message)
    )
    if isinstance(exc, ccxt.ExchangeError) and not isinstance(exc, ccxt.OrderNotFound) and not duplicate:
        return Refused(refusal_reason(exchange, exc))
    what = "the client order id is in use already" if duplicate else type(exc).__name__
    return Ambiguous(f"{exchange}: outcome unknown ({what}): the order is looked up by its client id")


# ccxt's parameters of ``watch_orders`` / ``watch_my_trades`` choosing a Binance stream (its market
# type and, for futures, the sub-type ccxt's ``resolve_auth_type`` picks the listenKey API by); the
# other venues have one stream.
BINANCE_STREAM_PARAMS: Mapping[str, Mapping[str, str]] = {
    "spot": {"type": "spot"},
    "future": {"type": "future", "subType": "linear"},
    "delivery": {"type": "delivery", "subType": "inverse"},
}


def _stream_params(exchange: Exchange, stream: str) -> dict[str, Any]:
    return dict(BINANCE_STREAM_PARAMS[stream]) if exchange is Exchange.BINANCE else {}


@dataclass(slots=True)
class _Stream:
    """One user-data stream watched: its ``ccxt.pro`` instance, what ``_tap`` took, the watches."""

    pro: Any
    pushed: asyncio.Queue[tuple[str, dict[str, Any]]]
    watching: dict[str, asyncio.Future[Any]] = field(default_factory=dict)


class VenueClient:
    """One ccxt async client of one (exchange, account), rate limited, reused for every order."""

    def __init__(self, exchange: Exchange, account: Account, options: VenueOptions) -> None:
        self.exchange = exchange
        self.account = account.name
        self.rules = RULES[exchange]
        config = {"timeout": options.timeout_ms, **account.ccxt_config()}
        from ledger.venues.exchanges import async_client  # imports ccxt (``_ccxt``)

        self.ccxt = async_client(
            exchange, base_url=options.base_url, config=config, sandbox=options.sandbox, demo=options.demo
        )
        self._options = options
        self._account = account  # for the WebSocket client, built when first watched
        self._streams: dict[str, _Stream] = {}  # the streams watched, by name (``STREAMS``)
        self.refused: set[str] = set()  # the streams the venue refused to open: their orders are polled
        self._has: dict[str, Any] | None = None  # ccxt.pro's ``has`` of the exchange (``watches``)

    async def close(self) -> None:
        await self.ccxt.close()
        for stream in list(self._streams):
            await self.unwatch(stream)

    # ----------------------------------------------------------------- WebSocket (``ccxt.pro``)

    def _ws(self) -> Any:
        """A ``ccxt.pro`` instance of this account, with the same options (and ``ws_url``): one per
        stream, so a stream's pushes and failures are its own. Binance's does not fetch a positions
        snapshot when a futures stream opens (ccxt's default; positions are not followed here)."""
        from ledger.venues.exchanges import pro_client

        options = self._options
        pro = pro_client(
            self.exchange,
            base_url=options.base_url,
            ws_url=options.ws_url,
            config={"timeout": options.timeout_ms, **self._account.ccxt_config()},
            sandbox=options.sandbox,
            demo=options.demo,
        )
        if self.exchange is Exchange.BINANCE:
            pro.options["watchPositions"] = {**pro.options.get("watchPositions", {}), "fetchPositionsSnapshot": False}
        return pro

    @property
    def watches(self) -> bool:
        """Whether this account's orders are followed over WebSocket: ccxt has ``watch_orders`` and
        ``watch_my_trades`` for the exchange, and the WebSocket is the REST venue's (a ``base_url``
        override without a ``ws_url`` one means polling only)."""
        if self._options.base_url is not None and self._options.ws_url is None:
            return False
        if self._has is None:  # an instance that never connected: nothing to close
            self._has = dict(self._ws().has)
        return bool(self._has.get("watchOrders") and self._has.get("watchMyTrades"))

    def stream(self, order: Intent) -> str | None:
        """The user-data stream carrying this order's updates (``STREAMS``); None: it is polled (an
        algo order's own updates are on another channel, and some markets have no stream)."""
        return None if order.algo else STREAMS[self.exchange].get(order.market.kind)

    async def watch(self, stream: str) -> list[VenueFill | VenueOrder]:
        """What the venue pushed on ``stream`` since the last call, in the order pushed, in ledger
        units: the account's trades (ccxt ``watch_my_trades``; each with its order's venue id) and
        orders (``watch_orders``, without trades); waits for one at least. ``Ambiguous`` when the
        socket failed (the next call reconnects), ``StreamRefused`` when the venue refused it.

        ccxt resolves a watch only while one waits, so two pushes handled back to back would give
        one answer and leave the second one's update waiting for a third push: every update is
        taken instead from ccxt's own caches of them (``orders``, ``myTrades``) as it is stored
        (``_tap``), and the watches only keep the subscriptions up and report a failure."""
        if stream not in self._streams:
            ws, queue = self._ws(), asyncio.Queue[tuple[str, dict[str, Any]]]()
            ws.myTrades, ws.orders = _tap(queue, "trade"), _tap(queue, "order")
            self._streams[stream] = _Stream(ws, queue)
        watched = self._streams[stream]
        while True:
            pushed = self._drain(watched.pushed)
            if pushed:
                return pushed
            self._arm(stream, watched)
            taken = asyncio.ensure_future(watched.pushed.get())
            try:
                await asyncio.wait({taken, *watched.watching.values()}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not taken.done():
                    taken.cancel()
            if taken.done() and not taken.cancelled():
                watched.pushed.put_nowait(taken.result())

    def _arm(self, stream: str, watched: _Stream) -> None:
        """Keep ``watch_my_trades`` and ``watch_orders`` of ``stream`` waiting; ``Ambiguous`` if one
        failed, ``StreamRefused`` (the stream then in ``refused``) if the venue refused the account."""
        ccxt = _ccxt()
        for method in ("watch_my_trades", "watch_orders"):
            task = watched.watching.get(method)
            if task is not None and task.done():
                del watched.watching[method]
                failure = None if task.cancelled() else task.exception()
                if failure is not None:
                    for other in watched.watching.values():
                        other.cancel()
                    watched.watching.clear()
                    what = f"{self.exchange}: the {stream} WebSocket of account {self.account}"
                    if isinstance(failure, (ccxt.AuthenticationError, ccxt.PermissionDenied)):
                        self.refused.add(stream)
                        raise StreamRefused(
                            f"{what} was refused ({type(failure).__name__}): its orders are polled; give the"
                            f" API key the permission (Binance: Enable Futures) and restart the venue to follow"
                            f" them over WebSocket"
                        ) from failure
                    raise Ambiguous(f"{what} failed ({type(failure).__name__})") from failure
            if method not in watched.watching:
                watch = getattr(watched.pro, method)
                watched.watching[method] = asyncio.ensure_future(watch(params=_stream_params(self.exchange, stream)))

    def _drain(self, queue: asyncio.Queue[tuple[str, dict[str, Any]]]) -> list[VenueFill | VenueOrder]:
        pushed: list[VenueFill | VenueOrder] = []
        while not queue.empty():
            kind, item = queue.get_nowait()
            market = bundled(self.exchange).find(str(item.get("symbol")))
            if market is None or item.get("id") is None:
                continue  # a market the ledger does not trade
            if kind == "order":
                pushed.append(_venue_order(self.exchange, market, item, []))
            elif item.get("order") is not None:
                pushed.append(_fill(market, _pushed_trade(self.exchange, item)))
        return pushed

    async def unwatch(self, stream: str) -> None:
        """Stop watching ``stream``: its watches cancelled, its socket closed, what was pushed dropped
        (a closed instance does not open again: the next watch builds one)."""
        watched = self._streams.pop(stream, None)
        if watched is None:
            return
        for task in watched.watching.values():
            task.cancel()
        await asyncio.gather(*watched.watching.values(), return_exceptions=True)
        await watched.pro.close()

    async def create(self, order: Intent) -> str:
        """Send the order; its venue id (an algo order's own id for a trigger order the venue
        keeps apart). ``Refused`` or ``Ambiguous`` otherwise."""
        price = format_decimal(order.price) if order.price is not None else None
        try:
            created = await self.ccxt.create_order(
                order.market.symbol,
                CCXT_ORDERS[order.order_type][0],
                str(order.side),
                format_decimal(order.amount),
                price,
                order.params(),
            )
        except Exception as exc:  # every failure is classified: refused, or unknown
            raise classify(self.exchange, exc) from exc
        if not created.get("id"):
            raise Ambiguous(f"{self.exchange}: the venue answered without an order id: looking it up")
        return str(created["id"])

    async def lookup(self, client_id: str, market: Market, *, algo: bool = False) -> str | None:
        """The venue id of the order with ``client_id`` (an ``algo`` order is looked up where it
        lives, among the algo orders); None when the venue says there is none."""
        try:
            if self.exchange is Exchange.UPBIT:
                raw = await self.ccxt.private_get_order({"identifier": client_id})
                found = self.ccxt.parse_order(raw, self.ccxt.market(market.symbol))
            else:
                params = {CLIENT_ID_PARAM: client_id, **_algo(algo)}
                found = await self.ccxt.fetch_order(None, market.symbol, params)
        except _ccxt().OrderNotFound:
            return None
        except Exception as exc:
            raise Ambiguous(f"{self.exchange}: lookup of {client_id} failed ({type(exc).__name__})") from exc
        return str(found["id"])

    async def fetch(self, exchange_order_id: str, market: Market, *, algo: bool = False) -> VenueOrder:
        """The order and its trades, as the venue reports them now (``Ambiguous`` when it cannot).
        An ``algo`` order has none until it is triggered (a trigger that fired but whose order the
        venue does not name yet is ``open``); then the order it placed is the one reported."""
        try:
            order = await self.ccxt.fetch_order(exchange_order_id, market.symbol, _algo(algo))
            triggered = self._triggered(order) if algo else None
            if algo and triggered is None:
                report = _venue_order(self.exchange, market, order, [], algo=True)
                return replace(report, status=OPEN) if report.status == CLOSED else report
            if triggered is not None:
                order = await self.ccxt.fetch_order(triggered, market.symbol)
                exchange_order_id = triggered
            if self.rules.trades_param is None:
                trades = list(order.get("trades") or [])
            else:
                params = {self.rules.trades_param: exchange_order_id}
                trades = await self.ccxt.fetch_my_trades(market.symbol, None, None, params)
        except Exception as exc:
            raise Ambiguous(f"{self.exchange}: status of {exchange_order_id} unknown ({type(exc).__name__})") from exc
        return _venue_order(self.exchange, market, order, trades)

    def _triggered(self, algo_order: Mapping[str, Any]) -> str | None:
        """The id of the order an algo order placed once triggered (None: not triggered)."""
        found = (algo_order.get("info") or {}).get(self.rules.triggered_order_field)
        return str(found) if found not in (None, "", 0, "0") else None

    async def triggered(self, exchange_order_id: str, market: Market) -> str | None:
        """The id of the order the algo order ``exchange_order_id`` placed once triggered (None:
        not triggered); ``Ambiguous`` when the venue does not answer."""
        try:
            return self._triggered(await self.ccxt.fetch_order(exchange_order_id, market.symbol, _algo(True)))
        except Exception as exc:
            raise Ambiguous(f"{self.exchange}: algo order {exchange_order_id} unknown ({type(exc).__name__})") from exc

    async def cancel(self, exchange_order_id: str, market: Market, *, algo: bool = False) -> str | None:
        """Ask the venue to cancel; None once it answered (a refusal too: the order is final
        there, and its status tells how), ``Ambiguous`` when it did not. The refusal's reason
        is returned for the log. An ``algo`` order is looked up first: once triggered, the order
        it placed is cancelled, else the algo order."""
        try:
            if algo:
                triggered = self._triggered(await self.ccxt.fetch_order(exchange_order_id, market.symbol, _algo(True)))
                if triggered is None:
                    await self.ccxt.cancel_order(exchange_order_id, market.symbol, _algo(True))
                else:
                    await self.ccxt.cancel_order(triggered, market.symbol)
            else:
                await self.ccxt.cancel_order(exchange_order_id, market.symbol)
        except _ccxt().ExchangeError as exc:
            return refusal_reason(self.exchange, exc)
        except Exception as exc:
            what = type(exc).__name__
            raise Ambiguous(f"{self.exchange}: cancel of {exchange_order_id} unanswered ({what})") from exc
        return None

    async def open_orders(self, market: Market, *, algo: bool = False) -> list[VenueOrder]:
        """The account's open orders of a market, with no trades (for reconciliation); ``algo``:
        its algo orders waiting for their trigger instead (none where the venue keeps no trigger
        order of the market apart, ``VenueRules.algo_markets``)."""
        if not algo:
            orders = await self.ccxt.fetch_open_orders(market.symbol)
            return [_venue_order(self.exchange, market, order, []) for order in orders]
        if market.kind not in (self.rules.algo_markets or ()):
            return []
        return [
            _venue_order(self.exchange, market, order, [], algo=True)
            for params in self.rules.algo_listings
            for order in await self.ccxt.fetch_open_orders(market.symbol, None, None, dict(params))
        ]

    async def recent_fills(self, market: Market) -> list[VenueFill]:
        """The account's recent trades of a market, as the venue lists them by default (for
        reconciliation; Upbit has no such list: its orders' trades are read with ``fetch``)."""
        return [_fill(market, t) for t in await self.ccxt.fetch_my_trades(market.symbol)]

    async def position(self, market: Market) -> Decimal | None:
        """The account's net position of a contract market in ledger units (long minus short);
        None for a spot market or where ccxt has no ``fetchPositions`` (Upbit). Binance's are
        asked of the market's API (ccxt takes USD-M's unless told ``subType``: COIN-M's apart)."""
        if market.kind is InstrumentKind.SPOT or not self.ccxt.has.get("fetchPositions"):
            return None
        params = {"subType": str(market.kind)} if self.exchange is Exchange.BINANCE else {}
        net = ZERO
        for found in await self.ccxt.fetch_positions([market.symbol], params):
            size = to_quantity(market, ccxt_decimal(found.get("contracts")) or ZERO)
            net += -size if found.get("side") == "short" else size
        return net


class VenueClients:
    """One ``VenueClient`` per (exchange, account), made when first needed and closed together."""

    def __init__(self, options: Mapping[Exchange, VenueOptions]) -> None:
        self.options = options
        self._clients: dict[tuple[Exchange, str], VenueClient] = {}

    def get(self, account: Account) -> VenueClient:
        key = (account.exchange, account.name)
        if key not in self._clients:
            self._clients[key] = VenueClient(account.exchange, account, self.options[account.exchange])
        return self._clients[key]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
