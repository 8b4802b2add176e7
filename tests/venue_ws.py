"""The WebSocket side of the stateful loopback venue (tests/venue_server.py): OKX's private
``orders`` channel, Binance's spot user data stream and Upbit's private ``myOrder`` as ccxt's
``ccxt.pro`` classes speak them, so ccxt's own signing, subscription and push parsing run against it.

Shapes (https://www.okx.com/docs-v5/en/#overview-websocket-login,
https://www.okx.com/docs-v5/en/#order-book-trading-trade-ws-order-channel, and the examples in
ccxt/pro/okx.py): ``{"op": "login", "args": [{apiKey, passphrase, timestamp, sign}]}`` answered
``{"event": "login", "code": "0", ...}`` once the signature (base64 HMAC-SHA256 of
``timestamp + "GET/users/self/verify"`` with the secret) checks; ``{"op": "subscribe", "args":
[{"channel": "orders", "instType": "ANY"}]}`` answered ``{"event": "subscribe", ...}``; the text
``ping`` answered ``pong``. A push is ``{"arg": {"channel": "orders", "instType": "ANY", "uid"},
"data": [order]}``: the order as the REST answer gives it (the book's fields written in) plus the
fields of its last trade (``tradeId``, ``fillSz``, ``fillPx``, ``fillTime``, ``fillFee`` negative
when charged, ``fillFeeCcy``, ``execType``); one push per trade, and one per change of state
without a trade (accepted ``live``, ``canceled``), as OKX sends them.

Binance spot (https://developers.binance.com/docs/binance-spot-api-docs/user-data-stream,
https://developers.binance.com/docs/binance-spot-api-docs/websocket-api/user-data-stream-requests):
on ``/ws-api/v3``, ``{"id", "method": "userDataStream.subscribe.signature", "params": {apiKey,
timestamp, signature}}`` (the HMAC-SHA256 hex of the sorted, URL-encoded params) answered
``{"id", "status": 200, "result": {"subscriptionId": 0}}``; then ``{"subscriptionId": 0, "event":
executionReport}`` per trade (``x`` TRADE, ``t``, ``l``, ``L``, ``n``, ``N``) and per change of
state (``x`` NEW, CANCELED).

Binance USDⓈ-M and COIN-M futures (https://developers.binance.com/docs/derivatives/usds-margined-futures/
user-data-streams, .../coin-margined-futures/user-data-streams, and ccxt/pro/binance.py
``handle_order_update``): a listenKey from ``POST /fapi/v1/listenKey`` / ``/dapi/v1/listenKey``
(tests/venue_server.py; refused with -2015 for an account without futures permission,
``refuse_streams``), then a socket on ``/private/ws?listenKey=<key>`` (USDⓈ-M, ccxt's private
route) or ``/ws/<key>`` (COIN-M) with no subscription message; ``{"e": "ORDER_TRADE_UPDATE", "E",
"T", "o": order}`` per trade (``x`` TRADE, ``t``, ``l``, ``L``, ``n``, ``N``) and per change of
state, quantities in the market's units (COIN-M: contracts), only to the socket of the order's API.

Upbit (https://global-docs.upbit.com/reference/websocket-myorder): ``/websocket/v1/private`` with
``Authorization: Bearer <JWT>`` (HS256 with the secret; refused with 401 otherwise), then
``[{"ticket"}, {"type": "myOrder"}]`` (no answer); binary frames of ``myOrder`` per trade (``state``
trade, ``trade_uuid``, the trade's ``price`` and ``volume``, ``trade_fee``) and per change of state
(``wait``, ``done`` after the last trade, ``cancel``), numbers as JSON numbers.

Test controls besides the REST side's: ``drop(then=...)`` closes every socket and runs ``then``
(e.g. a fill) before any new connection is served, so what ``then`` does is pushed to nobody;
``push_again()`` sends the last push once more (a venue repeating itself); ``ws_secret`` (the
secret the signatures are checked with), ``connections`` (how many sockets were opened),
``pushes`` (every push sent, in order) and ``pushed_apis`` (the sockets each went to: ``spot``, or
Binance's ``fapi`` / ``dapi``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any, NamedTuple
from urllib.parse import urlencode

from aiohttp import WSMsgType, web

from tests.venue_server import BookFill, BookOrder, LoopbackExchange, _plain, _serving, listen_key

UID = "44705892343619584"
CONN_ID = "a4d3ae55"
PATHS = {"okx": "/ws/v5/private", "binance": "/ws-api/v3", "upbit": "/websocket/v1/private"}
SPOT = "spot"  # the sockets of every order but Binance's futures
# Binance's futures user-data sockets, per API: (path, listenKey in the query) as ccxt opens them
FUTURES_PATHS = {"fapi": ("/private/ws", True), "dapi": (f"/ws/{listen_key('dapi')}", False)}


class _Progress(NamedTuple):
    """A Binance order as one of its pushes shows it (``LoopbackWsExchange._binance_progress``)."""

    filled: Decimal
    value: Decimal
    status: str
    execution: str  # the push's ``x``
    fill: BookFill | None  # the trade pushed, if any
    head: dict[str, Any]  # symbol, client id, side, type, time in force, quantity


class LoopbackWsExchange(LoopbackExchange):
    """``LoopbackExchange`` with the venue's private WebSocket (module doc)."""

    def __init__(self, exchange: str) -> None:
        if exchange not in PATHS:
            raise ValueError(f"the loopback WebSocket speaks {', '.join(PATHS)} (got {exchange})")
        super().__init__(exchange)
        self.ws_secret: str | None = None
        self.connections = 0
        self.pushes: list[dict[str, Any]] = []
        self._sockets: set[web.WebSocketResponse] = set()
        self._subscribers: dict[web.WebSocketResponse, str] = {}  # socket -> whose pushes (``_socket_of``)
        self.pushed_apis: list[str] = []  # the sockets of each push (``pushes``)
        self._seen: dict[str, tuple[str, int]] = {}  # client id -> (state, trades) last pushed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gate = asyncio.Lock()  # held while ``drop`` runs: no new socket is served meanwhile

    # ------------------------------------------------------------- test controls

    def fill(self, client_id: str, amount: str, price: str, trade_id: str, fee: str = "0") -> None:
        super().fill(client_id, amount, price, trade_id, fee)
        self._on_loop(self._push_changes())

    def finish(self, client_id: str, state: str) -> None:
        super().finish(client_id, state)
        self._on_loop(self._push_changes())

    def drop(self, then: Callable[[], None] | None = None) -> None:
        """Close every socket (code 1006 at the client: the venue went away); ``then`` runs
        before a new socket is served."""

        async def dropping() -> None:
            async with self._gate:
                sockets, self._sockets, self._subscribers = set(self._sockets), set(), {}
                for ws in sockets:
                    await ws.close()
                if then is not None:
                    await asyncio.get_running_loop().run_in_executor(None, then)

        self._on_loop(dropping())

    def push_again(self) -> None:
        async def again() -> None:
            self.pushes.append(self.pushes[-1])
            self.pushed_apis.append(self.pushed_apis[-1])
            await self._send_push(self.pushes[-1], self.pushed_apis[-1])

        self._on_loop(again())

    def _on_loop(self, work: Any) -> None:
        """Run ``work`` on the server's loop (from the test's thread, or ``then`` of ``drop``)."""
        if self._loop is None:  # no request ever came: no order to push about
            work.close()
            return
        asyncio.run_coroutine_threadsafe(work, self._loop).result(10)

    # ------------------------------------------------------------- serving

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self._loop = asyncio.get_running_loop()
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._socket(request)
        response = await super()._handle(request)
        await self._push_changes()  # an order created or cancelled
        return response

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        futures = self._futures_api(request)
        if futures is None and request.path != PATHS[self.exchange]:
            self.unanswered.append(f"WS {request.path}")
            return web.json_response({"error": "not recorded"}, status=404)
        if self.exchange == "upbit" and not self._upbit_token_checks(request.headers.get("Authorization", "")):
            error = {"name": "invalid_query_payload", "message": "JWT verification failed"}
            return web.json_response({"error": error}, status=401)
        async with self._gate:
            ws = web.WebSocketResponse(autoping=True)
            await ws.prepare(request)
            self._sockets.add(ws)
            self.connections += 1
            if futures is not None:  # the listenKey is the subscription
                self._subscribers[ws] = futures
        logged_in = False
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                break
            if message.data == "ping":
                await ws.send_str("pong")
                continue
            request_body = json.loads(message.data)
            if self.exchange == "binance":
                await self._binance_request(ws, request_body)
                continue
            if self.exchange == "upbit":
                self._upbit_request(ws, request_body)
                continue
            op, args = request_body.get("op"), request_body.get("args") or [{}]
            if op == "login":
                logged_in = self._login_checks(args[0])
                answer = (
                    {"event": "login", "code": "0", "msg": "", "connId": CONN_ID}
                    if logged_in
                    else {"event": "error", "code": "60009", "msg": "Login failed.", "connId": CONN_ID}
                )
                await ws.send_json(answer)
            elif op == "subscribe" and not logged_in:
                await ws.send_json({"event": "error", "code": "60011", "msg": "Please log in", "connId": CONN_ID})
            elif op == "subscribe" and args[0].get("channel") == "orders":
                await ws.send_json({"event": "subscribe", "arg": args[0], "connId": CONN_ID})
                self._subscribers[ws] = SPOT
            else:
                self.unanswered.append(f"WS {message.data}")
        self._sockets.discard(ws)
        self._subscribers.pop(ws, None)
        return ws

    def _futures_api(self, request: web.Request) -> str | None:
        """The API (``fapi``, ``dapi``) of a Binance futures user-data socket with its listenKey."""
        for api, (path, in_query) in FUTURES_PATHS.items():
            key_checks = not in_query or request.query.get("listenKey") == listen_key(api)
            if self.exchange == "binance" and request.path == path and key_checks:
                return api
        return None

    async def _binance_request(self, ws: web.WebSocketResponse, request: dict[str, Any]) -> None:
        params = dict(request.get("params") or {})
        signature = str(params.pop("signature", ""))
        query = urlencode(sorted(params.items()))
        expected = hmac.new((self.ws_secret or "").encode(), query.encode(), hashlib.sha256).hexdigest()
        if request.get("method") != "userDataStream.subscribe.signature":
            self.unanswered.append(f"WS {request}")
        elif self.ws_secret is not None and not hmac.compare_digest(expected, signature):
            error = {"code": -1022, "msg": "Signature for this request is not valid."}
            await ws.send_json({"id": request.get("id"), "status": 400, "error": error})
        else:
            await ws.send_json({"id": request.get("id"), "status": 200, "result": {"subscriptionId": 0}})
            self._subscribers[ws] = SPOT

    def _upbit_token_checks(self, authorization: str) -> bool:
        """Upbit's ``Authorization: Bearer <JWT>`` (HS256 with the secret, ``access_key`` and ``nonce``)."""
        token = authorization.removeprefix("Bearer ")
        parts = token.split(".")
        if len(parts) != 3:
            return False
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        if self.ws_secret is None:
            return bool(payload.get("access_key"))
        digest = hmac.new(self.ws_secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        return hmac.compare_digest(base64.urlsafe_b64encode(digest).decode().rstrip("="), parts[2])

    def _upbit_request(self, ws: web.WebSocketResponse, request: list[dict[str, Any]]) -> None:
        """``[{"ticket"}, {"type": "myOrder"}, ...]``: no answer (Upbit acknowledges nothing)."""
        if any(part.get("type") == "myOrder" for part in request):
            self._subscribers[ws] = SPOT
        else:
            self.unanswered.append(f"WS {request}")

    def _login_checks(self, login: dict[str, Any]) -> bool:
        if self.ws_secret is None:
            return bool(login.get("apiKey"))
        digest = hmac.new(
            self.ws_secret.encode(), f"{login.get('timestamp')}GET/users/self/verify".encode(), hashlib.sha256
        ).digest()
        return hmac.compare_digest(base64.b64encode(digest).decode(), str(login.get("sign")))

    async def _push_changes(self) -> None:
        """Push what changed on the book since the last push: each new trade, then a change of
        state without one. Pushed whether or not a socket listens (a push nobody got is lost)."""
        with self.lock:
            pushes = []
            for order in self.orders.values():
                if order.algo:
                    continue
                state, trades = self._seen.get(order.client_id, ("", 0))
                for index in range(trades, len(order.fills)):
                    pushes.append((_socket_of(order), self._push(order, index)))
                settled = len(order.fills) == trades or self.exchange == "upbit"  # Upbit: ``done`` after ``trade``
                if settled and order.state != state:
                    pushes.append((_socket_of(order), self._push(order, None)))
                self._seen[order.client_id] = (order.state, len(order.fills))
        for api, push in pushes:
            self.pushes.append(push)
            self.pushed_apis.append(api)
            await self._send_push(push, api)

    async def _send_push(self, push: dict[str, Any], api: str) -> None:
        for ws in [ws for ws, subscribed in self._subscribers.items() if subscribed == api]:
            if not ws.closed and self.exchange == "upbit":  # Upbit's frames are binary
                await ws.send_bytes(json.dumps(push).encode())
            elif not ws.closed:
                await ws.send_json(push)

    def _push(self, order: BookOrder, trade: int | None) -> dict[str, Any]:
        """The push of ``order`` as it was right after its trade number ``trade`` (None: as it is)."""
        if self.exchange == "binance" and _socket_of(order) != SPOT:
            return self._order_trade_update(order, trade)
        if self.exchange == "binance":
            return {"subscriptionId": 0, "event": self._execution_report(order, trade)}
        if self.exchange == "upbit":
            return self._my_order(order, trade)
        data = self._order(order)["data"][0]
        fill_template = self._copy("fill")
        data.update(
            code="0",
            msg="",
            amendResult="",
            reqId="",
            execType="",
            tradeId="",
            fillSz="0",
            fillPx="",
            fillTime="",
            fillFee="0",
            fillFeeCcy="",
            fillNotionalUsd="",
            notionalUsd="",
        )
        if trade is not None:
            fills = order.fills[: trade + 1]
            fill = fills[-1]
            filled = sum((f.amount for f in fills), Decimal(0))
            value = sum((f.amount * f.price for f in fills), Decimal(0))
            last = trade == len(order.fills) - 1
            data.update(
                state=self._state(order) if last else "partially_filled",
                accFillSz=_plain(filled),
                avgPx=_plain(value / filled),
                tradeId=fill.trade_id,
                fillSz=_plain(fill.amount),
                fillPx=_plain(fill.price),
                fillTime=fill_template["fillTime"],
                fillFee=_plain(-fill.fee),
                fillFeeCcy=fill_template["feeCcy"],
                execType=fill_template["execType"],
            )
        return {"arg": {"channel": "orders", "instType": "ANY", "uid": UID}, "data": [data]}

    def _binance_progress(self, order: BookOrder, trade: int | None) -> _Progress:
        """A Binance order right after its trade number ``trade`` (None: as it is), and the fields
        every Binance order push starts with."""
        fills = order.fills if trade is None else order.fills[: trade + 1]
        filled = sum((f.amount for f in fills), Decimal(0))
        value = sum((f.amount * f.price for f in fills), Decimal(0))
        status = self._state(order)
        if trade is not None and trade < len(order.fills) - 1:
            status = "PARTIALLY_FILLED"
        fill = order.fills[trade] if trade is not None else None
        head = {
            "s": order.market_id,
            "c": order.client_id,
            "S": order.side.upper(),
            "o": order.ord_type.upper(),
            "f": "GTC",
            "q": _plain(order.amount or Decimal(0)),
        }
        execution = "TRADE" if fill is not None else {"NEW": "NEW", "CANCELED": "CANCELED"}.get(status, status)
        return _Progress(filled, value, status, execution, fill, head)

    def _execution_report(self, order: BookOrder, trade: int | None) -> dict[str, Any]:
        """Binance's ``executionReport`` of a spot order (module doc)."""
        fill_template = self._copy("fill")
        filled, value, status, execution, fill, head = self._binance_progress(order, trade)
        time = fill_template["time"]
        return {
            "e": "executionReport",
            "E": time,
            **head,
            "p": order.price or "0.00000000",
            "P": "0.00000000",
            "F": "0.00000000",
            "g": -1,
            "C": "",
            "x": execution,
            "X": status,
            "r": "NONE",
            "i": int(order.venue_id),
            "l": _plain(fill.amount) if fill else "0.00000000",
            "z": _plain(filled),
            "L": _plain(fill.price) if fill else "0.00000000",
            "n": _plain(fill.fee) if fill else "0",
            "N": fill_template["commissionAsset"] if fill else None,
            "T": time,
            "t": int(fill.trade_id) if fill else -1,
            "v": 3,
            "I": 8641984,
            "w": status in ("NEW", "PARTIALLY_FILLED"),
            "m": fill_template["isMaker"],
            "M": False,
            "O": time,
            "Z": _plain(value),
            "Y": _plain(fill.amount * fill.price) if fill else "0.00000000",
            "Q": "0.00000000",
            "W": time,
            "V": "NONE",
        }

    def _order_trade_update(self, order: BookOrder, trade: int | None) -> dict[str, Any]:
        """Binance's ``ORDER_TRADE_UPDATE`` of a USDⓈ-M or COIN-M order (module doc): quantities in
        the market's units, the fee in the margin asset (COIN-M: the base coin)."""
        filled, value, status, execution, fill, head = self._binance_progress(order, trade)
        time = self._copy("fill")["time"]
        margin = order.market_id.removesuffix("USD_PERP") if order.api == "dapi" else "USDT"
        data = {
            **head,
            "p": order.price or "0",
            "ap": _plain(value / filled) if filled else "0",
            "sp": "0",
            "x": execution,
            "X": status,
            "i": int(order.venue_id),
            "l": _plain(fill.amount) if fill else "0",
            "z": _plain(filled),
            "L": _plain(fill.price) if fill else "0",
            "N": margin,
            "n": _plain(fill.fee) if fill else "0",
            "T": time,
            "t": int(fill.trade_id) if fill else 0,
            "b": "0",
            "a": "0",
            "m": False,
            "R": order.params.get("reduceOnly") == "true",
            "wt": "CONTRACT_PRICE",
            "ot": order.ord_type.upper(),
            "ps": order.position_side or "BOTH",
            "cp": False,
            "rp": "0",
            "pP": False,
            "si": 0,
            "ss": 0,
            "V": "EXPIRE_TAKER",
            "pm": "NONE",
            "gtd": 0,
        }
        if order.api == "dapi":
            data["ma"] = margin
        return {"e": "ORDER_TRADE_UPDATE", "E": time, "T": time, "o": data}

    def _my_order(self, order: BookOrder, trade: int | None) -> dict[str, Any]:
        """Upbit's ``myOrder`` of an order (module doc): a trade (``state`` trade, its price and
        volume) or the order as it is; numbers as JSON numbers, as Upbit sends them."""
        fills = order.fills if trade is None else order.fills[: trade + 1]
        filled = sum((f.amount for f in fills), Decimal(0))
        funds = sum((f.amount * f.price for f in fills), Decimal(0))
        fill = order.fills[trade] if trade is not None else None
        price = fill.price if fill else Decimal(order.cost if order.cost is not None else order.price or 0)
        volume = fill.amount if fill else order.amount
        time = 1712000000000
        return {
            "type": "myOrder",
            "code": order.market_id,
            "uuid": order.venue_id,
            "ask_bid": "BID" if order.side == "buy" else "ASK",
            "order_type": "price" if order.cost is not None else order.ord_type,
            "state": "trade" if fill else self._state(order),
            "trade_uuid": fill.trade_id if fill else None,
            "price": float(price),
            "avg_price": float(funds / filled) if filled else 0,
            "volume": None if volume is None else float(volume),
            "remaining_volume": None if order.amount is None else float(order.amount - filled),
            "executed_volume": float(filled),
            "trades_count": len(fills),
            "reserved_fee": 0,
            "remaining_fee": 0,
            "paid_fee": float(sum((f.fee for f in fills), Decimal(0))),
            "locked": 0,
            "executed_funds": float(funds),
            "trade_fee": float(fill.fee) if fill else None,
            "is_maker": True,
            "identifier": order.client_id,
            "time_in_force": None,
            "trade_timestamp": time if fill else None,
            "order_timestamp": time,
            "timestamp": time,
            "stream_type": "REALTIME",
        }


def _socket_of(order: BookOrder) -> str:
    """Which sockets get the pushes of ``order``: its futures API's (``FUTURES_PATHS``), or ``SPOT``."""
    return order.api if order.api in FUTURES_PATHS else SPOT


@contextmanager
def loopback_ws_exchange(exchange: str) -> Iterator[LoopbackWsExchange]:
    """A stateful loopback venue with its WebSocket on 127.0.0.1 for the duration of the block;
    ``url`` is its REST base URL, ``ws_url`` its WebSocket one."""
    venue = LoopbackWsExchange(exchange)
    with _serving(venue._handle) as url:
        venue.url = url
        yield venue


def ws_url(venue: LoopbackExchange) -> str:
    return "ws" + venue.url.removeprefix("http")
