"""Drifts through reconciliation (issue 11, item 3), on a plain Redis and on a Redis Cluster: the
ledger in-process (handler and live projection), the real ccxt OKX class talking HTTP to the
loopback venue (tests/venue_server.py) whose position differs from the ledger's.

A difference becomes ``DriftDetected`` once (a second reconciliation records nothing), an explicit
``adjust_position`` corrects the position and resolves the drift, a venue that agrees again
resolves an open drift as ``agreed``, and the trail of the drift and of the position explain each
change."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog

from ledger import PositionManager
from ledger.app.audit_trail import trail
from ledger.client.api import LedgerClient
from ledger.client.reconcile import Finding, Reconciliation
from ledger.config import Settings
from ledger.domain import wire
from ledger.domain.enums import Exchange, PositionSide
from ledger.domain.evolution import drift_slot
from ledger.store.eventstore import EventStore, StoredEvent
from ledger.store.keys import ShardKeys
from ledger.store.redis_conn import text
from ledger.venues import commands
from ledger.venues.accounts import load_credentials
from projections.trim import trim_shard
from projections.verify import verify_venue
from tests.drift_helpers import MARKET, SLOT, USER, credentials_file, okx_position, placed_order
from tests.live_helpers import quiesce, running_ledger
from tests.venue_server import LoopbackExchange


@pytest.fixture(params=["plain", "cluster"])
def servers(request: pytest.FixtureRequest) -> tuple[Any, str]:
    """(client, URL) of a plain Redis or of a Redis Cluster."""
    if request.param == "plain":
        return request.getfixturevalue("redis"), request.getfixturevalue("redis_url")
    return request.getfixturevalue("redis_cluster"), request.getfixturevalue("redis_cluster_url")


class Desk:
    """The ledger running in-process against one loopback OKX, and what an operator uses."""

    def __init__(self, redis: Any, venue: LoopbackExchange, credentials: Path) -> None:
        self.redis = redis
        self.venue = venue
        self.config = load_credentials(credentials)[Exchange.OKX]
        self.client = LedgerClient(redis, timeout=10)
        self.positions = PositionManager(redis, timeout=10)
        self.store = EventStore(redis, 0)

    async def reconcile(self) -> Reconciliation:
        return await self.positions.sync_positions_from_exchange(USER, "okx", venue=self.config)

    async def events(self, stream: str) -> list[StoredEvent]:
        return [s for s in await self.store.read_range() if s.event.stream == stream]

    async def open_drift(self) -> str | None:
        return text(await self.redis.hget(ShardKeys(0).slots, SLOT))


@pytest.fixture
async def desk(servers: tuple[Any, str], tmp_path: Path, okx: LoopbackExchange) -> AsyncIterator[Desk]:
    redis, url = servers
    credentials = credentials_file(tmp_path, okx)
    async with running_ledger(
        url, tmp_path, roles=("handler", "projection"), execution="okx=live", credentials=credentials
    ):
        yield Desk(redis, okx, credentials)


async def test_a_drift_is_recorded_once_corrected_explicitly_and_resolved_when_the_venue_agrees(
    desk: Desk, okx: LoopbackExchange
) -> None:
    _order_id, client_id = await placed_order(desk.redis, okx)
    okx.fill(client_id, "4", "45000", "t-1", fee="0.009")
    okx.positions = [okx_position("5")]  # 0.05 BTC at the venue, 0.04 in the ledger

    first = await desk.reconcile()
    (position,) = await desk.positions.get_positions(USER, "okx")
    drift_id = await desk.open_drift()
    assert drift_id is not None
    evidence = {
        "venue": "0.05",
        "ledger": "0.04",
        "difference": "0.01",
        "positions": [{"position_id": position.id, "symbol": "BTC-USDT-SWAP", "side": "long", "size": "0.04"}],
    }
    assert first.findings == [Finding("position_mismatch", MARKET, MARKET, evidence)]
    drift_command = commands.drift_command_id(Exchange.OKX, MARKET, "position_size", f"0.05|{position.id}:0.04:1")
    assert first.recorded[-1] == {"command_id": drift_command, "type": "record_drift", "drift_id": drift_id}
    (detected,) = await desk.events(drift_id)
    assert isinstance(detected.event, wire.DriftDetected)
    assert (detected.event.version, detected.event.market, detected.event.kind, detected.event.evidence) == (
        1,
        MARKET,
        "position_size",
        evidence,
    )

    report = await verify_venue(desk.redis, None, [0])
    assert ([d.id for d in report.open], report.differences) == ([drift_id], [])

    # The same difference seen again: still reported, nothing recorded twice.
    log_length = await desk.redis.xlen(ShardKeys(0).events)
    second = await desk.reconcile()
    assert (second.recorded, second.findings) == ([], first.findings)
    assert await desk.redis.xlen(ShardKeys(0).events) == log_length
    assert await desk.open_drift() == drift_id

    # The operator corrects the position: 0.05 BTC, the fee the venue also charged (0.001 USDT).
    adjust = wire.AdjustPosition(
        command_id="ops-adjust-1",
        user_id=USER,
        exchange=Exchange.OKX,
        symbol="BTC-USDT-SWAP",
        side=PositionSide.LONG,
        size="0.05",
        reason="venue holds 5 contracts",
        fee_adjustment="0.001",
    )
    reply = await desk.client.submit(adjust)
    assert [e["type"] for e in reply["events"]] == ["PositionAdjusted", "DriftResolved"]
    (adjusted,) = await desk.positions.get_positions(USER, "okx")
    assert (adjusted.id, adjusted.size, adjusted.entry_price) == (position.id, Decimal("0.05"), Decimal("45000"))
    assert (adjusted.fees, adjusted.realized_pnl) == (Decimal("0.010"), Decimal("-0.010"))
    assert await desk.open_drift() is None
    _detected, resolved = await desk.events(drift_id)
    assert isinstance(resolved.event, wire.DriftResolved)
    (adjustment,) = [s for s in await desk.events(position.id) if s.event.type == "PositionAdjusted"]
    assert (resolved.event.version, resolved.event.resolution, resolved.event.adjustment_event_id) == (
        2,
        "adjusted",
        adjustment.event.event_id,
    )
    third = await desk.reconcile()
    assert (third.recorded, third.findings) == ([], [])

    # The venue moves away and back: a new drift, then resolved as agreed.
    okx.positions = [okx_position("6")]
    fourth = await desk.reconcile()
    moved = await desk.open_drift()
    assert moved is not None and moved != drift_id
    assert [r["type"] for r in fourth.recorded] == ["record_drift"]
    okx.positions = [okx_position("5")]
    fifth = await desk.reconcile()
    assert fifth.recorded == [{"command_id": f"reconcile:agreed:{moved}", "type": "resolve_drift", "drift_id": moved}]
    assert fifth.findings == []
    assert await desk.open_drift() is None
    report = await verify_venue(desk.redis, None, [0])
    assert (report.ok, report.events) == (True, 4)

    # Replay explains each change: the drift's trail and the position's.
    drift_trail = await trail(desk.redis, None, moved)
    assert drift_trail.kind == "drift"
    assert [(s.event.type, s.as_dict()["state"]["status"]) for s in drift_trail.steps] == [
        ("DriftDetected", "open"),
        ("DriftResolved", "resolved"),
    ]
    assert drift_trail.steps[-1].as_dict()["state"]["resolution"] == "agreed"
    position_trail = await trail(desk.redis, None, position.id)
    assert [(s.event.type, s.as_dict()["state"]["size"]) for s in position_trail.steps] == [
        ("PositionOpened", "0.04"),
        ("PositionAdjusted", "0.05"),
    ]


def _fee_evidence(order_id: str) -> dict[str, Any]:
    """A fee drift's evidence: fill t-1 of the order, 0.009 USDT at the venue, 0.005 USDT in the ledger."""
    fill = {
        "order_id": order_id,
        "fill_id": "t-1",
        "venue_fee": "0.009",
        "venue_fee_currency": "USDT",
        "ledger_fee": "0.005",
        "ledger_fee_currency": "USDT",
    }
    return {"fills": [fill]}


async def _fill_reported_with(desk: Desk, ledger_fee: str) -> str:
    """The user's order filled for 2 of 4 contracts at the venue (fee 0.009 USDT), reported to
    the ledger first by someone else, with ``ledger_fee``: the order's id."""
    order_id, client_id = await placed_order(desk.redis, desk.venue)
    desk.venue.fill(client_id, "2", "45000", "t-1", fee="0.009")
    desk.venue.positions = [okx_position("2")]  # the sizes agree
    report = wire.RecordFill(
        command_id="external-t-1",
        user_id=USER,
        order_id=order_id,
        fill_id="t-1",
        quantity="0.02",
        price="45000",
        fee=ledger_fee,
        fee_currency="USDT",
    )
    await desk.client.submit(report)
    return order_id


async def test_a_fill_fee_that_differs_from_the_venues_is_a_fee_drift(desk: Desk) -> None:
    order_id = await _fill_reported_with(desk, "0.005")

    first = await desk.reconcile()
    fee_slot = drift_slot(USER, "okx", MARKET, "fee")
    drift_id = text(await desk.redis.hget(ShardKeys(0).slots, fee_slot))
    assert drift_id is not None
    evidence = _fee_evidence(order_id)
    assert first.findings == [Finding("fee_mismatch", MARKET, MARKET, evidence)]
    assert [r["type"] for r in first.recorded] == ["order_accepted", "record_drift"]
    assert first.recorded[-1]["drift_id"] == drift_id
    (detected,) = await desk.events(drift_id)
    assert isinstance(detected.event, wire.DriftDetected)
    assert (detected.event.kind, detected.event.evidence) == ("fee", evidence)

    second = await desk.reconcile()  # the fee still differs: reported, not recorded again
    assert (second.recorded, second.findings) == ([], first.findings)

    # An adjustment with the fee difference resolves the fee drift (no size drift is open).
    adjust = wire.AdjustPosition(
        command_id="ops-fee-1",
        user_id=USER,
        exchange=Exchange.OKX,
        symbol="BTC-USDT-SWAP",  # the position's spelling; the drift is the canonical market's
        side=PositionSide.LONG,
        size="0.02",
        reason="okx charged 0.009",
        fee_adjustment="0.004",
    )
    await desk.client.submit(adjust)
    _detected, resolved = await desk.events(drift_id)
    assert isinstance(resolved.event, wire.DriftResolved)
    assert (resolved.event.kind, resolved.event.resolution) == ("fee", "adjusted")
    assert await desk.redis.hget(ShardKeys(0).slots, fee_slot) is None


@pytest.fixture
async def archived(
    redis: Any, redis_url: str, database_url: str, tmp_path: Path, okx: LoopbackExchange
) -> AsyncIterator[Desk]:
    """A desk whose ledger also runs the PostgreSQL projector (``database_url``)."""
    credentials = credentials_file(tmp_path, okx)
    async with running_ledger(
        redis_url,
        tmp_path,
        roles=("handler", "projection", "projector"),
        database_url=database_url,
        execution="okx=live",
        credentials=credentials,
    ):
        yield Desk(redis, okx, credentials)


async def _fill_trimmed_from_redis(desk: Desk, pg: Any, ledger_fee: str) -> str:
    """``_fill_reported_with``, then archived by the projector and trimmed from the Redis log."""
    order_id = await _fill_reported_with(desk, ledger_fee)
    await quiesce(desk.redis, 1, ("ledger-projector",))
    trimmed = await trim_shard(desk.redis, pg, 0)
    assert trimmed[0].removed == 3  # OrderPlaced, OrderFilled, PositionOpened: archived, then trimmed
    assert not any(s.event.type == "OrderFilled" for s in await desk.store.read_range())
    cur = await pg.execute("SELECT fee FROM fills WHERE fill_id = 't-1'")
    assert await cur.fetchall() == [(Decimal(ledger_fee),)]
    return order_id


@pytest.mark.parametrize("ledger_fee", ["0.005", "0.009"])
async def test_the_fee_of_a_fill_trimmed_from_redis_is_compared_from_postgresql(
    archived: Desk, pg: Any, database_url: str, tmp_path: Path, ledger_fee: str
) -> None:
    order_id = await _fill_trimmed_from_redis(archived, pg, ledger_fee)
    settings = Settings(redis_url="redis://unused", database_url=database_url, home=tmp_path)
    result = await archived.positions.sync_positions_from_exchange(
        USER, "okx", venue=archived.config, settings=settings
    )
    assert [r["type"] for r in result.recorded] == (
        ["order_accepted", "record_drift"] if ledger_fee == "0.005" else ["order_accepted"]
    )
    if ledger_fee == "0.009":  # the venue's fee: nothing differs
        assert result.findings == []
        return
    evidence = _fee_evidence(order_id)
    assert result.findings == [Finding("fee_mismatch", MARKET, MARKET, evidence)]
    drift_id = text(await archived.redis.hget(ShardKeys(0).slots, drift_slot(USER, "okx", MARKET, "fee")))
    assert result.recorded[-1]["drift_id"] == drift_id


async def test_a_trimmed_fill_with_no_archive_to_read_is_not_compared_and_says_so(
    archived: Desk, pg: Any, tmp_path: Path
) -> None:
    await _fill_trimmed_from_redis(archived, pg, "0.005")
    settings = Settings(redis_url="redis://unused", database_url=None, home=tmp_path / "nothing-recorded")
    with structlog.testing.capture_logs() as logs:
        result = await archived.positions.sync_positions_from_exchange(
            USER, "okx", venue=archived.config, settings=settings
        )
    assert (result.findings, [r["type"] for r in result.recorded]) == ([], ["order_accepted"])
    (warning,) = [line for line in logs if line["event"].startswith("fees not compared")]
    assert (warning["log_level"], warning["fills"], warning["user_id"]) == ("warning", 1, USER)
    assert warning["reason"] == "no postgres configured: set LEDGER_DATABASE_URL or start `ledger serve` first"
