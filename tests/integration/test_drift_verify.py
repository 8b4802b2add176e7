"""``ledger verify --venue`` as a subprocess (issue 11, item 3): exit 1 with each open drift on a
line while one is open, or while the drift slots disagree with the log; exit 0 once none is."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from ledger.client.api import LedgerClient
from ledger.domain import wire
from ledger.domain.enums import Exchange, PositionSide
from ledger.domain.evolution import drift_slot
from ledger.store.eventstore import EventStore
from ledger.store.keys import ShardKeys
from projections.verify import verify, verify_venue
from tests.audit_helpers import ledger_cli
from tests.live_helpers import running_ledger, wait_for

USER = "bob"
MARKET = "BTC/USDT:USDT"


async def _verify_venue(home: Path, redis_url: str, database_url: str, *flags: str) -> tuple[int, str, str]:
    return await _cli(home, redis_url, database_url, "verify", "--venue", *flags)


async def _cli(home: Path, redis_url: str, database_url: str, *args: str) -> tuple[int, str, str]:
    run = await ledger_cli(home, *args, LEDGER_REDIS_URL=redis_url, LEDGER_DATABASE_URL=database_url)
    return run.status, run.stdout, run.stderr


async def test_verify_venue_exits_1_while_a_drift_is_open(
    redis: Any, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    async with running_ledger(redis_url, tmp_path, roles=("handler", "projection")):
        client = LedgerClient(redis, timeout=10)
        assert await _verify_venue(tmp_path, redis_url, database_url) == (0, "no drift open (0 drift events)\n", "")

        record = wire.RecordDrift(
            command_id="drift-1",
            user_id=USER,
            exchange=Exchange.BINANCE,
            symbol=MARKET,
            kind=wire.DriftKind.FEE,
            evidence={"fill_id": "7001", "venue": "0.02", "ledger": "0.01"},
        )
        reply = await client.submit(record)
        (detected,) = [s.event for s in await EventStore(redis, 0).read_range() if s.event.type == "DriftDetected"]
        assert reply["events"][0]["type"] == "DriftDetected"
        status, out, err = await _verify_venue(tmp_path, redis_url, database_url)
        assert (status, err) == (1, "")
        assert out.splitlines() == [
            f"drift {detected.stream}: user {USER}, binance {MARKET}, fee, "
            f'evidence {{"fill_id":"7001","ledger":"0.01","venue":"0.02"}}, event {detected.event_id}',
            "1 drifts unresolved, 0 slot differences: correct a position with adjust_position or close a drift "
            "with resolve_drift (`ledger submit`), then verify again",
        ]
        status, out, _err = await _verify_venue(tmp_path, redis_url, database_url, "--json")
        assert status == 1
        assert json.loads(out) == {
            "ok": False,
            "open": [
                {
                    "id": detected.stream,
                    "user_id": USER,
                    "exchange": "binance",
                    "market": MARKET,
                    "kind": "fee",
                    "evidence": {"fill_id": "7001", "venue": "0.02", "ledger": "0.01"},
                    "event_id": detected.event_id,
                }
            ],
            "differences": [],
            "drift_events": 1,
        }

        resolve = wire.ResolveDrift(
            command_id="drift-1-ok",
            user_id=USER,
            exchange=Exchange.BINANCE,
            symbol="BTC/USDT:USDT",
            kind=wire.DriftKind.FEE,
            reason="the venue's fee includes a rebate paid later",
        )
        await client.submit(resolve)
        assert await _verify_venue(tmp_path, redis_url, database_url) == (0, "no drift open (2 drift events)\n", "")

        # A slot the log does not explain (written by hand) is a difference.
        slot = drift_slot(USER, "binance", MARKET, "position_size")
        await redis.hset(ShardKeys(0).slots, slot, detected.stream)
        status, out, _err = await _verify_venue(tmp_path, redis_url, database_url, "--json")
        assert status == 1
        assert json.loads(out)["differences"] == [
            {
                "store": "redis",
                "key": "ledger:{0}:slots",
                "field": slot,
                "expected": "(absent)",
                "found": detected.stream,
            }
        ]


async def test_an_adjustment_to_zero_reaches_postgresql_once_and_verify_agrees(
    redis: Any, redis_url: str, database_url: str, pg: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    roles = ("handler", "projection", "projector")
    async with running_ledger(redis_url, tmp_path, roles=roles, database_url=database_url, execution="external"):
        client = LedgerClient(redis, timeout=10)
        opened = await client.submit(
            wire.OpenPosition(
                command_id="open-1",
                user_id=USER,
                exchange=Exchange.OKX,
                symbol="BTC-USDT-SWAP",
                side=PositionSide.LONG,
                size="0.1",
                price="45000",
            )
        )
        await client.submit(
            wire.RecordFill(
                command_id="fill-1",
                user_id=USER,
                order_id=opened["order_id"],
                fill_id="f-1",
                quantity="0.1",
                price="45000",
                fee="0.45",
            )
        )
        await client.submit(
            wire.RecordDrift(
                command_id="drift-1",
                user_id=USER,
                exchange=Exchange.OKX,
                symbol=MARKET,
                kind=wire.DriftKind.POSITION_SIZE,
                evidence={"venue": "0", "ledger": "0.1"},
            )
        )
        closed = await client.submit(
            wire.AdjustPosition(
                command_id="adjust-1",
                user_id=USER,
                exchange=Exchange.OKX,
                symbol="BTC-USDT-SWAP",
                side=PositionSide.LONG,
                size="0",
                reason="closed at the venue by hand",
            )
        )
        assert [e["type"] for e in closed["events"]] == ["PositionAdjusted", "PositionClosed", "DriftResolved"]
        position_id = closed["position_id"]

        async def archived() -> bool:
            cur = await pg.execute("SELECT count(*) FROM ledger_events WHERE type = 'DriftResolved'")
            row = await cur.fetchone()
            return row is not None and row[0] == 1

        await wait_for(archived, "the projector to archive the drift's resolution")
        cur = await pg.execute(
            "SELECT status, size, fees, realized_pnl, close_reason FROM positions WHERE id = %s", [position_id]
        )
        assert await cur.fetchall() == [("closed", Decimal("0.1"), Decimal("0.45"), Decimal("-0.45"), "adjustment")]
        cur = await pg.execute(
            "SELECT type, version FROM ledger_events WHERE aggregate_id = %s ORDER BY version", [position_id]
        )
        assert await cur.fetchall() == [("PositionOpened", 1), ("PositionAdjusted", 2), ("PositionClosed", 3)]
        assert await redis.exists(f"positions:{USER}:okx:BTC-USDT-SWAP:long") == 0

        report = await verify(redis, pg, [0], 1)
        assert report.differences == []
        venue = await verify_venue(redis, pg, [0])
        assert (venue.ok, venue.events) == (True, 2)

        # `ledger history <drift id>` explains the drift, from the archive.
        (drift_id,) = [
            s.event.stream for s in await EventStore(redis, 0).read_range() if s.event.type == "DriftDetected"
        ]
        status, out, err = await _cli(tmp_path, redis_url, database_url, "history", drift_id, "--json")
        assert (status, err) == (0, "")
        trail = json.loads(out)
        assert (trail["kind"], trail["archive"]) == ("drift", "read")
        assert [(e["type"], e["state"]["status"], e["state"]["resolution"]) for e in trail["events"]] == [
            ("DriftDetected", "open", None),
            ("DriftResolved", "resolved", "adjusted"),
        ]
