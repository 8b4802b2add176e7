"""Issue 7's domain defects, one test each (pure: the real wire decoder and decider, no servers).

Each test failed before its fix; the values are computed by hand.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from ledger.domain import wire
from ledger.domain.decider import Decision, RejectCode
from ledger.domain.enums import PositionStatus
from ledger.domain.evolution import apply
from ledger.domain.state import StateError
from tests.domain_helpers import INVERSE, LINEAR, Driver, of_type, replay

# --------------------------------------------------------------------------- 1. one position per side


def test_a_one_way_flip_increases_the_open_position_of_its_side() -> None:
    """Short S open, hedge long L opened, then a one-way sell larger than L: L closes and the
    rest increases S (never a second short)."""
    driver = Driver()
    sell = driver.place("sell", "0.5")
    driver.fill(sell, "0.5", "100")
    short_id = driver.open_slot("short").id  # type: ignore[union-attr]
    hedge = driver.place("buy", "0.2", position_side="long")
    driver.fill(hedge, "0.2", "100")
    long_id = driver.open_slot("long").id  # type: ignore[union-attr]

    flip = driver.place("sell", "0.5")
    decision = driver.fill(flip, "0.5", "110")

    closed = of_type(decision.events, wire.PositionClosed)
    increased = of_type(decision.events, wire.PositionIncreased)
    assert [e.stream for e in closed] == [long_id]
    assert closed[0].gross_pnl == "2.0"  # (110 - 100) * 0.2
    assert [e.stream for e in increased] == [short_id]
    assert not of_type(decision.events, wire.PositionOpened)
    short = driver.position(short_id)
    assert (short.size, short.entry_price) == (Decimal("0.8"), Decimal("103.75"))  # (50 + 33) / 0.8
    assert driver.open_slot("short") == short
    opened = [e for e in driver.log if isinstance(e, wire.PositionOpened)]
    assert len({(e.symbol, e.side) for e in opened}) == len(opened) == 2


def test_a_reduce_then_open_in_hedge_mode_also_finds_the_open_side() -> None:
    """A position_side fill opening a side that is open increases it (the same mechanism)."""
    driver = Driver()
    first = driver.place("buy", "1", position_side="long")
    driver.fill(first, "1", "100")
    second = driver.place("buy", "1", position_side="long")
    decision = driver.fill(second, "1", "120")

    assert [e.type for e in decision.events] == ["OrderFilled", "PositionIncreased"]
    assert driver.open_slot("long").entry_price == Decimal("110")  # type: ignore[union-attr]


# --------------------------------------------------------------------------- 5. no phantom position


def test_two_open_positions_before_a_fill_name_the_one_position_the_fills_change() -> None:
    driver = Driver()
    first_order, first_position = driver.open_position("long", "1")
    second_order, second_position = driver.open_position("long", "2")

    assert second_position == first_position
    driver.fill(second_order, "2", "100")  # the second entry fills first: it opens the position
    driver.fill(first_order, "1", "130")

    position = driver.position(first_position)
    assert (position.size, position.entry_price) == (Decimal("3"), Decimal("110"))  # (200 + 130) / 3
    assert {e.stream for e in driver.log if isinstance(e, wire.PositionEvent)} == {first_position}


def test_a_plain_order_filling_first_opens_the_reserved_position() -> None:
    driver = Driver()
    entry_order, reserved = driver.open_position("short", "1")
    plain = driver.place("sell", "1")
    driver.fill(plain, "1", "100")
    driver.fill(entry_order, "1", "100")

    assert driver.open_slot("short").id == reserved  # type: ignore[union-attr]
    assert driver.position(reserved).size == Decimal("2")


def test_after_the_position_closes_a_new_open_names_a_new_position() -> None:
    driver = Driver()
    entry_order, first = driver.open_position("long", "1")
    driver.fill(entry_order, "1", "100")
    driver.fill(driver.close(first), "1", "100")
    assert driver.position(first).status is PositionStatus.CLOSED

    _order, second = driver.open_position("long", "1")

    assert second != first


def test_replaying_the_log_rebuilds_the_reservations() -> None:
    driver = Driver()
    driver.open_position("long", "1")
    assert replay(driver.log).slots == driver.store.slots


# --------------------------------------------------------------------------- 4. executable to a final state


@pytest.mark.parametrize(
    ("symbol", "quantity", "price"),
    [(LINEAR, "1000000000000", "1000000000000"), (INVERSE, "10000000000000000000", "0.000001")],
)
def test_an_order_worth_more_than_a_fee_can_hold_is_rejected_up_front(symbol: str, quantity: str, price: str) -> None:
    driver = Driver()
    rejection = driver.refused(
        "place_order",
        exchange="okx",
        symbol=symbol,
        side="buy",
        order_type="limit",
        quantity=quantity,
        price=price,
    )
    assert rejection.code is RejectCode.INVALID_ORDER
    assert "split the order" in rejection.message


def test_an_order_at_the_largest_amount_is_accepted() -> None:
    driver = Driver()
    driver.place("buy", "99999999999999999999", order_type="limit", price="1")


# --------------------------------------------------------------------------- 15. cancel twice


def test_cancel_of_an_order_pending_cancel_is_accepted() -> None:
    driver = Driver()
    order_id = driver.place("buy", "1", order_type="limit", price="90")
    driver.ok("cancel_order", order_id=order_id)
    again = driver.ok("cancel_order", order_id=order_id)
    assert isinstance(again, Decision) and again.order_id == order_id


# --------------------------------------------------------------------------- 2, 3. accepted means storable


PLACE = {
    "command_id": "c-1",
    "user_id": "alice",
    "exchange": "okx",
    "symbol": "BTC-USDT-SWAP",
    "side": "buy",
    "order_type": "market",
    "quantity": "1",
}
FILL = {
    "command_id": "c-2",
    "user_id": "alice",
    "order_id": "0b0e7f8e-3f4c-4bde-9d0a-5a1f2b3c4d5e",
    "fill_id": "t-1",
    "quantity": "1",
    "price": "100",
    "fee_currency": "USDT",
}


def _decode(type_name: str, data: dict[str, object]) -> wire.Command:
    return wire.decode_command({"type": type_name, "data": json.dumps(data)})


ACCEPTED = {"command_id": "c-3", "user_id": "alice", "order_id": FILL["order_id"], "exchange_order_id": "x-1"}


@pytest.mark.parametrize(
    ("type_name", "base", "field"),
    [
        ("place_order", PLACE, "user_id"),
        ("place_order", PLACE, "symbol"),
        ("place_order", PLACE, "command_id"),
        ("place_order", PLACE, "quantity"),
        ("place_order", {**PLACE, "client_order_id": "my-1"}, "client_order_id"),
        ("record_fill", FILL, "fill_id"),
        ("record_fill", FILL, "order_id"),
        ("record_fill", FILL, "fee_currency"),
        ("order_accepted", ACCEPTED, "exchange_order_id"),
    ],
)
def test_a_trailing_newline_is_refused_in_every_guarded_field(
    type_name: str, base: dict[str, object], field: str
) -> None:
    _decode(type_name, base)  # the same command without the newline is valid
    with pytest.raises(wire.WireError) as caught:
        _decode(type_name, {**base, field: f"{base[field]}\n"})
    assert caught.value.code == "INVALID_FIELD"
    assert field in caught.value.message


@pytest.mark.parametrize(
    ("type_name", "data", "field"),
    [
        ("close_position", {"position_id": FILL["order_id"], "reason": "r" * 65}, "reason"),
        ("close_position", {"position_id": FILL["order_id"], "reason": "stop\u0000loss"}, "reason"),
        ("order_rejected", {"order_id": FILL["order_id"], "reason": "no\u0000"}, "reason"),
        ("order_rejected", {"order_id": FILL["order_id"], "reason": "x" * 257}, "reason"),
        ("record_fill", {**FILL, "ts": 253402300800000}, "ts"),  # 10000-01-01T00:00:00Z
        ("record_fill", {**FILL, "ts": -1}, "ts"),
        ("place_order", {**PLACE, "metadata": {"note": "a\u0000b"}}, "metadata"),
        ("place_order", {**PLACE, "metadata": {"a\u0000": 1}}, "metadata"),
        ("place_order", {**PLACE, "metadata": {"blob": "x" * 20_000}}, "metadata"),
        ("open_position", {**PLACE, "side": "long", "size": "1", "metadata": {"n": {"n": {"n": {}}}}}, None),
        ("record_fill", {**FILL, "order_id": "-" * 36}, "order_id"),
        ("record_fill", {**FILL, "fill_id": "f" * 129}, "fill_id"),
        ("order_accepted", {"order_id": FILL["order_id"], "exchange_order_id": "e" * 129}, "exchange_order_id"),
    ],
)
def test_values_no_store_can_hold_are_refused_at_the_command(
    type_name: str, data: dict[str, object], field: str | None
) -> None:
    data = {"command_id": "c-9", "user_id": "alice", **data}
    if type_name == "open_position":
        data = {k: v for k, v in data.items() if k not in ("order_type", "quantity")}
    if field is None:  # a control case: nested metadata within the limits is accepted
        _decode(type_name, data)
        return
    with pytest.raises(wire.WireError) as caught:
        _decode(type_name, data)
    assert caught.value.code == "INVALID_FIELD"
    assert field in caught.value.message


def test_the_last_millisecond_of_year_9999_is_accepted() -> None:
    command = _decode("record_fill", {**FILL, "ts": 253402300799999})
    assert isinstance(command, wire.RecordFill) and command.ts == 253402300799999


def test_metadata_nested_deeper_than_the_limit_is_refused() -> None:
    nested: dict[str, object] = {}
    for _ in range(20):
        nested = {"n": nested}
    with pytest.raises(wire.WireError) as caught:
        _decode("place_order", {**PLACE, "metadata": nested})
    assert "nested at most 16 levels" in caught.value.message


# --------------------------------------------------------------------------- 6. deep JSON is a wire error


def test_json_nested_a_thousand_levels_deep_is_a_wire_error() -> None:
    raw = "[" * 1000 + "]" * 1000
    with pytest.raises(wire.WireError) as caught:
        wire.decode_command({"type": "place_order", "data": raw})
    assert caught.value.code == "INVALID_JSON"
    deep_in_a_field = '{"command_id":"c-1","user_id":"alice","metadata":' + "[" * 1000 + "]" * 1000 + "}"
    with pytest.raises(wire.WireError) as caught:
        wire.decode_command({"type": "place_order", "data": deep_in_a_field})
    assert caught.value.code == "INVALID_JSON"
    with pytest.raises(wire.WireError):
        wire.decode_event("OrderPlaced", raw)


# ----------------------------------------------------------- the class of 15: facts a venue reports


def test_the_venues_acknowledgement_after_a_fill_records_its_order_id() -> None:
    """A fill accepts a pending order implicitly; the venue's acknowledgement may still come after
    it (venues report out of order): it is a fact, recorded without changing the status."""
    driver = Driver()
    order_id = driver.place("buy", "1", order_type="limit", price="100")
    driver.fill(order_id, "0.4", "100")

    decision = driver.ok("order_accepted", order_id=order_id, exchange_order_id="x-9")

    assert [(e.type, e.status) for e in decision.events] == [("OrderAccepted", "partially_filled")]  # type: ignore[attr-defined]
    assert driver.order(order_id).exchange_order_id == "x-9"
    again = driver.refused("order_accepted", order_id=order_id, exchange_order_id="x-10")
    assert again.code is RejectCode.INVALID_TRANSITION
    assert again.message == f"cannot accept order {order_id}: it is already acknowledged as x-9"


# ----------------------------------------------------------- the class of 5: replies name real positions


def test_order_replies_never_name_a_reserved_position_that_does_not_exist() -> None:
    driver = Driver()
    entry_order, reserved = driver.open_position("long", "1")

    cancel = driver.ok("cancel_order", order_id=entry_order)
    cancelled = driver.ok("order_cancelled", order_id=entry_order)

    assert (cancel.position_id, cancelled.position_id) == (None, None)
    assert driver.store.positions[reserved] is None
    filled_order, position = driver.open_position("long", "1")
    assert position == reserved  # the reservation is kept for the side's next position
    assert driver.fill(filled_order, "1", "100").position_id == reserved


def test_a_publisher_cannot_publish_a_command_the_handler_would_refuse() -> None:
    fill = wire.RecordFill(
        command_id="paper:x:fill",
        user_id="alice",
        order_id=FILL["order_id"],  # type: ignore[arg-type]
        fill_id="t-1",
        quantity="1",
        price="100",
        fee="500000000000000000000",  # 21 integer digits
    )
    with pytest.raises(wire.WireError) as caught:
        wire.command_fields(fill)
    assert caught.value.code == "INVALID_FIELD" and "$.fee" in caught.value.message


def test_an_order_event_for_an_order_never_placed_is_a_state_error_not_an_assert() -> None:
    """A damaged log raises a real error, which ``python -O`` keeps (an ``assert`` vanished there)."""
    driver = Driver()
    order_id = driver.place("buy", "1")
    (placed,) = driver.log
    accepted = driver.ok("order_accepted", order_id=order_id, exchange_order_id="x-1").events[0]

    with pytest.raises(StateError, match=f"OrderAccepted v2 of {order_id}: an order event for an order never placed"):
        apply(None, accepted)
    assert placed.stream == order_id
