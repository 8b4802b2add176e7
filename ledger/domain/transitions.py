"""The order state machine as one table: (status, trigger) -> the status after it.

A trigger is what can happen to an order after it is placed (``pending``): the venue
acknowledges, rejects, fills, cancels or expires it, or its user asks for a cancel. A pair the
table holds is allowed and gives the new status; a pair it lacks is refused (``refusal`` gives
the reason). Fills are facts the venue reports, so no fill is ever refused: a fill on a
cancelled, rejected or expired order is recorded *late* and leaves its status as it is, a fill
beyond the quantity of a filled order is an overfill.

The decider takes every order status it writes from here, the paper venue the statuses it
may fill and the events that end an order. Which statuses are final is CONTRACT §6 vocabulary
(``ledger.domain.enums.FINAL_ORDER_STATUSES``); the table agrees with it (``tests/unit/test_transitions.py``):
from a final status only fills are allowed, and they never leave it. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from ledger.domain.enums import FINAL_ORDER_STATUSES, OrderStatus


class Trigger(StrEnum):
    """What can happen to a placed order, and the event that records it."""

    ACCEPT = "accept"  # the venue acknowledged it: OrderAccepted
    REJECT = "reject"  # the venue refused it: OrderRejected
    REQUEST_CANCEL = "request_cancel"  # its user asked for a cancel: OrderCancelRequested
    CONFIRM_CANCEL = "confirm_cancel"  # the venue confirmed the cancel: OrderCancelled
    EXPIRE = "expire"  # the venue expired it (IOC, FOK, GTD): OrderExpired
    FILL = "fill"  # a fill that leaves part of the quantity unfilled: OrderFilled
    FILL_ALL = "fill_all"  # a fill that reaches (or passes) the quantity: OrderFilled

    @property
    def verb(self) -> str:
        """How a refusal names the trigger: ``cannot <verb> order ...``."""
        return _VERBS[self]

    @property
    def event_type(self) -> str:
        """The type of the event that records the trigger (CONTRACT §5)."""
        return _EVENT_TYPES[self]


_VERBS = {
    Trigger.ACCEPT: "accept",
    Trigger.REJECT: "reject",
    Trigger.REQUEST_CANCEL: "cancel",
    Trigger.CONFIRM_CANCEL: "confirm the cancel of",
    Trigger.EXPIRE: "expire",
    Trigger.FILL: "fill",
    Trigger.FILL_ALL: "fill",
}
_EVENT_TYPES = {
    Trigger.ACCEPT: "OrderAccepted",
    Trigger.REJECT: "OrderRejected",
    Trigger.REQUEST_CANCEL: "OrderCancelRequested",
    Trigger.CONFIRM_CANCEL: "OrderCancelled",
    Trigger.EXPIRE: "OrderExpired",
    Trigger.FILL: "OrderFilled",
    Trigger.FILL_ALL: "OrderFilled",
}

_PENDING = OrderStatus.PENDING
_OPEN = OrderStatus.OPEN
_PARTIAL = OrderStatus.PARTIALLY_FILLED
_CANCELLING = OrderStatus.PENDING_CANCEL
_FILLED = OrderStatus.FILLED
_CANCELLED = OrderStatus.CANCELLED
_REJECTED = OrderStatus.REJECTED
_EXPIRED = OrderStatus.EXPIRED

TRANSITIONS: Mapping[tuple[OrderStatus, Trigger], OrderStatus] = MappingProxyType(
    {
        # pending: recorded, not yet acknowledged; a fill accepts it implicitly
        (_PENDING, Trigger.ACCEPT): _OPEN,
        (_PENDING, Trigger.REJECT): _REJECTED,
        (_PENDING, Trigger.REQUEST_CANCEL): _CANCELLING,
        (_PENDING, Trigger.CONFIRM_CANCEL): _CANCELLED,
        (_PENDING, Trigger.EXPIRE): _EXPIRED,
        (_PENDING, Trigger.FILL): _PARTIAL,
        (_PENDING, Trigger.FILL_ALL): _FILLED,
        # open: acknowledged by the venue, nothing filled
        (_OPEN, Trigger.ACCEPT): _OPEN,
        (_OPEN, Trigger.REQUEST_CANCEL): _CANCELLING,
        (_OPEN, Trigger.CONFIRM_CANCEL): _CANCELLED,
        (_OPEN, Trigger.EXPIRE): _EXPIRED,
        (_OPEN, Trigger.FILL): _PARTIAL,
        (_OPEN, Trigger.FILL_ALL): _FILLED,
        # partially filled: a late acknowledgement records the venue's id, nothing else
        (_PARTIAL, Trigger.ACCEPT): _PARTIAL,
        (_PARTIAL, Trigger.REQUEST_CANCEL): _CANCELLING,
        (_PARTIAL, Trigger.CONFIRM_CANCEL): _CANCELLED,
        (_PARTIAL, Trigger.EXPIRE): _EXPIRED,
        (_PARTIAL, Trigger.FILL): _PARTIAL,
        (_PARTIAL, Trigger.FILL_ALL): _FILLED,
        # pending cancel: the venue may still fill, refuse, expire it or confirm the cancel
        (_CANCELLING, Trigger.ACCEPT): _CANCELLING,
        (_CANCELLING, Trigger.REJECT): _REJECTED,
        (_CANCELLING, Trigger.REQUEST_CANCEL): _CANCELLING,
        (_CANCELLING, Trigger.CONFIRM_CANCEL): _CANCELLED,
        (_CANCELLING, Trigger.EXPIRE): _EXPIRED,
        (_CANCELLING, Trigger.FILL): _CANCELLING,
        (_CANCELLING, Trigger.FILL_ALL): _FILLED,
        # final: only fills are recorded (an overfill, or late), and the status stays
        (_FILLED, Trigger.FILL): _FILLED,
        (_FILLED, Trigger.FILL_ALL): _FILLED,
        (_CANCELLED, Trigger.FILL): _CANCELLED,
        (_CANCELLED, Trigger.FILL_ALL): _CANCELLED,
        (_REJECTED, Trigger.FILL): _REJECTED,
        (_REJECTED, Trigger.FILL_ALL): _REJECTED,
        (_EXPIRED, Trigger.FILL): _EXPIRED,
        (_EXPIRED, Trigger.FILL_ALL): _EXPIRED,
    }
)


def next_status(status: OrderStatus, trigger: Trigger) -> OrderStatus | None:
    """The status after ``trigger``, or None when an order in ``status`` refuses it."""
    return TRANSITIONS.get((status, trigger))


def refusal(order_id: str, status: OrderStatus, trigger: Trigger) -> str:
    """Why an order in ``status`` refuses ``trigger`` (the message of ``INVALID_TRANSITION``)."""
    return f"cannot {trigger.verb} order {order_id}: it is {status}"


# The statuses in which the venue works an order (a fill leaves it partially filled): a
# pending_cancel order waits for its cancel instead.
FILLABLE_ORDER_STATUSES = frozenset(s for s in OrderStatus if next_status(s, Trigger.FILL) is _PARTIAL)
# The statuses in which a fill is recorded late: final, and a fill does not make them filled.
LATE_FILL_STATUSES = frozenset(s for s in FINAL_ORDER_STATUSES if next_status(s, Trigger.FILL_ALL) is not _FILLED)
# The event types that can end an order (take it from an open status to a final one).
FINAL_EVENT_TYPES = frozenset(
    trigger.event_type
    for (status, trigger), after in TRANSITIONS.items()
    if status not in FINAL_ORDER_STATUSES and after in FINAL_ORDER_STATUSES
)
