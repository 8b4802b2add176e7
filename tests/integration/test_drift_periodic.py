"""Periodic reconciliation in ``serve`` (role ``reconcile``, ``LEDGER_RECONCILE_S``): every round
reconciles each user of the live accounts; a failing round is logged with its ids and the next
one runs. Against the loopback OKX (tests/venue_server.py) and a real Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import structlog

from consumers.reconciling import PeriodicReconciliation, reconcile_role
from ledger.config import ConfigError, Settings, parse_execution
from ledger.domain.enums import Exchange
from ledger.store.keys import ShardKeys
from ledger.store.redis_conn import text
from ledger.venues.accounts import CredentialsError, load_credentials
from ledger.venues.live import VenueClients
from tests.drift_helpers import SLOT, USER, credentials_file, okx_position, placed_order
from tests.live_helpers import running_ledger, wait_for
from tests.venue_server import LoopbackExchange, loopback_exchange


def test_the_role_runs_nothing_when_off() -> None:
    off = Settings(execution=parse_execution("okx=live"))  # no credentials needed: nothing runs
    assert off.reconcile_s == 0
    assert asyncio.run(reconcile_role(None, off)) == []


async def test_serve_reconciles_every_round(redis: Any, redis_url: str, tmp_path: Path, okx: LoopbackExchange) -> None:
    credentials = credentials_file(tmp_path, okx)
    async with running_ledger(
        redis_url,
        tmp_path,
        roles=("handler", "projection", "reconcile"),
        execution="okx=live",
        credentials=credentials,
        reconcile_s=1,
    ):
        _order_id, client_id = await placed_order(redis, okx)
        okx.fill(client_id, "4", "45000", "t-1", fee="0.009")
        okx.positions = [okx_position("5")]

        async def drift() -> str | None:
            return text(await redis.hget(ShardKeys(0).slots, SLOT))

        drift_id = await wait_for(drift, "a round to record the drift")
        okx.positions = [okx_position("4")]  # the venue agrees again: a later round resolves it

        async def resolved() -> bool:
            return await drift() is None

        await wait_for(resolved, "a round to resolve the drift")
        resolved = [s for s in await redis.xrange(ShardKeys(0).events) if drift_id in text(s[1]["data"])]
        assert [text(fields["type"]) for _id, fields in resolved] == ["DriftDetected", "DriftResolved"]


async def test_a_failing_reconciliation_is_logged_and_tried_again(redis: Any, redis_url: str, tmp_path: Path) -> None:
    with loopback_exchange("okx") as okx:
        credentials = credentials_file(tmp_path, okx)
        config = load_credentials(credentials)[Exchange.OKX]
    # The venue is gone: the user's order cannot be looked up.
    async with running_ledger(redis_url, tmp_path, roles=("handler", "projection")):
        await placed_order(redis, None)
        periodic = PeriodicReconciliation(redis, {Exchange.OKX: config}, 1)
        clients = VenueClients({Exchange.OKX: config.options})
        try:
            with structlog.testing.capture_logs() as logs:
                assert await periodic.round(clients) == 1
                assert await periodic.round(clients) == 1  # the next round tries again
        finally:
            await clients.close()
    failures = [entry for entry in logs if entry["log_level"] == "error"]
    assert [
        (e["event"], e["user_id"], e["exchange"], e["account"], e["round"], bool(e["error"])) for e in failures
    ] == [
        ("periodic reconciliation failed: tried again next round", USER, "okx", "main", 0, True),
        ("periodic reconciliation failed: tried again next round", USER, "okx", "main", 1, True),
    ]


def test_the_interval_setting() -> None:
    assert Settings.from_env({"LEDGER_RECONCILE_S": "300"}).reconcile_s == 300
    assert Settings.from_env({"LEDGER_RECONCILE_S": "0"}).reconcile_s == 0
    for bad in ("-1", "86401", "5m"):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({"LEDGER_RECONCILE_S": bad})
        assert str(caught.value) == (
            f"LEDGER_RECONCILE_S / --reconcile-s: must be whole seconds from 0 (off) to 86400 (got {bad!r})"
        )
    with pytest.raises(CredentialsError) as refused:  # on, with a live exchange and no accounts: serve refuses
        asyncio.run(reconcile_role(None, Settings(execution=parse_execution("okx=live"), reconcile_s=5)))
    assert str(refused.value).startswith("LEDGER_EXECUTION has okx=live but LEDGER_CREDENTIALS is not set")
