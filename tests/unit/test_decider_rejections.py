"""Every rejection path of the decider, and the facts it records instead of refusing.

A rejection carries an exact ``RejectCode`` and appends no event (``Driver.refused`` checks
both). A fill the venue reports is a fact (CONTRACT §7, §8): it is recorded and flagged, never
refused, whatever state the order is in.
"""

from __future__ import annotations

import uuid
from decimal import Decimal as D

import pytest

from ledger.domain import wire
from ledger.domain.decider import RejectCode
from ledger.domain.enums import OrderStatus, PositionStatus
from tests.domain_helpers import LINEAR, SPOT, Driver, of_type

UNKNOWN_ID = str(uuid.UUID(int=0xDEADBEEF))


def _filled_order(driver: Driver) -> str:
    order_id = driver.place("buy", "0.1")
    driver.fill(order_id, "0.1", "50000")
    return order_id


def _open_long(driver: Driver, size: str = "0.1") -> str:
    order_id, position_id = driver.open_position("long", size)
    driver.fill(order_id, size, "50000")
    return position_id


def _status(driver: Driver, order_id: str) -> OrderStatus:
    return driver.order(order_id).status


# --------------------------------------------------------------------------- unknown ids


@pytest.mark.parametrize(
    "command",
    ["cancel_order", "order_cancelled", "order_expired"],
)
def test_unknown_order_id_is_rejected(command: str) -> None:
    rejection = Driver().refused(command, order_id=UNKNOWN_ID)

    assert rejection.code is RejectCode.UNKNOWN_ORDER
    assert rejection.order_id == UNKNOWN_ID


def test_fill_for_an_unknown_order_is_rejected() -> None:
    rejection = Driver().refused("record_fill", order_id=UNKNOWN_ID, fill_id="t1", quantity="1", price="1")

    assert rejection.code is RejectCode.UNKNOWN_ORDER


def test_another_users_order_is_unknown() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.1")

    for command, extra in (
        ("cancel_order", {}),
        ("order_accepted", {"exchange_order_id": "x-1"}),
        ("order_rejected", {"reason": "nope"}),
        ("record_fill", {"fill_id": "t1", "quantity": "0.1", "price": "1"}),
        ("order_cancelled", {}),
        ("order_expired", {}),
    ):
        rejection = driver.refused(command, user_id="mallory", order_id=order_id, **extra)
        assert rejection.code is RejectCode.UNKNOWN_ORDER, command
    assert _status(driver, order_id) is OrderStatus.PENDING


def test_order_id_is_matched_case_insensitively() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.1")

    decision = driver.ok("cancel_order", order_id=order_id.upper())

    assert decision.order_id == order_id


@pytest.mark.parametrize("command", ["close_position", "liquidate_position"])
def test_unknown_position_id_is_rejected(command: str) -> None:
    rejection = Driver().refused(command, position_id=UNKNOWN_ID, price="1")

    assert rejection.code is RejectCode.UNKNOWN_POSITION
    assert rejection.position_id == UNKNOWN_ID


@pytest.mark.parametrize("command", ["close_position", "liquidate_position"])
def test_another_users_position_is_unknown(command: str) -> None:
    driver = Driver()
    position_id = _open_long(driver)

    rejection = driver.refused(command, user_id="mallory", position_id=position_id, price="1")

    assert rejection.code is RejectCode.UNKNOWN_POSITION
    assert driver.position(position_id).status is PositionStatus.OPEN


def test_reserved_but_never_opened_position_is_unknown() -> None:
    driver = Driver()
    _, position_id = driver.open_position("long", "0.1")  # no fill yet

    rejection = driver.refused("close_position", position_id=position_id)

    assert rejection.code is RejectCode.UNKNOWN_POSITION


# --------------------------------------------------------------------------- fills


def test_same_fill_id_twice_is_a_duplicate() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.2")
    driver.fill(order_id, "0.1", "50000", fill_id="T-1")

    rejection = driver.refused("record_fill", order_id=order_id, fill_id="T-1", quantity="0.1", price="50000")

    assert rejection.code is RejectCode.DUPLICATE_FILL
    assert driver.order(order_id).filled_qty == D("0.1")


def test_same_fill_id_on_another_order_is_a_new_fill() -> None:
    driver = Driver()
    first, second = driver.place("buy", "0.1"), driver.place("buy", "0.1")
    driver.fill(first, "0.1", "50000", fill_id="T-1")

    driver.fill(second, "0.1", "50000", fill_id="T-1")

    assert driver.order(second).status is OrderStatus.FILLED


# --------------------------------------------------------------------------- transitions


def test_cancel_of_a_filled_order_is_an_invalid_transition() -> None:
    driver = Driver()
    order_id = _filled_order(driver)

    rejection = driver.refused("cancel_order", order_id=order_id)

    assert rejection.code is RejectCode.INVALID_TRANSITION


def test_cancel_twice_requests_the_cancel_again() -> None:
    """CONTRACT §3: a cancel is accepted for any order not yet final, pending_cancel included."""
    driver = Driver()
    order_id = driver.place("buy", "0.1")
    driver.ok("cancel_order", order_id=order_id)

    again = driver.ok("cancel_order", order_id=order_id)

    assert [(e.type, e.version, e.status) for e in again.events] == [  # type: ignore[attr-defined]
        ("OrderCancelRequested", 3, OrderStatus.PENDING_CANCEL)
    ]
    assert again.order_id == order_id
    assert _status(driver, order_id) is OrderStatus.PENDING_CANCEL


def test_accepting_an_open_order_again_is_an_invalid_transition() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.1")
    driver.ok("order_accepted", order_id=order_id, exchange_order_id="x-1")

    rejection = driver.refused("order_accepted", order_id=order_id, exchange_order_id="x-2")

    assert rejection.code is RejectCode.INVALID_TRANSITION
    assert driver.order(order_id).exchange_order_id == "x-1"


def test_accepting_a_filled_order_is_an_invalid_transition() -> None:
    driver = Driver()
    order_id = _filled_order(driver)

    rejection = driver.refused("order_accepted", order_id=order_id, exchange_order_id="x-1")

    assert rejection.code is RejectCode.INVALID_TRANSITION


def test_reject_of_an_order_with_fills_is_an_invalid_transition() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.2")
    driver.fill(order_id, "0.1", "50000")  # partially_filled

    rejection = driver.refused("order_rejected", order_id=order_id, reason="late")

    assert rejection.code is RejectCode.INVALID_TRANSITION


def test_reject_of_a_pending_cancel_order_with_fills_is_an_invalid_transition() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.2")
    driver.ok("cancel_order", order_id=order_id)
    driver.fill(order_id, "0.1", "50000")  # still pending_cancel, but it has a fill

    rejection = driver.refused("order_rejected", order_id=order_id, reason="late")

    assert rejection.code is RejectCode.INVALID_TRANSITION
    assert _status(driver, order_id) is OrderStatus.PENDING_CANCEL


def test_reject_of_an_open_order_is_an_invalid_transition() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.1")
    driver.ok("order_accepted", order_id=order_id, exchange_order_id="x-1")

    rejection = driver.refused("order_rejected", order_id=order_id, reason="late")

    assert rejection.code is RejectCode.INVALID_TRANSITION


@pytest.mark.parametrize("final", ["filled", "cancelled", "rejected", "expired"])
def test_confirming_the_cancel_of_a_final_order_is_an_invalid_transition(final: str) -> None:
    driver = Driver()
    order_id = _order_in(driver, final)

    rejection = driver.refused("order_cancelled", order_id=order_id)

    assert rejection.code is RejectCode.INVALID_TRANSITION
    assert _status(driver, order_id) == final


@pytest.mark.parametrize("final", ["filled", "cancelled", "rejected", "expired"])
def test_expiring_a_final_order_is_an_invalid_transition(final: str) -> None:
    driver = Driver()
    order_id = _order_in(driver, final)

    rejection = driver.refused("order_expired", order_id=order_id)

    assert rejection.code is RejectCode.INVALID_TRANSITION
    assert _status(driver, order_id) == final


def _order_in(driver: Driver, status: str) -> str:
    order_id = driver.place("buy", "0.1")
    if status == "filled":
        driver.fill(order_id, "0.1", "50000")
    elif status == "cancelled":
        driver.ok("cancel_order", order_id=order_id)
        driver.ok("order_cancelled", order_id=order_id)
    elif status == "rejected":
        driver.ok("order_rejected", order_id=order_id, reason="insufficient margin")
    elif status == "expired":
        driver.ok("order_expired", order_id=order_id)
    assert _status(driver, order_id) == status
    return order_id


# --------------------------------------------------------------------------- order shape


def test_limit_order_without_price_is_invalid() -> None:
    rejection = Driver().refused(
        "place_order",
        exchange="okx",
        symbol=LINEAR,
        side="buy",
        order_type="limit",
        quantity="0.1",
    )

    assert rejection.code is RejectCode.INVALID_ORDER


@pytest.mark.parametrize("order_type", ["stop_market", "stop_limit", "take_profit_market"])
def test_stop_order_without_trigger_price_is_invalid(order_type: str) -> None:
    rejection = Driver().refused(
        "place_order",
        exchange="okx",
        symbol=LINEAR,
        side="sell",
        order_type=order_type,
        quantity="0.1",
        price="49000",
    )

    assert rejection.code is RejectCode.INVALID_ORDER


def test_stop_limit_with_trigger_and_price_is_placed() -> None:
    driver = Driver()
    order_id = driver.place("sell", "0.1", order_type="stop_limit", price="49000", trigger_price="49500")

    order = driver.order(order_id)
    assert (order.price, order.trigger_price) == (D("49000"), D("49500"))


# --------------------------------------------------------------------------- spot shorts


def test_spot_sell_with_nothing_held_is_a_spot_short() -> None:
    rejection = Driver().refused(
        "place_order", exchange="okx", symbol=SPOT, side="sell", order_type="market", quantity="1"
    )

    assert rejection.code is RejectCode.SPOT_SHORT


def test_spot_sell_of_more_than_held_is_a_spot_short() -> None:
    driver = Driver()
    driver.fill(driver.place("buy", "1", symbol=SPOT), "1", "50000")

    rejection = driver.refused(
        "place_order",
        exchange="okx",
        symbol=SPOT,
        side="sell",
        order_type="market",
        quantity="1.00000001",
    )

    assert rejection.code is RejectCode.SPOT_SHORT


def test_spot_sell_of_what_is_held_is_placed() -> None:
    driver = Driver()
    driver.fill(driver.place("buy", "1", symbol=SPOT), "1", "50000")

    driver.fill(driver.place("sell", "1", symbol=SPOT), "1", "51000")

    assert driver.open_slot("long", symbol=SPOT) is None


def test_open_position_short_on_spot_is_a_spot_short() -> None:
    rejection = Driver().refused("open_position", exchange="okx", symbol=SPOT, side="short", size="1")

    assert rejection.code is RejectCode.SPOT_SHORT


def test_position_side_short_on_spot_is_a_spot_short() -> None:
    rejection = Driver().refused(
        "place_order",
        exchange="upbit",
        symbol="KRW-BTC",
        side="buy",
        order_type="market",
        quantity="1",
        position_side="short",
    )

    assert rejection.code is RejectCode.SPOT_SHORT


def test_spot_overfill_of_a_sell_never_opens_a_short() -> None:
    """A spot sell filled beyond the holding closes it; the rest is unapplied, not a short."""
    driver = Driver()
    driver.fill(driver.place("buy", "1", symbol=SPOT), "1", "50000")
    sell = driver.place("sell", "1", symbol=SPOT)

    decision = driver.fill(sell, "1.5", "51000")

    [filled] = of_type(decision.events, wire.OrderFilled)
    assert filled.overfill is True
    assert D(filled.unapplied_qty) == D("0.5")  # 1.5 - 1 held
    assert of_type(decision.events, wire.PositionOpened) == []
    assert driver.open_slot("short", symbol=SPOT) is None


# --------------------------------------------------------------------------- positions


def test_reduce_only_without_a_position_is_rejected() -> None:
    rejection = Driver().refused(
        "place_order",
        exchange="okx",
        symbol=LINEAR,
        side="sell",
        order_type="market",
        quantity="0.1",
        reduce_only=True,
    )

    assert rejection.code is RejectCode.NO_POSITION


def test_reduce_only_on_the_side_that_would_increase_is_rejected() -> None:
    driver = Driver()
    _open_long(driver)

    rejection = driver.refused(
        "place_order",
        exchange="okx",
        symbol=LINEAR,
        side="buy",
        order_type="market",
        quantity="0.1",
        reduce_only=True,
        position_side="long",
    )

    assert rejection.code is RejectCode.NO_POSITION


def test_reduce_only_sell_of_an_open_long_is_placed_against_it() -> None:
    driver = Driver()
    position_id = _open_long(driver)

    decision = driver.ok(
        "place_order",
        exchange="okx",
        symbol=LINEAR,
        side="sell",
        order_type="market",
        quantity="0.05",
        reduce_only=True,
    )

    assert decision.position_id == position_id


def test_closing_a_closed_position_is_rejected() -> None:
    driver = Driver()
    position_id = _open_long(driver)
    driver.fill(driver.close(position_id), "0.1", "51000")

    rejection = driver.refused("close_position", position_id=position_id)

    assert rejection.code is RejectCode.POSITION_NOT_OPEN


def test_liquidating_a_liquidated_position_is_rejected() -> None:
    driver = Driver()
    position_id = _open_long(driver)
    driver.ok("liquidate_position", position_id=position_id, price="40000")

    rejection = driver.refused("liquidate_position", position_id=position_id, price="39000")

    assert rejection.code is RejectCode.POSITION_NOT_OPEN


def test_close_of_more_than_the_open_size_is_rejected() -> None:
    driver = Driver()
    position_id = _open_long(driver, "0.1")

    rejection = driver.refused("close_position", position_id=position_id, size="0.10000001")

    assert rejection.code is RejectCode.SIZE_EXCEEDS_POSITION


# --------------------------------------------------------------------------- invalid values


@pytest.mark.parametrize(
    ("field", "value"),
    [("quantity", "0"), ("quantity", "-1"), ("price", "-50000"), ("price", "0")],
)
def test_place_order_with_a_non_positive_amount_is_invalid(field: str, value: str) -> None:
    data = {"quantity": "0.1", "price": "50000", field: value}

    rejection = Driver().refused("place_order", exchange="okx", symbol=LINEAR, side="buy", order_type="limit", **data)

    assert rejection.code is RejectCode.INVALID_COMMAND
    assert field in rejection.message


@pytest.mark.parametrize(("field", "value"), [("quantity", "0"), ("price", "-1")])
def test_fill_with_a_non_positive_amount_is_invalid(field: str, value: str) -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.1")
    data = {"quantity": "0.1", "price": "50000", field: value}

    rejection = driver.refused("record_fill", order_id=order_id, fill_id="t1", **data)

    assert rejection.code is RejectCode.INVALID_COMMAND


def test_open_position_of_size_zero_is_invalid() -> None:
    rejection = Driver().refused("open_position", exchange="okx", symbol=LINEAR, side="long", size="0")

    assert rejection.code is RejectCode.INVALID_COMMAND


def test_liquidation_at_a_negative_price_is_invalid() -> None:
    driver = Driver()
    position_id = _open_long(driver)

    rejection = driver.refused("liquidate_position", position_id=position_id, price="-1")

    assert rejection.code is RejectCode.INVALID_COMMAND
    assert driver.position(position_id).status is PositionStatus.OPEN


# --------------------------------------------------------------------------- recorded facts


def test_order_life_pending_open_partially_filled_filled() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.3", order_type="limit", price="50000")
    assert _status(driver, order_id) is OrderStatus.PENDING

    driver.ok("order_accepted", order_id=order_id, exchange_order_id="okx-42")
    assert _status(driver, order_id) is OrderStatus.OPEN

    driver.fill(order_id, "0.1", "50000")
    assert _status(driver, order_id) is OrderStatus.PARTIALLY_FILLED

    driver.fill(order_id, "0.2", "49990")
    order = driver.order(order_id)
    assert order.status is OrderStatus.FILLED
    assert order.filled_qty == D("0.3")
    assert order.avg_fill_price == D("49993.33333333333333333333333")  # 14998 / 0.3, 28 digits
    assert order.version == 4


def test_order_life_pending_cancel_then_cancelled() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.1", order_type="limit", price="50000")
    driver.ok("order_accepted", order_id=order_id, exchange_order_id="okx-42")

    driver.ok("cancel_order", order_id=order_id)
    assert _status(driver, order_id) is OrderStatus.PENDING_CANCEL
    driver.ok("order_cancelled", order_id=order_id)
    assert _status(driver, order_id) is OrderStatus.CANCELLED


def test_order_life_rejected_by_the_venue() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.1")

    driver.ok("order_rejected", order_id=order_id, reason="insufficient margin")

    order = driver.order(order_id)
    assert order.status is OrderStatus.REJECTED
    assert order.reject_reason == "insufficient margin"


def test_order_life_expired_by_the_venue() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.1", order_type="limit", price="1")
    driver.ok("order_accepted", order_id=order_id, exchange_order_id="okx-42")

    driver.ok("order_expired", order_id=order_id)

    assert _status(driver, order_id) is OrderStatus.EXPIRED


def test_acknowledgement_after_a_cancel_request_keeps_pending_cancel() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.1")
    driver.ok("cancel_order", order_id=order_id)

    driver.ok("order_accepted", order_id=order_id, exchange_order_id="okx-42")

    order = driver.order(order_id)
    assert order.status is OrderStatus.PENDING_CANCEL
    assert order.exchange_order_id == "okx-42"


@pytest.mark.parametrize(("quantity", "status"), [("0.1", "partially_filled"), ("0.2", "filled")])
def test_fill_on_a_pending_order_accepts_it(quantity: str, status: str) -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.2")

    decision = driver.fill(order_id, quantity, "50000")

    [filled] = of_type(decision.events, wire.OrderFilled)
    assert filled.status == status
    assert (filled.late, filled.overfill) == (False, False)
    assert _status(driver, order_id) == status


def test_partial_fill_after_cancel_request_stays_pending_cancel() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.2")
    driver.ok("cancel_order", order_id=order_id)

    driver.fill(order_id, "0.1", "50000")

    order = driver.order(order_id)
    assert order.status is OrderStatus.PENDING_CANCEL
    assert order.filled_qty == D("0.1")


def test_complete_fill_after_cancel_request_is_filled() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.2")
    driver.ok("cancel_order", order_id=order_id)

    driver.fill(order_id, "0.2", "50000")

    assert _status(driver, order_id) is OrderStatus.FILLED
    driver.refused("order_cancelled", order_id=order_id)  # the venue can no longer cancel it


def test_fill_on_a_cancelled_order_is_recorded_late() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.2")
    driver.ok("cancel_order", order_id=order_id)
    driver.ok("order_cancelled", order_id=order_id)

    decision = driver.fill(order_id, "0.1", "50000")

    [filled] = of_type(decision.events, wire.OrderFilled)
    assert filled.late is True
    assert filled.status is OrderStatus.CANCELLED
    assert driver.order(order_id).filled_qty == D("0.1")
    long = driver.open_slot("long")
    assert long is not None and long.size == D("0.1")  # the fill still moves the position


def test_overfill_is_recorded_and_flagged() -> None:
    driver = Driver()
    order_id = driver.place("buy", "0.1")
    driver.fill(order_id, "0.1", "50000")

    decision = driver.fill(order_id, "0.05", "50100")

    [filled] = of_type(decision.events, wire.OrderFilled)
    assert filled.overfill is True
    assert filled.late is False
    assert filled.status is OrderStatus.FILLED
    assert D(filled.filled_qty) == D("0.15")  # 0.1 + 0.05
    long = driver.open_slot("long")
    assert long is not None and long.size == D("0.15")


def test_overfill_of_a_close_order_closes_and_records_the_excess() -> None:
    driver = Driver()
    position_id = _open_long(driver, "0.1")

    decision = driver.fill(driver.close(position_id), "0.12", "51000")

    [filled] = of_type(decision.events, wire.OrderFilled)
    assert filled.overfill is True
    position = driver.position(position_id)
    assert position.status is PositionStatus.CLOSED
    assert position.size == D("0")
    assert position.excess_qty == D("0.02")  # 0.12 - 0.1
    assert position.gross_pnl == D("100")  # (51000 - 50000) * 0.1: the excess moves nothing
    assert driver.open_slot("short") is None


def test_an_order_no_fill_could_report_is_refused() -> None:
    """A position grown past ``MAX_AMOUNT`` by two fills, closed whole, would be an order whose
    fill no command can carry (the wire takes at most 20 integer digits; the paper venue's own
    fill was dead-lettered): refused, and closing it in parts works."""
    driver = Driver()
    biggest = "99999999999999999999"
    for _fill in range(2):
        order_id, position_id = driver.open_position("long", biggest)
        driver.fill(order_id, biggest, "0.0001")
    assert driver.position(position_id).size == D("199999999999999999998")

    rejection = driver.refused("close_position", position_id=position_id)

    assert rejection.code is RejectCode.INVALID_ORDER
    assert rejection.message == (
        "quantity 199999999999999999998 is more than 99999999999999999999, the most one fill can report: "
        "split it (close a position in parts with size)"
    )
    placed = driver.send("close_position", position_id=position_id, size=biggest)
    assert [type(e).__name__ for e in placed.events] == ["OrderPlaced"]
