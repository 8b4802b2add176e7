"""Drifts and explicit adjustments in the pure domain (issue 11, item 3): ``record_drift``,
``adjust_position``, ``resolve_drift``; their events and the drift slot. Figures by hand."""

from __future__ import annotations

from decimal import Decimal

from ledger.domain import wire
from ledger.domain.decider import RejectCode
from ledger.domain.enums import PositionStatus
from ledger.domain.evolution import DriftState, Latest, apply, drift_slot
from tests.domain_helpers import LINEAR, SPOT, USER, Driver

UNIFIED = "BTC/USDT:USDT"  # the canonical market of LINEAR (BTC-USDT-SWAP)
SIZE_SLOT = drift_slot(USER, "okx", UNIFIED, "position_size")
FEE_SLOT = drift_slot(USER, "okx", UNIFIED, "fee")


def _long(driver: Driver, size: str = "0.3", price: str = "45000", fee: str = "1.35") -> str:
    order_id, position_id = driver.open_position("long", size)
    driver.fill(order_id, size, price, fee=fee)
    return position_id


def _drift(driver: Driver, symbol: str = LINEAR, kind: str = "position_size") -> str:
    decision = driver.ok("record_drift", exchange="okx", symbol=symbol, kind=kind, evidence={"venue": "0.25"})
    (event,) = decision.events
    assert isinstance(event, wire.DriftDetected)
    return event.stream


def test_a_drift_is_keyed_by_the_canonical_market_and_open_once() -> None:
    driver = Driver()
    decision = driver.ok("record_drift", exchange="okx", symbol=LINEAR, kind="position_size", evidence={"venue": "1"})
    (event,) = decision.events
    assert isinstance(event, wire.DriftDetected)
    assert (event.version, event.market, event.symbol, event.kind, event.evidence) == (
        1,
        UNIFIED,
        LINEAR,
        "position_size",
        {"venue": "1"},
    )
    assert (decision.order_id, decision.position_id) == (None, None)
    assert driver.store.slots[SIZE_SLOT] == event.stream
    again = driver.refused("record_drift", exchange="okx", symbol=UNIFIED, kind="position_size", evidence={})
    assert again.code is RejectCode.DRIFT_OPEN
    assert again.message == (
        f"drift {event.stream} is already open for {USER} on okx {UNIFIED} (position_size): "
        "correct it with adjust_position or close it with resolve_drift first"
    )
    other_kind = _drift(driver, kind="fee")  # another kind is another key
    assert driver.store.slots[FEE_SLOT] == other_kind


def test_an_adjustment_changes_size_and_fees_not_the_entry_price_nor_the_gross_pnl() -> None:
    driver = Driver()
    position_id = _long(driver)
    decision = driver.ok(
        "adjust_position",
        exchange="okx",
        symbol=LINEAR,
        side="long",
        size="0.25",
        reason="venue holds 0.25",
        fee_adjustment="0.5",
    )
    assert decision.position_id == position_id
    (event,) = decision.events
    assert isinstance(event, wire.PositionAdjusted)
    assert (event.stream, event.version, event.status) == (position_id, 2, PositionStatus.OPEN)
    assert (event.size, event.size_before, event.entry_price, event.gross_pnl) == ("0.25", "0.3", "45000", "0")
    assert (event.fees, event.realized_pnl, event.change_qty, event.change_fee) == ("1.85", "-1.85", "0.05", "0.5")
    assert (event.change_price, event.reason, event.drift_ids) == ("45000", "venue holds 0.25", [])
    position = driver.position(position_id)
    assert (position.entry_qty, position.exit_qty) == (Decimal("0.3"), Decimal(0))  # trades only
    # A later fill closes what is held: gross (46000 - 45000) * 0.25 = 250, net 250 - 1.85 - 0.2.
    order_id = driver.close(position_id)
    driver.fill(order_id, "0.25", "46000", fee="0.2")
    closed = driver.position(position_id)
    assert (closed.status, closed.gross_pnl, closed.fees) == (PositionStatus.CLOSED, Decimal(250), Decimal("2.05"))
    assert closed.realized_pnl == Decimal("247.95")


def test_an_adjustment_resolves_the_markets_open_drifts() -> None:
    driver = Driver()
    position_id = _long(driver)
    size_drift, fee_drift = _drift(driver), _drift(driver, symbol=UNIFIED, kind="fee")
    # Without a fee_adjustment only the size drift is resolved.
    decision = driver.ok(
        "adjust_position", exchange="okx", symbol=UNIFIED, side="long", size="0.2", reason="venue", price="1"
    )
    adjusted, resolved = decision.events
    assert decision.position_id == adjusted.stream != position_id  # another spelling is another position
    assert isinstance(adjusted, wire.PositionAdjusted) and isinstance(resolved, wire.DriftResolved)
    assert (adjusted.size, adjusted.size_before, adjusted.entry_price, adjusted.version) == ("0.2", "0", "1", 1)
    assert adjusted.drift_ids == [size_drift]
    assert (resolved.stream, resolved.version, resolved.resolution, resolved.market, resolved.kind) == (
        size_drift,
        2,
        "adjusted",
        UNIFIED,
        "position_size",
    )
    assert (resolved.adjustment_event_id, resolved.position_id) == (adjusted.event_id, adjusted.stream)
    assert driver.store.slots[SIZE_SLOT] is None and driver.store.slots[FEE_SLOT] == fee_drift
    # A fee adjustment resolves the fee drift (and no size drift is open any more).
    decision = driver.ok(
        "adjust_position", exchange="okx", symbol=LINEAR, side="long", size="0.3", reason="fee", fee_adjustment="-0.35"
    )
    adjusted, resolved = decision.events
    assert isinstance(adjusted, wire.PositionAdjusted) and isinstance(resolved, wire.DriftResolved)
    assert (adjusted.stream, adjusted.fees, adjusted.realized_pnl, adjusted.drift_ids) == (
        position_id,
        "1.00",
        "-1.00",
        [fee_drift],
    )
    assert (resolved.stream, resolved.kind) == (fee_drift, "fee")
    assert driver.store.slots[FEE_SLOT] is None
    assert _drift(driver) != size_drift  # a new drift may open once the last was resolved


def test_an_adjustment_to_zero_closes_the_position_once() -> None:
    driver = Driver()
    position_id = _long(driver)
    drift_id = _drift(driver)
    decision = driver.ok("adjust_position", exchange="okx", symbol=LINEAR, side="long", size="0", reason="gone")
    adjusted, closed, resolved = decision.events
    assert isinstance(adjusted, wire.PositionAdjusted) and isinstance(closed, wire.PositionClosed)
    assert [(e.stream, e.version) for e in decision.events] == [(position_id, 2), (position_id, 3), (drift_id, 2)]
    for event in (adjusted, closed):
        assert (event.status, event.size, event.close_reason, event.closed_at) == (
            PositionStatus.CLOSED,
            "0",
            "adjustment",
            driver.now,
        )
        assert (event.entry_price, event.gross_pnl, event.fees, event.realized_pnl) == ("45000", "0", "1.35", "-1.35")
    assert (adjusted.change_qty, adjusted.size_before, closed.change_qty) == ("0.3", "0.3", "0")
    assert driver.store.slots[f"{USER}|okx|{LINEAR}|long"] is None
    assert driver.position(position_id).version == 3
    refused = driver.refused("adjust_position", exchange="okx", symbol=LINEAR, side="long", size="0", reason="x")
    assert (refused.code, refused.message) == (
        RejectCode.NO_POSITION,
        f"no open long position on {LINEAR} to adjust: give a size above 0 and its price to open one",
    )


def test_what_an_adjustment_refuses() -> None:
    driver = Driver()
    cases = [
        (
            {"side": "long", "size": "-1"},
            RejectCode.INVALID_COMMAND,
            "size: the position's new absolute size, 0 or more (got -1)",
        ),
        (
            {"side": "long", "size": "0.1"},
            RejectCode.INVALID_COMMAND,
            f"price: required to open a long position on {LINEAR} by adjustment (its entry price)",
        ),
        ({"side": "short", "size": "1", "symbol": SPOT, "price": "1"}, RejectCode.SPOT_SHORT, None),
    ]
    for data, code, message in cases:
        command = {"exchange": "okx", "symbol": LINEAR, "reason": "r", **data}
        refused = driver.refused("adjust_position", **command)
        assert refused.code is code
        if message is not None:
            assert refused.message == message
    position_id = _long(driver)
    same = driver.refused("adjust_position", exchange="okx", symbol=LINEAR, side="long", size="0.30", reason="r")
    assert (same.code, same.message) == (
        RejectCode.INVALID_COMMAND,
        f"adjust_position changes nothing: long position {position_id} is already 0.30; "
        "give another size or a fee_adjustment",
    )


def test_resolve_drift_acknowledges_or_agrees_and_needs_an_open_drift() -> None:
    driver = Driver()
    refused = driver.refused("resolve_drift", exchange="okx", symbol=LINEAR, kind="position_size", reason="ok")
    assert (refused.code, refused.message) == (
        RejectCode.NO_DRIFT,
        f"no position_size drift is open for {USER} on okx {UNIFIED}: nothing to resolve "
        "(`ledger verify --venue` lists the open ones)",
    )
    drift_id = _drift(driver)
    (event,) = driver.ok("resolve_drift", exchange="okx", symbol=UNIFIED, kind="position_size", reason="ok").events
    assert isinstance(event, wire.DriftResolved)
    assert (event.stream, event.version, event.resolution, event.adjustment_event_id) == (
        drift_id,
        2,
        "acknowledged",
        None,
    )
    again = _drift(driver)
    decision = driver.ok(
        "resolve_drift", exchange="okx", symbol=LINEAR, kind="position_size", reason="venue agrees", resolution="agreed"
    )
    (event,) = decision.events
    assert isinstance(event, wire.DriftResolved) and (event.stream, event.resolution) == (again, "agreed")


def test_a_drifts_events_fold_to_its_state_and_change_no_order_or_position() -> None:
    driver = Driver()
    _long(driver)
    drift_id = _drift(driver)
    driver.ok("adjust_position", exchange="okx", symbol=LINEAR, side="long", size="0.1", reason="venue")
    detected, resolved = [e for e in driver.log if e.stream == drift_id]
    state = apply(apply(None, detected), resolved)
    assert state == DriftState(
        id=drift_id,
        user_id=USER,
        exchange="okx",
        symbol=LINEAR,
        market=UNIFIED,
        kind="position_size",
        status="resolved",
        evidence={"venue": "0.25"},
        detected_event_id=detected.event_id,
        resolution="adjusted",
        reason="venue",
        adjustment_event_id=resolved.adjustment_event_id,  # type: ignore[attr-defined]
        position_id=resolved.position_id,  # type: ignore[attr-defined]
        version=2,
    )
    latest = Latest()
    latest.fold(driver.log)
    assert drift_id not in latest.orders
    assert [p.size for p in latest.positions()] == [Decimal("0.1")]
