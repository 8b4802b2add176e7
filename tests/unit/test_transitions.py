"""The order transition table (``ledger.domain.transitions``), pair by pair, and what derives from it.
Pure: no servers."""

from __future__ import annotations

import pytest

from ledger.domain.enums import FINAL_ORDER_STATUSES, OPEN_ORDER_STATUSES, OrderStatus
from ledger.domain.transitions import (
    FILLABLE_ORDER_STATUSES,
    FINAL_EVENT_TYPES,
    LATE_FILL_STATUSES,
    TRANSITIONS,
    Trigger,
    next_status,
    refusal,
)

P, OP, PF, PC = "pending", "open", "partially_filled", "pending_cancel"
F, C, R, E = "filled", "cancelled", "rejected", "expired"
ORDER_ID = "0b7e2b44-6f0c-4d8e-9a51-3c2d1e0f9a8b"

# Each status's row, triggers in this order; "-" is refused.
TRIGGERS = ("accept", "reject", "request_cancel", "confirm_cancel", "expire", "fill", "fill_all")
TABLE = {
    P: (OP, R, PC, C, E, PF, F),
    OP: (OP, "-", PC, C, E, PF, F),
    PF: (PF, "-", PC, C, E, PF, F),
    PC: (PC, R, PC, C, E, PC, F),
    F: ("-", "-", "-", "-", "-", F, F),
    C: ("-", "-", "-", "-", "-", C, C),
    R: ("-", "-", "-", "-", "-", R, R),
    E: ("-", "-", "-", "-", "-", E, E),
}
VERBS = {
    "accept": "accept",
    "reject": "reject",
    "request_cancel": "cancel",
    "confirm_cancel": "confirm the cancel of",
    "expire": "expire",
}
PAIRS = [(status, trigger, row[i]) for status, row in TABLE.items() for i, trigger in enumerate(TRIGGERS)]


def test_the_table_covers_every_status_and_trigger() -> None:
    assert set(TABLE) == {s.value for s in OrderStatus}
    assert TRIGGERS == tuple(t.value for t in Trigger)
    assert len(TRANSITIONS) == sum(after != "-" for _s, _t, after in PAIRS) == 34


@pytest.mark.parametrize(("status", "trigger", "after"), PAIRS, ids=[f"{s}-{t}" for s, t, _a in PAIRS])
def test_each_pair(status: str, trigger: str, after: str) -> None:
    found = next_status(OrderStatus(status), Trigger(trigger))
    if after == "-":
        assert found is None
        assert refusal(ORDER_ID, OrderStatus(status), Trigger(trigger)) == (
            f"cannot {VERBS[trigger]} order {ORDER_ID}: it is {status}"
        )
    else:
        assert found is OrderStatus(after)


def test_a_fill_is_never_refused() -> None:
    for status in OrderStatus:
        assert next_status(status, Trigger.FILL) is not None
        assert next_status(status, Trigger.FILL_ALL) is not None


def test_the_table_agrees_with_the_final_statuses_of_the_contract() -> None:
    """CONTRACT §6: pending, open, partially_filled, pending_cancel are open; the rest final.
    From a final status only fills are allowed and they never leave it; every open status can
    still become final."""
    assert OPEN_ORDER_STATUSES == {OrderStatus(s) for s in (P, OP, PF, PC)}
    assert FINAL_ORDER_STATUSES == {OrderStatus(s) for s in (F, C, R, E)}
    for (status, trigger), after in TRANSITIONS.items():
        if status in FINAL_ORDER_STATUSES:
            assert trigger in (Trigger.FILL, Trigger.FILL_ALL) and after is status
    for status in OPEN_ORDER_STATUSES:
        assert any(next_status(status, t) in FINAL_ORDER_STATUSES for t in Trigger)


def test_what_derives_from_the_table() -> None:
    assert FILLABLE_ORDER_STATUSES == {OrderStatus.PENDING, OrderStatus.OPEN, OrderStatus.PARTIALLY_FILLED}
    assert LATE_FILL_STATUSES == {OrderStatus.CANCELLED, OrderStatus.REJECTED, OrderStatus.EXPIRED}
    assert FINAL_EVENT_TYPES == {"OrderFilled", "OrderCancelled", "OrderRejected", "OrderExpired"}
    assert {t.event_type for t in Trigger} == {
        "OrderAccepted",
        "OrderRejected",
        "OrderCancelRequested",
        "OrderCancelled",
        "OrderExpired",
        "OrderFilled",
    }
