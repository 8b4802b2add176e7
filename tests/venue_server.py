"""A recorded venue on loopback: an HTTP server that answers the real ccxt exchange classes with
recorded, real-shaped exchange responses, so ccxt's own HTTP and parsing code runs without a network.

A recording (``tests/recorded/<what>/<exchange>.json``) is ``{"exchange", "about", "responses"}``;
each response names ``method``, ``path``, the ``query`` parameters it answers (a subset of the
request's) and the JSON ``body``. A request no response answers gets a 404 and is kept in
``unanswered``, so a test can assert that ccxt asked for nothing unrecorded. The server runs on its
own event loop in a thread: synchronous and ``ccxt.async_support`` clients can both use it.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web

RECORDED = Path(__file__).parent / "recorded"


def recording(what: str, exchange: str) -> list[dict[str, Any]]:
    """The recorded responses of ``tests/recorded/<what>/<exchange>.json``."""
    data = json.loads((RECORDED / what / f"{exchange}.json").read_text(encoding="utf-8"))
    return list(data["responses"])


class RecordedVenue:
    def __init__(self, responses: list[dict[str, Any]]) -> None:
        self.responses = responses
        self.requests: list[str] = []
        self.unanswered: list[str] = []
        self.url = ""

    def _answer(self, request: web.Request) -> web.Response:
        self.requests.append(str(request.rel_url))
        for response in self.responses:
            query = response.get("query", {})
            if (
                response["method"] == request.method
                and response["path"] == request.path
                and all(request.query.get(k) == v for k, v in query.items())
            ):
                return web.json_response(response["body"], status=response.get("status", 200))
        self.unanswered.append(f"{request.method} {request.rel_url}")
        return web.json_response({"error": "not recorded"}, status=404)

    async def _handle(self, request: web.Request) -> web.Response:
        return self._answer(request)


@contextmanager
def recorded_venue(responses: list[dict[str, Any]]) -> Iterator[RecordedVenue]:
    """Serve ``responses`` on 127.0.0.1 (a free port) for the duration of the block."""
    venue = RecordedVenue(responses)
    with _serving(venue._handle) as url:
        venue.url = url
        yield venue


@contextmanager
def _serving(handle: Any) -> Iterator[str]:
    """Serve ``handle`` for every request on 127.0.0.1 (a free port), on its own event loop in a
    thread; yields the base URL."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    urls: list[str] = []

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        urls.append(f"http://127.0.0.1:{port}")

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="loopback-venue", daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield urls[0]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


# --------------------------------------------------------------------------- a stateful venue


@dataclass
class BookFill:
    trade_id: str
    amount: Decimal  # venue units (contracts for OKX derivatives)
    price: Decimal
    fee: Decimal
    ts_ms: int = field(default_factory=lambda: int(time.time() * 1000))  # when it traded


@dataclass
class BookOrder:
    """One order on the loopback venue's book; ``state`` is ``open``, ``filled`` or ``canceled``
    (each venue's answers spell it its own way)."""

    venue_id: str
    client_id: str
    market_id: str
    side: str  # buy / sell
    ord_type: str  # limit / market
    amount: Decimal | None  # venue units; None for an Upbit market buy (sent as a cost)
    price: str | None
    cost: str | None = None
    state: str = "open"  # an algo order: ``open``, ``triggered`` or ``canceled``
    fills: list[BookFill] = field(default_factory=list)
    api: str = "api"  # the first path segment: Binance ``api`` (spot), ``fapi`` (USD-M), ``dapi`` (COIN-M)
    algo: bool = False  # an algo (trigger) order: OKX ``order-algo``, Binance ``algoOrder``
    trigger_price: str | None = None
    position_side: str | None = None  # as the venue got it (OKX ``posSide``, Binance ``positionSide``)
    params: dict[str, str] = field(default_factory=dict)  # the create request's, without signing fields
    triggered: str | None = None  # an algo order's: the key in ``orders`` of the order it placed

    @property
    def filled(self) -> Decimal:
        return sum((f.amount for f in self.fills), Decimal(0))


def _plain(value: Decimal) -> str:
    return format(value, "f")


class LoopbackExchange:
    """A stateful stand-in for one exchange's order endpoints, answering real ccxt classes with the
    shapes of ``tests/recorded/orders/<exchange>.json`` (copied, with the book's fields written in).

    Test controls (from the test's thread): ``fill``, ``finish``, ``create_delay_s`` (the order is
    booked, then the answer comes this late, or when it is set to 0: a timeout), ``refuse_creates``
    (a definite refusal), ``refuse_streams`` (Binance futures listenKeys refused),
    ``fill_on_cancel`` (a fill that lands before the cancel does), and ``created`` (set once a
    create was booked); for reconciliation, ``book`` (an order placed at the venue directly, not
    through a create request) and ``positions`` (OKX ``account/positions`` rows). ``creates``
    counts create requests per client id, ``orders`` the book. Open orders and the account's
    trades are listed per market.
    """

    def __init__(self, exchange: str) -> None:
        data = json.loads((RECORDED / "orders" / f"{exchange}.json").read_text(encoding="utf-8"))
        self.exchange = exchange
        self.templates: dict[str, Any] = data["templates"]
        self.orders: dict[str, BookOrder] = {}  # by client id
        self.creates: Counter[str] = Counter()
        self.requests: list[str] = []
        self.unanswered: list[str] = []
        self.create_delay_s = 0.0
        self.refuse_creates = False
        self.fill_on_cancel: tuple[str, str, str] | None = None  # amount, price, trade id
        self.created = threading.Event()
        self.positions: list[dict[str, Any]] = []
        self.refuse_streams: set[str] = set()  # Binance ``fapi`` / ``dapi``: the listenKey refused
        self.lock = threading.Lock()
        self.url = ""
        self._next_id = 312269865356374016

    # ------------------------------------------------------------- test controls

    def order(self, client_id: str) -> BookOrder:
        with self.lock:
            return self.orders[client_id]

    def only_order(self) -> BookOrder:
        with self.lock:
            (order,) = self.orders.values()
            return order

    def fill(
        self, client_id: str, amount: str, price: str, trade_id: str, fee: str = "0", ts_ms: int | None = None
    ) -> None:
        """A trade of the order (now, or at ``ts_ms``); the order is ``filled`` once its amount is reached."""
        with self.lock:
            order = self.orders[client_id]
            trade = BookFill(trade_id, Decimal(amount), Decimal(price), Decimal(fee))
            order.fills.append(trade if ts_ms is None else replace(trade, ts_ms=ts_ms))
            if order.amount is not None and order.filled >= order.amount:
                order.state = "filled"

    def book(self, client_id: str, market_id: str, side: str, amount: str, price: str, api: str = "api") -> BookOrder:
        """A limit order on the book that no create request placed (a venue's own front end;
        ``api``: Binance's, ``fapi`` or ``dapi`` for futures)."""
        with self.lock:
            order = BookOrder(self._venue_id(), client_id, market_id, side, "limit", Decimal(amount), price, api=api)
            self.orders[client_id] = order
            return order

    def book_algo(
        self,
        client_id: str,
        market_id: str,
        side: str,
        amount: str,
        trigger_price: str,
        *,
        price: str | None = None,
        take_profit: bool = False,
        api: str = "api",
    ) -> BookOrder:
        """An algo order waiting for its trigger that no create request placed: a stop (at market,
        or at ``price``), or a take-profit at market (OKX ``conditional``)."""
        if self.exchange == "okx":
            kind = "conditional" if take_profit else "trigger"
            params = {"tpTriggerPx": trigger_price} if take_profit else {"triggerPx": trigger_price}
        else:
            kind = "take_profit_market" if take_profit else "stop_market" if price is None else "stop"
            params = {"triggerPrice": trigger_price}
        with self.lock:
            order = BookOrder(
                self._venue_id(),
                client_id,
                market_id,
                side,
                kind,
                Decimal(amount),
                price,
                api=api,
                algo=True,
                trigger_price=trigger_price,
                params=params,
            )
            self.orders[client_id] = order
            return order

    def finish(self, client_id: str, state: str) -> None:
        with self.lock:
            self.orders[client_id].state = state

    def trigger(self, client_id: str) -> str:
        """The algo order's trigger fires: it places its order (market, or limit at its price);
        returns that order's key in ``orders`` (for ``fill``)."""
        with self.lock:
            algo = self.orders[client_id]
            key = f"triggered:{algo.venue_id}"
            self.orders[key] = BookOrder(
                venue_id=self._venue_id(),
                client_id="",
                market_id=algo.market_id,
                side=algo.side,
                ord_type="market" if algo.price is None else "limit",
                amount=algo.amount,
                price=algo.price,
                api=algo.api,
                position_side=algo.position_side,
            )
            algo.state, algo.triggered = "triggered", key
            return key

    # ------------------------------------------------------------- serving

    def _copy(self, name: str) -> Any:
        return copy.deepcopy(self.templates[name])

    def _venue_id(self) -> str:
        self._next_id += 1
        if self.exchange == "upbit":
            return str(uuid.UUID(int=self._next_id))
        return str(self._next_id)

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append(f"{request.method} {request.path}")
        params: dict[str, str] = dict(request.query)
        if request.body_exists:
            raw = await request.text()
            if raw.startswith(("{", "[")):
                body = json.loads(raw)
                (one,) = body if isinstance(body, list) else [body]  # OKX sends an order as a batch of one
                params.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in one.items()})
            else:
                params.update(dict(urllib.parse.parse_qsl(raw)))
        route = ROUTES[self.exchange].get((request.method, request.path))
        if route is None:
            self.unanswered.append(f"{request.method} {request.rel_url}")
            return web.json_response({"error": "not recorded"}, status=404)
        api, algo = request.path.split("/")[1], route.startswith("algo_")
        route = route.removeprefix("algo_")
        if route == "create":
            booked = self._create(params, api, algo)
            if isinstance(booked, web.Response):
                return booked
            self.created.set()
            until = time.monotonic() + self.create_delay_s
            while self.create_delay_s and time.monotonic() < until:  # held until the delay is lifted
                await asyncio.sleep(0.02)
            return web.json_response(self._created(booked))
        if route == "listen_key":  # a futures user-data stream (served by tests/venue_ws.py)
            return self._listen_key(api)
        if route == "leverage_brackets":  # ccxt reads them before Binance futures positions
            return web.json_response(self._copy(f"{api}_leverage_brackets"))
        if route in ("open_orders", "positions") or (route == "fills" and not {"ordId", "orderId"} & params.keys()):
            with self.lock:
                return web.json_response(self._listing(route, params, api, algo))
        with self.lock:
            order = self._find(params, api, algo)
            if order is None:
                status = {"okx": 200, "binance": 400, "upbit": 404}[self.exchange]
                return web.json_response(self._copy("order_not_found"), status=status)
            if route == "order":
                return web.json_response(self._order(order))
            if route == "fills":
                return web.json_response(self._fills(order))
            return self._cancel(order)

    def _listen_key(self, api: str) -> web.Response:
        """Binance's listenKey of the ``api`` (``fapi``, ``dapi``) user-data stream, or its refusal
        of an API key without futures permission (``refuse_streams``)."""
        if api in self.refuse_streams:
            error = {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}
            return web.json_response(error, status=401)
        return web.json_response({"listenKey": listen_key(api)})

    def _create(self, params: dict[str, str], api: str, algo: bool) -> BookOrder | web.Response:
        spelling = {
            "okx": ("algoClOrdId" if algo else "clOrdId", "instId", "sz", "px", "ordType"),
            "binance": ("clientAlgoId" if algo else "newClientOrderId", "symbol", "quantity", "price", "type"),
            "upbit": ("identifier", "market", "volume", "price", "ord_type"),
        }[self.exchange]
        client_key, market_key, amount_key, price_key, type_key = spelling
        client_id = params[client_key]
        with self.lock:
            self.creates[client_id] += 1
            if self.refuse_creates:
                status = {"okx": 200, "binance": 400, "upbit": 400}[self.exchange]
                return web.json_response(self._copy("create_refused"), status=status)
            if client_id in self.orders:  # each venue refuses a second order with a client id in use
                duplicate = {
                    "okx": {
                        "code": "1",
                        "msg": "",
                        "data": [
                            {
                                "clOrdId": client_id,
                                "ordId": "",
                                "sCode": "51016",
                                "sMsg": "Duplicated clOrdId",
                                "tag": "",
                                "ts": "",
                            }
                        ],
                    },
                    "binance": {"code": -2010, "msg": "Duplicate order sent."},
                    "upbit": {"error": {"name": "duplicate_identifier", "message": "identifier in use"}},
                }[self.exchange]
                return web.json_response(duplicate, status=200 if self.exchange == "okx" else 400)
            kind = params[type_key].lower()
            side = params["side"].lower()
            upbit_market_buy = self.exchange == "upbit" and kind == "price"
            trigger_keys = ("triggerPx", "tpTriggerPx", "slTriggerPx", "triggerPrice", "stopPrice")
            price = next((params[k] for k in ("orderPx", "tpOrdPx", "slOrdPx", price_key) if k in params), None)
            order = BookOrder(
                venue_id=self._venue_id(),
                client_id=client_id,
                market_id=params[market_key],
                side={"bid": "buy", "ask": "sell"}.get(side, side),
                ord_type="market" if kind in ("price", "market") else kind,
                amount=None if upbit_market_buy else Decimal(params[amount_key]),
                price=None if upbit_market_buy or price == "-1" else price,
                cost=params.get(price_key) if upbit_market_buy else None,
                api=api,
                algo=algo,
                trigger_price=next((params[k] for k in trigger_keys if k in params), None),
                position_side=params.get("posSide", params.get("positionSide")),
                params={k: v for k, v in params.items() if k not in _SIGNING},
            )
            self.orders[client_id] = order
            return order

    def _listing(self, route: str, params: dict[str, str], api: str, algo: bool) -> Any:
        """The account's open orders (algo orders apart), trades or positions (of the market asked
        for, if any; Binance: of the API asked, spot, USD-M or COIN-M)."""
        if route == "positions":
            if self.exchange != "okx":
                return copy.deepcopy(self.positions)
            body = self._copy("fills")
            body["data"] = copy.deepcopy(self.positions)
            return body
        market = next((params[k] for k in ("instId", "symbol", "market") if k in params), None)
        orders = [
            o
            for o in self.orders.values()
            if (market is None or o.market_id == market) and self._same_book(o, api, algo)
        ]
        if route == "open_orders":
            kinds = params.get("ordType", "trigger").split(",")  # OKX lists one kind of algo order at a time
            listed = [
                o for o in orders if o.state == "open" and (not algo or self.exchange != "okx" or o.ord_type in kinds)
            ]
            rows = [self._order(o) for o in listed]
            rows = [row["data"][0] for row in rows] if self.exchange == "okx" else rows
        else:
            rows = [self._fill(o, f) for o in orders for f in o.fills]
        if self.exchange != "okx":
            return rows
        body = self._copy("fills")
        body["data"] = rows
        return body

    def _same_book(self, order: BookOrder, api: str, algo: bool) -> bool:
        """Whether a request to ``api`` (algo orders or not) sees ``order``."""
        return order.algo == algo and (self.exchange != "binance" or order.api == api)

    def _find(self, params: dict[str, str], api: str, algo: bool) -> BookOrder | None:
        client_keys = ("algoClOrdId", "clientAlgoId") if algo else ("clOrdId", "origClientOrderId", "identifier")
        id_keys = ("algoId",) if algo else ("ordId", "orderId", "uuid")
        for order in self.orders.values():
            if not self._same_book(order, api, algo):
                continue
            if any(params.get(k) == order.client_id for k in client_keys):
                return order
            if any(params.get(k) == order.venue_id for k in id_keys):
                return order
        return None

    def _created(self, order: BookOrder) -> Any:
        if self.exchange == "okx" and order.algo:
            body = self._copy("algo_create")
            body["data"][0].update(algoClOrdId=order.client_id, algoId=order.venue_id)
            return body
        if self.exchange == "okx":
            body = self._copy("create")
            body["data"][0].update(clOrdId=order.client_id, ordId=order.venue_id)
            return body
        if self.exchange == "binance" and order.api != "api":
            return self._order(order)  # futures answer with the order (``newOrderRespType=RESULT``)
        return self._order(order, "create")

    def _state(self, order: BookOrder) -> str:
        names = {
            "okx": {
                "open": "partially_filled" if order.fills else "live",
                "filled": "filled",
                "canceled": "canceled",
                "triggered": "effective",
            },
            "binance": {
                "open": "PARTIALLY_FILLED" if order.fills else "NEW",
                "filled": "FILLED",
                "canceled": "CANCELED",
                "triggered": "TRIGGERED",
            },
            "upbit": {"open": "wait", "filled": "done", "canceled": "cancel"},
        }
        return names[self.exchange][order.state]

    def _algo_order(self, order: BookOrder) -> Any:
        """An algo order as the venue reports it: OKX ``order-algo``, Binance ``algoOrder``."""
        triggered = self.orders[order.triggered].venue_id if order.triggered else ""
        body = self._copy("algo_order")
        take_profit = "tpTriggerPx" in order.params  # OKX: a ``conditional`` order, else a ``trigger`` one
        fields = dict(
            side=order.side,
            ordType=order.ord_type,
            state=self._state(order),
            sz=_plain(order.amount or Decimal(0)),
            **{"tpTriggerPx" if take_profit else "triggerPx": order.trigger_price},
            **{"tpOrdPx" if take_profit else "ordPx": order.price or "-1"},
            posSide=order.position_side,
            ordId=triggered,
            ordIdList=[triggered] if triggered else [],
            algoId=order.venue_id,
            algoClOrdId=order.client_id,
            instId=order.market_id,
            instType="SWAP" if order.market_id.endswith("SWAP") else "SPOT",
        )
        if self.exchange == "binance":
            fields = dict(
                side=order.side.upper(),
                algoStatus=self._state(order),
                quantity=_plain(order.amount or Decimal(0)),
                triggerPrice=order.trigger_price,
                price=order.price or "0",
                positionSide=order.position_side,
                actualOrderId=triggered,
                algoId=int(order.venue_id),
                clientAlgoId=order.client_id,
                symbol=order.market_id,
                orderType=order.ord_type.upper(),
            )
            body.update(fields)
            return body
        body["data"][0].update(fields)
        return body

    def _futures_order(self, order: BookOrder, filled: Decimal, value: Decimal) -> Any:
        """A Binance USD-M or COIN-M order (COIN-M: ``cumBase``, the base coin's worth of its contracts)."""
        body = self._copy(f"{order.api}_order")
        body.update(
            symbol=order.market_id,
            orderId=int(order.venue_id),
            clientOrderId=order.client_id,
            price=order.price or "0",
            avgPrice=_plain(value / filled) if filled else "0",
            origQty=_plain(order.amount or Decimal(0)),
            executedQty=_plain(filled),
            cumQty=_plain(filled),
            status=self._state(order),
            type=order.ord_type.upper(),
            origType=order.ord_type.upper(),
            side=order.side.upper(),
            positionSide=order.position_side or "BOTH",
            reduceOnly=order.params.get("reduceOnly") == "true",
        )
        if order.api == "dapi":
            worth = sum((f.amount * _FACE[order.market_id] / f.price for f in order.fills), Decimal(0))
            body["cumBase"] = _plain(worth)
        else:
            body["cumQuote"] = _plain(value)
        return body

    def _order(self, order: BookOrder, template: str = "order") -> Any:
        filled = order.filled
        value = sum((f.amount * f.price for f in order.fills), Decimal(0))
        if order.algo:
            return self._algo_order(order)
        if self.exchange == "binance" and order.api != "api":
            return self._futures_order(order, filled, value)
        if self.exchange == "okx":
            body = self._copy(template)
            body["data"][0].update(
                ordId=order.venue_id,
                clOrdId=order.client_id,
                instId=order.market_id,
                instType="SWAP" if order.market_id.endswith("SWAP") else "SPOT",
                side=order.side,
                ordType=order.ord_type,
                sz=_plain(order.amount or Decimal(0)),
                px=order.price or "",
                state=self._state(order),
                accFillSz=_plain(filled),
                avgPx=_plain(value / filled) if filled else "",
            )
            return body
        if self.exchange == "binance":
            body = self._copy(template)
            body.update(
                symbol=order.market_id,
                orderId=int(order.venue_id),
                clientOrderId=order.client_id,
                price=order.price or "0.00000000",
                origQty=_plain(order.amount or Decimal(0)),
                executedQty=_plain(filled),
                cummulativeQuoteQty=_plain(value),
                status=self._state(order),
                type=order.ord_type.upper(),
                side=order.side.upper(),
            )
            body.pop("fills", None)
            return body
        body = self._copy(template)
        body.update(
            uuid=order.venue_id,
            identifier=order.client_id,
            market=order.market_id,
            side="bid" if order.side == "buy" else "ask",
            ord_type="price" if order.cost is not None else order.ord_type,
            price=order.cost if order.cost is not None else order.price,
            volume=None if order.amount is None else _plain(order.amount),
            remaining_volume=None if order.amount is None else _plain(order.amount - filled),
            executed_volume=_plain(filled),
            state=self._state(order),
            trades_count=len(order.fills),
        )
        if template == "order":
            body["trades"] = [self._fill(order, f) for f in order.fills]
        return body

    def _fill(self, order: BookOrder, fill: BookFill) -> Any:
        body = self._copy("fill")
        if self.exchange == "okx":
            body.update(
                ordId=order.venue_id,
                clOrdId=order.client_id,
                instId=order.market_id,
                side=order.side,
                fillSz=_plain(fill.amount),
                fillPx=_plain(fill.price),
                tradeId=fill.trade_id,
                fee=_plain(-fill.fee),
                fillTime=str(fill.ts_ms),
                ts=str(fill.ts_ms),
                instType="SWAP" if order.market_id.endswith("SWAP") else "SPOT",
            )
        elif self.exchange == "binance" and order.api != "api":
            body = self._copy(f"{order.api}_fill")
            body.update(
                symbol=order.market_id,
                id=int(fill.trade_id),
                orderId=int(order.venue_id),
                side=order.side.upper(),
                price=_plain(fill.price),
                qty=_plain(fill.amount),
                commission=_plain(fill.fee),
                positionSide=order.position_side or "BOTH",
                buyer=order.side == "buy",
                time=fill.ts_ms,
            )
            if order.api == "dapi":
                body["baseQty"] = _plain(fill.amount * _FACE[order.market_id] / fill.price)
            else:
                body["quoteQty"] = _plain(fill.amount * fill.price)
        elif self.exchange == "binance":
            body.update(
                symbol=order.market_id,
                id=int(fill.trade_id),
                orderId=int(order.venue_id),
                price=_plain(fill.price),
                qty=_plain(fill.amount),
                quoteQty=_plain(fill.amount * fill.price),
                commission=_plain(fill.fee),
                isBuyer=order.side == "buy",
                time=fill.ts_ms,
            )
        else:
            body.update(
                market=order.market_id,
                uuid=fill.trade_id,
                price=_plain(fill.price),
                volume=_plain(fill.amount),
                funds=_plain(fill.amount * fill.price),
                side="bid" if order.side == "buy" else "ask",
            )
        return body

    def _fills(self, order: BookOrder) -> Any:
        if self.exchange == "okx":
            body = self._copy("fills")
            body["data"] = [self._fill(order, f) for f in order.fills]
            return body
        return [self._fill(order, f) for f in order.fills]

    def _cancel(self, order: BookOrder) -> web.Response:
        if self.fill_on_cancel is not None:
            amount, price, trade_id = self.fill_on_cancel
            self.fill_on_cancel = None
            order.fills.append(BookFill(trade_id, Decimal(amount), Decimal(price), Decimal(0)))
            if order.amount is not None and order.filled >= order.amount:
                order.state = "filled"
        if order.state != "open":
            body = self._copy("cancel_completed")
            if self.exchange == "okx":
                body["data"][0].update(ordId=order.venue_id, clOrdId=order.client_id)
            return web.json_response(body, status=200 if self.exchange == "okx" else 400)
        order.state = "canceled"
        if order.algo:
            body = self._copy("algo_cancel")
            if self.exchange == "okx":
                body["data"][0].update(algoId=order.venue_id, algoClOrdId=order.client_id)
            else:
                body.update(algoId=int(order.venue_id), clientAlgoId=order.client_id)
            return web.json_response(body)
        if self.exchange == "binance" and order.api != "api":
            return web.json_response(self._order(order))
        if self.exchange == "okx":
            body = self._copy("cancel")
            body["data"][0].update(ordId=order.venue_id, clOrdId=order.client_id)
            return web.json_response(body)
        return web.json_response(self._order(order, "cancel"))


# the fields a signed request carries besides the order's (Binance: in the body it signs)
_SIGNING = frozenset({"timestamp", "recvWindow", "signature"})


def listen_key(api: str) -> str:
    """The listenKey the loopback venue hands out for Binance's ``api`` user-data stream."""
    return f"{api}Lk" + hashlib.sha256(api.encode()).hexdigest()[:58]


# Binance COIN-M: the USD face value of one contract, per symbol
_FACE = {"BTCUSD_PERP": Decimal(100), "ETHUSD_PERP": Decimal(10)}

ROUTES: dict[str, dict[tuple[str, str], str]] = {
    "okx": {
        ("POST", "/api/v5/trade/order"): "create",
        ("POST", "/api/v5/trade/batch-orders"): "create",
        ("GET", "/api/v5/trade/order"): "order",
        ("GET", "/api/v5/trade/fills-history"): "fills",
        ("POST", "/api/v5/trade/cancel-order"): "cancel",
        ("GET", "/api/v5/trade/orders-pending"): "open_orders",
        ("GET", "/api/v5/account/positions"): "positions",
        ("POST", "/api/v5/trade/order-algo"): "algo_create",
        ("GET", "/api/v5/trade/order-algo"): "algo_order",
        ("POST", "/api/v5/trade/cancel-algos"): "algo_cancel",
        ("GET", "/api/v5/trade/orders-algo-pending"): "algo_open_orders",
    },
    "binance": {
        ("POST", "/api/v3/order"): "create",
        ("GET", "/api/v3/order"): "order",
        ("GET", "/api/v3/myTrades"): "fills",
        ("DELETE", "/api/v3/order"): "cancel",
        ("GET", "/api/v3/openOrders"): "open_orders",
        # USD-M futures (fapi) and COIN-M futures (dapi); their trigger orders are algo orders
        **{
            (method, f"/{api}/{path}"): route
            for api, positions, brackets in (
                ("fapi", "v3/positionRisk", "v1/leverageBracket"),
                ("dapi", "v1/positionRisk", "v2/leverageBracket"),
            )
            for method, path, route in (
                ("POST", "v1/order", "create"),
                ("GET", "v1/order", "order"),
                ("DELETE", "v1/order", "cancel"),
                ("GET", "v1/userTrades", "fills"),
                ("GET", "v1/openOrders", "open_orders"),
                ("GET", positions, "positions"),
                ("GET", brackets, "leverage_brackets"),
                ("POST", "v1/listenKey", "listen_key"),
                ("POST", "v1/algoOrder", "algo_create"),
                ("GET", "v1/algoOrder", "algo_order"),
                ("DELETE", "v1/algoOrder", "algo_cancel"),
                ("GET", "v1/openAlgoOrders", "algo_open_orders"),
            )
        },
    },
    "upbit": {
        ("POST", "/v1/orders"): "create",
        ("GET", "/v1/order"): "order",
        ("DELETE", "/v1/order"): "cancel",
        ("GET", "/v1/orders/open"): "open_orders",
    },
}


@contextmanager
def loopback_exchange(exchange: str) -> Iterator[LoopbackExchange]:
    """A stateful loopback venue of ``exchange`` on 127.0.0.1 for the duration of the block."""
    venue = LoopbackExchange(exchange)
    with _serving(venue._handle) as url:
        venue.url = url
        yield venue
