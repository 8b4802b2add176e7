"""Issue 11, faults: the live venue killed with SIGKILL between sending an order and hearing back.

``ledger serve --role handler --role venue`` runs as a real process with OKX configured ``live``
against a loopback OKX (tests/venue_server.py) that books the order and then holds its answer.
The process is killed while the request is in flight; a second process takes over the lease,
looks the order up by its client order id and finds it: no second order at the venue, no order
lost in the ledger. The processes' logs never contain the account's secret or passphrase.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

from ledger.domain.enums import OrderStatus
from ledger.store.eventstore import EventStore
from tests.pipeline_helpers import (
    LEDGER_BIN,
    ServeProcess,
    commands_key,
    events_key,
    ledger_env,
    peek_reply,
    reply_key,
    serve_processes_fixture,  # noqa: F401  (the fixture)
    wait_until,
)
from tests.venue_server import LoopbackExchange

SECRET = "kill9-secret-never-logged"
PASSWORD = "kill9-passphrase-never-logged"


def _serve(redis_url: str, workdir: Path, name: str, credentials: Path, **env: str) -> ServeProcess:
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(LEDGER_BIN), "serve", "--role", "handler", "--role", "venue"],
            cwd=workdir,
            env=ledger_env(redis_url, LEDGER_EXECUTION="okx=live", LEDGER_CREDENTIALS=str(credentials), **env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return ServeProcess(process, log)


async def test_kill_9_between_send_and_acknowledgement_neither_doubles_nor_loses_the_order(
    redis: Any, redis_url: str, tmp_path: Path, serve_processes: list[ServeProcess], okx: LoopbackExchange
) -> None:
    credentials = tmp_path / "credentials.json"
    account = {"apiKey": "k9", "secret": SECRET, "password": PASSWORD, "users": ["k9-user"]}
    credentials.write_text(json.dumps({"okx": {"base_url": okx.url, "accounts": {"main": account}}}))
    okx.create_delay_s = 120  # booked, then no answer: the process dies waiting
    first = _serve(redis_url, tmp_path, "first", credentials, LEDGER_CLAIM_IDLE_MS="1000")
    serve_processes.append(first)

    async def venue_group() -> bool:
        if not await redis.exists(events_key(0)):
            return False
        return any(g["name"] == "ledger-venue" for g in await redis.xinfo_groups(events_key(0)))

    await wait_until(venue_group, timeout=30, what="the venue's consumer group")
    order = {
        "command_id": "k9-1",
        "user_id": "k9-user",
        "exchange": "okx",
        "symbol": "BTC-USDT-SWAP",
        "side": "buy",
        "order_type": "limit",
        "quantity": "0.05",
        "price": "45000",
    }
    await redis.xadd(commands_key(0), {"type": "place_order", "data": json.dumps(order)})
    order_id = (await peek_reply(redis, reply_key(0, "k9-user", "k9-1"), timeout=30))["order_id"]
    client_id = order_id.replace("-", "")
    assert await _wait_thread_event(okx.created, 30), first.output()[-2000:]
    first.process.send_signal(signal.SIGKILL)
    assert first.process.wait(timeout=10) == -signal.SIGKILL
    store = EventStore(redis, 0)
    assert (await store.order(order_id)).status is OrderStatus.PENDING  # type: ignore[union-attr]

    okx.create_delay_s = 0
    second = _serve(redis_url, tmp_path, "second", credentials, LEDGER_CLAIM_IDLE_MS="1000")
    serve_processes.append(second)

    async def accepted() -> bool:
        state = await store.order(order_id)
        return state is not None and state.status is OrderStatus.OPEN

    await wait_until(accepted, timeout=30, interval=0.1, what="the second venue to find the order")
    okx.fill(client_id, "5", "45000", "k9-trade-1", fee="0.01125")

    async def filled() -> bool:
        state = await store.order(order_id)
        return state is not None and state.status is OrderStatus.FILLED

    await wait_until(filled, timeout=30, interval=0.1, what="the fill")
    assert second.stop() == 0, second.output()[-2000:]
    state = await store.order(order_id)
    assert state is not None
    assert (state.exchange_order_id, state.filled_qty, state.fill_ids) == (
        okx.order(client_id).venue_id,
        Decimal("0.05"),
        ["k9-trade-1"],
    )
    assert okx.creates == {client_id: 1}
    assert len(okx.orders) == 1
    logs = first.output() + second.output()
    assert "found at the venue by its client id" in logs
    assert SECRET not in logs and PASSWORD not in logs


async def _wait_thread_event(event: threading.Event, timeout: float) -> bool:
    return await asyncio.to_thread(event.wait, timeout)
