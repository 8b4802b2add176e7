"""``adopt_order``: an order the ledger never placed, brought into the books (issue 11, item 3).

Pure: the real wire decoder, ``requirements``, ``decide`` and ``evolve`` (``tests.domain_helpers``).
"""

from __future__ import annotations

import uuid
from decimal import Decimal as D

import msgspec
import pytest

from ledger.domain import wire
from ledger.domain.decider import RejectCode
from ledger.domain.enums import OrderStatus, PositionSide
from ledger.domain.evolution import apply
from ledger.domain.state import OrderState
from tests.domain_helpers import LINEAR, SPOT, USER, Driver

VENUE_ID = "612345678901234567"
# An adopt_order's data (besides command_id and user_id): a limit buy of 0.2 at 50000 on OKX.
ADOPT: dict[str, object] = {
    "exchange": "okx",
    "symbol": LINEAR,
    "side": "buy",
    "order_type": "limit",
    "quantity": "0.2",
    "price": "50000",
    "exchange_order_id": VENUE_ID,
}


def _adopt(driver: Driver, **extra: object) -> str:
    decision = driver.ok("adopt_order", **{**ADOPT, **extra})
    assert decision.order_id is not None
    return decision.order_id


def test_the_order_id_is_derived_from_user_exchange_and_venue_order_id() -> None:
    driver = Driver()

    order_id = _adopt(driver)

    namespace = uuid.UUID("6f1c3c2e-5b7a-4d2e-9a41-0c7b8e2d4f15")
    assert order_id == str(uuid.uuid5(namespace, f"{USER}:okx:{VENUE_ID}"))
    assert order_id == wire.adopted_order_id(USER, "okx", VENUE_ID)
    assert wire.adopted_order_id("bob", "okx", VENUE_ID) != order_id
    assert wire.adopted_order_id(USER, "binance", VENUE_ID) != order_id


def test_one_event_open_with_the_venue_id_and_the_venue_client_id_stored() -> None:
    driver = Driver()

    order_id = _adopt(driver, venue_client_order_id="manual42", leverage=3, metadata={"source": "app"})

    [event] = driver.log
    assert type(event) is wire.OrderAdopted and isinstance(event, wire.OrderPlaced)
    assert (event.stream, event.version, event.status) == (order_id, 1, OrderStatus.OPEN)
    assert (event.exchange_order_id, event.client_order_id) == (VENUE_ID, "manual42")
    assert (event.quantity, event.price, event.leverage, event.metadata) == ("0.2", "50000", 3, {"source": "app"})
    state = driver.order(order_id)
    assert (state.status, state.exchange_order_id, state.client_order_id) == (OrderStatus.OPEN, VENUE_ID, "manual42")


def test_evolution_gives_the_state_of_placed_plus_accepted() -> None:
    driver = Driver()
    adopted_id = _adopt(driver)
    adopted = driver.log[0]
    placed = wire.OrderPlaced(
        **{name: getattr(adopted, name) for name in wire.OrderPlaced.__struct_fields__ if name not in ("status",)}
    )
    accepted = wire.OrderAccepted(
        event_id="e2",
        stream=adopted_id,
        version=2,
        command_id="c2",
        user_id=USER,
        exchange=adopted.exchange,
        symbol=adopted.symbol,
        ts=adopted.ts,
        status=OrderStatus.OPEN,
        exchange_order_id=VENUE_ID,
    )

    two_steps = apply(apply(None, placed), accepted)
    one_step = apply(None, adopted)

    assert isinstance(one_step, OrderState)
    assert one_step == msgspec.structs.replace(two_steps, version=1)


def test_a_second_adoption_of_one_venue_order_is_rejected_naming_the_order() -> None:
    driver = Driver()
    order_id = _adopt(driver)

    rejection = driver.refused(
        "adopt_order",
        command_id="another-command",
        exchange="okx",
        symbol="BTC/USDT:USDT",
        side="sell",
        order_type="market",
        quantity="1",
        exchange_order_id=VENUE_ID,
    )

    assert rejection.code is RejectCode.INVALID_TRANSITION
    assert rejection.message == f"cannot adopt okx order {VENUE_ID}: it is order {order_id} already"
    assert rejection.order_id == order_id


@pytest.mark.parametrize("form", ["hex", "uuid"])
def test_an_order_with_a_client_id_the_ledger_derives_is_never_adopted(form: str) -> None:
    """Its client id says the ledger sent it (OKX and Binance: the order id's 32 hex digits,
    Upbit: the UUID): adopting it would count its fills a second time, even when that order is no
    longer in the book (compacted) or is another user's."""
    driver = Driver()
    ours = str(uuid.UUID(int=7))
    client_id = ours.replace("-", "") if form == "hex" else ours

    rejection = driver.refused("adopt_order", **{**ADOPT, "venue_client_order_id": client_id})

    assert rejection.code is RejectCode.INVALID_TRANSITION
    assert rejection.message == (
        f"cannot adopt okx order {VENUE_ID}: its client id {client_id} is the ledger's own (order {ours}); "
        "it is never adopted"
    )
    assert driver.log == []


def test_fills_of_an_adopted_order_count_like_any_fill() -> None:
    driver = Driver()
    order_id = _adopt(driver)

    driver.fill(order_id, "0.05", "50000", fee="1.25", fill_id="t1")
    driver.fill(order_id, "0.15", "50400", fee="3.78", fill_id="t2")

    order = driver.order(order_id)
    assert (order.status, order.filled_qty, order.avg_fill_price) == (OrderStatus.FILLED, D("0.2"), D("50300"))
    held = driver.store.open_position(USER, "okx", LINEAR, PositionSide.LONG)
    assert held is not None
    assert (held.size, held.entry_price, held.fees) == (D("0.2"), D("50300"), D("5.03"))
    assert driver.refused("record_fill", order_id=order_id, fill_id="t1", quantity="0.05", price="1").code is (
        RejectCode.DUPLICATE_FILL
    )


def test_place_orders_checks_of_what_may_be_sent_do_not_apply() -> None:
    driver = Driver()

    # a spot sell with nothing held (place_order: SPOT_SHORT) and a value no place_order may name
    _adopt(driver, symbol=SPOT, side="sell", quantity="1")
    _adopt(driver, exchange_order_id="big", quantity="99999999999999999999", price="99999999999999999999")

    assert [e.type for e in driver.log] == ["OrderAdopted", "OrderAdopted"]


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("quantity", "0", RejectCode.INVALID_COMMAND),
        ("price", "0", RejectCode.INVALID_COMMAND),
        ("trigger_price", "-1", RejectCode.INVALID_COMMAND),
    ],
)
def test_values_must_still_be_storable(field: str, value: str, code: RejectCode) -> None:
    assert Driver().refused("adopt_order", **{**ADOPT, field: value}).code is code


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("exchange_order_id", "bad id\n"),
        ("exchange_order_id", "x" * 129),
        ("quantity", "0.0000000000000000001"),
        ("venue_client_order_id", "has space"),
        ("side", "long"),
    ],
)
def test_malformed_fields_are_wire_errors(field: str, value: str) -> None:
    with pytest.raises(wire.WireError) as caught:
        Driver().command("adopt_order", **{**ADOPT, field: value})

    assert caught.value.code == "INVALID_FIELD"
