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
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
    loop = asyncio.new_event_loop()
    started = threading.Event()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", venue._handle)
    runner = web.AppRunner(app)

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        venue.url = f"http://127.0.0.1:{port}"

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="recorded-venue", daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield venue
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
